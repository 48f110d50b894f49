//! Websocket peers made with python3-websockets: an echo server on a free
//! loopback port, and a client through a TLS gate with basic-auth
//! credentials and no Origin (not a browser).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{ChildStdout, Command, Stdio};

use crate::{free_port, wait_port, Proc};

/// A websocket echo server on a free loopback port, stopped on drop.
pub struct WsEcho {
    pub port: u16,
    _child: Proc,
}

/// Starts a [`WsEcho`] and waits until it accepts.
pub fn echo_server() -> WsEcho {
    let port = free_port();
    let script = r#"
import asyncio, sys, websockets
async def echo(ws, path=None):
    async for m in ws:
        await ws.send(m)
async def main():
    async with websockets.serve(echo, "127.0.0.1", int(sys.argv[1])):
        await asyncio.Future()
asyncio.run(main())
"#;
    let child = Command::new("/usr/bin/python3")
        .args(["-c", script, &port.to_string()])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let echo = WsEcho {
        port,
        _child: Proc(child),
    };
    wait_port(port);
    echo
}

/// A websocket client to `wss://HOST:PORT/ws` (connecting to 127.0.0.1,
/// trusting `ca`), with basic auth `cred` (`user:password`). It sends `hi`
/// and prints `open hi` once the echo came back, then `closed` when the
/// connection ends, or `still-open again` after a line on its stdin
/// ([`WsClient::state`]).
pub struct WsClient {
    child: Proc,
    out: std::io::Lines<BufReader<ChildStdout>>,
}

impl WsClient {
    /// Starts the client; it gives up after `limit_secs` (then prints
    /// nothing more), so a client left open is bounded.
    pub fn start(port: u16, ca: &Path, host: &str, cred: &str, limit_secs: u32) -> WsClient {
        let script = r#"
import asyncio, base64, socket, ssl, sys, websockets
async def main():
    port, ca, host, cred = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    ctx = ssl.create_default_context(cafile=ca)
    sock = socket.create_connection(("127.0.0.1", int(port)))
    auth = "Basic " + base64.b64encode(cred.encode()).decode()
    async with websockets.connect("wss://%s:%s/ws" % (host, port), ssl=ctx, sock=sock,
            server_hostname=host, extra_headers={"Authorization": auth}) as ws:
        await ws.send("hi")
        print("open " + await ws.recv(), flush=True)
        line = asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        closed = asyncio.ensure_future(ws.wait_closed())
        done, _ = await asyncio.wait([line, closed], return_when=asyncio.FIRST_COMPLETED)
        if closed in done:
            print("closed", flush=True)
            return
        await ws.send("again")
        print("still-open " + await ws.recv(), flush=True)
asyncio.run(main())
"#;
        let mut child = Command::new("timeout")
            .arg(limit_secs.to_string())
            .args(["/usr/bin/python3", "-c", script])
            .arg(port.to_string())
            .arg(ca)
            .arg(host)
            .arg(cred)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap()).lines();
        WsClient {
            child: Proc(child),
            out,
        }
    }

    /// The client's next line ("" once it ended).
    pub fn line(&mut self) -> String {
        self.out.next().map(|l| l.unwrap()).unwrap_or_default()
    }

    /// Asks whether the connection is still open: `closed` or
    /// `still-open again`.
    pub fn state(&mut self) -> String {
        if let Some(mut stdin) = self.child.0.stdin.take() {
            // The client may have ended already: a broken pipe is an answer too.
            let _ = stdin.write_all(b"check\n");
            let _ = stdin.flush();
        }
        self.line()
    }
}
