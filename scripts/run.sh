#!/usr/bin/env bash
# Builds wshd and every example handler (release), stages the handlers in
# target/handlers, and starts the server on 127.0.0.1:9998 with the console
# pages from www/. Extra arguments go to wshd (e.g. -p 8080, -H 0.0.0.0).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --exclude bench
scripts/stage-handlers.sh release target/handlers
exec target/release/wshd --config config/dev.toml "$@"
