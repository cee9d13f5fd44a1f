//! Where the sidecar's config comes from, and how each update reaches the running sidecar.
//!
//! One seam: a [`ConfigSource`] only *reports* what it holds ([`Update`]); `handle::follow` validates
//! and applies it through the same `apply` a file reload uses (endpoints that stay keep their
//! health, ejections and pooled connections). A new source (say, a push stream from the
//! operator) is one more arm of `ConfigSource::run`; the data plane does not change.
//!
//! Fail-static: whatever goes wrong with the source (the API server unreachable, the ConfigMap
//! deleted, an invalid document), the last good config keeps serving; the problem shows in a log
//! line at each transition, in `detour_config_source_connected`, `detour_config_stale`,
//! `detour_config_applied_timestamp_seconds` and in `/ready`'s detail, and clears by itself.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    runtime::{utils::Backoff, watcher, WatchStreamExt},
    Api, Client,
};
use prometheus::{Gauge, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::sync::mpsc;

use crate::config::CONFIG_KEY;

/// Where the sidecar's config comes from.
pub enum ConfigSource {
    /// A file, re-read every `interval` and on SIGHUP; a change is noticed by content, which
    /// also catches the symlink swap of a mounted ConfigMap.
    File { path: PathBuf, interval: Duration },
    /// The ConfigMap `name` of `namespace`, watched through the API with a field selector on its
    /// name (all that a Role with `resourceNames` can grant a list/watch).
    Kubernetes {
        client: Client,
        namespace: String,
        name: String,
    },
}

/// What a source reports. Sources report changes only (the same document twice is sent once).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// A document to validate and apply.
    Document(String),
    /// The source holds something that is not a document (bytes not UTF-8, no `config.yaml`).
    Unusable(String),
    /// The source holds nothing (file unreadable, ConfigMap absent or deleted).
    Missing(String),
    /// The source cannot be reached; it keeps trying by itself.
    Disconnected(String),
    /// The source is reachable (again).
    Connected,
}

impl ConfigSource {
    /// `file` or `kubernetes`: the `source` label of `detour_config_source_connected`.
    pub fn kind(&self) -> &'static str {
        match self {
            ConfigSource::File { .. } => "file",
            ConfigSource::Kubernetes { .. } => "kubernetes",
        }
    }

    /// Where, for logs and `/ready`: `file /etc/detour/config.yaml`, `configmap ns/detour-config`.
    pub fn describe(&self) -> String {
        match self {
            ConfigSource::File { path, .. } => format!("file {}", path.display()),
            ConfigSource::Kubernetes {
                namespace, name, ..
            } => format!("configmap {namespace}/{name}"),
        }
    }

    /// Reports updates until `tx` closes.
    pub(super) async fn run(self, tx: mpsc::Sender<Update>) {
        let _ = match self {
            ConfigSource::File { path, interval } => watch_file(path, interval, tx).await,
            ConfigSource::Kubernetes {
                client,
                namespace,
                name,
            } => watch_config_map(client, namespace, name, tx).await,
        };
    }
}

// === sources ===

async fn watch_file(path: PathBuf, interval: Duration, tx: mpsc::Sender<Update>) -> Sent {
    let mut hup =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map_err(|e| {
            tracing::warn!(error = %e, "SIGHUP not available; the config file is still polled");
        });
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reports = Reports::new(tx);
    loop {
        match &mut hup {
            Ok(hup) => tokio::select! {
                _ = tick.tick() => {}
                _ = hup.recv() => {}
            },
            Err(()) => {
                tick.tick().await;
            }
        }
        let update = match tokio::fs::read(&path).await {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => Update::Document(text),
                Err(e) => Update::Unusable(format!("{} is not UTF-8: {e}", path.display())),
            },
            Err(e) => Update::Missing(format!("{} cannot be read: {e}", path.display())),
        };
        reports.content(update).await?;
    }
}

async fn watch_config_map(
    client: Client,
    namespace: String,
    name: String,
    tx: mpsc::Sender<Update>,
) -> Sent {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api.clone(), config)
        .backoff(Retry::default())
        .boxed();
    let mut reports = Reports::new(tx);
    let mut seen_in_list = false;
    let what = format!("configmap {namespace}/{name}");
    // A watch that resumed yields nothing until something changes: while disconnected, a
    // cheap read tells when the API server answers again.
    let mut probe = tokio::time::interval(Duration::from_secs(1));
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            e = events.next() => match e {
                Some(e) => e,
                None => return Ok(()),
            },
            _ = probe.tick(), if reports.connected == Some(false) => {
                if api.get_metadata_opt(&name).await.is_ok() {
                    reports.link(Link::Up).await?;
                }
                continue;
            }
        };
        let (link, update) = read_event(event, &what, &mut seen_in_list);
        reports.link(link).await?;
        if let Some(update) = update {
            reports.content(update).await?;
        }
    }
}

/// What a watch event says of the API server (`link`) and of the ConfigMap (an update, or
/// nothing new). `seen_in_list` is whether the current list showed the ConfigMap.
fn read_event(
    event: Result<watcher::Event<ConfigMap>, watcher::Error>,
    what: &str,
    seen_in_list: &mut bool,
) -> (Link, Option<Update>) {
    let event = match event {
        Ok(event) => event,
        // The watch outlived the history the server keeps: the watcher lists again. The
        // server answered, so this is not a lost connection.
        Err(watcher::Error::WatchError(s)) if s.code == 410 => return (Link::Same, None),
        // The server answered but may not let us read it: the operator grants access with
        // the namespace's first policy. Nothing to serve yet, and the API is there.
        Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) if s.code == 403 => {
            let why = format!(
                "{what} cannot be read ({}): no UpstreamPolicy in this namespace yet?",
                s.message
            );
            return (Link::Up, Some(Update::Missing(why)));
        }
        Err(e) => return (Link::Down(e.to_string()), None),
    };
    let update = match event {
        watcher::Event::Init => {
            *seen_in_list = false;
            None
        }
        watcher::Event::InitApply(cm) | watcher::Event::Apply(cm) => {
            *seen_in_list = true;
            Some(document_of(what, cm))
        }
        watcher::Event::InitDone if !*seen_in_list => {
            Some(Update::Missing(format!("{what} does not exist")))
        }
        watcher::Event::InitDone => None,
        watcher::Event::Delete(_) => Some(Update::Missing(format!("{what} was deleted"))),
    };
    (Link::Up, update)
}

fn document_of(what: &str, cm: ConfigMap) -> Update {
    match cm.data.and_then(|mut d| d.remove(CONFIG_KEY)) {
        Some(text) => Update::Document(text),
        None => Update::Unusable(format!("{what} has no key {CONFIG_KEY}")),
    }
}

/// What an event says of the source's connection.
#[derive(Debug, PartialEq, Eq)]
enum Link {
    Up,
    Down(String),
    /// Nothing either way.
    Same,
}

/// The follower is gone: the source stops.
struct Closed;

/// `Ok` when the source ended by itself, `Err` when nobody listens any more.
type Sent = Result<(), Closed>;

/// A source's side of the channel: a change of connection is reported once, and content only
/// when it differs from the last reported.
struct Reports {
    tx: mpsc::Sender<Update>,
    /// Unknown until the first event.
    connected: Option<bool>,
    last: Option<Update>,
}

impl Reports {
    fn new(tx: mpsc::Sender<Update>) -> Self {
        Reports {
            tx,
            connected: None,
            last: None,
        }
    }

    async fn link(&mut self, link: Link) -> Sent {
        let (up, update) = match link {
            Link::Same => return Ok(()),
            Link::Up => (true, Update::Connected),
            Link::Down(why) => (false, Update::Disconnected(why)),
        };
        if self.connected == Some(up) {
            return Ok(());
        }
        self.connected = Some(up);
        self.tx.send(update).await.map_err(|_| Closed)
    }

    async fn content(&mut self, update: Update) -> Sent {
        if self.last.as_ref() == Some(&update) {
            return Ok(());
        }
        self.last = Some(update.clone());
        self.tx.send(update).await.map_err(|_| Closed)
    }
}

/// Reconnect backoff of the API watch: 250 ms doubling to 5 s, ±20 % jitter so that the
/// sidecars of a cluster do not all come back in the same instant. Reset after each event.
struct Retry {
    next: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            next: Duration::from_millis(250),
        }
    }
}

impl Iterator for Retry {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        Some(now.mul_f64(rand::random_range(0.8..1.2)))
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        *self = Retry::default();
    }
}

// === the sidecar's side ===

/// What the sidecar knows of its config source: `/ready`'s detail and the source metrics.
pub(super) struct SourceStatus {
    /// `file`, `kubernetes`, or `api` when configs are only applied by the embedding program.
    kind: &'static str,
    origin: String,
    connected: bool,
    /// Why the running config may not be what the source holds now.
    problem: Option<String>,
    applied_at: Option<SystemTime>,
    metrics: SourceMetrics,
}

struct SourceMetrics {
    connected: IntGaugeVec,
    stale: IntGauge,
    applied: Gauge,
}

impl SourceStatus {
    pub(super) fn new(registry: &Registry) -> Self {
        let connected = IntGaugeVec::new(
            Opts::new(
                "detour_config_source_connected",
                "1 while the config source answers (the API server for --config-source kubernetes; always 1 for a file), else 0. The last good config keeps serving meanwhile.",
            ),
            &["source"],
        )
        .expect("metric");
        let stale = IntGauge::new(
            "detour_config_stale",
            "1 while the running config may not be what the source holds (source unreachable, config deleted or invalid): the last good config is serving.",
        )
        .expect("metric");
        let applied = Gauge::new(
            "detour_config_applied_timestamp_seconds",
            "Unix time the running config was applied (its age is time() minus this); 0 before the first.",
        )
        .expect("metric");
        for c in [
            Box::new(connected.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(stale.clone()),
            Box::new(applied.clone()),
        ] {
            registry.register(c).expect("register");
        }
        SourceStatus {
            kind: "api",
            origin: "the embedding program".into(),
            connected: true,
            problem: None,
            applied_at: None,
            metrics: SourceMetrics {
                connected,
                stale,
                applied,
            },
        }
    }

    pub(super) fn set_source(&mut self, kind: &'static str, origin: String) {
        self.kind = kind;
        self.origin = origin;
        // A file is always "connected"; the API is once it answered.
        self.set_connected(kind != "kubernetes");
    }

    fn set_connected(&mut self, up: bool) {
        self.connected = up;
        self.metrics
            .connected
            .with_label_values(&[self.kind])
            .set(i64::from(up));
        self.update_stale();
    }

    fn set_problem(&mut self, problem: Option<String>) {
        self.problem = problem;
        self.update_stale();
    }

    /// The source cannot be reached; `hash` is the config that keeps serving.
    pub(super) fn disconnected(&mut self, error: &str, hash: &str) {
        self.set_connected(false);
        tracing::warn!(source = %self.origin, %error, %hash,
            "config source unreachable: serving the last good config, retrying");
    }

    /// The source answers (again); logged only when it had not.
    pub(super) fn reconnected(&mut self) {
        if !self.connected {
            self.set_connected(true);
            tracing::info!(source = %self.origin, "config source reachable again");
        }
    }

    /// What the source holds cannot be applied (`what`, because of `err`).
    pub(super) fn refused(&mut self, err: &dyn std::error::Error, what: &str, hash: &str) {
        let why = format!("{} {what}: {err}", self.origin);
        self.problem(why, hash);
    }

    /// Why the running config (`hash`) may not be what the source holds; logged when it changes.
    pub(super) fn problem(&mut self, why: String, hash: &str) {
        if self.problem.as_deref() != Some(why.as_str()) {
            tracing::warn!(source = %self.origin, problem = %why, %hash,
                "the running config stays in place");
        }
        self.set_problem(Some(why));
    }

    /// The running config is what the source holds; logged when a problem ends.
    pub(super) fn resolved(&mut self) {
        if let Some(p) = self.problem.take() {
            tracing::info!(source = %self.origin, was = %p, "config source is fine again");
        }
        self.set_problem(None);
    }

    /// Stale while the source has a problem or cannot be reached.
    fn update_stale(&self) {
        self.metrics
            .stale
            .set(i64::from(self.problem.is_some() || !self.connected));
    }

    pub(super) fn applied(&mut self) {
        let now = SystemTime::now();
        self.applied_at = Some(now);
        self.metrics.applied.set(
            now.duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
    }

    /// `/ready`'s body: what runs, from where, since when, and what is wrong with the source.
    pub(super) fn detail(&self, ready: bool, hash: &str) -> String {
        let mut out = if ready {
            let age = self
                .applied_at
                .and_then(|t| t.elapsed().ok())
                .map_or_else(|| "?".into(), |d| format!("{}s", d.as_secs()));
            format!(
                "ready: config {hash} from {}, applied {age} ago\n",
                self.origin
            )
        } else {
            format!("not ready: no valid config yet from {}\n", self.origin)
        };
        if !self.connected {
            out.push_str("source: not connected (retrying)\n");
        }
        if let Some(p) = &self.problem {
            out.push_str(&format!("problem: {p}\n"));
            if ready {
                out.push_str("serving the last good config\n");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const WHAT: &str = "configmap shop/detour-config";

    fn cm(data: &[(&str, &str)]) -> ConfigMap {
        let data: BTreeMap<String, String> = data
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ConfigMap {
            data: Some(data),
            ..Default::default()
        }
    }

    fn status(code: u16) -> Box<kube::core::Status> {
        Box::new(
            serde_json::from_value(serde_json::json!({"code": code, "message": "said the server"}))
                .unwrap(),
        )
    }

    #[test]
    fn a_list_without_the_config_map_says_it_does_not_exist() {
        let mut seen = true;
        let read = |e, seen: &mut bool| read_event(Ok(e), WHAT, seen);
        assert_eq!(read(watcher::Event::Init, &mut seen), (Link::Up, None));
        assert!(!seen, "a new list starts");
        assert_eq!(
            read(watcher::Event::InitDone, &mut seen),
            (
                Link::Up,
                Some(Update::Missing(format!("{WHAT} does not exist")))
            )
        );
        // Listed: its document, and the end of the list adds nothing.
        let listed = read(
            watcher::Event::InitApply(cm(&[(CONFIG_KEY, "doc")])),
            &mut seen,
        );
        assert_eq!(listed, (Link::Up, Some(Update::Document("doc".into()))));
        assert_eq!(read(watcher::Event::InitDone, &mut seen), (Link::Up, None));
        assert_eq!(
            read(watcher::Event::Apply(cm(&[("other", "x")])), &mut seen),
            (
                Link::Up,
                Some(Update::Unusable(format!("{WHAT} has no key {CONFIG_KEY}")))
            )
        );
        assert_eq!(
            read(watcher::Event::Delete(cm(&[])), &mut seen),
            (
                Link::Up,
                Some(Update::Missing(format!("{WHAT} was deleted")))
            )
        );
    }

    #[test]
    fn errors_tell_a_lost_server_from_one_that_answered() {
        let mut seen = false;
        let gone = watcher::Error::WatchError(status(410));
        assert_eq!(read_event(Err(gone), WHAT, &mut seen), (Link::Same, None));
        let forbidden = watcher::Error::InitialListFailed(kube::Error::Api(status(403)));
        let (link, update) = read_event(Err(forbidden), WHAT, &mut seen);
        assert_eq!(link, Link::Up);
        assert!(
            matches!(&update, Some(Update::Missing(why)) if why.contains("said the server")),
            "{update:?}"
        );
        let lost = watcher::Error::WatchError(status(500));
        let (link, update) = read_event(Err(lost), WHAT, &mut seen);
        assert!(matches!(link, Link::Down(_)), "{link:?}");
        assert_eq!(update, None);
    }

    #[tokio::test]
    async fn reports_send_changes_only() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut reports = Reports::new(tx);
        for link in [
            Link::Up,
            Link::Up,
            Link::Same,
            Link::Down("x".into()),
            Link::Down("y".into()),
        ] {
            assert!(reports.link(link).await.is_ok());
        }
        for doc in ["a", "a", "b"] {
            assert!(reports.content(Update::Document(doc.into())).await.is_ok());
        }
        drop(reports);
        let mut got = Vec::new();
        while let Some(u) = rx.recv().await {
            got.push(u);
        }
        assert_eq!(
            got,
            vec![
                Update::Connected,
                Update::Disconnected("x".into()),
                Update::Document("a".into()),
                Update::Document("b".into()),
            ]
        );
        // Nobody listening: the source stops.
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        assert!(Reports::new(tx).content(Update::Connected).await.is_err());
    }
}
