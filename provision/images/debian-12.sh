#!/usr/bin/env bash
# Builds a Debian 12 container image for Incus from the distribution's own
# packages (debootstrap through the host's apt sources), for hosts that
# cannot reach an image server: minbase + openssh-server + systemd, DHCP on
# eth0, host keys made at first boot, hostname from the instance name.
#
# Usage: debian-12.sh OUTDIR
# Writes OUTDIR/meta.tar.gz and OUTDIR/rootfs.tar.gz (a split image, for
# `incus image import meta.tar.gz rootfs.tar.gz`). Runs as root. Nothing is
# left behind on failure; an existing pair of tarballs is kept as is.
set -euo pipefail

log() { printf '[debian-12 image] %s\n' "$*" >&2; }

OUT=${1:?usage: debian-12.sh OUTDIR}
DESCRIPTION=${IMAGE_DESCRIPTION:-Debian 12 minbase with openssh-server}

if [ -f "$OUT/meta.tar.gz" ] && [ -f "$OUT/rootfs.tar.gz" ]; then
    log "image tarballs already in $OUT"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (debootstrap)"
    exit 1
fi
command -v debootstrap >/dev/null 2>&1 || {
    log "debootstrap is missing: apt-get install debootstrap"
    exit 1
}

mkdir -p "$OUT"
work=$(mktemp -d "$OUT/build.XXXXXX")
# shellcheck disable=SC2064 # expand now: the trap must remove this very directory
trap "rm -rf '$work'" EXIT
rootfs="$work/rootfs"
log "debootstrap into $rootfs (about a minute)"
debootstrap --variant=minbase \
    --include=openssh-server,systemd-sysv,ifupdown,isc-dhcp-client,iproute2,ca-certificates \
    bookworm "$rootfs" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    exit 1
}

printf 'auto lo\niface lo inet loopback\nauto eth0\niface eth0 inet dhcp\n' \
    >"$rootfs/etc/network/interfaces"
# Every container gets its own identity: machine-id is made at first boot,
# and sshd host keys are generated before the network comes up (so an
# instance that has an address also has its host keys).
: >"$rootfs/etc/machine-id"
rm -f "$rootfs"/etc/ssh/ssh_host_*
install -m 0644 "$(dirname "$0")/../units/sandboxd-ssh-hostkeys.service" \
    "$rootfs/etc/systemd/system/sandboxd-ssh-hostkeys.service"
mkdir -p "$rootfs/etc/systemd/system/sysinit.target.wants"
ln -sf ../sandboxd-ssh-hostkeys.service \
    "$rootfs/etc/systemd/system/sysinit.target.wants/sandboxd-ssh-hostkeys.service"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

# Image metadata with templates so that /etc/hostname and /etc/hosts carry
# the instance's own name.
meta="$work/meta"
mkdir -p "$meta/templates"
cat >"$meta/metadata.yaml" <<META
architecture: $(uname -m)
creation_date: $(date +%s)
properties:
  description: $DESCRIPTION
  os: debian
  release: bookworm
templates:
  /etc/hostname:
    when: [create, copy, rename]
    template: hostname.tpl
  /etc/hosts:
    when: [create, copy, rename]
    template: hosts.tpl
META
printf '{{ instance.name }}\n' >"$meta/templates/hostname.tpl"
printf '127.0.0.1 localhost\n127.0.1.1 {{ instance.name }}\n::1 localhost ip6-localhost ip6-loopback\n' \
    >"$meta/templates/hosts.tpl"

tar -C "$meta" -czf "$work/meta.tar.gz" metadata.yaml templates
tar -C "$rootfs" --numeric-owner -czf "$work/rootfs.tar.gz" .
# The rootfs lands first and the metadata last, so a pair of files present
# means a complete image.
mv "$work/rootfs.tar.gz" "$OUT/rootfs.tar.gz"
mv "$work/meta.tar.gz" "$OUT/meta.tar.gz"
log "image tarballs written to $OUT"
