#!/usr/bin/env bash
# Install the Autobahn|Testsuite (fuzzingclient) and its Python 2.7 dependency
# pins into tests/autobahn/.deps (gitignored). Idempotent: a marker file holds
# the pin list; when it matches, nothing is done.
#
# Interpreter lookup order: $AUTOBAHN_PYTHON2, pyenv's 2.7.18, python2.7 on PATH.
# Usage: tests/autobahn/install.sh [--force]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEPS="$HERE/.deps"
MARKER="$DEPS/.wshd-autobahn-installed"

# Pins known to work together on Python 2.7. The suite itself goes in last,
# with --no-deps, because its own metadata asks for versions that no longer
# support Python 2.
PINS=(
  "setuptools==44.0.0"
  "txaio==2.1.0"
  "incremental==16.10.1"
  "pyOpenSSL==19.1.0"
  "cryptography==3.3.2"
  "Twisted==19.10.0"
  "zope.interface==4.6.0"
  "jinja2==2.11.3"
  "markupsafe==1.1.1"
  "Werkzeug==1.0.1"
  "klein==17.10.0"
  "service_identity==18.1.0"
  "unittest2==1.1.0"
  "six==1.16.0"
  "autobahn[twisted,accelerate]==0.10.9"
)
SUITE="autobahntestsuite==25.10.1"
MARKER_CONTENT="$(printf '%s\n' "${PINS[@]}" "$SUITE")"

source "$HERE/python2.sh"

if ! PY2="$(find_python2)"; then
  python2_missing
  exit 2
fi

ver="$("$PY2" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)"
if [[ "$ver" != "2.7" ]]; then
  echo "error: $PY2 is Python '${ver:-?}', need 2.7 (set AUTOBAHN_PYTHON2)" >&2
  exit 2
fi

if [[ "${1:-}" != "--force" && -f "$MARKER" && "$(cat "$MARKER")" == "$MARKER_CONTENT" ]]; then
  echo "autobahn: suite already installed in $DEPS ($SUITE)"
  exit 0
fi

if ! "$PY2" -m pip --version >/dev/null 2>&1; then
  echo "autobahn: pip missing for $PY2, bootstrapping with ensurepip" >&2
  "$PY2" -m ensurepip --default-pip >&2 || {
    echo "error: could not bootstrap pip for $PY2 (try: apt-get install python-pip, or pyenv install 2.7.18)" >&2
    exit 2
  }
fi

# Install into a scratch dir, then swap it in, so an interrupted install never
# leaves a half-populated .deps with a valid marker.
TMP="$(mktemp -d "$HERE/.deps.tmp.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

PIP=("$PY2" -m pip install --target "$TMP" --no-warn-script-location
     --disable-pip-version-check --no-cache-dir)
echo "autobahn: installing pinned dependencies with $PY2 ($("$PY2" -m pip --version | cut -d' ' -f1-2))"
"${PIP[@]}" "${PINS[@]}"
echo "autobahn: installing $SUITE (--no-deps)"
"${PIP[@]}" --no-deps "$SUITE"

# Smoke test: the entry point must import with the deps dir as a site dir.
"$PY2" - "$TMP" <<'EOF'
import site, sys
site.addsitedir(sys.argv[1])
import zope.interface, twisted, autobahn, autobahntestsuite
from autobahntestsuite import wstest
print("autobahn: import check ok (autobahn %s, twisted %s)" % (autobahn.__version__, twisted.__version__))
EOF

printf '%s\n' "$MARKER_CONTENT" > "$TMP/.wshd-autobahn-installed"
rm -rf "$DEPS"
mv "$TMP" "$DEPS"
trap - EXIT
echo "autobahn: installed into $DEPS"
