//! The admin server on its own port: `/metrics`, `/live`, `/ready`, `/config`, `/endpoints`.

use std::{convert::Infallible, sync::atomic::Ordering, sync::Arc};

use http::{header, Method, Request, Response, StatusCode};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::{net::TcpListener, time::Instant};

use super::{body::RespBody, runtime::Shared};
use crate::report::{EndpointsReport, ReportedEndpoint};

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
        demo::pod::{Fault, SimPod},
        sidecar::{Options, Sidecar},
    };

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
        let good = SimPod::start("good").await.unwrap();
        let refusing = SimPod::start("refusing").await.unwrap();
        refusing.set_fault(Fault::Refuse).await.unwrap();
        let leaving = SimPod::start("leaving").await.unwrap();
        let mut policy = Policy::default();
        // Only live traffic decides here.
        policy.health_check.protocol = HealthCheckProtocol::None;
        let config = Config {
            upstreams: vec![Upstream {
                name: "shop/pay".into(),
                listen: "127.0.0.1:0".into(),
                workload_selector: None,
                endpoints: vec![
                    endpoint(good.addr(), EndpointState::Ready),
                    endpoint(refusing.addr(), EndpointState::Ready),
                    endpoint(leaving.addr(), EndpointState::Terminating),
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
                (good.addr().to_string(), LiveState::Healthy),
                (refusing.addr().to_string(), LiveState::Healthy),
                (leaving.addr().to_string(), LiveState::Terminating),
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
            refusing.addr().to_string()
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
