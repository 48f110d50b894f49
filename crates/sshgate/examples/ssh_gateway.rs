//! A stand-alone gateway with one static route, for benchmarks and manual
//! tries until the daemon wires sshgate in. Settings are `key=value`
//! arguments:
//!
//! ```text
//! ssh_gateway listen=127.0.0.1:0 host_keys=DIR sandbox=NAME target=HOST:PORT user=USER \
//!         authorized_keys=FILE upstream_key=FILE upstream_host_key=FILE.pub \
//!         [window=BYTES] [initial_window=BYTES] [relay_budget=BYTES] [packet=BYTES] \
//!         [buffer=N] [nodelay=0|1] [ciphers=a,b,...] [max_sessions=N] \
//!         [per_source_max_startups=START:RATE:FULL]
//! ```
//!
//! It prints `listening ADDR` once bound and runs until SIGINT or SIGTERM.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use russh::keys::{PrivateKey, PublicKey};
use sshgate::{Gateway, GatewayConfig, Route, RouteSource, Target};

struct OneRoute(Arc<Route>);

impl RouteSource for OneRoute {
    fn lookup(&self, user: &str) -> Option<Arc<Route>> {
        (user == self.0.sandbox).then(|| self.0.clone())
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "sshgate=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: HashMap<String, String> = std::env::args()
        .skip(1)
        .map(|a| {
            let (k, v) = a.split_once('=').expect("arguments are key=value");
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let get = |k: &str| {
        args.get(k)
            .unwrap_or_else(|| panic!("missing {k}="))
            .clone()
    };

    let mut config = GatewayConfig {
        host_keys: sshgate::load_or_generate_host_keys(get("host_keys").as_ref())
            .expect("host keys"),
        ..GatewayConfig::default()
    };
    if let Some(v) = args.get("window") {
        config.window_size = v.parse().expect("window");
    }
    if let Some(v) = args.get("initial_window") {
        config.initial_window = v.parse().expect("initial_window");
    }
    if let Some(v) = args.get("relay_budget") {
        config.relay_budget = v.parse().expect("relay_budget");
        config.relay_budget_per_sandbox = config.relay_budget;
    }
    if let Some(v) = args.get("max_sessions") {
        config.max_sessions_per_sandbox = v.parse().expect("max_sessions");
    }
    if let Some(v) = args.get("per_source_max_startups") {
        config.per_source_max_startups = v.parse().expect("per_source_max_startups");
    }
    if let Some(v) = args.get("packet") {
        config.max_packet_size = v.parse().expect("packet");
    }
    if let Some(v) = args.get("buffer") {
        config.channel_buffer_size = v.parse().expect("buffer");
    }
    if let Some(v) = args.get("nodelay") {
        config.nodelay = v == "1";
    }
    if let Some(v) = args.get("ciphers") {
        config.ciphers = v.split(',').map(str::to_owned).collect();
    }
    let (host, port) = get("target")
        .rsplit_once(':')
        .map(|(h, p)| (h.to_owned(), p.parse().expect("port")))
        .expect("target=HOST:PORT");
    let authorized_keys = read(&get("authorized_keys"))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| PublicKey::from_openssh(l.trim()).expect("authorized key"))
        .collect();
    let route = Route {
        sandbox: get("sandbox"),
        target: Target::Addr { host, port },
        user: get("user"),
        authorized_keys,
        upstream_key: Arc::new(
            PrivateKey::from_openssh(read(&get("upstream_key")).trim()).expect("upstream key"),
        ),
        upstream_host_key: Some(
            PublicKey::from_openssh(read(&get("upstream_host_key")).trim())
                .expect("upstream host key"),
        ),
    };
    let gateway =
        Gateway::new(config, Arc::new(OneRoute(Arc::new(route)))).expect("gateway config");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(get("listen"))
            .await
            .expect("bind");
        println!("listening {}", listener.local_addr().expect("addr"));
        std::io::stdout().flush().expect("flush");
        let gw = gateway.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            gw.shutdown();
        });
        gateway.serve(listener).await.expect("serve");
    });
}
