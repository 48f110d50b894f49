#!/usr/bin/env bash
# Provisioning and snapshot benchmark, in one run, side by side:
#
#  1. `sandboxd create` → SSH-ready (a real `ssh -p PORT NAME@127.0.0.1 true`
#     through the daemon's SSH router succeeding), on
#       - a golden image (built by this run with `sandboxd image build`,
#         unless GOLDEN=ALIAS names an existing one),
#       - the plain test image with `--provision full` (every step),
#       - the plain test image with `--provision none` (the floor);
#  2. `sandboxd snapshot create` and `sandboxd snapshot restore` of a
#     container cloned from the golden image, with ~200 MiB of data written
#     in it, on the Incus pool `default` (dir) vs a temporary loop-backed
#     btrfs pool made by this run. The container is made with
#     `incus init --storage POOL` and adopted with `sandboxd import`.
#
# A private daemon runs on a temporary state directory with an admin socket
# and loopback listeners on free ports (127.0.0.1:0). Everything this run
# makes (sandboxes, instances, the golden image it built, the btrfs pool,
# the daemon, the temporary directory) is removed on exit, by name or PID.
#
# Usage: bench/provision.sh
#   RUNS=3 (golden and none), FULL_RUNS=1, SNAP_RUNS=5, DATA_MIB=200,
#   GOLDEN=ALIAS (reuse an existing golden image; default: build one),
#   SANDBOXD_BIN (default: target/debug/sandboxd, built if missing),
#   IMAGE=test/debian-ssh, APT_PROXY=http://198.18.0.1:3142.
# Needs: incus (.ci/setup-incus.sh), the package cache
# (.ci/setup-provision.sh), btrfs-progs (.ci/setup-host.sh), openssh-client,
# python3. About 10-15 minutes with the defaults (the full provisioning and
# the image build dominate).
set -euo pipefail

RUNS=${RUNS:-3}
FULL_RUNS=${FULL_RUNS:-1}
SNAP_RUNS=${SNAP_RUNS:-5}
DATA_MIB=${DATA_MIB:-200}
IMAGE=${IMAGE:-test/debian-ssh}
APT_PROXY=${APT_PROXY:-http://198.18.0.1:3142}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${SANDBOXD_BIN:-$ROOT/target/debug/sandboxd}
TAG=b$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
WORK=$(mktemp -d /tmp/provision-bench.XXXXXX)
chmod 700 "$WORK"
SOCK=$WORK/run/admin.sock
DAEMON_PID=
BUILT_GOLDEN=
POOL=
SANDBOXES=()
INSTANCES=()

log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  log "cleaning up"
  if [ -n "$DAEMON_PID" ]; then
    for s in "${SANDBOXES[@]}"; do
      timeout 120 "$BIN" --admin-socket "$SOCK" delete "$s" >/dev/null 2>&1
    done
  fi
  for i in "${SANDBOXES[@]}" "${INSTANCES[@]}"; do
    if incus info "$i" >/dev/null 2>&1; then
      timeout 120 incus delete -f "$i" >/dev/null 2>&1
    fi
  done
  if [ -n "$DAEMON_PID" ]; then
    kill "$DAEMON_PID" 2>/dev/null
    wait "$DAEMON_PID" 2>/dev/null
  fi
  if [ -n "$BUILT_GOLDEN" ]; then
    timeout 120 incus image delete "$BUILT_GOLDEN" >/dev/null 2>&1
  fi
  if [ -n "$POOL" ]; then
    # Image volumes cached on the pool (an image kept after this run).
    local vol
    while read -r vol; do
      [ -n "$vol" ] && timeout 120 incus storage volume delete "$POOL" "image/$vol" >/dev/null 2>&1
    done < <(incus storage volume list "$POOL" type=image -f csv -c n 2>/dev/null)
    timeout 120 incus storage delete "$POOL" >/dev/null 2>&1 ||
      log "could not delete the pool $POOL"
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cli() { timeout "${CLI_TIMEOUT:-300}" "$BIN" --admin-socket "$SOCK" "$@"; }
now() { date +%s.%N; }
secs() { python3 -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.2f}")' "$1" "$2"; }
median() { python3 -c 'import sys, statistics; v=[float(x) for x in sys.argv[1:]]; print(f"{statistics.median(v):.2f}" if v else "n/a")' "$@"; }
ratio() { python3 -c 'import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f"{a / b:.1f}x" if b > 0 else "n/a")' "$1" "$2"; }

if [ ! -x "$BIN" ]; then
  log "building sandboxd (debug)"
  (cd "$ROOT" && cargo build --quiet --bin sandboxd)
fi
incus info >/dev/null
ssh-keygen -q -t ed25519 -N '' -C bench -f "$WORK/client"
# A stand-in agent (a Node.js HTTP server on the agent port, like
# tests/golden.rs): the daemon checks that the agent answers.
cat >"$WORK/agent-install.sh" <<'SH'
#!/bin/sh
set -e
cat >/usr/local/lib/bench-agent.js <<'JS'
require('http').createServer((q, r) => r.end('bench agent\n'))
  .listen(Number(process.env.SANDBOXD_AGENT_PORT || 9999));
JS
SH

# The private daemon: stand-in agent (the real one is built from sources on
# the internet), the host package cache for apt.
GOLDEN_ALIAS=${GOLDEN:-bench/golden-$TAG}
cat >"$WORK/sandboxd.toml" <<EOF
default_image = "$IMAGE"
[provision]
mode = "auto"
apt_proxy = "$APT_PROXY"
agent = "command"
agent_command = "/usr/bin/node /usr/local/lib/bench-agent.js"
agent_install = "$WORK/agent-install.sh"
golden_alias = "$GOLDEN_ALIAS"
EOF
mkdir -p "$WORK/run"
"$BIN" serve --state-dir "$WORK/state" --admin-socket "$SOCK" \
  --ssh-listen 127.0.0.1:0 --https-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
  --config "$WORK/sandboxd.toml" >"$WORK/daemon.log" 2>&1 </dev/null &
DAEMON_PID=$!
for _ in $(seq 200); do
  if [ -S "$SOCK" ] && cli status --json >/dev/null 2>&1; then break; fi
  kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$WORK/daemon.log" >&2; exit 1; }
  sleep 0.1
done
SSH_PORT=$(cli status --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["ssh_listen"][0].rsplit(":", 1)[1])')
cli host-key | while read -r alg b64 _; do
  printf '[127.0.0.1]:%s %s %s\n' "$SSH_PORT" "$alg" "$b64"
done >"$WORK/known_hosts"
log "daemon PID $DAEMON_PID, SSH router on 127.0.0.1:$SSH_PORT"

ssh_ok() {
  timeout 15 ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=yes \
    -o IdentitiesOnly=yes -o ConnectTimeout=10 -o "UserKnownHostsFile=$WORK/known_hosts" \
    -i "$WORK/client" -p "$SSH_PORT" "$1@127.0.0.1" true </dev/null >/dev/null 2>&1
}

# One create → SSH-ready; prints "returned ready" seconds.
create_run() {
  local name=$1; shift
  local t0 t1 t2
  t0=$(now)
  if ! CLI_TIMEOUT=1200 cli create "$name" --domain "$name.test" --ssh-key "$WORK/client.pub" "$@" \
    >"$WORK/$name.out" 2>"$WORK/$name.err"; then
    log "create $name failed:"; tail -20 "$WORK/$name.err" >&2; return 1
  fi
  t1=$(now)
  local deadline=$((SECONDS + 120))
  until ssh_ok "$name"; do
    [ "$SECONDS" -lt "$deadline" ] || { log "$name: no SSH after 120 s"; return 1; }
    sleep 0.05
  done
  t2=$(now)
  echo "$(secs "$t0" "$t1") $(secs "$t0" "$t2")"
  # Free the machine for the next run.
  timeout 120 "$BIN" --admin-socket "$SOCK" delete "$name" >/dev/null 2>&1 || true
}

BUILD_SECS=
if [ -z "${GOLDEN:-}" ]; then
  log "building the golden image $GOLDEN_ALIAS from $IMAGE"
  t0=$(now)
  BUILT_GOLDEN=$GOLDEN_ALIAS
  CLI_TIMEOUT=1200 cli image build --base "$IMAGE" --alias "$GOLDEN_ALIAS" >/dev/null 2>"$WORK/build.err" ||
    { tail -20 "$WORK/build.err" >&2; exit 1; }
  BUILD_SECS=$(secs "$t0" "$(now)")
  log "golden image built in $BUILD_SECS s"
fi

declare -A RET READY
for kind in golden none full; do
  n=$RUNS
  [ "$kind" = full ] && n=$FULL_RUNS
  RET[$kind]=
  READY[$kind]=
  for i in $(seq "$n"); do
    name=$TAG-$kind-$i
    case $kind in
      golden) args=(--image "$GOLDEN_ALIAS") ;;
      none) args=(--image "$IMAGE" --provision none) ;;
      full) args=(--image "$IMAGE" --provision full) ;;
    esac
    log "create $name (${args[*]})"
    SANDBOXES+=("$name")
    out=$(create_run "$name" "${args[@]}")
    read -r r s <<<"$out"
    log "  create returned after $r s, SSH-ready after $s s"
    RET[$kind]+="$r "
    READY[$kind]+="$s "
  done
done

# Snapshots: dir (the default pool) vs a loop-backed btrfs pool.
POOL=bench-btrfs-$TAG
log "creating the loop-backed btrfs pool $POOL"
incus storage create "$POOL" btrfs size=6GiB >/dev/null
declare -A SCREATE SRESTORE
for pool in default "$POOL"; do
  kind=dir
  [ "$pool" = "$POOL" ] && kind=btrfs
  inst=$TAG-snap-$kind
  INSTANCES+=("$inst")
  log "container $inst from $GOLDEN_ALIAS on pool $pool, $DATA_MIB MiB of data"
  timeout 300 incus init "$GOLDEN_ALIAS" "$inst" --storage "$pool" >/dev/null
  timeout 120 incus start "$inst"
  timeout 300 incus exec "$inst" -- sh -c \
    "head -c ${DATA_MIB}M /dev/urandom >/var/tmp/bench-data && sync"
  CLI_TIMEOUT=300 cli import "$inst" --domain "$inst.test" --ssh-key "$WORK/client.pub" \
    >/dev/null 2>"$WORK/$inst.err" || { tail -20 "$WORK/$inst.err" >&2; exit 1; }
  SANDBOXES+=("$inst")
  SCREATE[$kind]=
  SRESTORE[$kind]=
  for i in $(seq "$SNAP_RUNS"); do
    t0=$(now)
    cli snapshot create "$inst" "s$i" >/dev/null 2>"$WORK/snap.err" || { cat "$WORK/snap.err" >&2; exit 1; }
    c=$(secs "$t0" "$(now)")
    # Change the data so every restore has something to undo.
    timeout 60 incus exec "$inst" -- sh -c 'head -c 16M /dev/urandom >/var/tmp/bench-change && sync'
    t0=$(now)
    cli snapshot restore "$inst" "s$i" >/dev/null 2>"$WORK/snap.err" || { cat "$WORK/snap.err" >&2; exit 1; }
    r=$(secs "$t0" "$(now)")
    log "  $kind run $i: snapshot create $c s, restore $r s"
    SCREATE[$kind]+="$c "
    SRESTORE[$kind]+="$r "
  done
  if ! ssh_ok "$inst"; then log "$inst: no SSH after the restores"; exit 1; fi
  timeout 120 "$BIN" --admin-socket "$SOCK" delete "$inst" >/dev/null 2>&1 || true
done

# shellcheck disable=SC2086 # the run lists are space-separated numbers
{
  g=$(median ${READY[golden]}); f=$(median ${READY[full]}); z=$(median ${READY[none]})
  gr=$(median ${RET[golden]}); fr=$(median ${RET[full]}); zr=$(median ${RET[none]})
  echo
  echo "Provisioning and snapshots — $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  echo "| create → SSH-ready (median) | golden image | full provisioning | none (floor) | full / golden |"
  echo "|---|---|---|---|---|"
  echo "| runs | $RUNS | $FULL_RUNS | $RUNS | |"
  echo "| \`create\` returned | $gr s | $fr s | $zr s | $(ratio "$fr" "$gr") |"
  echo "| \`ssh NAME@127.0.0.1 true\` succeeded | $g s | $f s | $z s | $(ratio "$f" "$g") |"
  echo "| all runs, SSH-ready (s) | ${READY[golden]}| ${READY[full]}| ${READY[none]}| |"
  [ -n "$BUILD_SECS" ] && echo "| golden image build (once) | $BUILD_SECS s | | | |"
  echo
  dc=$(median ${SCREATE[dir]}); bc=$(median ${SCREATE[btrfs]})
  dr=$(median ${SRESTORE[dir]}); br=$(median ${SRESTORE[btrfs]})
  echo "| snapshot, $DATA_MIB MiB written, median of $SNAP_RUNS | dir | btrfs (loop) | dir / btrfs |"
  echo "|---|---|---|---|"
  echo "| \`snapshot create\` | $dc s | $bc s | $(ratio "$dc" "$bc") |"
  echo "| \`snapshot restore\` (stop, restore, start) | $dr s | $br s | $(ratio "$dr" "$br") |"
  echo "| all runs, create (s) | ${SCREATE[dir]}| ${SCREATE[btrfs]}| |"
  echo "| all runs, restore (s) | ${SRESTORE[dir]}| ${SRESTORE[btrfs]}| |"
}
