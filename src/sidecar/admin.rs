//! The admin server on its own port: `/metrics`, `/live`, `/ready`, `/config`.

use std::{convert::Infallible, sync::atomic::Ordering, sync::Arc};

use http::{header, Method, Request, Response, StatusCode};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{body::RespBody, runtime::Shared};

pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(req, &shared)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn route(req: Request<Incoming>, shared: &Shared) -> Response<RespBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = text(StatusCode::OK, shared.metrics_text());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8"
                    .parse()
                    .expect("static"),
            );
            r
        }
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => {
            if shared.ready.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no valid config loaded yet\n",
                )
            }
        }
        "/config" => {
            let view = shared.view.load();
            let body = serde_json::json!({
                "hash": view.hash,
                "ready": shared.ready.load(Ordering::Relaxed),
                "config": view.config,
                "upstreams": shared.upstream_views(),
            });
            let mut r = text(
                StatusCode::OK,
                serde_json::to_string_pretty(&body).expect("json"),
            );
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                "application/json".parse().expect("static"),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /live, /ready or /config\n",
        ),
    }
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<RespBody> {
    let mut r = Response::new(RespBody::full(body));
    *r.status_mut() = status;
    if !r.headers().contains_key(header::CONTENT_TYPE) {
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            "text/plain; charset=utf-8".parse().expect("static"),
        );
    }
    r
}
