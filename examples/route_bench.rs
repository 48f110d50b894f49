//! Route benchmark: time from `add` to a usable route through a running
//! daemon's admin API, the daemon's memory for 10,000 routes, and lookup
//! time in the routing snapshot. Run it through `bench/routes.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Instant;

use http::Method;
use sandboxd::api::{AddSandbox, RouteDump, Status};
use sandboxd::client::Client;
use sandboxd::routes::RoutingTable;
use store::{Backend, KeyPair, Sandbox, SandboxStatus};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn sandbox(i: usize, key: &str) -> Sandbox {
    Sandbox {
        name: format!("sb{i:05}"),
        domain: format!("sb{i:05}.example.com"),
        backend: Backend::Static {
            host: format!("10.1.{}.{}", i / 250, i % 250 + 1),
        },
        ssh_port: 22,
        app_port: 8000,
        agent_port: 9999,
        agent_prefix: "shelley".into(),
        user: "debian".into(),
        client_keys: vec![key.to_string()],
        upstream_key: KeyPair {
            private_openssh: "x".repeat(400),
            public_openssh: key.to_string(),
        },
        upstream_host_key: Some(key.to_string()),
        basic_auth: None,
        tls_mode: None,
        tls_cert_file: None,
        tls_key_file: None,
        status: SandboxStatus::Running,
        addresses: vec![],
        assigned_ipv4: None,
        egress: Default::default(),
        created_at: 1,
        updated_at: 1,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let socket = PathBuf::from(
        args.get(1)
            .expect("usage: route_bench ADMIN-SOCKET PUBKEY-FILE"),
    );
    let key = std::fs::read_to_string(args.get(2).expect("PUBKEY-FILE"))
        .unwrap()
        .trim()
        .to_string();
    let client = Client::new(&socket);
    let status: Status = client
        .call(Method::GET, "/v1/status", None::<&()>)
        .await
        .unwrap();

    // 1. add -> usable route, measured from the request to the route being
    //    visible in the snapshot the gates read.
    let n = 200;
    let mut add_ms = Vec::new();
    for i in 0..n {
        let req = AddSandbox {
            name: format!("lat{i}"),
            domain: format!("lat{i}.example.net"),
            upstream: "127.0.0.1".into(),
            ssh_port: None,
            app_port: None,
            agent_port: None,
            agent_prefix: None,
            user: None,
            ssh_keys: vec![key.clone()],
            upstream_host_key: None,
            auth: None,
            tls_mode: None,
            tls_cert_file: None,
            tls_key_file: None,
        };
        let t = Instant::now();
        let _: serde_json::Value = client
            .call(Method::POST, "/v1/sandboxes", Some(&req))
            .await
            .unwrap();
        add_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let dump: RouteDump = client
            .call(Method::GET, "/v1/routes", None::<&()>)
            .await
            .unwrap();
        assert!(
            dump.routes.iter().any(|r| r.key == format!("lat{i}")),
            "route not live after add"
        );
    }
    add_ms.sort_by(f64::total_cmp);
    println!("add -> usable route ({n} adds, admin API, flushed to disk before the answer):");
    println!(
        "  p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
        percentile(&add_ms, 0.5),
        percentile(&add_ms, 0.99),
        add_ms[n - 1]
    );

    // 2. daemon memory with 10,000 routes (restored in one transaction).
    let before = rss_kib(status.pid);
    let backup = store::Backup {
        format: store::BACKUP_FORMAT.into(),
        schema_version: store::SCHEMA_VERSION,
        sandboxes: (0..10_000).map(|i| sandbox(i, &key)).collect(),
        records: Default::default(),
    };
    let t = Instant::now();
    client
        .stream(
            Method::POST,
            "/v1/restore?replace=true",
            Some(serde_json::to_vec(&backup).unwrap()),
            |_| {},
        )
        .await
        .unwrap();
    let restore_s = t.elapsed().as_secs_f64();
    let after = rss_kib(status.pid);
    let st: Status = client
        .call(Method::GET, "/v1/status", None::<&()>)
        .await
        .unwrap();
    println!("10,000 sandboxes ({} route entries): restore {:.2} s; daemon RSS {} KiB -> {} KiB (+{} KiB, {:.2} KiB per sandbox incl. sled cache)",
        st.routes, restore_s, before, after, after.saturating_sub(before), after.saturating_sub(before) as f64 / 10_000.0);
    let mut big_ms = Vec::new();
    for i in 0..50 {
        let req = AddSandbox {
            name: format!("more{i}"),
            domain: format!("more{i}.example.net"),
            upstream: "127.0.0.1".into(),
            ssh_port: None,
            app_port: None,
            agent_port: None,
            agent_prefix: None,
            user: None,
            ssh_keys: vec![key.clone()],
            upstream_host_key: None,
            auth: None,
            tls_mode: None,
            tls_cert_file: None,
            tls_key_file: None,
        };
        let t = Instant::now();
        let _: serde_json::Value = client
            .call(Method::POST, "/v1/sandboxes", Some(&req))
            .await
            .unwrap();
        big_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    big_ms.sort_by(f64::total_cmp);
    println!(
        "  add -> usable route with 10,000 present (50 adds): p50 {:.2} ms   p99 {:.2} ms",
        percentile(&big_ms, 0.5),
        percentile(&big_ms, 0.99)
    );

    // 3. lookups in the snapshot, in process.
    let sandboxes: Vec<Sandbox> = (0..10_000).map(|i| sandbox(i, &key)).collect();
    let rss_before = rss_kib(std::process::id());
    let table = RoutingTable::build(sandboxes, 1, Default::default());
    let rss_after = rss_kib(std::process::id());
    println!(
        "routing snapshot of 10,000 sandboxes (parsed SSH keys, HTTP routes), in process: +{} KiB, {:.2} KiB per sandbox",
        rss_after.saturating_sub(rss_before),
        rss_after.saturating_sub(rss_before) as f64 / 10_000.0
    );
    let users: Vec<String> = (0..10_000).map(|i| format!("sb{i:05}")).collect();
    let hosts: Vec<String> = (0..10_000)
        .map(|i| format!("shelley.sb{i:05}.example.com"))
        .collect();
    let rounds = 100;
    let t = Instant::now();
    let mut hits = 0usize;
    for _ in 0..rounds {
        for u in &users {
            hits += table.by_user(std::hint::black_box(u)).is_some() as usize;
        }
    }
    let user_ns = t.elapsed().as_nanos() as f64 / (rounds * users.len()) as f64;
    let t = Instant::now();
    for _ in 0..rounds {
        for h in &hosts {
            hits += table.by_host(std::hint::black_box(h)).is_some() as usize;
        }
    }
    let host_ns = t.elapsed().as_nanos() as f64 / (rounds * hosts.len()) as f64;
    let t = Instant::now();
    for _ in 0..rounds {
        for u in &users {
            hits += table.by_host(std::hint::black_box(u)).is_some() as usize;
        }
    }
    let miss_ns = t.elapsed().as_nanos() as f64 / (rounds * users.len()) as f64;
    assert_eq!(hits, 2 * rounds * 10_000);
    println!("lookup in a 10,000-sandbox snapshot: ssh user {user_ns:.0} ns, https host {host_ns:.0} ns, miss {miss_ns:.0} ns");
}
