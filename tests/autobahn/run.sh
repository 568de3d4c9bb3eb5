#!/usr/bin/env bash
# Run the Autobahn|Testsuite fuzzingclient against wshd's /echo route and fail
# on any FAILED case or any NON-STRICT / UNIMPLEMENTED case not allowed.
#
#   tests/autobahn/run.sh            # build first: cargo build -p wshd -p echo-handler
#
# Environment (all optional):
#   WSHD_BIN             server binary             (default: target/debug/wshd)
#   WSHD_ECHO_SO         echo handler to copy      (default: target/debug/libecho_wsh.so)
#   WSHD_HANDLERS_DIR    use this handler dir as is instead of a temp dir with the echo handler
#   WSHD_URL             ws://... : test this already running server, start none
#   AUTOBAHN_CASES       comma-separated case globs  (default: 1.*,...,7.*,9.*,10.*)
#   AUTOBAHN_EXCLUDE     comma-separated case globs  (default: 12.*,13.*)
#   AUTOBAHN_QUICK=1     also exclude the 8 slowest group 9 cases (see QUICK_EXCLUDE)
#   AUTOBAHN_ALLOW_NON_STRICT   (default: none; every case must be OK)
#   AUTOBAHN_REPORTS     report dir                (default: tests/autobahn/reports, wiped first)
#   AUTOBAHN_MARKDOWN    also write the summary as a markdown table to this file
#   AUTOBAHN_TIMEOUT     seconds allowed for the suite (default: 900)
#   AUTOBAHN_PYTHON2     Python 2.7 interpreter (default: pyenv 2.7.18)
#   AUTOBAHN_TLS=1       serve wss:// (a certificate made now with the openssl CLI) and
#                        fuzz over TLS; reports then default to tests/autobahn/reports-wss
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
# shellcheck source=python2.sh
source "$HERE/python2.sh"

log() { echo "autobahn: $*" >&2; }

TLS="${AUTOBAHN_TLS:-0}"
if [[ "$TLS" == 1 ]]; then
  REPORTS="${AUTOBAHN_REPORTS:-$HERE/reports-wss}"
else
  REPORTS="${AUTOBAHN_REPORTS:-$HERE/reports}"
fi
CASES="${AUTOBAHN_CASES:-1.*,2.*,3.*,4.*,5.*,6.*,7.*,9.*,10.*,12.*,13.*}"
EXCLUDE="${AUTOBAHN_EXCLUDE:-}"
# Measured: the cases of group 9 that take longest (tiny fragments or chops of
# big messages, and the 1000-message round trips with the biggest payloads).
QUICK_EXCLUDE="9.3.1,9.4.1,9.5.1,9.5.2,9.6.1,9.6.2,9.7.6,9.8.6"
if [[ "${AUTOBAHN_QUICK:-0}" == 1 ]]; then
  EXCLUDE="$EXCLUDE,$QUICK_EXCLUDE"
fi
ALLOW_NON_STRICT="${AUTOBAHN_ALLOW_NON_STRICT-}"
TIMEOUT="${AUTOBAHN_TIMEOUT:-900}"

PYTHON3="$(command -v python3 || true)"
[[ -n "$PYTHON3" ]] || { log "error: python3 not found (needed by summarize.py)"; exit 2; }
PY2="$(find_python2)" || { python2_missing; exit 2; }

"$HERE/install.sh" >&2

# Wipe the previous report (stale per-case files would linger), but only a
# directory that looks like one of ours.
if [[ -d "$REPORTS" && "$REPORTS" != "$HERE/reports" && "$REPORTS" != "$HERE/reports-wss" && -n "$(ls -A "$REPORTS")" && ! -f "$REPORTS/spec.json" ]]; then
  log "error: AUTOBAHN_REPORTS=$REPORTS is not empty and not a previous report; refusing to wipe it"
  exit 2
fi
rm -rf "$REPORTS"
mkdir -p "$REPORTS"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/wshd-autobahn.XXXXXX")"

SERVER_PID=""
cleanup() {
  local rc=$?
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    # Give it the graceful-shutdown moment it asks for, then insist.
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

server_log_tail() {
  if [[ -s "$REPORTS/wshd.log" ]]; then
    log "last lines of $REPORTS/wshd.log:"
    tail -n 30 "$REPORTS/wshd.log" >&2
  fi
}

if [[ -n "${WSHD_URL:-}" ]]; then
  URL="$WSHD_URL"
  AGENT="${AUTOBAHN_AGENT:-external}"
  log "testing already running server at $URL"
else
  AGENT="${AUTOBAHN_AGENT:-wshd}"
  BIN="${WSHD_BIN:-$ROOT/target/debug/wshd}"
  [[ -x "$BIN" ]] || { log "error: $BIN not found or not executable (cargo build, or set WSHD_BIN)"; exit 2; }

  if [[ -n "${WSHD_HANDLERS_DIR:-}" ]]; then
    HANDLERS="$WSHD_HANDLERS_DIR"
  else
    SO="${WSHD_ECHO_SO:-$ROOT/target/debug/libecho_wsh.so}"
    [[ -f "$SO" ]] || { log "error: $SO not found (cargo build the echo handler, or set WSHD_ECHO_SO)"; exit 2; }
    HANDLERS="$WORK/handlers"
    mkdir -p "$HANDLERS"
    cp "$SO" "$HANDLERS/echo_wsh.so"
  fi

  # The suite sends messages up to 16 MiB (9.1.6, 9.2.6) in a single frame:
  # lift both limits well above that.
  CONFIG="$WORK/wshd.toml"
  cat >"$CONFIG" <<'EOF'
[limits]
max_message_size = "64MiB"
max_frame_size = "64MiB"

# Groups 12 and 13 test permessage-deflate.
[[route]]
path = "/echo"
handler = "echo"
compression = "on"
EOF

  TLS_ARGS=()
  if [[ "$TLS" == 1 ]]; then
    command -v openssl >/dev/null || { log "error: AUTOBAHN_TLS=1 needs the openssl CLI (apt-get install openssl)"; exit 2; }
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -days 2 -subj /CN=localhost \
      -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" >/dev/null 2>&1
    TLS_ARGS=(--tls-cert "$WORK/cert.pem" --tls-key "$WORK/key.pem")
  fi

  ADDR_FILE="$WORK/addr"
  "$BIN" -H 127.0.0.1 -p 0 -w "$HANDLERS" --config "$CONFIG" \
    --addr-file "$ADDR_FILE" --log-level "${WSHD_LOG_LEVEL:-warn}" --no-watch \
    ${TLS_ARGS[@]+"${TLS_ARGS[@]}"} >"$REPORTS/wshd.log" 2>&1 &
  SERVER_PID=$!

  # Readiness: the server writes "host:port\n" to the addr file once it is
  # listening. Poll for the complete line (or the server's death).
  ADDR=""
  for _ in $(seq 300); do
    if [[ -s "$ADDR_FILE" ]] && [[ "$(tail -c1 "$ADDR_FILE" | od -An -c | tr -d ' ')" == '\n' ]]; then
      ADDR="$(head -n1 "$ADDR_FILE")"
      break
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      wait "$SERVER_PID" && rc=0 || rc=$?
      SERVER_PID=""
      log "error: wshd exited (status $rc) before it was listening"
      server_log_tail
      exit 1
    fi
    sleep 0.1
  done
  if [[ -z "$ADDR" ]]; then
    log "error: wshd did not write $ADDR_FILE within 30 s"
    server_log_tail
    exit 1
  fi
  if [[ "$TLS" == 1 ]]; then
    # The fuzzingclient (Twisted, pyOpenSSL) does not verify certificates.
    URL="wss://$ADDR/echo"
  else
    URL="ws://$ADDR/echo"
  fi
  log "wshd (pid $SERVER_PID) listening on $ADDR"
fi

SPEC="$WORK/fuzzingclient.json"
"$PYTHON3" - "$SPEC" "$URL" "$AGENT" "$REPORTS" "$CASES" "$EXCLUDE" <<'EOF'
import json, sys
spec, url, agent, outdir, cases, exclude = sys.argv[1:]
split = lambda s: [x.strip() for x in s.split(",") if x.strip()]
with open(spec, "w") as f:
    json.dump({
        "outdir": outdir,
        "servers": [{"agent": agent, "url": url}],
        "cases": split(cases),
        "exclude-cases": split(exclude),
        "exclude-agent-cases": {},
    }, f, indent=2)
EOF
cp "$SPEC" "$REPORTS/spec.json"

log "running fuzzingclient: cases $CASES, excluding $EXCLUDE (log: $REPORTS/wstest.log)"
start=$(date +%s)
set +e
timeout --kill-after=10 "$TIMEOUT" "$PY2" "$HERE/wstest_launcher.py" "$SPEC" >"$REPORTS/wstest.log" 2>&1
wstest_rc=$?
set -e
elapsed=$(( $(date +%s) - start ))
log "fuzzingclient finished in ${elapsed}s (status $wstest_rc)"

status=0
if [[ $wstest_rc -ne 0 ]]; then
  [[ $wstest_rc -eq 124 ]] && log "error: the suite did not finish within ${TIMEOUT}s"
  log "error: wstest exited with status $wstest_rc; last lines of its log:"
  tail -n 30 "$REPORTS/wstest.log" >&2
  status=1
fi
if [[ -n "$SERVER_PID" ]] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
  log "error: wshd died during the suite"
  server_log_tail
  status=1
fi

# Groups that must appear in the report: those of AUTOBAHN_CASES given as "N.*".
EXPECT="$(tr ',' '\n' <<<"$CASES" | sed -n 's/^ *\([0-9][0-9]*\)\.\*$/\1/p' | paste -sd, -)"
SUMMARY_ARGS=(--allow-non-strict "$ALLOW_NON_STRICT" --expect-groups "$EXPECT")
[[ -n "${AUTOBAHN_MARKDOWN:-}" ]] && SUMMARY_ARGS+=(--markdown "$AUTOBAHN_MARKDOWN")
if [[ -f "$REPORTS/index.json" ]]; then
  "$PYTHON3" "$HERE/summarize.py" "$REPORTS" "${SUMMARY_ARGS[@]}" || status=1
else
  log "error: no $REPORTS/index.json was written"
  status=1
fi

# On success the summariser's "N passed, N failed" stays the last line.
[[ $status -ne 0 ]] && log "FAILED (reports: $REPORTS/index.html)"
exit "$status"
