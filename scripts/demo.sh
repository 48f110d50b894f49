#!/usr/bin/env bash
# One-command demo on this machine: builds sandboxd, starts the daemon on
# unprivileged local ports with a private state directory, starts a local
# sshd to stand in for a sandbox, routes a demo sandbox to it and shows how
# to use it. Everything lives under $DEMO_DIR (default /tmp/sandboxd-demo).
# Stop with: kill $(cat $DEMO_DIR/sandboxd.pid) $(cat $DEMO_DIR/sshd.pid) $(cat $DEMO_DIR/app.pid)
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-/tmp/sandboxd-demo}
SSH_PORT=${SSH_PORT:-2222}
HTTPS_PORT=${HTTPS_PORT:-8443}
HTTP_PORT=${HTTP_PORT:-8080}
UPSTREAM_PORT=${UPSTREAM_PORT:-2022}
APP_PORT=${APP_PORT:-8000}

if [ "$(id -u)" = 0 ]; then bash .ci/setup-base.sh; fi
cargo build --release --quiet --bin sandboxd
bin=$PWD/target/release/sandboxd

mkdir -p "$DEMO_DIR" && chmod 700 "$DEMO_DIR"
for f in sandboxd.pid sshd.pid app.pid; do
  if [ -f "$DEMO_DIR/$f" ] && kill -0 "$(cat "$DEMO_DIR/$f")" 2>/dev/null; then
    echo "a demo is already running (pid $(cat "$DEMO_DIR/$f")); stop it first" >&2
    exit 1
  fi
done
export SANDBOXD_ADMIN_SOCKET=$DEMO_DIR/admin.sock

# A stand-in sandbox: sshd on loopback for the current user.
up=$DEMO_DIR/upstream
mkdir -p "$up" /run/sshd 2>/dev/null || true
[ -f "$up/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$up/host_ed25519"
[ -f "$DEMO_DIR/client_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C demo-client -f "$DEMO_DIR/client_ed25519"
: > "$up/authorized_keys"
cat > "$up/sshd_config" <<CONF
Port $UPSTREAM_PORT
ListenAddress 127.0.0.1
HostKey $up/host_ed25519
AuthorizedKeysFile $up/authorized_keys
PidFile $DEMO_DIR/sshd.pid
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
Subsystem sftp /usr/lib/openssh/sftp-server
CONF
/usr/sbin/sshd -f "$up/sshd_config"
# A stand-in app: a static page on the app port.
mkdir -p "$DEMO_DIR/app"
echo "hello from the demo sandbox's app" > "$DEMO_DIR/app/index.html"
python3 -m http.server --bind 127.0.0.1 --directory "$DEMO_DIR/app" "$APP_PORT" >/dev/null 2>&1 &
echo $! > "$DEMO_DIR/app.pid"

"$bin" serve --state-dir "$DEMO_DIR/state" \
  --ssh-listen "127.0.0.1:$SSH_PORT" --https-listen "127.0.0.1:$HTTPS_PORT" \
  --http-listen "127.0.0.1:$HTTP_PORT" >"$DEMO_DIR/sandboxd.log" 2>&1 &
echo $! > "$DEMO_DIR/sandboxd.pid"
for _ in $(seq 100); do "$bin" status >/dev/null 2>&1 && break; sleep 0.1; done
"$bin" status

if ! "$bin" show demo >/dev/null 2>&1; then
  "$bin" add demo --domain demo.localhost --upstream 127.0.0.1 --ssh-port "$UPSTREAM_PORT" \
    --app-port "$APP_PORT" \
    --user "$(id -un)" --ssh-key "$DEMO_DIR/client_ed25519.pub" \
    --upstream-host-key "$up/host_ed25519.pub"
fi
# Install the gateway's key for the upstream user.
"$bin" show demo --json | sed -n 's/.*"upstream_public_key": "\(.*\)".*/\1/p' > "$up/authorized_keys"
"$bin" routes
"$bin" ca-cert > "$DEMO_DIR/ca.pem"
cat <<TXT

sandboxd is running (log: $DEMO_DIR/sandboxd.log).
  export SANDBOXD_ADMIN_SOCKET=$DEMO_DIR/admin.sock
  $bin list
  ssh -p $SSH_PORT -i $DEMO_DIR/client_ed25519 demo@127.0.0.1
  curl --cacert $DEMO_DIR/ca.pem --resolve demo.localhost:$HTTPS_PORT:127.0.0.1 https://demo.localhost:$HTTPS_PORT/
Stop: kill \$(cat $DEMO_DIR/sandboxd.pid) \$(cat $DEMO_DIR/sshd.pid) \$(cat $DEMO_DIR/app.pid)
TXT
