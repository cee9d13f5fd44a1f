//! Request and response bodies as the proxy moves them: small enums rather than boxed trait
//! objects, so the common paths (empty GET, pooled upstream stream) allocate nothing extra.

use std::{
    fmt,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::{
    endpoint::{Endpoint, InflightGuard},
    h1::{BodyError, BodyStream, Held, SendBody},
};

/// What is sent upstream.
#[derive(Debug)]
pub enum ReqBody {
    /// Buffered in full: can be replayed on a retry (cheap `Bytes` clone).
    Full(Option<Bytes>),
    /// Streamed from the client: sent once, never replayed.
    Stream(Incoming),
    /// The first bytes were buffered before the body turned out to exceed the replay limit.
    Prefixed(Option<Bytes>, Incoming),
}

/// What is sent to the client.
#[derive(Debug)]
pub enum RespBody {
    Full(Option<Bytes>),
    Upstream {
        body: BodyStream,
        /// Keeps the endpoint's in-flight count up until the body is done (least-request).
        guard: Option<InflightGuard>,
        /// Told when the upstream breaks the body off (`http_response_incomplete`).
        upstream: Option<Arc<dyn BodyFailure>>,
    },
}

/// Where a response body reports that the upstream broke it off after its head was sent: too
/// late to retry, but a failure all the same. The upstream's outlier detection and metrics
/// implement it; the body needs nothing else of them.
pub trait BodyFailure: Send + Sync + fmt::Debug {
    fn body_failed(&self, ep: &Endpoint);
}

// === impl ReqBody ===

impl ReqBody {
    pub fn empty() -> Self {
        ReqBody::Full(None)
    }

    /// A copy for another attempt, when this body can be replayed.
    pub fn try_clone(&self) -> Option<ReqBody> {
        match self {
            ReqBody::Full(b) => Some(ReqBody::Full(b.clone())),
            _ => None,
        }
    }
}

impl SendBody for ReqBody {
    fn held(&self) -> Held<'_> {
        match self {
            ReqBody::Full(None) => Held::Nothing,
            ReqBody::Full(Some(b)) => Held::Whole(b),
            ReqBody::Stream(_) | ReqBody::Prefixed(..) => Held::Streamed,
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ReqBody::Stream(s) => Pin::new(s).poll_frame(cx),
            ReqBody::Prefixed(prefix, rest) => match prefix.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Full(b) => b.is_none(),
            ReqBody::Stream(s) => s.is_end_stream(),
            ReqBody::Prefixed(p, rest) => p.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ReqBody::Stream(s) => s.size_hint(),
            ReqBody::Prefixed(p, rest) => {
                let n = p.as_ref().map_or(0, |b| b.len() as u64);
                let h = rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + n);
                if let Some(u) = h.upper() {
                    out.set_upper(u + n);
                }
                out
            }
        }
    }
}

// === impl RespBody ===

impl RespBody {
    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        RespBody::Full(if b.is_empty() { None } else { Some(b) })
    }

    pub fn empty() -> Self {
        RespBody::Full(None)
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RespBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RespBody::Upstream {
                body,
                guard,
                upstream,
            } => match std::task::ready!(body.poll_data(cx)) {
                Some(Ok(data)) => {
                    // hyper stops polling a body that says it has ended (a Content-Length body
                    // after its last bytes): the connection is freed with the last data, not
                    // on a final poll that may never come.
                    if body.is_end_stream() {
                        finish(body, guard);
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                None => {
                    finish(body, guard);
                    Poll::Ready(None)
                }
                Some(Err(e)) => {
                    if let (Some(up), Some(g)) = (upstream.take(), guard.as_ref()) {
                        up.body_failed(g.endpoint());
                    }
                    guard.take();
                    Poll::Ready(Some(Err(e)))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(b) => b.is_none(),
            RespBody::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RespBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}

/// The body was read to its end: the connection is free for the next request (when it can carry
/// one) and the request no longer counts as in flight.
fn finish(body: &mut BodyStream, guard: &mut Option<InflightGuard>) {
    if let (Some(conn), Some(g)) = (body.take_idle(), guard.as_ref()) {
        g.endpoint().pool().release(conn);
    }
    guard.take();
}
