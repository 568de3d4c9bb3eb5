# Sourced by install.sh and run.sh.
#   find_python2     prints a Python 2.7 interpreter, looking at
#                    $AUTOBAHN_PYTHON2, pyenv's 2.7.18 (via `pyenv prefix`, or
#                    directly under $PYENV_ROOT or ~/.pyenv when pyenv is not
#                    on PATH), then python2.7 / python2 on PATH.
#   python2_missing  prints the error for when there is none.
# shellcheck shell=bash

# pyenv shims need a version selected; harmless for a real interpreter.
export PYENV_VERSION="${PYENV_VERSION:-2.7.18}"

is_python27() {
  "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' >/dev/null 2>&1
}

find_python2() {
  local cand prefix
  if [[ -n "${AUTOBAHN_PYTHON2:-}" ]]; then
    echo "$AUTOBAHN_PYTHON2"; return 0
  fi
  if command -v pyenv >/dev/null 2>&1; then
    prefix="$(pyenv prefix 2.7.18 2>/dev/null || true)"
    if [[ -n "$prefix" ]] && is_python27 "$prefix/bin/python"; then
      echo "$prefix/bin/python"; return 0
    fi
  fi
  for cand in "${PYENV_ROOT:-$HOME/.pyenv}/versions/2.7.18/bin/python" python2.7 python2; do
    if command -v "$cand" >/dev/null 2>&1 && is_python27 "$cand"; then
      echo "$(command -v "$cand")"; return 0
    fi
  done
  return 1
}

python2_missing() {
  cat >&2 <<'EOF2'
error: Python 2.7 not found. The Autobahn|Testsuite (wstest) only runs on Python 2.7,
which Debian 12 and Ubuntu 22.04 and later no longer package. Install it with pyenv:
  apt-get install -y build-essential libssl-dev zlib1g-dev libbz2-dev libreadline-dev \
      libsqlite3-dev libffi-dev liblzma-dev curl git
  git clone https://github.com/pyenv/pyenv ~/.pyenv
  ~/.pyenv/bin/pyenv install 2.7.18
then re-run: ~/.pyenv/versions/2.7.18 is found without activating pyenv.
Or point AUTOBAHN_PYTHON2 at any python2.7 interpreter. The suite itself and its
Python 2.7 dependencies are then installed from PyPI on first use (tests/autobahn/install.sh).
EOF2
}
