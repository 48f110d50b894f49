#!/usr/bin/env bash
# Packages every test run needs: the real OpenSSH client and server, curl.
set -euo pipefail
need=()
for pkg in openssh-client openssh-server curl; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
mkdir -p /run/sshd
