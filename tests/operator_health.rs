//! Sidecar health in the policy status, end to end: the real operator against the in-memory API
//! server, REAL sidecars (running the config the operator rendered) in front of simulated
//! upstream pods, and Pod objects that point the operator at the sidecars' admin ports.

mod support;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use detour::{
    config::Config,
    demo::pod::{Fault, SimPod},
    operator::{Operator, Options},
    report::{EndpointsReport, LiveState},
    sidecar::{self, Sidecar, SidecarHandle},
};
use serde_json::{json, Value};
use support::*;

/// Generous: the machine is shared and slow; every wait polls and ends as soon as it holds.
const T: Duration = Duration::from_secs(30);
const PODS: &str = "v1/pods";

fn options() -> Options {
    Options {
        report_interval: Duration::from_millis(100),
        ..operator_options()
    }
}

/// The namespace's rendered config as a sidecar runs it: same upstream names and endpoints, but
/// listeners on ephemeral ports so sidecars and tests can run side by side.
fn sidecar_config(server: &ApiServer, ns: &str) -> Option<Config> {
    let (mut cfg, _) = rendered_config(server, ns)?;
    for u in &mut cfg.upstreams {
        u.listen = "127.0.0.1:0".into();
    }
    Some(cfg)
}

async fn start_sidecar(cfg: Config) -> SidecarHandle {
    let opts = sidecar::Options {
        pod_labels: Some(BTreeMap::from([("app".to_string(), "web".to_string())])),
        ..sidecar::Options::default()
    };
    Sidecar::start(cfg, opts).await.expect("sidecar starts")
}

/// A client pod running the sidecar, as the API server would show it once scheduled.
fn sidecar_pod(ns: &str, name: &str, admin_port: u16, phase: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"app": "web", "detour.dev/sidecar": "true"}},
        "spec": {"containers": [
            {"name": "web", "image": "web:1"},
            {"name": "detour", "image": "detour:1",
             "ports": [{"name": "detour-admin", "containerPort": admin_port, "protocol": "TCP"}]},
        ]},
        "status": {"phase": phase, "podIP": "127.0.0.1"},
    })
}

/// A policy for `pay` whose ejections come from live traffic only (no active checks).
fn pay_policy(base_ejection: &str) -> Value {
    let mut p = policy("shop", "pay", "pay", json!("http"), 18080);
    p["spec"]["healthCheck"] = json!({"protocol": "none"});
    p["spec"]["outlierDetection"] =
        json!({"baseEjectionTime": base_ejection, "maxEjectionTime": "300s"});
    p
}

fn endpoint_slice(name: &str, pod: &SimPod) -> Value {
    slice(
        "shop",
        name,
        "pay",
        "http",
        i32::from(pod.addr().port()),
        &[("127.0.0.1", true, true, false)],
    )
}

/// (total, ejected, sidecars) of the policy's status.
fn figures(server: &ApiServer) -> Option<(u64, u64, u64)> {
    let s = server.get(POLICIES, "shop", "pay")?["status"].clone();
    Some((
        s["endpoints"]["total"].as_u64()?,
        s["endpoints"]["ejected"].as_u64()?,
        s["sidecars"].as_u64()?,
    ))
}

async fn wait_figures(server: &ApiServer, want: (u64, u64, u64), what: &str) {
    eventually(T, what, || (figures(server) == Some(want)).then_some(())).await;
}

/// Whether `sidecar` has ejected `addr` (its live view, as `GET /endpoints` reports it).
fn ejected_in(sidecar: &SidecarHandle, addr: SocketAddr) -> Option<bool> {
    let ups = sidecar.upstreams();
    let u = ups.iter().find(|u| u.name == "shop/pay")?;
    let e = u.endpoints.iter().find(|e| e.address == addr.to_string())?;
    Some(e.ejected)
}

/// Requests through a sidecar's listener until stopped (ejection needs live traffic).
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(listener: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (stop, sent) = (stop.clone(), sent.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    let (code, body) = http_get(listener, "/").await;
                    assert_eq!(code, 200, "the refused attempt is retried: {body}");
                    sent.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        Traffic { stop, sent, task }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("traffic task");
        self.sent.load(Ordering::Relaxed)
    }
}

/// Seeds a Service with two endpoints (one SimPod each), the policy, and waits for the config.
async fn seed(server: &ApiServer, base_ejection: &str) -> (SimPod, SimPod, Config) {
    let good = SimPod::start("pay-good").await.unwrap();
    let bad = SimPod::start("pay-bad").await.unwrap();
    server.put(service("shop", "pay", &[("http", 80)]));
    server.put(endpoint_slice("pay-good", &good));
    server.put(endpoint_slice("pay-bad", &bad));
    server.put(pay_policy(base_ejection));
    let cfg = eventually(T, "detour-config with both endpoints", || {
        sidecar_config(server, "shop").filter(|c| c.upstreams[0].endpoints.len() == 2)
    })
    .await;
    (good, bad, cfg)
}

/// Two running sidecar pods, `web-a` and `web-b`, serving `cfg`.
async fn two_sidecars(server: &ApiServer, cfg: &Config) -> (SidecarHandle, SidecarHandle) {
    let a = start_sidecar(cfg.clone()).await;
    let b = start_sidecar(cfg.clone()).await;
    for (name, sidecar) in [("web-a", &a), ("web-b", &b)] {
        let port = sidecar.admin_addr().port();
        server.put(sidecar_pod("shop", name, port, "Running"));
    }
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejections_show_in_the_status_and_clear_on_recovery() {
    let server = ApiServer::new();
    let op = Operator::start(server.client(), options()).await.unwrap();
    let (_good, bad, cfg) = seed(&server, "1s").await;
    let (a, b) = two_sidecars(&server, &cfg).await;
    wait_figures(&server, (2, 0, 2), "two sidecars, nothing ejected").await;

    // The pod starts refusing: the first request that picks it ejects it in sidecar a.
    bad.set_fault(Fault::Refuse).await.unwrap();
    let traffic = Traffic::start(a.listener_addr("shop/pay").unwrap());
    wait_figures(&server, (2, 1, 2), "one endpoint ejected").await;
    let sent = traffic.stop().await;
    assert!(sent > 0);
    assert_eq!(ejected_in(&b, bad.addr()), Some(false), "b saw no traffic");
    let p = server.get(POLICIES, "shop", "pay").unwrap();
    assert_eq!(
        condition(&p, "Ready"),
        Some(("True".into(), "Ready".into())),
        "one ejected endpoint of two leaves the policy ready"
    );

    // It recovers; the ejection runs out (1 s, 2 s, ... with traffic retrying it).
    bad.set_fault(Fault::Healthy).await.unwrap();
    wait_figures(&server, (2, 0, 2), "the ejection over").await;

    let metrics = op.metrics_text();
    let ok = metrics
        .lines()
        .find(|l| l.starts_with("detour_operator_sidecar_scrapes_total{result=\"ok\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_default();
    assert!(ok >= 2.0, "{metrics}");
    a.shutdown(Duration::ZERO).await;
    b.shutdown(Duration::ZERO).await;
    op.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_endpoints_and_sidecars_stop_counting() {
    let server = ApiServer::new();
    let op = Operator::start(server.client(), options()).await.unwrap();
    // Long ejections: whatever happens next is not the ejection running out.
    let (_good, bad, cfg) = seed(&server, "120s").await;
    let (a, b) = two_sidecars(&server, &cfg).await;
    // Not counted: not running yet; running but its admin port refuses; no sidecar label.
    server.put(sidecar_pod(
        "shop",
        "web-pending",
        b.admin_addr().port(),
        "Pending",
    ));
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    server.put(sidecar_pod("shop", "web-unreachable", closed, "Running"));
    let mut unlabelled = sidecar_pod("shop", "web-plain", a.admin_addr().port(), "Running");
    unlabelled["metadata"]["labels"] = json!({"app": "web"});
    server.put(unlabelled);
    wait_figures(&server, (2, 0, 2), "two reachable sidecars").await;
    eventually(T, "a failed scrape counted", || {
        op.metrics_text()
            .lines()
            .any(|l| {
                l.starts_with("detour_operator_sidecar_scrapes_total{result=\"error\"}")
                    && !l.ends_with(" 0")
            })
            .then_some(())
    })
    .await;

    // Both sidecars eject the same address: one ejected endpoint.
    bad.set_fault(Fault::Refuse).await.unwrap();
    let ta = Traffic::start(a.listener_addr("shop/pay").unwrap());
    let tb = Traffic::start(b.listener_addr("shop/pay").unwrap());
    eventually(T, "both sidecars eject it", || {
        (ejected_in(&a, bad.addr()) == Some(true) && ejected_in(&b, bad.addr()) == Some(true))
            .then_some(())
    })
    .await;
    ta.stop().await;
    tb.stop().await;
    wait_figures(&server, (2, 1, 2), "one ejected endpoint").await;

    // The endpoint leaves the Service. The sidecars have not reloaded yet and still report it
    // ejected, but it is not the policy's any more.
    server.delete(SLICES, "shop", "pay-bad");
    wait_figures(&server, (1, 0, 2), "the removed endpoint not counted").await;
    assert_eq!(ejected_in(&a, bad.addr()), Some(true));
    // Over the wire, too.
    let (code, body) = http_get(a.admin_addr(), "/endpoints").await;
    assert_eq!(code, 200);
    let report: EndpointsReport = serde_json::from_str(&body).unwrap();
    assert!(report.upstreams["shop/pay"]
        .iter()
        .any(|e| e.address == bad.addr().to_string() && e.state == LiveState::Ejected));

    // A sidecar pod goes away (its process may well still answer: it is no longer asked).
    server.delete(PODS, "shop", "web-b");
    wait_figures(&server, (1, 0, 1), "one sidecar left").await;

    // The policy is deleted while sidecars still run its upstream: nothing breaks, the status
    // goes with the object.
    server.delete(POLICIES, "shop", "pay");
    eventually(T, "the policy gone", || {
        server.get(POLICIES, "shop", "pay").is_none().then_some(())
    })
    .await;
    a.shutdown(Duration::ZERO).await;
    b.shutdown(Duration::ZERO).await;
    op.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_operator_keeps_the_figures_without_extra_writes() {
    let server = ApiServer::new();
    let op = Operator::start(server.client(), options()).await.unwrap();
    let (_good, bad, cfg) = seed(&server, "120s").await;
    let a = start_sidecar(cfg).await;
    server.put(sidecar_pod(
        "shop",
        "web-a",
        a.admin_addr().port(),
        "Running",
    ));
    bad.set_fault(Fault::Refuse).await.unwrap();
    let traffic = Traffic::start(a.listener_addr("shop/pay").unwrap());
    wait_figures(&server, (2, 1, 1), "one ejected endpoint").await;
    traffic.stop().await;
    op.shutdown().await.unwrap();

    server.clear_log();
    let op = Operator::start(server.client(), options()).await.unwrap();
    eventually(T, "caches synced", || op.is_ready().then_some(())).await;
    // Several scrape rounds.
    eventually(T, "scrapes after the restart", || {
        op.metrics_text()
            .lines()
            .any(|l| {
                l.starts_with("detour_operator_sidecar_scrapes_total{result=\"ok\"}")
                    && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) >= Some(5.0)
            })
            .then_some(())
    })
    .await;
    let writes = server.writes();
    assert!(
        writes.is_empty(),
        "the status already showed the sidecars' figures: {writes:#?}"
    );
    assert_eq!(figures(&server), Some((2, 1, 1)));
    a.shutdown(Duration::ZERO).await;
    op.shutdown().await.unwrap();
}

/// The operator's scrape reads a real sidecar's report (the wire contract of `detour::report`;
/// here, where operator and sidecar meet, not inside the operator).
#[tokio::test]
async fn the_operators_scrape_reads_a_real_sidecars_report() {
    use detour::operator::sidecar_reports::{scrape, SCRAPE_TIMEOUT};
    let sidecar = Sidecar::start_empty(sidecar::Options::default())
        .await
        .unwrap();
    let r = scrape(sidecar.admin_addr(), SCRAPE_TIMEOUT).await.unwrap();
    assert_eq!(r.hash, Config::empty().hash());
    assert!(r.upstreams.is_empty());
    sidecar.shutdown(Duration::ZERO).await;
}
