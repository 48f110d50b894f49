#!/usr/bin/env bash
# Step go (phase image): the Go toolchain.
#
# Variables:
#   SANDBOXD_PACKAGES     distro (default): the distribution's package
#                         (SANDBOXD_GO_PACKAGE, default golang-go);
#                         upstream: the official tarball unpacked into
#                         /usr/local/go, with go and gofmt linked into
#                         /usr/local/bin.
#   SANDBOXD_GO_PACKAGE   distro only: package name (default golang-go).
#   SANDBOXD_GO_VERSION   upstream only: version, e.g. 1.23.4 (required).
#   SANDBOXD_GO_URL       upstream only: base URL of the tarballs; the file
#                         fetched is $SANDBOXD_GO_URL/go$VERSION.linux-$ARCH.tar.gz
#                         (required).
#   SANDBOXD_GO_SHA256    upstream only: expected SHA-256 of the tarball
#                         (optional, recommended).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "$0")/../lib.sh"

mode=$(packages_mode)
if [ "$mode" = upstream ]; then
    version=${SANDBOXD_GO_VERSION:-}
    base=${SANDBOXD_GO_URL:-}
    [ -n "$version" ] || die "SANDBOXD_PACKAGES=upstream needs SANDBOXD_GO_VERSION"
    [ -n "$base" ] || die "SANDBOXD_PACKAGES=upstream needs SANDBOXD_GO_URL"
    if [ "$(head -n 1 /usr/local/go/VERSION 2>/dev/null || true)" != "go$version" ]; then
        arch=$(dpkg --print-architecture)
        tmp=$(mktemp -d)
        fetch "${base%/}/go$version.linux-$arch.tar.gz" "$tmp/go.tgz" "${SANDBOXD_GO_SHA256:-}"
        rm -rf /usr/local/go.new
        mkdir -p /usr/local/go.new
        tar -C /usr/local/go.new --strip-components=1 -xzf "$tmp/go.tgz" || die "cannot unpack the Go tarball"
        rm -rf /usr/local/go "$tmp"
        mv /usr/local/go.new /usr/local/go
        mark_changed
    fi
    for bin in go gofmt; do
        if [ "$(readlink "/usr/local/bin/$bin" 2>/dev/null || true)" != "/usr/local/go/bin/$bin" ]; then
            ln -sfn "/usr/local/go/bin/$bin" "/usr/local/bin/$bin"
            mark_changed
        fi
    done
else
    apt_install "${SANDBOXD_GO_PACKAGE:-golang-go}"
fi
PATH=/usr/local/bin:/usr/bin:/bin
go_version=$(go version 2>/dev/null | awk '{print $3}') || true
[ -n "$go_version" ] || die "go is not runnable after installation"
finish "$go_version ($mode)"
