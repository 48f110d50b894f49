#!/usr/bin/env bash
# Seals a provisioned container before `sandboxd image build` publishes it:
# every clone must make its own machine id and SSH host keys at first boot,
# and nothing of the build's caches or logs is carried into the image.
# Runs as root inside the builder, through the Incus exec API.
set -euo pipefail

# Host keys are made again at boot, before sshd starts.
unit=/etc/systemd/system/sandboxd-ssh-hostkeys.service
if [ ! -f "$unit" ]; then
    cat >"$unit" <<'UNIT'
[Unit]
Description=Generate missing SSH host keys
DefaultDependencies=no
After=local-fs.target
Before=network-pre.target ssh.service
Wants=network-pre.target

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=sysinit.target
UNIT
    mkdir -p /etc/systemd/system/sysinit.target.wants
    ln -sf ../sandboxd-ssh-hostkeys.service \
        /etc/systemd/system/sysinit.target.wants/sandboxd-ssh-hostkeys.service
fi
rm -f /etc/ssh/ssh_host_*

# A new machine id at first boot (an empty file, not a missing one, keeps
# systemd from treating the boot as a first boot with presets).
: >/etc/machine-id
rm -f /var/lib/dbus/machine-id

if command -v apt-get >/dev/null 2>&1; then
    apt-get clean
fi
rm -rf /var/lib/apt/lists/* /tmp/* /var/tmp/*
find /var/log -type f -name '*.log' -exec truncate -s 0 {} +
if [ -d /var/log/journal ]; then
    rm -rf /var/log/journal/*
fi
echo "sealed"
