//! Shared test support: the in-memory API server and object builders.
#![allow(dead_code)]

pub mod admission;
pub mod apiserver;
pub mod upstream;
pub mod validate;
pub mod webhooks;

use std::time::Duration;

use serde_json::{json, Value};

pub use apiserver::ApiServer;

pub const POLICIES: &str = "detour.dev/v1alpha1/upstreampolicies";
pub const CONFIG_MAPS: &str = "v1/configmaps";
pub const SERVICES: &str = "v1/services";
pub const SLICES: &str = "discovery.k8s.io/v1/endpointslices";

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
    endpoints: &[(&str, bool, bool, bool)],
) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": endpoints.iter().enumerate().map(|(i, (ip, r, s, t))| json!({
            "addresses": [ip],
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

/// Polls `f` every 20 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// GET over HTTP/1.1 on 127.0.0.1: (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text[9..12].parse().expect("status code");
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (code, body)
}
