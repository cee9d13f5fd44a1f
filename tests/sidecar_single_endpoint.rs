//! When nothing can rescue a request (one endpoint, or none), the client gets the sidecar's own
//! 502/503/504 with an RFC 9209 `Proxy-Status` naming the cause, the endpoint and the attempts;
//! a 502 the upstream itself sent is passed through and counted with `origin="upstream"`.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::sidecar::*;

/// Checks the sidecar's own error response and its metrics; returns the attempts it reported.
fn assert_proxy_error(
    h: &Harness,
    r: &Resp,
    before: &Metrics,
    status: u16,
    error: &str,
    attempt_cause: &str,
) -> u32 {
    assert_eq!(r.status.as_u16(), status, "{r:?}");
    let ps = r.proxy_error();
    assert_eq!(ps.proxy, "detour");
    assert_eq!(ps.error, error, "{ps:?}");
    let ep = h.pods[0].addr().to_string();
    assert!(ps.details.contains(&ep), "details must name {ep}: {ps:?}");
    let attempts = r
        .attempts()
        .unwrap_or_else(|| panic!("no attempts= in {ps:?}"));
    assert!(attempts >= 1);
    // The body says the same as the header, for humans.
    assert!(r.text().contains(error), "{}", r.text());
    assert!(r.text().contains(&ep), "{}", r.text());

    let after = h.metrics();
    let s = status.to_string();
    assert_eq!(
        d(
            &after,
            before,
            "detour_gateway_errors_total",
            &[("status", &s), ("origin", "proxy")]
        ),
        1.0
    );
    assert_eq!(d(&after, before, "detour_gateway_errors_total", &[]), 1.0);
    assert_eq!(
        d(&after, before, "detour_requests_total", &[("status", &s)]),
        1.0
    );
    assert_eq!(
        d(
            &after,
            before,
            "detour_attempt_failures_total",
            &[("cause", attempt_cause)]
        ),
        attempts as f64,
        "every attempt failed with {attempt_cause}"
    );
    assert_eq!(
        d(&after, before, "detour_attempt_failures_total", &[]),
        attempts as f64
    );
    assert_eq!(d(&after, before, "detour_requests_rescued_total", &[]), 0.0);
    attempts
}

fn one_pod_policy() -> Policy {
    let mut p = fast_policy();
    // Keep the lone endpoint in play so each test sees the data path fail, not an empty pool.
    p.outlier_detection.consecutive_gateway_errors = 0;
    p.outlier_detection.eject_on_connect_refused = false;
    p
}

/// The lone pod answers every request with `fault`: the client gets the sidecar's `status`
/// naming `error`, every attempt failed with that cause, and every attempt reached the pod.
async fn lone_pod_failing_every_attempt(fault: Fault, status: u16, error: &str) {
    let h = Harness::start(1, one_pod_policy()).await;
    h.pods[0].set_fault(fault).await.unwrap();
    let before = h.metrics();
    let r = h.get("/").await;
    let attempts = assert_proxy_error(&h, &r, &before, status, error, error);
    assert_eq!(h.pods[0].requests(), attempts as u64);
}

#[tokio::test]
async fn refused_gives_502_connection_refused() {
    let h = Harness::start(1, one_pod_policy()).await;
    h.pods[0].kill().await.unwrap();
    let before = h.metrics();
    let r = h.get("/").await;
    let attempts = assert_proxy_error(
        &h,
        &r,
        &before,
        502,
        "connection_refused",
        "connection_refused",
    );
    // Nothing was sent, so even a retry to the same endpoint is allowed.
    assert_eq!(attempts, 3, "1 try + retries.attempts (2)");
    assert_eq!(
        d(
            &h.metrics(),
            &before,
            "detour_gateway_errors_total",
            &[("cause", "connection_refused")]
        ),
        1.0
    );
}

#[tokio::test]
async fn hang_gives_504_http_response_timeout() {
    let h = Harness::start(1, one_pod_policy()).await;
    h.pods[0].set_fault(Fault::Hang).await.unwrap();
    let before = h.metrics();
    let t = Instant::now();
    let r = h.get("/").await;
    let attempts = assert_proxy_error(
        &h,
        &r,
        &before,
        504,
        "http_response_timeout",
        "http_response_timeout",
    );
    assert_eq!(h.pods[0].requests(), attempts as u64);
    // Attempts of 1 s (perTryTimeout) each, inside the 6 s request timeout.
    assert!(t.elapsed() >= Duration::from_secs(1) * attempts);
    assert!(
        t.elapsed() < Duration::from_millis(5500),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn request_deadline_gives_504_even_when_tries_would_continue() {
    let mut p = one_pod_policy();
    p.retries.attempts = 10;
    p.retries.per_try_timeout = ms(200);
    p.timeouts.request = ms(500);
    p.timeouts.connect = ms(200);
    let h = Harness::start(1, p).await;
    h.pods[0].set_fault(Fault::Hang).await.unwrap();
    let before = h.metrics();
    let t = Instant::now();
    let r = h.get("/").await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{r:?}");
    assert_eq!(r.proxy_error().error, "http_response_timeout");
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    let attempts = r.attempts().unwrap();
    assert!(
        (1..=3).contains(&attempts),
        "{attempts} attempts in a 500 ms deadline"
    );
    assert_eq!(
        d(&h.metrics(), &before, "detour_gateway_errors_total", &[]),
        1.0
    );
}

#[tokio::test]
async fn reset_gives_502_connection_terminated() {
    lone_pod_failing_every_attempt(Fault::ResetAfterRequest, 502, "connection_terminated").await;
}

#[tokio::test]
async fn malformed_gives_502_http_protocol_error() {
    lone_pod_failing_every_attempt(Fault::Malformed, 502, "http_protocol_error").await;
}

#[tokio::test]
async fn upstream_502_is_passed_through_with_origin_upstream() {
    let h = Harness::start(1, one_pod_policy()).await;
    h.pods[0].set_fault(Fault::Always502).await.unwrap();
    let before = h.metrics();
    let r = h.get("/").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    // The upstream's own answer reaches the client, not a sidecar page.
    assert_eq!(r.text(), "simulated 502 from pod-0\n");
    assert_eq!(r.pod(), Some("pod-0"));
    let after = h.metrics();
    assert_eq!(
        d(
            &after,
            &before,
            "detour_gateway_errors_total",
            &[("origin", "upstream"), ("status", "502")]
        ),
        1.0
    );
    assert_eq!(
        d(
            &after,
            &before,
            "detour_gateway_errors_total",
            &[("origin", "proxy")]
        ),
        0.0
    );
    let tries = h.pods[0].requests() as f64;
    assert!(tries >= 1.0);
    assert_eq!(
        d(
            &after,
            &before,
            "detour_attempt_failures_total",
            &[("cause", "upstream_status")]
        ),
        tries
    );
    assert_eq!(
        d(
            &after,
            &before,
            "detour_requests_total",
            &[("status", "502")]
        ),
        1.0
    );
}

#[tokio::test]
async fn no_endpoint_gives_503_destination_unavailable() {
    let h = Harness::start(0, fast_policy()).await;
    let before = h.metrics();
    let r = h.get("/").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    assert_eq!(r.proxy_error().error, "destination_unavailable");
    assert!(r.text().contains("destination_unavailable"), "{}", r.text());
    let after = h.metrics();
    assert_eq!(
        d(
            &after,
            &before,
            "detour_gateway_errors_total",
            &[
                ("status", "503"),
                ("origin", "proxy"),
                ("cause", "destination_unavailable")
            ]
        ),
        1.0
    );
    assert_eq!(
        d(
            &after,
            &before,
            "detour_requests_total",
            &[("status", "503")]
        ),
        1.0
    );
}

#[tokio::test]
async fn hang_on_a_reused_connection_gets_the_whole_per_try_timeout() {
    let h = Harness::start(1, one_pod_policy()).await;
    for _ in 0..3 {
        assert_eq!(h.get("/").await.status, StatusCode::OK);
    }
    assert_eq!(h.pods[0].connections(), 1, "one pooled connection, reused");
    // The pooled connection keeps its per-try timer, still armed for the last request's
    // deadline; the next attempt must get a full timeout of its own, not the leftover.
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.pods[0].set_fault(Fault::Hang).await.unwrap();
    let before = h.metrics();
    let t = Instant::now();
    let r = h.get("/").await;
    let attempts = assert_proxy_error(
        &h,
        &r,
        &before,
        504,
        "http_response_timeout",
        "http_response_timeout",
    );
    assert!(
        t.elapsed() >= Duration::from_secs(1) * attempts,
        "{attempts} attempts in {:?}",
        t.elapsed()
    );
    assert!(
        t.elapsed() < Duration::from_millis(5500),
        "{:?}",
        t.elapsed()
    );
}
