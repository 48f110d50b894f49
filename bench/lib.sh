# shellcheck shell=bash
# Shared setup of the benchmark scripts (sourced, not run): a work
# directory removed at exit with every process started in PIDS, free
# loopback ports, waiting for a port, tool checks, a private /etc/hosts,
# an nginx serving static files, and a sandboxd daemon on temporary state.
#
#   . "$(dirname "$0")/lib.sh"            (bench/*.sh)
#   . "$(dirname "$0")/../lib.sh"         (bench/abuse/*.sh)

# Processes to stop at exit (each script appends with `& PIDS+=($!)`).
PIDS=()

bench_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -z "${WORK:-}" ] || rm -rf "$WORK"
}

# bench_workdir NAME: WORK=/tmp/NAME.XXXXXX, removed (with PIDS stopped) at exit.
bench_workdir() {
  WORK=$(mktemp -d "/tmp/$1.XXXXXX")
  trap bench_cleanup EXIT
}

# need_tools HINT TOOL...: exits with "missing TOOL (HINT)" if one is absent.
need_tools() {
  local hint=$1 tool
  shift
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "missing $tool ($hint)" >&2; exit 1; }
  done
}

# release_sandboxd ROOT: builds the release daemon and prints its path.
release_sandboxd() {
  echo "building sandboxd (release)..." >&2
  (cd "$1" && cargo build --quiet --release --bin sandboxd)
  echo "$1/target/release/sandboxd"
}

# free_ports N: N loopback ports free right now, on one line.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
ss = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])
PY
}

free_port() { free_ports 1; }

# wait_port PORT: until something accepts on 127.0.0.1:PORT (10 s at most).
wait_port() {
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "port $1 never opened" >&2; return 1
}

# ns_hosts NAME...: a hosts file mapping NAMEs to 127.0.0.1 for in_ns.
ns_hosts() {
  printf '127.0.0.1 localhost\n127.0.0.1 %s\n' "$*" > "$WORK/hosts"
}

# in_ns CMD...: runs CMD in a private mount namespace whose /etc/hosts is
# ns_hosts' file (root; the machine's own /etc/hosts is untouched).
# shellcheck disable=SC2016 # $0 and $@ expand in the inner shell
in_ns() { unshare -m sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$WORK/hosts" "$@"; }

# nginx_static FILE LISTEN...: an nginx config serving $WORK/www on
# 127.0.0.1:LISTEN (one worker, keep-alive without limit, no access log).
nginx_static() {
  local file=$1 listen="" port
  shift
  for port in "$@"; do listen="$listen listen 127.0.0.1:$port;"; done
  mkdir -p "$WORK/www" "$WORK/tmp"
  cat > "$file" <<CONF
worker_processes 1;
daemon off;
pid $file.pid;
error_log $file.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/tmp; proxy_temp_path $WORK/tmp; fastcgi_temp_path $WORK/tmp;
  uwsgi_temp_path $WORK/tmp; scgi_temp_path $WORK/tmp;
  keepalive_requests 1000000;
  server {$listen root $WORK/www; }
}
CONF
}

# sbx_serve BIN DIR HTTPS_PORT LOG [SERVE_ARG...]: `BIN serve` with its
# state and admin socket (DIR/admin.sock) in DIR (0700), HTTPS on
# 127.0.0.1:HTTPS_PORT, SSH and HTTP on free ports, internal-CA
# certificates, stderr to LOG; waits (10 s at most) until `status` answers.
# Sets SBX_PID.
# shellcheck disable=SC2034 # SBX_PID is for the callers
sbx_serve() {
  local bin=$1 dir=$2 port=$3 log=$4
  shift 4
  mkdir -m 700 "$dir"
  "$bin" serve --state-dir "$dir/state" --admin-socket "$dir/admin.sock" \
    --ssh-listen 127.0.0.1:0 --https-listen "127.0.0.1:$port" --http-listen 127.0.0.1:0 \
    --tls-mode internal "$@" 2>"$log" & PIDS+=($!); SBX_PID=$!
  for _ in $(seq 1 100); do
    "$bin" --admin-socket "$dir/admin.sock" status >/dev/null 2>&1 && break
    sleep 0.1
  done
}
