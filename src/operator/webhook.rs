//! The mutating admission webhook: `POST /inject` with an `AdmissionReview` v1 of a Pod CREATE
//! answers with the JSON Patch that adds the detour sidecar (`inject`). Every replica serves it
//! over HTTPS with the certificate [`CertStore`] holds, leader or not, so a leader failover never
//! takes the webhook away.
//!
//! Safe for the cluster: a pod the injector cannot handle is allowed unchanged, with a warning in
//! the response, an Event and `detour_operator_injections_total{result="error"}`; a malformed
//! review gets `400` and a message, never a panic. The MutatingWebhookConfiguration's namespace
//! and object selectors decide which pods reach the webhook; the webhook itself still leaves
//! alone the operator's own namespace and `kube-system`.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    core::{
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
        DynamicObject,
    },
    runtime::events::{Event, EventType, Recorder},
};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::{certs::CertStore, metrics::Metrics};

/// Path the webhook answers on.
pub const PATH: &str = "/inject";
/// Largest review accepted (a Pod is far smaller).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// The injection step: a Pod (JSON) → its JSON Patch, or why it was left alone (`Ok` with an
/// empty patch and a reason), or why it cannot be handled (`Err`).
pub type Injector =
    Arc<dyn Fn(&Value) -> Result<(json_patch::Patch, Option<String>), String> + Send + Sync>;

/// What the webhook needs besides its certificate.
pub struct WebhookContext {
    pub inject: Injector,
    /// Namespaces never injected (the operator's own, `kube-system`).
    pub excluded_namespaces: Vec<String>,
    pub metrics: Arc<Metrics>,
    /// Events for pods left unchanged because of an error.
    pub recorder: Option<Recorder>,
}

/// The result of one review.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Skipped(String),
    /// Allowed unchanged: the injector could not handle the pod.
    Failed(String),
    /// The review itself was malformed.
    Invalid(String),
}

impl Outcome {
    /// Every value of [`Outcome::label`], in variant order.
    pub const LABELS: [&'static str; 4] = ["injected", "skipped", "error", "invalid"];

    /// `result` label of `detour_operator_injections_total`.
    pub fn label(&self) -> &'static str {
        Self::LABELS[match self {
            Outcome::Injected => 0,
            Outcome::Skipped(_) => 1,
            Outcome::Failed(_) => 2,
            Outcome::Invalid(_) => 3,
        }]
    }
}

/// One review, without I/O: the HTTP status, the response body and what happened. The request
/// comes back too, for the Event of a failed injection.
pub fn review(
    body: &[u8],
    ctx: &WebhookContext,
) -> (
    StatusCode,
    Value,
    Outcome,
    Option<AdmissionRequest<DynamicObject>>,
) {
    let parsed: Result<AdmissionReview<DynamicObject>, _> = serde_json::from_slice(body);
    let req: AdmissionRequest<DynamicObject> = match parsed
        .map_err(|e| format!("not an AdmissionReview: {e}"))
        .and_then(|r| {
            r.try_into()
                .map_err(|_| "an AdmissionReview without a request".to_string())
        }) {
        Ok(r) => r,
        Err(why) => {
            let resp = AdmissionResponse::invalid(&why).into_review();
            return (
                StatusCode::BAD_REQUEST,
                serde_json::to_value(resp).expect("review serializes"),
                Outcome::Invalid(why),
                None,
            );
        }
    };
    let ns = req.namespace.clone().unwrap_or_default();
    let mut resp = AdmissionResponse::from(&req);
    let outcome = if req.kind.kind != "Pod" || !req.kind.group.is_empty() {
        Outcome::Skipped(format!("not a Pod but {}", req.kind.kind))
    } else if req.operation != Operation::Create {
        Outcome::Skipped(format!("{:?}, not CREATE", req.operation))
    } else if ctx.excluded_namespaces.contains(&ns) {
        Outcome::Skipped(format!("namespace {ns} is never injected"))
    } else {
        match &req.object {
            None => Outcome::Failed("the review carries no object".into()),
            Some(obj) => {
                let pod = serde_json::to_value(obj).expect("object serializes");
                match (ctx.inject)(&pod) {
                    Ok((_, Some(skip))) => Outcome::Skipped(skip),
                    Ok((patch, None)) => match resp.clone().with_patch(patch) {
                        Ok(r) => {
                            resp = r;
                            Outcome::Injected
                        }
                        Err(e) => Outcome::Failed(e.to_string()),
                    },
                    Err(e) => Outcome::Failed(e),
                }
            }
        }
    };
    if let Outcome::Failed(why) = &outcome {
        resp.warnings = Some(vec![format!("detour: the sidecar was not injected: {why}")]);
    }
    let body = serde_json::to_value(resp.into_review()).expect("review serializes");
    (StatusCode::OK, body, outcome, Some(req))
}

/// Serves the webhook on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, certs: Arc<CertStore>, ctx: Arc<WebhookContext>) {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default TLS versions")
    .with_no_client_auth()
    .with_cert_resolver(certs);
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning.
                debug!(error = %e, "webhook accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, ctx) = (acceptor.clone(), ctx.clone());
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "webhook TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let svc = service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(handle(req, &ctx).await) }
            });
            // A connection that sends nothing is closed (no idle client holds a socket forever).
            let _ = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>, ctx: &WebhookContext) -> Response<Full<Bytes>> {
    if req.uri().path() != PATH {
        return text(
            StatusCode::NOT_FOUND,
            format!("not found; the webhook is POST {PATH}\n"),
        );
    }
    if req.method() != Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST an AdmissionReview\n".into(),
        );
    }
    let read = Limited::new(req.into_body(), MAX_BODY).collect();
    let body = match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("reading the review: {e}\n"),
            )
        }
        Err(_) => {
            return text(
                StatusCode::REQUEST_TIMEOUT,
                "the review took too long to send\n".into(),
            )
        }
    };
    let (status, body, outcome, request) = review(&body, ctx);
    ctx.metrics.injection(outcome.label());
    match &outcome {
        Outcome::Injected => debug!(pod = %pod_name(request.as_ref()), "injected"),
        Outcome::Skipped(why) => debug!(pod = %pod_name(request.as_ref()), %why, "not injected"),
        Outcome::Invalid(why) => warn!(%why, "malformed admission review"),
        Outcome::Failed(why) => {
            warn!(pod = %pod_name(request.as_ref()), %why, "sidecar not injected; the pod is allowed unchanged");
            // Not awaited: a slow Event write must not make the API server's call time out.
            if let (Some(rec), Some(req)) = (&ctx.recorder, request.clone()) {
                if !req.dry_run {
                    let (rec, why) = (rec.clone(), why.clone());
                    tokio::spawn(async move { publish_failure(&rec, &req, &why).await });
                }
            }
        }
    }
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(&body).expect("json"),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn pod_name(req: Option<&AdmissionRequest<DynamicObject>>) -> String {
    let Some(req) = req else { return "?".into() };
    let ns = req.namespace.as_deref().unwrap_or_default();
    let name = req
        .object
        .as_ref()
        .and_then(|o| o.metadata.name.clone().or(o.metadata.generate_name.clone()))
        .unwrap_or_default();
    format!("{ns}/{name}")
}

/// An Event on what the pod belongs to (its owner, or its namespace): the pod does not exist yet.
async fn publish_failure(rec: &Recorder, req: &AdmissionRequest<DynamicObject>, why: &str) {
    let ns = req.namespace.clone().unwrap_or_default();
    let owner = req
        .object
        .as_ref()
        .and_then(|o| o.metadata.owner_references.as_ref()?.first().cloned());
    let reference = match owner {
        Some(o) => ObjectReference {
            api_version: Some(o.api_version),
            kind: Some(o.kind),
            name: Some(o.name),
            uid: Some(o.uid),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        None => ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Namespace".into()),
            name: Some(ns.clone()),
            // The Event goes to the pod's namespace, where `kubectl get events` shows it.
            namespace: Some(ns.clone()),
            ..Default::default()
        },
    };
    let ev = Event {
        type_: EventType::Warning,
        reason: "InjectionFailed".into(),
        note: Some(format!(
            "pod {} was created without the detour sidecar: {why}",
            pod_name(Some(req))
        )),
        action: "Inject".into(),
        secondary: None,
    };
    if let Err(e) = rec.publish(&ev, &reference).await {
        debug!(error = %e, "publishing the injection event failed");
    } else {
        info!(namespace = %ns, "published InjectionFailed");
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ctx(inject: Injector) -> WebhookContext {
        WebhookContext {
            inject,
            excluded_namespaces: vec!["detour-system".into(), "kube-system".into()],
            metrics: Arc::new(Metrics::new()),
            recorder: None,
        }
    }

    fn adds_label() -> Injector {
        Arc::new(|pod: &Value| {
            if pod["metadata"]["labels"]["detour.dev/inject"] == "false" {
                return Ok((json_patch::Patch(vec![]), Some("opted out".into())));
            }
            if pod["spec"]["containers"][0]["image"] == "broken" {
                return Err("spec.containers[0]: cannot handle".into());
            }
            let p: json_patch::Patch = serde_json::from_value(json!([
                {"op": "add", "path": "/metadata/labels/detour.dev~1sidecar", "value": "true"}
            ]))
            .unwrap();
            Ok((p, None))
        })
    }

    fn review_of(ns: &str, kind: &str, operation: &str, pod: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": kind},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": kind},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": ns,
                "operation": operation,
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": pod,
                "oldObject": null,
                "dryRun": false,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            }
        }))
        .unwrap()
    }

    fn pod(labels: Value, image: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-", "namespace": "shop", "labels": labels},
            "spec": {"containers": [{"name": "web", "image": image}]},
        })
    }

    #[test]
    fn a_pod_gets_the_patch_with_the_request_uid() {
        let c = ctx(adds_label());
        let (code, body, outcome, _) = review(
            &review_of("shop", "Pod", "CREATE", pod(json!({"app": "web"}), "web:1")),
            &c,
        );
        assert_eq!((code, outcome), (StatusCode::OK, Outcome::Injected));
        let r = &body["response"];
        assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(r["allowed"], true);
        assert_eq!(r["patchType"], "JSONPatch");
        let patch: Value = serde_json::from_slice(&patch_bytes(&r["patch"])).unwrap();
        assert_eq!(patch[0]["path"], "/metadata/labels/detour.dev~1sidecar");
        assert_eq!(body["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(body["kind"], "AdmissionReview");
    }

    /// The patch as the API server reads a `[]byte` field: base64 text or an array of bytes.
    fn patch_bytes(v: &Value) -> Vec<u8> {
        match v {
            Value::String(_) => {
                serde_json::from_value::<k8s_openapi::ByteString>(v.clone())
                    .unwrap()
                    .0
            }
            _ => serde_json::from_value(v.clone()).unwrap(),
        }
    }

    #[test]
    fn opted_out_excluded_and_other_requests_pass_unchanged() {
        let c = ctx(adds_label());
        for (ns, kind, op, labels, want) in [
            (
                "shop",
                "Pod",
                "CREATE",
                json!({"detour.dev/inject": "false"}),
                "skipped",
            ),
            ("kube-system", "Pod", "CREATE", json!({}), "skipped"),
            ("detour-system", "Pod", "CREATE", json!({}), "skipped"),
            ("shop", "Pod", "UPDATE", json!({}), "skipped"),
        ] {
            let (code, body, outcome, _) =
                review(&review_of(ns, kind, op, pod(labels, "web:1")), &c);
            assert_eq!(code, StatusCode::OK);
            assert_eq!(outcome.label(), want, "{ns} {op}: {outcome:?}");
            assert_eq!(body["response"]["allowed"], true);
            assert!(body["response"].get("patch").is_none());
        }
    }

    #[test]
    fn a_pod_the_injector_cannot_handle_is_allowed_with_a_warning() {
        let c = ctx(adds_label());
        let (code, body, outcome, req) = review(
            &review_of("shop", "Pod", "CREATE", pod(json!({}), "broken")),
            &c,
        );
        assert_eq!(code, StatusCode::OK);
        assert!(matches!(outcome, Outcome::Failed(ref w) if w.contains("spec.containers[0]")));
        assert_eq!(body["response"]["allowed"], true);
        assert!(body["response"].get("patch").is_none());
        let warning = body["response"]["warnings"][0].as_str().unwrap();
        assert!(
            warning.contains("not injected") && warning.contains("spec.containers[0]"),
            "{warning}"
        );
        assert!(req.is_some(), "kept for the Event");
    }

    #[test]
    fn malformed_reviews_get_400_and_a_message() {
        let c = ctx(adds_label());
        for body in [
            b"not json".to_vec(),
            b"{}".to_vec(),
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":7}}"#
                .to_vec(),
        ] {
            let (code, resp, outcome, _) = review(&body, &c);
            assert_eq!(code, StatusCode::BAD_REQUEST, "{resp}");
            assert_eq!(outcome.label(), "invalid");
            assert_eq!(resp["response"]["allowed"], false);
            assert!(!resp["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .is_empty());
        }
    }
}
