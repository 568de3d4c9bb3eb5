#!/usr/bin/env bash
# CI smoke benchmark: builds in release, runs one short round of tiny
# workloads against wshd, raw tokio-tungstenite (4 KiB read buffer) and
# fastwebsockets, one pinned row and the permessage-deflate rows (wshd), and
# exits non-zero on any error (echo mismatch, connection error, a peer that
# cannot be built or started). The report goes to a temp dir, never to
# BENCHMARKS.md. Extra arguments go to wsbench-runner (e.g. --peers raw4k).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release -p bench --bin wsbench-runner -- --smoke "$@"
