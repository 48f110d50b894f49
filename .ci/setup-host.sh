#!/usr/bin/env bash
# Test-host setup for the host-side tests (tests/systemd.rs, tests/setup.rs):
#   - systemd, for `systemd-analyze verify` and `systemd-analyze security`
#     (only the tools are used; systemd need not be PID 1);
#   - btrfs-progs, so that `sandboxd setup --storage btrfs` can make a
#     loop-backed btrfs pool through incusd;
#   - shellcheck, for the project's scripts;
#   - passwd/util-linux (useradd, setpriv, setsid), normally already there.
# The tests also need incusd with the sbx0 bridge: .ci/setup-incus.sh.
#
# Idempotent; Debian 12, as root, no systemd needed.
set -euo pipefail

log() { printf '[setup-host] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

need=()
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v mkfs.btrfs >/dev/null 2>&1 || [ -x /usr/sbin/mkfs.btrfs ] || need+=(btrfs-progs)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
command -v useradd >/dev/null 2>&1 || [ -x /usr/sbin/useradd ] || need+=(passwd)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)

if [ "${#need[@]}" -eq 0 ]; then
    log "systemd-analyze, mkfs.btrfs, shellcheck, useradd and setpriv already installed"
else
    log "installing ${need[*]}"
    apt-get update -q || log "apt-get update reported errors (continuing)"
    apt-get install -y -q --no-install-recommends "${need[@]}"
fi
log "ready"
