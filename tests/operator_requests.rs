//! Request-level tests of one reconcile: exact paths, field manager, content types and bodies,
//! against a `tower_test` mock API server (in the style of kube-rs controller-rs `fixtures.rs`).

mod support;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use detour::{
    api::UpstreamPolicy,
    config::EndpointState,
    operator::{
        access,
        reconcile::{self, Context, Shared},
        sidecar_reports::UpstreamReport,
        Metrics,
    },
};
use http::{Method, Request, Response};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    client::Body,
    core::DeserializeGuard,
    runtime::{
        controller::Action,
        reflector::{self, Store},
        watcher,
    },
    Client,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use support::{config_in, service, slice};
use tokio::task::JoinHandle;
use tower_test::mock::{self, Handle};

type Policy = DeserializeGuard<UpstreamPolicy>;
type Mock = Handle<Request<Body>, Response<Body>>;

fn store<K>(objects: &[Value]) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + 'static,
{
    let (reader, mut writer) = reflector::store::<K>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        let obj: K = serde_json::from_value(o.clone()).expect("fixture deserializes");
        writer.apply_watcher_event(&watcher::Event::InitApply(obj));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    // The writer must outlive the test or the store reports the watch as gone.
    std::mem::forget(writer);
    reader
}

struct Fixture {
    ctx: Arc<Context>,
    handle: Mock,
}

/// An operator that already made sure of the sidecars' Role and RoleBinding in `shop`.
fn fixture(policies: &[Value], config_maps: &[Value]) -> Fixture {
    let f = cold_fixture(policies, config_maps);
    f.ctx.shared.remember_access("shop");
    f
}

/// A freshly started operator: it reads (and writes when needed) the sidecars' access first.
fn cold_fixture(policies: &[Value], config_maps: &[Value]) -> Fixture {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let ctx = Arc::new(Context {
        client: client.clone(),
        policies: store::<Policy>(policies),
        services: store::<Service>(&[service("shop", "pay", &[("http", 80)])]),
        slices: store::<EndpointSlice>(&[slice(
            "shop",
            "pay-1",
            "pay",
            "http",
            8080,
            &[
                ("10.0.0.1", true, true, false),
                ("10.0.0.2", false, true, true),
            ],
        )]),
        config_maps: store::<ConfigMap>(config_maps),
        synced: tokio::sync::watch::channel(true).1,
        shared: Arc::new(Shared::new(client, Arc::new(Metrics::new()), None)),
        reports: Default::default(),
    });
    Fixture { ctx, handle }
}

fn policy(extra_meta: Value, status: Option<Value>) -> Value {
    let mut meta = json!({
        "name": "pay", "namespace": "shop", "uid": "u-1", "generation": 2,
        "resourceVersion": "10", "creationTimestamp": "2026-01-01T00:00:00Z",
    });
    for (k, v) in extra_meta.as_object().unwrap() {
        meta[k] = v.clone();
    }
    let mut p = json!({
        "apiVersion": "detour.dev/v1alpha1", "kind": "UpstreamPolicy",
        "metadata": meta,
        "spec": {"upstream": {"service": "pay", "port": "http"}, "listener": {"port": 18080}},
    });
    if let Some(s) = status {
        p["status"] = s;
    }
    p
}

/// Takes the next request, checks method and path-and-query, answers `reply` with `code`,
/// returns the request body.
async fn expect(
    handle: &mut Mock,
    method: Method,
    uri: &str,
    ctype: Option<&str>,
    code: u16,
    reply: Value,
) -> Value {
    let (req, send) = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {method} {uri}"))
        .expect("service not called");
    assert_eq!(req.method(), method, "{uri}");
    assert_eq!(req.uri().to_string(), uri);
    assert_eq!(
        req.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        ctype,
        "{uri}"
    );
    let bytes = http_body_util::BodyExt::collect(req.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    send.send_response(
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap(),
    );
    body
}

/// One reconcile that must make no request: the mock answers none, so a request would hang it.
async fn reconcile_without_requests(ctx: &Arc<Context>) {
    let action = tokio::time::timeout(Duration::from_secs(1), run(ctx))
        .await
        .expect("reconcile made a request")
        .unwrap();
    assert_eq!(action, Action::await_change());
}

/// The reconcile `task` ends well within a second and waits for the next change; `what` names
/// what it would otherwise be stuck on.
async fn ends_awaiting_change(task: JoinHandle<Result<Action, reconcile::Error>>, what: &str) {
    let action = tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
        .unwrap()
        .unwrap();
    assert_eq!(action, Action::await_change());
}

const ROLE_PATH: &str = "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/detour-sidecar";
const BINDING_PATH: &str =
    "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/rolebindings/detour-sidecar";

/// The sidecars' Role and RoleBinding: read, and written only when `absent` (404).
async fn expect_access(handle: &mut Mock, present: bool) {
    let not_found = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404});
    for (path, desired) in [
        (ROLE_PATH, access::role("shop")),
        (BINDING_PATH, access::role_binding("shop")),
    ] {
        let (code, reply) = if present {
            (200, desired.clone())
        } else {
            (404, not_found.clone())
        };
        expect(handle, Method::GET, path, None, code, reply).await;
        if !present {
            let body = expect_apply(handle, path, 200, desired.clone()).await;
            assert_eq!(body, desired);
        }
    }
}

/// A server-side apply of `path` under the operator's field manager, answered `reply` with
/// `code`; returns the applied body.
async fn expect_apply(handle: &mut Mock, path: &str, code: u16, reply: Value) -> Value {
    let uri = format!("{path}?&force=true&fieldManager=detour-operator");
    expect(handle, Method::PATCH, &uri, APPLY, code, reply).await
}

/// An Event about the policy; returns it.
async fn expect_event(handle: &mut Mock) -> Value {
    let uri = "/apis/events.k8s.io/v1/namespaces/shop/events?";
    expect(
        handle,
        Method::POST,
        uri,
        Some("application/json"),
        201,
        json!({}),
    )
    .await
}

const POLICY_PATH: &str = "/apis/detour.dev/v1alpha1/namespaces/shop/upstreampolicies/pay";
const STATUS_PATH: &str = "/apis/detour.dev/v1alpha1/namespaces/shop/upstreampolicies/pay/status";
const CM_PATH: &str = "/api/v1/namespaces/shop/configmaps/detour-config";
const APPLY: Option<&str> = Some("application/apply-patch+yaml");
const JSON_PATCH: Option<&str> = Some("application/json-patch+json");

async fn run(ctx: &Arc<Context>) -> Result<Action, reconcile::Error> {
    let obj = ctx.policies.state()[0].clone();
    reconcile::reconcile(obj, ctx.clone()).await
}

/// A new policy: finalizer, then the ConfigMap, then its status, then an Event. Returns the
/// written ConfigMap data and status for the next test.
async fn first_reconcile() -> (Value, Value) {
    let Fixture { ctx, mut handle } = cold_fixture(&[policy(json!({}), None)], &[]);
    let task = tokio::spawn({
        let ctx = ctx.clone();
        async move { run(&ctx).await }
    });

    let with_fin = policy(
        json!({"finalizers": ["detour.dev/config"], "resourceVersion": "11"}),
        None,
    );
    let patch = expect(
        &mut handle,
        Method::PATCH,
        &format!("{POLICY_PATH}?"),
        JSON_PATCH,
        200,
        with_fin.clone(),
    )
    .await;
    assert_eq!(
        patch,
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["detour.dev/config"]},
        ])
    );

    expect_access(&mut handle, false).await;

    let cm_reply = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "detour-config", "namespace": "shop", "resourceVersion": "12"}});
    let cm = expect_apply(&mut handle, CM_PATH, 200, cm_reply).await;
    assert_eq!(cm["apiVersion"], "v1");
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(
        cm["metadata"]["labels"],
        json!({"app.kubernetes.io/managed-by": "detour-operator"})
    );
    let cfg = config_in(&cm).expect("the ConfigMap carries a config");
    assert_eq!(
        cm["metadata"]["annotations"]["detour.dev/config-hash"],
        cfg.hash()
    );
    assert_eq!(cfg.upstreams.len(), 1);
    let u = &cfg.upstreams[0];
    assert_eq!(
        (u.name.as_str(), u.listen.as_str()),
        ("shop/pay", "127.0.0.1:18080")
    );
    let eps: Vec<(&str, EndpointState)> = u
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.state))
        .collect();
    assert_eq!(
        eps,
        vec![
            ("10.0.0.1:8080", EndpointState::Ready),
            ("10.0.0.2:8080", EndpointState::Terminating)
        ]
    );

    let mut status_reply = with_fin.clone();
    let status_body = expect_apply(&mut handle, STATUS_PATH, 200, {
        status_reply["metadata"]["resourceVersion"] = json!("13");
        status_reply
    })
    .await;
    assert_eq!(status_body["apiVersion"], "detour.dev/v1alpha1");
    assert_eq!(status_body["kind"], "UpstreamPolicy");
    assert!(
        status_body.get("spec").is_none(),
        "status apply carries only status"
    );
    let status = status_body["status"].clone();
    assert_eq!(status["observedGeneration"], 2);
    assert_eq!(status["configHash"], cfg.hash());
    assert_eq!(
        status["endpoints"],
        json!({"total": 2, "ready": 1, "serving": 2, "terminating": 1, "ejected": 0})
    );
    assert_eq!(status["sidecars"], 0, "no sidecar reported yet");
    let kinds: Vec<(&str, &str, &str)> = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap(),
                c["status"].as_str().unwrap(),
                c["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("Accepted", "True", "Accepted"),
            ("ResolvedRefs", "True", "ResolvedRefs"),
            ("Ready", "True", "Ready")
        ]
    );

    let ev = expect_event(&mut handle).await;
    assert_eq!(ev["reason"], "Ready");
    assert_eq!(ev["type"], "Normal");
    assert_eq!(ev["reportingController"], "detour-operator");
    assert_eq!(ev["regarding"]["name"], "pay");
    assert_eq!(ev["regarding"]["kind"], "UpstreamPolicy");

    ends_awaiting_change(task, "the reconcile to end").await;
    (cm, status)
}

#[tokio::test]
async fn new_policy_gets_finalizer_config_status_and_event() {
    first_reconcile().await;
}

#[tokio::test]
async fn up_to_date_namespace_makes_no_requests() {
    let (mut cm, status) = first_reconcile().await;
    cm["metadata"]["resourceVersion"] = json!("12");
    let p = policy(json!({"finalizers": ["detour.dev/config"]}), Some(status));
    let Fixture { ctx, handle } = fixture(&[p], &[cm]);
    // Any request would wait forever for the mock to answer.
    reconcile_without_requests(&ctx).await;
    drop(handle);
}

#[tokio::test]
async fn a_restarted_operator_only_reads_the_sidecar_access_of_an_up_to_date_namespace() {
    let (mut cm, status) = first_reconcile().await;
    cm["metadata"]["resourceVersion"] = json!("12");
    let p = policy(json!({"finalizers": ["detour.dev/config"]}), Some(status));
    let Fixture { ctx, mut handle } = cold_fixture(&[p], &[cm]);
    let task = tokio::spawn({
        let ctx = ctx.clone();
        async move { run(&ctx).await }
    });
    expect_access(&mut handle, true).await;
    ends_awaiting_change(task, "a request after the two reads").await;
}

/// The namespace as `first_reconcile` left it: ConfigMap and status in the cache.
async fn converged(status_edit: impl FnOnce(&mut Value)) -> Fixture {
    let (mut cm, mut status) = first_reconcile().await;
    cm["metadata"]["resourceVersion"] = json!("12");
    status_edit(&mut status);
    let p = policy(json!({"finalizers": ["detour.dev/config"]}), Some(status));
    fixture(&[p], &[cm])
}

fn sidecar_figures(sidecars: u32, ejected: &[&str]) -> BTreeMap<String, UpstreamReport> {
    BTreeMap::from([(
        "shop/pay".to_string(),
        UpstreamReport {
            sidecars,
            ejected: ejected.iter().map(|a| a.parse().unwrap()).collect(),
        },
    )])
}

#[tokio::test]
async fn sidecar_reports_reach_the_status_in_one_write() {
    let Fixture { ctx, mut handle } = converged(|_| {}).await;
    // 10.0.0.9 left the Service; a sidecar that has not reloaded yet still reports it ejected.
    ctx.reports
        .set(sidecar_figures(2, &["10.0.0.2:8080", "10.0.0.9:8080"]));
    let task = tokio::spawn({
        let ctx = ctx.clone();
        async move { run(&ctx).await }
    });
    // No ConfigMap write (unchanged), no Event (conditions unchanged): only the status.
    let body = expect_apply(
        &mut handle,
        STATUS_PATH,
        200,
        policy(json!({"resourceVersion": "14"}), None),
    )
    .await;
    assert_eq!(
        body["status"]["endpoints"],
        json!({"total": 2, "ready": 1, "serving": 2, "terminating": 1, "ejected": 1})
    );
    assert_eq!(body["status"]["sidecars"], 2);
    ends_awaiting_change(task, "a request after the status write").await;
}

#[tokio::test]
async fn unchanged_sidecar_reports_and_no_report_yet_make_no_requests() {
    let shown = |s: &mut Value| {
        s["endpoints"]["ejected"] = json!(1);
        s["sidecars"] = json!(3);
    };
    // Same figures as the status shows: nothing to write.
    let Fixture { ctx, handle } = converged(shown).await;
    ctx.reports.set(sidecar_figures(3, &["10.0.0.1:8080"]));
    reconcile_without_requests(&ctx).await;
    drop(handle);

    // Just started, no scrape round done: the status keeps its figures instead of flapping to 0.
    let Fixture { ctx, handle } = converged(shown).await;
    assert!(ctx.reports.latest().is_none());
    reconcile_without_requests(&ctx).await;
    drop(handle);
}

#[tokio::test]
async fn deleting_the_last_policy_deletes_the_config_then_releases_the_finalizer() {
    let p = policy(
        json!({"finalizers": ["other.io/keep", "detour.dev/config"], "deletionTimestamp": "2026-01-02T00:00:00Z"}),
        None,
    );
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "detour-config", "namespace": "shop", "resourceVersion": "3", "labels": {"app.kubernetes.io/managed-by": "detour-operator"}}, "data": {"config.yaml": "x"}});
    let Fixture { ctx, mut handle } = fixture(std::slice::from_ref(&p), std::slice::from_ref(&cm));
    let task = tokio::spawn({
        let ctx = ctx.clone();
        async move { run(&ctx).await }
    });
    let body = expect(
        &mut handle,
        Method::DELETE,
        &format!("{CM_PATH}?"),
        Some("application/json"),
        200,
        cm,
    )
    .await;
    assert_eq!(body, json!({}), "plain delete, no options");
    // The sidecars' access goes with the config.
    for path in [BINDING_PATH, ROLE_PATH] {
        expect(
            &mut handle,
            Method::DELETE,
            &format!("{path}?"),
            Some("application/json"),
            200,
            json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}),
        )
        .await;
    }
    let patch = expect(
        &mut handle,
        Method::PATCH,
        &format!("{POLICY_PATH}?"),
        JSON_PATCH,
        200,
        p,
    )
    .await;
    assert_eq!(
        patch,
        json!([
            {"op": "test", "path": "/metadata/finalizers/1", "value": "detour.dev/config"},
            {"op": "remove", "path": "/metadata/finalizers/1"},
        ])
    );
    ends_awaiting_change(task, "the reconcile to end").await;
}

#[tokio::test]
async fn api_errors_back_off_per_object_and_name_the_call() {
    let p = policy(json!({"finalizers": ["detour.dev/config"]}), None);
    let Fixture { ctx, mut handle } = fixture(std::slice::from_ref(&p), &[]);
    let task = tokio::spawn({
        let ctx = ctx.clone();
        async move { run(&ctx).await }
    });
    let status = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "message": "etcd is sad", "reason": "InternalError", "code": 500});
    expect_apply(&mut handle, CM_PATH, 500, status).await;
    // The refused ConfigMap still shows in the status, with the server's message.
    let status_body = expect_apply(&mut handle, STATUS_PATH, 200, p.clone()).await;
    let ready = status_body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .unwrap();
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&json!("False"), &json!("ConfigNotApplied"))
    );
    assert!(
        ready["message"].as_str().unwrap().contains("etcd is sad"),
        "{ready}"
    );
    assert!(status_body["status"].get("configHash").is_none());
    let ev = expect_event(&mut handle).await;
    assert_eq!(
        (&ev["reason"], &ev["type"]),
        (&json!("ConfigNotApplied"), &json!("Warning"))
    );
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(err.metric_label(), "apply");
    assert!(
        err.to_string().contains("configmap shop/detour-config"),
        "{err}"
    );
    let obj = ctx.policies.state()[0].clone();
    let first = reconcile::error_policy(obj.clone(), &err, ctx.clone());
    let second = reconcile::error_policy(obj, &err, ctx.clone());
    assert_eq!(first, Action::requeue(Duration::from_millis(500)));
    assert_eq!(second, Action::requeue(Duration::from_secs(1)));
}
