#!/usr/bin/env bash
# Python `websockets` client tests against a real wshd.  Installs its deps into
# tests/python/.venv (only when requirements.txt changed), unpacks pywebsocket3's sdist there for its
# echo_client.py, runs pytest, exits non-zero on failure.
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
# pywebsocket3's own client, echo_client.py, ships only in the sdist's example/
# directory (the wheel has none): unpack the pinned sdist once into the venv.
PYWS_VERSION="$(sed -n 's/^pywebsocket3==//p' requirements.txt)"
PYWEBSOCKET3_EXAMPLE="$PWD/.venv/pywebsocket3-sdist/pywebsocket3-$PYWS_VERSION/example"
if [ ! -f "$PYWEBSOCKET3_EXAMPLE/echo_client.py" ]; then
  rm -rf .venv/pywebsocket3-sdist
  mkdir -p .venv/pywebsocket3-sdist
  .venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    "pywebsocket3==$PYWS_VERSION" -d .venv/pywebsocket3-sdist
  tar xzf ".venv/pywebsocket3-sdist/pywebsocket3-$PYWS_VERSION.tar.gz" -C .venv/pywebsocket3-sdist
fi
export PYWEBSOCKET3_EXAMPLE
exec .venv/bin/python -m pytest -p no:cacheprovider -v "$@"
