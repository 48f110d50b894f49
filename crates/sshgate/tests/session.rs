//! Session channels through the gateway: exec, exit codes, stdout/stderr,
//! stdin to EOF, env, pty with modes and resize, signals, banner, and the
//! live-session registry (list, kill, a route edit mid-session).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;
use testsupport::{require, Component};

use common::*;

#[test]
fn exec_keeps_exit_code_stdout_and_stderr_apart() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let out = run(h.ssh().arg("echo out; echo err >&2; exit 7"));
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert!(text(&out.stderr).contains("err\n"));
    assert!(!text(&out.stderr).contains("out"));
    let out = run(h.ssh().arg("true"));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn exit_by_signal_looks_like_direct() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let via = run(h.ssh().arg("kill -TERM $$"));
    let direct = run(h.ssh_direct().arg("kill -TERM $$"));
    assert_eq!(via.status.code(), direct.status.code());
    assert_ne!(via.status.code(), Some(0));
}

#[test]
fn stdin_is_relayed_to_eof_both_ways() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let input = h.path("input");
    random_file(&input, 5 << 20);
    let data = std::fs::read(&input).unwrap();
    let mut child = h
        .ssh()
        .arg("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&data).unwrap();
        // dropping stdin sends EOF
    });
    let mut echoed = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut echoed)
        .unwrap();
    writer.join().unwrap();
    assert!(child.wait().unwrap().success());
    assert!(
        echoed == std::fs::read(&input).unwrap(),
        "echoed bytes differ"
    );

    let out = h
        .ssh()
        .arg("wc -c")
        .stdin(std::fs::File::open(&input).unwrap())
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), (5 << 20).to_string());
}

#[test]
fn env_is_passed() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let out = run(h
        .ssh()
        .args(["-o", "SetEnv=TESTVAR_A=hello-env"])
        .arg("echo \"$TESTVAR_A\""));
    assert_eq!(text(&out.stdout), "hello-env\n");
}

const PTY_DRIVER: &str = r#"
import os, pty, sys, struct, fcntl, termios, time, select
argv = sys.argv[1:]
master, slave = pty.openpty()
fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 40, 120, 0, 0))
attrs = termios.tcgetattr(slave)
attrs[6][termios.VERASE] = b'\x08'
termios.tcsetattr(slave, termios.TCSANOW, attrs)
pid = os.fork()
if pid == 0:
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    os.close(master)
    os.close(slave)
    os.environ['TERM'] = 'xterm-256color'
    os.execvp(argv[0], argv)
os.close(slave)
out = b''
def read_until(marker, limit=30):
    global out
    deadline = time.time() + limit
    while marker not in out:
        r, _, _ = select.select([master], [], [], max(0, deadline - time.time()))
        if not r:
            sys.stdout.buffer.write(out)
            sys.exit('timeout waiting for %r' % marker)
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
read_until(b'READY')
fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack('HHHH', 50, 132, 0, 0))
os.write(master, b'go\n')
read_until(b'DONE')
_, status = os.waitpid(pid, 0)
sys.stdout.buffer.write(out)
sys.exit(os.waitstatus_to_exitcode(status))
"#;

#[test]
fn pty_carries_size_modes_term_and_resize() {
    if !require(&[Component::Sshd, Component::Program("python3")]) {
        return;
    }
    let h = harness().start();
    let remote = "stty size; echo \"term=$TERM\"; stty -a | grep -o 'erase = [^;]*'; echo READY; \
                  read x; for i in $(seq 200); do [ \"$(stty size)\" = '50 132' ] && break; sleep 0.05; done; \
                  echo \"now $(stty size)\"; echo DONE";
    let mut ssh = h.ssh();
    ssh.arg("-tt").arg(remote);
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(PTY_DRIVER).arg("ssh");
    cmd.args(ssh.get_args());
    let out = cmd.output().unwrap();
    let o = text(&out.stdout);
    assert!(out.status.success(), "{o} {}", text(&out.stderr));
    assert!(o.contains("40 120"), "{o}");
    assert!(o.contains("term=xterm-256color"), "{o}");
    assert!(o.contains("erase = ^H"), "{o}");
    assert!(o.contains("now 50 132"), "{o}");
}

#[test]
fn banner_is_shown_before_login() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().banner("Welcome to the sandbox gateway\n").start();
    let out = run(h.ssh().arg("true"));
    assert!(out.status.success());
    assert!(text(&out.stderr).contains("Welcome to the sandbox gateway"));
}

#[test]
fn sessions_are_listed_and_can_be_killed() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let mut child = h
        .ssh()
        .arg("echo started; sleep 60")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "started\n");
    let sessions = h.wait_sessions(1);
    let s = &sessions[0];
    assert_eq!(s.sandbox, h.sandbox);
    assert!(s.client_addr.starts_with("127.0.0.1:"));
    let fp = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(h.keys[0].with_extension("pub"))
        .output()
        .unwrap();
    assert!(
        text(&fp.stdout).contains(&s.key_fingerprint),
        "{}",
        s.key_fingerprint
    );
    assert!(s.bytes_down >= 8);
    let json = serde_json::to_value(s).unwrap();
    assert_eq!(json["sandbox"], h.sandbox.as_str());

    assert!(h.gateway.kill(s.id));
    let status = child.wait().unwrap();
    assert!(!status.success());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("terminated by the administrator"), "{err}");
    h.wait_sessions(0);
    assert!(!h.gateway.kill(s.id));
}

#[test]
fn a_route_edit_that_revokes_nothing_leaves_open_sessions_alone() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().client_keys(2).start();
    let mut child = h
        .ssh()
        .arg("read x; echo \"got:$x\"")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    h.wait_sessions(1);
    // Another key is authorized and the upstream user changes: the open
    // session keeps its key and its route.
    let mut route = h.routes.get(&h.sandbox);
    route.authorized_keys.push(read_pub(&h.keys[1]));
    route.user = "nobody-else".into();
    h.routes.set(route);
    assert_eq!(h.gateway.routes_changed(), 0);
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "got:hello\n");
}

#[test]
fn idle_session_is_not_cut_and_keepalives_flow() {
    if !require(&[Component::Sshd]) {
        return;
    }
    // Keepalives every 200 ms from both ends of the client leg; an idle
    // session of 2 s must survive them.
    let h = harness()
        .config(|c| c.keepalive_interval = Some(Duration::from_millis(200)))
        .start();
    let out = run(h
        .ssh()
        .args(["-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=2"])
        .arg("sleep 2.5; echo still-here"));
    assert_eq!(text(&out.stdout), "still-here\n", "{}", text(&out.stderr));
}
