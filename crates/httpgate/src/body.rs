//! The bodies of proxied messages: [`ReqBody`] (a client's request body
//! on its way upstream) and [`RespBody`] (every response the gateway
//! sends: an upstream's, streamed, or a page of ours), with the error type
//! they share. The proxy, the upstream paths and the gateway's own pages
//! all build on this module, a leaf: the parts a response body carries
//! (the bodiless exchange's body, the access-log record, the HTTP/2
//! open-request seat) are type parameters, which the crate root fixes
//! once (`crate::RespBody`), so the code is the same as with the concrete
//! types (no boxing, no indirection).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// The error type of response bodies.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Request body sent upstream; remembers whether the client's side failed
/// (a malformed chunked body is the client's fault: 400, not 502).
pub(crate) struct ReqBody {
    inner: Option<Incoming>,
    client_fault: Arc<AtomicBool>,
}

impl ReqBody {
    /// The client's body; `client_fault` is set if reading it fails.
    pub(crate) fn new(inner: Incoming, client_fault: Arc<AtomicBool>) -> Self {
        Self {
            inner: Some(inner),
            client_fault,
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                this.client_fault.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(e)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// Where a response body's bytes come from; `F` is the bodiless
/// exchange's body (`upstream::UpBody`).
pub(crate) enum RespInner<F> {
    Upstream(Incoming),
    /// From a bodiless exchange, read off the upstream socket as polled.
    Fast(F),
    Full(Option<Bytes>),
}

/// The access-log record a response body counts its bytes into.
pub(crate) trait CountsBytes {
    /// `n` more bytes went to the client.
    fn sent(&mut self, n: u64);
}

/// Response body to the client: the upstream's, streamed, or a page of ours.
/// Counts bytes for the access log `L`, written when the body is dropped;
/// holds the seat `S` until then.
pub(crate) struct RespBody<F, L, S> {
    pub(crate) inner: RespInner<F>,
    pub(crate) log: Option<Box<L>>,
    /// The request's place under its source's open-request cap (HTTP/2),
    /// given back when the response is done or dropped.
    pub(crate) seat: Option<S>,
}

impl<F, L, S> RespBody<F, L, S> {
    /// A body of ours, whole.
    pub(crate) fn full(b: Bytes) -> Self {
        Self::of(RespInner::Full(Some(b)))
    }

    /// `inner`, not logged yet and holding no seat.
    pub(crate) fn of(inner: RespInner<F>) -> Self {
        Self {
            inner,
            log: None,
            seat: None,
        }
    }
}

impl<F, L, S> Body for RespBody<F, L, S>
where
    F: Body<Data = Bytes, Error = BoxError> + Unpin,
    L: CountsBytes,
    S: Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let res = match &mut this.inner {
            RespInner::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            RespInner::Fast(b) => Pin::new(b).poll_frame(cx),
            RespInner::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        };
        if let (Poll::Ready(Some(Ok(f))), Some(log)) = (&res, this.log.as_mut()) {
            if let Some(d) = f.data_ref() {
                log.sent(d.len() as u64);
            }
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            RespInner::Upstream(b) => b.is_end_stream(),
            RespInner::Fast(b) => b.is_end_stream(),
            RespInner::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            RespInner::Upstream(b) => b.size_hint(),
            RespInner::Fast(b) => b.size_hint(),
            RespInner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RespInner::Full(None) => SizeHint::with_exact(0),
        }
    }
}
