#!/usr/bin/env bash
# Cross-node fan-out through Redis on loopback (docs/cluster.md, "Measured"):
# starts its own redis-server and two wshd nodes (release build, chat) on
# free ports, then runs wsbench fanout with the publisher on node A and the
# subscribers on node B (--subscriber-url), beside the same workload within
# node A alone. A second pass samples Redis's CPU (--server-pid) to report
# Redis's cost per message. Prints one JSON record per run; stops everything
# it started by PID.
#
# Usage: bench/cluster.sh [DURATION_S]   (default 3; needs redis-server)
set -euo pipefail
cd "$(dirname "$0")/.."
D="${1:-3}"
cargo build -q --release -p wshd -p bench -p chat-handler
BIN=target/release
TMP="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_file() { for _ in $(seq 500); do [ -s "$1" ] && return 0; sleep 0.02; done; echo "timeout: $1" >&2; exit 1; }

RPORT="$(free_port)"
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no >"$TMP/redis.log" 2>&1 &
RPID=$!; PIDS+=("$RPID")
for _ in $(seq 500); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.02; done

mkdir -p "$TMP/h"
cp "$BIN/libchat_wsh.so" "$TMP/h/"
for n in a b; do
  cat >"$TMP/$n.toml" <<EOF
[limits]
send_queue = 4096
[cluster]
redis = "redis://127.0.0.1:$RPORT"
node_id = "bench-$n"
EOF
  "$BIN/wshd" -H 127.0.0.1 -p 0 -w "$TMP/h" --config "$TMP/$n.toml" --addr-file "$TMP/$n.addr" \
    --no-watch --log-level info 2>"$TMP/$n.log" &
  PIDS+=("$!")
  wait_file "$TMP/$n.addr"
  for _ in $(seq 500); do grep -q 'cross-node delivery is up' "$TMP/$n.log" && break; sleep 0.02; done
done
A="$(cat "$TMP/a.addr")"; B="$(cat "$TMP/b.addr")"
APID="${PIDS[1]}"
# A node subscribes to a room's channel when its first member joins; the
# 0.5 s warm-up (not measured) covers that.

run() { "$BIN/wsbench" --label "$1" --server-pid "$2" fanout "${@:3}" -d "$D" -w 0.5; }
for spec in "1 1000" "1 20000" "1000 20" "1000 200"; do
  set -- $spec; N=$1; RATE=$2
  run "one node, $N subscribers" "$APID" --url "ws://$A/chat?room=same$N" -n "$N" --rate "$RATE"
  run "across nodes, $N subscribers" "$APID" --url "ws://$A/chat?room=x$N" \
      --subscriber-url "ws://$B/chat?room=x$N" -n "$N" --rate "$RATE"
  run "redis CPU, across nodes, $N subscribers" "$RPID" --url "ws://$A/chat?room=y$N" \
      --subscriber-url "ws://$B/chat?room=y$N" -n "$N" --rate "$RATE"
done
