//! Retry rules: a non-idempotent request that reached the upstream is never replayed, one with an
//! `Idempotency-Key` is; the retry budget stops retries from multiplying an outage; panic mode
//! balances over every endpoint when too few are eligible.

mod support;

use http::{Method, StatusCode};
use support::{sidecar::*, *};

fn post(id: usize, key: bool) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut r = request_with_body(Method::POST, "/orders", format!("order-{id}"));
    if key {
        r.headers_mut()
            .insert("idempotency-key", format!("key-{id}").parse().unwrap());
    }
    r
}

/// How many times each pod received the POST with body `order-{id}`.
fn deliveries(h: &Harness, id: usize) -> Vec<usize> {
    let body = format!("order-{id}");
    h.pods
        .iter()
        .map(|p| {
            p.recorded()
                .iter()
                .filter(|r| r.method == Method::POST && r.body == body.as_bytes())
                .count()
        })
        .collect()
}

fn reset_next_to_healthy() -> Policy {
    let mut p = fast_policy();
    // The resetting pod must stay in play for every POST.
    p.outlier_detection.consecutive_gateway_errors = 0;
    p
}

#[tokio::test]
async fn a_post_that_reached_a_resetting_upstream_is_not_replayed() {
    let h = Harness::start(2, reset_next_to_healthy()).await;
    h.pods[0].set_fault(Fault::ResetAfterRequest).await.unwrap();
    let before = h.metrics();
    let mut failed = 0;
    for id in 0..100 {
        let r = h.send(post(id, false)).await;
        if r.status == StatusCode::OK {
            assert_eq!(deliveries(&h, id), vec![0, 1]);
            continue;
        }
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{r:?}");
        let ps = r.proxy_error();
        assert_eq!(ps.error, "connection_terminated", "{ps:?}");
        assert!(ps.details.contains(&h.pods[0].addr().to_string()), "{ps:?}");
        assert_eq!(r.attempts(), Some(1), "{ps:?}");
        // Exactly once at the resetting pod, never at the healthy one.
        assert_eq!(deliveries(&h, id), vec![1, 0]);
        failed += 1;
        if failed == 3 {
            break;
        }
    }
    assert_eq!(failed, 3, "the resetting pod got no POST");
    let after = h.metrics();
    assert_eq!(h.pods[0].requests_by_method("POST"), 3);
    assert_eq!(
        d(
            &after,
            &before,
            "detour_retries_skipped_total",
            &[("reason", "non_idempotent")]
        ),
        3.0
    );
    assert_eq!(d(&after, &before, "detour_retries_total", &[]), 0.0);
    assert_eq!(
        d(
            &after,
            &before,
            "detour_gateway_errors_total",
            &[("cause", "connection_terminated"), ("origin", "proxy")]
        ),
        3.0
    );
}

#[tokio::test]
async fn a_post_with_an_idempotency_key_is_retried() {
    let h = Harness::start(2, reset_next_to_healthy()).await;
    h.pods[0].set_fault(Fault::ResetAfterRequest).await.unwrap();
    let before = h.metrics();
    let mut retried = 0;
    for id in 0..100 {
        let r = h.send(post(id, true)).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.text(), format!("order-{id}"));
        let seen = deliveries(&h, id);
        assert_eq!(seen[1], 1, "{seen:?}");
        if seen[0] == 1 {
            // The retry carried the same key and body.
            let rec = h.pods[1].last_request().unwrap();
            assert_eq!(rec.headers["idempotency-key"], format!("key-{id}").as_str());
            retried += 1;
            if retried == 3 {
                break;
            }
        }
    }
    assert_eq!(retried, 3, "the resetting pod got no POST");
    let after = h.metrics();
    assert_eq!(
        d(
            &after,
            &before,
            "detour_retries_total",
            &[("reason", "connection_terminated")]
        ),
        3.0
    );
    assert_eq!(
        d(&after, &before, "detour_requests_rescued_total", &[]),
        3.0
    );
    assert_eq!(d(&after, &before, "detour_gateway_errors_total", &[]), 0.0);
}

#[tokio::test]
async fn a_post_that_never_left_is_retried_without_a_key() {
    // A refused connection means the request was never sent: retrying is always safe.
    let mut p = reset_next_to_healthy();
    p.outlier_detection.eject_on_connect_refused = false;
    let h = Harness::start(2, p).await;
    h.pods[0].kill().await.unwrap();
    let before = h.metrics();
    for id in 0..20 {
        let r = h.send(post(id, false)).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(deliveries(&h, id), vec![0, 1]);
    }
    let after = h.metrics();
    let refused = d(
        &after,
        &before,
        "detour_attempt_failures_total",
        &[("cause", "connection_refused")],
    );
    assert!(refused >= 1.0, "the dead pod was never tried");
    assert_eq!(
        d(&after, &before, "detour_requests_rescued_total", &[]),
        refused
    );
}

#[tokio::test]
async fn the_retry_budget_stops_retries_during_an_outage() {
    let mut p = fast_policy();
    p.outlier_detection.consecutive_gateway_errors = 0;
    p.retries.budget.percent = 0;
    p.retries.budget.min_per_second = 1;
    let h = Harness::start(2, p).await;
    for pod in &h.pods {
        pod.set_fault(Fault::Always503).await.unwrap();
    }
    let before = h.metrics();
    for n in 0..20 {
        let r = h.get(&format!("/outage/{n}")).await;
        // Nothing can answer: the client sees an upstream's own 503.
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
        assert!(r.text().starts_with("simulated 503"), "{r:?}");
    }
    let after = h.metrics();
    let retries = d(&after, &before, "detour_retries_total", &[]);
    let exhausted = d(&after, &before, "detour_retry_budget_exhausted_total", &[]);
    // 1 retry per second is allowed; the 20 requests take well under 5 s.
    assert!(retries <= 5.0, "{retries} retries with a budget of 1/s");
    assert!(exhausted >= 15.0, "budget exhausted only {exhausted} times");
    let upstream_tries: u64 = h.pods.iter().map(SimPod::requests).sum();
    assert_eq!(
        upstream_tries as f64,
        20.0 + retries,
        "tries = requests + retries"
    );
    assert_eq!(
        d(
            &after,
            &before,
            "detour_gateway_errors_total",
            &[("origin", "upstream"), ("status", "503")]
        ),
        20.0
    );
    assert_eq!(
        d(
            &after,
            &before,
            "detour_retries_skipped_total",
            &[("reason", "budget_exhausted")]
        ),
        exhausted
    );
}

#[tokio::test]
async fn panic_mode_balances_over_all_endpoints_when_most_are_unhealthy() {
    let mut p = fast_policy();
    p.health_check.protocol = HealthCheckProtocol::Http;
    p.panic_threshold = 50;
    let h = Harness::start(3, p).await;
    // Two of three fail their health checks but would serve traffic fine.
    h.pods[0].set_health_fault(Some(Fault::Always503));
    h.pods[1].set_health_fault(Some(Fault::Always503));
    eventually(PATIENCE, "two endpoints unhealthy", || {
        (m(&h.metrics(), "detour_endpoints", &[("state", "unhealthy")]) == 2.0).then_some(())
    })
    .await;
    let before = h.metrics();
    for n in 0..60 {
        let r = h.get(&format!("/panic/{n}")).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
    }
    let after = h.metrics();
    assert!(
        h.pods[0].requests() > 0 && h.pods[1].requests() > 0,
        "panic mode must use unhealthy endpoints too: {:?}",
        h.pods.iter().map(SimPod::requests).collect::<Vec<_>>()
    );
    assert_eq!(d(&after, &before, "detour_panic_mode_total", &[]), 60.0);

    // Back to two healthy of three: no panic, and the unhealthy one is avoided.
    h.pods[1].set_health_fault(None);
    eventually(PATIENCE, "one endpoint unhealthy", || {
        (m(&h.metrics(), "detour_endpoints", &[("state", "unhealthy")]) == 1.0).then_some(())
    })
    .await;
    let before = h.metrics();
    let seen = h.pods[0].requests();
    for n in 0..30 {
        assert_eq!(h.get(&format!("/calm/{n}")).await.status, StatusCode::OK);
    }
    assert_eq!(
        d(&h.metrics(), &before, "detour_panic_mode_total", &[]),
        0.0
    );
    assert_eq!(
        h.pods[0].requests(),
        seen,
        "an unhealthy endpoint got traffic"
    );
}

#[tokio::test]
async fn an_empty_retry_budget_allows_no_retry() {
    let mut p = fast_policy();
    p.outlier_detection.consecutive_gateway_errors = 0;
    p.retries.budget.percent = 0;
    p.retries.budget.min_per_second = 0;
    let h = Harness::start(2, p).await;
    h.pods[0].set_fault(Fault::Always502).await.unwrap();
    let before = h.metrics();
    let mut failed = 0;
    for n in 0..100 {
        let r = h.get(&format!("/{n}")).await;
        if r.status == StatusCode::BAD_GATEWAY {
            assert_eq!(r.pod(), Some("pod-0"), "{r:?}");
            failed += 1;
            if failed == 3 {
                break;
            }
        }
    }
    assert_eq!(failed, 3);
    let after = h.metrics();
    assert_eq!(d(&after, &before, "detour_retries_total", &[]), 0.0);
    assert_eq!(
        d(&after, &before, "detour_retry_budget_exhausted_total", &[]),
        3.0
    );
}

#[tokio::test]
async fn a_post_that_timed_out_is_not_replayed_but_one_with_a_key_is() {
    let mut p = reset_next_to_healthy();
    p.retries.per_try_timeout = ms(500);
    let h = Harness::start(2, p).await;
    h.pods[0].set_fault(Fault::Hang).await.unwrap();
    let mut timed_out = 0;
    for id in 0..100 {
        let r = h.send(post(id, false)).await;
        if r.status == StatusCode::OK {
            continue;
        }
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{r:?}");
        assert_eq!(r.proxy_error().error, "http_response_timeout");
        assert_eq!(r.attempts(), Some(1));
        assert_eq!(deliveries(&h, id), vec![1, 0]);
        timed_out += 1;
        break;
    }
    assert_eq!(timed_out, 1, "the hung pod got no POST");
    for id in 100..200 {
        let r = h.send(post(id, true)).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        if deliveries(&h, id) == vec![1, 1] {
            return;
        }
    }
    panic!("no keyed POST was retried after a timeout");
}

#[tokio::test]
async fn a_post_answered_502_by_the_upstream_is_passed_through_not_replayed() {
    let h = Harness::start(2, reset_next_to_healthy()).await;
    h.pods[0].set_fault(Fault::Always502).await.unwrap();
    for id in 0..100 {
        let r = h.send(post(id, false)).await;
        if r.status == StatusCode::OK {
            continue;
        }
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{r:?}");
        assert_eq!(
            r.pod(),
            Some("pod-0"),
            "the upstream's own 502 is passed through"
        );
        assert_eq!(deliveries(&h, id), vec![1, 0]);
        return;
    }
    panic!("the 502 pod got no POST");
}
