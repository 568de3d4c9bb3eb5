#!/usr/bin/env bash
# Full benchmark run (about 20 minutes on 2 cores): builds in release, measures
# wshd, raw tokio-tungstenite (default and 4 KiB read buffer), fastwebsockets,
# Node ws and pywebsocket3, with shared cores and with the server pinned to a
# core of its own, plus the permessage-deflate rows, and regenerates
# BENCHMARKS.md and bench/chart.svg.
# Then measures hot reload (latency, drops during 100 reloads under load) and
# writes that section of BENCHMARKS.md.
# Extra arguments go to wsbench-runner (e.g. --rounds 5, --peers raw4k,wshd).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release -p bench --bin wsbench-runner -- "$@"
ulimit -n 20000 2>/dev/null || true
target=${CARGO_TARGET_DIR:-target}
cargo build --release -p wshd -p bench --bin wshd --bin wsbench-reload
"$target/release/wsbench-reload" --wshd "$target/release/wshd" --update BENCHMARKS.md
