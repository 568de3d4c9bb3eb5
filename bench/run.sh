#!/usr/bin/env bash
# Full benchmark run (about 15 minutes on 2 cores): builds in release, measures
# wshd, raw tokio-tungstenite (default and 4 KiB read buffer), Node ws and
# pywebsocket3, and regenerates BENCHMARKS.md and bench/chart.svg.
# Extra arguments go to wsbench-runner (e.g. --rounds 5, --peers raw4k,wshd).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release -p bench --bin wsbench-runner -- "$@"
