//! Against a real cluster (kind or k3d, current kubeconfig context). Ignored by default; see
//! docs/operator.md for the one command that runs them. Each test works in its own namespace and
//! deletes it at the end.

use std::time::Duration;

use detour::{
    api::{self, UpstreamPolicy},
    config::Config,
    operator::{Operator, Options},
};
use k8s_openapi::{
    api::core::v1::{ConfigMap, Namespace},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    api::{DeleteParams, Patch, PatchParams, PostParams},
    Api, Client,
};
use serde_json::json;

async fn setup(prefix: &str) -> (Client, String) {
    let client = Client::try_default()
        .await
        .expect("a kubeconfig for a test cluster");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "upstreampolicies.detour.dev",
        &PatchParams::apply("detour-tests").force(),
        &Patch::Apply(api::crd()),
    )
    .await
    .expect("install the CRD");
    // Let the API server establish the new resource.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ns = format!("{prefix}-{:x}", std::process::id());
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
    )
    .await
    .expect("create namespace");
    (client, ns)
}

async fn teardown(client: &Client, ns: &str) {
    let nss: Api<Namespace> = Api::all(client.clone());
    let _ = nss.delete(ns, &DeleteParams::default()).await;
}

fn policy(name: &str, spec: serde_json::Value) -> UpstreamPolicy {
    serde_json::from_value(json!({
        "apiVersion": "detour.dev/v1alpha1", "kind": "UpstreamPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn api_server_refuses_bad_policies_naming_the_field() {
    let (client, ns) = setup("detour-crd").await;
    let policies: Api<UpstreamPolicy> = Api::namespaced(client.clone(), &ns);
    let base = json!({"upstream": {"service": "pay", "port": 80}, "listener": {"port": 18080}});
    let cases = [
        (
            json!({"retries": {"attempts": 11}}),
            "spec.retries.attempts",
        ),
        (
            json!({"retries": {"perTryTimeout": "20s"}, "timeouts": {"request": "5s"}}),
            "retries.perTryTimeout must not exceed timeouts.request",
        ),
        (
            json!({"healthCheck": {"interval": "1s", "timeout": "2s"}}),
            "timeout must not exceed interval",
        ),
        (
            json!({"outlierDetection": {"maxEjectionPercent": 101}}),
            "spec.outlierDetection.maxEjectionPercent",
        ),
    ];
    for (i, (extra, want)) in cases.into_iter().enumerate() {
        let mut spec = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        let err = policies
            .create(&PostParams::default(), &policy(&format!("bad-{i}"), spec))
            .await
            .expect_err("the API server must refuse it");
        let kube::Error::Api(status) = err else {
            panic!("{err}")
        };
        assert_eq!(status.code, 422);
        assert!(
            status.message.contains(want),
            "{want:?} not in {}",
            status.message
        );
    }
    // Defaults come from the schema, so what is stored equals what Rust would fill in.
    let created = policies
        .create(&PostParams::default(), &policy("ok", base))
        .await
        .unwrap();
    assert_eq!(created.spec.policy, detour::config::Policy::default());
    teardown(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn operator_renders_config_and_status_in_a_real_cluster() {
    let (client, ns) = setup("detour-op").await;
    let apply = |v: serde_json::Value| {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            let ar = if v["kind"] == "Service" {
                kube::discovery::ApiResource::erase::<k8s_openapi::api::core::v1::Service>(&())
            } else {
                kube::discovery::ApiResource::erase::<k8s_openapi::api::discovery::v1::EndpointSlice>(
                    &(),
                )
            };
            let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client, &ns, &ar);
            let name = v["metadata"]["name"].as_str().unwrap().to_string();
            api.patch(&name, &PatchParams::apply("detour-tests"), &Patch::Apply(v))
                .await
                .unwrap();
        }
    };
    // A Service without selector, so the test owns its EndpointSlice.
    apply(
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "pay"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
    )
    .await;
    apply(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "pay-1", "labels": {"kubernetes.io/service-name": "pay"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.1.2.3"], "conditions": {"ready": true}}]}),
    )
    .await;
    let policies: Api<UpstreamPolicy> = Api::namespaced(client.clone(), &ns);
    policies
        .create(
            &PostParams::default(),
            &policy("pay", json!({"upstream": {"service": "pay", "port": "http"}, "listener": {"port": 18080}})),
        )
        .await
        .unwrap();
    let op = Operator::start(
        client.clone(),
        Options {
            namespaces: vec![ns.clone()],
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let mut rendered = None;
    for _ in 0..100 {
        if let Ok(cm) = cms.get("detour-config").await {
            rendered = cm.data.and_then(|d| d.get("config.yaml").cloned());
            if rendered.is_some() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cfg = Config::from_str_validated(&rendered.expect("detour-config rendered")).unwrap();
    assert_eq!(cfg.upstreams[0].endpoints[0].address, "10.1.2.3:8080");
    let mut ready = false;
    for _ in 0..100 {
        let p = policies.get("pay").await.unwrap();
        if p.condition("Ready").is_some_and(|c| c.status == "True") {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "policy became Ready");
    policies
        .delete("pay", &DeleteParams::default())
        .await
        .unwrap();
    for _ in 0..100 {
        if cms.get_opt("detour-config").await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cms.get_opt("detour-config").await.unwrap().is_none());
    op.shutdown().await.unwrap();
    teardown(&client, &ns).await;
}

/// The injection path on a real API server: an injected pod (exactly what the webhook's patch
/// makes of it) is accepted as a native sidecar (server-side dry run: nothing is scheduled), and
/// the operator grants the namespace's service accounts read access to `detour-config` only.
#[tokio::test]
#[ignore = "needs cluster"]
async fn injected_pods_and_sidecar_access_are_accepted_by_a_real_cluster() {
    use detour::operator::inject::{pod_patch, Settings};
    use k8s_openapi::api::{
        core::v1::Pod,
        rbac::v1::{Role, RoleBinding},
    };
    let (client, ns) = setup("detour-inject").await;
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": ns, "labels": {"app": "web"}},
        "spec": {"automountServiceAccountToken": false, "containers": [{"name": "web", "image": "nginx:1.27"}]},
    });
    let (patch, skip) = pod_patch(&pod, &Settings::default()).expect("injectable");
    assert!(skip.is_none());
    json_patch::patch(&mut pod, &patch).unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let created = pods
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &serde_json::from_value(pod).unwrap(),
        )
        .await
        .expect("the API server accepts the injected pod");
    let spec = created.spec.unwrap();
    let sidecar = &spec.init_containers.unwrap()[0];
    assert_eq!(sidecar.name, "detour");
    assert_eq!(
        sidecar.restart_policy.as_deref(),
        Some("Always"),
        "a native sidecar (Kubernetes 1.29+)"
    );

    // The operator's Role and RoleBinding for the sidecars, created with the first policy.
    let op = Operator::start(client.clone(), Options::default())
        .await
        .unwrap();
    let policies: Api<UpstreamPolicy> = Api::namespaced(client.clone(), &ns);
    policies
        .create(
            &PostParams::default(),
            &policy(
                "pay",
                json!({"upstream": {"service": "pay", "port": 80}, "listener": {"port": 18080}}),
            ),
        )
        .await
        .unwrap();
    let roles: Api<Role> = Api::namespaced(client.clone(), &ns);
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &ns);
    let mut granted = false;
    for _ in 0..100 {
        if roles.get_opt("detour-sidecar").await.unwrap().is_some()
            && bindings.get_opt("detour-sidecar").await.unwrap().is_some()
        {
            granted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(granted, "the sidecars' Role and RoleBinding exist");
    op.shutdown().await.unwrap();
    teardown(&client, &ns).await;
}
