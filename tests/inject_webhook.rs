//! The injection webhook end to end: the in-memory API server calls it over HTTPS when a pod is
//! created, trusting only the `caBundle` the operator publishes, as a real API server does. The
//! certificate, the caBundle and the injection are proved together, through renewals with short
//! lifetimes, and through a leader failover with two replicas.

mod support;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use detour::operator::{Operator, Options, WebhookOptions};
use k8s_openapi::api::core::v1::Pod;
use kube::{api::PostParams, Api};
use serde_json::{json, Value};
use support::{webhooks::*, *};

const SYSTEM: &str = "detour-system";
const T: Duration = Duration::from_secs(30);

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// The MutatingWebhookConfiguration as the chart installs it (no caBundle: the operator's job).
fn webhook_configuration() -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_CONFIG},
        "webhooks": webhooks::injector_webhooks(SYSTEM, "Fail", 5),
    })
}

fn webhook_options(lifetime: Duration, renew_before: Duration) -> WebhookOptions {
    webhooks::chart_webhook(SYSTEM, lifetime, renew_before)
}

fn options(webhook: WebhookOptions) -> Options {
    Options {
        webhook: Some(webhook),
        ..operator_options()
    }
}

fn cluster() -> ApiServer {
    let server = ApiServer::new();
    server.put(namespace(
        "shop",
        json!({"detour.dev/inject": "enabled", "kubernetes.io/metadata.name": "shop"}),
    ));
    server.put(namespace(
        "plain",
        json!({"kubernetes.io/metadata.name": "plain"}),
    ));
    server.put(namespace(
        SYSTEM,
        json!({"kubernetes.io/metadata.name": SYSTEM}),
    ));
    server.put(webhook_configuration());
    server
}

fn ca_bundles(server: &ApiServer) -> Vec<Value> {
    server
        .get(
            "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
            "",
            WEBHOOK_CONFIG,
        )
        .map(|c| {
            c["webhooks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w["clientConfig"]["caBundle"].clone())
                .collect()
        })
        .unwrap_or_default()
}

fn pod(name: &str, labels: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "web", "image": "web:1"}]},
    }))
    .unwrap()
}

fn injected(p: &Pod) -> bool {
    let spec = p.spec.as_ref().unwrap();
    let first = spec.init_containers.as_ref().and_then(|c| c.first());
    first.is_some_and(|c| c.name == "detour" && c.restart_policy.as_deref() == Some("Always"))
        && p.metadata.labels.as_ref().unwrap()["detour.dev/sidecar"] == "true"
}

async fn create(server: &ApiServer, ns: &str, p: Pod) -> Result<Pod, kube::Error> {
    Api::<Pod>::namespaced(server.client(), ns)
        .create(&PostParams::default(), &p)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_ca_bundle_and_injection_hold_together_through_renewals() {
    let server = cluster();
    // Short lifetimes: a serving certificate is renewed about every second.
    let op = Operator::start(
        server.client(),
        options(webhook_options(
            Duration::from_secs(3),
            Duration::from_secs(2),
        )),
    )
    .await
    .unwrap();
    server.set_service_endpoints(SYSTEM, WEBHOOK_SERVICE, vec![op.webhook_addr().unwrap()]);
    eventually(T, "the caBundle on both webhooks", || {
        let b = ca_bundles(&server);
        (b.len() == 2 && b.iter().all(|c| c.is_string())).then_some(())
    })
    .await;
    eventually(T, "the replica to be ready", || op.is_ready().then_some(())).await;

    // Who gets the sidecar.
    let p = create(&server, "shop", pod("a", json!({"app": "web"})))
        .await
        .unwrap();
    assert!(injected(&p), "namespace opted in: {p:?}");
    let out = create(
        &server,
        "shop",
        pod("b", json!({"detour.dev/inject": "false"})),
    )
    .await
    .unwrap();
    assert!(
        !injected(&out) && out.spec.as_ref().unwrap().init_containers.is_none(),
        "pod opted out"
    );
    let other = create(&server, "plain", pod("c", json!({"app": "web"})))
        .await
        .unwrap();
    assert!(
        other.spec.as_ref().unwrap().init_containers.is_none(),
        "namespace not opted in"
    );
    let by_label = create(
        &server,
        "plain",
        pod("d", json!({"detour.dev/inject": "true"})),
    )
    .await
    .unwrap();
    assert!(injected(&by_label), "pod opted in by its label");
    let system = create(
        &server,
        SYSTEM,
        pod("e", json!({"detour.dev/inject": "true"})),
    )
    .await
    .unwrap();
    assert!(
        system.spec.as_ref().unwrap().init_containers.is_none(),
        "the operator's namespace"
    );
    if validate::available("certificate_ca_bundle_and_injection_hold_together_through_renewals") {
        let mut pod_json = serde_json::to_value(&p).unwrap();
        pod_json["metadata"]
            .as_object_mut()
            .unwrap()
            .retain(|k, _| k == "name" || k == "namespace" || k == "labels");
        validate::assert_strict(&support::yaml::to_string(&pod_json));
    }

    // Pods keep being created while the certificate is renewed: none is refused.
    let mut served = BTreeSet::new();
    let mut secrets = BTreeSet::new();
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(6) {
        n += 1;
        let p = create(
            &server,
            "shop",
            pod(&format!("r-{n}"), json!({"app": "web"})),
        )
        .await
        .unwrap_or_else(|e| panic!("pod {n} refused during renewals: {e}"));
        assert!(injected(&p), "pod {n}");
        served.extend(op.webhook_certificate());
        if let Some(s) = server.get("v1/secrets", SYSTEM, WEBHOOK_SECRET) {
            secrets.insert(s["data"]["tls.crt"].to_string());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{n} pods created and injected; {} certificates issued, {} served",
        secrets.len(),
        served.len()
    );
    assert!(
        secrets.len() >= 3,
        "renewed at least twice: {}",
        secrets.len()
    );
    assert!(
        served.len() >= 3,
        "the replica served the renewed ones without a restart"
    );
    let m = op.metrics_text();
    assert!(
        m.lines().any(
            |l| l.starts_with("detour_operator_injections_total{result=\"injected\"}")
                && l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() >= n as f64
        ),
        "{m}"
    );
    op.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_created_while_the_leader_fails_over_are_still_injected() {
    let server = cluster();
    let replica = |identity: &str| Options {
        leader_election: Some(lease(SYSTEM, identity)),
        ..options(webhook_options(
            Duration::from_secs(3600),
            Duration::from_secs(600),
        ))
    };
    let a = Operator::start(server.client(), replica("a"))
        .await
        .unwrap();
    eventually(T, "a to lead and issue the certificate", || {
        server.get("v1/secrets", SYSTEM, WEBHOOK_SECRET).map(|_| ())
    })
    .await;
    let b = Operator::start(server.client(), replica("b"))
        .await
        .unwrap();
    for (name, op) in [("a", &a), ("b", &b)] {
        eventually(T, &format!("{name} to serve the webhook"), || {
            op.is_ready().then_some(())
        })
        .await;
    }
    assert!(
        b.metrics_text().contains("detour_operator_leader 0"),
        "b is ready without leading"
    );
    server.set_service_endpoints(
        SYSTEM,
        WEBHOOK_SERVICE,
        vec![a.webhook_addr().unwrap(), b.webhook_addr().unwrap()],
    );
    let p = create(&server, "shop", pod("before", json!({})))
        .await
        .unwrap();
    assert!(injected(&p));

    // The leader stops; its endpoint leaves the Service as its pod terminates.
    server.set_service_endpoints(SYSTEM, WEBHOOK_SERVICE, vec![b.webhook_addr().unwrap()]);
    a.shutdown().await.unwrap();
    let start = Instant::now();
    let mut n = 0;
    let mut b_leads_after = None;
    while start.elapsed() < Duration::from_secs(8) {
        n += 1;
        let p = create(&server, "shop", pod(&format!("f-{n}"), json!({})))
            .await
            .unwrap_or_else(|e| panic!("pod {n} refused during the failover: {e}"));
        assert!(injected(&p), "pod {n}");
        if b_leads_after.is_none() && b.metrics_text().contains("detour_operator_leader 1") {
            b_leads_after = Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = b_leads_after.expect("b took the lease");
    eprintln!("{n} pods injected during the failover; b led after {took:?}");
    b.shutdown().await.unwrap();
}
