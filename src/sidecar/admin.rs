//! The admin server on its own port: `/metrics`, `/live`, `/ready`, `/config`, `/endpoints`.

use std::{convert::Infallible, sync::atomic::Ordering, sync::Arc};

use http::{header, Method, Request, Response, StatusCode};
use hyper::{body::Incoming, service::service_fn};
use serde::Serialize;
use tokio::{net::TcpListener, sync::Notify, time::Instant};

use super::{body::RespBody, runtime::Shared};
use crate::{
    admin_server,
    report::{EndpointsReport, ReportedEndpoint},
};

/// Serves until `stop` is notified (see `admin_server::serve`).
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: Arc<Notify>) {
    let svc = service_fn(move |req| {
        let resp = route(req, &shared);
        async move { Ok::<_, Infallible>(resp) }
    });
    admin_server::serve(listener, svc, async move { stop.notified().await }).await
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
            let ready = shared.ready.load(Ordering::Relaxed);
            let detail = shared.source.lock().detail(ready, &shared.view.load().hash);
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, detail)
        }
        "/config" => {
            let view = shared.view.load();
            let body = serde_json::json!({
                "hash": view.hash,
                "ready": shared.ready.load(Ordering::Relaxed),
                "config": view.config,
                "upstreams": shared.upstream_views(),
                // Per upstream: how long it keeps idle connections open, as far as detour
                // knows, and when pooled connections to it are retired.
                "idleTimeouts": view
                    .upstreams
                    .iter()
                    .map(|(name, _, slot)| (name.clone(), slot.load().idle_view()))
                    .collect::<std::collections::BTreeMap<_, _>>(),
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
        "/endpoints" => json(&endpoints_report(shared)),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /live, /ready, /config or /endpoints\n",
        ),
    }
}

fn endpoints_report(shared: &Shared) -> EndpointsReport {
    let now = Instant::now();
    let view = shared.view.load();
    let upstreams = view
        .upstreams
        .iter()
        .map(|(name, _, slot)| {
            let eps = slot
                .load()
                .endpoints
                .iter()
                .map(|e| ReportedEndpoint {
                    address: e.addr.to_string(),
                    state: e.live_state(now),
                })
                .collect();
            (name.clone(), eps)
        })
        .collect();
    EndpointsReport {
        hash: view.hash.clone(),
        upstreams,
    }
}

fn json(body: &impl Serialize) -> Response<RespBody> {
    let mut r = text(StatusCode::OK, serde_json::to_vec(body).expect("json"));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("static"),
    );
    r
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

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Duration};

    use crate::report::LiveState;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{
        config::{Config, Endpoint, EndpointState, HealthCheckProtocol, Policy, Upstream},
        sidecar::{Options, Sidecar},
    };

    /// A pod that answers every request with 200.
    async fn answering_pod() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = service_fn(|_req: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(RespBody::full("ok\n")))
        });
        tokio::spawn(admin_server::serve(listener, svc, std::future::pending()));
        addr
    }

    /// An address nothing listens on: connections are refused.
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    /// One GET on a fresh connection: (status code, body).
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text[9..12].parse().unwrap();
        let body = text.split_once("\r\n\r\n").map(|x| x.1.to_string());
        (code, body.unwrap_or_default())
    }

    fn endpoint(addr: SocketAddr, state: EndpointState) -> Endpoint {
        Endpoint {
            address: addr.to_string(),
            pod: None,
            state,
        }
    }

    #[tokio::test]
    async fn endpoints_reports_each_upstreams_live_state() {
        let (good, refusing, leaving) = (
            answering_pod().await,
            closed_port().await,
            answering_pod().await,
        );
        let mut policy = Policy::default();
        // Only live traffic decides here.
        policy.health_check.protocol = HealthCheckProtocol::None;
        let config = Config {
            upstreams: vec![Upstream {
                name: "shop/pay".into(),
                listen: "127.0.0.1:0".into(),
                workload_selector: None,
                endpoints: vec![
                    endpoint(good, EndpointState::Ready),
                    endpoint(refusing, EndpointState::Ready),
                    endpoint(leaving, EndpointState::Terminating),
                ],
                policy,
            }],
            ..Config::empty()
        };
        let hash = config.hash();
        let sidecar = Sidecar::start(config, Options::default()).await.unwrap();
        let listener = sidecar.listener_addr("shop/pay").unwrap();
        let admin = sidecar.admin_addr();

        let report = |body: &str| -> EndpointsReport { serde_json::from_str(body).unwrap() };
        let (code, body) = get(admin, "/endpoints").await;
        assert_eq!(code, 200, "{body}");
        let before = report(&body);
        assert_eq!(before.hash, hash);
        let states = |r: &EndpointsReport| -> Vec<(String, LiveState)> {
            r.upstreams["shop/pay"]
                .iter()
                .map(|e| (e.address.clone(), e.state))
                .collect()
        };
        assert_eq!(
            states(&before),
            vec![
                (good.to_string(), LiveState::Healthy),
                (refusing.to_string(), LiveState::Healthy),
                (leaving.to_string(), LiveState::Terminating),
            ]
        );

        // A refused connection ejects at once; balancing is random, so send until it is picked.
        let deadline = Instant::now() + Duration::from_secs(20);
        let ejected = loop {
            let (code, _) = get(listener, "/").await;
            assert_eq!(code, 200, "the refused attempt is retried on the good pod");
            let r = report(&get(admin, "/endpoints").await.1);
            if states(&r)[1].1 == LiveState::Ejected {
                break r;
            }
            assert!(Instant::now() < deadline, "refusing pod never ejected");
        };
        assert_eq!(states(&ejected)[0].1, LiveState::Healthy);
        assert_eq!(states(&ejected)[2].1, LiveState::Terminating);
        // The wire form other tools (the operator) read.
        let raw: serde_json::Value =
            serde_json::from_str(&get(admin, "/endpoints").await.1).unwrap();
        assert_eq!(raw["upstreams"]["shop/pay"][1]["state"], "ejected");
        assert_eq!(
            raw["upstreams"]["shop/pay"][1]["address"],
            refusing.to_string()
        );
        sidecar.shutdown(Duration::ZERO).await;
    }

    #[test]
    fn states_unknown_to_this_build_still_parse() {
        let r: EndpointsReport = serde_json::from_str(
            r#"{"hash":"x","upstreams":{"a/b":[{"address":"10.0.0.1:80","state":"draining"}]}}"#,
        )
        .unwrap();
        assert_eq!(r.upstreams["a/b"][0].state, LiveState::Unknown);
    }
}
