#!/usr/bin/env bash
# Shared helpers of the provisioning steps (sourced, never run).
#
# Contract of every step (see README.md): run as root inside the container,
# parameters only from SANDBOXD_* environment variables (never secrets),
# idempotent; the last stdout line is `sandboxd-step: changed DETAIL` or
# `sandboxd-step: unchanged DETAIL` and the exit code 0, or a non-zero exit
# with a one-line reason as the last stderr line.
#
# Noisy tool output (apt, go) goes to $SANDBOXD_LOG
# (/var/log/sandboxd/provision.log), never to the step's stdout.

SANDBOXD_LOG=${SANDBOXD_LOG:-/var/log/sandboxd/provision.log}
# State kept between runs (stamps of what was installed), root only.
SANDBOXD_STATE=${SANDBOXD_STATE:-/var/lib/sandboxd/state}
# Where the runner pushes the scripts, the agent install script and the hook.
SANDBOXD_DIR=${SANDBOXD_DIR:-/var/lib/sandboxd/provision}

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C.UTF-8
umask 022

_changed=0

# Records that this step changed something.
mark_changed() { _changed=1; }

# Prints the step's result line and exits 0.
finish() {
    if [ "$_changed" -eq 1 ]; then
        printf 'sandboxd-step: changed %s\n' "$*"
    else
        printf 'sandboxd-step: unchanged %s\n' "$*"
    fi
    exit 0
}

# Fails the step with a one-line reason.
die() {
    printf '%s\n' "$*" | tr '\n' ' ' | sed 's/ $//' >&2
    printf '\n' >&2
    exit 1
}

init_dirs() {
    mkdir -p "$(dirname "$SANDBOXD_LOG")" "$SANDBOXD_STATE"
    chmod 0700 "$SANDBOXD_STATE"
}
init_dirs

# Runs a command with its output appended to the log; returns its status.
logged() {
    printf '\n[%s] $ %s\n' "$(date -u +%FT%TZ)" "$*" >>"$SANDBOXD_LOG"
    "$@" >>"$SANDBOXD_LOG" 2>&1 </dev/null
}

# The last line of the log, for failure reasons.
log_tail() { tail -n 1 "$SANDBOXD_LOG" 2>/dev/null | cut -c1-200; }

# install_file PATH MODE < CONTENT: writes PATH when its content or mode
# differ; marks the step changed and returns 0 when it wrote, 1 otherwise.
install_file() {
    local path=$1 mode=$2 tmp
    tmp=$(mktemp "${path}.sandboxd.XXXXXX") || die "cannot write $path"
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [ -f "$path" ] && cmp -s "$tmp" "$path" &&
        [ "$(stat -c %a "$path")" = "$(stat -c %a "$tmp")" ]; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$path"
    mark_changed
    return 0
}

# remove_file PATH: removes PATH if present (marks changed).
remove_file() {
    if [ -e "$1" ]; then
        rm -f "$1"
        mark_changed
    fi
}

# The distribution id from /etc/os-release (debian, ubuntu, ...).
os_id() {
    local id=""
    if [ -r /etc/os-release ]; then
        # shellcheck disable=SC1091 # a system file, read for ID only
        id=$(. /etc/os-release && printf '%s' "${ID:-}")
    fi
    printf '%s' "$id"
}

# The login user: SANDBOXD_USER or the distribution's usual name.
login_user() {
    if [ -n "${SANDBOXD_USER:-}" ]; then
        printf '%s' "$SANDBOXD_USER"
        return
    fi
    case "$(os_id)" in
    ubuntu) printf 'ubuntu' ;;
    debian) printf 'debian' ;;
    *) die "SANDBOXD_USER is not set and the distribution '$(os_id)' has no default login user" ;;
    esac
}

# The home directory of user $1 (empty when the user does not exist).
user_home() { getent passwd "$1" | cut -d: -f6; }

# The fixed path of the LLM environment file of user $1.
llm_env_path() { printf '%s/.config/sandboxd/llm.env' "$(user_home "$1")"; }

packages_mode() {
    case "${SANDBOXD_PACKAGES:-distro}" in
    distro | upstream) printf '%s' "${SANDBOXD_PACKAGES:-distro}" ;;
    *) die "SANDBOXD_PACKAGES must be distro or upstream, not '${SANDBOXD_PACKAGES}'" ;;
    esac
}

# True when every package given is installed.
pkgs_installed() {
    local p status
    for p in "$@"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        [ "$status" = installed ] || return 1
    done
    return 0
}

# Stops Debian's background apt jobs (apt-daily, apt-daily-upgrade) if one
# is running: a fresh container runs them soon after boot, and their locks
# would fail this script's apt-get. Their timers stay as they are.
quiet_apt_daily() {
    if command -v systemctl >/dev/null 2>&1; then
        systemctl stop apt-daily.service apt-daily-upgrade.service >/dev/null 2>&1 || true
    fi
}

# apt_install PKG...: installs the missing packages (marks changed). Refreshes
# the package lists first when they are missing or older than an hour, and
# once more on failure.
apt_install() {
    pkgs_installed "$@" && return 0
    quiet_apt_daily
    local lists=/var/lib/apt/lists
    if ! compgen -G "$lists/*_Packages*" >/dev/null ||
        [ -n "$(find "$lists" -maxdepth 0 -mmin +60 2>/dev/null)" ]; then
        logged apt-get update -q || die "apt-get update failed: $(log_tail)"
        touch "$lists"
    fi
    if ! logged apt-get install -y -q --no-install-recommends "$@"; then
        logged apt-get update -q || die "apt-get update failed: $(log_tail)"
        touch "$lists"
        logged apt-get install -y -q --no-install-recommends "$@" ||
            die "apt-get install $* failed: $(log_tail)"
    fi
    mark_changed
}

# True when systemd runs as PID 1 (it does in the sandboxes).
have_systemd() { [ -d /run/systemd/system ]; }

# stamp_get NAME / stamp_set NAME VALUE: small state records.
stamp_get() { cat "$SANDBOXD_STATE/$1" 2>/dev/null || true; }
stamp_set() { printf '%s\n' "$2" >"$SANDBOXD_STATE/$1"; }

# Downloads URL to FILE (curl), checking SHA256 when given.
fetch() {
    local url=$1 out=$2 sum=${3:-}
    apt_install curl ca-certificates
    logged curl -fsSL --retry 3 -o "$out" "$url" || die "download of $url failed: $(log_tail)"
    if [ -n "$sum" ]; then
        printf '%s  %s\n' "$sum" "$out" | sha256sum -c --status ||
            die "checksum mismatch for $url"
    fi
}
