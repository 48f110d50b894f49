"""A correct login's latency through the gateway, from a chosen loopback
source address: N requests with basic-auth credentials, either on one
keep-alive TLS connection or on a new connection each. Prints
"p50_ms p99_ms count" (only 200 answers count; any other status aborts).

Usage: login_probe.py SRC PORT HOST CAFILE USER:PASSWORD N keepalive|new
"""
import base64, socket, ssl, sys, time

src, port, host, cafile, cred, n, mode = sys.argv[1:8]
port, n = int(port), int(n)
ctx = ssl.create_default_context(cafile=cafile)
auth = base64.b64encode(cred.encode()).decode()
req = ("GET / HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Basic %s\r\n\r\n"
       % (host, port, auth)).encode()


def connect():
    s = socket.create_connection(("127.0.0.1", port), timeout=10,
                                 source_address=(src, 0))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ctx.wrap_socket(s, server_hostname=host)


def exchange(s, buf):
    s.sendall(req)
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            raise SystemExit("connection closed")
        buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(rest) < length:
        d = s.recv(65536)
        if not d:
            raise SystemExit("connection closed")
        rest += d
    if status != 200:
        raise SystemExit("status %d" % status)
    return rest[length:]


times = []
s = connect() if mode == "keepalive" else None
buf = b""
if s:
    buf = exchange(s, buf)  # warm-up (the login is verified once, then cached)
for _ in range(n):
    t0 = time.perf_counter()
    if mode == "keepalive":
        buf = exchange(s, buf)
    else:
        c = connect()
        exchange(c, b"")
        c.close()
    times.append((time.perf_counter() - t0) * 1000)
times.sort()
pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]
print("%.3f %.3f %d" % (pick(0.50), pick(0.99), len(times)))
