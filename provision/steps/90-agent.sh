#!/usr/bin/env bash
# Step agent (phase sandbox): the systemd unit that runs the coding agent,
# /etc/systemd/system/sandboxd-agent.service, for the login user: enabled
# (it comes back after a container restart), Restart=always, reading the LLM
# environment file, listening on the agent port. The unit is rewritten and
# the agent restarted only when the unit or the environment file changed;
# the step then waits until the port answers.
#
# Variables:
#   SANDBOXD_AGENT          shelley (default), command or none (the unit is
#                           removed).
#   SANDBOXD_AGENT_COMMAND  command only: the ExecStart command line; it may
#                           use ${SANDBOXD_AGENT_PORT}.
#   SANDBOXD_AGENT_PORT     TCP port of the agent (default 9999).
#   SANDBOXD_AGENT_WAIT     seconds to wait for the port (default 60).
#   SANDBOXD_AGENT_RESTART  1: restart the agent even when nothing changed.
#   SANDBOXD_USER           login user (default from /etc/os-release).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "$0")/../lib.sh"

unit=/etc/systemd/system/sandboxd-agent.service
name=sandboxd-agent.service
kind=${SANDBOXD_AGENT:-shelley}
port=${SANDBOXD_AGENT_PORT:-9999}
wait_secs=${SANDBOXD_AGENT_WAIT:-60}
have_systemd || die "systemd is not running in this container"

if [ "$kind" = none ]; then
    if [ -f "$unit" ]; then
        systemctl disable --now "$name" >>"$SANDBOXD_LOG" 2>&1 || true
        rm -f "$unit"
        systemctl daemon-reload
        mark_changed
    fi
    finish "no agent"
fi

if ! [[ "$port" =~ ^[0-9]{1,5}$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
    die "SANDBOXD_AGENT_PORT must be a TCP port, not '$port'"
fi
[[ "$wait_secs" =~ ^[0-9]+$ ]] || die "SANDBOXD_AGENT_WAIT must be a number of seconds"
case "$kind" in
shelley)
    # shellcheck disable=SC2016 # expanded by systemd, not here
    command='/usr/local/bin/shelley serve -port ${SANDBOXD_AGENT_PORT}'
    [ -x /usr/local/bin/shelley ] || die "shelley is not installed (run the agent-install step)"
    ;;
command)
    command=${SANDBOXD_AGENT_COMMAND:-}
    [ -n "$command" ] || die "SANDBOXD_AGENT=command needs SANDBOXD_AGENT_COMMAND"
    ;;
*) die "SANDBOXD_AGENT must be shelley, command or none, not '$kind'" ;;
esac
case "$command" in
*$'\n'* | *$'\r'*) die "SANDBOXD_AGENT_COMMAND must be one line" ;;
esac

user=$(login_user)
getent passwd "$user" >/dev/null || die "user $user does not exist (run the user step first)"
home=$(user_home "$user")
env_file=$(llm_env_path "$user")

install_file "$unit" 0644 <<UNIT && unit_changed=1 || unit_changed=0
# Written by sandboxd provisioning (step agent).
[Unit]
Description=sandboxd coding agent ($kind)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=$user
WorkingDirectory=$home
Environment=SANDBOXD_AGENT_PORT=$port
EnvironmentFile=-$env_file
ExecStart=$command
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
UNIT

# The agent reads the environment file at start: a new key means a restart.
# Only a digest is kept, in a root-only directory.
env_sum=none
[ -f "$env_file" ] && env_sum=$(sha256sum "$env_file" | cut -d' ' -f1)
env_changed=0
if [ "$(stamp_get agent-env)" != "$env_sum" ]; then
    env_changed=1
fi

if [ "$unit_changed" = 1 ]; then
    systemctl daemon-reload || die "systemctl daemon-reload failed"
fi
if ! systemctl is-enabled --quiet "$name" 2>/dev/null; then
    systemctl enable "$name" >>"$SANDBOXD_LOG" 2>&1 || die "systemctl enable $name failed"
    mark_changed
fi
if ! systemctl is-active --quiet "$name"; then
    systemctl start "$name" || die "systemctl start $name failed"
    mark_changed
elif [ "$unit_changed" = 1 ] || [ "$env_changed" = 1 ] || [ "${SANDBOXD_AGENT_RESTART:-0}" = 1 ]; then
    systemctl restart "$name" || die "systemctl restart $name failed"
    mark_changed
fi
stamp_set agent-env "$env_sum"

# Ready when the port accepts a connection (bash's /dev/tcp, no extra tool).
deadline=$((SECONDS + wait_secs))
until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        state=$(systemctl is-active "$name" 2>/dev/null || true)
        die "$name is $state but port $port does not answer after ${wait_secs}s"
    fi
    sleep 0.2
done
finish "$kind agent as $user on port $port"
