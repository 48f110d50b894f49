#!/usr/bin/env bash
# Step docker (phase image): Docker Engine, enabled and started; the login
# user (when it exists already) joins the `docker` group.
#
# Variables:
#   SANDBOXD_PACKAGES          distro (default): the distribution's docker.io;
#                              upstream: docker-ce from the Docker project's
#                              apt repository given below.
#   SANDBOXD_DOCKER_APT_URL    upstream only: base URL of that apt repository
#                              (the part before dists/), required.
#   SANDBOXD_DOCKER_APT_KEY_URL upstream only: URL of its signing key
#                              (ASCII-armoured), required.
#   SANDBOXD_USER              login user (default from /etc/os-release).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "$0")/../lib.sh"

mode=$(packages_mode)
if [ "$mode" = upstream ]; then
    url=${SANDBOXD_DOCKER_APT_URL:-}
    key_url=${SANDBOXD_DOCKER_APT_KEY_URL:-}
    [ -n "$url" ] || die "SANDBOXD_PACKAGES=upstream needs SANDBOXD_DOCKER_APT_URL"
    [ -n "$key_url" ] || die "SANDBOXD_PACKAGES=upstream needs SANDBOXD_DOCKER_APT_KEY_URL"
    keyring=/etc/apt/keyrings/sandboxd-docker.asc
    mkdir -p /etc/apt/keyrings
    if [ ! -s "$keyring" ]; then
        fetch "$key_url" "$keyring"
        chmod 0644 "$keyring"
        mark_changed
    fi
    # shellcheck disable=SC1091 # a system file, read for the codename only
    codename=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
    [ -n "$codename" ] || die "no VERSION_CODENAME in /etc/os-release"
    if install_file /etc/apt/sources.list.d/sandboxd-docker.list 0644 <<LIST; then
deb [arch=$(dpkg --print-architecture) signed-by=$keyring] $url $codename stable
LIST
        touch -d '2 hours ago' /var/lib/apt/lists 2>/dev/null || true
    fi
    pkgs=(docker-ce docker-ce-cli containerd.io)
else
    pkgs=(docker.io)
fi
apt_install "${pkgs[@]}"

user=$(login_user)
if getent passwd "$user" >/dev/null && getent group docker >/dev/null &&
    ! id -nG "$user" | tr ' ' '\n' | grep -qx docker; then
    usermod -aG docker "$user"
    mark_changed
fi

state="not started (no systemd)"
if have_systemd; then
    if ! systemctl is-enabled --quiet docker 2>/dev/null; then
        systemctl enable docker >>"$SANDBOXD_LOG" 2>&1 || die "systemctl enable docker failed"
        mark_changed
    fi
    if ! systemctl is-active --quiet docker; then
        # A failure to start is reported, not fatal: Docker inside a
        # container needs security.nesting=true and a kernel that allows
        # overlay mounts there; the health check reports it.
        if systemctl start docker >>"$SANDBOXD_LOG" 2>&1; then
            mark_changed
        fi
    fi
    if systemctl is-active --quiet docker; then
        state="dockerd running"
    else
        state="dockerd NOT running: $(journalctl -u docker -n 1 -o cat --no-pager 2>/dev/null | cut -c1-160)"
    fi
fi
version=$(docker --version 2>/dev/null | sed 's/^Docker version //; s/,.*//')
finish "docker $version ($mode), $state"
