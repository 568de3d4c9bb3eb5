#!/usr/bin/env bash
# The www/ pages in Debian's chromium (driven by playwright-core) against a real wshd.
# Installs chromium with apt-get when it is missing (as root), npm ci for playwright-core,
# runs, exits non-zero on failure.  A missing browser fails the run.
# Env: CHROMIUM (default /usr/bin/chromium), WSHD_BIN, WSHD_TARGET_DIR (see tests/node/lib/wshd.mjs).
set -euo pipefail
cd "$(dirname "$0")"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
export CHROMIUM
if [ ! -x "$CHROMIUM" ] && [ "$CHROMIUM" = /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "browser: installing Debian's chromium" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if [ ! -x "$CHROMIUM" ]; then
  echo "browser: FAIL: no browser at $CHROMIUM (apt-get install -y chromium)" >&2
  exit 1
fi
if [ ! -d node_modules/playwright-core ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
mkdir -p artifacts
exec node --test --test-reporter=spec --test-timeout=120000 browser.test.mjs
