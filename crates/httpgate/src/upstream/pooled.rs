//! The upstream pools of HTTP/2 clients: hyper clients, one per shard,
//! shared by every serving thread (an HTTP/2 connection's streams run in
//! their own tasks, so their upstream connections cannot be owned by the
//! client connection's task as HTTP/1's are: `conn.rs`).

use std::sync::atomic::Ordering;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ReqBody;
use crate::HttpConfig;

/// The pooled clients to upstreams: one pool per shard, a thread always
/// using the same shard, so that a pooled connection is mostly driven on the
/// thread that uses it (no cross-thread wake-ups per request).
pub(crate) struct Upstreams {
    shards: Vec<Client<HttpConnector, ReqBody>>,
}

thread_local! {
    static SHARD: usize = next_shard();
}

fn next_shard() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Upstreams {
    pub(crate) fn new(cfg: &HttpConfig) -> Self {
        let n = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 64);
        Self {
            shards: (0..n).map(|_| Self::client(cfg)).collect(),
        }
    }

    pub(crate) fn pick(&self) -> &Client<HttpConnector, ReqBody> {
        let i = SHARD.with(|s| *s) % self.shards.len();
        &self.shards[i]
    }

    fn client(cfg: &HttpConfig) -> Client<HttpConnector, ReqBody> {
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(cfg.timeouts.upstream_connect));
        conn.set_nodelay(true);
        conn.set_keepalive(Some(std::time::Duration::from_secs(60)));
        conn.enforce_http(true);
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.timeouts.upstream_pool_idle)
            .pool_max_idle_per_host(cfg.limits.upstream_pool_max_idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .set_host(false)
            .build(conn)
    }
}
