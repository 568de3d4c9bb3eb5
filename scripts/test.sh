#!/usr/bin/env bash
# Runs every test suite against real builds: Rust unit and integration tests,
# the Python `websockets` and Node `ws` client suites, the Chromium browser
# suite, the Autobahn|Testsuite (cases 1-10, 12 and 13 over ws://, 1-10 over wss://) and a
# benchmark smoke run.
# Each suite installs its own dependencies (pip venv, npm ci) on first use;
# Debian's chromium and pyenv's Python 2.7 must be present (.ci/run installs
# chromium). Any failure fails the whole run.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }

step "build (debug): wshd and every handler"
cargo build --workspace --all-targets

step "cargo test --workspace"
cargo test --workspace

export WSHD_BIN="$PWD/target/debug/wshd" WSHD_TARGET_DIR="$PWD/target/debug"

step "Python websockets suite"
tests/python/run.sh

step "Node ws suite"
tests/node/run.sh

step "Chromium (Playwright) suite"
tests/browser/run.sh

# Groups 12 and 13 (permessage-deflate) take minutes even in a release
# build and would pass the suite's timeout in a debug one: this run uses the
# release server (with the debug handlers, same ABI).
step "Autobahn|Testsuite fuzzingclient, cases 1-10, 12 and 13 (release server)"
cargo build --release -p wshd
WSHD_BIN="$PWD/target/release/wshd" tests/autobahn/run.sh

step "Autobahn|Testsuite fuzzingclient over wss:// (TLS), cases 1-10"
AUTOBAHN_TLS=1 AUTOBAHN_CASES='1.*,2.*,3.*,4.*,5.*,6.*,7.*,9.*,10.*' tests/autobahn/run.sh

step "benchmark smoke run"
bench/smoke.sh

step "all test suites passed"
