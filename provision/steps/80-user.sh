#!/usr/bin/env bash
# Step user (phase sandbox): the login user with passwordless sudo.
#
# Creates the user (home, bash, password locked) when missing, installs sudo
# when missing, writes /etc/sudoers.d/90-sandboxd-USER (checked with
# `visudo -cf` before it is put in place), adds the user to the docker group
# when it exists, and creates ~/.config/sandboxd (0700), the directory of the
# LLM environment file.
#
# Variables:
#   SANDBOXD_USER  login user (default: ubuntu on Ubuntu, debian on Debian,
#                  from /etc/os-release).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "$0")/../lib.sh"

user=$(login_user)
if ! [[ "$user" =~ ^[a-z_][a-z0-9_-]{0,31}$ ]]; then
    die "invalid user name '$user'"
fi
[ "$user" != root ] || die "the login user cannot be root"

if ! getent passwd "$user" >/dev/null; then
    useradd -m -s /bin/bash -U "$user" || die "useradd $user failed"
    mark_changed
fi
apt_install sudo

sudoers=/etc/sudoers.d/90-sandboxd-$user
tmp=$(mktemp /etc/sudoers.d/.sandboxd.XXXXXX)
printf '# Written by sandboxd provisioning (step user).\n%s ALL=(ALL:ALL) NOPASSWD:ALL\n' "$user" >"$tmp"
chmod 0440 "$tmp"
if [ -f "$sudoers" ] && cmp -s "$tmp" "$sudoers" && [ "$(stat -c %a "$sudoers")" = 440 ]; then
    rm -f "$tmp"
else
    if ! err=$(visudo -cf "$tmp" 2>&1); then
        rm -f "$tmp"
        die "visudo rejected the sudoers file: $err"
    fi
    mv -f "$tmp" "$sudoers"
    mark_changed
fi

if getent group docker >/dev/null && ! id -nG "$user" | tr ' ' '\n' | grep -qx docker; then
    usermod -aG docker "$user"
    mark_changed
fi

home=$(user_home "$user")
group=$(id -gn "$user")
for d in "$home/.config" "$home/.config/sandboxd"; do
    if [ ! -d "$d" ]; then
        mkdir -p "$d"
        chown "$user:$group" "$d"
        mark_changed
    fi
done
if [ "$(stat -c %a "$home/.config/sandboxd")" != 700 ]; then
    chmod 0700 "$home/.config/sandboxd"
    mark_changed
fi
finish "$user with passwordless sudo"
