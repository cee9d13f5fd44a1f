//! The operator's admin port: `/metrics`, `/live`, `/ready`.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use tokio::net::TcpListener;

use super::{certs::CertStore, metrics::Metrics};
use crate::admin_server;

/// Readiness inputs. With the webhook, a replica is ready once it serves the webhook with a
/// valid certificate, leader or not (leadership shows in `detour_operator_leader`), so a leader
/// failover never takes the webhook away. Without it, ready means leading (or no lease needed)
/// with every cache synced.
#[derive(Debug, Default)]
pub struct Readiness {
    pub leader: AtomicBool,
    pub synced: AtomicBool,
    pub webhook: std::sync::OnceLock<Arc<CertStore>>,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        match self.webhook.get() {
            Some(certs) => certs.valid(),
            None => self.leader.load(Ordering::Acquire) && self.synced.load(Ordering::Acquire),
        }
    }

    fn why_not(&self) -> &'static str {
        if self.webhook.get().is_some() {
            "not ready: no valid webhook certificate yet\n"
        } else if !self.leader.load(Ordering::Acquire) {
            "not ready: not the leader\n"
        } else {
            "not ready: caches not synced\n"
        }
    }
}

/// Serves until the task is aborted (see `admin_server::serve`).
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, readiness: Arc<Readiness>) {
    let svc = service_fn(move |req| {
        let res = respond(&req, &metrics, &readiness);
        async move { Ok::<_, Infallible>(res) }
    });
    admin_server::serve(listener, svc, std::future::pending()).await
}

fn respond(
    req: &Request<Incoming>,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, ctype: &'static str| {
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("valid response")
    };
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".into(),
            "text/plain",
        );
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, metrics.text(), "text/plain; version=0.0.4"),
        "/live" => text(StatusCode::OK, "live\n".into(), "text/plain"),
        "/ready" if readiness.ready() => text(StatusCode::OK, "ready\n".into(), "text/plain"),
        "/ready" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            readiness.why_not().into(),
            "text/plain",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
