//! The running sidecar: listeners, the upstreams behind them, health-check tasks, and the apply
//! step that swaps in a new config without dropping requests or forgetting endpoint state.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwap;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{watch, Mutex, Notify},
    task::JoinHandle,
    time::Instant,
};

use super::{
    body::RespBody,
    endpoint::{Endpoint, EndpointSnapshot},
    health_check, labels,
    metrics::{Metrics, UpstreamMetrics},
    proxy,
    source::SourceStatus,
    upstream::UpstreamRt,
    workers::{self, Workers},
    Error,
};
use crate::{
    admin_server,
    config::{Config, FieldErrors, HealthCheck, Upstream},
};

/// How the sidecar runs (as opposed to what it proxies, which is the `Config`).
#[derive(Clone, Debug)]
pub struct Options {
    /// Admin server address (`/metrics`, `/live`, `/ready`, `/config`, `/endpoints`).
    pub admin: SocketAddr,
    /// Longest wait for in-flight requests on shutdown.
    pub drain_timeout: Duration,
    /// This pod's labels: only upstreams whose `workloadSelector` matches are served.
    pub pod_labels: Option<BTreeMap<String, String>>,
    /// Worker threads serving traffic, each with its own single-threaded runtime, accept socket
    /// and connection pools. 0 serves traffic on the runtime that started the sidecar.
    pub workers: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            drain_timeout: Duration::from_secs(30),
            pod_labels: None,
            workers: 0,
        }
    }
}

/// `--threads`: a whole number of at least 1. (`Options::workers` 0, for programs that embed
/// the sidecar, serves on their runtime; the command line always has worker threads.)
pub(super) fn parse_threads(arg: &str) -> Result<usize, String> {
    match arg.parse::<usize>() {
        Ok(0) => Err("at least 1 worker thread is needed".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

pub(super) struct Shared {
    pub metrics: Arc<Metrics>,
    opts: Options,
    state: Mutex<State>,
    /// What `/config` shows; replaced after each apply.
    pub view: ArcSwap<View>,
    pub ready: AtomicBool,
    stop_accepting: watch::Sender<bool>,
    conns: ConnTracker,
    workers: parking_lot::Mutex<Option<Workers>>,
    n_workers: usize,
    /// Where configs come from and what is wrong with it (`/ready`'s detail).
    pub source: parking_lot::Mutex<SourceStatus>,
}

struct State {
    listeners: HashMap<String, ListenerRt>,
}

/// One local listener and the upstream currently behind it.
struct ListenerRt {
    addr: SocketAddr,
    slot: Arc<ArcSwap<UpstreamRt>>,
    stop: watch::Sender<bool>,
    /// Health-check task per endpoint, with the endpoint it updates.
    checkers: HashMap<SocketAddr, (Arc<Endpoint>, JoinHandle<()>)>,
    health_check: HealthCheck,
}

/// The running config and live endpoint state, as `/config` serves it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct View {
    pub hash: String,
    pub config: Config,
    #[serde(skip)]
    pub upstreams: Vec<(String, SocketAddr, Arc<ArcSwap<UpstreamRt>>)>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamView {
    pub name: String,
    pub listen: SocketAddr,
    pub endpoints: Vec<EndpointSnapshot>,
}

/// Counts open client connections so shutdown can wait for them.
#[derive(Default)]
struct ConnTracker {
    open: AtomicUsize,
    idle: Notify,
}

// === impl Shared ===

impl Shared {
    /// The sidecar's state with no upstreams, not ready; starts the worker threads (if any) and
    /// the idle-connection reaper.
    pub(super) fn new(opts: Options) -> Result<Arc<Shared>, Error> {
        let metrics = Metrics::new();
        let workers = match opts.workers {
            0 => None,
            n => Some(Workers::start(n).map_err(Error::Io)?),
        };
        let empty = Config::empty();
        let source = parking_lot::Mutex::new(SourceStatus::new(metrics.registry()));
        let shared = Arc::new(Shared {
            source,
            n_workers: opts.workers,
            workers: parking_lot::Mutex::new(workers),
            metrics,
            opts,
            state: Mutex::new(State {
                listeners: HashMap::new(),
            }),
            view: ArcSwap::from_pointee(View {
                hash: empty.hash(),
                config: empty,
                upstreams: Vec::new(),
            }),
            ready: AtomicBool::new(false),
            stop_accepting: watch::channel(false).0,
            conns: ConnTracker::default(),
        });
        tokio::spawn(reap_idle_connections(Arc::downgrade(&shared)));
        Ok(shared)
    }

    /// Stops accepting, lets in-flight requests finish (up to `drain`), then ends the worker
    /// threads and whatever they still run.
    pub(super) async fn drain(&self, drain: Duration) {
        self.ready.store(false, Ordering::Relaxed);
        let _ = self.stop_accepting.send(true);
        let mut state = self.state.lock().await;
        for (_, l) in state.listeners.drain() {
            let _ = l.stop.send(true);
            for (_, (_, t)) in l.checkers {
                t.abort();
            }
        }
        drop(state);
        let deadline = Instant::now() + drain;
        loop {
            let notified = self.conns.idle.notified();
            if self.conns.open.load(Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(
                    open = self.conns.open.load(Ordering::SeqCst),
                    "drain timeout: closing remaining connections"
                );
                break;
            }
        }
        self.workers.lock().take();
    }

    pub fn metrics_text(&self) -> String {
        let now = Instant::now();
        for (_, _, slot) in self.view.load().upstreams.iter() {
            let up = slot.load();
            up.metrics.set_endpoint_counts(up.endpoint_counts(now));
        }
        self.metrics.encode()
    }

    pub fn upstream_views(&self) -> Vec<UpstreamView> {
        let now = Instant::now();
        self.view
            .load()
            .upstreams
            .iter()
            .map(|(name, addr, slot)| UpstreamView {
                name: name.clone(),
                listen: *addr,
                endpoints: slot.load().snapshot(now),
            })
            .collect()
    }

    /// [`apply`](Self::apply), counted in `detour_config_reloads_total`; the first success makes
    /// the sidecar ready.
    pub(super) async fn apply_counted(self: &Arc<Self>, config: Config) -> Result<(), Error> {
        let res = self.apply(config).await;
        match &res {
            Ok(()) => {
                self.metrics.reloads_success.inc();
                self.source.lock().applied();
                self.ready.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                self.metrics.reloads_failure.inc();
                tracing::error!(error = %e, "config rejected; the running config stays in place");
            }
        }
        res
    }

    /// Validates `config`, then: selects this pod's upstreams, binds the new listeners (if one
    /// fails, nothing changes), swaps each listener's upstream (endpoints that stay keep their
    /// state), stops the listeners that left, publishes the view, and retires dropped endpoints.
    async fn apply(self: &Arc<Self>, config: Config) -> Result<(), Error> {
        config.validate().map_err(Error::Invalid)?;
        let mut state = self.state.lock().await;
        let selected =
            select_upstreams(&config, self.opts.pod_labels.as_ref()).map_err(Error::Invalid)?;
        let mut bound = self.bind_new_listeners(&state, &selected)?;
        // Past this point nothing may fail.
        let names_after: Vec<&str> = selected.iter().map(|(_, u)| u.name.as_str()).collect();
        let prev_by_name = state.upstreams_by_name();
        let mut keep = Vec::new();
        // (before, after) of each upstream that stays, to retire the endpoints it dropped.
        let mut replaced: Vec<(Arc<UpstreamRt>, Arc<UpstreamRt>)> = Vec::new();
        for (_, u) in &selected {
            let key = listen_key(u);
            let prev = prev_by_name.get(&u.name);
            let next = self.build_upstream(u, prev);
            if let Some(p) = prev {
                replaced.push((p.clone(), next.clone()));
            }
            match state.listeners.get_mut(&key) {
                Some(listener) => self.swap(listener, next, &names_after),
                None => {
                    let (addr, sockets) = bound.remove(&key).expect("bound above");
                    let listener = self.start_listener(u, next, addr, sockets);
                    state.listeners.insert(key.clone(), listener);
                }
            }
            keep.push(key);
        }
        state.remove_listeners_except(&keep, &names_after);
        self.publish(config, &state, &keep);
        for (before, after) in &replaced {
            after.retire_dropped(before);
        }
        Ok(())
    }

    /// Binds the listener of every selected upstream that has none yet.
    fn bind_new_listeners(
        &self,
        state: &State,
        selected: &[(usize, &Upstream)],
    ) -> Result<HashMap<String, (SocketAddr, Vec<std::net::TcpListener>)>, Error> {
        let mut bound = HashMap::new();
        for (i, u) in selected {
            let key = listen_key(u);
            if state.listeners.contains_key(&key) || bound.contains_key(&key) {
                continue;
            }
            let sockets = workers::bind_reuseport(u.listen_addr(), self.n_workers.max(1)).map_err(
                |source| Error::Bind {
                    what: format!("upstreams[{i}].listen"),
                    addr: u.listen.clone(),
                    source,
                },
            )?;
            // Read here, not once serving: past binding nothing may fail.
            let addr = sockets[0].local_addr().map_err(Error::Io)?;
            bound.insert(key, (addr, sockets));
        }
        Ok(bound)
    }

    /// The upstream's runtime for `u`: endpoint state and metrics follow the upstream's name
    /// (`prev`), wherever it listens now.
    fn build_upstream(&self, u: &Upstream, prev: Option<&Arc<UpstreamRt>>) -> Arc<UpstreamRt> {
        let metrics = match prev {
            Some(p) => p.metrics.clone(),
            None => Arc::new(UpstreamMetrics::new(&self.metrics, &u.name)),
        };
        Arc::new(UpstreamRt::build(
            u,
            prev.map(|p| &**p),
            metrics,
            self.n_workers,
        ))
    }

    /// Puts `next` behind a running listener; requests in flight keep the upstream they began
    /// with.
    fn swap(&self, listener: &mut ListenerRt, next: Arc<UpstreamRt>, names_after: &[&str]) {
        let before = listener.slot.load_full();
        if before.name != next.name && !names_after.contains(&before.name.as_str()) {
            // Renamed: the old name's series go.
            before.metrics.remove();
        }
        self.restart_checkers(listener, &next);
        listener.slot.store(next);
    }

    /// Serves `up` on freshly bound `sockets`: one accept loop per worker.
    fn start_listener(
        self: &Arc<Self>,
        u: &Upstream,
        up: Arc<UpstreamRt>,
        addr: SocketAddr,
        sockets: Vec<std::net::TcpListener>,
    ) -> ListenerRt {
        let slot = Arc::new(ArcSwap::new(up.clone()));
        let (stop, stop_rx) = watch::channel(false);
        let workers = self.workers.lock();
        for (i, socket) in sockets.into_iter().enumerate() {
            let (slot, stop_rx, shared) = (slot.clone(), stop_rx.clone(), self.clone());
            let run = move || accept_loop(socket, slot, stop_rx, shared);
            match workers.as_ref() {
                Some(w) => w.spawn_on(i % w.len(), run),
                None => {
                    tokio::spawn(run());
                }
            }
        }
        drop(workers);
        let mut listener = ListenerRt {
            addr,
            slot,
            stop,
            checkers: HashMap::new(),
            health_check: u.policy.health_check.clone(),
        };
        self.restart_checkers(&mut listener, &up);
        tracing::info!(upstream = %u.name, listen = %addr, endpoints = u.endpoints.len(), "listening");
        listener
    }

    /// What `/config`, the listener lookups and `detour_config_info` show from now on.
    fn publish(&self, config: Config, state: &State, keep: &[String]) {
        let upstreams = keep
            .iter()
            .map(|k| {
                let l = &state.listeners[k];
                (l.slot.load().name.clone(), l.addr, l.slot.clone())
            })
            .collect();
        let hash = config.hash();
        self.metrics.set_config_hash(&hash);
        tracing::info!(hash = %hash, upstreams = keep.len(), "config applied");
        self.view.store(Arc::new(View {
            hash,
            config,
            upstreams,
        }));
    }

    /// Keeps the checks of endpoints that stay (same settings), stops those of removed endpoints,
    /// starts checks for new ones at once.
    fn restart_checkers(&self, l: &mut ListenerRt, up: &Arc<UpstreamRt>) {
        let hc = &up.policy.health_check;
        if *hc != l.health_check {
            for (_, (_, t)) in l.checkers.drain() {
                t.abort();
            }
            l.health_check = hc.clone();
        }
        l.checkers.retain(|addr, (checked, t)| {
            // Same address but a new Endpoint (another pod took the IP): check the new one.
            let stays = up
                .endpoints
                .iter()
                .any(|e| e.addr == *addr && Arc::ptr_eq(e, checked));
            if !stays {
                t.abort();
            }
            stays
        });
        for ep in &up.endpoints {
            if l.checkers.contains_key(&ep.addr) {
                continue;
            }
            if let Some(t) =
                health_check::spawn(up.name.clone(), ep.clone(), hc.clone(), up.metrics.clone())
            {
                l.checkers.insert(ep.addr, (ep.clone(), t));
            }
        }
    }
}

// === impl State ===

impl State {
    /// The running upstreams by name.
    fn upstreams_by_name(&self) -> HashMap<String, Arc<UpstreamRt>> {
        self.listeners
            .values()
            .map(|l| {
                let up = l.slot.load_full();
                (up.name.clone(), up)
            })
            .collect()
    }

    /// Listeners not in `keep` stop accepting; their open connections finish. The series of an
    /// upstream not in `names_after` go.
    fn remove_listeners_except(&mut self, keep: &[String], names_after: &[&str]) {
        let gone: Vec<String> = self
            .listeners
            .keys()
            .filter(|k| !keep.contains(k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(l) = self.listeners.remove(&key) {
                let _ = l.stop.send(true);
                for (_, (_, t)) in l.checkers {
                    t.abort();
                }
                let up = l.slot.load();
                if !names_after.contains(&up.name.as_str()) {
                    up.metrics.remove();
                }
                tracing::info!(upstream = %up.name, listen = %l.addr, "listener removed");
            }
        }
    }
}

/// The upstreams this pod serves (by `workloadSelector`; all of them without pod labels), with
/// their index in the document. Disjoint workloads may share a listen address; without its
/// pod's labels a sidecar cannot tell which of them it serves, so that is refused.
fn select_upstreams<'c>(
    config: &'c Config,
    pod_labels: Option<&BTreeMap<String, String>>,
) -> Result<Vec<(usize, &'c Upstream)>, FieldErrors> {
    let selected: Vec<(usize, &Upstream)> = config
        .upstreams
        .iter()
        .enumerate()
        .filter(|(_, u)| match (pod_labels, &u.workload_selector) {
            (Some(pod), Some(sel)) => labels::matches(sel, pod),
            _ => true,
        })
        .collect();
    let mut conflicts = FieldErrors::default();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    for (i, u) in &selected {
        if let Some(j) = by_key.insert(listen_key(u), *i) {
            conflicts.push(
                format!("upstreams[{i}].listen"),
                format!(
                    "{} is also the address of upstreams[{j}] ({:?}); they are told apart by their workloadSelectors, so start the sidecar with --pod-labels",
                    u.listen, config.upstreams[j].name
                ),
            );
        }
    }
    if conflicts.is_empty() {
        Ok(selected)
    } else {
        Err(conflicts)
    }
}

/// Closes idle upstream connections after `poolIdle` even when no request comes to reuse them.
async fn reap_idle_connections(shared: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if *shared.stop_accepting.borrow() {
            return;
        }
        for (_, _, slot) in shared.view.load().upstreams.iter() {
            for ep in slot.load().endpoints.iter() {
                ep.purge_idle_connections();
            }
        }
    }
}

/// Listeners are identified by address, so renaming an upstream keeps its socket; port-0
/// listeners (tests) are per upstream.
fn listen_key(u: &Upstream) -> String {
    let addr = u.listen_addr();
    if addr.port() == 0 {
        format!("{}@{}", u.name, u.listen)
    } else {
        addr.to_string()
    }
}

async fn accept_loop(
    socket: std::net::TcpListener,
    slot: Arc<ArcSwap<UpstreamRt>>,
    mut stop: watch::Receiver<bool>,
    shared: Arc<Shared>,
) {
    // Registered with the runtime of the thread that serves it.
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve a listener");
            return;
        }
    };
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(admin_server::ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        // Counted before the task starts, so a shutdown right now still waits for it.
        shared.conns.open.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(serve_conn(
            stream,
            peer,
            slot.clone(),
            stop.clone(),
            shared.clone(),
        ));
    }
}

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    slot: Arc<ArcSwap<UpstreamRt>>,
    listener_stop: watch::Receiver<bool>,
    shared: Arc<Shared>,
) {
    let _ = stream.set_nodelay(true);
    let client = Arc::new(proxy::Client::new(peer));
    let activity = Arc::new(Activity::default());
    let seen = activity.clone();
    let svc = service_fn(move |req| {
        // Each request uses the upstream as configured when it arrived, to its end.
        let up = slot.load_full();
        let client = client.clone();
        let busy = Busy::start(&activity);
        async move {
            let resp = proxy::handle(req, up, &client).await;
            Ok::<_, Infallible>(resp.map(|body| TrackedBody { body, _busy: busy }))
        }
    });
    // No hyper timer: its header read timeout arms and drops a timer on every request. The
    // idle check below does that job with one timer per connection.
    // writev(false): a small response is copied into one buffer and written with one plain
    // write, cheaper than queueing its body as a second buffer for writev.
    let conn = http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(None)
        .writev(false)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let stop = shared.stop_accepting.subscribe();
    // Shutdown, or this listener left the config: finish the request in flight, close. The idle
    // check keeps running after that, so a client that stalls halfway through a request head is
    // not waited for without end.
    let stopping = *stop.borrow() || *listener_stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    let probes = (stop.clone(), listener_stop.clone());
    let (mut stop, mut listener_stop) = (stop, listener_stop);
    let either = std::pin::pin!(async move {
        tokio::select! {
            _ = stop.changed() => {}
            _ = listener_stop.changed() => {}
        }
    });
    let mut stop = StopCheck {
        either,
        probes,
        armed: false,
        stopping,
    };
    let mut idle = IdleCheck {
        timer: std::pin::pin!(tokio::time::sleep(CLIENT_IDLE_CHECK)),
        armed: false,
        last_started: 0,
        idle_for: Duration::ZERO,
    };
    // Ends when the connection does, or when it has been idle for `CLIENT_IDLE`: nothing is in
    // flight then, and dropping the connection closes it.
    std::future::poll_fn(|cx| {
        if stop.poll_stop(cx) {
            conn.as_mut().graceful_shutdown();
        }
        if idle.poll_expired(cx, &seen) {
            return std::task::Poll::Ready(());
        }
        conn.as_mut().poll(cx).map(|_| ())
    })
    .await;
    if shared.conns.open.fetch_sub(1, Ordering::SeqCst) == 1 {
        shared.conns.idle.notify_waiters();
    }
}

/// Tells a client connection when to stop taking requests: on shutdown, or when its listener
/// left the config.
struct StopCheck<'a, F> {
    /// Either watch changed.
    either: Pin<&'a mut F>,
    /// The same two watches, to ask whether `either` needs polling.
    probes: (watch::Receiver<bool>, watch::Receiver<bool>),
    armed: bool,
    stopping: bool,
}

impl<F: Future<Output = ()>> StopCheck<'_, F> {
    /// True once, when the connection must stop. Polling a watch's `changed()` takes the
    /// channel's lock, shared by every connection on every worker; once it has registered this
    /// task's waker, the version check of `has_changed` (an atomic load) says whether it needs
    /// polling again.
    fn poll_stop(&mut self, cx: &mut Context<'_>) -> bool {
        let (stop, listener_stop) = &self.probes;
        if self.stopping
            || (self.armed
                && !stop.has_changed().unwrap_or(true)
                && !listener_stop.has_changed().unwrap_or(true))
        {
            return false;
        }
        self.armed = true;
        if self.either.as_mut().poll(cx).is_ready() {
            self.stopping = true;
            return true;
        }
        false
    }
}

/// Notices a client connection on which no request started and none was in flight for
/// `CLIENT_IDLE`, with one timer per connection.
struct IdleCheck<'a> {
    timer: Pin<&'a mut tokio::time::Sleep>,
    armed: bool,
    /// `Activity::started` at the last check.
    last_started: u64,
    idle_for: Duration,
}

impl IdleCheck<'_> {
    /// Whether the connection has been idle for `CLIENT_IDLE`. The timer is polled to register
    /// this task's waker, and again only once it has fired (an atomic load): re-registering on
    /// every wake-up of a busy connection is costly. Polled outside tokio's cooperative budget:
    /// with the budget used up, a poll returns Pending without registering, and the timer would
    /// never be polled again.
    fn poll_expired(&mut self, cx: &mut Context<'_>, activity: &Activity) -> bool {
        if self.armed && !self.timer.is_elapsed() {
            return false;
        }
        self.armed = true;
        if poll_unbudgeted(self.timer.as_mut(), cx).is_pending() {
            return false;
        }
        let started = activity.started.load(Ordering::Relaxed);
        if started != self.last_started || activity.busy.load(Ordering::Relaxed) > 0 {
            self.idle_for = Duration::ZERO;
        } else {
            self.idle_for += CLIENT_IDLE_CHECK;
        }
        self.last_started = started;
        if self.idle_for >= CLIENT_IDLE {
            return true;
        }
        // From now, not from the old deadline: a late poll must not leave it unarmed.
        self.timer
            .as_mut()
            .reset(tokio::time::Instant::now() + CLIENT_IDLE_CHECK);
        let _ = poll_unbudgeted(self.timer.as_mut(), cx);
        false
    }
}

/// Polls a timer outside tokio's cooperative budget, so the poll always registers the waker.
fn poll_unbudgeted(timer: Pin<&mut tokio::time::Sleep>, cx: &mut Context<'_>) -> Poll<()> {
    let mut f = tokio::task::unconstrained(timer);
    Pin::new(&mut f).poll(cx)
}

/// A client connection on which no request started and none was in flight for this long is
/// closed, as hyper's default header read timeout (30 s) did. Checked every
/// `CLIENT_IDLE_CHECK`, so an idle connection goes after 30 to 40 s.
const CLIENT_IDLE: Duration = Duration::from_secs(30);
const CLIENT_IDLE_CHECK: Duration = Duration::from_secs(10);

/// What a client connection is doing, for the idle check. Touched only by the connection's
/// own task (no cross-thread traffic); atomics because the service must be `Send`.
#[derive(Default)]
struct Activity {
    /// Requests started so far.
    started: AtomicU64,
    /// Requests whose response is not fully sent yet.
    busy: AtomicUsize,
}

/// One request in progress, from its head to the end of its response body.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(a: &Arc<Activity>) -> Busy {
        a.started.fetch_add(1, Ordering::Relaxed);
        a.busy.fetch_add(1, Ordering::Relaxed);
        Busy(a.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as busy until it is sent or dropped.
    struct TrackedBody {
        #[pin]
        body: RespBody,
        _busy: Busy,
    }
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = super::h1::BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    use super::*;
    use crate::config::Policy;

    fn upstream(name: &str, listen: &str, app: Option<&str>) -> Upstream {
        Upstream {
            name: name.into(),
            listen: listen.into(),
            workload_selector: app.map(|app| LabelSelector {
                match_labels: Some([("app".to_string(), app.to_string())].into()),
                match_expressions: None,
            }),
            endpoints: Vec::new(),
            policy: Policy::default(),
        }
    }

    fn config(upstreams: Vec<Upstream>) -> Config {
        Config {
            upstreams,
            ..Config::empty()
        }
    }

    fn names(selected: &[(usize, &Upstream)]) -> Vec<(usize, String)> {
        selected.iter().map(|(i, u)| (*i, u.name.clone())).collect()
    }

    #[test]
    fn threads_are_a_whole_number_of_at_least_one() {
        assert_eq!(parse_threads("1"), Ok(1));
        assert_eq!(parse_threads("16"), Ok(16));
        assert!(parse_threads("0").unwrap_err().contains("at least 1"));
        assert!(parse_threads("-1").is_err());
        assert!(parse_threads("two").is_err());
    }

    #[test]
    fn a_pod_serves_the_upstreams_that_select_it_and_those_without_a_selector() {
        let cfg = config(vec![
            upstream("shop/web", "127.0.0.1:9001", Some("web")),
            upstream("shop/pay", "127.0.0.1:9001", Some("pay")),
            upstream("shop/all", "127.0.0.1:9002", None),
        ]);
        let pod = labels::parse_downward_labels("app=\"pay\"\n");
        let selected = select_upstreams(&cfg, Some(&pod)).unwrap();
        assert_eq!(
            names(&selected),
            vec![(1, "shop/pay".to_string()), (2, "shop/all".to_string())]
        );
    }

    #[test]
    fn without_pod_labels_upstreams_sharing_an_address_are_refused() {
        let cfg = config(vec![
            upstream("shop/web", "127.0.0.1:9001", Some("web")),
            upstream("shop/other", "127.0.0.1:9003", None),
            upstream("shop/pay", "127.0.0.1:9001", Some("pay")),
        ]);
        let err = select_upstreams(&cfg, None).unwrap_err().to_string();
        assert!(err.contains("upstreams[2].listen"), "{err}");
        assert!(err.contains("upstreams[0] (\"shop/web\")"), "{err}");
        assert!(err.contains("--pod-labels"), "{err}");
        // Port 0 (tests) is per upstream: never shared.
        let cfg = config(vec![
            upstream("a/a", "127.0.0.1:0", None),
            upstream("a/b", "127.0.0.1:0", None),
        ]);
        assert_eq!(select_upstreams(&cfg, None).unwrap().len(), 2);
    }
}
