//! The paths from the proxy to a sandbox's port, over HTTP/1.1:
//!
//! - `exchange.rs`: bodiless GET and HEAD (nearly all traffic), written and
//!   parsed by hand in the client connection's task, over connections from
//!   the serving thread's [`IdlePool`];
//! - `conn.rs`: requests with a body, over hyper client connections owned
//!   and polled by the HTTP/1 client connection's task, and upgrades
//!   (websockets) over a dedicated connection of their own;
//! - `pooled.rs`: HTTP/2 clients' requests, over hyper's pooled clients.
//!
//! None of it owns routing, header rewriting or error pages (the proxy
//! does); their bodies are `body.rs`'s.

mod conn;
mod exchange;
mod pooled;

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

pub(crate) use conn::{send_upgrade, ConnUpstreams};
pub(crate) use exchange::{eligible, exchange, ExchangeError, IdlePool, UpBody};
pub(crate) use pooled::Upstreams;

/// Why an upstream exchange failed.
#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// The TCP connect failed.
    Connect(io::Error),
    /// The TCP connect did not finish in time.
    ConnectTimeout,
    /// The exchange failed after connecting.
    Http(hyper::Error),
    /// The shared pool (HTTP/2 clients) failed.
    Pooled(hyper_util::client::legacy::Error),
    /// A bodiless exchange (see `exchange.rs`) failed after connecting.
    Exchange(ExchangeError),
}

pub(crate) async fn tcp_connect(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, UpstreamError> {
    let attempt = async {
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => TcpStream::connect((ip, port)).await,
            Err(_) => TcpStream::connect((host, port)).await,
        }
    };
    let stream = match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
        Err(_) => return Err(UpstreamError::ConnectTimeout),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
