#!/usr/bin/env bash
# Step llm-env (phase sandbox): login shells of the user read the LLM
# environment file.
#
# The file itself, ~USER/.config/sandboxd/llm.env (KEY='value' lines: the
# provider's API key and optional base URL), is written by sandboxd through
# the Incus files API (mode 0600, owned by the user) before this step runs;
# no secret ever passes through this script. This step writes
# /etc/profile.d/sandboxd-llm.sh, which exports the file's variables in
# login shells, and repairs the file's owner and mode if they drifted.
#
# Variables:
#   SANDBOXD_USER  login user (default from /etc/os-release).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "$0")/../lib.sh"

user=$(login_user)
getent passwd "$user" >/dev/null || die "user $user does not exist (run the user step first)"
install_file /etc/profile.d/sandboxd-llm.sh 0644 <<'SNIPPET' || true
# Written by sandboxd provisioning (step llm-env): the LLM provider's key and
# base URL for login shells, from a file only its owner can read.
if [ -n "${HOME:-}" ] && [ -r "$HOME/.config/sandboxd/llm.env" ]; then
    set -a
    . "$HOME/.config/sandboxd/llm.env"
    set +a
fi
SNIPPET

env_file=$(llm_env_path "$user")
if [ ! -f "$env_file" ]; then
    finish "login shells read $env_file (not present)"
fi
group=$(id -gn "$user")
if [ "$(stat -c '%U:%G %a' "$env_file")" != "$user:$group 600" ]; then
    chown "$user:$group" "$env_file"
    chmod 0600 "$env_file"
    mark_changed
fi
finish "login shells read $env_file"
