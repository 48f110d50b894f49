//! Shared test harness: an in-memory route table and certificate store, a
//! gateway builder bound to loopback ports, real upstream HTTP servers
//! (hyper, in-process), curl as the client; Pebble and the test PKI come
//! from the shared `testsupport` crate.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use httpgate::{
    Access, BasicAuth, CaRecord, CertRecord, CertStore, ChallengeKind, HttpConfig, HttpGateway,
    Route, RouteKind, RouteSource, StoreError, Target, TlsMode,
};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "httpgate=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

// ---------- routes ----------

#[derive(Default)]
pub struct Routes {
    map: ArcSwap<HashMap<String, Arc<Route>>>,
}

impl Routes {
    pub fn set(&self, host: &str, route: Route) {
        let mut m = (**self.map.load()).clone();
        m.insert(host.to_owned(), Arc::new(route));
        self.map.store(Arc::new(m));
    }
    pub fn remove(&self, host: &str) {
        let mut m = (**self.map.load()).clone();
        m.remove(host);
        self.map.store(Arc::new(m));
    }
}

impl RouteSource for Routes {
    fn lookup(&self, host: &str) -> Option<Arc<Route>> {
        self.map.load().get(host).cloned()
    }
    fn hosts(&self) -> Vec<(String, Arc<Route>)> {
        self.map
            .load()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

pub fn app_route(sandbox: &str, addr: SocketAddr, tls: TlsMode) -> Route {
    Route {
        sandbox: sandbox.to_owned(),
        kind: RouteKind::App,
        target: Target::Addr {
            host: addr.ip().to_string(),
            port: addr.port(),
        },
        access: Access::Open,
        tls,
    }
}

/// An upstream named "app" and a gateway routing `app.test` to it with an
/// internal-CA certificate, its configuration adjusted by `config`.
pub async fn app_gateway(config: impl FnOnce(&mut HttpConfig)) -> (Upstream, Gateway) {
    let app = Upstream::start("app").await;
    let gw = GatewayBuilder::new()
        .config(config)
        .route("app.test", app_route("app", app.addr, TlsMode::Internal))
        .start()
        .await;
    (app, gw)
}

pub fn agent_route(sandbox: &str, addr: SocketAddr, tls: TlsMode, auth: BasicAuth) -> Route {
    Route {
        kind: RouteKind::Agent,
        access: Access::Login(auth),
        ..app_route(sandbox, addr, tls)
    }
}

/// An agent route with no login (closed).
pub fn closed_agent_route(sandbox: &str, addr: SocketAddr, tls: TlsMode) -> Route {
    Route {
        kind: RouteKind::Agent,
        access: Access::Closed,
        ..app_route(sandbox, addr, tls)
    }
}

/// An argon2id hash with small parameters (fast in debug builds).
pub fn argon2_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    let params = argon2::Params::new(1024, 1, 1, None).unwrap();
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

// ---------- certificate store ----------

#[derive(Default)]
pub struct MemStore {
    pub certs: Mutex<HashMap<String, CertRecord>>,
    pub accounts: Mutex<HashMap<String, String>>,
    pub ca: Mutex<Option<CaRecord>>,
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
    fn load_account(&self, directory_url: &str) -> Option<String> {
        self.accounts.lock().unwrap().get(directory_url).cloned()
    }
    fn save_account(&self, directory_url: &str, creds: &str) -> Result<(), StoreError> {
        self.accounts
            .lock()
            .unwrap()
            .insert(directory_url.to_owned(), creds.to_owned());
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

// ---------- gateway ----------

pub struct Gateway {
    pub gw: HttpGateway,
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub routes: Arc<Routes>,
    pub store: Arc<MemStore>,
    pub dir: tempfile::TempDir,
    pub ca_file: PathBuf,
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Fluent builder of a gateway under test.
pub struct GatewayBuilder {
    config: HttpConfig,
    routes: Arc<Routes>,
    store: Arc<MemStore>,
    https_addr: String,
    http_addr: Option<String>,
}

impl GatewayBuilder {
    pub fn new() -> Self {
        let mut config = HttpConfig {
            acme_backoff_base: Duration::from_millis(200),
            acme_backoff_cap: Duration::from_secs(2),
            acme_order_timeout: Duration::from_secs(20),
            ..HttpConfig::default()
        };
        config.timeouts.shutdown_grace = Duration::from_secs(1);
        Self {
            config,
            routes: Arc::new(Routes::default()),
            store: Arc::new(MemStore::default()),
            https_addr: "127.0.0.1:0".into(),
            http_addr: None,
        }
    }
    pub fn config(mut self, f: impl FnOnce(&mut HttpConfig)) -> Self {
        f(&mut self.config);
        self
    }
    pub fn route(self, host: &str, route: Route) -> Self {
        self.routes.set(host, route);
        self
    }
    pub fn routes(mut self, routes: Arc<Routes>) -> Self {
        self.routes = routes;
        self
    }
    pub fn store(mut self, store: Arc<MemStore>) -> Self {
        self.store = store;
        self
    }
    pub fn https_addr(mut self, a: &str) -> Self {
        self.https_addr = a.into();
        self
    }
    pub fn with_http(mut self, a: &str) -> Self {
        self.http_addr = Some(a.into());
        self
    }
    pub fn acme(mut self, pebble: &Pebble, challenge: ChallengeKind) -> Self {
        self.config.acme_directory = Some(pebble.directory());
        self.config.acme_ca_root_pem = Some(std::fs::read(&pebble.cert_file).unwrap());
        self.config.acme_challenges = vec![challenge];
        self
    }
    pub async fn start(self) -> Gateway {
        let gw = HttpGateway::new(self.config, self.routes.clone(), self.store.clone()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, gw.ca_cert_pem()).unwrap();
        let mut tasks = Vec::new();
        let l = TcpListener::bind(&self.https_addr).await.unwrap();
        let https = l.local_addr().unwrap();
        let g = gw.clone();
        tasks.push(tokio::spawn(async move { g.serve_https(l).await }));
        let mut http = None;
        if let Some(a) = self.http_addr {
            let l = TcpListener::bind(&a).await.unwrap();
            http = Some(l.local_addr().unwrap());
            let g = gw.clone();
            tasks.push(tokio::spawn(async move { g.serve_http(l).await }));
        }
        Gateway {
            gw,
            https,
            http,
            routes: self.routes,
            store: self.store,
            dir,
            ca_file,
            tasks,
        }
    }
}

impl Gateway {
    pub async fn stop(self) {
        self.gw.shutdown();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }

    /// curl against this gateway's HTTPS port with `host` resolved to loopback.
    pub fn curl(&self, host: &str, path: &str) -> Curl {
        Curl::new(host, self.https.port(), path).cacert(&self.ca_file)
    }
}

// ---------- curl ----------

pub struct Curl {
    args: Vec<String>,
    url: String,
}

#[derive(Debug)]
pub struct CurlOut {
    pub status: u16,
    pub version: String,
    pub body: String,
    pub headers: String,
    pub ok: bool,
    pub stderr: String,
}

impl Curl {
    pub fn new(host: &str, port: u16, path: &str) -> Self {
        Self {
            args: vec![
                "-sS".into(),
                "--max-time".into(),
                "20".into(),
                "--resolve".into(),
                format!("{host}:{port}:127.0.0.1"),
            ],
            url: format!("https://{host}:{port}{path}"),
        }
    }
    pub fn http(host: &str, port: u16, path: &str) -> Self {
        Self {
            args: vec![
                "-sS".into(),
                "--max-time".into(),
                "20".into(),
                "--resolve".into(),
                format!("{host}:{port}:127.0.0.1"),
            ],
            url: format!("http://{host}:{port}{path}"),
        }
    }
    pub fn cacert(mut self, p: &Path) -> Self {
        self.args.push("--cacert".into());
        self.args.push(p.display().to_string());
        self
    }
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn header(self, h: &str) -> Self {
        self.arg("-H").arg(h)
    }
    pub fn user(self, u: &str) -> Self {
        self.arg("-u").arg(u)
    }
    pub async fn run(self) -> CurlOut {
        tokio::task::spawn_blocking(move || self.run_blocking())
            .await
            .unwrap()
    }
    pub fn run_blocking(self) -> CurlOut {
        let dir = tempfile::tempdir().unwrap();
        let hdr = dir.path().join("h");
        let body = dir.path().join("b");
        let out = Command::new("curl")
            .args(&self.args)
            .arg("-D")
            .arg(&hdr)
            .arg("-o")
            .arg(&body)
            .arg("-w")
            .arg("%{http_code} %{http_version}")
            .arg(&self.url)
            .output()
            .unwrap();
        let w = String::from_utf8_lossy(&out.stdout).to_string();
        let mut it = w.split_whitespace();
        let status = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let version = it.next().unwrap_or("").to_owned();
        CurlOut {
            status,
            version,
            body: std::fs::read_to_string(&body).unwrap_or_default(),
            headers: std::fs::read_to_string(&hdr).unwrap_or_default(),
            ok: out.status.success(),
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        }
    }
}

impl CurlOut {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

// ---------- upstream ----------

/// A real HTTP/1.1 server (hyper) answering:
/// `/slow` after 10 s, `/sleep/MS` after MS milliseconds, `/upload` with the number of body bytes it read,
/// `/big` with 100 KiB, anything else with a JSON echo of the request.
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    /// TCP connections accepted so far.
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
    /// Connections that ended so far (closed by the peer, or failed).
    pub closed: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start(name: &str) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let n = name.to_owned();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ended = closed.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let n = n.clone();
                let ended = ended.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| upstream_handle(n.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .with_upgrades()
                        .await;
                    ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            name: name.to_owned(),
            accepted,
            closed,
            task,
        }
    }
}

async fn upstream_handle(
    name: String,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    if let Some(ms) = path.strip_prefix("/sleep/").and_then(|m| m.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return Ok(Response::new(Full::new(Bytes::from_static(b"slept"))));
    }
    match path.as_str() {
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok(Response::new(Full::new(Bytes::from_static(b"late"))))
        }
        "/big" => Ok(Response::new(Full::new(Bytes::from(vec![
            b'x';
            100 * 1024
        ])))),
        "/upload" => {
            let mut body = req.into_body();
            let mut n: u64 = 0;
            while let Some(f) = body.frame().await {
                match f {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            n += d.len() as u64;
                        }
                    }
                    Err(_) => break,
                }
            }
            Ok(Response::new(Full::new(Bytes::from(n.to_string()))))
        }
        _ => {
            let mut headers = serde_json::Map::new();
            for (k, v) in req.headers() {
                headers.insert(
                    k.as_str().to_owned(),
                    serde_json::Value::String(v.to_str().unwrap_or("").to_owned()),
                );
            }
            let j = serde_json::json!({
                "upstream": name,
                "method": req.method().as_str(),
                "uri": req.uri().to_string(),
                "headers": headers,
            });
            Ok(Response::new(Full::new(Bytes::from(j.to_string()))))
        }
    }
}

// ---------- processes ----------

pub use testsupport::pebble::Pebble;
pub use testsupport::pki::served_serial;
pub use testsupport::{free_port, Proc};

/// Waits (at most 20 s) until something accepts on 127.0.0.1:`port`.
pub async fn wait_port(port: u16) {
    tokio::task::spawn_blocking(move || testsupport::wait_port(port))
        .await
        .unwrap();
}

/// A websocket echo server (python3-websockets) on a free loopback port.
pub async fn ws_echo_server() -> (testsupport::ws::WsEcho, SocketAddr) {
    let echo = tokio::task::spawn_blocking(testsupport::ws::echo_server)
        .await
        .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], echo.port));
    (echo, addr)
}

/// Wait until `f` returns true (polling), or panic after `secs`.
pub async fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

// ---------- raw TLS client ----------

pub type RawTls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to the gateway (SNI `host`, HTTP/1.1 ALPN), trusting `ca_pem`.
pub async fn tls_connect(addr: SocketAddr, host: &str, ca_file: &Path) -> std::io::Result<RawTls> {
    httpgate::install_crypto_provider();
    let pem = std::fs::read(ca_file)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c?).map_err(std::io::Error::other)?;
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name =
        rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(std::io::Error::other)?;
    connector.connect(name, tcp).await
}

/// Send raw bytes and read until the peer closes or `secs` pass; returns what was read.
pub async fn raw_exchange(stream: &mut RawTls, request: &[u8], secs: u64) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.write_all(request).await;
    let _ = stream.flush().await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

/// The join handles of a gateway's serving threads.
pub type ThreadHandles = Vec<std::thread::JoinHandle<std::io::Result<()>>>;

/// `threads` serving threads of `gw` (as the daemon runs them) on one new
/// loopback port.
pub fn spawn_threads(gw: &Gateway, threads: usize) -> (u16, ThreadHandles) {
    let port = free_port();
    let handles = gw
        .gw
        .spawn_https_threads(([127, 0, 0, 1], port).into(), threads)
        .unwrap();
    (port, handles)
}

/// Shut `gw` down and wait for its serving threads to finish.
pub async fn stop_with_threads(gw: Gateway, handles: ThreadHandles) {
    gw.gw.shutdown();
    for h in handles {
        tokio::task::spawn_blocking(move || h.join().unwrap().unwrap())
            .await
            .unwrap();
    }
    gw.stop().await;
}
