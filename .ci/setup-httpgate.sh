#!/usr/bin/env bash
# Installs what the httpgate tests and benchmark need (Debian 12, root, idempotent).
set -euo pipefail
need=()
for pkg in pebble curl openssl python3 python3-websockets wrk caddy nginx-light openssh-client util-linux; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}"
fi
# The tests open about 2,000 sockets in one process.
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 4096 ]; then
  echo "warning: raise the open-file limit (ulimit -n) to 4096 or more for the httpgate tests" >&2
fi
