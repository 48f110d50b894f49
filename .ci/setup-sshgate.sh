#!/usr/bin/env bash
# Installs what the sshgate tests and bench/ssh.sh need on a fresh Debian 12
# machine (root, no systemd). Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=(openssh-client openssh-server rsync curl python3-minimal hyperfine jq bc iproute2 procps ssh-audit
  putty-tools dropbear-bin python3-paramiko python3-asyncssh)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
fi
# sshd refuses to start without its privilege-separation directory.
mkdir -p /run/sshd
chmod 0755 /run/sshd
# The tests run sshd from temp dirs; it must not be started as a service.
command -v python3 >/dev/null
