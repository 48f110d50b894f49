#!/usr/bin/env bash
# Test-host setup for everything that talks to a real Incus (crates/incusctl
# tests and the daemon's lifecycle tests).
#
# Idempotent; for a fresh Debian 12 machine, run as root, without systemd:
#   1. adds the bookworm-backports suite (copied from the machine's own
#      Debian source file, so no address is written anywhere);
#   2. installs incus, debootstrap and curl;
#   3. starts incusd with setsid (from /) unless its socket already answers;
#      one left running from a removed directory is restarted first;
#   4. creates the bridge sbx0 (198.18.0.1/24, no NAT, no IPv6), the storage
#      pool and the default profile's devices when missing, and attaches
#      sandboxd's egress ACL sandboxd-egress-sbx0 to the bridge with the
#      bridge's default ACL actions set to allow (the ACL holds only reject
#      rules for sandboxes' own addresses; without these keys Incus would
#      reject all other traffic of every container on the bridge);
#   5. builds the small test image with provision/images/debian-12.sh
#      (debootstrap; cached as tarballs under
#      /var/cache/sandboxd-test/ so later runs skip debootstrap) and imports it
#      as `test/debian-ssh` unless the alias already points at it.
#
# The `incus` command is used here because this is test infrastructure; the
# product code speaks only the REST API.
#
# Environment overrides (all optional):
#   SANDBOXD_TEST_CACHE   cache dir        (default /var/cache/sandboxd-test)
#   INCUSD_LOG            incusd log file  (default /var/log/sandboxd-test-incusd.log)
#   INCUSD_PIDFILE        incusd PID file  (default /run/sandboxd-test-incusd.pid)
set -euo pipefail

CACHE=${SANDBOXD_TEST_CACHE:-/var/cache/sandboxd-test}
INCUSD_LOG=${INCUSD_LOG:-/var/log/sandboxd-test-incusd.log}
INCUSD_PIDFILE=${INCUSD_PIDFILE:-/run/sandboxd-test-incusd.pid}
SOCKET=/var/lib/incus/unix.socket
IMAGE_ALIAS=test/debian-ssh
# Bump when the image recipe below changes: a new cache directory is built and
# the alias is moved to the new image.
RECIPE=v2
IMAGE_DIR="$CACHE/debian-ssh-$RECIPE"

log() { printf '[setup-incus] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# --- 1+2. packages ---------------------------------------------------------
install_packages() {
    if command -v incus >/dev/null 2>&1 && [ -x /usr/libexec/incus/incusd ] &&
        command -v debootstrap >/dev/null 2>&1 && command -v curl >/dev/null 2>&1; then
        log "incus, debootstrap and curl already installed"
        return
    fi
    local src=/etc/apt/sources.list.d/debian.sources
    local dst=/etc/apt/sources.list.d/backports.sources
    if [ ! -f "$dst" ]; then
        if [ ! -f "$src" ]; then
            log "missing $src: cannot derive the backports suite"
            exit 1
        fi
        # Keep only the stanzas that serve the plain release (not the
        # security archive, which has no backports suite) and change their
        # suite. Stanzas are separated by blank lines.
        awk '
            BEGIN { RS = ""; ORS = "\n\n" }
            {
                n = split($0, lines, "\n"); keep = 0; out = ""
                for (i = 1; i <= n; i++) {
                    line = lines[i]
                    if (line ~ /^Suites:/) {
                        m = split(line, w, /[ \t]+/)
                        for (j = 2; j <= m; j++) if (w[j] == "bookworm") keep = 1
                        line = "Suites: bookworm-backports"
                    }
                    out = out line "\n"
                }
                if (keep) printf "%s\n", out
            }' "$src" >"$dst.tmp"
        if ! grep -q '^Suites: bookworm-backports' "$dst.tmp"; then
            log "no bookworm stanza found in $src"
            rm -f "$dst.tmp"
            exit 1
        fi
        mv "$dst.tmp" "$dst"
        log "added $dst"
    fi
    # Other third-party sources on the machine may fail to refresh; the
    # install below is what must succeed.
    apt-get update -q || log "apt-get update reported errors (continuing)"
    apt-get install -y -q -t bookworm-backports incus
    apt-get install -y -q debootstrap curl
}

# --- 3. incusd ---------------------------------------------------------------
socket_answers() {
    curl -sf --max-time 5 --unix-socket "$SOCKET" http://incus/1.0 >/dev/null 2>&1
}

start_incusd() {
    # An incusd started by an earlier run from a checkout that was removed
    # since has lost its working directory, and Incus's rsync (snapshots,
    # copies) then fails in getcwd(): restart it, from /.
    local running
    running=$(pgrep -of '^/usr/libexec/incus/incusd ' || true)
    if [ -n "$running" ] && readlink "/proc/$running/cwd" | grep -q ' (deleted)$'; then
        log "incusd (pid $running) runs in a removed directory; restarting it from /"
        kill "$running"
        for _ in $(seq 1 60); do
            kill -0 "$running" 2>/dev/null || break
            sleep 0.5
        done
    fi
    if socket_answers; then
        log "incusd already answers on $SOCKET"
        return
    fi
    if [ -f "$INCUSD_PIDFILE" ]; then
        local old
        old=$(cat "$INCUSD_PIDFILE" 2>/dev/null || true)
        if [ -n "$old" ] && kill -0 "$old" 2>/dev/null; then
            log "incusd (pid $old) is running but not answering yet; waiting"
        else
            old=""
        fi
    fi
    if [ -z "${old:-}" ]; then
        mkdir -p "$(dirname "$INCUSD_LOG")" "$(dirname "$INCUSD_PIDFILE")"
        # The socket's group: the daemon, when `sandboxd setup` runs it as
        # its own user, reaches Incus through it.
        local group=root
        if getent group incus-admin >/dev/null; then group=incus-admin; fi
        # From /, so that it never holds on to a checkout's directory.
        (cd / && exec setsid /usr/libexec/incus/incusd --group "$group" >>"$INCUSD_LOG" 2>&1 </dev/null) &
        echo $! >"$INCUSD_PIDFILE"
        log "started incusd (pid $!, log $INCUSD_LOG)"
    fi
    local i
    for i in $(seq 1 120); do
        if socket_answers; then
            log "incusd answers after ${i}x0.5 s"
            return
        fi
        sleep 0.5
    done
    log "incusd did not answer on $SOCKET within 60 s; last log lines:"
    tail -n 30 "$INCUSD_LOG" >&2 || true
    exit 1
}

# --- 4. network, storage, profile -------------------------------------------
configure_incus() {
    if ! incus storage show default >/dev/null 2>&1; then
        incus storage create default dir
        log "created storage pool default"
    fi
    if ! incus network show sbx0 >/dev/null 2>&1; then
        incus network create sbx0 ipv4.address=198.18.0.1/24 ipv4.nat=false ipv6.address=none
        log "created network sbx0"
    fi
    # sandboxd's egress ACL of the bridge, attached once here (sandboxd
    # setup does the same on product hosts) so that test daemons only edit
    # its rules: a network change restarts the bridge's DHCP/DNS server.
    local acl=sandboxd-egress-sbx0 settings=() key
    if ! incus network acl show "$acl" >/dev/null 2>&1; then
        incus network acl create "$acl"
        log "created network ACL $acl"
    fi
    for key in security.acls.default.egress.action security.acls.default.ingress.action; do
        if [ -z "$(incus network get sbx0 "$key")" ]; then
            settings+=("$key=allow")
        fi
    done
    local acls
    acls=$(incus network get sbx0 security.acls)
    if ! tr ',' '\n' <<<"$acls" | grep -qx "$acl"; then
        settings+=("security.acls=${acls:+$acls,}$acl")
    fi
    if [ "${#settings[@]}" -gt 0 ]; then
        incus network set sbx0 "${settings[@]}"
        log "set ${settings[*]} on sbx0"
    fi
    local devices
    devices=$(incus profile device list default 2>/dev/null || true)
    if ! grep -qx 'eth0' <<<"$devices"; then
        incus profile device add default eth0 nic network=sbx0 name=eth0
        log "added eth0 to the default profile"
    fi
    if ! grep -qx 'root' <<<"$devices"; then
        incus profile device add default root disk path=/ pool=default
        log "added root disk to the default profile"
    fi
}

# --- 5. test image -------------------------------------------------------------
build_image() {
    mkdir -p "$CACHE"
    chmod 0700 "$CACHE"
    IMAGE_DESCRIPTION="Debian 12 minbase with openssh-server (sandboxd test image $RECIPE)" \
        bash "$(dirname "$0")/../provision/images/debian-12.sh" "$IMAGE_DIR"
}

import_image() {
    # A split image's fingerprint is the SHA-256 of metadata then rootfs.
    local want have
    want=$(cat "$IMAGE_DIR/meta.tar.gz" "$IMAGE_DIR/rootfs.tar.gz" | sha256sum | cut -d' ' -f1)
    have=$(curl -sf --unix-socket "$SOCKET" "http://incus/1.0/images/aliases/${IMAGE_ALIAS//\//%2F}" |
        sed -n 's/.*"target": *"\([0-9a-f]*\)".*/\1/p' || true)
    if [ "$have" = "$want" ]; then
        log "alias $IMAGE_ALIAS already points at $want"
        return
    fi
    if [ -n "$have" ]; then
        log "alias $IMAGE_ALIAS points at $have, moving it to $want"
        incus image alias delete "$IMAGE_ALIAS"
    fi
    if curl -sf --unix-socket "$SOCKET" "http://incus/1.0/images/$want" >/dev/null; then
        incus image alias create "$IMAGE_ALIAS" "$want"
    else
        incus image import "$IMAGE_DIR/meta.tar.gz" "$IMAGE_DIR/rootfs.tar.gz" --alias "$IMAGE_ALIAS"
    fi
    log "imported $IMAGE_ALIAS ($want)"
}

install_packages
start_incusd
configure_incus
build_image
import_image
log "ready: socket $SOCKET, network sbx0, image $IMAGE_ALIAS"
