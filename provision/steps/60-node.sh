#!/usr/bin/env bash
# Step node (phase image): Node.js and npm.
#
# Variables:
#   SANDBOXD_PACKAGES      distro (default): the distribution's nodejs and
#                          npm; upstream: the official binary tarball
#                          unpacked into /usr/local/lib/nodejs, with node,
#                          npm and npx linked into /usr/local/bin.
#   SANDBOXD_NODE_VERSION  upstream only: version, e.g. 22.11.0 (required).
#   SANDBOXD_NODE_URL      upstream only: base URL of the releases; the file
#                          fetched is
#                          $SANDBOXD_NODE_URL/v$VERSION/node-v$VERSION-linux-$ARCH.tar.xz
#                          (required).
#   SANDBOXD_NODE_SHA256   upstream only: expected SHA-256 (optional).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "$0")/../lib.sh"

mode=$(packages_mode)
if [ "$mode" = upstream ]; then
    version=${SANDBOXD_NODE_VERSION:-}
    base=${SANDBOXD_NODE_URL:-}
    [ -n "$version" ] || die "SANDBOXD_PACKAGES=upstream needs SANDBOXD_NODE_VERSION"
    [ -n "$base" ] || die "SANDBOXD_PACKAGES=upstream needs SANDBOXD_NODE_URL"
    dir=/usr/local/lib/nodejs
    if [ "$("$dir/bin/node" --version 2>/dev/null || true)" != "v$version" ]; then
        case "$(dpkg --print-architecture)" in
        amd64) arch=x64 ;;
        arm64) arch=arm64 ;;
        *) die "no upstream Node.js build known for $(dpkg --print-architecture)" ;;
        esac
        tmp=$(mktemp -d)
        fetch "${base%/}/v$version/node-v$version-linux-$arch.tar.xz" "$tmp/node.txz" "${SANDBOXD_NODE_SHA256:-}"
        rm -rf "$dir.new"
        mkdir -p "$dir.new"
        tar -C "$dir.new" --strip-components=1 -xJf "$tmp/node.txz" || die "cannot unpack the Node.js tarball"
        rm -rf "$dir" "$tmp"
        mv "$dir.new" "$dir"
        mark_changed
    fi
    for bin in node npm npx; do
        if [ "$(readlink "/usr/local/bin/$bin" 2>/dev/null || true)" != "$dir/bin/$bin" ]; then
            ln -sfn "$dir/bin/$bin" "/usr/local/bin/$bin"
            mark_changed
        fi
    done
else
    apt_install nodejs npm
fi
PATH=/usr/local/bin:/usr/bin:/bin
node_version=$(node --version 2>/dev/null) || die "node is not runnable after installation"
npm_version=$(npm --version 2>/dev/null) || die "npm is not runnable after installation"
finish "node $node_version, npm $npm_version ($mode)"
