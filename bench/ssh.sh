#!/usr/bin/env bash
# Side-by-side SSH benchmark on loopback, in one run:
#   - 1 GiB down and up: through the gateway vs direct vs OpenSSH ProxyJump
#     (ProxyCommand 'ssh -W' through a second local sshd);
#   - `ssh host true` time: gateway vs direct (hyperfine);
#   - gateway memory with IDLE idle proxied sessions (RSS and peak RSS);
#   - the gateway's CPU seconds per GiB relayed, each way.
# "gateway" is the real daemon (`sandboxd serve`, release build) with a
# static sandbox `bench` added through its admin socket, exactly as a user
# would set it up. GATEWAY=example runs crates/sshgate/examples/ssh_gateway.rs
# instead, which takes tuning overrides (window, packet size, ciphers...).
# Everything binds 127.0.0.1; every process started here is stopped by PID.
# Usage: bench/ssh.sh                         (the daemon)
#        GATEWAY=example bench/ssh.sh [key=value ...]   (see the example's doc)
# Env: SIZE_MIB (1024), RUNS (3), CONNECT_RUNS (20), IDLE (500), SBX (a sandboxd
# build to run instead of building this checkout's).
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-3}
CONNECT_RUNS=${CONNECT_RUNS:-20}
IDLE=${IDLE:-500}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BYTES=$((SIZE_MIB * 1024 * 1024))
TUNING=("$@")
GATEWAY=${GATEWAY:-daemon}
case $GATEWAY in
  daemon) [ ${#TUNING[@]} -eq 0 ] || { echo "tuning overrides need GATEWAY=example" >&2; exit 2; } ;;
  example) ;;
  *) echo "GATEWAY must be daemon or example" >&2; exit 2 ;;
esac

# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
need_tools "run .ci/setup-sshgate.sh" ssh ssh-keygen /usr/sbin/sshd hyperfine jq ss

if [ "$GATEWAY" = daemon ] && [ -n "${SBX:-}" ]; then
  GW_BIN=$SBX   # a given build (e.g. an older one, to compare before/after)
elif [ "$GATEWAY" = daemon ]; then
  (cd "$ROOT" && cargo build --quiet --release --bin sandboxd)
  GW_BIN=$ROOT/target/release/sandboxd
else
  (cd "$ROOT" && cargo build --quiet --release -p sshgate --example ssh_gateway)
  GW_BIN=$ROOT/target/release/examples/ssh_gateway
fi

bench_workdir sshgate-bench

ME=$(id -un)
mkdir -p /run/sshd
keygen() { ssh-keygen -q -t ed25519 -N '' -C "$1" -f "$WORK/$1"; }
for k in client upstream host_target host_jump; do keygen "$k"; done

start_sshd() { # name port hostkey authorized_keys...
  local name=$1 port=$2 hostkey=$3; shift 3
  cat "$@" > "$WORK/$name.auth"
  cat > "$WORK/$name.conf" <<CONF
Port $port
ListenAddress 127.0.0.1
HostKey $hostkey
AuthorizedKeysFile $WORK/$name.auth
PidFile $WORK/$name.pid
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
AllowTcpForwarding yes
MaxStartups 2000
PrintMotd no
Subsystem sftp internal-sftp
# bash sources ~/.bashrc for commands run by sshd unless SHLVL says it is
# nested: keep the login user's rc files out of the timings.
SetEnv SHLVL=1
CONF
  /usr/sbin/sshd -D -e -f "$WORK/$name.conf" 2>"$WORK/$name.log" &
  PIDS+=($!)
  wait_port "$port"
}

TP=$(free_port); start_sshd target "$TP" "$WORK/host_target" "$WORK/client.pub" "$WORK/upstream.pub"
JP=$(free_port); start_sshd jump "$JP" "$WORK/host_jump" "$WORK/client.pub"

GW_PID=
GP=
GW_KEY=
start_example() {
  rm -f "$WORK/gw.out"
  "$GW_BIN" listen=127.0.0.1:0 host_keys="$WORK/gwkeys" sandbox=bench target="127.0.0.1:$TP" \
    user="$ME" authorized_keys="$WORK/client.pub" upstream_key="$WORK/upstream" \
    upstream_host_key="$WORK/host_target.pub" max_sessions=100000 per_source_max_startups=100000 \
    "${TUNING[@]}" >"$WORK/gw.out" 2>>"$WORK/gw.log" &
  GW_PID=$!
  PIDS+=("$GW_PID")
  local i
  for i in $(seq 600); do
    GP=$(sed -n 's/^listening 127.0.0.1:\([0-9]*\)$/\1/p' "$WORK/gw.out" 2>/dev/null || true)
    [ -n "$GP" ] && break
    sleep 0.1
  done
  [ -n "$GP" ] || { echo "gateway did not start" >&2; cat "$WORK/gw.log" >&2; exit 1; }
  GW_KEY=$(ssh-keygen -y -f "$WORK/gwkeys/ssh_host_ed25519_key")
}
# The daemon keeps its state across restarts of this script's phases, as it
# would in production: the sandbox is added once, on the first start.
export SANDBOXD_ADMIN_SOCKET=$WORK/daemon/admin.sock
start_daemon() {
  mkdir -p "$WORK/daemon"
  chmod 700 "$WORK/daemon"
  # The idle-session phase opens IDLE sessions of one sandbox from one
  # address at once: beyond the production caps (32 per sandbox, 10:30:20
  # logging in per source), which bench/abuse/ssh.sh measures instead.
  # (A build from before those caps has no [ssh] table, and refuses one.)
  : >"$WORK/daemon.toml"
  if grep -q max_sessions_per_sandbox "$GW_BIN"; then
    printf '[ssh]\nmax_sessions_per_sandbox = 100000\nper_source_max_startups = "100000"\n' >"$WORK/daemon.toml"
  fi
  "$GW_BIN" serve --config "$WORK/daemon.toml" --state-dir "$WORK/daemon/state" --ssh-listen 127.0.0.1:0 \
    --https-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >>"$WORK/gw.log" 2>&1 &
  GW_PID=$!
  PIDS+=("$GW_PID")
  local i st=
  for i in $(seq 600); do
    st=$("$GW_BIN" status --json 2>/dev/null) && break
    kill -0 "$GW_PID" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$st" ] || { echo "daemon did not start" >&2; cat "$WORK/gw.log" >&2; exit 1; }
  GP=$(jq -r '.ssh_listen[0]' <<<"$st" | sed 's/.*://')
  if ! "$GW_BIN" show bench >/dev/null 2>&1; then
    "$GW_BIN" add bench --domain bench.localhost --upstream 127.0.0.1 --ssh-port "$TP" \
      --user "$ME" --ssh-key "$WORK/client.pub" --upstream-host-key "$WORK/host_target.pub" >/dev/null
    # Install the gateway's per-sandbox key upstream (sshd rereads the file).
    "$GW_BIN" show bench --json | jq -r .upstream_public_key >> "$WORK/target.auth"
  fi
  GW_KEY=$("$GW_BIN" host-key | awk '$1 == "ssh-ed25519" {print $1, $2; exit}')
}
start_gateway() {
  if [ "$GATEWAY" = daemon ]; then start_daemon; else start_example; fi
  {
    echo "[127.0.0.1]:$TP $(cat "$WORK/host_target.pub")"
    echo "[127.0.0.1]:$JP $(cat "$WORK/host_jump.pub")"
    echo "[127.0.0.1]:$GP $GW_KEY"
  } > "$WORK/known_hosts"
}
stop_gateway() { kill "$GW_PID"; wait "$GW_PID" 2>/dev/null || true; }

O=(-F /dev/null -i "$WORK/client" -o IdentitiesOnly=yes -o IdentityAgent=none
   -o "UserKnownHostsFile=$WORK/known_hosts" -o StrictHostKeyChecking=yes -o BatchMode=yes)
direct() { ssh "${O[@]}" -p "$TP" "$ME@127.0.0.1" "$@"; }
gateway() { ssh "${O[@]}" -p "$GP" "bench@127.0.0.1" "$@"; }
jump() { ssh "${O[@]}" -o "ProxyCommand=ssh ${O[*]} -p $JP -W %h:%p $ME@127.0.0.1" -p "$TP" "$ME@127.0.0.1" "$@"; }
now() { date +%s.%N; }
kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }

# ---- memory with idle sessions (fresh gateway) -----------------------------
start_gateway
gateway true
BASE_RSS=$(kib "$GW_PID" VmRSS)
# Each idle session holds an open session channel (an idle internal-sftp
# server: no process upstream besides sshd's own), fed by a FIFO that never
# reaches EOF.
mkfifo "$WORK/idle.fifo"
exec 9<>"$WORK/idle.fifo"
CLIENTS=()
for i in $(seq "$IDLE"); do
  gateway -T -s sftp <"$WORK/idle.fifo" >/dev/null 2>>"$WORK/idle.err" &
  CLIENTS+=($!)
  PIDS+=($!)
  if (( i % 25 == 0 )); then
    for _ in $(seq 600); do
      n=$(ss -Htn state established "( sport = :$GP )" | wc -l)
      (( n >= i )) && break
      sleep 0.1
    done
  fi
done
for _ in $(seq 1200); do
  n=$(ss -Htn state established "( sport = :$GP )" | wc -l)
  (( n >= IDLE )) && break
  sleep 0.1
done
sleep 1 # let the last channels settle before reading memory
IDLE_RSS=$(kib "$GW_PID" VmRSS)
PEAK_RSS=$(kib "$GW_PID" VmHWM)
ESTABLISHED=$(ss -Htn state established "( sport = :$GP )" | wc -l)
for p in "${CLIENTS[@]}"; do kill "$p" 2>/dev/null || true; done
for p in "${CLIENTS[@]}"; do wait "$p" 2>/dev/null || true; done
exec 9>&-
stop_gateway

# ---- throughput and connect time --------------------------------------------
start_gateway
declare -A DOWN UP
for mode in direct gateway jump; do DOWN[$mode]=""; UP[$mode]=""; done
# Gateway CPU time (user + system, clock ticks) spent in its transfers: a
# cost per GiB that the machine's other load disturbs far less than time.
gw_ticks() { awk '{print $14 + $15}' "/proc/$GW_PID/stat"; }
CPU_DOWN=0 CPU_UP=0
for _ in $(seq "$RUNS"); do
  for mode in direct gateway jump; do
    c0=$(gw_ticks)
    t0=$(now); $mode "head -c $BYTES /dev/zero" > /dev/null; t1=$(now)
    c1=$(gw_ticks)
    DOWN[$mode]+="$(echo "$t1 - $t0" | bc -l) "
    t0=$(now); head -c "$BYTES" /dev/zero | $mode 'cat > /dev/null'; t1=$(now)
    c2=$(gw_ticks)
    UP[$mode]+="$(echo "$t1 - $t0" | bc -l) "
    if [ "$mode" = gateway ]; then
      CPU_DOWN=$((CPU_DOWN + c1 - c0)); CPU_UP=$((CPU_UP + c2 - c1))
    fi
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mibs() { echo "scale=1; $SIZE_MIB / $1" | bc -l; }

# OpenSSH 9.x prefers the post-quantum sntrup761x25519 key exchange, which
# russh lacks (it has mlkem768x25519, which OpenSSH >= 9.9 prefers), so a
# 9.2 client negotiates curve25519 with the gateway: time direct both ways.
hyperfine --style none --warmup 3 --runs "$CONNECT_RUNS" --export-json "$WORK/connect.json" \
  "ssh ${O[*]} -p $TP $ME@127.0.0.1 true" \
  "ssh ${O[*]} -o KexAlgorithms=curve25519-sha256 -p $TP $ME@127.0.0.1 true" \
  "ssh ${O[*]} -p $GP bench@127.0.0.1 true" >/dev/null
C_DIRECT=$(jq '.results[0].mean' "$WORK/connect.json")
C_DIRECT_X=$(jq '.results[1].mean' "$WORK/connect.json")
C_GW=$(jq '.results[2].mean' "$WORK/connect.json")
stop_gateway

# ---- report ------------------------------------------------------------------
echo "sshgate benchmark: loopback, ${SIZE_MIB} MiB transfers (median of $RUNS), $(nproc) cores"
echo "gateway: $GATEWAY ($GW_BIN), tuning: ${TUNING[*]:-defaults}; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-10s %12s %12s\n' mode "down MiB/s" "up MiB/s"
for mode in direct gateway jump; do
  d=$(echo "${DOWN[$mode]}" | median); u=$(echo "${UP[$mode]}" | median)
  printf '%-10s %12s %12s\n' "$mode" "$(mibs "$d")" "$(mibs "$u")"
  eval "D_$mode=$d; U_$mode=$u"
done
# shellcheck disable=SC2154
{
  echo "throughput gateway/proxyjump: down $(echo "scale=2; $D_jump / $D_gateway" | bc -l)x, up $(echo "scale=2; $U_jump / $U_gateway" | bc -l)x (target >= 0.9)"
  echo "throughput gateway/direct:    down $(echo "scale=2; $D_direct / $D_gateway" | bc -l)x, up $(echo "scale=2; $U_direct / $U_gateway" | bc -l)x"
}
gib=$(echo "$RUNS * $SIZE_MIB / 1024" | bc -l)
tck=$(getconf CLK_TCK)
printf 'gateway CPU time per GiB relayed (user+system, mean of %s): down %.2f s, up %.2f s\n' "$RUNS" \
  "$(echo "$CPU_DOWN / $tck / $gib" | bc -l)" "$(echo "$CPU_UP / $tck / $gib" | bc -l)"
printf 'connect (ssh true, mean of %s): direct %.3f s (client default kex), direct %.3f s (curve25519, as via gateway), gateway %.3f s\n' \
  "$CONNECT_RUNS" "$C_DIRECT" "$C_DIRECT_X" "$C_GW"
printf 'connect ratio gateway/direct: %.2fx vs default kex, %.2fx vs same kex (target <= 1.3)\n' \
  "$(echo "$C_GW / $C_DIRECT" | bc -l)" "$(echo "$C_GW / $C_DIRECT_X" | bc -l)"
echo "memory: $ESTABLISHED/$IDLE idle sessions; gateway RSS ${BASE_RSS} KiB -> ${IDLE_RSS} KiB (peak ${PEAK_RSS} KiB);" \
  "$(( (IDLE_RSS - BASE_RSS) / IDLE )) KiB per idle session (target <= 64)"
