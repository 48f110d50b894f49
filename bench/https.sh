#!/usr/bin/env bash
# HTTPS reverse-proxy benchmark, loopback only, bounded in time: the real
# sandboxd daemon (release build, temporary state directory, internal-CA
# certificates, one route added with `sandboxd add`) vs Caddy vs nginx, side
# by side in one run, in front of the same upstream (an nginx serving static
# files). wrk over TLS with keep-alive and with a new connection per request
# ('Connection: close'), small and 100 KiB responses, in interleaved rounds.
# Prints req/s, p50/p99 latency, peak memory, load average, and sandboxd's
# ratios to Caddy and nginx.
#
# The routed name (bench.test) resolves only inside a private mount
# namespace whose /etc/hosts maps it to 127.0.0.1 (unshare -m, run as root);
# the machine's own /etc/hosts is untouched.
#
# Usage: bench/https.sh   (DUR=5 s per run, ROUNDS=3, CONNS=50, THREADS=2 by default;
#                          about 4 minutes with the defaults)
#   SCENARIOS="keepalive small,close big" runs a subset;
#   PERF_OUT=/tmp/p records a perf profile of sandboxd in round 1 (/tmp/p.MODE-SIZE);
#   PEER_LOGS=off runs nginx and Caddy without their access logs (the default,
#   on, has each of the three write one line per request to a file, batched
#   where the server can batch: nginx buffer=32k, sandboxd per thread);
#   SBX_BASE=path/to/older/sandboxd adds that build as a fourth server,
#   "base", in the same interleaved rounds (before/after a change, side by
#   side), with the ratios sandboxd/base in a table of their own.
# Needs: wrk caddy nginx openssl curl python3 ssh-keygen unshare, root
# (.ci/setup-httpgate.sh installs the packages).
set -euo pipefail

DUR=${DUR:-5}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-50}
THREADS=${THREADS:-2}
PEER_LOGS=${PEER_LOGS:-on}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
bench_workdir https-bench
chmod 755 "$WORK"   # nginx workers (www-data) read the static files

read -r UP GW CADDY NGINX BASE < <(free_ports 5)
HOST=bench.test

# SBX=path/to/sandboxd skips the release build.
SBX=${SBX:-$(release_sandboxd "$ROOT")}

# The routed name resolves inside a private mount namespace only.
ns_hosts "$HOST" "shelley.$HOST"

# Certificate for nginx and Caddy (sandboxd issues its own from its internal CA).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -days 2 -subj "/CN=$HOST" \
  -addext "subjectAltName=DNS:$HOST" 2>/dev/null

nginx_static "$WORK/upstream.conf" "$UP"
printf 'hello\n' > "$WORK/www/small"
head -c 102400 /dev/zero | tr '\0' 'x' > "$WORK/www/big"

if [ "$PEER_LOGS" = on ]; then
  NGINX_LOG="access_log $WORK/nginx-access.log combined buffer=32k flush=1s;"
  CADDY_LOG="log {
    output file $WORK/caddy-access.log
  }"
else
  NGINX_LOG="access_log off;"
  CADDY_LOG=""
fi

cat > "$WORK/nginx.conf" <<EOF
worker_processes 2;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err warn;
events { worker_connections 4096; }
http {
  $NGINX_LOG
  client_body_temp_path $WORK/tmp; proxy_temp_path $WORK/tmp; fastcgi_temp_path $WORK/tmp;
  uwsgi_temp_path $WORK/tmp; scgi_temp_path $WORK/tmp;
  keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP; keepalive 64; }
  server {
    listen 127.0.0.1:$NGINX ssl http2;
    server_name $HOST;
    ssl_certificate $WORK/cert.pem;
    ssl_certificate_key $WORK/key.pem;
    ssl_session_cache shared:SSL:10m;
    ssl_protocols TLSv1.2 TLSv1.3;  # as Debian's nginx.conf (1.22's built-in default lacks 1.3)
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto https;
    }
  }
}
EOF

cat > "$WORK/Caddyfile" <<EOF
{
  admin off
  auto_https off
}
https://$HOST:$CADDY {
  tls $WORK/cert.pem $WORK/key.pem
  reverse_proxy 127.0.0.1:$UP
  $CADDY_LOG
}
EOF

nginx -c "$WORK/upstream.conf" -p "$WORK" & PIDS+=($!)
# sandboxd as a service would run it: default log level (info, so one
# access-log line per request, here to a file), internal-CA certificates.
SOCK="$WORK/sbx/admin.sock"
sbx_serve "$SBX" "$WORK/sbx" "$GW" "$WORK/sandboxd.log"; GW_PID=$SBX_PID
ssh-keygen -q -t ed25519 -N '' -f "$WORK/sbx/key" >/dev/null
"$SBX" --admin-socket "$SOCK" add bench --domain "$HOST" --upstream 127.0.0.1 \
  --app-port "$UP" --ssh-key "$WORK/sbx/key.pub" >/dev/null
"$SBX" --admin-socket "$SOCK" ca-cert > "$WORK/gw-ca.pem"
# The same for an older build, when one is given (SBX_BASE).
start_base() {
  local sock="$WORK/base/admin.sock"
  sbx_serve "$SBX_BASE" "$WORK/base" "$BASE" "$WORK/base.log"; BASE_PID=$SBX_PID
  "$SBX_BASE" --admin-socket "$sock" add bench --domain "$HOST" --upstream 127.0.0.1 \
    --app-port "$UP" --ssh-key "$WORK/sbx/key.pub" >/dev/null
  "$SBX_BASE" --admin-socket "$sock" ca-cert > "$WORK/base-ca.pem"
}
[ -n "${SBX_BASE:-}" ] && start_base
XDG_DATA_HOME="$WORK/caddy" XDG_CONFIG_HOME="$WORK/caddy" \
  caddy run --config "$WORK/Caddyfile" --adapter caddyfile >"$WORK/caddy.log" 2>&1 & PIDS+=($!); CADDY_PID=$!
nginx -c "$WORK/nginx.conf" -p "$WORK" & PIDS+=($!); NGINX_PID=$!

wait_ok() { # url cacert
  for _ in $(seq 1 100); do
    if in_ns curl -fsS --max-time 2 --cacert "$2" -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "not ready: $1" >&2; exit 1
}
wait_ok "http://127.0.0.1:$UP/small" /dev/null
wait_ok "https://$HOST:$GW/small" "$WORK/gw-ca.pem"
wait_ok "https://$HOST:$CADDY/small" "$WORK/cert.pem"
wait_ok "https://$HOST:$NGINX/small" "$WORK/cert.pem"
[ -n "${SBX_BASE:-}" ] && wait_ok "https://$HOST:$BASE/small" "$WORK/base-ca.pem"

# Peak resident memory (KiB) of a process and its children.
peak_kib() {
  local total=0 p
  for p in "$1" $(ps -o pid= --ppid "$1"); do
    local v
    v=$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

to_ms() { # "1.23ms" / "456.00us" / "1.10s" -> ms
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.2f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.2f", v }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.2f", v * 1000 }
    else printf "%s", v }'
}

# CPU time (clock ticks) of a process and its children so far.
cpu_ticks() {
  local total=0 p
  for p in "$1" $(ps -o pid= --ppid "$1"); do
    local t
    t=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)
    total=$((total + ${t:-0}))
  done
  echo "$total"
}
HZ=$(getconf CLK_TCK)

declare -A RPS P50 P99 CPU MEM
SERVERS=(sandboxd caddy nginx)
declare -A PORT=([sandboxd]=$GW [caddy]=$CADDY [nginx]=$NGINX)
declare -A PID=([sandboxd]=$GW_PID [caddy]=$CADDY_PID [nginx]=$NGINX_PID)
if [ -n "${SBX_BASE:-}" ]; then
  SERVERS+=(base); PORT[base]=$BASE; PID[base]=$BASE_PID
fi
IFS=, read -r -a SCENARIOS <<<"${SCENARIOS:-keepalive small,keepalive big,close small,close big}"

run_wrk() { # server mode size
  local url="https://$HOST:${PORT[$1]}/$3" extra=()
  [ "$2" = close ] && extra=(-H 'Connection: close')
  in_ns timeout $((DUR + 30)) wrk -t"$THREADS" -c"$CONNS" -d"${DUR}s" --latency "${extra[@]}" "$url"
}

# Warm-up, then ROUNDS rounds; each round runs every scenario on every
# server, in an order that rotates between rounds, so that load from
# elsewhere on the machine hits all three alike. Ratios are taken within a
# round (the servers ran seconds apart) and reported as min–median–max.
for s in "${SERVERS[@]}"; do run_wrk "$s" keepalive small >/dev/null 2>&1 || true; done
LOADS=()
for round in $(seq 1 "$ROUNDS"); do
  # The servers' order rotates by one each round.
  n=${#SERVERS[@]} order=()
  for i in $(seq 0 $((n - 1))); do order+=("${SERVERS[$(((i + n - (round - 1) % n) % n))]}"); done
  for sc in "${SCENARIOS[@]}"; do
    read -r mode size <<<"$sc"
    for s in "${order[@]}"; do
      echo "round $round: $s $mode $size" >&2
      perf_pid=
      if [ -n "${PERF_OUT:-}" ] && [ "$s" = sandboxd ] && [ "$round" = 1 ]; then
        perf record -q -F 499 -g -p "$GW_PID" -o "$PERF_OUT.${mode}-${size}" -- sleep "$DUR" \
          >/dev/null 2>&1 & perf_pid=$!
      fi
      c0=$(cpu_ticks "${PID[$s]}")
      out=$(run_wrk "$s" "$mode" "$size" 2>&1 || true)
      c1=$(cpu_ticks "${PID[$s]}")
      [ -n "$perf_pid" ] && wait "$perf_pid"
      rps=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' <<<"$out")
      reqs=$(awk '/requests in/ {print $1}' <<<"$out")
      errs=$(awk '/Non-2xx|Socket errors/' <<<"$out")
      [ -n "$errs" ] && echo "  $s $sc: $errs" >&2
      RPS[$round,$s,$sc]=${rps:-0}
      P50[$round,$s,$sc]=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
      P99[$round,$s,$sc]=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
      CPU[$round,$s,$sc]=$(awk -v t=$((c1 - c0)) -v hz="$HZ" -v n="${reqs:-0}" \
        'BEGIN { if (n > 0) printf "%.0f", t / hz * 1e6 / n; else print "-" }')
    done
  done
  LOADS+=("$(cut -d' ' -f1 /proc/loadavg)")
done
for s in "${SERVERS[@]}"; do MEM[$s]=$(peak_kib "${PID[$s]}"); done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
# min–median–max of the arguments
spread() {
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) { print "-"; exit }
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "%s–%.2f–%s", v[1], m, v[NR] }'
}

echo
echo "peer access logs: $PEER_LOGS"
echo "wrk -t$THREADS -c$CONNS -d${DUR}s over TLS, $ROUNDS interleaved rounds (loopback, $(nproc) cores shared by client, proxies and upstream)"
echo "load average (1 min) after each round: ${LOADS[*]}"
echo
printf '| %5s | %-16s | %-8s | %9s | %8s | %8s | %10s |\n' round scenario server "req/s" "p50 ms" "p99 ms" "CPU µs/req"
printf '|%s|%s|%s|%s|%s|%s|%s|\n' ------- ------------------ ---------- ----------- ---------- ---------- ------------
for round in $(seq 1 "$ROUNDS"); do
  for sc in "${SCENARIOS[@]}"; do
    for s in "${SERVERS[@]}"; do
      printf '| %5s | %-16s | %-8s | %9s | %8s | %8s | %10s |\n' "$round" "$sc" "$s" \
        "${RPS[$round,$s,$sc]}" "${P50[$round,$s,$sc]}" "${P99[$round,$s,$sc]}" "${CPU[$round,$s,$sc]}"
    done
  done
done
echo
echo "Ratios within each round, min–median–max over the rounds (req/s: higher is better for sandboxd; p99 and CPU per request: lower is better for sandboxd)"
echo
printf '| %-16s | %22s | %22s | %24s | %22s | %22s |\n' scenario "req/s sandboxd/caddy" "req/s sandboxd/nginx" "p99 sandboxd/nginx" "CPU/req sandboxd/nginx" "CPU/req sandboxd/caddy"
printf '|%s|%s|%s|%s|%s|%s|\n' ------------------ ------------------------ ------------------------ -------------------------- ------------------------ ------------------------
for sc in "${SCENARIOS[@]}"; do
  rc=() rn=() pn=() cn=() cc=()
  for round in $(seq 1 "$ROUNDS"); do
    rc+=("$(ratio "${RPS[$round,sandboxd,$sc]}" "${RPS[$round,caddy,$sc]}")")
    rn+=("$(ratio "${RPS[$round,sandboxd,$sc]}" "${RPS[$round,nginx,$sc]}")")
    pn+=("$(ratio "${P99[$round,sandboxd,$sc]}" "${P99[$round,nginx,$sc]}")")
    cn+=("$(ratio "${CPU[$round,sandboxd,$sc]}" "${CPU[$round,nginx,$sc]}")")
    cc+=("$(ratio "${CPU[$round,sandboxd,$sc]}" "${CPU[$round,caddy,$sc]}")")
  done
  printf '| %-16s | %22s | %22s | %24s | %22s | %22s |\n' "$sc" "$(spread "${rc[@]}")" "$(spread "${rn[@]}")" "$(spread "${pn[@]}")" "$(spread "${cn[@]}")" "$(spread "${cc[@]}")"
done
if [ -n "${SBX_BASE:-}" ]; then
  echo
  echo "This build against the base build ($SBX_BASE), min–median–max over the rounds"
  echo
  printf '| %-16s | %22s | %22s | %22s |\n' scenario "req/s sandboxd/base" "p99 sandboxd/base" "CPU/req sandboxd/base"
  printf '|%s|%s|%s|%s|\n' ------------------ ------------------------ ------------------------ ------------------------
  for sc in "${SCENARIOS[@]}"; do
    rb=() pb=() cb=()
    for round in $(seq 1 "$ROUNDS"); do
      rb+=("$(ratio "${RPS[$round,sandboxd,$sc]}" "${RPS[$round,base,$sc]}")")
      pb+=("$(ratio "${P99[$round,sandboxd,$sc]}" "${P99[$round,base,$sc]}")")
      cb+=("$(ratio "${CPU[$round,sandboxd,$sc]}" "${CPU[$round,base,$sc]}")")
    done
    printf '| %-16s | %22s | %22s | %22s |\n' "$sc" "$(spread "${rb[@]}")" "$(spread "${pb[@]}")" "$(spread "${cb[@]}")"
  done
  echo "peak RSS: base $((MEM[base] / 1024)) MiB"
fi
echo
echo "peak RSS: sandboxd $((MEM[sandboxd] / 1024)) MiB, caddy $((MEM[caddy] / 1024)) MiB, nginx (master + workers) $((MEM[nginx] / 1024)) MiB"
lines() { if [ -f "$1" ]; then wc -l < "$1"; else echo 0; fi; }
echo "access-log lines: sandboxd $(grep -c 'httpgate::access' "$WORK/sandboxd.log")," \
  "caddy $(lines "$WORK/caddy-access.log"), nginx $(lines "$WORK/nginx-access.log") (PEER_LOGS=$PEER_LOGS)"
