#!/usr/bin/python3
"""The conformance matrix run with paramiko (Debian's python3-paramiko)
against one SSH target; prints {case: outcome} as one JSON object.

Usage: paramiko_driver.py SPEC.json (see tests/conformance.rs, `PySpec`).
Every connection checks the target's host key against the spec's
known_hosts file (RejectPolicy: an unknown key is refused)."""
import hashlib
import json
import os
import socket
import sys
import threading
import warnings

warnings.filterwarnings("ignore")
import paramiko  # noqa: E402
from paramiko.agent import AgentRequestHandler  # noqa: E402

SPEC = json.load(open(sys.argv[1]))


def connect(key="ed25519", known_hosts=None, disabled=None):
    c = paramiko.SSHClient()
    c.load_host_keys(known_hosts or SPEC["known_hosts"])
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    c.connect(
        SPEC["host"],
        port=SPEC["port"],
        username=SPEC["user"],
        key_filename=SPEC["keys"][key],
        look_for_keys=False,
        allow_agent=False,
        timeout=30,
        banner_timeout=30,
        auth_timeout=30,
        disabled_algorithms=disabled or {},
    )
    return c


def run(c, cmd, stdin=b"", agent=False):
    """(status, stdout, stderr) of `cmd` on a fresh session channel."""
    ch = c.get_transport().open_session()
    if agent:
        AgentRequestHandler(ch)
    ch.exec_command(cmd)

    def feed():
        if stdin:
            ch.sendall(stdin)
        ch.shutdown_write()

    t = threading.Thread(target=feed)
    t.start()
    err = {}

    def drain_err():
        err["v"] = ch.makefile_stderr("rb").read()

    e = threading.Thread(target=drain_err)
    e.start()
    out = ch.makefile("rb").read()
    e.join()
    t.join()
    status = ch.recv_exit_status()
    ch.close()
    return status, out, err["v"]


def show(status, out, err):
    return "status=%d out=%r err=%r" % (status, out.decode(errors="replace"), err.decode(errors="replace"))


def tally(results):
    counts = {}
    for r in results:
        counts[r] = counts.get(r, 0) + 1
    return "; ".join("%d x %s" % (n, r) for r, n in sorted(counts.items()))


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def echo_roundtrip(sock, payload):
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got == payload


def case(results, name, fn):
    try:
        results[name] = fn()
    except Exception as e:  # the outcome is the failure, compared like any other
        results[name] = "error: %s: %s" % (type(e).__name__, e)


def main():
    res = {}
    c = connect()
    case(res, "exec-status", lambda: tally(
        show(*run(c, "echo out; echo err >&2; exit 7")) for _ in range(SPEC["reps"])))
    case(res, "close-then-exit", lambda: show(*run(c, "echo out; exec >&- 2>&-; sleep 1; exit 7")))
    case(res, "signal-term", lambda: show(*run(c, "kill -TERM $$")))
    case(res, "signal-kill", lambda: show(*run(c, "kill -KILL $$")))
    data = os.urandom(SPEC["stdin_mib"] << 20)

    def stdin_case():
        status, out, _ = run(c, "sha256sum", data)
        return "status=%d match=%s" % (status, out.split()[0].decode() == hashlib.sha256(data).hexdigest())

    case(res, "stdin-eof", stdin_case)

    def sftp_case():
        s = c.open_sftp()
        up = SPEC["remote_dir"] + "/paramiko-up"
        down = SPEC["local_dir"] + "/paramiko-down"
        s.put(SPEC["big"], up)
        ok_up = sha(up) == SPEC["big_sha"]
        os.remove(up)
        s.get(SPEC["big"], down)
        ok_down = sha(down) == SPEC["big_sha"]
        os.remove(down)
        s.close()
        return "up=%s down=%s" % (ok_up, ok_down)

    case(res, "sftp", sftp_case)

    def local_forward():
        ch = c.get_transport().open_channel(
            "direct-tcpip", ("127.0.0.1", SPEC["echo_port"]), ("127.0.0.1", 0))
        ok = echo_roundtrip(ch, os.urandom(1 << 20))
        ch.close()
        return "echo=%s" % ok

    case(res, "local-forward", local_forward)

    def remote_forward():
        t = c.get_transport()
        got = {}

        def handler(ch, origin, server):
            # Joins the forwarded channel to the client-side target.
            tgt = socket.create_connection(("127.0.0.1", SPEC["echo_port"]))

            def pump(a_recv, b_send, done):
                while True:
                    d = a_recv(65536)
                    if not d:
                        break
                    b_send(d)
                done()

            threading.Thread(target=pump, args=(ch.recv, tgt.sendall, lambda: tgt.shutdown(socket.SHUT_WR)), daemon=True).start()
            threading.Thread(target=pump, args=(tgt.recv, ch.sendall, ch.shutdown_write), daemon=True).start()
            got["n"] = got.get("n", 0) + 1

        port = t.request_port_forward("127.0.0.1", 0, handler)
        if not port:
            return "allocated=none"
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        ok = echo_roundtrip(s, os.urandom(1 << 20))
        s.close()
        t.cancel_port_forward("127.0.0.1", port)
        return "allocated=%s echo=%s" % (port > 0, ok)

    case(res, "remote-forward-0", remote_forward)

    def agent():
        status, out, _ = run(c, SPEC["agent_script"], agent=True)
        return "status=%d\n%s" % (status, out.decode(errors="replace"))

    case(res, "agent", agent)
    c.close()

    def login(key, disabled=None):
        k = connect(key, disabled=disabled)
        status, out, _ = run(k, "echo in")
        k.close()
        return "status=%d out=%r" % (status, out.decode())

    case(res, "key-ed25519", lambda: login("ed25519"))
    case(res, "key-ecdsa", lambda: login("ecdsa"))
    case(res, "key-rsa-sha2-256", lambda: login("rsa", {"pubkeys": ["rsa-sha2-512", "ssh-rsa"]}))
    case(res, "key-rsa-sha2-512", lambda: login("rsa", {"pubkeys": ["rsa-sha2-256", "ssh-rsa"]}))

    def wrong_host_key():
        try:
            connect(known_hosts=SPEC["wrong_known_hosts"]).close()
            return "accepted"
        except paramiko.SSHException:
            return "refused"

    case(res, "wrong-host-key", wrong_host_key)
    json.dump(res, sys.stdout)


main()
