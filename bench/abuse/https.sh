#!/usr/bin/env bash
# Per-source connection cap of the HTTPS gate, measured: while one address
# (127.0.0.1) holds N stalled connections, how fast does another address
# (127.0.0.2) get a page, against the same fetches with nobody attacking, and
# how many of the attacker's connections did the gate accept?
#
# Loopback only, bounded (about half a minute). The real sandboxd daemon
# (release build, temporary state directory, internal-CA certificate, one
# route added with `sandboxd add`, `[http] max_connections = MAX_CONNECTIONS`
# so that without a per-source cap one address could fill it) in front of a
# small Python upstream. Stalled connections come in three kinds: bare TCP
# (nothing sent), TLS done and nothing sent (ALPN http/1.1), and HTTP/2 with
# no preface (ALPN h2); "mixed" is a third of each. Each probe is a new TLS
# connection from 127.0.0.2 and one GET (Python's ssl, SNI bench.test).
#
# Usage: bench/abuse/https.sh   (N=300 stalled connections, PROBES=200,
#                                MAX_CONNECTIONS=300 by default;
#                                PER_SOURCE=n sets max_connections_per_source,
#                                0 = no cap, as before the cap existed;
#                                SBX=path/to/sandboxd skips the release build)
# Needs: python3 openssl ssh-keygen (no root).
set -euo pipefail

N=${N:-300}
PROBES=${PROBES:-200}
MAX_CONNECTIONS=${MAX_CONNECTIONS:-300}
PER_SOURCE=${PER_SOURCE:-256}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
bench_workdir abuse-https

SBX=${SBX:-$(release_sandboxd "$ROOT")}

read -r UP GW < <(free_ports 2)
HOST=bench.test

mkdir -p "$WORK/www"
printf 'hello\n' > "$WORK/www/small"
python3 -m http.server --bind 127.0.0.1 --directory "$WORK/www" "$UP" \
  >/dev/null 2>&1 & PIDS+=($!)

SOCK="$WORK/sbx/admin.sock"
printf '[http]\nmax_connections = %s\nmax_connections_per_source = %s\n' \
  "$MAX_CONNECTIONS" "$PER_SOURCE" > "$WORK/sandboxd.toml"
RUST_LOG=warn sbx_serve "$SBX" "$WORK/sbx" "$GW" "$WORK/sandboxd.log" \
  --config "$WORK/sandboxd.toml"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/sbx/key" >/dev/null
"$SBX" --admin-socket "$SOCK" add bench --domain "$HOST" --upstream 127.0.0.1 \
  --app-port "$UP" --ssh-key "$WORK/sbx/key.pub" >/dev/null
"$SBX" --admin-socket "$SOCK" ca-cert > "$WORK/ca.pem"

cat > "$WORK/client.py" <<'PY'
import socket, ssl, sys, time

cmd, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
HOST = "bench.test"

def tls_ctx(alpn):
    c = ssl.create_default_context(cafile=ca)
    c.set_alpn_protocols([alpn])
    return c

def connect(src):
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s

def still_open(s):
    # A connection the gate closed reads end of file (or an error) at once.
    try:
        s.setblocking(False)
        data = s.recv(1, socket.MSG_PEEK) if not isinstance(s, ssl.SSLSocket) else s.recv(1)
        return data != b""
    except (BlockingIOError, ssl.SSLWantReadError):
        return True
    except OSError:
        return False

if cmd == "hold":
    kind, n = sys.argv[4], int(sys.argv[5])
    kinds = {"tcp": ["tcp"], "tls": ["tls"], "h2": ["h2"], "mixed": ["tls", "h2", "tcp"]}[kind]
    held = []
    for i in range(n):
        k = kinds[i % len(kinds)]
        try:
            s = connect("127.0.0.1")
            if k != "tcp":
                s = tls_ctx("http/1.1" if k == "tls" else "h2").wrap_socket(s, server_hostname=HOST)
            held.append(s)
        except (OSError, ssl.SSLError):
            pass
    time.sleep(1)
    accepted = sum(1 for s in held if still_open(s))
    print(accepted, flush=True)
    sys.stdin.read()  # hold until the caller closes stdin
elif cmd == "probe":
    n = int(sys.argv[4])
    ctx = tls_ctx("http/1.1")
    times, fails = [], 0
    req = ("GET /small HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % HOST).encode()
    for _ in range(n):
        t = time.perf_counter()
        try:
            s = ctx.wrap_socket(connect("127.0.0.2"), server_hostname=HOST)
            s.sendall(req)
            got = b""
            while True:
                b = s.recv(4096)
                if not b:
                    break
                got += b
            s.close()
            if not got.startswith(b"HTTP/1.1 200"):
                fails += 1
                continue
            times.append((time.perf_counter() - t) * 1000)
        except (OSError, ssl.SSLError):
            fails += 1
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] if times else float("nan")
    print("%.2f %.2f %d" % (pick(0.5), pick(0.99), fails))
PY

probe() { python3 "$WORK/client.py" probe "$GW" "$WORK/ca.pem" "$PROBES"; }

# Warm-up (certificate, upstream connection pool), then the unloaded figures.
probe >/dev/null
read -r BASE50 BASE99 BASEFAIL < <(probe)

printf '%-28s %9s %9s %9s %7s %9s\n' "attacker (127.0.0.1)" "accepted" "p50 ms" "p99 ms" "fails" "p99/base"
printf '%-28s %9s %9s %9s %7s %9s\n' "none" "-" "$BASE50" "$BASE99" "$BASEFAIL" "1.00"
for kind in tcp tls h2 mixed; do
  coproc HOLD { python3 "$WORK/client.py" hold "$GW" "$WORK/ca.pem" "$kind" "$N"; }
  read -r -t 60 ACCEPTED <&"${HOLD[0]}"
  read -r P50 P99 FAILS < <(probe)
  eval "exec ${HOLD[1]}>&-"
  wait "$HOLD_PID" 2>/dev/null || true
  RATIO=$(awk -v a="$P99" -v b="$BASE99" 'BEGIN { printf "%.2f", a / b }')
  printf '%-28s %9s %9s %9s %7s %9s\n' "$N stalled, $kind" "$ACCEPTED/$N" "$P50" "$P99" "$FAILS" "$RATIO"
  sleep 1  # the held connections are closed; the gate forgets them
done
echo "(max_connections = $MAX_CONNECTIONS, max_connections_per_source = $PER_SOURCE, at most half of"
echo " max_connections; $PROBES probes from 127.0.0.2, each a new TLS connection + GET)"
