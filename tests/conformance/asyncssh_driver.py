#!/usr/bin/python3
"""The conformance matrix run with asyncssh (Debian's python3-asyncssh)
against one SSH target; prints {case: outcome} as one JSON object.

Usage: asyncssh_driver.py SPEC.json (see tests/conformance.rs, `PySpec`).
Every connection checks the target's host key against the spec's
known_hosts file (an unknown key is refused)."""
import asyncio
import hashlib
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
import asyncssh  # noqa: E402

SPEC = json.load(open(sys.argv[1]))


def connect(key="ed25519", known_hosts=None, sig_algs=(), agent=False):
    extra = {}
    if sig_algs:
        extra["signature_algs"] = list(sig_algs)
    return asyncssh.connect(
        SPEC["host"],
        port=SPEC["port"],
        username=SPEC["user"],
        client_keys=[SPEC["keys"][key]],
        known_hosts=known_hosts or SPEC["known_hosts"],
        agent_path=None if not agent else os.environ["SSH_AUTH_SOCK"],
        agent_forwarding=agent,
        config=[],
        connect_timeout=30,
        **extra,
    )


def show(r):
    sig = r.exit_signal[0] if r.exit_signal else None
    return "status=%s signal=%s out=%r err=%r" % (r.exit_status, sig, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace"))


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


async def run(c, cmd, stdin=b""):
    return await c.run(cmd, input=stdin, encoding=None, check=False)


async def echo_roundtrip(reader, writer, payload):
    writer.write(payload)
    got = await reader.readexactly(len(payload))
    writer.close()
    return got == payload


async def case(results, name, coro):
    try:
        results[name] = await coro()
    except Exception as e:  # the outcome is the failure, compared like any other
        results[name] = "error: %s: %s" % (type(e).__name__, e)


async def main():
    res = {}
    async with connect(agent=True) as c:
        async def exec_status():
            return tally([show(await run(c, "echo out; echo err >&2; exit 7")) for _ in range(SPEC["reps"])])

        await case(res, "exec-status", exec_status)
        await case(res, "close-then-exit", lambda: _show(run(c, "echo out; exec >&- 2>&-; sleep 1; exit 7")))
        await case(res, "signal-term", lambda: _show(run(c, "kill -TERM $$")))
        await case(res, "signal-kill", lambda: _show(run(c, "kill -KILL $$")))
        data = os.urandom(SPEC["stdin_mib"] << 20)

        async def stdin_case():
            r = await run(c, "sha256sum", data)
            return "status=%s match=%s" % (r.exit_status, r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest())

        await case(res, "stdin-eof", stdin_case)

        async def sftp_case():
            up = SPEC["remote_dir"] + "/asyncssh-up"
            down = SPEC["local_dir"] + "/asyncssh-down"
            async with c.start_sftp_client() as s:
                await s.put(SPEC["big"], up)
                ok_up = sha(up) == SPEC["big_sha"]
                os.remove(up)
                await s.get(SPEC["big"], down)
                ok_down = sha(down) == SPEC["big_sha"]
                os.remove(down)
            return "up=%s down=%s" % (ok_up, ok_down)

        await case(res, "sftp", sftp_case)

        async def local_forward():
            reader, writer = await c.open_connection("127.0.0.1", SPEC["echo_port"])
            return "echo=%s" % await echo_roundtrip(reader, writer, os.urandom(1 << 20))

        await case(res, "local-forward", local_forward)

        async def remote_forward():
            listener = await c.forward_remote_port("127.0.0.1", 0, "127.0.0.1", SPEC["echo_port"])
            port = listener.get_port()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            ok = await echo_roundtrip(reader, writer, os.urandom(1 << 20))
            listener.close()
            return "allocated=%s echo=%s" % (port > 0, ok)

        await case(res, "remote-forward-0", remote_forward)

        async def agent():
            r = await run(c, SPEC["agent_script"])
            return "status=%s\n%s" % (r.exit_status, r.stdout.decode(errors="replace"))

        await case(res, "agent", agent)

    async def login(key, sig_algs=()):
        async with connect(key, sig_algs=sig_algs) as k:
            r = await run(k, "echo in")
            return "status=%s out=%r" % (r.exit_status, r.stdout.decode())

    await case(res, "key-ed25519", lambda: login("ed25519"))
    await case(res, "key-ecdsa", lambda: login("ecdsa"))
    await case(res, "key-rsa-sha2-256", lambda: login("rsa", ["rsa-sha2-256", "ssh-ed25519"]))
    await case(res, "key-rsa-sha2-512", lambda: login("rsa", ["rsa-sha2-512", "ssh-ed25519"]))

    async def wrong_host_key():
        try:
            async with connect(known_hosts=SPEC["wrong_known_hosts"]):
                return "accepted"
        except asyncssh.HostKeyNotVerifiable:
            return "refused"

    await case(res, "wrong-host-key", wrong_host_key)
    json.dump(res, sys.stdout)


async def _show(coro):
    return show(await coro)


asyncio.run(main())
