//! Live endpoint health from the sidecars. Ejection is decided in each sidecar (passive outlier
//! detection), so the operator asks them: every `--report-interval` it reads `GET /endpoints` from
//! each pod labelled `detour.dev/sidecar` on its `detour-admin` port, folds the answers into one
//! [`UpstreamReport`] per upstream (`<namespace>/<policy>`), and re-reconciles the policies whose
//! aggregate changed, so `status.endpoints.ejected` and `status.sidecars` follow.
//!
//! [`scrape_target`] and [`aggregate`] are pure and carry the rules; [`poll`] is the loop.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use futures::{channel::mpsc, future, Stream, StreamExt};
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, PodStatus};
use kube::{
    runtime::{
        reflector::{ObjectRef, Store},
        watcher,
    },
    Resource, ResourceExt,
};
use parking_lot::RwLock;
use tracing::{debug, info, warn};

use super::{metrics::Metrics, reconcile::PolicyObject};
use crate::{
    api::SIDECAR_ADMIN_PORT,
    report::{EndpointsReport, LiveState},
};

/// How long one sidecar may take to answer; a slow one is just not counted this round.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);
/// Sidecars scraped at once.
pub const SCRAPE_CONCURRENCY: usize = 16;
/// Larger answers are refused (a namespace's whole config is capped at 1 MiB).
const MAX_REPORT_BYTES: usize = 4 << 20;

/// A sidecar the operator can ask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub namespace: String,
    pub pod: String,
    pub admin: SocketAddr,
}

/// What the sidecars say about one upstream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamReport {
    /// Sidecars that answered and run this upstream.
    pub sidecars: u32,
    /// Endpoint addresses ejected by at least one of them.
    pub ejected: BTreeSet<SocketAddr>,
}

/// Why one sidecar could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("connecting: {0}")]
    Connect(#[source] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP: {0}")]
    Http(#[source] hyper::Error),
    #[error("GET /endpoints answered {0} (a sidecar older than /endpoints?)")]
    Status(StatusCode),
    #[error("reading the body: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("decoding the report: {0}")]
    Decode(#[source] serde_json::Error),
}

/// The latest aggregate, written by the poller and read by every reconcile of its scope.
#[derive(Debug, Default)]
pub struct SidecarReports {
    latest: RwLock<Option<Arc<BTreeMap<String, UpstreamReport>>>>,
}

// === impl SidecarReports ===

impl SidecarReports {
    /// `None` until the first round is done: reconciles then keep what the status says rather
    /// than report zero sidecars for a moment after every start.
    pub fn latest(&self) -> Option<Arc<BTreeMap<String, UpstreamReport>>> {
        self.latest.read().clone()
    }

    /// Stores a round's aggregate and returns the upstreams whose health changed (compared with
    /// nothing at all on the first round).
    pub fn set(&self, next: BTreeMap<String, UpstreamReport>) -> BTreeSet<String> {
        let mut latest = self.latest.write();
        let empty = BTreeMap::new();
        let prev = latest.as_deref().unwrap_or(&empty);
        let changed = prev
            .keys()
            .chain(next.keys())
            .filter(|k| prev.get(*k) != next.get(*k))
            .cloned()
            .collect();
        *latest = Some(Arc::new(next));
        changed
    }
}

// === impl UpstreamReport ===

impl UpstreamReport {
    /// Distinct addresses among `addresses` (the policy's current endpoints) that some sidecar
    /// ejected. An address the policy no longer has is not counted, even if a sidecar that has
    /// not reloaded yet still reports it.
    pub fn ejected_among<'a>(&self, addresses: impl IntoIterator<Item = &'a str>) -> u32 {
        let current: BTreeSet<SocketAddr> = addresses
            .into_iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let n = self.ejected.intersection(&current).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// The admin address of a pod worth scraping: Running, with a pod IP, not being deleted, and a
/// container (or native sidecar init container) port named `detour-admin`.
pub fn scrape_target(pod: &Pod) -> Option<Target> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    let spec = pod.spec.as_ref()?;
    // An init container runs alongside the app only as a native sidecar (restartPolicy Always).
    let native_sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    let port = spec
        .containers
        .iter()
        .chain(native_sidecars)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| {
            p.name.as_deref() == Some(SIDECAR_ADMIN_PORT)
                && matches!(p.protocol.as_deref(), None | Some("TCP"))
        })?;
    let port = u16::try_from(port.container_port)
        .ok()
        .filter(|p| *p != 0)?;
    Some(Target {
        namespace: pod.metadata.namespace.clone()?,
        pod: pod.metadata.name.clone()?,
        admin: SocketAddr::new(ip, port),
    })
}

/// Folds the reports of one round (each with its pod's namespace) into per-upstream health. A
/// sidecar only runs upstreams of its own namespace's config, so anything else it reports is
/// ignored rather than credited to another namespace's policy.
pub fn aggregate<'a>(
    reports: impl IntoIterator<Item = (&'a str, &'a EndpointsReport)>,
) -> BTreeMap<String, UpstreamReport> {
    let mut out: BTreeMap<String, UpstreamReport> = BTreeMap::new();
    for (namespace, report) in reports {
        for (upstream, endpoints) in &report.upstreams {
            if upstream.split_once('/').map(|(ns, _)| ns) != Some(namespace) {
                continue;
            }
            let h = out.entry(upstream.clone()).or_default();
            h.sidecars += 1;
            h.ejected.extend(
                endpoints
                    .iter()
                    .filter(|e| e.state == LiveState::Ejected)
                    .filter_map(|e| e.address.parse::<SocketAddr>().ok()),
            );
        }
    }
    out
}

/// Keeps only what [`scrape_target`] reads: the store holds every sidecar pod of the scope.
pub fn slim(pod: &mut Pod) {
    let m = &mut pod.metadata;
    m.managed_fields = None;
    m.annotations = None;
    m.owner_references = None;
    m.labels = None;
    if let Some(spec) = &pod.spec {
        let keep = |c: &Container| Container {
            name: c.name.clone(),
            ports: c.ports.clone(),
            restart_policy: c.restart_policy.clone(),
            ..Container::default()
        };
        pod.spec = Some(PodSpec {
            containers: spec.containers.iter().map(keep).collect(),
            init_containers: spec
                .init_containers
                .as_ref()
                .map(|cs| cs.iter().map(keep).collect()),
            ..PodSpec::default()
        });
    }
    if let Some(status) = &mut pod.status {
        pod.status = Some(PodStatus {
            phase: status.phase.take(),
            pod_ip: status.pod_ip.take(),
            ..PodStatus::default()
        });
    }
}

/// Reads one sidecar's `GET /endpoints`.
pub async fn scrape(admin: SocketAddr, timeout: Duration) -> Result<EndpointsReport, ScrapeError> {
    tokio::time::timeout(timeout, scrape_inner(admin))
        .await
        .map_err(|_| ScrapeError::Timeout(timeout))?
}

async fn scrape_inner(admin: SocketAddr) -> Result<EndpointsReport, ScrapeError> {
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .map_err(ScrapeError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ScrapeError::Http)?;
    // Dropped (and the connection closed) whatever way this returns, timeouts included.
    let conn = AbortOnDrop(tokio::spawn(conn));
    let req = Request::get("/endpoints")
        .header(header::HOST, admin.to_string())
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .expect("static request");
    let resp = send.send_request(req).await.map_err(ScrapeError::Http)?;
    if resp.status() != StatusCode::OK {
        return Err(ScrapeError::Status(resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_REPORT_BYTES)
        .collect()
        .await
        .map_err(ScrapeError::Body)?
        .to_bytes();
    drop(conn);
    serde_json::from_slice(&body).map_err(ScrapeError::Decode)
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Everything the poll loop of one scope needs.
pub struct Poller {
    pub pods: Store<Pod>,
    pub policies: Store<PolicyObject>,
    pub reports: Arc<SidecarReports>,
    /// Policies to reconcile (`Controller::reconcile_on`).
    pub trigger: mpsc::UnboundedSender<ObjectRef<PolicyObject>>,
    pub interval: Duration,
    pub metrics: Arc<Metrics>,
    /// True once the controller's caches are filled (the policies among them): the first round
    /// looks at every policy's status.
    pub synced: tokio::sync::watch::Receiver<bool>,
}

/// Drives the pod watch and, once its cache is filled, scrapes every `interval`.
pub async fn poll<S>(pod_events: S, poller: Poller)
where
    S: Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Send,
{
    let watch = pod_events.for_each(|ev| {
        if let Err(e) = ev {
            // RBAC without pods, say: policies still work, without sidecar health.
            warn!(error = %e, "watching sidecar pods failed; retrying");
        }
        future::ready(())
    });
    let rounds = async {
        // This is the pod store's only waiter (`wait_until_ready` wakes just one).
        if poller.pods.wait_until_ready().await.is_err() {
            return;
        }
        if poller.synced.clone().wait_for(|s| *s).await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(poller.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = HashSet::new();
        let mut first = true;
        loop {
            tick.tick().await;
            round(&poller, &mut failing, first).await;
            first = false;
        }
    };
    futures::pin_mut!(watch, rounds);
    future::select(watch, rounds).await;
}

/// One scrape of every sidecar; triggers a reconcile where the aggregate changed.
async fn round(poller: &Poller, failing: &mut HashSet<String>, first: bool) {
    let results = scrape_all(&poller.pods).await;
    let reports = record(poller, results, failing);
    // Pods that went away are no longer failing.
    let present: HashSet<String> = poller
        .pods
        .state()
        .iter()
        .map(|pod| format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()))
        .collect();
    failing.retain(|k| present.contains(k));

    let aggregated = aggregate(reports.iter().map(|(ns, r)| (ns.as_str(), r)));
    let upstreams = aggregated.len();
    let mut changed = poller.reports.set(aggregated);
    if first {
        // A status written by an earlier run may report sidecars that are gone now.
        changed.extend(showing_sidecar_figures(&poller.policies));
    }
    let triggered = trigger(poller, changed);
    debug!(
        sidecars = reports.len(),
        upstreams, triggered, "sidecar health round"
    );
}

/// Every sidecar pod's `/endpoints`, a few at a time.
async fn scrape_all(pods: &Store<Pod>) -> Vec<(Target, Result<EndpointsReport, ScrapeError>)> {
    let targets: Vec<Target> = pods
        .state()
        .iter()
        .filter_map(|pod| scrape_target(pod))
        .collect();
    futures::stream::iter(targets)
        .map(|t| async move {
            let r = scrape(t.admin, SCRAPE_TIMEOUT).await;
            (t, r)
        })
        .buffer_unordered(SCRAPE_CONCURRENCY)
        .collect()
        .await
}

/// Counts and logs each scrape (a failing pod once per streak, kept in `failing`); the reports
/// that came back, with their namespaces.
fn record(
    poller: &Poller,
    results: Vec<(Target, Result<EndpointsReport, ScrapeError>)>,
    failing: &mut HashSet<String>,
) -> Vec<(String, EndpointsReport)> {
    let mut reports = Vec::with_capacity(results.len());
    for (t, r) in results {
        let key = format!("{}/{}", t.namespace, t.pod);
        poller.metrics.sidecar_scraped(r.is_ok());
        match r {
            Ok(report) => {
                if failing.remove(&key) {
                    info!(pod = %key, admin = %t.admin, "sidecar answers again");
                }
                reports.push((t.namespace, report));
            }
            // Once per failing streak: an admin server bound to 127.0.0.1 fails every round.
            Err(e) if failing.insert(key.clone()) => {
                info!(pod = %key, admin = %t.admin, error = %e,
                    "cannot read the sidecar's /endpoints; not counted until it answers");
            }
            Err(e) => debug!(pod = %key, error = %e, "sidecar scrape failed"),
        }
    }
    reports
}

/// Policies (`ns/name`) whose status shows sidecars or ejected endpoints.
fn showing_sidecar_figures(policies: &Store<PolicyObject>) -> Vec<String> {
    policies
        .state()
        .iter()
        .filter(|policy| {
            policy.0.as_ref().is_ok_and(|obj| {
                obj.status
                    .as_ref()
                    .is_some_and(|s| s.sidecars > 0 || s.endpoints.ejected > 0)
            })
        })
        .map(|policy| {
            format!(
                "{}/{}",
                policy.namespace().unwrap_or_default(),
                policy.name_any()
            )
        })
        .collect()
}

/// Triggers a reconcile of one live policy per namespace among `changed` upstreams (a reconcile
/// renders the whole namespace); how many namespaces were triggered.
fn trigger(poller: &Poller, changed: impl IntoIterator<Item = String>) -> usize {
    let mut namespaces = BTreeSet::new();
    for upstream in changed {
        let Some((ns, name)) = upstream.split_once('/') else {
            continue;
        };
        if namespaces.contains(ns) {
            continue;
        }
        let key = ObjectRef::new(name).within(ns);
        let live = poller
            .policies
            .get(&key)
            .is_some_and(|o| o.meta().deletion_timestamp.is_none());
        if live {
            namespaces.insert(ns.to_string());
            let _ = poller.trigger.unbounded_send(key);
        }
    }
    namespaces.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::ReportedEndpoint;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn sidecar_pod() -> serde_json::Value {
        json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"detour.dev/sidecar": "true"}},
            "spec": {"containers": [
                {"name": "app", "ports": [{"name": "http", "containerPort": 8080}]},
                {"name": "detour", "ports": [{"name": "detour-admin", "containerPort": 9901, "protocol": "TCP"}]},
            ]},
            "status": {"phase": "Running", "podIP": "10.1.2.3"},
        })
    }

    #[test]
    fn a_running_pod_with_an_ip_and_the_admin_port_is_scraped() {
        assert_eq!(
            scrape_target(&pod(sidecar_pod())),
            Some(Target {
                namespace: "shop".into(),
                pod: "web-1".into(),
                admin: "10.1.2.3:9901".parse().unwrap(),
            })
        );
        let mut v6 = sidecar_pod();
        v6["status"]["podIP"] = json!("fd00::7");
        assert_eq!(
            scrape_target(&pod(v6)).unwrap().admin,
            "[fd00::7]:9901".parse().unwrap()
        );
    }

    #[test]
    fn pods_not_worth_asking_are_skipped() {
        // (what, JSON pointer, new value or removal)
        let cases = [
            ("pending", "/status/phase", Some(json!("Pending"))),
            ("succeeded", "/status/phase", Some(json!("Succeeded"))),
            ("no status", "/status", None),
            ("no pod IP", "/status/podIP", None),
            ("bad pod IP", "/status/podIP", Some(json!("not-an-ip"))),
            (
                "deleting",
                "/metadata/deletionTimestamp",
                Some(json!("2026-01-01T00:00:00Z")),
            ),
            (
                "no admin port",
                "/spec/containers/1/ports/0/name",
                Some(json!("admin")),
            ),
            (
                "UDP admin port",
                "/spec/containers/1/ports/0/protocol",
                Some(json!("UDP")),
            ),
            ("no spec", "/spec", None),
        ];
        for (what, pointer, value) in cases {
            let mut p = sidecar_pod();
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            let parent = p.pointer_mut(parent).unwrap().as_object_mut().unwrap();
            match value {
                Some(v) => parent.insert(key.to_string(), v),
                None => parent.remove(key),
            };
            assert_eq!(scrape_target(&pod(p)), None, "{what}");
        }
    }

    #[test]
    fn a_native_sidecar_init_container_counts_a_plain_init_container_does_not() {
        let mut p = sidecar_pod();
        let detour = p["spec"]["containers"][1].clone();
        p["spec"]["containers"] = json!([p["spec"]["containers"][0]]);
        p["spec"]["initContainers"] = json!([detour]);
        assert_eq!(scrape_target(&pod(p.clone())), None);
        p["spec"]["initContainers"][0]["restartPolicy"] = json!("Always");
        assert_eq!(
            scrape_target(&pod(p)).unwrap().admin,
            "10.1.2.3:9901".parse().unwrap()
        );
    }

    #[test]
    fn slimming_keeps_what_eligibility_reads() {
        let mut full = sidecar_pod();
        full["spec"]["containers"][1]["image"] = json!("detour:1");
        full["spec"]["nodeName"] = json!("node-1");
        full["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
        full["metadata"]["annotations"] = json!({"big": "x".repeat(1000)});
        let before = scrape_target(&pod(full.clone()));
        let mut p = pod(full);
        slim(&mut p);
        assert_eq!(scrape_target(&p), before);
        assert!(p.metadata.annotations.is_none());
        let spec = p.spec.unwrap();
        assert_eq!(spec.node_name, None);
        assert_eq!(spec.containers[1].image, None);
        assert_eq!(p.status.unwrap().conditions, None);
    }

    fn report(upstreams: &[(&str, &[(&str, LiveState)])]) -> EndpointsReport {
        EndpointsReport {
            hash: "h".into(),
            upstreams: upstreams
                .iter()
                .map(|(name, eps)| {
                    let eps = eps
                        .iter()
                        .map(|(a, s)| ReportedEndpoint {
                            address: a.to_string(),
                            state: *s,
                        })
                        .collect();
                    (name.to_string(), eps)
                })
                .collect(),
        }
    }

    use LiveState::{Ejected, Healthy, Terminating, Unhealthy};

    #[test]
    fn aggregate_counts_sidecars_and_distinct_ejected_addresses() {
        let a = report(&[
            (
                "shop/pay",
                &[("10.0.0.1:80", Ejected), ("10.0.0.2:80", Healthy)],
            ),
            ("shop/db", &[("10.0.1.1:5432", Healthy)]),
        ]);
        // The same address ejected by two sidecars is one ejected endpoint.
        let b = report(&[(
            "shop/pay",
            &[
                ("10.0.0.1:80", Ejected),
                ("10.0.0.2:80", Ejected),
                ("10.0.0.3:80", Unhealthy),
                ("10.0.0.4:80", Terminating),
            ],
        )]);
        let c = report(&[("shop/pay", &[("10.0.0.1:80", Healthy)])]);
        let agg = aggregate([("shop", &a), ("shop", &b), ("shop", &c)]);
        let pay = &agg["shop/pay"];
        assert_eq!(pay.sidecars, 3);
        assert_eq!(
            pay.ejected,
            BTreeSet::from([
                "10.0.0.1:80".parse().unwrap(),
                "10.0.0.2:80".parse().unwrap()
            ])
        );
        assert_eq!(
            agg["shop/db"],
            UpstreamReport {
                sidecars: 1,
                ejected: BTreeSet::new()
            }
        );
        assert_eq!(agg.len(), 2);
    }

    #[test]
    fn aggregate_ignores_upstreams_of_another_namespace_and_bad_addresses() {
        let r = report(&[
            ("bank/pay", &[("10.0.0.1:80", Ejected)]),
            ("nonamespace", &[("10.0.0.1:80", Ejected)]),
            (
                "shop/pay",
                &[("garbage", Ejected), ("[fd00::1]:80", Ejected)],
            ),
        ]);
        let agg = aggregate([("shop", &r)]);
        assert_eq!(agg.keys().collect::<Vec<_>>(), vec!["shop/pay"]);
        assert_eq!(
            agg["shop/pay"].ejected,
            BTreeSet::from(["[fd00::1]:80".parse().unwrap()])
        );
        assert!(aggregate([]).is_empty());
    }

    #[test]
    fn only_addresses_the_policy_still_has_count_as_ejected() {
        let h = UpstreamReport {
            sidecars: 2,
            ejected: BTreeSet::from([
                "10.0.0.1:80".parse().unwrap(),
                "[fd00::1]:80".parse().unwrap(),
            ]),
        };
        assert_eq!(
            h.ejected_among(["10.0.0.1:80", "10.0.0.2:80", "[fd00::1]:80"]),
            2
        );
        // 10.0.0.1 left the Service; a sidecar that has not reloaded still reports it.
        assert_eq!(h.ejected_among(["10.0.0.2:80", "[fd00::1]:80"]), 1);
        assert_eq!(h.ejected_among([]), 0);
    }

    #[test]
    fn only_rendered_policies_carry_sidecar_figures() {
        use crate::operator::render::{render_namespace, PolicyInput};
        let spec: crate::api::UpstreamPolicySpec = serde_json::from_value(json!({
            "upstream": {"service": "pay", "port": 80}, "listener": {"port": 18080},
        }))
        .unwrap();
        let inputs = [
            PolicyInput {
                name: "ok",
                created: None,
                spec: Ok(&spec),
                last_accepted: None,
            },
            PolicyInput {
                name: "broken",
                created: None,
                spec: Err("cannot be read".into()),
                last_accepted: None,
            },
        ];
        let r = render_namespace("shop", &inputs, &[], &[]).unwrap();
        let (mut ok, mut broken) = (r.outcomes["ok"].clone(), r.outcomes["broken"].clone());
        ok.sidecar_figures(3, 1);
        broken.sidecar_figures(3, 1);
        assert_eq!((ok.sidecars, ok.endpoints.ejected), (3, 1));
        assert_eq!((broken.sidecars, broken.endpoints.ejected), (0, 0));
        let t = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        );
        let status = crate::operator::render::desired_status(&ok, Some(1), None, None, &t);
        assert_eq!((status.sidecars, status.endpoints.ejected), (3, 1));
    }

    #[test]
    fn reports_tell_which_upstreams_changed() {
        let r = SidecarReports::default();
        assert!(r.latest().is_none(), "nothing known before the first round");
        let one = |n: u32, ej: &[&str]| UpstreamReport {
            sidecars: n,
            ejected: ej.iter().map(|a| a.parse().unwrap()).collect(),
        };
        let changed = r.set(BTreeMap::from([("shop/pay".to_string(), one(1, &[]))]));
        assert_eq!(changed, BTreeSet::from(["shop/pay".to_string()]));
        assert!(r
            .set(BTreeMap::from([("shop/pay".to_string(), one(1, &[]))]))
            .is_empty());
        let changed = r.set(BTreeMap::from([
            ("shop/pay".to_string(), one(1, &["10.0.0.1:80"])),
            ("shop/db".to_string(), one(2, &[])),
        ]));
        assert_eq!(changed.len(), 2);
        // Gone from every report: changed too (its status must drop to 0 sidecars).
        let changed = r.set(BTreeMap::from([("shop/db".to_string(), one(2, &[]))]));
        assert_eq!(changed, BTreeSet::from(["shop/pay".to_string()]));
        assert_eq!(r.latest().unwrap()["shop/db"].sidecars, 2);
    }

    #[tokio::test]
    async fn scraping_a_closed_port_or_a_non_sidecar_fails_with_a_reason() {
        // Bound then dropped: nothing listens there.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = scrape(closed, SCRAPE_TIMEOUT).await.unwrap_err();
        assert!(matches!(err, ScrapeError::Connect(_)), "{err}");

        // Accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let err = scrape(addr, Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(err, ScrapeError::Timeout(_)), "{err}");
        drop(silent);

        // Answers HTTP, but not a report.
        let not_a_sidecar = crate::demo::pod::SimPod::start("web").await.unwrap();
        let err = scrape(not_a_sidecar.addr(), SCRAPE_TIMEOUT)
            .await
            .unwrap_err();
        assert!(matches!(err, ScrapeError::Decode(_)), "{err}");
    }
}
