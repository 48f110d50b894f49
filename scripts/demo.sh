#!/usr/bin/env bash
# One-command start on a fresh Debian 12 machine (as root), offline:
#   1. builds sandboxd and runs `sandboxd setup` (Incus from the
#      distribution, storage pool, bridge, profile, the sandboxd user, config,
#      binary in /usr/local/bin, the daemon started: by systemd when it is
#      PID 1, detached otherwise);
#   2. a package cache on the bridge for the containers (they reach nothing
#      outside on a host without internet; on a connected server it only
#      makes provisioning faster);
#   3. a Debian 12 base image from the distribution's packages (no image
#      server needed) and the golden image `sandboxd image build` makes
#      from it (Docker, Go, Node.js, hardened sshd);
#   4. the sandbox `demo` from the golden image, with a small web app on its
#      app port, reachable by `ssh -p 2222 demo@localhost` and over HTTPS
#      with the internal CA; then checks both and prints how to use them.
# Safe to run again: what exists is kept. Settings (environment):
#   DEMO_KEY   public key allowed into the sandbox (default ~/.ssh/id_ed25519.pub,
#              made when missing)
#   DEMO_BASE_DIR  where the base image tarballs are built or found
#              (default /var/cache/sandboxd-demo/debian-12)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

log() { printf '\n== %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "run as root: it installs Incus and a system service" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
BRIDGE=sbx0
BRIDGE_IP=198.18.0.1
BASE_DIR=${DEMO_BASE_DIR:-/var/cache/sandboxd-demo/debian-12}
BASE_ALIAS=sandboxd/debian-12
GOLDEN_ALIAS=sandboxd/golden
CONFIG=/etc/sandboxd/sandboxd.toml
export SANDBOXD_ADMIN_SOCKET=/run/sandboxd/admin.sock

log "build"
bash .ci/setup-base.sh >/dev/null
cargo build --locked --quiet --bin sandboxd
bin=$repo/target/debug/sandboxd

log "host setup (install only)"
"$bin" setup --no-start --bridge "$BRIDGE" --bridge-ipv4 "$BRIDGE_IP/24" --no-nat

# Demo settings the plain setup does not write: the golden image is the
# default image, containers use the host's package cache, and no coding
# agent (shelley is built from sources on the internet).
if ! grep -q '^\[provision\]' "$CONFIG"; then
    cat >>"$CONFIG" <<TOML
default_image = "$GOLDEN_ALIAS"

[provision]
apt_proxy = "http://$BRIDGE_IP:3142"
agent = "none"
TOML
fi

log "host setup (start)"
"$bin" setup --bridge "$BRIDGE" --bridge-ipv4 "$BRIDGE_IP/24" --no-nat
sandboxd=/usr/local/bin/sandboxd

log "package cache for the containers"
bash .ci/setup-provision.sh

log "base image $BASE_ALIAS"
command -v debootstrap >/dev/null 2>&1 || apt-get install -y -q debootstrap
if ! incus image alias list --format csv | grep -q "^$BASE_ALIAS,"; then
    bash provision/images/debian-12.sh "$BASE_DIR"
    incus image import "$BASE_DIR/meta.tar.gz" "$BASE_DIR/rootfs.tar.gz" --alias "$BASE_ALIAS" ||
        {
            # The same tarballs may be in the store already under another
            # alias (the test image): point the alias at that image.
            fp=$(cat "$BASE_DIR/meta.tar.gz" "$BASE_DIR/rootfs.tar.gz" | sha256sum | cut -d' ' -f1)
            incus image alias create "$BASE_ALIAS" "$fp"
        }
fi

log "golden image $GOLDEN_ALIAS"
if ! incus image alias list --format csv | grep -q "^$GOLDEN_ALIAS,"; then
    "$sandboxd" image build --base "$BASE_ALIAS"
fi

log "sandbox demo"
key=${DEMO_KEY:-$HOME/.ssh/id_ed25519.pub}
if [ ! -f "$key" ]; then
    mkdir -p "$HOME/.ssh" && chmod 700 "$HOME/.ssh"
    ssh-keygen -q -t ed25519 -N '' -f "${key%.pub}"
fi
create_demo() {
    "$sandboxd" create demo --domain demo.localhost --ssh-key "$key" \
        --hook scripts/demo-app-hook.sh
}
if ! "$sandboxd" show demo >/dev/null 2>&1; then
    create_demo
else
    # Kept from an earlier run, perhaps made with another key, stopped or
    # interrupted since: allow this key (adding a known key changes
    # nothing), then start it or let `create` resume where it stopped.
    "$sandboxd" key add demo "$key" >/dev/null
    case $("$sandboxd" show demo | awk '$1 == "status:" { print $2 }') in
        running) ;;
        stopped) "$sandboxd" start demo ;;
        creating | failed) create_demo ;;
    esac
fi

# Trust the gateway's host key for [localhost]:2222.
known=$HOME/.ssh/known_hosts
touch "$known"
ssh-keygen -R '[localhost]:2222' -f "$known" >/dev/null 2>&1 || true
"$sandboxd" host-key | awk '/^ssh-/ { print "[localhost]:2222 " $1 " " $2 }' >>"$known"
"$sandboxd" ca-cert >/etc/sandboxd/demo-ca.pem

log "check"
# A container just started may need a moment before its sshd answers.
for try in 1 2 3 4 5; do
    if ssh -o BatchMode=yes -i "${key%.pub}" -p 2222 demo@localhost \
        'echo "ssh: logged in to $(hostname) as $(whoami)"'; then
        break
    fi
    [ "$try" -lt 5 ] || exit 1
    sleep 2
done
https_port=443
curl -sS --fail --retry 5 --retry-connrefused --retry-delay 1 --cacert /etc/sandboxd/demo-ca.pem \
    --resolve "demo.localhost:$https_port:127.0.0.1" "https://demo.localhost:$https_port/"

cat <<TXT

The demo sandbox is up.
  ssh -p 2222 demo@localhost
  curl --cacert /etc/sandboxd/demo-ca.pem --resolve demo.localhost:$https_port:127.0.0.1 https://demo.localhost:$https_port/
  agent UI: https://shelley.demo.localhost:$https_port/ with the login 'create' printed
    (once; a new one: sandboxd auth demo admin)
  sandboxd list          # also: top, snapshot list demo, stop/start demo, delete demo
  sandboxd create NAME --domain NAME.example.com --ssh-key ~/.ssh/id_ed25519.pub
Config: $CONFIG   Log: see \`sandboxd setup\` output above.
TXT
