//! Hot reload through `SidecarHandle::apply`: endpoints that stay keep their health state, a bad
//! config is refused and the running one keeps serving.

mod support;

use http::StatusCode;
use support::{sidecar::*, *};

#[tokio::test]
async fn an_ejected_endpoint_stays_ejected_across_a_reload() {
    let mut p = fast_policy();
    p.outlier_detection.consecutive_gateway_errors = 1;
    let mut h = Harness::start(2, p).await;
    h.fail_pod0_until_it_is_asked(Fault::Always502).await;
    assert!(
        h.endpoint(h.pods[0].addr()).ejected,
        "pod-0 was not ejected"
    );
    // pod-0 would now serve fine: only the ejection keeps traffic away from it.
    h.pods[0].set_fault(Fault::Healthy).await.unwrap();
    let seen = h.pods[0].requests();
    let listen = h.addr();

    // A new config: one more endpoint and a different retry policy.
    h.pods.push(SimPod::start("pod-2").await.unwrap());
    h.policy.retries.attempts = 3;
    let before = h.metrics();
    h.sidecar
        .apply(h.config())
        .await
        .expect("valid config applies");
    let after = h.metrics();
    assert_eq!(
        after.sum("detour_config_reloads_total", &[("result", "success")])
            - before.sum("detour_config_reloads_total", &[("result", "success")]),
        1.0
    );
    assert_eq!(h.addr(), listen, "the listener survives a reload");
    assert!(after.has("detour_config_info", &[("hash", &h.config().hash())]));
    assert!(
        h.endpoint(h.pods[0].addr()).ejected,
        "reload forgot the ejection"
    );
    assert_eq!(m(&after, "detour_endpoints", &[("state", "ejected")]), 1.0);
    for n in 0..30 {
        let r = h.get(&format!("/after/{n}")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_ne!(r.pod(), Some("pod-0"));
    }
    assert_eq!(
        h.pods[0].requests(),
        seen,
        "an ejected endpoint got traffic after reload"
    );
    assert!(h.pods[2].requests() > 0, "the new endpoint got no traffic");
}

/// pod-0's health checks fail until the sidecar marks it unhealthy; then they pass again.
async fn pod0_fails_its_checks_until_unhealthy(h: &Harness) {
    h.pods[0].set_health_fault(Some(Fault::Always503));
    eventually(PATIENCE, "pod-0 unhealthy", || {
        (h.endpoint(h.pods[0].addr()).health == detour::sidecar::Health::Unhealthy).then_some(())
    })
    .await;
    h.pods[0].set_health_fault(None);
}

#[tokio::test]
async fn an_unhealthy_endpoint_stays_unhealthy_across_a_reload() {
    let mut p = fast_policy();
    p.health_check.protocol = HealthCheckProtocol::Http;
    // Once unhealthy, pod-0 needs 100 passing checks (20 s) to come back.
    p.health_check.healthy_threshold = 100;
    let mut h = Harness::start(2, p).await;
    pod0_fails_its_checks_until_unhealthy(&h).await;
    let seen = h.pods[0].requests();
    h.pods.push(SimPod::start("pod-2").await.unwrap());
    h.sidecar
        .apply(h.config())
        .await
        .expect("valid config applies");
    assert_eq!(
        h.endpoint(h.pods[0].addr()).health,
        detour::sidecar::Health::Unhealthy,
        "reload reset the health of an endpoint that stayed"
    );
    for n in 0..30 {
        let r = h.get(&format!("/{n}")).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{r:?}\n{:?}",
            h.sidecar.upstreams()[0].endpoints
        );
    }
    assert_eq!(
        h.pods[0].requests(),
        seen,
        "an unhealthy endpoint got traffic after reload"
    );
}

#[tokio::test]
async fn a_bad_config_is_refused_and_the_old_one_keeps_serving() {
    let h = Harness::start(2, fast_policy()).await;
    let running = h.sidecar.config();
    let hash = running.hash();
    let before = h.metrics();

    let mut bad = h.config();
    bad.upstreams[0].policy.retries.attempts = 11;
    bad.upstreams[0].endpoints[0].address = "not-an-address".into();
    let err = h
        .sidecar
        .apply(bad)
        .await
        .expect_err("invalid config must be refused");
    let text = err.to_string();
    assert!(
        text.contains("upstreams[0].policy.retries.attempts"),
        "{text}"
    );
    assert!(text.contains("upstreams[0].endpoints[0].address"), "{text}");

    let after = h.metrics();
    assert_eq!(
        after.sum("detour_config_reloads_total", &[("result", "failure")])
            - before.sum("detour_config_reloads_total", &[("result", "failure")]),
        1.0
    );
    assert_eq!(
        after.sum("detour_config_reloads_total", &[("result", "success")]),
        before.sum("detour_config_reloads_total", &[("result", "success")])
    );
    assert_eq!(h.sidecar.config(), running);
    assert!(after.has("detour_config_info", &[("hash", &hash)]));
    for n in 0..10 {
        assert_eq!(h.get(&format!("/{n}")).await.status, StatusCode::OK);
    }
    assert_eq!(h.pods.iter().map(SimPod::requests).sum::<u64>(), 10);
}

#[tokio::test]
async fn the_admin_server_serves_metrics_readiness_and_config() {
    let h = Harness::start(1, fast_policy()).await;
    let admin = h.sidecar.admin_addr();
    let metrics = send_fresh(admin, request(http::Method::GET, "/metrics"))
        .await
        .unwrap();
    assert_eq!(metrics.status, StatusCode::OK);
    Metrics::parse(&metrics.text()).expect("/metrics is Prometheus text");
    assert!(
        metrics.text().contains("detour_endpoints{"),
        "{}",
        metrics.text()
    );
    for path in ["/live", "/ready"] {
        let r = send_fresh(admin, request(http::Method::GET, path))
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "{path}");
    }
    let config = send_fresh(admin, request(http::Method::GET, "/config"))
        .await
        .unwrap();
    assert_eq!(config.status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_slice(&config.body).expect("/config is JSON");
    let text = json.to_string();
    assert!(text.contains(&h.pods[0].addr().to_string()), "{text}");
    assert!(text.contains(UPSTREAM), "{text}");
}

#[tokio::test]
async fn a_reload_that_removes_an_endpoint_lets_its_in_flight_request_finish() {
    let mut h = Harness::start(2, fast_policy()).await;
    h.pods[0]
        .set_fault(Fault::Slow(std::time::Duration::from_millis(400)))
        .await
        .unwrap();
    h.pods[1]
        .set_fault(Fault::Slow(std::time::Duration::from_millis(400)))
        .await
        .unwrap();
    let addr = h.addr();
    let in_flight = tokio::spawn(send_fresh(addr, request(http::Method::GET, "/slow")));
    eventually(PATIENCE, "the request reached a pod", || {
        (h.pods.iter().map(SimPod::requests).sum::<u64>() == 1).then_some(())
    })
    .await;
    // Remove the endpoint that holds the request.
    let busy = if h.pods[0].requests() == 1 { 0 } else { 1 };
    let gone = h.pods.remove(busy);
    h.sidecar.apply(h.config()).await.unwrap();
    let r = in_flight
        .await
        .unwrap()
        .expect("in-flight request survives the reload");
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.pod(), Some(gone.name()));
    let r = h.get("/next").await;
    assert_eq!(r.pod(), Some(h.pods[0].name()));
    assert!(
        !h.sidecar
            .upstreams()
            .iter()
            .flat_map(|u| &u.endpoints)
            .any(|e| e.address == gone.addr().to_string()),
        "the removed endpoint is still listed"
    );
}

#[tokio::test]
async fn removing_an_upstream_closes_its_listener_and_drops_its_series() {
    let h = Harness::start(1, fast_policy()).await;
    let addr = h.addr();
    assert_eq!(h.get("/").await.status, StatusCode::OK);
    assert!(h
        .metrics()
        .has("detour_endpoints", &[("upstream", UPSTREAM)]));
    h.sidecar.apply(Config::empty()).await.unwrap();
    assert!(h.sidecar.listener_addr(UPSTREAM).is_none());
    eventually(PATIENCE, "the listener closes", || {
        (std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200))
            .is_err())
        .then_some(())
    })
    .await;
    let m = h.metrics();
    for name in [
        "detour_endpoints",
        "detour_attempt_failures_total",
        "detour_retries_total",
    ] {
        assert!(
            !m.has(name, &[("upstream", UPSTREAM)]),
            "{name} still has {UPSTREAM}"
        );
    }
}

#[tokio::test]
async fn health_state_survives_a_reload_that_changes_the_health_check_policy() {
    let mut p = fast_policy();
    p.health_check.protocol = HealthCheckProtocol::Http;
    p.health_check.healthy_threshold = 100;
    let mut h = Harness::start(2, p).await;
    pod0_fails_its_checks_until_unhealthy(&h).await;
    let seen = h.pods[0].requests();
    h.policy.health_check.interval = ms(250);
    h.policy.health_check.healthy_threshold = 80;
    h.sidecar
        .apply(h.config())
        .await
        .expect("valid config applies");
    assert_eq!(
        h.endpoint(h.pods[0].addr()).health,
        detour::sidecar::Health::Unhealthy,
        "a health-check policy change reset the health of an endpoint that stayed"
    );
    for n in 0..30 {
        assert_eq!(h.get(&format!("/{n}")).await.status, StatusCode::OK);
    }
    assert_eq!(h.pods[0].requests(), seen);
}

/// Two upstreams for disjoint workloads may share a listen address: the sidecar binds the one
/// whose workloadSelector selects its own pod, and refuses the config when it has no pod labels.
#[tokio::test]
async fn disjoint_workloads_share_a_listen_address_and_each_pod_binds_its_own() {
    let web = SimPod::start("web-0").await.unwrap();
    let api = SimPod::start("api-0").await.unwrap();
    // A concrete port: port 0 never counts as shared.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = Config::empty();
    for (name, pod) in [("shop/web", &web), ("shop/api", &api)] {
        let mut one = config_for(&[pod.addr()], fast_policy()).upstreams.remove(0);
        one.name = name.to_string();
        one.listen = format!("127.0.0.1:{port}");
        one.workload_selector = Some(
            serde_json::from_value(serde_json::json!({
                "matchLabels": {"app": name.trim_start_matches("shop/")}
            }))
            .unwrap(),
        );
        cfg.upstreams.push(one);
    }

    let err = Sidecar::start(cfg.clone(), Options::default())
        .await
        .err()
        .expect("a sidecar without pod labels cannot choose between the two");
    let text = err.to_string();
    assert!(
        text.contains("upstreams[1].listen")
            && text.contains("\"shop/web\"")
            && text.contains("--pod-labels"),
        "{text}"
    );

    let opts = Options {
        pod_labels: Some([("app".to_string(), "api".to_string())].into()),
        ..Options::default()
    };
    let sidecar = Sidecar::start(cfg, opts)
        .await
        .expect("sidecar of an api pod");
    assert_eq!(sidecar.listener_addr("shop/web"), None);
    let addr = sidecar.listener_addr("shop/api").expect("api listener");
    assert_eq!(addr.port(), port);
    for n in 0..4 {
        let resp = send_fresh(addr, request(http::Method::GET, &format!("/{n}")))
            .await
            .unwrap();
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(resp.pod(), Some("api-0"));
    }
    assert_eq!(web.requests(), 0);
}

/// Per-endpoint series name the pod that failed, and go when a reload drops that endpoint; the
/// per-upstream totals stay.
#[tokio::test]
async fn per_endpoint_series_name_the_failing_pod_and_go_when_it_leaves_the_config() {
    let mut p = fast_policy();
    p.outlier_detection.consecutive_gateway_errors = 1;
    let h = Harness::start(2, p).await;
    h.fail_pod0_until_it_is_asked(Fault::Always502).await;
    let bad = h.pods[0].addr().to_string();
    let before = h.metrics();
    let on_bad = [
        ("upstream_address", bad.as_str()),
        ("upstream_pod", "pod-0"),
    ];
    let failures = |mt: &Metrics, labels: &[(&str, &str)]| {
        m(mt, "detour_endpoint_attempt_failures_total", labels)
    };
    assert!(
        failures(
            &before,
            &[on_bad[0], on_bad[1], ("cause", "upstream_status")]
        ) >= 1.0,
        "no per-endpoint failure for pod-0"
    );
    assert_eq!(
        m(
            &before,
            "detour_endpoint_ejections_total",
            &[
                on_bad[0],
                on_bad[1],
                ("reason", "consecutive_gateway_errors")
            ]
        ),
        1.0
    );
    assert!(
        !before.has(
            "detour_endpoint_attempt_failures_total",
            &[("upstream_pod", "pod-1")]
        ),
        "the healthy pod has a failure series"
    );

    // A reload that keeps only pod-1 (under its own name).
    let mut cfg = config_for(&[h.pods[1].addr()], h.policy.clone());
    cfg.upstreams[0].endpoints[0].pod = Some("pod-1".into());
    h.sidecar.apply(cfg).await.expect("valid config applies");
    let after = h.metrics();
    for name in [
        "detour_endpoint_attempt_failures_total",
        "detour_endpoint_ejections_total",
    ] {
        assert!(
            !after.has(name, &[("upstream_pod", "pod-0")]),
            "{name} kept pod-0"
        );
    }
    assert!(
        m(
            &after,
            "detour_attempt_failures_total",
            &[("cause", "upstream_status")]
        ) >= 1.0,
        "the per-upstream total went with the endpoint"
    );
    assert_eq!(h.get("/after").await.status, StatusCode::OK);
}
