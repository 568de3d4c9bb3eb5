#!/usr/bin/env bash
# Python `websockets` client tests against a real wshd.  Installs its deps into
# tests/python/.venv (only when requirements.txt changed), runs pytest, exits non-zero on failure.
# Env: WSHD_BIN (default target/debug/wshd), WSHD_TARGET_DIR (default target/debug), relative to the repo root.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
if ! .venv/bin/python -c 'import sys' >/dev/null 2>&1; then
  rm -rf .venv
  "$PY" -m venv .venv
fi
if ! cmp -s requirements.txt .venv/.requirements.installed; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  cp requirements.txt .venv/.requirements.installed
fi
exec .venv/bin/python -m pytest -p no:cacheprovider -v "$@"
