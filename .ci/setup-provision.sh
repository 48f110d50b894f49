#!/usr/bin/env bash
# Test-host setup for the provisioning tests (tests/provision.rs).
#
# Idempotent; for a fresh Debian 12 machine, run as root, without systemd as
# PID 1 (run .ci/setup-incus.sh first: it makes the bridge sbx0):
#   1. installs apt-cacher-ng (the package cache the containers use, since
#      the bridge has no route outside) and shellcheck;
#   2. starts apt-cacher-ng by hand with a PID file unless something already
#      answers on the cache address;
#   3. checks that the cache answers.
# Containers then use it with SANDBOXD_APT_PROXY=http://198.18.0.1:3142 (the
# provisioning step `apt-source` writes the apt proxy setting). The cache
# fetches from whatever archive the container's own sources name; no archive
# address is written by this script.
#
# Environment overrides (all optional):
#   SANDBOXD_CACHE_ADDR     address:port the cache must answer on
#                           (default 198.18.0.1:3142, the sbx0 bridge)
#   ACNG_LOG_DIR            apt-cacher-ng log dir (default /var/log/apt-cacher-ng)
#   ACNG_PIDFILE            PID file (default /run/sandboxd-test-acng.pid)
set -euo pipefail

CACHE_ADDR=${SANDBOXD_CACHE_ADDR:-198.18.0.1:3142}
ACNG_LOG_DIR=${ACNG_LOG_DIR:-/var/log/apt-cacher-ng}
ACNG_PIDFILE=${ACNG_PIDFILE:-/run/sandboxd-test-acng.pid}

log() { printf '[setup-provision] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root"
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive

install_packages() {
    if command -v apt-cacher-ng >/dev/null 2>&1 && command -v shellcheck >/dev/null 2>&1 &&
        command -v curl >/dev/null 2>&1; then
        log "apt-cacher-ng, shellcheck and curl already installed"
        return
    fi
    apt-get update -q || log "apt-get update reported errors (continuing)"
    # Without systemd, the package's init script may try to start the
    # daemon; that is harmless (it listens on every address, port 3142), the
    # check below accepts whichever instance answers.
    apt-get install -y -q apt-cacher-ng shellcheck curl
}

# The archive the host itself uses (first URIs line of its Debian source
# file): apt-cacher-ng's built-in Debian backend list names mirrors this
# machine cannot reach, so the cache is told to fetch from the host's own
# archive. Read at run time: no address is written into any file.
archive_uri() {
    awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null
}

# True when a Debian index file comes through the cache.
cache_fetches() {
    local uri
    uri=$(archive_uri)
    [ -n "$uri" ] || return 0
    curl -s --max-time 30 -o /dev/null -w '%{http_code}' -x "http://$CACHE_ADDR" \
        "${uri%/}/dists/bookworm/InRelease" 2>/dev/null | grep -q '^200$'
}

cache_answers() {
    # apt-cacher-ng answers its report page on any path it does not proxy.
    curl -s --max-time 5 -o /dev/null -w '%{http_code}' "http://$CACHE_ADDR/acng-report.html" 2>/dev/null |
        grep -q '^[2-4][0-9][0-9]$'
}

start_cache() {
    local old=""
    if [ -f "$ACNG_PIDFILE" ]; then
        old=$(cat "$ACNG_PIDFILE" 2>/dev/null || true)
        if [ -z "$old" ] || ! kill -0 "$old" 2>/dev/null; then
            old=""
        fi
    fi
    if cache_answers; then
        if cache_fetches; then
            log "a package cache already answers on $CACHE_ADDR and fetches from the archive"
            return
        fi
        if [ -z "$old" ]; then
            log "something answers on $CACHE_ADDR but does not fetch Debian index files"
            exit 1
        fi
        log "apt-cacher-ng (pid $old) does not fetch from the archive: restarting it"
        kill "$old"
        local i
        for i in $(seq 1 50); do
            kill -0 "$old" 2>/dev/null || break
            sleep 0.1
        done
    elif [ -n "$old" ]; then
        log "apt-cacher-ng (pid $old) runs but does not answer on $CACHE_ADDR"
        exit 1
    fi
    local remap=()
    local uri
    uri=$(archive_uri)
    if [ -n "$uri" ]; then
        remap=("Remap-debrep=file:deb_mirror*.gz /debian ; ${uri%/}")
    fi
    mkdir -p "$ACNG_LOG_DIR" /var/cache/apt-cacher-ng /run/apt-cacher-ng
    chown apt-cacher-ng:apt-cacher-ng "$ACNG_LOG_DIR" /var/cache/apt-cacher-ng /run/apt-cacher-ng 2>/dev/null || true
    local port=${CACHE_ADDR##*:}
    # Options on the command line override /etc/apt-cacher-ng/acng.conf.
    # Listen on the bridge and on loopback only; foreground + setsid so that
    # the PID file holds the daemon's own PID.
    setsid apt-cacher-ng -c /etc/apt-cacher-ng ForeGround=1 \
        "BindAddress=${CACHE_ADDR%:*} 127.0.0.1" "Port=$port" \
        "LogDir=$ACNG_LOG_DIR" "PidFile=" "${remap[@]}" \
        >>"$ACNG_LOG_DIR/foreground.log" 2>&1 </dev/null &
    echo $! >"$ACNG_PIDFILE"
    log "started apt-cacher-ng (pid $!, logs in $ACNG_LOG_DIR)"
    local i
    for i in $(seq 1 50); do
        if cache_answers; then
            log "cache answers on $CACHE_ADDR after ${i}x0.2 s"
            cache_fetches || { log "the cache does not fetch Debian index files"; exit 1; }
            return
        fi
        sleep 0.2
    done
    log "apt-cacher-ng did not answer on $CACHE_ADDR within 10 s"
    tail -n 20 "$ACNG_LOG_DIR/foreground.log" >&2 || true
    exit 1
}

install_packages
start_cache
log "ready: containers use SANDBOXD_APT_PROXY=http://$CACHE_ADDR"
