#!/usr/bin/env bash
# Node `ws` client tests against a real wshd.  Installs its deps (npm ci), runs, exits non-zero on failure.
# Env: WSHD_BIN (default target/debug/wshd), WSHD_TARGET_DIR (default target/debug), relative to the repo root.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d node_modules/ws ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
exec node --test --test-reporter=spec test/*.test.mjs
