#!/usr/bin/env bash
# stage-handlers.sh PROFILE DIR: copies every built lib*_wsh.so of PROFILE
# (debug or release) into DIR and builds the C echo and pub/sub handlers there.
# `install` writes a new inode and renames it into place, which is the safe
# way to replace a handler under a running server.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-release}
dest=${2:-target/handlers}
mkdir -p "$dest"
for f in target/"$profile"/lib*_wsh.so; do
    install -m 0644 "$f" "$dest/"
done
gcc -shared -fPIC -O2 -Wall -Wextra -Werror -I handler-api/include \
    handlers/c/echo_wsh.c -o "$dest/.c_echo_wsh.so.tmp"
mv "$dest/.c_echo_wsh.so.tmp" "$dest/c_echo_wsh.so"
gcc -shared -fPIC -pthread -O2 -Wall -Wextra -Werror -I handler-api/include \
    handlers/c/pubsub_wsh.c -o "$dest/.pubsub_wsh.so.tmp"
mv "$dest/.pubsub_wsh.so.tmp" "$dest/pubsub_wsh.so"
echo "staged handlers in $dest:" && ls "$dest"
