//! One test per fault class of the simulated upstream: one faulty pod next to a healthy one, and
//! the client must not notice. Each test checks what the client saw, the cause the sidecar
//! recorded for the failed attempts, and the metric deltas (failures = retries = rescued, no
//! gateway error). What a single faulty endpoint makes the client see is in
//! `sidecar_single_endpoint.rs`.

mod support;

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use support::{sidecar::*, *};

/// Sends GETs until the sidecar has recorded `want` failed attempts of `cause` (or `limit`
/// requests were sent); every response must be a 200 from the healthy pod-1. Returns the number
/// of requests sent.
async fn absorb_until(
    h: &Harness,
    before: &Metrics,
    cause: &str,
    want: f64,
    limit: usize,
) -> usize {
    for n in 1..=limit {
        let r = h.get(&format!("/item/{n}")).await;
        assert_eq!(r.status, StatusCode::OK, "request {n}: {r:?}");
        assert!(r.proxy_status().is_none(), "{r:?}");
        assert_eq!(r.pod(), Some("pod-1"), "a failed attempt leaked: {r:?}");
        let failures = d(
            &h.metrics(),
            before,
            "detour_attempt_failures_total",
            &[("cause", cause)],
        );
        if failures >= want {
            return n;
        }
    }
    panic!("no {want} {cause} failures after {limit} requests");
}

/// The bookkeeping every absorbed failure must leave: each failed attempt was retried once and
/// the retry rescued the request; the client saw only 200s.
fn assert_absorbed(after: &Metrics, before: &Metrics, cause: &str, sent: usize) -> f64 {
    let failures = d(
        after,
        before,
        "detour_attempt_failures_total",
        &[("cause", cause)],
    );
    assert!(failures >= 1.0);
    assert_eq!(
        d(after, before, "detour_attempt_failures_total", &[]),
        failures,
        "only {cause} failures expected: before {:?} after {:?}",
        before.by_label("detour_attempt_failures_total", &[], "cause"),
        after.by_label("detour_attempt_failures_total", &[], "cause"),
    );
    assert_eq!(
        d(after, before, "detour_retries_total", &[("reason", cause)]),
        failures
    );
    assert_eq!(d(after, before, "detour_retries_total", &[]), failures);
    assert_eq!(
        d(after, before, "detour_requests_rescued_total", &[]),
        failures
    );
    assert_eq!(d(after, before, "detour_gateway_errors_total", &[]), 0.0);
    assert_eq!(
        d(after, before, "detour_requests_total", &[("status", "200")]),
        sent as f64
    );
    assert_eq!(d(after, before, "detour_requests_total", &[]), sent as f64);
    failures
}

/// pod-0 of two answers with `fault`: its three failed attempts (of `cause`) are absorbed, then
/// it is ejected, having seen only those three requests.
async fn pod0_fault_is_absorbed_then_ejected(fault: Fault, cause: &str) {
    let h = Harness::start(2, fast_policy()).await;
    h.pods[0].set_fault(fault).await.unwrap();
    let before = h.metrics();
    assert_ejected_after_three(&h, &before, cause).await;
    assert_eq!(h.pods[0].requests(), 3);
}

/// After `consecutiveGatewayErrors` (3) failures the faulty endpoint is ejected: further
/// requests never reach it.
async fn assert_ejected_after_three(h: &Harness, before: &Metrics, cause: &str) {
    let sent = absorb_until(h, before, cause, 3.0, 200).await;
    let seen = h.pods[0].requests();
    for n in 0..10 {
        let r = h.get(&format!("/after/{n}")).await;
        assert_eq!(r.pod(), Some("pod-1"), "{r:?}");
    }
    assert_eq!(
        h.pods[0].requests(),
        seen,
        "an ejected endpoint got traffic"
    );
    let after = h.metrics();
    let failures = assert_absorbed(&after, before, cause, sent + 10);
    assert_eq!(failures, 3.0, "3 failures eject");
    assert_eq!(
        d(
            &after,
            before,
            "detour_ejections_total",
            &[("reason", "consecutive_gateway_errors")]
        ),
        1.0
    );
    assert_eq!(m(&after, "detour_endpoints", &[("state", "ejected")]), 1.0);
    assert!(h.endpoint(h.pods[0].addr()).ejected);
}

#[tokio::test]
async fn healthy_pods_share_the_load_without_failures() {
    let h = Harness::start(3, fast_policy()).await;
    let before = h.metrics();
    for n in 0..30 {
        let r = h
            .send(request_with_body(
                Method::POST,
                "/echo",
                format!("body {n}"),
            ))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.text(), format!("body {n}"));
        assert!(r.proxy_status().is_none());
    }
    let after = h.metrics();
    assert_eq!(
        d(
            &after,
            &before,
            "detour_requests_total",
            &[("status", "200")]
        ),
        30.0
    );
    assert_eq!(
        d(
            &after,
            &before,
            "detour_request_duration_seconds_count",
            &[]
        ),
        30.0
    );
    for name in [
        "detour_attempt_failures_total",
        "detour_gateway_errors_total",
        "detour_retries_total",
        "detour_requests_rescued_total",
        "detour_ejections_total",
    ] {
        assert_eq!(d(&after, &before, name, &[]), 0.0, "{name}");
    }
    assert_eq!(m(&after, "detour_endpoints", &[("state", "ejected")]), 0.0);
    let seen: Vec<u64> = h.pods.iter().map(SimPod::requests).collect();
    assert_eq!(seen.iter().sum::<u64>(), 30);
    assert!(seen.iter().all(|&n| n > 0), "load not spread: {seen:?}");
}

#[tokio::test]
async fn always_502_is_retried_elsewhere_and_ejected() {
    let h = Harness::start(2, fast_policy()).await;
    h.pods[0].set_fault(Fault::Always502).await.unwrap();
    let before = h.metrics();
    assert_ejected_after_three(&h, &before, "upstream_status").await;
    assert_eq!(h.pods[0].counters().by_status.get(&502), Some(&3));
}

#[tokio::test]
async fn always_503_and_504_count_as_upstream_status() {
    for fault in [Fault::Always503, Fault::Always504] {
        let h = Harness::start(2, fast_policy()).await;
        h.pods[0].set_fault(fault).await.unwrap();
        let before = h.metrics();
        let sent = absorb_until(&h, &before, "upstream_status", 1.0, 200).await;
        let failures = assert_absorbed(&h.metrics(), &before, "upstream_status", sent);
        assert_eq!(failures, h.pods[0].requests() as f64);
    }
}

#[tokio::test]
async fn refused_connections_eject_at_once() {
    let h = Harness::start(2, fast_policy()).await;
    h.pods[0].kill().await.unwrap();
    let before = h.metrics();
    let sent = absorb_until(&h, &before, "connection_refused", 1.0, 200).await;
    for n in 0..10 {
        assert_eq!(h.get(&format!("/after/{n}")).await.pod(), Some("pod-1"));
    }
    let after = h.metrics();
    let failures = assert_absorbed(&after, &before, "connection_refused", sent + 10);
    assert_eq!(
        failures, 1.0,
        "a refusing endpoint must be ejected after one refusal"
    );
    assert_eq!(
        d(
            &after,
            &before,
            "detour_ejections_total",
            &[("reason", "connect_refused")]
        ),
        1.0
    );
    assert_eq!(h.pods[0].connections(), 0);
}

#[tokio::test]
async fn hanging_pod_is_left_after_the_per_try_timeout() {
    let h = Harness::start(2, fast_policy()).await;
    h.pods[0].set_fault(Fault::Hang).await.unwrap();
    let before = h.metrics();
    let t = Instant::now();
    assert_ejected_after_three(&h, &before, "http_response_timeout").await;
    // Each hung attempt costs one per-try timeout (1 s), not the 6 s request timeout.
    assert!(t.elapsed() < Duration::from_secs(12), "{:?}", t.elapsed());
    assert_eq!(h.pods[0].requests(), 3);
}

#[tokio::test]
async fn reset_after_request_is_retried_for_idempotent_requests() {
    pod0_fault_is_absorbed_then_ejected(Fault::ResetAfterRequest, "connection_terminated").await;
}

#[tokio::test]
async fn malformed_responses_are_retried_as_protocol_errors() {
    pod0_fault_is_absorbed_then_ejected(Fault::Malformed, "http_protocol_error").await;
}

#[tokio::test]
async fn slow_pod_within_the_per_try_timeout_is_waited_for_and_beyond_it_is_left() {
    let h = Harness::start(2, fast_policy()).await;
    h.pods[0]
        .set_fault(Fault::Slow(Duration::from_millis(100)))
        .await
        .unwrap();
    let before = h.metrics();
    let mut slow = 0;
    for n in 0..100 {
        let t = Instant::now();
        let r = h.get(&format!("/slow/{n}")).await;
        assert_eq!(r.status, StatusCode::OK);
        if r.pod() == Some("pod-0") {
            assert!(t.elapsed() >= Duration::from_millis(100));
            slow += 1;
            if slow == 3 {
                break;
            }
        }
    }
    assert_eq!(slow, 3, "the slow pod got no traffic");
    let after = h.metrics();
    assert_eq!(
        d(&after, &before, "detour_attempt_failures_total", &[]),
        0.0,
        "{:?}",
        after.by_label("detour_attempt_failures_total", &[], "cause")
    );
    assert!(d(&after, &before, "detour_request_duration_seconds_sum", &[]) >= 0.3);

    // Slower than perTryTimeout (1 s): the attempt times out and pod-1 answers.
    h.pods[0]
        .set_fault(Fault::Slow(Duration::from_secs(2)))
        .await
        .unwrap();
    let before = h.metrics();
    let sent = absorb_until(&h, &before, "http_response_timeout", 1.0, 200).await;
    assert_absorbed(&h.metrics(), &before, "http_response_timeout", sent);
}

#[tokio::test]
async fn idle_connections_closed_by_the_upstream_never_reach_the_client() {
    // The upstream closes idle connections after 100 ms while the sidecar would keep them 10 s:
    // requests spaced around 100 ms apart race the upstream's close.
    let mut policy = fast_policy();
    policy.timeouts.pool_idle = CfgDuration::from_secs(10);
    let h = Harness::start(1, policy).await;
    h.pods[0]
        .set_fault(Fault::CloseIdleAfter(Duration::from_millis(100)))
        .await
        .unwrap();
    let before = h.metrics();
    for n in 0..24u64 {
        let r = h.get(&format!("/idle/{n}")).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        tokio::time::sleep(Duration::from_millis(80 + (n * 7) % 40)).await;
    }
    let after = h.metrics();
    assert!(
        h.pods[0].connections() >= 2,
        "the upstream never closed an idle connection"
    );
    assert_eq!(d(&after, &before, "detour_gateway_errors_total", &[]), 0.0);
    assert_eq!(
        d(
            &after,
            &before,
            "detour_requests_total",
            &[("status", "200")]
        ),
        24.0
    );
    let races = d(
        &after,
        &before,
        "detour_attempt_failures_total",
        &[("cause", "keepalive_race")],
    );
    assert_eq!(
        d(&after, &before, "detour_attempt_failures_total", &[]),
        races
    );
    assert_eq!(
        d(&after, &before, "detour_keepalive_races_total", &[]),
        races
    );
    assert_eq!(
        d(&after, &before, "detour_requests_rescued_total", &[]),
        races
    );
}

#[tokio::test]
async fn a_request_on_a_stale_keep_alive_connection_is_retried_on_a_fresh_one() {
    let h = Harness::start(1, fast_policy()).await;
    h.pods[0]
        .set_fault(Fault::StaleKeepAlive(Duration::from_millis(100)))
        .await
        .unwrap();
    let before = h.metrics();
    assert_eq!(h.get("/first").await.status, StatusCode::OK);
    // The sidecar's pooled connection (poolIdle 4 s) is now stale for the upstream.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = h.get("/second").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let after = h.metrics();
    assert_eq!(d(&after, &before, "detour_keepalive_races_total", &[]), 1.0);
    assert_absorbed(&after, &before, "keepalive_race", 2);
    assert_eq!(
        h.pods[0].requests(),
        3,
        "first, the dropped second, and its retry"
    );
    assert_eq!(h.pods[0].connections(), 2);
    // A keep-alive race is the pool's fault, not the endpoint's.
    assert!(!h.endpoint(h.pods[0].addr()).ejected);
}

#[tokio::test]
async fn flapping_pod_failures_are_all_absorbed() {
    let mut policy = fast_policy();
    policy.health_check.protocol = HealthCheckProtocol::Http;
    policy.health_check.timeout = ms(200);
    // As deployed: should both endpoints look unhealthy at once, balance over both.
    policy.panic_threshold = 50;
    policy.outlier_detection.base_ejection_time = ms(200);
    policy.outlier_detection.max_ejection_time = ms(400);
    let h = Harness::start(2, policy).await;
    h.pods[0]
        .set_fault(Fault::Flapping {
            period: Duration::from_millis(150),
            bad: Box::new(Fault::Always502),
        })
        .await
        .unwrap();
    let before = h.metrics();
    let t = Instant::now();
    let mut sent = 0;
    loop {
        let c = h.pods[0].counters();
        let both = c.by_status.contains_key(&200) && c.by_status.contains_key(&502);
        if both && t.elapsed() > Duration::from_secs(1) {
            break;
        }
        assert!(
            t.elapsed() < PATIENCE,
            "flapping pod never both served and failed: {c:?}"
        );
        let r = h.get(&format!("/flap/{sent}")).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = h.metrics();
    let failures = assert_absorbed(&after, &before, "upstream_status", sent);
    assert_eq!(failures, h.pods[0].counters().by_status[&502] as f64);
    assert!(
        d(
            &after,
            &before,
            "detour_health_checks_total",
            &[("result", "failure")]
        ) >= 1.0
    );
    assert!(
        d(
            &after,
            &before,
            "detour_health_checks_total",
            &[("result", "success")]
        ) >= 1.0
    );
    assert!(h.pods[0].health_checks() >= 2);
}

#[tokio::test]
async fn a_pod_flapping_between_up_and_down_never_reaches_the_client() {
    let mut policy = fast_policy();
    policy.outlier_detection.base_ejection_time = ms(200);
    policy.outlier_detection.max_ejection_time = ms(400);
    let h = Harness::start(2, policy).await;
    h.pods[0]
        .set_fault(Fault::Flapping {
            period: Duration::from_millis(150),
            bad: Box::new(Fault::Refuse),
        })
        .await
        .unwrap();
    let before = h.metrics();
    let t = Instant::now();
    let mut sent = 0;
    let refused = |m: &Metrics| {
        d(
            m,
            &before,
            "detour_attempt_failures_total",
            &[("cause", "connection_refused")],
        )
    };
    while t.elapsed() < Duration::from_millis(1500)
        || h.pods[0].requests() == 0
        || refused(&h.metrics()) == 0.0
    {
        assert!(
            t.elapsed() < PATIENCE,
            "the flapping pod never both served ({}) and refused",
            h.pods[0].requests()
        );
        let r = h.get(&format!("/flap/{sent}")).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = h.metrics();
    let failures = d(&after, &before, "detour_attempt_failures_total", &[]);
    assert!(
        d(
            &after,
            &before,
            "detour_attempt_failures_total",
            &[("cause", "connection_refused")]
        ) >= 1.0,
        "{:?}",
        after.by_label("detour_attempt_failures_total", &[], "cause")
    );
    // A request caught on a pooled connection as the pod went down may fail twice (the
    // keep-alive race retry on a fresh connection is refused) before a retry rescues it.
    let rescued = d(&after, &before, "detour_requests_rescued_total", &[]);
    assert!(
        rescued >= 1.0 && rescued <= failures,
        "rescued {rescued}, failures {:?}",
        after.by_label("detour_attempt_failures_total", &[], "cause")
    );
    assert_eq!(d(&after, &before, "detour_gateway_errors_total", &[]), 0.0);
    assert_eq!(
        d(
            &after,
            &before,
            "detour_requests_total",
            &[("status", "200")]
        ),
        sent as f64
    );
}
