//! The real operator (kube `Controller`, reflectors, finalizer, events) end to end against the
//! in-memory API server.

mod support;

use std::time::Duration;

use detour::{
    config::EndpointState,
    operator::{Operator, Options},
};
use serde_json::{json, Value};
use support::*;

const T: Duration = Duration::from_secs(10);

fn seed(server: &ApiServer) {
    server.put(service("shop", "pay", &[("http", 80), ("admin", 81)]));
    server.put(slice(
        "shop",
        "pay-abc",
        "pay",
        "http",
        8080,
        &[
            ("10.0.0.1", true, true, false),
            ("10.0.0.2", true, true, false),
            ("10.0.0.3", false, true, true),
            ("10.0.0.4", false, false, true),
        ],
    ));
    server.put(policy("shop", "pay", "pay", json!("http"), 18080));
    server.put(policy("shop", "ghost", "nope", json!(80), 18081));
}

/// The one EndpointSlice of Service other/db: 10.1.0.1 ready.
fn db_slice() -> Value {
    slice(
        "other",
        "db-1",
        "db",
        "pg",
        5432,
        &[("10.1.0.1", true, true, false)],
    )
}

/// shop/pay's endpoints are replaced by the one at `ip` (a rollout, in one step).
fn pay_moves_to(server: &ApiServer, ip: &str) {
    server.put(slice(
        "shop",
        "pay-abc",
        "pay",
        "http",
        8080,
        &[(ip, true, true, false)],
    ));
}

/// Waits until the rendered shop/pay runs exactly the endpoint at `ip`.
async fn pay_runs_at(server: &ApiServer, ip: &str, what: &str) {
    let want = format!("{ip}:8080");
    eventually(T, what, || {
        let (cfg, _) = rendered_config(server, "shop")?;
        let pay = cfg.upstreams.iter().find(|u| u.name == "shop/pay")?;
        (pay.endpoints.len() == 1 && pay.endpoints[0].address == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_follows_endpoints_and_cleans_up() {
    let server = ApiServer::new();
    seed(&server);
    let op = Operator::start(server.client(), operator_options())
        .await
        .unwrap();

    // --- first convergence ---
    let (cfg, cm) = eventually(T, "detour-config with two upstreams", || {
        rendered_config(&server, "shop").filter(|(c, _)| c.upstreams.len() == 2)
    })
    .await;
    let pay = cfg.upstreams.iter().find(|u| u.name == "shop/pay").unwrap();
    assert_eq!(pay.listen, "127.0.0.1:18080");
    assert_eq!(pay.policy.retries.attempts, 3);
    assert!(pay.workload_selector.is_some());
    let eps: Vec<(&str, EndpointState, Option<&str>)> = pay
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.state, e.pod.as_deref()))
        .collect();
    assert_eq!(
        eps,
        vec![
            ("10.0.0.1:8080", EndpointState::Ready, Some("pay-0")),
            ("10.0.0.2:8080", EndpointState::Ready, Some("pay-1")),
            ("10.0.0.3:8080", EndpointState::Terminating, Some("pay-2")),
        ]
    );
    assert_eq!(
        cm["metadata"]["annotations"]["detour.dev/config-hash"],
        cfg.hash()
    );
    assert_eq!(
        cm["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "detour-operator"
    );

    let p = eventually(T, "pay status", || {
        server
            .get(POLICIES, "shop", "pay")
            .filter(|p| p["status"]["configHash"] == cfg.hash())
    })
    .await;
    assert_eq!(
        condition(&p, "Ready"),
        Some(("True".into(), "Ready".into()))
    );
    assert_eq!(
        p["status"]["endpoints"],
        json!({"total": 4, "ready": 2, "serving": 3, "terminating": 2, "ejected": 0})
    );
    assert_eq!(
        p["status"]["observedGeneration"],
        p["metadata"]["generation"]
    );
    eventually(T, "finalizer on pay", || {
        let p = server.get(POLICIES, "shop", "pay")?;
        (p["metadata"]["finalizers"] == json!(["detour.dev/config"])).then_some(())
    })
    .await;
    let g = eventually(T, "ghost status", || {
        server
            .get(POLICIES, "shop", "ghost")
            .filter(|p| condition(p, "ResolvedRefs").is_some())
    })
    .await;
    assert_eq!(
        condition(&g, "ResolvedRefs"),
        Some(("False".into(), "ServiceNotFound".into()))
    );
    assert_eq!(
        condition(&g, "Ready"),
        Some(("False".into(), "RefsNotResolved".into()))
    );
    eventually(T, "a ServiceNotFound warning event", || {
        let events = server.list("events.k8s.io/v1/events");
        events
            .iter()
            .any(|e| e["reason"] == "ServiceNotFound" && e["type"] == "Warning")
            .then_some(())
    })
    .await;

    // Readiness and metrics on the admin port.
    eventually(T, "ready", || op.is_ready().then_some(())).await;
    let (code, _) = http_get(op.admin_addr(), "/ready").await;
    assert_eq!(code, 200);
    let (code, metrics) = http_get(op.admin_addr(), "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("detour_operator_policies{condition=\"Ready\",status=\"True\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("detour_operator_config_renders_total{result=\"applied\"}"));
    assert_eq!(http_get(op.admin_addr(), "/live").await.0, 200);

    // --- an endpoint starts terminating: reaches the ConfigMap and the status ---
    server.put(slice(
        "shop",
        "pay-abc",
        "pay",
        "http",
        8080,
        &[
            ("10.0.0.1", false, true, true),
            ("10.0.0.2", true, true, false),
            ("10.0.0.3", false, true, true),
            ("10.0.0.4", false, false, true),
        ],
    ));
    let started = std::time::Instant::now();
    eventually(T, "10.0.0.1 terminating in the ConfigMap", || {
        let (cfg, _) = rendered_config(&server, "shop")?;
        let pay = cfg.upstreams.iter().find(|u| u.name == "shop/pay")?;
        (pay.endpoints[0].state == EndpointState::Terminating).then_some(())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    eventually(T, "status ready count 1", || {
        let p = server.get(POLICIES, "shop", "pay")?;
        (p["status"]["endpoints"]["ready"] == 1).then_some(())
    })
    .await;

    // --- a conflicting policy: the newer one loses, both are told ---
    server.put(policy("shop", "pay-copy", "pay", json!(80), 18080));
    let copy = eventually(T, "conflict on the newer policy", || {
        server
            .get(POLICIES, "shop", "pay-copy")
            .filter(|p| condition(p, "Accepted").is_some())
    })
    .await;
    assert_eq!(
        condition(&copy, "Accepted"),
        Some(("False".into(), "ListenerConflict".into()))
    );
    eventually(T, "conflict on the older policy", || {
        let p = server.get(POLICIES, "shop", "pay")?;
        (condition(&p, "Accepted") == Some(("True".into(), "ListenerConflict".into())))
            .then_some(())
    })
    .await;
    let (cfg, _) = rendered_config(&server, "shop").unwrap();
    assert_eq!(cfg.upstreams.len(), 2, "the loser is not rendered");

    // --- deleting a policy: it leaves the config, its finalizer is released ---
    assert!(server.delete(POLICIES, "shop", "ghost"));
    eventually(T, "ghost gone", || {
        server
            .get(POLICIES, "shop", "ghost")
            .is_none()
            .then_some(())
    })
    .await;
    let (cfg, _) = rendered_config(&server, "shop").unwrap();
    assert_eq!(
        cfg.upstreams
            .iter()
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>(),
        vec!["shop/pay"]
    );
    // Deleting the older policy frees the port for the newer one.
    assert!(server.delete(POLICIES, "shop", "pay"));
    eventually(T, "pay-copy takes over", || {
        let (cfg, _) = rendered_config(&server, "shop")?;
        (cfg.upstreams.len() == 1 && cfg.upstreams[0].name == "shop/pay-copy").then_some(())
    })
    .await;
    eventually(T, "pay-copy accepted", || {
        let p = server.get(POLICIES, "shop", "pay-copy")?;
        (condition(&p, "Accepted") == Some(("True".into(), "Accepted".into()))).then_some(())
    })
    .await;

    // --- last policy gone: the ConfigMap goes too ---
    assert!(server.delete(POLICIES, "shop", "pay-copy"));
    eventually(T, "detour-config deleted", || {
        server
            .get(CONFIG_MAPS, "shop", "detour-config")
            .is_none()
            .then_some(())
    })
    .await;
    eventually(T, "every policy gone", || {
        server.list(POLICIES).is_empty().then_some(())
    })
    .await;
    op.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_rebuilds_state_without_duplicate_writes() {
    let server = ApiServer::new();
    seed(&server);
    server.put(service("other", "db", &[("pg", 5432)]));
    server.put(db_slice());
    server.put(policy("other", "db", "db", json!(5432), 15432));
    let op = Operator::start(server.client(), operator_options())
        .await
        .unwrap();
    eventually(T, "both namespaces converge", || {
        let a = server.get(POLICIES, "shop", "ghost")?;
        let b = server.get(POLICIES, "other", "db")?;
        (condition(&a, "Ready").is_some()
            && condition(&b, "Ready") == Some(("True".into(), "Ready".into())))
        .then_some(())
    })
    .await;
    // Let in-flight reconciles triggered by our own writes settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes_first_run = server.writes();
    let status_writes = writes_first_run
        .iter()
        .filter(|r| r.path.ends_with("/status"))
        .count();
    assert_eq!(
        status_writes, 3,
        "one status write per policy: {writes_first_run:#?}"
    );
    assert!(
        writes_first_run
            .iter()
            .all(|r| r.changed || r.path.contains("/events")),
        "every write changed something"
    );
    op.shutdown().await.unwrap();

    server.clear_log();
    let rv = server.resource_version();
    let op = Operator::start(server.client(), operator_options())
        .await
        .unwrap();
    eventually(T, "ready after restart", || op.is_ready().then_some(())).await;
    eventually(
        T,
        "the restarted operator to reconcile all three policies",
        || (reconciles_ok(&op) >= 3).then_some(()),
    )
    .await;
    let writes = server.writes();
    assert!(writes.is_empty(), "restart wrote: {writes:#?}");
    assert_eq!(server.resource_version(), rv);
    op.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_policy_does_not_stop_the_others() {
    let server = ApiServer::new();
    seed(&server);
    // Stored as if the CRD had no schema: the port is not a number.
    let mut bad = policy("shop", "garbled", "pay", json!(80), 18090);
    bad["spec"]["listener"]["port"] = json!("eighty");
    server.put(bad);
    let op = Operator::start(server.client(), operator_options())
        .await
        .unwrap();
    eventually(T, "the valid policies render", || {
        rendered_config(&server, "shop").filter(|(c, _)| c.upstreams.len() == 2)
    })
    .await;
    let g = eventually(T, "garbled gets a status", || {
        server
            .get(POLICIES, "shop", "garbled")
            .filter(|p| condition(p, "Accepted").is_some())
    })
    .await;
    assert_eq!(
        condition(&g, "Accepted"),
        Some(("False".into(), "Invalid".into()))
    );
    let msg = g["status"]["conditions"][0]["message"].as_str().unwrap();
    assert!(msg.contains("cannot be read"), "{msg}");
    // Invalid objects wait for a change: no write loop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.clear_log();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let quiet = server.writes();
    // The operator was at work all along: a later change of a valid policy's endpoints renders.
    pay_moves_to(&server, "10.0.0.5");
    pay_runs_at(&server, "10.0.0.5", "the endpoint change renders").await;
    assert!(quiet.is_empty(), "{quiet:#?}");
    let writes = server.writes();
    assert!(
        writes.iter().all(|r| !r.path.contains("/garbled")),
        "{writes:#?}"
    );
    op.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_namespaces_limit_the_scope() {
    let server = ApiServer::new();
    seed(&server);
    server.put(service("other", "db", &[("pg", 5432)]));
    server.put(policy("other", "db", "db", json!(5432), 15432));
    let op = Operator::start(
        server.client(),
        Options {
            namespaces: vec!["other".into()],
            ..operator_options()
        },
    )
    .await
    .unwrap();
    eventually(T, "other renders", || rendered_config(&server, "other")).await;
    eventually(T, "ready", || op.is_ready().then_some(())).await;
    // A later change in `other` renders: whatever the first list brought, shop included had it
    // been in scope, was worked through before.
    server.put(db_slice());
    eventually(T, "the change in other renders", || {
        let (cfg, _) = rendered_config(&server, "other")?;
        (cfg.upstreams[0].endpoints.len() == 1).then_some(())
    })
    .await;
    assert!(rendered_config(&server, "shop").is_none());
    let in_shop: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/namespaces/shop/"))
        .collect();
    assert!(in_shop.is_empty(), "{in_shop:#?}");
    assert!(server
        .get(POLICIES, "shop", "pay")
        .unwrap()
        .get("status")
        .is_none());
    op.shutdown().await.unwrap();
}

fn leader_options(identity: &str) -> Options {
    Options {
        leader_election: Some(lease("detour-system", identity)),
        ..operator_options()
    }
}

/// Reconciles that ended well (each policy's, and each namespace's without a policy).
fn reconciles_ok(op: &Operator) -> u64 {
    op.metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix("detour_operator_reconciles_total{result=\"ok\"} "))
        .map_or(0, |v| v.parse().expect("a count"))
}

fn reconciles(op: &Operator) -> u64 {
    op.metrics_text()
        .lines()
        .filter(|l| l.starts_with("detour_operator_reconciles_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_writes_and_a_standby_takes_over() {
    let server = ApiServer::new();
    seed(&server);
    let a = Operator::start(server.client(), leader_options("replica-a"))
        .await
        .unwrap();
    eventually(T, "replica-a leads and is ready", || {
        a.is_ready().then_some(())
    })
    .await;
    let b = Operator::start(server.client(), leader_options("replica-b"))
        .await
        .unwrap();
    eventually(T, "pay rendered by the leader", || {
        rendered_config(&server, "shop")
    })
    .await;
    let lease = lease_object(&server, "detour-system").expect("the Lease exists");
    assert_eq!(lease["spec"]["holderIdentity"], "replica-a");
    // The standby stays out: not ready, no reconciles, across several renewals.
    let mut renewals = vec![lease["spec"]["renewTime"].clone()];
    eventually(T, "replica-a to renew the lease twice", || {
        let lease = lease_object(&server, "detour-system")?;
        assert_eq!(lease["spec"]["holderIdentity"], "replica-a");
        let renewed = &lease["spec"]["renewTime"];
        if renewals.last() != Some(renewed) {
            renewals.push(renewed.clone());
        }
        (renewals.len() > 2).then_some(())
    })
    .await;
    assert!(!b.is_ready());
    assert_eq!(reconciles(&b), 0);
    assert!(b.metrics_text().contains("detour_operator_leader 0"));
    assert!(a.metrics_text().contains("detour_operator_leader 1"));
    let (code, body) = http_get(b.admin_addr(), "/ready").await;
    assert_eq!(
        (code.as_u16(), body.as_str()),
        (503, "not ready: not the leader\n")
    );

    // The leader stops and releases the Lease: the standby takes over and follows changes.
    a.shutdown().await.unwrap();
    eventually(Duration::from_secs(15), "replica-b leads", || {
        b.is_ready().then_some(())
    })
    .await;
    pay_moves_to(&server, "10.0.0.9");
    pay_runs_at(&server, "10.0.0.9", "replica-b renders the change").await;
    let lease = lease_object(&server, "detour-system").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "replica-b");
    b.shutdown().await.unwrap();
}

/// Many reconciles start before the caches are synced; every one of them must get going once
/// they are (kube's `Store::wait_until_ready` wakes only one of several waiters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_namespaces_converge_together() {
    let server = ApiServer::new();
    for n in 0..30 {
        let ns = format!("ns-{n}");
        for s in 0..3 {
            let svc = format!("svc-{s}");
            server.put(service(&ns, &svc, &[("http", 80)]));
            let ip = format!("10.{n}.{s}.1");
            server.put(slice(
                &ns,
                &format!("{svc}-1"),
                &svc,
                "http",
                8080,
                &[(ip.as_str(), true, true, false)],
            ));
            server.put(policy(
                &ns,
                &format!("p-{s}"),
                &svc,
                json!("http"),
                20000 + s,
            ));
        }
    }
    let op = Operator::start(server.client(), operator_options())
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "90 policies Ready", || {
        (server.count(POLICIES, |p| {
            condition(p, "Ready") == Some(("True".into(), "Ready".into()))
        }) == 90)
            .then_some(())
    })
    .await;
    eventually(T, "30 ConfigMaps", || {
        (server.count(CONFIG_MAPS, |_| true) == 30).then_some(())
    })
    .await;
    op.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_or_deleted_config_map_is_repaired() {
    let server = ApiServer::new();
    seed(&server);
    let op = Operator::start(server.client(), operator_options())
        .await
        .unwrap();
    let (want, _) = eventually(T, "rendered", || {
        rendered_config(&server, "shop").filter(|(c, _)| c.upstreams.len() == 2)
    })
    .await;
    // Someone edits it by hand.
    let mut cm = server.get(CONFIG_MAPS, "shop", "detour-config").unwrap();
    cm["data"]["config.yaml"] = json!("apiVersion: detour.dev/v1alpha1\nkind: SidecarConfig\n");
    cm["metadata"]["annotations"]["detour.dev/config-hash"] = json!("0000000000000000");
    server.put(cm);
    eventually(T, "edit reverted", || {
        rendered_config(&server, "shop").filter(|(c, _)| *c == want)
    })
    .await;
    // Someone deletes it.
    assert!(server.delete(CONFIG_MAPS, "shop", "detour-config"));
    eventually(T, "re-created", || {
        rendered_config(&server, "shop").filter(|(c, _)| *c == want)
    })
    .await;
    op.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_churn_is_debounced_and_the_last_state_wins() {
    let server = ApiServer::new();
    seed(&server);
    let op = Operator::start(
        server.client(),
        Options {
            debounce: Duration::from_millis(200),
            ..operator_options()
        },
    )
    .await
    .unwrap();
    eventually(T, "rendered", || rendered_config(&server, "shop")).await;
    eventually(T, "ready", || op.is_ready().then_some(())).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.clear_log();
    let ips: Vec<String> = (1..=20).map(|i| format!("10.9.0.{i}")).collect();
    for ip in &ips {
        pay_moves_to(&server, ip);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pay_runs_at(&server, "10.9.0.20", "the last endpoint set").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cm_writes = server
        .writes()
        .iter()
        .filter(|r| r.path.ends_with("/configmaps/detour-config"))
        .count();
    assert!(
        (1..=10).contains(&cm_writes),
        "{cm_writes} ConfigMap writes for 20 changes"
    );
    op.shutdown().await.unwrap();
}

/// A policy can vanish without our finalizer (deleted before its first reconcile, or the
/// finalizer removed by hand): it still leaves the config, and the last one takes the ConfigMap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_gone_without_our_finalizer_leaves_the_config() {
    let server = ApiServer::new();
    seed(&server);
    let op = Operator::start(server.client(), operator_options())
        .await
        .unwrap();
    eventually(T, "two upstreams, both finalized", || {
        let both = ["pay", "ghost"].iter().all(|n| {
            server.get(POLICIES, "shop", n).is_some_and(|p| {
                p["metadata"]["finalizers"] == json!(["detour.dev/config"])
                    && condition(&p, "Ready").is_some()
            })
        });
        rendered_config(&server, "shop").filter(|(c, _)| both && c.upstreams.len() == 2)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    assert!(server.set_finalizers(POLICIES, "shop", "ghost", &[]));
    assert!(server.delete(POLICIES, "shop", "ghost"));
    assert!(server.get(POLICIES, "shop", "ghost").is_none());
    eventually(T, "ghost out of the config", || {
        let (cfg, _) = rendered_config(&server, "shop")?;
        let names: Vec<&str> = cfg.upstreams.iter().map(|u| u.name.as_str()).collect();
        (names == ["shop/pay"]).then_some(())
    })
    .await;

    assert!(server.set_finalizers(POLICIES, "shop", "pay", &[]));
    assert!(server.delete(POLICIES, "shop", "pay"));
    eventually(T, "detour-config deleted with the last policy", || {
        server
            .get(CONFIG_MAPS, "shop", "detour-config")
            .is_none()
            .then_some(())
    })
    .await;
    op.shutdown().await.unwrap();
}

/// A ConfigMap left in a namespace whose policies went while no operator ran is deleted once
/// the caches are synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_config_map_is_deleted_after_sync() {
    let server = ApiServer::new();
    seed(&server);
    server.put(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {
            "name": "detour-config", "namespace": "empty",
            "labels": {"app.kubernetes.io/managed-by": "detour-operator"},
        },
        "data": {"config.yaml": "apiVersion: detour.dev/v1alpha1\nkind: SidecarConfig\n"},
    }));
    let op = Operator::start(server.client(), operator_options())
        .await
        .unwrap();
    eventually(T, "the orphan deleted", || {
        server
            .get(CONFIG_MAPS, "empty", "detour-config")
            .is_none()
            .then_some(())
    })
    .await;
    eventually(T, "shop still rendered", || {
        rendered_config(&server, "shop").filter(|(c, _)| c.upstreams.len() == 2)
    })
    .await;
    op.shutdown().await.unwrap();
}

/// A policy held by another controller's finalizer after deletion must not swallow the
/// endpoint changes of the Service it shares with live policies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_changes_reach_the_config_while_a_sibling_is_held_in_deletion() {
    let server = ApiServer::new();
    seed(&server);
    for i in 0..5u16 {
        server.put(policy(
            "shop",
            &format!("held-{i}"),
            "pay",
            json!("http"),
            18100 + i,
        ));
    }
    let op = Operator::start(server.client(), operator_options())
        .await
        .unwrap();
    eventually(T, "seven upstreams", || {
        rendered_config(&server, "shop").filter(|(c, _)| c.upstreams.len() == 7)
    })
    .await;
    for i in 0..5u16 {
        let name = format!("held-{i}");
        eventually(T, "our finalizer on the held policy", || {
            let p = server.get(POLICIES, "shop", &name)?;
            p["metadata"]["finalizers"].is_array().then_some(())
        })
        .await;
        assert!(server.set_finalizers(
            POLICIES,
            "shop",
            &name,
            &["detour.dev/config", "example.com/hold"]
        ));
        assert!(server.delete(POLICIES, "shop", &name));
    }
    eventually(T, "held policies out of the config", || {
        rendered_config(&server, "shop").filter(|(c, _)| c.upstreams.len() == 2)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    pay_moves_to(&server, "10.0.0.77");
    pay_runs_at(&server, "10.0.0.77", "the new endpoint rendered").await;
    op.shutdown().await.unwrap();
}

/// The API server refuses the ConfigMap (too large, RBAC): every rendered policy says so in its
/// Ready condition, and one refused status write does not keep the other policies stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_config_map_or_status_still_reports_every_policy() {
    let server = ApiServer::new();
    seed(&server);
    for i in 0..4u16 {
        server.put(policy(
            "shop",
            &format!("p{i}"),
            "pay",
            json!("http"),
            18100 + i,
        ));
        server.fail(
            http::Method::PATCH,
            &format!("/upstreampolicies/p{i}/status"),
            500,
            "etcd is unhappy",
        );
    }
    let too_long =
        "ConfigMap \"detour-config\" is invalid: []: Too long: must have at most 1048576 bytes";
    server.fail(
        http::Method::PATCH,
        "/configmaps/detour-config",
        422,
        too_long,
    );
    let op = Operator::start(server.client(), operator_options())
        .await
        .unwrap();
    let p = eventually(T, "pay reports the refused config", || {
        server
            .get(POLICIES, "shop", "pay")
            .filter(|p| condition(p, "Ready").is_some())
    })
    .await;
    assert_eq!(
        condition(&p, "Ready"),
        Some(("False".into(), "ConfigNotApplied".into()))
    );
    let ready = p["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert!(
        ready["message"].as_str().unwrap().contains("Too long"),
        "{ready}"
    );
    assert!(
        p["status"].get("configHash").is_none(),
        "nothing was applied"
    );
    let g = eventually(T, "ghost keeps its own reason", || {
        server
            .get(POLICIES, "shop", "ghost")
            .filter(|p| condition(p, "Ready").is_some())
    })
    .await;
    assert_eq!(
        condition(&g, "Ready"),
        Some(("False".into(), "RefsNotResolved".into()))
    );

    // The server accepts again: the backoff retries and everything converges.
    server.clear_faults();
    eventually(
        Duration::from_secs(20),
        "pay ready with the applied config",
        || {
            let (cfg, _) = rendered_config(&server, "shop")?;
            let p = server.get(POLICIES, "shop", "pay")?;
            (condition(&p, "Ready") == Some(("True".into(), "Ready".into()))
                && p["status"]["configHash"] == cfg.hash())
            .then_some(())
        },
    )
    .await;
    eventually(T, "p0 gets its status", || {
        server
            .get(POLICIES, "shop", "p0")
            .filter(|p| condition(p, "Ready").is_some())
    })
    .await;
    op.shutdown().await.unwrap();
}

/// The in-memory server's server-side apply, as a real one: a field the same manager stops
/// sending is removed, other managers' fields stay.
#[tokio::test]
async fn server_side_apply_removes_fields_the_manager_stopped_sending() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, Patch, PatchParams};
    let server = ApiServer::new();
    server.put(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "cm", "namespace": "shop", "labels": {"owner": "kubectl"}},
        "data": {"user": "1"},
    }));
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "shop");
    let pp = PatchParams::apply("me").force();
    let first = json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm", "annotations": {"a": "1", "b": "2"}},
        "data": {"x": "1", "y": "2"},
    });
    api.patch("cm", &pp, &Patch::Apply(&first)).await.unwrap();
    let second = json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"},
        "data": {"x": "1"},
    });
    api.patch("cm", &pp, &Patch::Apply(&second)).await.unwrap();
    let cm = server.get(CONFIG_MAPS, "shop", "cm").unwrap();
    assert_eq!(cm["data"], json!({"user": "1", "x": "1"}));
    assert!(cm["metadata"].get("annotations").is_none(), "{cm}");
    assert_eq!(cm["metadata"]["labels"], json!({"owner": "kubectl"}));
}
