"""Drive a headless Chromium over the DevTools protocol (python3-websockets).

Usage: cdp.py CHROMIUM_ARGS_JSON STEPS_JSON
STEPS_JSON is a list of {"url": URL, "eval": JS}: each step loads URL in a
fresh tab, waits for its load event, evaluates JS (awaiting the promise it
returns) and records the value. Prints one JSON list of the values.
Bounded: every wait has a deadline; Chromium is killed at the end.
"""
import asyncio, json, os, shutil, subprocess, sys, tempfile, time

import websockets


async def main():
    extra = json.loads(sys.argv[1])
    steps = json.loads(sys.argv[2])
    profile = tempfile.mkdtemp(prefix="cdp-profile-")
    proc = subprocess.Popen(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync",
         "--user-data-dir=" + profile, "--remote-debugging-port=0"] + extra
        + ["about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = os.path.join(profile, "DevToolsActivePort")
        deadline = time.time() + 30
        while not (os.path.exists(port_file) and len(open(port_file).read().split("\n")) >= 2
                   and open(port_file).read().split("\n")[1]):
            if time.time() > deadline or proc.poll() is not None:
                raise SystemExit("chromium did not start")
            await asyncio.sleep(0.05)
        port, path = open(port_file).read().split("\n")[:2]
        async with websockets.connect("ws://127.0.0.1:%s%s" % (port, path),
                                      max_size=None) as ws:
            ids = iter(range(1, 1 << 30))
            events = []

            async def call(method, params=None, session=None, timeout=20):
                i = next(ids)
                msg = {"id": i, "method": method, "params": params or {}}
                if session:
                    msg["sessionId"] = session
                await ws.send(json.dumps(msg))
                end = time.time() + timeout
                while True:
                    left = end - time.time()
                    if left <= 0:
                        raise SystemExit("timeout waiting for " + method)
                    m = json.loads(await asyncio.wait_for(ws.recv(), left))
                    if m.get("id") == i:
                        if "error" in m:
                            raise SystemExit("%s: %s" % (method, m["error"]))
                        return m["result"]
                    events.append(m)

            async def event(name, session, timeout=20):
                end = time.time() + timeout
                while True:
                    for k, m in enumerate(events):
                        if m.get("method") == name and m.get("sessionId") == session:
                            del events[k]
                            return m
                    left = end - time.time()
                    if left <= 0:
                        raise SystemExit("timeout waiting for " + name)
                    events.append(json.loads(await asyncio.wait_for(ws.recv(), left)))

            out = []
            for step in steps:
                t = await call("Target.createTarget", {"url": "about:blank"})
                s = (await call("Target.attachToTarget",
                                {"targetId": t["targetId"], "flatten": True}))["sessionId"]
                await call("Page.enable", session=s)
                await call("Page.navigate", {"url": step["url"]}, session=s)
                await event("Page.loadEventFired", s)
                r = await call("Runtime.evaluate", {"expression": step["eval"],
                               "awaitPromise": True, "returnByValue": True},
                               session=s, timeout=30)
                out.append(r["result"].get("value", r.get("exceptionDetails")))
                await call("Target.closeTarget", {"targetId": t["targetId"]})
            print(json.dumps(out), flush=True)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


asyncio.run(main())
