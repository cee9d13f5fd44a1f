//! A faithful-enough in-memory Kubernetes API server for tests and the scale benchmark.
//!
//! It speaks the HTTP API that kube's client and runtime use: list and watch with
//! resourceVersion (history replay, `410 Gone` past the kept history, bookmarks), get, create,
//! update, delete (finalizers hold an object with `deletionTimestamp` until they are removed),
//! server-side apply treated as create-or-merge, JSON merge / strategic merge (as merge) / JSON
//! patch, the `/status` subresource, resourceVersion preconditions, uid, generation (bumped when
//! anything but metadata and status changes), label selectors and `metadata.name` /
//! `metadata.namespace` field selectors (lists and watches). No-op writes change nothing and
//! emit no event, as on a real server. Every request is logged so tests can count writes.
//!
//! A client for a pod's service account (`service_account_client`) is authorised as RBAC does
//! it, from the Roles and RoleBindings stored in its namespace (`resourceNames` included: a
//! list or watch passes only with a matching `metadata.name` field selector). `set_down` makes
//! the server unreachable (connections refused, open watches cut) until it is set up again.
//!
//! Use it in-process (`client()`, a `tower::Service` behind `kube::Client`) or over HTTP on
//! 127.0.0.1 (`serve_http`) for a separate operator process.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use futures::{channel::mpsc, StreamExt};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use parking_lot::Mutex;
use serde_json::{json, Map, Value};

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Events kept for watch replay; older resourceVersions get `410 Gone`.
const HISTORY: usize = 200_000;

/// One logged request.
#[derive(Clone, Debug)]
pub struct Record {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    pub body: Value,
    /// Whether it changed anything.
    pub changed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    /// `v1/configmaps`, `detour.dev/v1alpha1/upstreampolicies`
    resource: String,
    namespace: String,
    name: String,
}

struct WatchEvent {
    rv: u64,
    resource: String,
    namespace: String,
    type_: &'static str,
    object: Value,
}

struct Watcher {
    resource: String,
    namespace: Option<String>,
    selector: Selector,
    fields: String,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    rv: u64,
    uid: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<WatchEvent>,
    watchers: Vec<Watcher>,
    log: Vec<Record>,
    log_requests: bool,
    /// Server-side apply field ownership: leaf path (`.spec.holderIdentity`) → manager.
    owners: BTreeMap<Key, BTreeMap<String, String>>,
    /// `fieldManager` of the request being served.
    manager: String,
    /// Requests refused on purpose: (method, path suffix) → (code, message).
    faults: Vec<(Method, String, u16, String)>,
    /// Unreachable: every request fails as a refused connection would.
    down: bool,
    /// Requests refused while `down`: a client that kept trying shows here.
    refused: u64,
    /// Addresses behind a Service, for calling webhooks: (namespace, name) → ready endpoints.
    service_endpoints: BTreeMap<(String, String), Vec<SocketAddr>>,
}

/// The server. Cheap to clone; all clones share state.
#[derive(Clone)]
pub struct ApiServer {
    state: Arc<Mutex<State>>,
}

// === impl ApiServer ===

impl Default for ApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiServer {
    /// Must be called inside a tokio runtime (a task sends periodic bookmarks).
    pub fn new() -> Self {
        let state = Arc::new(Mutex::new(State {
            rv: 1000,
            log_requests: true,
            ..Default::default()
        }));
        let weak = Arc::downgrade(&state);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(state) = weak.upgrade() else { return };
                let mut st = state.lock();
                let rv = st.rv;
                st.watchers.retain(|w| {
                    !w.bookmarks || w.tx.unbounded_send(bookmark(&w.resource, rv)).is_ok()
                });
            }
        });
        ApiServer { state }
    }

    /// A kube client talking to this server in-process, with every permission (the operator's).
    pub fn client(&self) -> kube::Client {
        self.client_for(None)
    }

    /// A kube client acting as the service account `name` of `namespace` (a pod's identity):
    /// each request is authorised by the Roles bound to it in `namespace`, as RBAC would.
    pub fn service_account_client(&self, namespace: &str, name: &str) -> kube::Client {
        self.client_for(Some(ServiceAccount {
            namespace: namespace.into(),
            name: name.into(),
        }))
    }

    fn client_for(&self, who: Option<ServiceAccount>) -> kube::Client {
        let me = self.clone();
        let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
            let me = me.clone();
            let who = who.clone();
            async move {
                if me.state.lock().refuse_when_down() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        "fake API server is down",
                    ));
                }
                let (parts, body) = req.into_parts();
                let mut bytes = body
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                if let Some(sa) = &who {
                    if let Err(why) = me.authorize(sa, &parts.method, &parts.uri) {
                        return Ok(status_response(403, "Forbidden", &why));
                    }
                }
                if parts.method == Method::POST {
                    if let Some(ns) = pod_create_namespace(parts.uri.path()) {
                        match me.admit(&ns, &bytes).await {
                            Ok(b) => bytes = b,
                            Err((code, msg)) => {
                                return Ok(status_response(code, "InternalError", &msg))
                            }
                        }
                    }
                }
                Ok(me.handle(
                    &parts.method,
                    &parts.uri,
                    content_type(&parts.headers),
                    &bytes,
                ))
            }
        });
        kube::Client::new(svc, "default")
    }

    /// The ready endpoints of Service `namespace/name`, as kube-proxy routes to them (used to
    /// call admission webhooks).
    pub fn set_service_endpoints(&self, namespace: &str, name: &str, addrs: Vec<SocketAddr>) {
        self.state
            .lock()
            .service_endpoints
            .insert((namespace.into(), name.into()), addrs);
    }

    /// Runs the mutating webhooks on a pod being created in `ns` (see `admission`): the pod as
    /// they leave it, or the refusal the client gets.
    async fn admit(&self, ns: &str, body: &[u8]) -> Result<Bytes, (u16, String)> {
        let mut pod = json_or_yaml(body).map_err(|e| (400, format!("body: {e}")))?;
        let (configs, ns_labels, endpoints) = {
            let st = self.state.lock();
            let configs: Vec<Value> = st
                .objects
                .iter()
                .filter(|(k, _)| {
                    k.resource == "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
                })
                .map(|(_, v)| v.clone())
                .collect();
            let ns_labels = st
                .objects
                .get(&Key {
                    resource: "v1/namespaces".into(),
                    namespace: String::new(),
                    name: ns.into(),
                })
                .map(|n| n["metadata"]["labels"].clone())
                .unwrap_or(Value::Null);
            (configs, ns_labels, st.service_endpoints.clone())
        };
        for t in super::admission::targets(&configs, &ns_labels, &pod) {
            let addrs = endpoints.get(&t.service).cloned().unwrap_or_default();
            let mut last = format!("no endpoints available for service {:?}", t.service);
            let mut admitted = None;
            // Like kube-proxy: one endpoint per call; a refused one is not retried by the
            // server, so pick the first that is up (tests remove stopped replicas).
            for addr in addrs {
                match super::admission::call(&t, addr, ns, &pod).await {
                    Ok(p) => {
                        admitted = Some(p);
                        break;
                    }
                    Err(super::admission::Refusal::Denied(m)) => {
                        return Err((
                            400,
                            format!("admission webhook \"{}\" denied the request: {m}", t.name),
                        ))
                    }
                    Err(super::admission::Refusal::Call(e)) => last = e,
                }
            }
            match admitted {
                Some(p) => pod = p,
                None if t.fail_closed => {
                    return Err((
                        500,
                        format!(
                            "Internal error occurred: failed calling webhook \"{}\": {last}",
                            t.name
                        ),
                    ))
                }
                None => {}
            }
        }
        Ok(Bytes::from(serde_json::to_vec(&pod).unwrap()))
    }

    /// Makes the server unreachable (`true`: requests fail as refused connections, open
    /// watches end) or reachable again.
    pub fn set_down(&self, down: bool) {
        let mut st = self.state.lock();
        st.down = down;
        if down {
            st.watchers.clear();
        }
    }

    /// How many requests were refused while the server was down.
    pub fn refused(&self) -> u64 {
        self.state.lock().refused
    }

    /// Forgets the watch history, as etcd compaction does: a watch from an older
    /// resourceVersion then gets `410 Gone` and must list again.
    pub fn compact(&self) {
        let mut st = self.state.lock();
        st.history.clear();
        let rv = st.next_rv();
        let _ = rv;
    }

    /// RBAC for a service account: allowed when a Role bound (by a RoleBinding of the request's
    /// namespace) to the account or one of its groups has a matching rule.
    fn authorize(
        &self,
        sa: &ServiceAccount,
        method: &Method,
        uri: &http::Uri,
    ) -> Result<(), String> {
        let user = format!("system:serviceaccount:{}:{}", sa.namespace, sa.name);
        let deny = |why: &str| Err(format!("{user} cannot {why}"));
        let Some(r) = parse_path(uri.path()) else {
            return deny(&format!("request {}", uri.path()));
        };
        let query = parse_query(uri.query().unwrap_or_default());
        let verb = match (method.as_str(), &r.name) {
            ("GET", None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => "watch",
            ("GET", None) => "list",
            ("GET", Some(_)) => "get",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", _) => "delete",
            _ => return deny("use this method"),
        };
        let (gv, plural) = r.resource.rsplit_once('/').expect("gv/plural");
        let group = gv.split_once('/').map_or("", |(g, _)| g);
        let Some(ns) = &r.namespace else {
            return deny(&format!("{verb} {plural} at cluster scope"));
        };
        // The one object the request is about, when it names one (a name in the path, or a
        // metadata.name field selector on a list or watch).
        let name = r.name.clone().or_else(|| {
            query.get("fieldSelector").and_then(|f| {
                f.split(',')
                    .find_map(|p| p.strip_prefix("metadata.name="))
                    .map(|n| n.trim_start_matches('=').to_string())
            })
        });
        let groups = [
            "system:serviceaccounts".to_string(),
            format!("system:serviceaccounts:{}", sa.namespace),
            "system:authenticated".to_string(),
        ];
        let st = self.state.lock();
        let bound_roles: Vec<String> =
            st.objects
                .iter()
                .filter(|(k, _)| {
                    k.resource == "rbac.authorization.k8s.io/v1/rolebindings" && k.namespace == *ns
                })
                .filter(|(_, b)| {
                    b["subjects"].as_array().into_iter().flatten().any(|s| {
                        match s["kind"].as_str() {
                            Some("ServiceAccount") => {
                                s["name"] == sa.name.as_str()
                                    && s["namespace"].as_str().unwrap_or(ns) == sa.namespace
                            }
                            Some("User") => s["name"] == user.as_str(),
                            Some("Group") => groups.iter().any(|g| s["name"] == g.as_str()),
                            _ => false,
                        }
                    })
                })
                .filter(|(_, b)| b["roleRef"]["kind"] == "Role")
                .filter_map(|(_, b)| b["roleRef"]["name"].as_str().map(String::from))
                .collect();
        let has = |list: &Value, want: &str| {
            list.as_array()
                .into_iter()
                .flatten()
                .any(|v| v == "*" || v == want)
        };
        let allowed = bound_roles.iter().any(|role| {
            let key = Key {
                resource: "rbac.authorization.k8s.io/v1/roles".into(),
                namespace: ns.clone(),
                name: role.clone(),
            };
            st.objects.get(&key).is_some_and(|role| {
                role["rules"].as_array().into_iter().flatten().any(|rule| {
                    has(&rule["apiGroups"], group)
                        && has(&rule["resources"], plural)
                        && has(&rule["verbs"], verb)
                        && match rule["resourceNames"].as_array() {
                            Some(names) if !names.is_empty() => name
                                .as_ref()
                                .is_some_and(|n| names.iter().any(|x| x == n.as_str())),
                            _ => true,
                        }
                })
            })
        });
        if allowed {
            Ok(())
        } else {
            deny(&format!(
                "{verb} {plural} in namespace {ns}{}",
                name.map(|n| format!(" (name {n})")).unwrap_or_default()
            ))
        }
    }

    /// Serves the API over plain HTTP on `addr` (use 127.0.0.1:0) until the runtime stops.
    pub async fn serve_http(&self, addr: SocketAddr) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let local = listener.local_addr().expect("local addr");
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let me = me.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let me = me.clone();
                            async move {
                                if me.state.lock().refuse_when_down() {
                                    return Err(std::io::Error::other("fake API server is down"));
                                }
                                let (parts, body) = req.into_parts();
                                let bytes = body
                                    .collect()
                                    .await
                                    .map(|c| c.to_bytes())
                                    .unwrap_or_default();
                                Ok::<_, std::io::Error>(me.handle(
                                    &parts.method,
                                    &parts.uri,
                                    content_type(&parts.headers),
                                    &bytes,
                                ))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        local
    }

    // --- direct access for tests (no request log) ---

    /// Creates or replaces an object as a user would (`kubectl apply`), returning it.
    pub fn put(&self, obj: Value) -> Value {
        let (resource, namespace, name) = key_of(&obj);
        let key = Key {
            resource,
            namespace,
            name,
        };
        let mut st = self.state.lock();
        st.manager = "kubectl".into();
        let current = st.objects.get(&key).cloned();
        match current {
            None => st.create(&key, obj).expect("create"),
            Some(cur) => {
                let mut next = obj;
                // Keep server-owned metadata and the status (it has its own subresource).
                for f in [
                    "uid",
                    "creationTimestamp",
                    "finalizers",
                    "deletionTimestamp",
                ] {
                    if let Some(v) = cur["metadata"].get(f) {
                        next["metadata"][f] = v.clone();
                    }
                }
                if has_status_subresource(&key.resource) {
                    match cur.get("status") {
                        Some(s) => next["status"] = s.clone(),
                        None => {
                            next.as_object_mut().unwrap().remove("status");
                        }
                    }
                }
                st.store(&key, cur, next).0
            }
        }
    }

    /// Deletes an object as a user would (finalizers honoured). Returns whether it existed.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) -> bool {
        let key = Key {
            resource: resource.into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        self.state.lock().delete(&key).is_ok()
    }

    /// Replaces an object's finalizers as a user would (`kubectl patch`); a deleting object
    /// left without finalizers is gone. Returns whether it existed.
    pub fn set_finalizers(&self, resource: &str, namespace: &str, name: &str, f: &[&str]) -> bool {
        let key = Key {
            resource: resource.into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        let mut st = self.state.lock();
        st.manager = "kubectl".into();
        let Some(cur) = st.objects.get(&key).cloned() else {
            return false;
        };
        let mut next = cur.clone();
        next["metadata"]["finalizers"] = json!(f);
        st.store(&key, cur, next);
        true
    }

    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = Key {
            resource: resource.into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        self.state.lock().objects.get(&key).cloned()
    }

    pub fn list(&self, resource: &str) -> Vec<Value> {
        let st = self.state.lock();
        st.objects
            .iter()
            .filter(|(k, _)| k.resource == resource)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Counts objects of `resource` matching `f`, without copying them.
    pub fn count(&self, resource: &str, f: impl Fn(&Value) -> bool) -> usize {
        let st = self.state.lock();
        st.objects
            .iter()
            .filter(|(k, v)| k.resource == resource && f(v))
            .count()
    }

    /// Applies `f` to one object without copying the whole store.
    pub fn inspect<T>(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        f: impl FnOnce(Option<&Value>) -> T,
    ) -> T {
        let key = Key {
            resource: resource.into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        f(self.state.lock().objects.get(&key))
    }

    /// Every logged request so far.
    pub fn requests(&self) -> Vec<Record> {
        self.state.lock().log.clone()
    }

    /// Logged requests other than GET (reads and watches).
    pub fn writes(&self) -> Vec<Record> {
        self.state
            .lock()
            .log
            .iter()
            .filter(|r| r.method != Method::GET)
            .cloned()
            .collect()
    }

    /// Refuses every `method` request whose path ends with `path_suffix` with `code` and
    /// `message` (a 422 for an oversized ConfigMap, a 403 for missing RBAC), until
    /// [`clear_faults`](Self::clear_faults).
    pub fn fail(&self, method: Method, path_suffix: &str, code: u16, message: &str) {
        self.state
            .lock()
            .faults
            .push((method, path_suffix.into(), code, message.into()));
    }

    pub fn clear_faults(&self) {
        self.state.lock().faults.clear();
    }

    pub fn clear_log(&self) {
        self.state.lock().log.clear();
    }

    /// Turns the request log off (the benchmark's millions of requests need no log).
    pub fn set_logging(&self, on: bool) {
        self.state.lock().log_requests = on;
    }

    /// Ends every open watch, as an API server restart or timeout would.
    pub fn close_watches(&self) {
        self.state.lock().watchers.clear();
    }

    pub fn open_watches(&self) -> usize {
        let mut st = self.state.lock();
        st.watchers.retain(|w| !w.tx.is_closed());
        st.watchers.len()
    }

    pub fn resource_version(&self) -> u64 {
        self.state.lock().rv
    }

    // --- the HTTP API ---

    pub fn handle(
        &self,
        method: &Method,
        uri: &http::Uri,
        content_type: Option<String>,
        body: &[u8],
    ) -> Response<Body> {
        let path = uri.path().to_string();
        let query = parse_query(uri.query().unwrap_or_default());
        let body_json: Value = if body.is_empty() {
            Value::Null
        } else {
            match json_or_yaml(body) {
                Ok(v) => v,
                Err(e) => return status_response(400, "BadRequest", &format!("body: {e}")),
            }
        };
        let mut st = self.state.lock();
        let rv_before = st.rv;
        let fault = st
            .faults
            .iter()
            .find(|(m, suffix, _, _)| m == method && path.ends_with(suffix.as_str()))
            .map(|(_, _, code, msg)| (*code, "Injected", msg.clone()));
        let res = match fault {
            Some(f) => Err(f),
            None => st.route(
                method,
                &path,
                &query,
                content_type.as_deref(),
                body_json.clone(),
            ),
        };
        let changed = st.rv != rv_before;
        if st.log_requests {
            st.log.push(Record {
                method: method.clone(),
                path: path.clone(),
                query: uri.query().unwrap_or_default().to_string(),
                content_type,
                body: body_json,
                changed,
            });
        }
        match res {
            Ok(Reply::Json(code, v)) => json_response(code, &v),
            Ok(Reply::Watch(rx)) => {
                let stream = rx.map(|b| Ok::<_, Infallible>(Frame::data(b)));
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(StreamBody::new(stream).boxed_unsync())
                    .unwrap()
            }
            Err((code, reason, msg)) => status_response(code, reason, &msg),
        }
    }
}

enum Reply {
    Json(u16, Value),
    Watch(mpsc::UnboundedReceiver<Bytes>),
}

type ApiResult<T> = Result<T, (u16, &'static str, String)>;

struct Route {
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

// === impl State ===

impl State {
    /// Whether a request must fail because the server is down (counted in `refused`).
    fn refuse_when_down(&mut self) -> bool {
        self.refused += u64::from(self.down);
        self.down
    }

    fn route(
        &mut self,
        method: &Method,
        path: &str,
        query: &BTreeMap<String, String>,
        content_type: Option<&str>,
        body: Value,
    ) -> ApiResult<Reply> {
        let r = parse_path(path).ok_or((404, "NotFound", format!("no route {path}")))?;
        self.manager = query
            .get("fieldManager")
            .cloned()
            .unwrap_or_else(|| "unknown".into());
        match (method.as_str(), &r.name) {
            ("GET", None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                self.watch(&r, query).map(Reply::Watch)
            }
            ("GET", None) => Ok(Reply::Json(200, self.list(&r, query)?)),
            ("GET", Some(name)) => {
                let key = r.key(name);
                self.objects
                    .get(&key)
                    .cloned()
                    .map(|o| Reply::Json(200, o))
                    .ok_or_else(|| not_found(&key))
            }
            ("POST", None) => {
                let mut obj = body;
                let name = obj["metadata"]["name"]
                    .as_str()
                    .map(str::to_string)
                    .or_else(|| {
                        obj["metadata"]["generateName"]
                            .as_str()
                            .map(|g| format!("{g}{}", self.uid + 1))
                    })
                    .ok_or((422, "Invalid", "metadata.name: Required value".into()))?;
                obj["metadata"]["name"] = json!(name);
                let key = r.key(&name);
                if self.objects.contains_key(&key) {
                    return Err((
                        409,
                        "AlreadyExists",
                        format!("{} {name:?} already exists", key.resource),
                    ));
                }
                self.create(&key, obj).map(|o| Reply::Json(201, o))
            }
            ("PUT", Some(name)) => {
                let key = r.key(name);
                let cur = self
                    .objects
                    .get(&key)
                    .cloned()
                    .ok_or_else(|| not_found(&key))?;
                check_rv(&cur, &body)?;
                let mut next = body;
                if r.status {
                    let mut whole = cur.clone();
                    whole["status"] = next.get("status").cloned().unwrap_or(Value::Null);
                    next = whole;
                } else {
                    keep_server_fields(&cur, &mut next, &key.resource);
                }
                Ok(Reply::Json(200, self.store(&key, cur, next).0))
            }
            ("PATCH", Some(name)) => self.patch(&r, name, query, content_type, body),
            ("DELETE", Some(name)) => {
                let key = r.key(name);
                self.delete(&key).map(|o| Reply::Json(200, o))
            }
            _ => Err((405, "MethodNotAllowed", format!("{method} {path}"))),
        }
    }

    fn patch(
        &mut self,
        r: &Route,
        name: &str,
        query: &BTreeMap<String, String>,
        content_type: Option<&str>,
        body: Value,
    ) -> ApiResult<Reply> {
        let key = r.key(name);
        let ct = content_type.unwrap_or_default();
        let apply = ct.starts_with("application/apply-patch");
        if apply && query.get("fieldManager").is_none_or(|m| m.is_empty()) {
            return Err((422, "Invalid", "fieldManager is required for apply".into()));
        }
        let Some(cur) = self.objects.get(&key).cloned() else {
            if apply && !r.status {
                let mut obj = body;
                obj["metadata"]["name"] = json!(name);
                if let Some(ns) = &r.namespace {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                return self.create(&key, obj).map(|o| Reply::Json(201, o));
            }
            return Err(not_found(&key));
        };
        check_rv(&cur, &body)?;
        let force = query.get("force").is_some_and(|f| f == "true");
        if apply && !force && !r.status {
            self.check_ownership(&key, &cur, &body)?;
        }
        let mut next = cur.clone();
        if apply {
            // Server-side apply: the fields this manager owned and no longer sends are removed
            // (fields of other managers stay). The status subresource and the object are
            // applied separately.
            let sent = leaves(&body);
            let dropped: Vec<String> = self
                .owners
                .get(&key)
                .into_iter()
                .flatten()
                .filter(|(path, m)| {
                    **m == self.manager
                        && path.starts_with(".status") == r.status
                        && !sent.contains_key(*path)
                })
                .map(|(path, _)| path.clone())
                .collect();
            for path in dropped {
                remove_leaf(&mut next, &path);
            }
        }
        if ct.starts_with("application/json-patch") {
            let ops = body.as_array().cloned().unwrap_or_default();
            for op in ops {
                // As the API server's json-patch library does: testing a missing path for
                // null succeeds.
                if op["op"] == "test" && op["value"].is_null() {
                    let path = op["path"].as_str().unwrap_or_default();
                    if next.pointer(path).is_none_or(Value::is_null) {
                        continue;
                    }
                }
                let p: json_patch::Patch = serde_json::from_value(json!([op]))
                    .map_err(|e| (400, "BadRequest", format!("json patch: {e}")))?;
                json_patch::patch(&mut next, &p).map_err(|e| {
                    (
                        422,
                        "Invalid",
                        format!("the JSON patch cannot be applied: {e}"),
                    )
                })?;
            }
        } else if r.status {
            if let Some(s) = body.get("status") {
                let mut status = next.get("status").cloned().unwrap_or(json!({}));
                merge(&mut status, s);
                next["status"] = status;
            }
        } else {
            let mut b = body;
            if let Some(m) = b.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
            }
            if apply {
                merge_keyed(&mut next, &b);
            } else {
                merge(&mut next, &b);
            }
        }
        if r.status {
            // The status subresource writes nothing else.
            let mut whole = cur.clone();
            whole["status"] = next.get("status").cloned().unwrap_or(Value::Null);
            next = whole;
        } else {
            keep_server_fields(&cur, &mut next, &key.resource);
        }
        Ok(Reply::Json(200, self.store(&key, cur, next).0))
    }

    fn list(&self, r: &Route, query: &BTreeMap<String, String>) -> ApiResult<Value> {
        let selector = Selector::parse(query.get("labelSelector").map_or("", String::as_str))?;
        let fields = query.get("fieldSelector").cloned().unwrap_or_default();
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|(k, _)| k.resource == r.resource)
            .filter(|(k, _)| r.namespace.as_ref().is_none_or(|n| *n == k.namespace))
            .filter(|(_, o)| selector.matches(&o["metadata"]["labels"]))
            .filter(|(k, _)| field_match(&fields, k))
            .map(|(_, o)| o.clone())
            .collect();
        let (gv, kind) = gv_kind(&r.resource);
        Ok(json!({
            "apiVersion": gv,
            "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": items,
        }))
    }

    fn watch(
        &mut self,
        r: &Route,
        query: &BTreeMap<String, String>,
    ) -> ApiResult<mpsc::UnboundedReceiver<Bytes>> {
        let selector = Selector::parse(query.get("labelSelector").map_or("", String::as_str))?;
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(self.rv);
        let oldest = self.history.front().map_or(self.rv, |e| e.rv - 1);
        let (tx, rx) = mpsc::unbounded();
        if from < oldest {
            // Like a compacted etcd: the client must list again.
            let gone = json!({"type": "ERROR", "object": status_body(410, "Expired", &format!("too old resource version: {from} ({oldest})"))});
            let _ = tx.unbounded_send(line(&gone));
            return Ok(rx);
        }
        let bookmarks = query
            .get("allowWatchBookmarks")
            .is_some_and(|b| b == "true");
        let w = Watcher {
            resource: r.resource.clone(),
            namespace: r.namespace.clone(),
            selector,
            fields: query.get("fieldSelector").cloned().unwrap_or_default(),
            bookmarks,
            tx,
        };
        for e in self.history.iter().filter(|e| e.rv > from) {
            if let Some(b) = w.render(e) {
                let _ = w.tx.unbounded_send(b);
            }
        }
        if bookmarks {
            let _ = w.tx.unbounded_send(bookmark(&w.resource, self.rv));
        }
        self.watchers.push(w);
        Ok(rx)
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn create(&mut self, key: &Key, mut obj: Value) -> ApiResult<Value> {
        let rv = self.next_rv();
        self.uid += 1;
        let (gv, kind) = gv_kind(&key.resource);
        obj["apiVersion"] = json!(gv);
        obj["kind"] = json!(kind);
        let m = obj["metadata"].as_object_mut().ok_or((
            422,
            "Invalid",
            "metadata: Required value".to_string(),
        ))?;
        m.insert("name".into(), json!(key.name));
        if !key.namespace.is_empty() {
            m.insert("namespace".into(), json!(key.namespace));
        }
        m.insert(
            "uid".into(),
            json!(format!("00000000-0000-0000-0000-{:012}", self.uid)),
        );
        m.insert("resourceVersion".into(), json!(rv.to_string()));
        m.insert("generation".into(), json!(1));
        m.insert("creationTimestamp".into(), json!(now()));
        m.remove("deletionTimestamp");
        if has_status_subresource(&key.resource) {
            obj.as_object_mut().unwrap().remove("status");
        }
        self.objects.insert(key.clone(), obj.clone());
        self.own(key, &Value::Null, &obj);
        self.emit(rv, key, "ADDED", obj.clone());
        Ok(obj)
    }

    /// Stores `next` if it differs from `cur`; returns the stored object and whether it changed.
    fn store(&mut self, key: &Key, cur: Value, mut next: Value) -> (Value, bool) {
        if strip_rv(&cur) == strip_rv(&next) {
            return (cur, false);
        }
        // A released object (deleting, no finalizers left) is gone.
        let deleting = next["metadata"].get("deletionTimestamp").is_some();
        let finalizers = next["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        let rv = self.next_rv();
        if spec_of(&cur) != spec_of(&next) {
            let g = cur["metadata"]["generation"].as_i64().unwrap_or(1);
            next["metadata"]["generation"] = json!(g + 1);
        }
        next["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.own(key, &cur, &next);
        if deleting && !finalizers {
            self.owners.remove(key);
            self.objects.remove(key);
            self.emit(rv, key, "DELETED", next.clone());
            return (next, true);
        }
        self.objects.insert(key.clone(), next.clone());
        self.emit(rv, key, "MODIFIED", next.clone());
        (next, true)
    }

    fn delete(&mut self, key: &Key) -> ApiResult<Value> {
        let cur = self
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| not_found(key))?;
        let has_finalizers = cur["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if cur["metadata"].get("deletionTimestamp").is_some() {
                return Ok(cur);
            }
            let mut next = cur.clone();
            next["metadata"]["deletionTimestamp"] = json!(now());
            next["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            let g = cur["metadata"]["generation"].as_i64().unwrap_or(1);
            next["metadata"]["generation"] = json!(g + 1);
            return Ok(self.store(key, cur, next).0);
        }
        let rv = self.next_rv();
        self.owners.remove(key);
        let mut gone = self.objects.remove(key).expect("present");
        gone["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.emit(rv, key, "DELETED", gone.clone());
        Ok(gone)
    }

    /// A non-forced apply may not change a field another manager owns (409, as on a server).
    fn check_ownership(&self, key: &Key, cur: &Value, body: &Value) -> ApiResult<()> {
        let owners = self.owners.get(key);
        let current = leaves(cur);
        let mut conflicts = Vec::new();
        for (path, value) in leaves(body) {
            let owner = owners.and_then(|o| o.get(&path));
            if owner.is_some_and(|o| *o != self.manager) && current.get(&path) != Some(&value) {
                conflicts.push(format!("conflict with {:?}: {path}", owner.unwrap()));
            }
        }
        if conflicts.is_empty() {
            Ok(())
        } else {
            Err((
                409,
                "Conflict",
                format!(
                    "Apply failed with {} conflict(s): {}",
                    conflicts.len(),
                    conflicts.join(", ")
                ),
            ))
        }
    }

    /// The request's manager takes the fields it set or changed; removed fields lose owners.
    fn own(&mut self, key: &Key, before: &Value, after: &Value) {
        let (old, new) = (leaves(before), leaves(after));
        let owners = self.owners.entry(key.clone()).or_default();
        owners.retain(|p, _| new.contains_key(p));
        for (path, v) in new {
            if old.get(&path) != Some(&v) || !owners.contains_key(&path) {
                owners.insert(path, self.manager.clone());
            }
        }
    }

    fn emit(&mut self, rv: u64, key: &Key, type_: &'static str, object: Value) {
        let e = WatchEvent {
            rv,
            resource: key.resource.clone(),
            namespace: key.namespace.clone(),
            type_,
            object,
        };
        self.watchers
            .retain(|w| w.render(&e).is_none_or(|b| w.tx.unbounded_send(b).is_ok()));
        self.history.push_back(e);
        if self.history.len() > HISTORY {
            self.history.pop_front();
        }
    }
}

// === impl Watcher ===

impl Watcher {
    fn render(&self, e: &WatchEvent) -> Option<Bytes> {
        if e.resource != self.resource || self.namespace.as_ref().is_some_and(|n| *n != e.namespace)
        {
            return None;
        }
        // A label change that moves an object out of the selector looks like a delete to the
        // watcher (and into it like an add); close enough for these tests.
        if !self.selector.matches(&e.object["metadata"]["labels"]) {
            return None;
        }
        let key = Key {
            resource: e.resource.clone(),
            namespace: e.namespace.clone(),
            name: e.object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        };
        if !field_match(&self.fields, &key) {
            return None;
        }
        Some(line(&json!({"type": e.type_, "object": e.object})))
    }
}

// === label selectors ===

#[derive(Clone, Debug, Default)]
struct Selector(Vec<Req>);

#[derive(Clone, Debug)]
enum Req {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Selector {
    fn parse(s: &str) -> ApiResult<Self> {
        let mut reqs = Vec::new();
        let mut depth = 0;
        let mut part = String::new();
        let mut parts = Vec::new();
        for c in s.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(std::mem::take(&mut part));
                    continue;
                }
                _ => {}
            }
            part.push(c);
        }
        parts.push(part);
        for p in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            let set = |rest: &str| -> Vec<String> {
                rest.trim()
                    .trim_start_matches('(')
                    .trim_end_matches(')')
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .collect()
            };
            let req = if let Some((k, v)) = p.split_once("!=") {
                Req::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = p.split_once("==") {
                Req::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = p.split_once('=') {
                Req::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = p.split_once(" notin ") {
                Req::NotIn(k.trim().into(), set(v))
            } else if let Some((k, v)) = p.split_once(" in ") {
                Req::In(k.trim().into(), set(v))
            } else if let Some(k) = p.strip_prefix('!') {
                Req::NotExists(k.trim().into())
            } else if p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            {
                Req::Exists(p.into())
            } else {
                return Err((400, "BadRequest", format!("invalid label selector {s:?}")));
            };
            reqs.push(req);
        }
        Ok(Selector(reqs))
    }

    fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k) == Some(v),
            Req::Ne(k, v) => get(k) != Some(v),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        })
    }
}

// === helpers ===

#[derive(Clone, Debug)]
struct ServiceAccount {
    namespace: String,
    name: String,
}

impl Route {
    fn key(&self, name: &str) -> Key {
        Key {
            resource: self.resource.clone(),
            namespace: self.namespace.clone().unwrap_or_default(),
            name: name.to_string(),
        }
    }
}

/// `/api/v1/...` and `/apis/{group}/{version}/...`.
fn parse_path(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, status) = match rest {
        [p] => (*p, None, false),
        [p, n] => (*p, Some(n.to_string()), false),
        [p, n, "status"] => (*p, Some(n.to_string()), true),
        _ => return None,
    };
    Some(Route {
        resource: format!("{gv}/{plural}"),
        namespace,
        name,
        status,
    })
}

fn gv_kind(resource: &str) -> (String, String) {
    let (gv, plural) = resource.rsplit_once('/').expect("gv/plural");
    let kind = match plural {
        "configmaps" => "ConfigMap",
        "services" => "Service",
        "endpointslices" => "EndpointSlice",
        "upstreampolicies" => "UpstreamPolicy",
        "leases" => "Lease",
        "events" => "Event",
        "pods" => "Pod",
        "secrets" => "Secret",
        "mutatingwebhookconfigurations" => "MutatingWebhookConfiguration",
        "roles" => "Role",
        "rolebindings" => "RoleBinding",
        "namespaces" => "Namespace",
        other => panic!("fake API server: unknown resource {other}"),
    };
    (gv.to_string(), kind.to_string())
}

fn key_of(obj: &Value) -> (String, String, String) {
    let gv = obj["apiVersion"].as_str().expect("apiVersion");
    let kind = obj["kind"].as_str().expect("kind");
    let plural = match kind {
        "UpstreamPolicy" => "upstreampolicies".to_string(),
        k => format!("{}s", k.to_lowercase()),
    };
    (
        format!("{gv}/{plural}"),
        obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        obj["metadata"]["name"].as_str().expect("name").to_string(),
    )
}

/// Leaf fields of an object (arrays are leaves), without server-owned metadata.
/// Removes the leaf at `path` (`.a.b.c`, as [`leaves`] names it) and the objects it leaves empty.
fn remove_leaf(v: &mut Value, path: &str) {
    fn go(v: &mut Value, keys: &[&str]) {
        let Some(m) = v.as_object_mut() else { return };
        match keys {
            [] => {}
            [last] => {
                m.remove(*last);
            }
            [first, rest @ ..] => {
                if let Some(child) = m.get_mut(*first) {
                    go(child, rest);
                    if child.as_object().is_some_and(|c| c.is_empty()) {
                        m.remove(*first);
                    }
                }
            }
        }
    }
    let keys: Vec<&str> = path.trim_start_matches('.').split('.').collect();
    go(v, &keys);
}

fn leaves(v: &Value) -> BTreeMap<String, Value> {
    fn walk(v: &Value, path: String, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, c) in m {
                    walk(c, format!("{path}.{k}"), out);
                }
            }
            Value::Null => {}
            _ => {
                out.insert(path, v.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(v, String::new(), &mut out);
    for p in [
        ".apiVersion",
        ".kind",
        ".metadata.name",
        ".metadata.namespace",
        ".metadata.resourceVersion",
        ".metadata.uid",
        ".metadata.generation",
        ".metadata.creationTimestamp",
        ".metadata.managedFields",
    ] {
        out.remove(p);
    }
    out
}

fn has_status_subresource(resource: &str) -> bool {
    resource.ends_with("/upstreampolicies")
}

/// Server-owned metadata survives writes; the status survives main-resource writes when the
/// resource has a status subresource.
fn keep_server_fields(cur: &Value, next: &mut Value, resource: &str) {
    for f in [
        "uid",
        "creationTimestamp",
        "generation",
        "deletionTimestamp",
        "namespace",
        "name",
    ] {
        match cur["metadata"].get(f) {
            Some(v) => next["metadata"][f] = v.clone(),
            None => {
                if let Some(m) = next["metadata"].as_object_mut() {
                    m.remove(f);
                }
            }
        }
    }
    for f in ["apiVersion", "kind"] {
        next[f] = cur[f].clone();
    }
    if has_status_subresource(resource) {
        match cur.get("status") {
            Some(s) => next["status"] = s.clone(),
            None => {
                if let Some(m) = next.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
}

/// Everything that bumps `generation`: all but metadata and status.
fn spec_of(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

fn strip_rv(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v["metadata"].as_object_mut() {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    v
}

fn check_rv(cur: &Value, body: &Value) -> ApiResult<()> {
    match body["metadata"]["resourceVersion"].as_str() {
        Some(want) if Some(want) != cur["metadata"]["resourceVersion"].as_str() => Err((
            409,
            "Conflict",
            "the object has been modified; please apply your changes to the latest version and try again".into(),
        )),
        _ => Ok(()),
    }
}

/// Server-side apply's merge: like [`merge`], but lists of named objects (`listType: map` keyed
/// by `name`: webhooks, containers, ...) merge element by element.
fn merge_keyed(target: &mut Value, patch: &Value) {
    let named = |v: &Value| {
        v.as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(|e| e["name"].is_string()))
    };
    match (target.is_object(), patch) {
        (true, Value::Object(p)) => {
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_keyed(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ if named(target) && named(patch) => {
            let t = target.as_array_mut().unwrap();
            for e in patch.as_array().unwrap() {
                match t.iter_mut().find(|x| x["name"] == e["name"]) {
                    Some(x) => merge_keyed(x, e),
                    None => t.push(e.clone()),
                }
            }
        }
        _ => merge(target, patch),
    }
}

/// `/api/v1/namespaces/{ns}/pods`: a pod create in `ns`.
fn pod_create_namespace(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let (ns, tail) = rest.split_once('/')?;
    (tail == "pods").then(|| ns.to_string())
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn field_match(fields: &str, key: &Key) -> bool {
    fields
        .split(',')
        .filter(|f| !f.is_empty())
        .all(|f| match f.split_once('=') {
            Some(("metadata.name", v)) => key.name == v.trim_start_matches('='),
            Some(("metadata.namespace", v)) => key.namespace == v.trim_start_matches('='),
            _ => true,
        })
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match h.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn content_type(h: &http::HeaderMap) -> Option<String> {
    h.get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn line(v: &Value) -> Bytes {
    let mut s = serde_json::to_vec(v).expect("json");
    s.push(b'\n');
    Bytes::from(s)
}

fn bookmark(resource: &str, rv: u64) -> Bytes {
    let (gv, kind) = gv_kind(resource);
    line(&json!({
        "type": "BOOKMARK",
        "object": {"apiVersion": gv, "kind": kind, "metadata": {"resourceVersion": rv.to_string()}},
    }))
}

fn not_found(key: &Key) -> (u16, &'static str, String) {
    (
        404,
        "NotFound",
        format!("{} {:?} not found", key.resource, key.name),
    )
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn status_response(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_body(code, reason, message))
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).expect("status code"))
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(serde_json::to_vec(v).expect("json")))
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
        .expect("response")
}

/// A request body: JSON, or YAML as `kubectl` may send it.
fn json_or_yaml(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(body)
        .or_else(|_| super::yaml::from_slice(body).map_err(|e| e.to_string()))
}
