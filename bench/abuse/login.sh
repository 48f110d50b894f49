#!/usr/bin/env bash
# Online guessing benchmark, loopback only, bounded in time: the real
# sandboxd daemon (release build, temporary state directory, internal-CA
# certificates, one sandbox whose agent host has a login) in front of an
# nginx upstream. A correct login's latency from 127.0.0.2 (p50/p99, on one
# keep-alive connection and with a new TLS connection per request, measured
# by bench/abuse/login_probe.py) unloaded, then while 127.0.0.1 sends wrong
# passwords (a new one per request) at CONNS concurrent connections with wrk.
# Prints a table with the ratios under attack / unloaded (target p99 <= 1.5x)
# and what the attacker got (requests/s, 401 and 429 answers).
#
# The routed name resolves for wrk only inside a private mount namespace
# whose /etc/hosts maps it to 127.0.0.1 (unshare -m, run as root); the
# machine's own /etc/hosts is untouched.
#
# Usage: bench/abuse/login.sh   (DUR=10 s of attack per round, ROUNDS=2,
#                                CONNS=256, N=10000 keep-alive and NEW=500
#                                new-connection logins per measure;
#                                about two minutes with the defaults)
# Needs: wrk nginx python3 curl ssh-keygen unshare, root
# (.ci/setup-httpgate.sh installs the packages).
set -euo pipefail

DUR=${DUR:-10}
ROUNDS=${ROUNDS:-2}
CONNS=${CONNS:-256}
N=${N:-10000}
NEW=${NEW:-500}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
bench_workdir login-bench
chmod 755 "$WORK"

read -r APP AGENT GW < <(free_ports 3)
DOMAIN=login.test
HOST=shelley.$DOMAIN
PROBE="$ROOT/bench/abuse/login_probe.py"

# bench/abuse.sh builds once and passes the binary in SBX.
SBX=${SBX:-$(release_sandboxd "$ROOT")}

ns_hosts "$DOMAIN" "$HOST"

nginx_static "$WORK/upstream.conf" "$APP" "$AGENT"
printf 'hello\n' > "$WORK/www/index.html"
nginx -c "$WORK/upstream.conf" -p "$WORK" & PIDS+=($!)

SOCK="$WORK/sbx/admin.sock"
sbx_serve "$SBX" "$WORK/sbx" "$GW" "$WORK/sandboxd.log"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/sbx/key" >/dev/null
PASSWORD=$(head -c 18 /dev/urandom | base64)
printf '%s\n' "$PASSWORD" > "$WORK/sbx/pw"
"$SBX" --admin-socket "$SOCK" add bench --domain "$DOMAIN" --upstream 127.0.0.1 \
  --app-port "$APP" --agent-port "$AGENT" --ssh-key "$WORK/sbx/key.pub" \
  --auth-user owner --auth-password-file "$WORK/sbx/pw" >/dev/null
"$SBX" --admin-socket "$SOCK" ca-cert > "$WORK/ca.pem"
for _ in $(seq 1 100); do
  curl -fsS --max-time 2 --cacert "$WORK/ca.pem" --resolve "$HOST:$GW:127.0.0.1" \
    -u "owner:$PASSWORD" -o /dev/null "https://$HOST:$GW/" 2>/dev/null && break
  sleep 0.1
done

# wrk: every request a new wrong password (so none is answered from the cache).
cat > "$WORK/guess.lua" <<'EOF'
local b = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
local function b64(s)
  return ((s:gsub('.', function(x)
    local r, c = '', x:byte()
    for i = 8, 1, -1 do r = r .. (c % 2 ^ i - c % 2 ^ (i - 1) > 0 and '1' or '0') end
    return r
  end) .. '0000'):gsub('%d%d%d?%d?%d?%d?', function(x)
    if #x < 6 then return '' end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == '1' and 2 ^ (6 - i) or 0) end
    return b:sub(c + 1, c + 1)
  end) .. ({ '', '==', '=' })[#s % 3 + 1])
end
local n = 0
local prefix = "x"
init = function(args) prefix = args[1] or prefix end
request = function()
  n = n + 1
  local h = { ["Authorization"] = "Basic " .. b64("owner:wrong-" .. prefix .. "-" .. n) }
  return wrk.format("GET", "/", h)
end
EOF

probe() { # mode count -> "p50 p99 n"
  python3 "$PROBE" 127.0.0.2 "$GW" "$HOST" "$WORK/ca.pem" "owner:$PASSWORD" "$2" "$1"
}
count_status() { grep -c "host=$HOST .* status=$1 " "$WORK/sandboxd.log" || true; }

declare -a ROWS
for round in $(seq 1 "$ROUNDS"); do
  for mode in keepalive new; do
    n=$N; [ "$mode" = new ] && n=$NEW
    read -r p50 p99 _ < <(probe "$mode" "$n")
    ROWS+=("$round unloaded $mode $p50 $p99 - - -")
    before401=$(count_status 401); before429=$(count_status 429)
    in_ns wrk -t1 -c"$CONNS" -d"${DUR}s" --timeout 5s -s "$WORK/guess.lua" \
      "https://$HOST:$GW/" -- "$round-$mode-$RANDOM" > "$WORK/wrk.out" 2>&1 & WRK=$!
    PIDS+=("$WRK")
    sleep 1
    read -r ap50 ap99 _ < <(probe "$mode" "$n")
    wait "$WRK" || true
    rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' "$WORK/wrk.out")
    sleep 0.5
    a401=$(( $(count_status 401) - before401 )); a429=$(( $(count_status 429) - before429 ))
    ROWS+=("$round attack $mode $ap50 $ap99 $rps $a401 $a429")
  done
done

printf '\n%-6s %-9s %-10s %9s %9s %12s %8s %8s\n' round load mode p50_ms p99_ms attacker_rps 401s 429s
for r in "${ROWS[@]}"; do
  # shellcheck disable=SC2086 # split the row into fields
  printf '%-6s %-9s %-10s %9s %9s %12s %8s %8s\n' $r
done
echo
echo "p99 under attack / unloaded (same round and mode; target <= 1.5):"
printf '%s\n' "${ROWS[@]}" | awk '
  $2 == "unloaded" { u[$1 " " $3] = $5 }
  $2 == "attack"   { k = $1 " " $3; printf "  round %s %-9s p99 %.3f / %.3f = %.2fx\n", $1, $3, $5, u[k], $5 / u[k] }'
