#!/usr/bin/env bash
# Seals a provisioned container before `sandboxd image build` publishes it:
# every clone must make its own machine id and SSH host keys at first boot,
# and nothing of the build's caches or logs is carried into the image.
# Runs as root inside the builder, through the Incus exec API.
set -euo pipefail

# Host keys are made again at boot, before sshd starts, by
# sandboxd-ssh-hostkeys.service (provision/units/, pushed by the builder
# before this script runs).
[ -f /etc/systemd/system/sandboxd-ssh-hostkeys.service ] || {
    echo "sandboxd-ssh-hostkeys.service is missing: clones would have no host keys" >&2
    exit 1
}
mkdir -p /etc/systemd/system/sysinit.target.wants
ln -sf ../sandboxd-ssh-hostkeys.service \
    /etc/systemd/system/sysinit.target.wants/sandboxd-ssh-hostkeys.service
rm -f /etc/ssh/ssh_host_*

# A new machine id at first boot (an empty file, not a missing one, keeps
# systemd from treating the boot as a first boot with presets).
: >/etc/machine-id
rm -f /var/lib/dbus/machine-id

if command -v apt-get >/dev/null 2>&1; then
    # Debian's background apt jobs would hold the archive lock (a fresh
    # container runs them soon after boot): stopped for the builder's last
    # minutes; clones run them as usual.
    if command -v systemctl >/dev/null 2>&1; then
        systemctl stop apt-daily.timer apt-daily-upgrade.timer \
            apt-daily.service apt-daily-upgrade.service >/dev/null 2>&1 || true
    fi
    apt-get clean
fi
rm -rf /var/lib/apt/lists/* /tmp/* /var/tmp/*
find /var/log -type f -name '*.log' -exec truncate -s 0 {} +
if [ -d /var/log/journal ]; then
    rm -rf /var/log/journal/*
fi
echo "sealed"
