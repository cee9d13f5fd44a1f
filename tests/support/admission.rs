//! What a real API server does with mutating webhooks when a pod is created: for each webhook of
//! every stored MutatingWebhookConfiguration whose rules, namespace selector and object selector
//! match, it POSTs an `AdmissionReview` v1 over HTTPS to the webhook Service, trusting only the
//! configuration's `caBundle` (server name `<service>.<namespace>.svc`), and applies the JSON
//! Patch it answers. A call that fails obeys `failurePolicy` (`Fail` refuses the pod, `Ignore`
//! creates it unchanged); `allowed: false` refuses it.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use serde_json::{json, Value};

/// One webhook as the server calls it.
pub(super) struct Target {
    pub name: String,
    pub service: (String, String),
    pub path: String,
    pub ca_bundle: Vec<u8>,
    pub fail_closed: bool,
    pub timeout: Duration,
}

/// The webhooks that apply to creating `pod` in a namespace with `ns_labels`.
pub(super) fn targets(configs: &[Value], ns_labels: &Value, pod: &Value) -> Vec<Target> {
    let mut out = Vec::new();
    for cfg in configs {
        for w in cfg["webhooks"].as_array().into_iter().flatten() {
            let rules_match = w["rules"].as_array().into_iter().flatten().any(|r| {
                let has = |k: &str, want: &str| {
                    r[k].as_array()
                        .into_iter()
                        .flatten()
                        .any(|v| v == want || v == "*")
                };
                has("operations", "CREATE") && has("resources", "pods") && has("apiGroups", "")
            });
            if !rules_match
                || !selects(&w["namespaceSelector"], ns_labels)
                || !selects(&w["objectSelector"], &pod["metadata"]["labels"])
            {
                continue;
            }
            let svc = &w["clientConfig"]["service"];
            let ca: k8s_openapi::ByteString =
                serde_json::from_value(w["clientConfig"]["caBundle"].clone()).unwrap_or_default();
            out.push(Target {
                name: w["name"].as_str().unwrap_or_default().to_string(),
                service: (
                    svc["namespace"].as_str().unwrap_or_default().to_string(),
                    svc["name"].as_str().unwrap_or_default().to_string(),
                ),
                path: svc["path"].as_str().unwrap_or("/").to_string(),
                ca_bundle: ca.0,
                fail_closed: w["failurePolicy"].as_str().unwrap_or("Fail") == "Fail",
                timeout: Duration::from_secs(w["timeoutSeconds"].as_u64().unwrap_or(10)),
            });
        }
    }
    out
}

fn selects(selector: &Value, labels: &Value) -> bool {
    if selector.is_null() {
        return true;
    }
    let sel: LabelSelector = serde_json::from_value(selector.clone()).expect("a label selector");
    let labels: BTreeMap<String, String> =
        serde_json::from_value(labels.clone()).unwrap_or_default();
    detour::sidecar::selector_matches(&sel, &labels)
}

/// Calls one webhook at `addr` for `pod`; returns the patched pod, or why the call failed.
pub(super) async fn call(
    t: &Target,
    addr: SocketAddr,
    namespace: &str,
    pod: &Value,
) -> Result<Value, Refusal> {
    let uid = format!("review-{}", rand_id());
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
    });
    let answer = tokio::time::timeout(t.timeout, post(t, addr, &review))
        .await
        .map_err(|_| Refusal::Call(format!("timed out after {:?}", t.timeout)))?
        .map_err(Refusal::Call)?;
    let resp = &answer["response"];
    if resp["uid"] != uid.as_str() {
        return Err(Refusal::Call(format!(
            "response uid {} for {uid}",
            resp["uid"]
        )));
    }
    if resp["allowed"] != true {
        return Err(Refusal::Denied(
            resp["status"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ));
    }
    let mut pod = pod.clone();
    if !resp["patch"].is_null() {
        let bytes: Vec<u8> = match &resp["patch"] {
            Value::String(_) => {
                serde_json::from_value::<k8s_openapi::ByteString>(resp["patch"].clone())
                    .map_err(|e| Refusal::Call(format!("patch: {e}")))?
                    .0
            }
            other => serde_json::from_value(other.clone())
                .map_err(|e| Refusal::Call(format!("patch: {e}")))?,
        };
        let patch: json_patch::Patch = serde_json::from_slice(&bytes)
            .map_err(|e| Refusal::Call(format!("patch is not a JSON Patch: {e}")))?;
        json_patch::patch(&mut pod, &patch)
            .map_err(|e| Refusal::Call(format!("patch does not apply: {e}")))?;
    }
    Ok(pod)
}

/// Why a webhook did not let a pod through.
#[derive(Debug)]
pub(super) enum Refusal {
    /// The call failed (connection, TLS, timeout, bad answer): `failurePolicy` decides.
    Call(String),
    /// The webhook said no.
    Denied(String),
}

async fn post(t: &Target, addr: SocketAddr, review: &Value) -> Result<Value, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&t.ca_bundle) {
        roots
            .add(c.map_err(|e| format!("caBundle: {e}"))?)
            .map_err(|e| format!("caBundle: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no caBundle: the server cannot trust the webhook".into());
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let host = format!("{}.{}.svc", t.service.1, t.service.0);
    let name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("dial {addr}: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::post(t.path.as_str())
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(review).unwrap())))
        .unwrap();
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status != 200 {
        return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)));
    }
    serde_json::from_slice(&body).map_err(|e| format!("answer: {e}"))
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}
