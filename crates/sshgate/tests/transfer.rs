//! File transfer through the gateway with the real clients: scp (SFTP and
//! legacy protocol) and sftp of 64 MiB of random data both ways, and rsync.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use testsupport::{require, Component};

use common::*;

const SIZE: usize = 64 << 20;

#[test]
fn scp_64_mib_both_ways_in_both_protocols() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let src = h.path("src.bin");
    random_file(&src, SIZE);
    for legacy in [false, true] {
        let up = h.path(&format!("up-{legacy}.bin"));
        let down = h.path(&format!("down-{legacy}.bin"));
        let mut c = h.scp();
        if legacy {
            c.arg("-O");
        }
        let out = run(c.arg(&src).arg(h.dest(&up)));
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(same_file(&src, &up), "upload differs (legacy={legacy})");
        let mut c = h.scp();
        if legacy {
            c.arg("-O");
        }
        let out = run(c.arg(h.dest(&up)).arg(&down));
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(same_file(&src, &down), "download differs (legacy={legacy})");
    }
}

#[test]
fn sftp_64_mib_both_ways() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let src = h.path("src.bin");
    random_file(&src, SIZE);
    let up = h.path("up.bin");
    let down = h.path("down.bin");
    let batch = h.path("batch");
    std::fs::write(
        &batch,
        format!(
            "put {} {}\nget {} {}\n",
            src.display(),
            up.display(),
            up.display(),
            down.display()
        ),
    )
    .unwrap();
    let out = run(h
        .sftp()
        .arg("-b")
        .arg(&batch)
        .arg(format!("{}@127.0.0.1", h.sandbox)));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(same_file(&src, &up));
    assert!(same_file(&src, &down));
}

#[test]
fn rsync_copies_a_tree_and_then_only_changes() {
    if !require(&[Component::Sshd, Component::Program("rsync")]) {
        return;
    }
    let h = harness().start();
    let src = h.path("tree");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    random_file(&src.join("a.bin"), 3 << 20);
    random_file(&src.join("sub/b.bin"), 100_000);
    std::fs::write(src.join("sub/c.txt"), "hello\n").unwrap();
    let dst = h.path("copy");
    let rsync = |h: &Harness| {
        let mut c = Command::new("rsync");
        c.arg("-a")
            .arg("--stats")
            .arg("-e")
            .arg(h.rsh())
            .arg(format!("{}/", src.display()))
            .arg(h.dest(&dst));
        run(&mut c)
    };
    let out = rsync(&h);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(same_file(&src.join("a.bin"), &dst.join("a.bin")));
    assert!(same_file(&src.join("sub/b.bin"), &dst.join("sub/b.bin")));
    assert_eq!(
        std::fs::read_to_string(dst.join("sub/c.txt")).unwrap(),
        "hello\n"
    );
    std::fs::write(src.join("sub/c.txt"), "changed\n").unwrap();
    let out = rsync(&h);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("Number of regular files transferred: 1"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        std::fs::read_to_string(dst.join("sub/c.txt")).unwrap(),
        "changed\n"
    );
}

#[test]
fn transfers_across_gateway_initiated_rekeys_arrive_whole() {
    if !require(&[Component::Sshd]) {
        return;
    }
    // The gateway re-keys both legs every 4 MiB, so 64 MiB each way runs
    // through many re-keys it starts itself while windows have grown.
    let h = harness().config(|c| c.rekey_bytes = 4 << 20).start();
    let src = h.path("src.bin");
    random_file(&src, SIZE);
    let up = h.path("rekey-up.bin");
    let down = h.path("rekey-down.bin");
    let out = run(h.scp().arg(&src).arg(h.dest(&up)));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(same_file(&src, &up), "upload differs");
    let out = run(h.scp().arg(h.dest(&up)).arg(&down));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(same_file(&src, &down), "download differs");
}
