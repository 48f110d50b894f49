#!/usr/bin/env bash
# Installs the headless browser the httpgate browser tests drive (Debian 12,
# root, idempotent): Debian's chromium, started by the tests with
# --headless and driven over the DevTools protocol (python3-websockets).
set -euo pipefail
need=()
for pkg in chromium python3 python3-websockets; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
