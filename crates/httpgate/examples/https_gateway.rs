//! A stand-alone gateway for manual tries and profiling of the proxy alone
//! (no store, no CLI): routes one host (internal CA certificate) to one
//! upstream. The benchmark (bench/https.sh) runs the real daemon instead.
//!
//! ```text
//! cargo run --release -p httpgate --example https_gateway -- \
//!     --listen 127.0.0.1:8443 --host localhost --upstream 127.0.0.1:8080 --ca-out /tmp/ca.pem
//! ```
//! `--threads N` runs N single-threaded runtimes, each accepting from the
//! one listening socket (0, the default: one multi-threaded runtime).
//! Stops on SIGINT or SIGTERM. `RUST_LOG=httpgate::access=info` prints the access log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use httpgate::{
    CaRecord, CertRecord, CertStore, HttpConfig, HttpGateway, Route, RouteKind, RouteSource,
    StoreError, Target, TlsMode,
};

// The daemon binary is advised to do the same: hyper and rustls allocate per request.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct OneRoute {
    host: String,
    route: Arc<Route>,
}

impl RouteSource for OneRoute {
    fn lookup(&self, host: &str) -> Option<Arc<Route>> {
        (host == self.host).then(|| self.route.clone())
    }
    fn hosts(&self) -> Vec<(String, Arc<Route>)> {
        vec![(self.host.clone(), self.route.clone())]
    }
}

#[derive(Default)]
struct MemStore {
    ca: Mutex<Option<CaRecord>>,
    certs: Mutex<HashMap<String, CertRecord>>,
}

impl CertStore for MemStore {
    fn load_certs(&self) -> Vec<CertRecord> {
        self.certs.lock().unwrap().values().cloned().collect()
    }
    fn save_cert(&self, rec: &CertRecord) -> Result<(), StoreError> {
        self.certs
            .lock()
            .unwrap()
            .insert(rec.name.clone(), rec.clone());
        Ok(())
    }
    fn delete_cert(&self, name: &str) -> Result<(), StoreError> {
        self.certs.lock().unwrap().remove(name);
        Ok(())
    }
    fn load_account(&self, _: &str) -> Option<String> {
        None
    }
    fn save_account(&self, _: &str, _: &str) -> Result<(), StoreError> {
        Ok(())
    }
    fn load_ca(&self) -> Option<CaRecord> {
        self.ca.lock().unwrap().clone()
    }
    fn save_ca(&self, ca: &CaRecord) -> Result<(), StoreError> {
        *self.ca.lock().unwrap() = Some(ca.clone());
        Ok(())
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let threads: usize = arg(&std::env::args().collect::<Vec<_>>(), "--threads")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(run(threads));
}

async fn run(threads: usize) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    httpgate::install_crypto_provider();
    let args: Vec<String> = std::env::args().collect();
    let listen = arg(&args, "--listen").unwrap_or_else(|| "127.0.0.1:8443".into());
    let host = arg(&args, "--host").unwrap_or_else(|| "localhost".into());
    let upstream: SocketAddr = arg(&args, "--upstream")
        .unwrap_or_else(|| "127.0.0.1:8080".into())
        .parse()
        .expect("--upstream HOST:PORT");
    let routes = Arc::new(OneRoute {
        host: host.clone(),
        route: Arc::new(Route {
            sandbox: "bench".into(),
            kind: RouteKind::App,
            target: Target::Addr {
                host: upstream.ip().to_string(),
                port: upstream.port(),
            },
            access: httpgate::Access::Open,
            tls: TlsMode::Internal,
        }),
    });
    let gw = HttpGateway::new(HttpConfig::default(), routes, Arc::new(MemStore::default()))
        .expect("gateway");
    if let Some(path) = arg(&args, "--ca-out") {
        std::fs::write(path, gw.ca_cert_pem()).expect("write CA");
    }
    let addr: SocketAddr = listen.parse().expect("--listen HOST:PORT");
    let workers = if threads > 1 {
        gw.spawn_https_threads(addr, threads).expect("listen")
    } else {
        Vec::new()
    };
    let listener = if threads > 1 {
        None
    } else {
        Some(tokio::net::TcpListener::bind(addr).await.expect("bind"))
    };
    let server = listener.map(|listener| {
        let gw = gw.clone();
        tokio::spawn(async move { gw.serve_https(listener).await })
    });
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    gw.shutdown();
    if let Some(server) = server {
        let _ = server.await;
    }
    for w in workers {
        let _ = w.join();
    }
}
