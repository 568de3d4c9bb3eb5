#!/usr/bin/env bash
# Installs wshd as a system daemon, everything the systemd unit names:
#
#   PREFIX/bin/wshd                     the binary (target/release/wshd, built if missing or stale)
#   PREFIX/share/doc/wshd/              README.md, SECURITY.md, the full example config
#   /etc/sysusers.d/wshd.conf           the `wshd` system user, for systemd-sysusers
#   user and group wshd                 created now (useradd --system), unless --root/--no-user
#   /etc/wshd/wshd.toml                 config/wshd.toml with absolute paths; never overwritten
#   /var/lib/wshd/handlers              handler directory, root:root 0755 (wshd's trust check)
#   /etc/systemd/system/wshd.service    config/wshd.service with PREFIX's binary path
#   /etc/logrotate.d/wshd               config/logrotate (for the optional log file)
#
# Idempotent: a second run changes nothing but the binary, the unit and the
# logrotate file, which it replaces. An existing /etc/wshd/wshd.toml is kept;
# when the generated one differs, it is written next to it as wshd.toml.new.
# It enables and starts nothing: see the last lines it prints.
#
# Usage: scripts/install.sh [--prefix DIR] [--root DIR] [--binary FILE] [--no-user]
#   --prefix DIR    where the binary and docs go (default /usr/local)
#   --root DIR      install into DIR as if it were / (like DESTDIR, for packaging
#                   and CI); implies --no-user, and root is not needed
#   --binary FILE   install this wshd instead of building target/release/wshd
#   --no-user       do not create the wshd user (the sysusers.d file is written)
#
# Exit status: 0 installed; 1 a step failed; 2 usage error.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC="$(cd "$HERE/.." && pwd)"

PREFIX=/usr/local
ROOT=""
BINARY=""
CREATE_USER=1

usage() { sed -n '/^# Usage:/,/^# Exit status/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "install.sh: error: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --prefix) [[ $# -ge 2 ]] || usage; PREFIX="$2"; shift 2 ;;
    --prefix=*) PREFIX="${1#*=}"; shift ;;
    --root) [[ $# -ge 2 ]] || usage; ROOT="$2"; shift 2 ;;
    --root=*) ROOT="${1#*=}"; shift ;;
    --binary) [[ $# -ge 2 ]] || usage; BINARY="$2"; shift 2 ;;
    --binary=*) BINARY="${1#*=}"; shift ;;
    --no-user) CREATE_USER=0; shift ;;
    -h|--help) usage ;;
    *) echo "install.sh: unknown argument: $1" >&2; usage ;;
  esac
done

[[ "$PREFIX" == /* ]] || { echo "install.sh: --prefix must be absolute, got '$PREFIX'" >&2; exit 2; }
PREFIX="${PREFIX%/}"
if [[ -n "$ROOT" ]]; then
  mkdir -p "$ROOT" || die "cannot create --root $ROOT"
  ROOT="$(cd "$ROOT" && pwd)"
  [[ "$ROOT" != / ]] || ROOT=""
fi
[[ -z "$ROOT" ]] || CREATE_USER=0

IS_ROOT=0
[[ "$(id -u)" -eq 0 ]] && IS_ROOT=1
if [[ -z "$ROOT" && "$IS_ROOT" -ne 1 ]]; then
  die "installing into / needs root: run it with sudo (or pass --root DIR to stage into DIR)"
fi
# Ownership: root:root for everything installed. Without root (staging into
# --root as a user) files belong to that user; a package build fixes that.
OWN=()
[[ "$IS_ROOT" -eq 1 ]] && OWN=(-o root -g root)

# The paths the unit, the config and logrotate agree on.
BIN="$PREFIX/bin/wshd"
DOC="$PREFIX/share/doc/wshd"
ETC=/etc/wshd
CONFIG="$ETC/wshd.toml"
LIB=/var/lib/wshd
HANDLERS="$LIB/handlers"
UNIT=/etc/systemd/system/wshd.service
LOGROTATE=/etc/logrotate.d/wshd
SYSUSERS=/etc/sysusers.d/wshd.conf
PID_FILE=/run/wshd/wshd.pid

# ---------------------------------------------------------------- binary
if [[ -z "$BINARY" ]]; then
  BINARY="$SRC/target/release/wshd"
  # Build only when the binary is missing or older than a source file, so
  # that `cargo build --release -p wshd` as yourself, then `sudo install.sh`,
  # does not leave root-owned files in target/.
  stale=""
  if [[ -x "$BINARY" ]]; then
    stale="$(find "$SRC/server" "$SRC/handler-api" "$SRC/Cargo.toml" "$SRC/Cargo.lock" \
      -newer "$BINARY" \( -name '*.rs' -o -name 'Cargo.*' -o -name '*.h' \) -print -quit 2>/dev/null || true)"
  fi
  if [[ -x "$BINARY" && -z "$stale" ]]; then
    say "installing $BINARY (up to date with the sources)"
  elif command -v cargo >/dev/null 2>&1; then
    say "building $BINARY (cargo build --release -p wshd)${stale:+: $stale is newer}"
    (cd "$SRC" && cargo build --release -q -p wshd) || die "cargo build failed"
  elif [[ -x "$BINARY" ]]; then
    say "warning: $stale is newer than $BINARY, and there is no cargo on PATH to rebuild it: installing it as it is"
  else
    die "no $BINARY and no cargo on PATH: build it first (cargo build --release -p wshd, as yourself) or pass --binary FILE"
  fi
fi
[[ -f "$BINARY" && -x "$BINARY" ]] || die "--binary $BINARY is not an executable file"
"$BINARY" --version >/dev/null 2>&1 || die "$BINARY --version failed: not a wshd binary for this machine?"

install -d -m 0755 "${OWN[@]}" "$ROOT$PREFIX/bin" "$ROOT$DOC"
# Replace by rename, so a running wshd keeps its (old) binary mapped intact.
install -m 0755 "${OWN[@]}" "$BINARY" "$ROOT$BIN.new"
mv -f "$ROOT$BIN.new" "$ROOT$BIN"
say "installed $ROOT$BIN ($("$ROOT$BIN" --version))"
for f in README.md SECURITY.md; do
  [[ -f "$SRC/$f" ]] && install -m 0644 "${OWN[@]}" "$SRC/$f" "$ROOT$DOC/$f"
done
install -m 0644 "${OWN[@]}" "$SRC/config/wshd.toml" "$ROOT$DOC/wshd.toml.example"

# ---------------------------------------------------------------- user
install -d -m 0755 "${OWN[@]}" "$ROOT/etc/sysusers.d"
printf '%s\n' \
  "# The wshd service user (installed by wshd's scripts/install.sh)." \
  "u wshd - \"wshd WebSocket server\" $LIB /usr/sbin/nologin" \
  > "$ROOT$SYSUSERS.tmp"
chmod 0644 "$ROOT$SYSUSERS.tmp"
mv -f "$ROOT$SYSUSERS.tmp" "$ROOT$SYSUSERS"
if [[ "$CREATE_USER" -eq 1 ]]; then
  if getent passwd wshd >/dev/null; then
    say "user wshd exists"
  else
    command -v useradd >/dev/null 2>&1 || die "useradd not found (apt-get install passwd), or create the user wshd yourself and pass --no-user"
    useradd --system --user-group --home-dir "$LIB" --no-create-home \
      --shell /usr/sbin/nologin --comment "wshd WebSocket server" wshd
    say "created system user wshd"
  fi
else
  say "user wshd not created (--root or --no-user): systemd-sysusers creates it from $SYSUSERS at boot, or run: useradd --system --user-group --home-dir $LIB --no-create-home --shell /usr/sbin/nologin wshd"
fi

# ---------------------------------------------------------------- handler dir
# root:root 0755 all the way: wshd refuses handler directories writable by
# group or others (trust.rs), and the service user must not be able to
# rewrite its own handler code either. Deploy with: install -m 0644 X_wsh.so
# /var/lib/wshd/handlers/ (as root).
install -d -m 0755 "${OWN[@]}" "$ROOT$LIB" "$ROOT$HANDLERS"
chmod 0755 "$ROOT$LIB" "$ROOT$HANDLERS"
[[ "$IS_ROOT" -eq 1 ]] && chown root:root "$ROOT$LIB" "$ROOT$HANDLERS"
say "handler directory $ROOT$HANDLERS ($(stat -c "%U:%G %a" "$ROOT$HANDLERS"))"

# ---------------------------------------------------------------- config
# The example config with every path absolute, the example route commented
# out (its handler is not installed: -t would fail and the unit not start),
# and the pid file the logrotate file reads.
generate_config() {
  awk -v handlers="$HANDLERS" -v pid="$PID_FILE" -v config="$CONFIG" '
    NR == 1 {
      print "# wshd configuration, installed by scripts/install.sh from config/wshd.toml"
      print "# (the full example is in the docs directory as wshd.toml.example)."
      print "# Test after every edit: wshd -t   (reads this file by default)"
      next
    }
    /^# Start:/  { print "# Start:     systemctl enable --now wshd"; next }
    /^# Test:/   { print "# Test:      wshd -t --config " config "   (like nginx -t)"; next }
    /^# Reload:/ { print "# Reload:    edit this file (it is watched) or systemctl reload wshd"; next }
    /^\[\[route\]\]/ { in_routes = 1
      print "# An example route: uncomment it once its handler (origin_check) is"
      print "# installed in " handlers ", or -t fails and the service does not start."
    }
    in_routes && !/^#/ && !/^[[:space:]]*$/ { print "# " $0; next }
    /^handler_dir = / { print "handler_dir = \"" handlers "\""; next }
    /^document_root = / { print "# document_root = \"/var/lib/wshd/www\""; next }
    /^# pid_file = / { print "pid_file = \"" pid "\""; next }
    { print }
  ' "$SRC/config/wshd.toml"
}
install -d -m 0755 "${OWN[@]}" "$ROOT$ETC"
NEW="$(mktemp "$ROOT$ETC/.wshd.toml.XXXXXX")"
trap 'rm -f "$NEW"' EXIT
generate_config > "$NEW"
chmod 0644 "$NEW"
grep -q "^handler_dir = \"$HANDLERS\"$" "$NEW" || die "config/wshd.toml changed shape: handler_dir was not rewritten"
grep -q "^pid_file = \"$PID_FILE\"$" "$NEW" || die "config/wshd.toml changed shape: pid_file was not set"
if [[ ! -e "$ROOT$CONFIG" ]]; then
  mv -f "$NEW" "$ROOT$CONFIG"
  say "installed $ROOT$CONFIG"
elif cmp -s "$NEW" "$ROOT$CONFIG"; then
  say "$ROOT$CONFIG is up to date"
else
  mv -f "$NEW" "$ROOT$CONFIG.new"
  say "kept your $ROOT$CONFIG; the one this version would install is $ROOT$CONFIG.new (diff them)"
fi
rm -f "$NEW"
trap - EXIT

# ---------------------------------------------------------------- unit, logrotate
install -d -m 0755 "${OWN[@]}" "$ROOT/etc/systemd/system" "$ROOT/etc/logrotate.d"
sed -e "s|/usr/local/bin/wshd|$BIN|g" \
    -e "s|/usr/local/share/doc/wshd|$DOC|g" \
    "$SRC/config/wshd.service" > "$ROOT$UNIT.tmp"
chmod 0644 "$ROOT$UNIT.tmp"
mv -f "$ROOT$UNIT.tmp" "$ROOT$UNIT"
say "installed $ROOT$UNIT"
install -m 0644 "${OWN[@]}" "$SRC/config/logrotate" "$ROOT$LOGROTATE"
say "installed $ROOT$LOGROTATE"

if [[ -z "$ROOT" && -d /run/systemd/system ]]; then
  systemctl daemon-reload || say "warning: systemctl daemon-reload failed: run it before starting wshd"
fi

cat <<EOF
install.sh: done. Next:
  install -m 0644 target/release/libNAME_wsh.so $HANDLERS/   # deploy handlers (as root)
  wshd -t                                                        # checks $CONFIG
  systemctl enable --now wshd && journalctl -u wshd -f
EOF
