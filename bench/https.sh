#!/usr/bin/env bash
# HTTPS reverse-proxy benchmark, loopback only, bounded in time:
# httpgate (crates/httpgate/examples/gateway.rs) vs Caddy vs nginx, side by
# side in one run, in front of the same upstream (an nginx serving static
# files). wrk over TLS with keep-alive and with a new connection per request
# ('Connection: close'), small and 100 KiB responses. Prints req/s, p50/p99
# latency, peak memory, and the gateway's ratios to Caddy and nginx.
#
# Usage: bench/https.sh   (DUR=5 s per run, ROUNDS=2, CONNS=50, THREADS=2 by default;
#                          about 2 minutes with the defaults)
# Needs: wrk caddy nginx openssl curl python3 (.ci/setup-httpgate.sh installs them).
set -euo pipefail

DUR=${DUR:-5}
ROUNDS=${ROUNDS:-2}
CONNS=${CONNS:-50}
THREADS=${THREADS:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/https-bench.XXXXXX)
chmod 755 "$WORK"   # nginx workers (www-data) read the static files
PIDS=()

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

read -r UP GW CADDY NGINX < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(4)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])
')

echo "building the gateway (release, LTO)..." >&2
(cd "$ROOT" && CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
  cargo build --quiet --release -p httpgate --example gateway)
GATEWAY_BIN="$ROOT/target/release/examples/gateway"

# Certificate for nginx and Caddy (the gateway issues its own from its internal CA).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost 2>/dev/null

mkdir -p "$WORK/www" "$WORK/tmp"
printf 'hello\n' > "$WORK/www/small"
head -c 102400 /dev/zero | tr '\0' 'x' > "$WORK/www/big"

cat > "$WORK/upstream.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/upstream.pid;
error_log $WORK/upstream.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/tmp; proxy_temp_path $WORK/tmp; fastcgi_temp_path $WORK/tmp;
  uwsgi_temp_path $WORK/tmp; scgi_temp_path $WORK/tmp;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP; root $WORK/www; }
}
EOF

cat > "$WORK/nginx.conf" <<EOF
worker_processes 2;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/tmp; proxy_temp_path $WORK/tmp; fastcgi_temp_path $WORK/tmp;
  uwsgi_temp_path $WORK/tmp; scgi_temp_path $WORK/tmp;
  keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP; keepalive 64; }
  server {
    listen 127.0.0.1:$NGINX ssl http2;
    server_name localhost;
    ssl_certificate $WORK/cert.pem;
    ssl_certificate_key $WORK/key.pem;
    ssl_session_cache shared:SSL:10m;
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
https://localhost:$CADDY {
  tls $WORK/cert.pem $WORK/key.pem
  reverse_proxy 127.0.0.1:$UP
}
EOF

nginx -c "$WORK/upstream.conf" -p "$WORK" & PIDS+=($!)
"$GATEWAY_BIN" --listen "127.0.0.1:$GW" --host localhost --upstream "127.0.0.1:$UP" \
  --threads "$(nproc)" --ca-out "$WORK/gw-ca.pem" & PIDS+=($!); GW_PID=$!
XDG_DATA_HOME="$WORK/caddy" XDG_CONFIG_HOME="$WORK/caddy" \
  caddy run --config "$WORK/Caddyfile" --adapter caddyfile >"$WORK/caddy.log" 2>&1 & PIDS+=($!); CADDY_PID=$!
nginx -c "$WORK/nginx.conf" -p "$WORK" & PIDS+=($!); NGINX_PID=$!

wait_ok() { # url cacert
  for _ in $(seq 1 100); do
    if curl -fsS --max-time 2 --cacert "$2" -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "not ready: $1" >&2; exit 1
}
wait_ok "http://127.0.0.1:$UP/small" /dev/null
wait_ok "https://localhost:$GW/small" "$WORK/gw-ca.pem"
wait_ok "https://localhost:$CADDY/small" "$WORK/cert.pem"
wait_ok "https://localhost:$NGINX/small" "$WORK/cert.pem"

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

declare -A RPS P50 P99 MEM
SERVERS=(httpgate caddy nginx)
declare -A PORT=([httpgate]=$GW [caddy]=$CADDY [nginx]=$NGINX)
declare -A PID=([httpgate]=$GW_PID [caddy]=$CADDY_PID [nginx]=$NGINX_PID)
SCENARIOS=("keepalive small" "keepalive big" "close small" "close big")

run_wrk() { # server mode size
  local url="https://localhost:${PORT[$1]}/$3" extra=()
  [ "$2" = close ] && extra=(-H 'Connection: close')
  timeout $((DUR + 30)) wrk -t"$THREADS" -c"$CONNS" -d"${DUR}s" --latency "${extra[@]}" "$url"
}

# Warm-up, then ROUNDS rounds; each round runs every scenario on every
# server, in an order that alternates between rounds, so that load from
# elsewhere on the machine hits all three alike. The best round is kept.
for s in "${SERVERS[@]}"; do run_wrk "$s" keepalive small >/dev/null 2>&1 || true; done
for round in $(seq 1 "$ROUNDS"); do
  order=("${SERVERS[@]}")
  [ $((round % 2)) -eq 0 ] && order=(nginx caddy httpgate)
  for sc in "${SCENARIOS[@]}"; do
    read -r mode size <<<"$sc"
    for s in "${order[@]}"; do
      echo "round $round: $s $mode $size" >&2
      out=$(run_wrk "$s" "$mode" "$size" 2>&1 || true)
      rps=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' <<<"$out")
      errs=$(awk '/Non-2xx|Socket errors/' <<<"$out")
      [ -n "$errs" ] && echo "  $s $sc: $errs" >&2
      if [ "${rps:-0}" -gt "${RPS[$s,$sc]:-0}" ]; then
        RPS[$s,$sc]=$rps
        P50[$s,$sc]=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
        P99[$s,$sc]=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
      fi
    done
  done
done
for s in "${SERVERS[@]}"; do MEM[$s]=$(peak_kib "${PID[$s]}"); done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

echo
echo "wrk -t$THREADS -c$CONNS -d${DUR}s over TLS, best of $ROUNDS interleaved rounds (loopback, $(nproc) cores shared by client, proxy and upstream)"
echo
printf '| %-16s | %-8s | %9s | %8s | %8s |\n' scenario server "req/s" "p50 ms" "p99 ms"
printf '|%s|%s|%s|%s|%s|\n' ------------------ ---------- ----------- ---------- ----------
for sc in "${SCENARIOS[@]}"; do
  for s in "${SERVERS[@]}"; do
    printf '| %-16s | %-8s | %9s | %8s | %8s |\n' "$sc" "$s" "${RPS[$s,$sc]:-?}" "${P50[$s,$sc]:-?}" "${P99[$s,$sc]:-?}"
  done
done
echo
printf '| %-16s | %14s | %14s |\n' scenario "httpgate/caddy" "httpgate/nginx"
printf '|%s|%s|%s|\n' ------------------ ---------------- ----------------
for sc in "${SCENARIOS[@]}"; do
  printf '| %-16s | %14s | %14s |\n' "$sc" \
    "$(ratio "${RPS[httpgate,$sc]:-0}" "${RPS[caddy,$sc]:-0}")" \
    "$(ratio "${RPS[httpgate,$sc]:-0}" "${RPS[nginx,$sc]:-0}")"
done
echo
echo "peak RSS: httpgate $((MEM[httpgate] / 1024)) MiB, caddy $((MEM[caddy] / 1024)) MiB, nginx (master + workers) $((MEM[nginx] / 1024)) MiB"
