//! The sidecar's metrics as a real Prometheus sees them: `promtool check metrics` on the
//! `/metrics` output, then a real `prometheus` server (Debian's package) scraping the admin port,
//! queried over its HTTP API until `detour_requests_total` shows up with the right labels.
//!
//! Needs `prometheus` and `promtool` on PATH (`apt-get install -y prometheus`; `.ci/test` installs
//! them). Without them the test fails when `CI=true` and skips with a notice otherwise.
#![forbid(unsafe_code)]

#[path = "support/prometheus.rs"]
mod real_prometheus;
mod support;

use std::{fs, net::SocketAddr, process::Command, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1 as server_http1, service::service_fn};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use detour::config::Config;
use detour::sidecar::{Options, Sidecar};
use real_prometheus::{Prometheus, TempDir, Tools};
use support::http_get;

const UPSTREAM: &str = "prom-scrape";
const REQUESTS: usize = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_scrapes_the_admin_port() {
    let Some(tools) = Tools::find() else {
        return;
    };
    let tmp = TempDir::new("detour-prometheus-scrape");

    // An upstream and the sidecar in front of it, on 127.0.0.1 only.
    let upstream = start_upstream().await;
    let cfg = Config::from_str_validated(&format!(
        "apiVersion: detour.dev/v1alpha1\n\
         kind: SidecarConfig\n\
         upstreams:\n\
         - name: {UPSTREAM}\n  \
           listen: 127.0.0.1:0\n  \
           endpoints:\n  \
           - address: {upstream}\n    \
             pod: scrape-0\n  \
           policy:\n    \
             healthCheck: {{ interval: 1s, timeout: 500ms }}\n"
    ))
    .expect("test config is valid");
    let hash = cfg.hash();
    let sidecar = Sidecar::start(cfg, Options::default())
        .await
        .expect("sidecar starts");
    let listener = sidecar
        .listener_addr(UPSTREAM)
        .expect("the sidecar listens for the upstream");
    let admin = sidecar.admin_addr();

    for i in 0..REQUESTS {
        let (status, body) = http_get(listener, &format!("/item/{i}")).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "request {i} through the sidecar: {body}"
        );
        assert_eq!(body, "hello from upstream");
    }
    // One upstream 502 (passed through): a per-endpoint failure series for promtool to check.
    let (status, _) = http_get(listener, "/fail").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);

    // 1. The exposition format is what Prometheus's own linter accepts.
    let (status, metrics) = http_get(admin, "/metrics").await;
    assert_eq!(status, StatusCode::OK, "GET /metrics: {metrics}");
    assert!(
        metrics.contains("detour_requests_total{"),
        "/metrics has no detour_requests_total series:\n{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            r#"detour_endpoint_attempt_failures_total{{cause="upstream_status",upstream="{UPSTREAM}",upstream_address="{upstream}",upstream_pod="scrape-0"}}"#
        )),
        "/metrics has no per-endpoint failure series:\n{metrics}"
    );
    let metrics_file = tmp.path().join("metrics.txt");
    fs::write(&metrics_file, &metrics).expect("write metrics");
    let promtool = tools.promtool.clone();
    let check = tokio::task::spawn_blocking(move || {
        support::validate::output_with_stdin(
            Command::new(&promtool).args(["check", "metrics"]),
            &metrics,
        )
    })
    .await
    .expect("promtool task");
    assert!(
        check.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n(metrics saved in {})",
        check.status,
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr),
        metrics_file.display()
    );

    // 2. A real Prometheus scrapes the admin port every second.
    let prometheus = Prometheus::start(&tools, &tmp, admin).await;
    let series = prometheus
        .wait_for(
            &format!("detour_requests_total{{upstream=\"{UPSTREAM}\"}}"),
            |s| {
                s.label("status") == Some("200")
                    && s.label("job") == Some("detour")
                    && s.label("instance") == Some(admin.to_string().as_str())
                    && s.value >= REQUESTS as f64
            },
        )
        .await;
    assert_eq!(series.label("upstream"), Some(UPSTREAM));

    // The running config's hash is published the same way (`detour_config_info{hash}`).
    prometheus
        .wait_for("detour_config_info", |s| {
            s.label("hash") == Some(hash.as_str())
        })
        .await;

    drop(prometheus);
    sidecar.shutdown(Duration::from_secs(1)).await;
}

// === HTTP on 127.0.0.1 ===

/// An upstream that answers every request (health checks included) with 200.
async fn start_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                // `/fail...` answers 502, so the scrape also holds per-endpoint failure series.
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let mut r =
                        Response::new(Full::new(Bytes::from_static(b"hello from upstream")));
                    if req.uri().path().starts_with("/fail") {
                        *r.status_mut() = StatusCode::BAD_GATEWAY;
                    }
                    Ok::<_, std::convert::Infallible>(r)
                });
                let _ = server_http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}
