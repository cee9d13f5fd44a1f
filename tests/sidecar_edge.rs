//! Less common paths: bodies cut short, bodies too large to replay, connect timeouts,
//! terminating endpoints, and the ejection cap.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use support::{sidecar::*, *};

#[tokio::test]
async fn a_body_cut_short_reaches_the_client_as_a_break_and_is_counted() {
    let h = Harness::start(1, fast_policy()).await;
    h.pods[0].set_fault(Fault::TruncatedBody).await.unwrap();
    let before = h.metrics();
    // The head was streamed to the client before the body broke: the client sees the break.
    let res = send_fresh(h.addr(), request(Method::GET, "/")).await;
    assert!(
        res.is_err(),
        "a truncated body reached the client whole: {res:?}"
    );
    h.counted(&before, "detour_response_body_errors_total", &[], 1.0)
        .await;
    let after = h.metrics();
    assert_eq!(d(&after, &before, "detour_retries_total", &[]), 0.0);
    assert_eq!(
        h.pods[0].requests(),
        1,
        "a response already streamed is never retried"
    );
}

#[tokio::test]
async fn a_body_cut_short_is_a_failed_attempt_with_cause_http_response_incomplete() {
    let h = Harness::start(1, fast_policy()).await;
    h.pods[0].set_fault(Fault::TruncatedBody).await.unwrap();
    let before = h.metrics();
    let _ = send_fresh(h.addr(), request(Method::GET, "/")).await;
    h.counted(&before, "detour_response_body_errors_total", &[], 1.0)
        .await;
    let after = h.metrics();
    assert_eq!(
        d(
            &after,
            &before,
            "detour_attempt_failures_total",
            &[("cause", "http_response_incomplete")]
        ),
        1.0,
        "{:?}",
        after.by_label("detour_attempt_failures_total", &[], "cause")
    );
}

#[tokio::test]
async fn a_body_larger_than_the_replay_buffer_is_not_retried() {
    let mut p = fast_policy();
    p.outlier_detection.consecutive_gateway_errors = 0;
    p.retries.max_buffered_body_bytes = 1024;
    let h = Harness::start(2, p).await;
    h.pods[0].set_fault(Fault::ResetAfterRequest).await.unwrap();
    let big = vec![b'x'; 8 * 1024];
    let before = h.metrics();
    let mut failed = None;
    for id in 0..100 {
        let mut req = request_with_body(Method::POST, "/upload", big.clone());
        req.headers_mut()
            .insert("idempotency-key", format!("k{id}").parse().unwrap());
        let r = h.send(req).await;
        if r.status == StatusCode::OK {
            assert_eq!(r.body.len(), big.len());
            continue;
        }
        failed = Some(r);
        break;
    }
    let r = failed.expect("the resetting pod got no upload");
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{r:?}");
    assert_eq!(r.proxy_error().error, "connection_terminated");
    assert_eq!(r.attempts(), Some(1));
    assert_eq!(h.pods[0].last_request().unwrap().body_len, big.len());
    let after = h.metrics();
    assert_eq!(
        d(
            &after,
            &before,
            "detour_retries_skipped_total",
            &[("reason", "body_not_replayable")]
        ),
        1.0
    );
    // Small bodies with a key are still retried.
    let mut rescued = 0;
    for id in 0..100 {
        let mut req = request_with_body(Method::POST, "/small", "tiny");
        req.headers_mut()
            .insert("idempotency-key", format!("s{id}").parse().unwrap());
        assert_eq!(h.send(req).await.status, StatusCode::OK);
        rescued = d(&h.metrics(), &after, "detour_requests_rescued_total", &[]) as u32;
        if rescued > 0 {
            break;
        }
    }
    assert_eq!(rescued, 1);
}

#[tokio::test]
async fn a_connect_timeout_is_retried_elsewhere() {
    let hole = blackhole().await;
    let pod = SimPod::start("pod-1").await.unwrap();
    let mut p = fast_policy();
    p.timeouts.connect = ms(200);
    p.outlier_detection.consecutive_gateway_errors = 0;
    let sidecar = Sidecar::start(config_for(&[hole.addr, pod.addr()], p), Options::default())
        .await
        .unwrap();
    let addr = sidecar.listener_addr(UPSTREAM).unwrap();
    let metrics = || Metrics::parse(&sidecar.metrics_text()).unwrap();
    let before = metrics();
    get_ok_until(addr, "/", 100, "a connect timeout", || {
        d(
            &metrics(),
            &before,
            "detour_attempt_failures_total",
            &[("cause", "connection_timeout")],
        ) >= 1.0
    })
    .await;
    let after = metrics();
    let timeouts = d(
        &after,
        &before,
        "detour_attempt_failures_total",
        &[("cause", "connection_timeout")],
    );
    assert!(timeouts >= 1.0, "the black hole was never tried");
    assert_eq!(
        d(&after, &before, "detour_requests_rescued_total", &[]),
        timeouts
    );
    assert_eq!(d(&after, &before, "detour_gateway_errors_total", &[]), 0.0);
}

#[tokio::test]
async fn a_lone_black_hole_gives_504_connection_timeout() {
    let hole = blackhole().await;
    let mut p = fast_policy();
    p.timeouts.connect = ms(200);
    let sidecar = Sidecar::start(config_for(&[hole.addr], p), Options::default())
        .await
        .unwrap();
    let addr = sidecar.listener_addr(UPSTREAM).unwrap();
    let t = std::time::Instant::now();
    let r = send_fresh(addr, request(Method::GET, "/")).await.unwrap();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{r:?}");
    let ps = r.proxy_error();
    assert_eq!(ps.error, "connection_timeout");
    assert!(ps.details.contains(&hole.addr.to_string()), "{ps:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[tokio::test]
async fn terminating_endpoints_serve_only_when_nothing_else_is_left() {
    let pods = [
        SimPod::start("pod-0").await.unwrap(),
        SimPod::start("pod-1").await.unwrap(),
    ];
    let mut cfg = config_for(&[pods[0].addr(), pods[1].addr()], fast_policy());
    cfg.upstreams[0].endpoints[1].state = detour::config::EndpointState::Terminating;
    let sidecar = Sidecar::start(cfg, Options::default()).await.unwrap();
    let addr = sidecar.listener_addr(UPSTREAM).unwrap();
    for n in 0..20 {
        let r = send_fresh(addr, request(Method::GET, &format!("/{n}")))
            .await
            .unwrap();
        assert_eq!(r.pod(), Some("pod-0"), "a terminating endpoint got traffic");
    }
    pods[0].kill().await.unwrap();
    for n in 0..10 {
        let r = send_fresh(addr, request(Method::GET, &format!("/last/{n}")))
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.pod(), Some("pod-1"));
    }
}

#[tokio::test]
async fn ejections_stop_at_max_ejection_percent() {
    let mut p = fast_policy();
    p.outlier_detection.consecutive_gateway_errors = 1;
    p.outlier_detection.max_ejection_percent = 50;
    p.retries.attempts = 0;
    let h = Harness::start(3, p).await;
    for pod in &h.pods {
        pod.set_fault(Fault::Always503).await.unwrap();
    }
    let before = h.metrics();
    for n in 0..30 {
        let r = h.get(&format!("/{n}")).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let after = h.metrics();
    assert_eq!(m(&after, "detour_endpoints", &[("state", "ejected")]), 1.0);
    assert_eq!(d(&after, &before, "detour_ejections_total", &[]), 1.0);
    assert!(d(&after, &before, "detour_ejections_skipped_total", &[]) >= 1.0);
    let ejected = h
        .sidecar
        .upstreams()
        .into_iter()
        .flat_map(|u| u.endpoints)
        .filter(|e| e.ejected)
        .count();
    assert_eq!(ejected, 1);
}

#[tokio::test]
async fn an_endpoint_back_from_ejection_that_fails_again_is_ejected_at_once_for_longer() {
    let mut p = fast_policy();
    p.outlier_detection.base_ejection_time = ms(300);
    let h = Harness::start(2, p).await;
    h.pods[0].set_fault(Fault::Always502).await.unwrap();
    let ep = h.pods[0].addr();
    h.get_ok_until("/", 200, "pod-0 ejected", || h.endpoint(ep).ejected)
        .await;
    assert_eq!(h.pods[0].requests(), 3);
    let before = h.metrics();
    eventually(PATIENCE, "the ejection ends", || {
        (!h.endpoint(ep).ejected).then_some(())
    })
    .await;
    // Its first failure on return ejects it again, without waiting for 3 in a row.
    h.get_ok_until("/back/", 200, "pod-0 to get a request back", || {
        h.pods[0].requests() > 3
    })
    .await;
    assert_eq!(h.pods[0].requests(), 4);
    let snap = h.endpoint(ep);
    assert!(snap.ejected, "{snap:?}");
    assert_eq!(snap.ejections, 2);
    assert_eq!(
        d(
            &h.metrics(),
            &before,
            "detour_ejections_total",
            &[("reason", "probation_failure")]
        ),
        1.0
    );
}
