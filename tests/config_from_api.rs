//! One loop from policy to traffic: the in-memory API server, the real operator, real sidecars
//! in `--config-source kubernetes` mode (each with its pod's service-account identity, so RBAC
//! is enforced as a cluster would) and real upstream servers on 127.0.0.1.

mod support;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use detour::{
    config::EndpointState,
    operator::{Operator, Options},
    sidecar::{self, ConfigSource, Sidecar, SidecarHandle},
};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use serde_json::{json, Value};
use support::{upstream::IdServer, *};
use tokio::task::JoinHandle;

const NS: &str = "shop";
/// How fast every change must reach every sidecar.
const PROPAGATION: Duration = Duration::from_secs(5);
/// Generous waits for what is not measured (a shared, slow machine).
const T: Duration = Duration::from_secs(30);

// === the world ===

struct Client {
    sidecar: SidecarHandle,
    following: JoinHandle<()>,
    /// `shop/pay-a` or `shop/pay-b`: the one upstream this client workload uses.
    upstream: String,
}

struct World {
    server: ApiServer,
    operator: Option<Operator>,
    clients: Vec<Client>,
    /// Live upstream pods: (EndpointSlice name, server).
    pods: Vec<(String, IdServer)>,
    /// Every server that ever ran, for the replay check.
    all: Vec<Arc<IdServer>>,
    next_pod: usize,
}

fn options() -> Options {
    Options {
        report_interval: Duration::from_millis(200),
        ..operator_options()
    }
}

/// One EndpointSlice per pod (pods share 127.0.0.1, so each has its own port).
fn pod_slice(name: &str, port: u16, (ready, serving, terminating): (bool, bool, bool)) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS, "labels": {"kubernetes.io/service-name": "pay"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{
            "addresses": ["127.0.0.1"],
            "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
            "targetRef": {"kind": "Pod", "name": name, "namespace": NS},
        }],
    })
}

/// The policy of client workload `app` (`web-a`, `web-b`): its own listener port.
fn client_policy(app: &str, listener: u16) -> Value {
    let name = format!("pay-{}", app.trim_start_matches("web-"));
    let mut p = policy(NS, &name, "pay", json!("http"), listener);
    p["spec"]["workloadSelector"] = json!({"matchLabels": {"app": app}});
    p["spec"]["healthCheck"] = json!({"interval": "1s"});
    p
}

async fn follow_api(server: &ApiServer, app: &str) -> Client {
    let opts = sidecar::Options {
        pod_labels: Some(BTreeMap::from([("app".to_string(), app.to_string())])),
        ..sidecar::Options::default()
    };
    let sidecar = Sidecar::start_empty(opts).await.expect("sidecar starts");
    let following = sidecar.follow(ConfigSource::Kubernetes {
        client: server.service_account_client(NS, "default"),
        namespace: NS.into(),
        name: "detour-config".into(),
    });
    Client {
        sidecar,
        following,
        upstream: format!("{NS}/pay-{}", app.trim_start_matches("web-")),
    }
}

impl World {
    /// The API server with the Service, three ready pods, the operator, and two client
    /// workloads (`web-a`, `web-b`) whose sidecars follow the API; returns once both serve.
    async fn start() -> World {
        let server = ApiServer::new();
        server.put(service(NS, "pay", &[("http", 80)]));
        let mut w = World {
            operator: None,
            clients: Vec::new(),
            pods: Vec::new(),
            all: Vec::new(),
            next_pod: 0,
            server,
        };
        for _ in 0..3 {
            let (name, _) = w.add_pod().await;
            w.set_pod(&name, (true, true, false));
        }
        for app in ["web-a", "web-b"] {
            w.server.put(client_policy(app, free_port()));
        }
        w.operator = Some(
            Operator::start(w.server.client(), options())
                .await
                .expect("operator starts"),
        );
        for app in ["web-a", "web-b"] {
            w.clients.push(follow_api(&w.server, app).await);
        }
        let want = w.expected();
        w.all_see(&want, T).await;
        w
    }

    /// A new pod, not ready yet (its slice lists it as not serving).
    async fn add_pod(&mut self) -> (String, SocketAddr) {
        let name = format!("pay-{}", self.next_pod);
        self.next_pod += 1;
        let s = IdServer::start(&name).await;
        let addr = s.addr;
        self.server
            .put(pod_slice(&name, addr.port(), (false, false, false)));
        self.pods.push((name.clone(), s));
        (name, addr)
    }

    fn set_pod(&self, name: &str, cond: (bool, bool, bool)) {
        let port = self.pod(name).addr.port();
        self.server.put(pod_slice(name, port, cond));
    }

    fn pod(&self, name: &str) -> &IdServer {
        &self.pods.iter().find(|(n, _)| n == name).expect("pod").1
    }

    /// What every sidecar should show: the slices' serving endpoints and their states.
    fn expected(&self) -> Vec<(String, EndpointState)> {
        let mut out: Vec<(String, EndpointState)> = self
            .server
            .list(SLICES)
            .iter()
            .filter_map(|s| {
                let e = &s["endpoints"][0];
                let c = &e["conditions"];
                let port = s["ports"][0]["port"].as_u64()?;
                let addr = format!("127.0.0.1:{port}");
                if c["ready"] == true && c["terminating"] != true {
                    Some((addr, EndpointState::Ready))
                } else if c["serving"] == true {
                    Some((addr, EndpointState::Terminating))
                } else {
                    None
                }
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Waits until every sidecar runs exactly `want` for its upstream; how long that took.
    async fn all_see(&self, want: &[(String, EndpointState)], limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let seen: Vec<_> = self.clients.iter().map(endpoints_of).collect();
            if seen.iter().all(|s| s.as_deref() == Some(want)) {
                return start.elapsed();
            }
            if start.elapsed() > limit {
                panic!("after {limit:?} the sidecars run {seen:?}, not {want:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Changes the slices with `change`, then measures until both sidecars run the result.
    async fn change(&mut self, what: &str, change: impl FnOnce(&mut World)) -> Duration {
        change(self);
        let want = self.expected();
        let took = self.all_see(&want, T).await;
        eprintln!("{what}: both sidecars updated in {took:?}");
        took
    }

    /// Replaces pod `old` by a new one as a Deployment's rolling update does: the new pod
    /// starts and becomes ready, the old one goes terminating, leaves the slice, and its process
    /// exits shortly after. Returns the propagation time of each step.
    async fn replace(&mut self, old: &str) -> Vec<Duration> {
        let (new, _) = self.add_pod().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut took = Vec::new();
        took.push(
            self.change(&format!("{new} ready"), |w| {
                w.set_pod(&new, (true, true, false))
            })
            .await,
        );
        took.push(
            self.change(&format!("{old} terminating"), |w| {
                w.set_pod(old, (false, true, true))
            })
            .await,
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        took.push(
            self.change(&format!("{old} removed"), |w| {
                w.server.delete(SLICES, NS, old);
            })
            .await,
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.stop_pod(old);
        took
    }

    fn stop_pod(&mut self, name: &str) {
        let i = self.pods.iter().position(|(n, _)| n == name).expect("pod");
        let (_, s) = self.pods.remove(i);
        s.stop();
        self.all.push(Arc::new(s));
    }

    /// Every id seen more than once across every upstream server that ever ran.
    fn replayed(&self) -> Vec<(String, u32)> {
        let mut seen: HashMap<String, u32> = HashMap::new();
        for s in self
            .all
            .iter()
            .map(|s| &**s)
            .chain(self.pods.iter().map(|(_, s)| s))
        {
            for (id, n) in s.ids() {
                *seen.entry(id).or_default() += n;
            }
        }
        seen.into_iter().filter(|(_, n)| *n > 1).collect()
    }

    /// The policy's status and each sidecar's `/config` agree: same config hash, and the
    /// sidecar's endpoints are the status' endpoint count.
    async fn check_agreement(&self) {
        for c in &self.clients {
            let policy = c.upstream.rsplit('/').next().unwrap();
            let status = eventually(T, "the policy status to settle", || {
                let p = self.server.get(POLICIES, NS, policy)?;
                let s = p["status"].clone();
                let cm = self.server.get(CONFIG_MAPS, NS, "detour-config")?;
                (s["configHash"] == cm["metadata"]["annotations"]["detour.dev/config-hash"])
                    .then_some(s)
            })
            .await;
            let (code, body) = http_get(c.sidecar.admin_addr(), "/config").await;
            assert_eq!(code, 200);
            let view: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(view["hash"], status["configHash"], "{policy}: {body}");
            let up = view["upstreams"]
                .as_array()
                .unwrap()
                .iter()
                .find(|u| u["name"] == c.upstream.as_str())
                .expect("the upstream");
            let n = up["endpoints"].as_array().unwrap().len() as u64;
            assert_eq!(
                Some(n),
                status["endpoints"]["total"].as_u64(),
                "{policy}: {status}"
            );
        }
    }

    async fn stop(mut self) {
        for c in self.clients.drain(..) {
            c.following.abort();
            c.sidecar.shutdown(Duration::from_secs(1)).await;
        }
        if let Some(op) = self.operator.take() {
            op.shutdown().await.expect("operator stops");
        }
    }
}

fn endpoints_of(c: &Client) -> Option<Vec<(String, EndpointState)>> {
    let ups = c.sidecar.upstreams();
    let u = ups.iter().find(|u| u.name == c.upstream)?;
    let mut eps: Vec<_> = u
        .endpoints
        .iter()
        .map(|e| (e.address.clone(), e.state))
        .collect();
    eps.sort_by(|a, b| a.0.cmp(&b.0));
    Some(eps)
}

// === traffic ===

#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    errors: Vec<String>,
}

/// Steady requests through one sidecar listener on a keep-alive connection (a new one after
/// a failure), each with a unique `x-request-id`.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<(Method, JoinHandle<Tally>)>,
}

impl Load {
    fn start(w: &World) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for c in &w.clients {
            let listener = c.sidecar.listener_addr(&c.upstream).expect("the listener");
            for method in [Method::GET, Method::POST] {
                let tag = format!("{}-{method}", c.upstream);
                let task = tokio::spawn(drive(listener, method.clone(), tag, stop.clone()));
                tasks.push((method, task));
            }
        }
        Load { stop, tasks }
    }

    /// Stops and returns the GET and the POST tallies.
    async fn stop(self) -> (Tally, Tally) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut get, mut post) = (Tally::default(), Tally::default());
        for (m, t) in self.tasks {
            let t = t.await.expect("load task");
            let into = if m == Method::GET {
                &mut get
            } else {
                &mut post
            };
            into.ok += t.ok;
            into.errors.extend(t.errors);
        }
        (get, post)
    }
}

async fn drive(listener: SocketAddr, method: Method, tag: String, stop: Arc<AtomicBool>) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        if conn.is_none() {
            let stream = tokio::net::TcpStream::connect(listener)
                .await
                .expect("the sidecar listens");
            let (send, c) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .expect("handshake");
            tokio::spawn(c);
            conn = Some(send);
        }
        let send = conn.as_mut().unwrap();
        let req = Request::builder()
            .method(method.clone())
            .uri("/orders")
            .header("host", "pay")
            .header(support::upstream::REQUEST_ID, format!("{tag}-{n}"))
            .body(Full::new(Bytes::from_static(b"{\"item\":1}")))
            .unwrap();
        let res = match send.ready().await {
            Ok(()) => send.send_request(req).await,
            Err(e) => Err(e),
        };
        match res {
            Ok(r) => {
                let status = r.status();
                let ps = r
                    .headers()
                    .get("proxy-status")
                    .map(|v| v.to_str().unwrap_or_default().to_string());
                let _ = r.into_body().collect().await;
                if status == 200 {
                    tally.ok += 1;
                } else {
                    tally
                        .errors
                        .push(format!("{tag}-{n}: {status} {}", ps.unwrap_or_default()));
                }
            }
            Err(e) => {
                tally.errors.push(format!("{tag}-{n}: {e}"));
                conn = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tally
}

fn assert_clean(get: &Tally, post: &Tally, w: &World) {
    eprintln!(
        "GET {} ok, {} errors; POST {} ok, {} errors",
        get.ok,
        get.errors.len(),
        post.ok,
        post.errors.len()
    );
    assert!(
        get.ok > 50 && post.ok > 50,
        "traffic flowed: {get:?} {post:?}"
    );
    assert!(get.errors.is_empty(), "GET errors: {:?}", get.errors);
    assert!(post.errors.is_empty(), "POST errors: {:?}", post.errors);
    assert!(w.replayed().is_empty(), "replayed: {:?}", w.replayed());
}

fn metric(sc: &SidecarHandle, line_start: &str) -> Option<f64> {
    sc.metrics_text()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

const CONNECTED: &str = "detour_config_source_connected{source=\"kubernetes\"}";

// === the end-to-end proof ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_reaches_every_sidecar_in_time_with_zero_errors() {
    let mut w = World::start().await;
    let load = Load::start(&w);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut took = Vec::new();
    for old in ["pay-0", "pay-1", "pay-2"] {
        took.extend(w.replace(old).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (get, post) = load.stop().await;
    took.sort();
    eprintln!(
        "{} changes; propagation median {:?}, max {:?}",
        took.len(),
        took[took.len() / 2],
        took.last().unwrap()
    );
    assert!(
        took.iter().all(|t| *t < PROPAGATION),
        "every change within {PROPAGATION:?}: {took:?}"
    );
    assert_clean(&get, &post, &w);
    w.check_agreement().await;
    w.stop().await;
}

// === faults ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_down_for_30s_changes_nothing_and_the_loop_resumes() {
    let mut w = World::start().await;
    let load = Load::start(&w);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hash = w.clients[0].sidecar.config().hash();
    let down = Instant::now();
    w.server.set_down(true);
    for c in &w.clients {
        eventually(T, "the sidecar to notice the outage", || {
            (metric(&c.sidecar, CONNECTED) == Some(0.0)).then_some(())
        })
        .await;
    }
    let (code, body) = http_get(w.clients[0].sidecar.admin_addr(), "/ready").await;
    assert_eq!(code, 200, "still ready on the last good config: {body}");
    assert!(body.contains("not connected"), "{body}");
    let refused = w.server.refused();
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(down.elapsed())).await;
    assert!(
        w.server.refused() > refused,
        "the sidecars kept trying through the outage"
    );
    for c in &w.clients {
        assert_eq!(c.sidecar.config().hash(), hash, "the last good config runs");
        assert!(c.sidecar.is_ready());
    }
    w.server.set_down(false);
    for c in &w.clients {
        eventually(T, "the sidecar to reconnect", || {
            (metric(&c.sidecar, CONNECTED) == Some(1.0)).then_some(())
        })
        .await;
    }
    // The loop works again (the operator backs off as client-go does: up to 30 s).
    let (name, _) = w.add_pod().await;
    w.set_pod(&name, (true, true, false));
    let want = w.expected();
    let took = w.all_see(&want, Duration::from_secs(60)).await;
    eprintln!("first change after the outage reached both sidecars in {took:?}");
    let (get, post) = load.stop().await;
    assert_clean(&get, &post, &w);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_restarted_mid_rollout_picks_up_where_it_stopped() {
    let mut w = World::start().await;
    let load = Load::start(&w);
    w.replace("pay-0").await;
    // The operator stops in the middle of replacing pay-1: the new pod is ready, the old one
    // starts terminating while no operator runs.
    let (new, _) = w.add_pod().await;
    w.change("pay-3 ready", |w| w.set_pod(&new, (true, true, false)))
        .await;
    w.operator
        .take()
        .unwrap()
        .shutdown()
        .await
        .expect("operator stops");
    // What the operator wrote just before it stopped may still be on its way to the sidecars.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = w.clients[0].sidecar.config().hash();
    let written = w.server.get(CONFIG_MAPS, NS, "detour-config").unwrap();
    w.set_pod("pay-1", (false, true, true));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Read at the source, so a slow watch cannot hide a write.
    let now = w.server.get(CONFIG_MAPS, NS, "detour-config").unwrap();
    assert_eq!(
        now["metadata"]["resourceVersion"], written["metadata"]["resourceVersion"],
        "nobody renders while the operator is away"
    );
    assert_eq!(w.clients[0].sidecar.config().hash(), before);
    let restarted = Instant::now();
    w.operator = Some(
        Operator::start(w.server.client(), options())
            .await
            .expect("operator starts"),
    );
    let want = w.expected();
    w.all_see(&want, PROPAGATION).await;
    eprintln!(
        "the change made while the operator was away reached both sidecars {:?} after its restart",
        restarted.elapsed()
    );
    w.change("pay-1 removed", |w| {
        w.server.delete(SLICES, NS, "pay-1");
    })
    .await;
    w.stop_pod("pay-1");
    w.replace("pay-2").await;
    let (get, post) = load.stop().await;
    assert_clean(&get, &post, &w);
    w.check_agreement().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detour_config_deleted_by_hand_is_restored_while_sidecars_keep_serving() {
    let w = World::start().await;
    let load = Load::start(&w);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = w.server.get(CONFIG_MAPS, NS, "detour-config").unwrap();
    let hash = w.clients[0].sidecar.config().hash();
    assert!(w.server.delete(CONFIG_MAPS, NS, "detour-config"));
    let restored = eventually(T, "the operator to restore detour-config", || {
        let cm = w.server.get(CONFIG_MAPS, NS, "detour-config")?;
        (cm["metadata"]["uid"] != before["metadata"]["uid"]).then_some(cm)
    })
    .await;
    assert_eq!(restored["data"], before["data"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for c in &w.clients {
        assert!(c.sidecar.is_ready());
        assert_eq!(c.sidecar.config().hash(), hash);
        eventually(T, "the sidecar to see the config back", || {
            (metric(&c.sidecar, "detour_config_stale") == Some(0.0)).then_some(())
        })
        .await;
    }
    let (get, post) = load.stop().await;
    assert_clean(&get, &post, &w);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_edited_to_an_invalid_value_is_flagged_and_the_running_config_kept() {
    let mut w = World::start().await;
    let load = Load::start(&w);
    let a = w.clients[0].upstream.clone();
    let policy_before = w.clients[0]
        .sidecar
        .config()
        .upstreams
        .iter()
        .find(|u| u.name == a)
        .unwrap()
        .policy
        .clone();
    let mut p = w.server.get(POLICIES, NS, "pay-a").unwrap();
    // Valid for the schema, refused by detour: a try may not outlast the whole request.
    p["spec"]["retries"]["perTryTimeout"] = json!("60s");
    w.server.put(p);
    let (status, message) = eventually(T, "the policy to be flagged", || {
        let p = w.server.get(POLICIES, NS, "pay-a")?;
        let c = p["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Accepted")?
            .clone();
        (c["reason"] == "Invalid").then(|| {
            (
                c["status"].as_str().unwrap().to_string(),
                c["message"].as_str().unwrap().to_string(),
            )
        })
    })
    .await;
    assert_eq!(status, "False");
    assert!(message.contains("perTryTimeout"), "{message}");
    assert!(message.contains("last accepted version"), "{message}");
    // The running upstream stays, with its accepted values, and still follows the pods.
    w.replace("pay-0").await;
    let running = w.clients[0].sidecar.config();
    let u = running.upstreams.iter().find(|u| u.name == a).unwrap();
    assert_eq!(u.policy, policy_before);
    let (get, post) = load.stop().await;
    assert_clean(&get, &post, &w);
    w.stop().await;
}

// === the sidecar's watch, alone ===

fn config_map(upstream_port: u16) -> Value {
    let doc = format!(
        "apiVersion: detour.dev/v1alpha1\nkind: SidecarConfig\nupstreams:\n- name: {NS}/pay-a\n  listen: 127.0.0.1:0\n  endpoints:\n  - address: 127.0.0.1:{upstream_port}\n"
    );
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "detour-config", "namespace": NS},
        "data": {"config.yaml": doc},
    })
}

/// The Role and RoleBinding the operator keeps (`detour::operator::access`).
fn grant_sidecar_access(server: &ApiServer) {
    server.put(detour::operator::access::role(NS));
    server.put(detour::operator::access::role_binding(NS));
}

#[tokio::test]
async fn a_service_account_may_read_only_detour_config_and_only_with_its_name() {
    let server = ApiServer::new();
    server.put(config_map(1));
    server.put(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "secret-ish", "namespace": NS}, "data": {"k": "v"}}));
    let api: Api<ConfigMap> = Api::namespaced(server.service_account_client(NS, "default"), NS);
    let forbidden =
        |r: Result<_, kube::Error>| matches!(r, Err(kube::Error::Api(s)) if s.code == 403);
    assert!(
        forbidden(api.get("detour-config").await.map(drop)),
        "no Role yet"
    );
    grant_sidecar_access(&server);
    api.get("detour-config").await.expect("get by name");
    let named = kube::api::ListParams::default().fields("metadata.name=detour-config");
    assert_eq!(api.list(&named).await.expect("list by name").items.len(), 1);
    assert!(forbidden(api.list(&Default::default()).await.map(drop)));
    assert!(forbidden(api.get("secret-ish").await.map(drop)));
    let other: Api<ConfigMap> =
        Api::namespaced(server.service_account_client("other", "default"), NS);
    assert!(
        forbidden(other.get("detour-config").await.map(drop)),
        "another namespace's account"
    );
}

async fn lone_sidecar(server: &ApiServer) -> (SidecarHandle, JoinHandle<()>) {
    let sc = Sidecar::start_empty(sidecar::Options::default())
        .await
        .unwrap();
    let following = sc.follow(ConfigSource::Kubernetes {
        client: server.service_account_client(NS, "default"),
        namespace: NS.into(),
        name: "detour-config".into(),
    });
    (sc, following)
}

fn endpoint_ports(sc: &SidecarHandle) -> Vec<u16> {
    sc.config()
        .upstreams
        .iter()
        .flat_map(|u| u.endpoints.iter())
        .map(|e| e.address.rsplit(':').next().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn the_sidecar_serves_only_after_a_valid_config_and_keeps_it_through_every_fault() {
    let server = ApiServer::new();
    // Unreachable at first: not ready, and it says why.
    server.set_down(true);
    let (sc, following) = lone_sidecar(&server).await;
    eventually(T, "the sidecar to try the API server, and again", || {
        (server.refused() >= 2).then_some(())
    })
    .await;
    let (code, body) = http_get(sc.admin_addr(), "/ready").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not connected"), "{body}");
    assert_eq!(metric(&sc, CONNECTED), Some(0.0));
    assert_eq!(metric(&sc, "detour_config_stale"), Some(1.0));
    // Reachable, but no policy in the namespace yet (no Role, no ConfigMap): the pod must still
    // start (its startupProbe waits on /ready), so the sidecar is ready and serves nothing.
    server.set_down(false);
    eventually(T, "the sidecar to connect", || {
        (metric(&sc, CONNECTED) == Some(1.0)).then_some(())
    })
    .await;
    eventually(T, "ready with nothing to serve", || {
        sc.is_ready().then_some(())
    })
    .await;
    let (code, body) = http_get(sc.admin_addr(), "/ready").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("no UpstreamPolicy in this namespace yet"),
        "{body}"
    );
    assert!(sc.config().upstreams.is_empty());
    grant_sidecar_access(&server);
    let start = std::time::Instant::now();
    loop {
        let (code, body) = http_get(sc.admin_addr(), "/ready").await;
        if body.contains("does not exist") {
            assert_eq!(code, 200, "{body}");
            break;
        }
        assert!(
            start.elapsed() < T,
            "the list to succeed and find no ConfigMap: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    server.put(config_map(1001));
    eventually(T, "the first config", || {
        (endpoint_ports(&sc) == [1001]).then_some(())
    })
    .await;
    assert_eq!(endpoint_ports(&sc), [1001]);
    assert_eq!(metric(&sc, "detour_config_stale"), Some(0.0));
    assert!(metric(&sc, "detour_config_applied_timestamp_seconds").unwrap() > 1.7e9);

    // An invalid document: refused, counted, flagged; the last good config stays.
    let mut bad = config_map(1002);
    bad["data"]["config.yaml"] = json!("apiVersion: detour.dev/v1alpha1\nkind: SidecarConfig\nupstreams:\n- name: x\n  listen: nowhere\n");
    server.put(bad);
    eventually(T, "the invalid document to be flagged", || {
        (metric(&sc, "detour_config_stale") == Some(1.0)).then_some(())
    })
    .await;
    let (code, body) = http_get(sc.admin_addr(), "/ready").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("invalid config") && body.contains("listen"),
        "{body}"
    );
    assert!(body.contains("serving the last good config"), "{body}");
    assert_eq!(endpoint_ports(&sc), [1001]);
    assert_eq!(
        metric(&sc, "detour_config_reloads_total{result=\"failure\"}"),
        Some(1.0)
    );

    // Deleted: kept, flagged.
    assert!(server.delete(CONFIG_MAPS, NS, "detour-config"));
    eventually(T, "the deletion to be flagged", || {
        sc.metrics_text()
            .contains("detour_config_stale 1")
            .then_some(())
    })
    .await;
    let (code, body) = http_get(sc.admin_addr(), "/ready").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("was deleted"), "{body}");
    assert_eq!(endpoint_ports(&sc), [1001]);

    // Back, with a change: applied, and nothing is flagged any more.
    server.put(config_map(1003));
    eventually(T, "the new config", || {
        (endpoint_ports(&sc) == [1003]).then_some(())
    })
    .await;
    assert_eq!(metric(&sc, "detour_config_stale"), Some(0.0));
    let (_, body) = http_get(sc.admin_addr(), "/ready").await;
    assert!(!body.contains("problem"), "{body}");
    following.abort();
    sc.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_watch_past_the_kept_history_lists_again_without_a_disconnection() {
    let server = ApiServer::new();
    grant_sidecar_access(&server);
    server.put(config_map(2001));
    let (sc, following) = lone_sidecar(&server).await;
    eventually(T, "the first config", || {
        (endpoint_ports(&sc) == [2001]).then_some(())
    })
    .await;
    let lists_before = config_map_lists(&server);
    // Compaction, then the watch ends: resuming from the old resourceVersion gets 410 Gone.
    server.compact();
    server.close_watches();
    server.put(config_map(2002));
    eventually(T, "the change after the relist", || {
        (endpoint_ports(&sc) == [2002]).then_some(())
    })
    .await;
    assert!(config_map_lists(&server) > lists_before, "it listed again");
    assert_eq!(metric(&sc, CONNECTED), Some(1.0));
    assert_eq!(metric(&sc, "detour_config_stale"), Some(0.0));
    // Every list and watch the sidecar made named the one ConfigMap (RBAC would refuse others).
    for r in server.requests() {
        if r.path.ends_with("/configmaps") {
            assert!(
                r.query
                    .contains("fieldSelector=metadata.name%3Ddetour-config"),
                "{r:?}"
            );
        }
    }
    following.abort();
    sc.shutdown(Duration::from_secs(1)).await;
}

fn config_map_lists(server: &ApiServer) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/configmaps") && !r.query.contains("watch=true"))
        .count()
}
