#!/usr/bin/env bash
# Step apt-source (phases image and sandbox): where packages come from.
#
# Variables:
#   SANDBOXD_APT_PROXY  optional HTTP proxy or package cache for apt, e.g.
#                       http://198.18.0.1:3142 (apt-cacher-ng on the host).
#                       Written to /etc/apt/apt.conf.d/01sandboxd-proxy; when
#                       unset, that file is removed.
#   SANDBOXD_PACKAGES   distro (default: the distribution's own packages) or
#                       upstream (the projects' own repositories/tarballs,
#                       configured by the docker, go and node steps).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "$0")/../lib.sh"

mode=$(packages_mode)
conf=/etc/apt/apt.conf.d/01sandboxd-proxy
proxy=${SANDBOXD_APT_PROXY:-}
if [ -n "$proxy" ]; then
    case "$proxy" in
    http://* | https://*) ;;
    *) die "SANDBOXD_APT_PROXY must be an http:// or https:// URL" ;;
    esac
    case "$proxy" in
    *'"'* | *' '* | *';'*) die "SANDBOXD_APT_PROXY contains a quote, space or semicolon" ;;
    esac
    if install_file "$conf" 0644 <<CONF; then
// Written by sandboxd provisioning (step apt-source).
Acquire::http::Proxy "$proxy";
CONF
        # New proxy: the lists must be fetched again through it.
        touch -d '2 hours ago' /var/lib/apt/lists 2>/dev/null || true
    fi
    finish "packages $mode, apt proxy $proxy"
fi
remove_file "$conf"
finish "packages $mode, no apt proxy"
