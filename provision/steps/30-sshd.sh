#!/usr/bin/env bash
# Step sshd (phase image): a hardened sshd drop-in,
# /etc/ssh/sshd_config.d/10-sandboxd.conf: no root login, no passwords, no
# keyboard-interactive, public keys only. The configuration is checked with
# `sshd -t` before sshd is reloaded, and sshd is reloaded only when the file
# changed. The users' authorized_keys files are not touched (the gateway's
# key is installed by sandboxd itself).
#
# Variables: none.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "$0")/../lib.sh"

command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || apt_install openssh-server
dropin=/etc/ssh/sshd_config.d/10-sandboxd.conf
main=/etc/ssh/sshd_config
mkdir -p /etc/ssh/sshd_config.d
# sshd keeps the first value it reads: the drop-ins must be included before
# any other setting of the main file (Debian and Ubuntu do so).
if ! grep -qiE '^[[:space:]]*Include[[:space:]]+/etc/ssh/sshd_config\.d/\*\.conf' "$main"; then
    die "$main does not include /etc/ssh/sshd_config.d/*.conf"
fi

backup=""
if [ -f "$dropin" ]; then
    backup=$(mktemp)
    cp -p "$dropin" "$backup"
fi
if install_file "$dropin" 0644 <<'CONF'; then
# Written by sandboxd provisioning (step sshd). Public keys only.
PermitRootLogin no
PasswordAuthentication no
PermitEmptyPasswords no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthenticationMethods publickey
CONF
    mkdir -p /run/sshd
    if ! err=$(/usr/sbin/sshd -t 2>&1); then
        if [ -n "$backup" ]; then mv -f "$backup" "$dropin"; else rm -f "$dropin"; fi
        die "sshd -t rejected the configuration: ${err}"
    fi
    if have_systemd && systemctl is-active --quiet ssh 2>/dev/null; then
        systemctl reload ssh || die "systemctl reload ssh failed"
    fi
fi
[ -n "$backup" ] && rm -f "$backup"
finish "root login, passwords and keyboard-interactive off"
