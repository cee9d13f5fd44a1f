//! Concurrent traffic: a hung endpoint must not stall clients (per-try timeout plus
//! in-flight-aware balancing), and large streamed bodies pass through intact.

mod support;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use support::{sidecar::*, *};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_endpoint_does_not_stall_concurrent_clients() {
    let mut p = fast_policy();
    p.retries.per_try_timeout = ms(500);
    p.health_check.protocol = HealthCheckProtocol::Http;
    p.health_check.timeout = ms(200);
    let h = Arc::new(Harness::start(3, p).await);
    h.pods[0].set_fault(Fault::Hang).await.unwrap();
    let errors = Arc::new(AtomicU64::new(0));
    let slowest = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (h, errors, slowest, sent) = (h.clone(), errors.clone(), slowest.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = connect(h.addr()).await.unwrap();
            let until = Instant::now() + Duration::from_secs(2);
            let mut n = 0;
            while Instant::now() < until {
                n += 1;
                let t = Instant::now();
                let res = tokio::time::timeout(
                    Duration::from_secs(2),
                    send_on(&mut conn, request(Method::GET, &format!("/w{w}/{n}"))),
                )
                .await;
                slowest.fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
                sent.fetch_add(1, Ordering::Relaxed);
                match res {
                    Ok(Ok(r)) if r.status == StatusCode::OK => {}
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        conn = connect(h.addr()).await.unwrap();
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let sent = sent.load(Ordering::Relaxed);
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "client-visible errors in {sent} requests"
    );
    let slowest = slowest.load(Ordering::Relaxed);
    assert!(slowest < 2000, "a client waited {slowest} ms");
    assert!(sent > 100, "only {sent} requests in 2 s");
    // The hung pod saw only the few requests that revealed it.
    assert!(
        h.pods[0].requests() <= 16,
        "{} requests stuck on the hung pod",
        h.pods[0].requests()
    );
}

#[tokio::test]
async fn idle_upstream_connections_are_closed_after_pool_idle() {
    let mut p = fast_policy();
    p.timeouts.pool_idle = ms(200);
    let h = Harness::start(1, p).await;
    assert_eq!(h.get("/").await.status, StatusCode::OK);
    eventually(
        PATIENCE,
        "the sidecar closes its idle upstream connection",
        || (h.pods[0].open_connections() == 0).then_some(()),
    )
    .await;
    assert_eq!(h.get("/again").await.status, StatusCode::OK);
    assert_eq!(h.pods[0].connections(), 2);
}

#[tokio::test]
async fn failures_not_listed_in_retries_on_are_not_retried() {
    let mut p = fast_policy();
    p.retries.on = vec![detour::config::RetryOn::ConnectFailure];
    p.outlier_detection.consecutive_gateway_errors = 0;
    let h = Harness::start(2, p).await;
    h.pods[0].set_fault(Fault::Always503).await.unwrap();
    let before = h.metrics();
    let mut passed_through = 0;
    for n in 0..100 {
        let r = h.get(&format!("/{n}")).await;
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(r.pod(), Some("pod-0"));
            passed_through += 1;
            if passed_through == 2 {
                break;
            }
        }
    }
    assert_eq!(passed_through, 2);
    let after = h.metrics();
    assert_eq!(d(&after, &before, "detour_retries_total", &[]), 0.0);
    assert_eq!(
        d(
            &after,
            &before,
            "detour_retries_skipped_total",
            &[("reason", "not_retryable")]
        ),
        2.0
    );
}

#[tokio::test]
async fn a_large_streamed_upload_passes_through_intact() {
    let h = Harness::start(1, fast_policy()).await;
    // 256 KiB in 64 chunks, sent with chunked transfer encoding (no content-length).
    let chunks: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = (0..64u8)
        .map(|i| {
            Ok(http_body::Frame::data(Bytes::from(vec![
                b'a' + i % 26;
                4096
            ])))
        })
        .collect();
    let body = StreamBody::new(futures::stream::iter(chunks));
    let req = Request::builder()
        .method(Method::POST)
        .uri("/upload")
        .header(http::header::HOST, "app.test")
        .body(body)
        .unwrap();
    let stream = tokio::net::TcpStream::connect(h.addr()).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = within(PATIENCE, "upload answer", s.send_request(req))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let echoed = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed.len(), 64 * 4096);
    assert!(echoed
        .chunks(4096)
        .enumerate()
        .all(|(i, c)| c.iter().all(|&b| b == b'a' + (i as u8) % 26)));
    let rec = h.pods[0].last_request().unwrap();
    assert_eq!(rec.body_len, 64 * 4096);
}
