#!/usr/bin/env bash
# SSH abuse benchmark on loopback, against the real daemon (`sandboxd serve`,
# release build) with two static sandboxes on one local sshd:
#   - 400 stalled forwarded channels of sandbox `abuse` (7 `ssh -N -L`
#     connections of <= 60 channels to a sink that accepts and never reads,
#     each local socket written until it blocks): daemon RSS (and peak);
#   - sandbox `calm` meanwhile: `ssh calm true` time and a download's
#     throughput, unloaded vs under that load;
#   - pre-auth caps: 300 stalled TCP connections from 127.0.0.1 (half send a
#     version line): how many the daemon kept; then `ssh -b 127.0.0.2 calm
#     true` login time while they are held.
# Everything binds 127.0.0.1/127.0.0.2; every process started here is
# stopped by PID; every wait is bounded.
# Usage: bench/abuse/ssh.sh      Env: CHANNELS (400), STALL_MIB (16 per
# channel written), SIZE_MIB (256), RUNS (10), BIN (a sandboxd binary; default:
# cargo build --release), SSH_TOML (lines for the daemon's [ssh] table, e.g.
# 'relay_buffer_mib = 1048576' to see the relay without its budget).
set -euo pipefail

CHANNELS=${CHANNELS:-400}
STALL_MIB=${STALL_MIB:-16}
SIZE_MIB=${SIZE_MIB:-256}
RUNS=${RUNS:-10}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
need_tools "run .ci/setup-sshgate.sh" ssh ssh-keygen /usr/sbin/sshd jq python3 bc
BIN=${BIN:-$(release_sandboxd "$ROOT")}

bench_workdir sshgate-abuse

ME=$(id -un)
mkdir -p /run/sshd
for k in client host_target; do ssh-keygen -q -t ed25519 -N '' -C "$k" -f "$WORK/$k"; done

TP=$(free_port)
cat "$WORK/client.pub" > "$WORK/target.auth"
cat > "$WORK/target.conf" <<CONF
Port $TP
ListenAddress 127.0.0.1
HostKey $WORK/host_target
AuthorizedKeysFile $WORK/target.auth
PidFile $WORK/target.pid
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
AllowTcpForwarding yes
MaxStartups 2000
MaxSessions 100
PrintMotd no
SetEnv SHLVL=1
CONF
/usr/sbin/sshd -D -e -f "$WORK/target.conf" 2>"$WORK/target.log" &
PIDS+=($!)
wait_port "$TP"

# A sink that accepts and never reads.
SINK=$(free_port)
python3 - "$SINK" <<'PY' &
import socket, sys, time
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1]))); l.listen(1024)
held = []
while True:
    c, _ = l.accept(); held.append(c)
PY
PIDS+=($!)
wait_port "$SINK"

export SANDBOXD_ADMIN_SOCKET=$WORK/daemon/admin.sock
mkdir -p "$WORK/daemon"; chmod 700 "$WORK/daemon"
printf '[ssh]\n%s\n' "${SSH_TOML:-}" > "$WORK/daemon.toml"
"$BIN" serve --config "$WORK/daemon.toml" --state-dir "$WORK/daemon/state" --ssh-listen 127.0.0.1:0 \
  --https-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >>"$WORK/gw.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
st=
for _ in $(seq 600); do
  st=$("$BIN" status --json 2>/dev/null) && break
  kill -0 "$GW_PID" 2>/dev/null || break
  sleep 0.1
done
[ -n "$st" ] || { echo "daemon did not start" >&2; cat "$WORK/gw.log" >&2; exit 1; }
GP=$(jq -r '.ssh_listen[0]' <<<"$st" | sed 's/.*://')
for sb in abuse calm; do
  "$BIN" add "$sb" --domain "$sb.localhost" --upstream 127.0.0.1 --ssh-port "$TP" \
    --user "$ME" --ssh-key "$WORK/client.pub" --upstream-host-key "$WORK/host_target.pub" >/dev/null
  "$BIN" show "$sb" --json | jq -r .upstream_public_key >> "$WORK/target.auth"
done
echo "[127.0.0.1]:$GP $("$BIN" host-key | awk '$1 == "ssh-ed25519" {print $1, $2; exit}')" > "$WORK/known_hosts"

O=(-F /dev/null -i "$WORK/client" -o IdentitiesOnly=yes -o IdentityAgent=none
   -o "UserKnownHostsFile=$WORK/known_hosts" -o StrictHostKeyChecking=yes -o BatchMode=yes)
now() { date +%s.%N; }
kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
calm_figures() { # -> "connect_median_s MiB/s"
  local c="" t0 t1 d
  for _ in $(seq "$RUNS"); do
    t0=$(now); ssh "${O[@]}" -p "$GP" calm@127.0.0.1 true; t1=$(now)
    c+="$(echo "$t1 - $t0" | bc -l) "
  done
  t0=$(now); ssh "${O[@]}" -p "$GP" calm@127.0.0.1 "head -c $((SIZE_MIB * 1048576)) /dev/zero" >/dev/null; t1=$(now)
  d=$(echo "$t1 - $t0" | bc -l)
  echo "$(echo "$c" | median) $(echo "scale=1; $SIZE_MIB / $d" | bc -l)"
}

ssh "${O[@]}" -p "$GP" calm@127.0.0.1 true
BASE_RSS=$(kib "$GW_PID" VmRSS)
read -r C0 T0 < <(calm_figures)

# ---- 400 stalled forwarded channels of sandbox `abuse` -----------------------
PER=60
CONNS=$(( (CHANNELS + PER - 1) / PER ))
PORTS=()
for _ in $(seq "$CONNS"); do
  lp=$(free_port)
  ssh "${O[@]}" -N -o ExitOnForwardFailure=yes -L "$lp:127.0.0.1:$SINK" -p "$GP" abuse@127.0.0.1 2>>"$WORK/fwd.err" &
  PIDS+=($!)
  PORTS+=("$lp")
done
for lp in "${PORTS[@]}"; do wait_port "$lp"; done
# Open CHANNELS local connections spread over the forwards and write to
# each until every one has blocked for 3 s (bounded by 120 s).
python3 - "$CHANNELS" "$STALL_MIB" "$WORK/stalled.out" "${PORTS[@]}" <<'PY' &
import socket, sys, time, select
n, mib, out, ports = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], [int(p) for p in sys.argv[4:]]
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", ports[i % len(ports)]))
    s.setblocking(False); socks.append(s)
chunk = b"\0" * 65536
sent = [0] * n
limit = mib * 1048576
deadline = time.time() + 120
quiet_since = time.time()
while time.time() < deadline:
    progress = False
    _, w, _ = select.select([], [s for i, s in enumerate(socks) if sent[i] < limit], [], 0.5)
    for s in w:
        i = socks.index(s)
        try:
            k = s.send(chunk); sent[i] += k; progress = progress or k > 0
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            sent[i] = limit
    if progress:
        quiet_since = time.time()
    elif time.time() - quiet_since > 3:
        break
with open(out, "w") as f:
    f.write("%d %d\n" % (sum(1 for x in sent if x > 0), sum(sent)))
time.sleep(3600)
PY
STALLER=$!
PIDS+=("$STALLER")
for _ in $(seq 1300); do [ -s "$WORK/stalled.out" ] && break; sleep 0.1; done
read -r STALLED WRITTEN < "$WORK/stalled.out"
LOAD_RSS=$(kib "$GW_PID" VmRSS)
PEAK_RSS=$(kib "$GW_PID" VmHWM)
read -r C1 T1 < <(calm_figures)
kill "$STALLER" 2>/dev/null || true

# ---- pre-auth: 300 stalled connections from 127.0.0.1 -------------------------
python3 - "$GP" "$WORK/preauth.out" <<'PY' &
import socket, sys, time
port, out = int(sys.argv[1]), sys.argv[2]
socks = []
for i in range(300):
    s = socket.create_connection(("127.0.0.1", port))
    if i % 2: s.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
    socks.append(s)
kept = 0
for s in socks:
    s.settimeout(10)
    try:
        kept += 1 if s.recv(4) else 0
    except OSError:
        pass
with open(out, "w") as f:
    f.write("%d\n" % kept)
time.sleep(3600)
PY
PRE=$!
PIDS+=("$PRE")
for _ in $(seq 600); do [ -s "$WORK/preauth.out" ] && break; sleep 0.1; done
KEPT=$(cat "$WORK/preauth.out")
L2=""
for _ in $(seq "$RUNS"); do
  t0=$(now); ssh "${O[@]}" -b 127.0.0.2 -p "$GP" calm@127.0.0.1 true; t1=$(now)
  L2+="$(echo "$t1 - $t0" | bc -l) "
done
L2=$(echo "$L2" | median)
kill "$PRE" 2>/dev/null || true

echo "sshgate abuse benchmark: loopback, $(nproc) cores, daemon $BIN, [ssh] ${SSH_TOML:-defaults}"
printf '%-58s %s\n' "daemon RSS before load" "$((BASE_RSS / 1024)) MiB"
printf '%-58s %s\n' "daemon RSS, $STALLED/$CHANNELS stalled channels ($((WRITTEN / 1048576)) MiB accepted)" "$((LOAD_RSS / 1024)) MiB (peak $((PEAK_RSS / 1024)) MiB; bound 256 MiB)"
printf '%-58s %s\n' "calm: ssh true, median of $RUNS, unloaded / loaded" "$(printf '%.3f s / %.3f s' "$C0" "$C1")"
printf '%-58s %s\n' "calm: ${SIZE_MIB} MiB down, unloaded / loaded" "$T0 / $T1 MiB/s"
printf '%-58s %s\n' "pre-auth: of 300 stalled conns from 127.0.0.1, kept" "$KEPT"
printf '%-58s %s\n' "pre-auth: 127.0.0.2 ssh true while held, median of $RUNS" "$(printf '%.3f s' "$L2")"
