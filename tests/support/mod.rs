//! Everything the integration tests share, in one place: `mod support;` in a test file.
//!
//! - here: waiting ([`eventually`], [`within`]), the Kubernetes objects the operator reads
//!   ([`service`], [`slice`], [`policy`]), the operator's test options and its rendered config;
//! - [`sidecar`]: a sidecar in front of simulated pods, a small HTTP/1.1 client, metric deltas;
//! - [`apiserver`] (with [`admission`]): the in-memory API server; [`upstream`]: an upstream that
//!   counts request ids; [`http_client`]: a plain GET; [`webhooks`]: the chart's injector;
//!   [`yaml`]: YAML as Kubernetes reads it; [`bench`]: what the benchmark tests share.
//!
//! Some files are included by path instead, alone (`#[path = "support/validate.rs"]`): the
//! Prometheus and PromQL helpers (`prometheus.rs`, `promql.rs`), which only a few tests need,
//! and `validate.rs`, `yaml.rs`, `webhooks.rs` for the chart and injection tests that need
//! nothing else from here.
#![allow(dead_code)]

pub mod admission;
pub mod apiserver;
pub mod bench;
pub mod http_client;
pub mod sidecar;
pub mod upstream;
pub mod validate;
pub mod webhooks;
pub mod yaml;

use std::{future::Future, time::Duration};

use detour::{
    config::Config,
    operator::{LeaseOptions, Options},
};
use serde_json::{json, Value};

pub use apiserver::ApiServer;
// Not every test crate calls both.
#[allow(unused_imports)]
pub use http_client::{http_get, try_http_get};

/// Resources of the in-memory API server.
pub const POLICIES: &str = "detour.dev/v1alpha1/upstreampolicies";
pub const CONFIG_MAPS: &str = "v1/configmaps";
pub const SERVICES: &str = "v1/services";
pub const SLICES: &str = "discovery.k8s.io/v1/endpointslices";
pub const LEASES: &str = "coordination.k8s.io/v1/leases";

/// The leader-election Lease of the operator (the chart's name for it).
pub const LEASE_NAME: &str = "detour-operator";

/// Wall-clock bound for anything that should happen "soon" on a slow shared machine.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Polls `f` every 10 ms until it returns `Some`, or panics after `timeout` with `what`. On
/// tokio's clock, so a test with a paused clock does not wait for real.
pub async fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `fut`, failing the test if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("no {what} within {limit:?}"))
}

/// Operator options for tests: a 20 ms debounce, so that a change renders at once.
pub fn operator_options() -> Options {
    Options {
        debounce: Duration::from_millis(20),
        ..Options::default()
    }
}

/// Leader election for a test replica `identity` in `namespace`: short enough that a failover
/// takes seconds (valid 3 s, renewed 1 s before it ends).
pub fn lease(namespace: &str, identity: &str) -> LeaseOptions {
    LeaseOptions {
        namespace: namespace.into(),
        name: LEASE_NAME.into(),
        identity: identity.into(),
        duration: 3,
        grace: 1,
    }
}

/// The operator's Lease in `namespace`, once a replica holds it.
pub fn lease_object(server: &ApiServer, namespace: &str) -> Option<Value> {
    server.get(LEASES, namespace, LEASE_NAME)
}

/// The sidecar config a `detour-config` ConfigMap object carries; panics when it is invalid
/// (the operator must never write an invalid one).
pub fn config_in(config_map: &Value) -> Option<Config> {
    let text = config_map["data"]["config.yaml"].as_str()?;
    Some(Config::from_str_validated(text).expect("the rendered config is valid"))
}

/// The config the operator rendered for namespace `ns`, with its ConfigMap, once written.
pub fn rendered_config(server: &ApiServer, ns: &str) -> Option<(Config, Value)> {
    let cm = server.get(CONFIG_MAPS, ns, "detour-config")?;
    Some((config_in(&cm)?, cm))
}

/// A Service with named TCP ports `(name, port)`.
pub fn service(ns: &str, name: &str, ports: &[(&str, i32)]) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "selector": {"app": name},
            "ports": ports.iter().map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP", "targetPort": p + 8000})).collect::<Vec<_>>(),
        },
    })
}

/// An IPv4 EndpointSlice of `svc` for port name `port_name` → `port`, endpoints
/// `(ip, ready, serving, terminating)`.
pub fn slice(
    ns: &str,
    name: &str,
    svc: &str,
    port_name: &str,
    port: i32,
    endpoints: &[(impl AsRef<str>, bool, bool, bool)],
) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": endpoints.iter().enumerate().map(|(i, (ip, r, s, t))| json!({
            "addresses": [ip.as_ref()],
            "conditions": {"ready": r, "serving": s, "terminating": t},
            "targetRef": {"kind": "Pod", "name": format!("{svc}-{i}"), "namespace": ns},
        })).collect::<Vec<_>>(),
    })
}

/// An UpstreamPolicy for `svc`/`port` on local `listener`.
pub fn policy(ns: &str, name: &str, svc: &str, port: Value, listener: u16) -> Value {
    json!({
        "apiVersion": "detour.dev/v1alpha1", "kind": "UpstreamPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "workloadSelector": {"matchLabels": {"app": "web"}},
            "upstream": {"service": svc, "port": port},
            "listener": {"port": listener},
            "retries": {"attempts": 3},
        },
    })
}

/// A port on 127.0.0.1 that was free a moment ago (for listeners the code under test binds by
/// number, like a policy's listener port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The condition of `type_` on a policy object, as (status, reason).
pub fn condition(policy: &Value, type_: &str) -> Option<(String, String)> {
    policy["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
}
