//! Crash safety: every acknowledged write survives `kill -9`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::Daemon;
use rand::Rng;
use testsupport::{require, Component};

#[test]
fn thousand_adds_with_kill9_lose_nothing_acknowledged() {
    if !require(&[Component::Program("ssh-keygen")]) {
        return;
    }
    let mut d = Daemon::start(common::BIN);
    let key = d.keygen("k");
    let key = key.to_str().unwrap().to_string();
    let socket = d.socket.clone();
    let total = 1000;
    let kill_after = rand::thread_rng().gen_range(200..800);
    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let dead = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (next, acked, dead, key, socket) = (
                next.clone(),
                acked.clone(),
                dead.clone(),
                key.clone(),
                socket.clone(),
            );
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total || dead.load(Ordering::SeqCst) {
                    return;
                }
                let name = format!("s{i:04}");
                let out = std::process::Command::new(common::BIN)
                    .arg("--admin-socket")
                    .arg(&socket)
                    .args([
                        "add",
                        &name,
                        "--domain",
                        &format!("{name}.example.test"),
                        "--upstream",
                        "127.0.0.1",
                        "--ssh-key",
                        &key,
                    ])
                    .output()
                    .unwrap();
                if out.status.success() {
                    acked.lock().unwrap().insert(name);
                }
            })
        })
        .collect();
    // Kill at a random moment in the middle of the stream of writes.
    while acked.lock().unwrap().len() < kill_after {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    d.kill9();
    dead.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= kill_after);

    d.restart();
    let list = d.json(&["list", "--json"]);
    let present: BTreeSet<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    let lost: Vec<_> = acked.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but lost after kill -9: {lost:?}"
    );
    // Every surviving record is whole and its routes are live.
    let routes = d.json(&["routes", "--json"]);
    assert_eq!(
        routes["routes"].as_array().unwrap().len(),
        present.len() * 3
    );

    // And the daemon keeps working: the rest of the 1,000 go in.
    let remaining: Vec<usize> = (0..total)
        .filter(|i| !present.contains(&format!("s{i:04}")))
        .collect();
    for i in remaining {
        let name = format!("s{i:04}");
        d.ok(&[
            "add",
            &name,
            "--domain",
            &format!("{name}.example.test"),
            "--upstream",
            "127.0.0.1",
            "--ssh-key",
            &key,
        ]);
    }
    assert_eq!(d.json(&["list", "--json"]).as_array().unwrap().len(), total);
}
