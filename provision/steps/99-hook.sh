#!/usr/bin/env bash
# Step hook (phase sandbox, last): the user's own hook script, run as root.
#
# sandboxd pushes the hook's bytes to $SANDBOXD_HOOK (0700). It runs when its
# content differs from the last one that succeeded (a digest is kept), so a
# re-run changes nothing. Its whole output is appended to $SANDBOXD_LOG; its
# last 100 lines (at most 64 KiB) are printed before the result line, which
# carries its last output line (sandboxd caps what it reads of a step).
#
# Variables:
#   SANDBOXD_HOOK  path of the pushed hook (unset: no hook).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "$0")/../lib.sh"

hook=${SANDBOXD_HOOK:-}
if [ -z "$hook" ]; then
    finish "no hook"
fi
[ -f "$hook" ] || die "hook $hook is missing"
sum=$(sha256sum "$hook" | cut -d' ' -f1)
if [ "$(stamp_get hook)" = "$sum" ]; then
    finish "hook ${sum:0:12} already ran"
fi
chmod 0700 "$hook"
out=$(mktemp)
status=0
if [ "$(head -c 2 "$hook")" = '#!' ]; then
    "$hook" >"$out" 2>&1 </dev/null || status=$?
else
    bash "$hook" >"$out" 2>&1 </dev/null || status=$?
fi
last=$(grep -v '^[[:space:]]*$' "$out" | tail -n 1 | cut -c1-200 || true)
{
    printf '\n[%s] hook output\n' "$(date -u +%FT%TZ)"
    cat "$out"
} >>"$SANDBOXD_LOG"
tail -n 100 "$out" | tail -c 65536
rm -f "$out"
if [ "$status" -ne 0 ]; then
    die "hook exited with status $status: ${last:-no output}"
fi
stamp_set hook "$sum"
mark_changed
finish "hook ran: ${last:-no output}"
