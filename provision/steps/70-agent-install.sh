#!/usr/bin/env bash
# Step agent-install (phase image): installs the coding agent's program.
#
# Variables:
#   SANDBOXD_AGENT            shelley (default), command or none.
#   SANDBOXD_AGENT_FORCE      1: rebuild/reinstall even when the recorded
#                             version matches (sandboxd update-agent).
#   shelley: built from source with `go install`:
#   SANDBOXD_SHELLEY_PACKAGE  Go package to install
#                             (default shelley.exe.dev/cmd/shelley).
#   SANDBOXD_SHELLEY_VERSION  module version or `latest` (default latest).
#   SANDBOXD_GOPROXY          GOPROXY for the build (optional; Go's default
#                             otherwise). The binary lands in
#                             /usr/local/bin/shelley.
#   command: the user's own agent:
#   SANDBOXD_AGENT_INSTALL    path of an install script pushed by sandboxd
#                             (optional), run as root; it runs again only
#                             when its content changes (or with FORCE).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "$0")/../lib.sh"

kind=${SANDBOXD_AGENT:-shelley}
force=${SANDBOXD_AGENT_FORCE:-0}
case "$kind" in
none)
    finish "no agent"
    ;;
shelley)
    pkg=${SANDBOXD_SHELLEY_PACKAGE:-shelley.exe.dev/cmd/shelley}
    version=${SANDBOXD_SHELLEY_VERSION:-latest}
    want="$pkg@$version"
    if [ "$force" != 1 ] && [ -x /usr/local/bin/shelley ] && [ "$(stamp_get agent-install)" = "$want" ]; then
        finish "shelley $want already installed"
    fi
    PATH=/usr/local/go/bin:/usr/local/bin:/usr/bin:/bin
    command -v go >/dev/null 2>&1 || die "go is not installed (run the go step first)"
    build=/var/cache/sandboxd/go
    mkdir -p "$build"
    gp=()
    [ -n "${SANDBOXD_GOPROXY:-}" ] && gp=("GOPROXY=$SANDBOXD_GOPROXY")
    logged env GOBIN=/usr/local/bin GOPATH="$build" GOCACHE="$build/cache" \
        GOFLAGS=-modcacherw GOTOOLCHAIN=auto "${gp[@]}" go install "$want" ||
        die "go install $want failed: $(log_tail)"
    [ -x /usr/local/bin/shelley ] || die "go install $want made no /usr/local/bin/shelley"
    stamp_set agent-install "$want"
    mark_changed
    finish "shelley $want built"
    ;;
command)
    script=${SANDBOXD_AGENT_INSTALL:-}
    if [ -z "$script" ]; then
        finish "user agent, no install script"
    fi
    [ -f "$script" ] || die "agent install script $script is missing"
    sum=$(sha256sum "$script" | cut -d' ' -f1)
    if [ "$force" != 1 ] && [ "$(stamp_get agent-install)" = "script $sum" ]; then
        finish "user agent install script ${sum:0:12} already ran"
    fi
    out=$(mktemp)
    if ! bash "$script" >"$out" 2>&1 </dev/null; then
        cat "$out" >>"$SANDBOXD_LOG"
        die "agent install script failed: $(grep -v '^[[:space:]]*$' "$out" | tail -n 1 | cut -c1-200)"
    fi
    cat "$out" >>"$SANDBOXD_LOG"
    rm -f "$out"
    stamp_set agent-install "script $sum"
    mark_changed
    finish "user agent install script ${sum:0:12} ran"
    ;;
*)
    die "SANDBOXD_AGENT must be shelley, command or none, not '$kind'"
    ;;
esac
