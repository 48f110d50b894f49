//! A stand-alone gateway for benchmarks and manual tries, until the daemon is
//! wired: routes one host (internal CA certificate) to one upstream.
//!
//! ```text
//! cargo run --release -p httpgate --example gateway -- \
//!     --listen 127.0.0.1:8443 --host localhost --upstream 127.0.0.1:8080 --ca-out /tmp/ca.pem
//! ```
//! Stops on SIGINT or SIGTERM. `RUST_LOG=httpgate::access=info` prints the access log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use httpgate::{
    CaRecord, CertRecord, CertStore, HttpConfig, HttpGateway, Route, RouteKind, RouteSource,
    StoreError, Target, TlsMode,
};

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

#[tokio::main]
async fn main() {
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
            basic_auth: None,
            tls: TlsMode::Internal,
        }),
    });
    let gw = HttpGateway::new(HttpConfig::default(), routes, Arc::new(MemStore::default()))
        .expect("gateway");
    if let Some(path) = arg(&args, "--ca-out") {
        std::fs::write(path, gw.ca_cert_pem()).expect("write CA");
    }
    let listener = tokio::net::TcpListener::bind(&listen).await.expect("bind");
    let server = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.serve_https(listener).await })
    };
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    gw.shutdown();
    let _ = server.await;
}
