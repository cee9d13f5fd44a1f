//! A simulated upstream pod: an HTTP/1.1 server on `127.0.0.1:0` whose misbehaviour can be
//! switched at run time ([`Fault`]). The demo puts three of them behind the sidecar, and the
//! sidecar's integration tests use one per fault class.
//!
//! Every request is counted and (the most recent ones) recorded with its method, headers and body
//! so tests can check what the sidecar forwarded: `Via`, `X-Forwarded-*`, hop-by-hop removal,
//! `Host`, how many times a POST arrived.
//!
//! Faults that act below HTTP (reset, malformed bytes, refusing connections) need the socket
//! itself, which hyper owns while it serves the connection; each connection therefore keeps a
//! second handle on the same socket (`dup`) to reset or write garbage on after hyper is dropped.

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
    time::Instant,
};

/// Path of the health check endpoint (the sidecar's default `healthCheck.path`).
pub const HEALTH_PATH: &str = "/healthz";

/// What the pod does with connections and requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answers 200 at once (echoing a request body, if any).
    Healthy,
    /// Answers every request with 502.
    Always502,
    /// Answers every request with 503.
    Always503,
    /// Answers every request with 504.
    Always504,
    /// Nothing listens: connections are refused and open ones are closed.
    Refuse,
    /// Reads the request and never answers it, even after the fault changes (like a stuck
    /// worker); its connection stays open until the pod is killed or `close_connections` is called.
    Hang,
    /// Reads the request, then resets the connection (RST, no response byte).
    ResetAfterRequest,
    /// Answers normally, but closes a keep-alive connection once it has been idle this long
    /// (a server keep-alive timeout, like Node.js' 5 s).
    CloseIdleAfter(Duration),
    /// Answers normally, except that a request arriving on a connection that was idle longer than
    /// this is read and then dropped with the connection: the deterministic form of a keep-alive
    /// race, as if the server's close had crossed the request on the wire.
    StaleKeepAlive(Duration),
    /// Answers bytes that are not HTTP, then closes.
    Malformed,
    /// Sends a 200 head announcing a 1000-byte body, then a few bytes of it, then closes.
    TruncatedBody,
    /// Answers normally after this delay.
    Slow(Duration),
    /// Healthy for `period`, then `bad` for `period`, and so on.
    Flapping { period: Duration, bad: Box<Fault> },
}

/// One request as the pod received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Order of arrival at this pod (1-based, health checks excluded).
    pub seq: u64,
    /// Which connection (1-based, in accept order) carried it.
    pub connection: u64,
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    /// The whole body length, even when `body` was cut.
    pub body_len: usize,
    /// The first [`RECORDED_BODY_LIMIT`] bytes of the body.
    pub body: Bytes,
}

/// Bytes of each request body kept in [`RecordedRequest::body`].
pub const RECORDED_BODY_LIMIT: usize = 64 * 1024;
/// Requests kept by [`SimPod::recorded`] (oldest dropped first).
pub const RECORDED_REQUESTS: usize = 1024;

/// A snapshot of what the pod has seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Requests other than health checks.
    pub requests: u64,
    /// `GET /healthz` requests.
    pub health_checks: u64,
    /// TCP connections accepted (health-check connections included).
    pub connections: u64,
    /// Connections open now.
    pub open_connections: usize,
    /// Requests (health checks excluded) by method.
    pub by_method: BTreeMap<String, u64>,
    /// Responses the pod sent (health checks excluded) by status.
    pub by_status: BTreeMap<u16, u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pod {pod}: binding {addr}: {source}")]
    Bind {
        pod: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("pod {pod}: listening on {addr}: {source}")]
    Listen {
        pod: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// A running simulated pod. Dropping it stops it.
pub struct SimPod {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    addr: SocketAddr,
    /// What was asked for (may be `Flapping`).
    wanted: Mutex<Fault>,
    /// What applies now (never `Flapping`); requests read it as they arrive.
    effective: watch::Sender<Fault>,
    /// Health checks follow `effective` unless this is set.
    health: Mutex<Option<Fault>>,
    upgrades: AtomicBool,
    killed: AtomicBool,
    listen: tokio::sync::Mutex<Listen>,
    /// Bumped to close every open connection.
    epoch: watch::Sender<u64>,
    flapper: Mutex<Option<JoinHandle<()>>>,
    stats: Stats,
}

enum Listen {
    Accepting {
        stop: oneshot::Sender<()>,
        task: JoinHandle<()>,
    },
    /// Bound but not listening: the port stays ours and the kernel refuses connections to it.
    Held(TcpSocket),
    Stopped,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    health_checks: AtomicU64,
    connections: AtomicU64,
    open: AtomicUsize,
    by_method: Mutex<BTreeMap<String, u64>>,
    by_status: Mutex<BTreeMap<u16, u64>>,
    recorded: Mutex<VecDeque<RecordedRequest>>,
}

/// What a request handler asks its connection task to do with the socket.
#[derive(Debug, PartialEq, Eq)]
enum ConnAction {
    Reset,
    Malformed,
    Truncated,
    Close,
}

/// Per-connection bookkeeping for the idle faults.
struct ConnState {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
    served: AtomicU64,
    /// Woken when a request finishes, to re-arm the idle timer.
    activity: tokio::sync::Notify,
    actions: mpsc::UnboundedSender<ConnAction>,
    id: u64,
}

type Body = Full<Bytes>;

// === impl SimPod ===

impl SimPod {
    /// Starts a healthy pod on an ephemeral port of 127.0.0.1.
    pub async fn start(name: impl Into<String>) -> Result<SimPod, Error> {
        let name = name.into();
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let socket = bind(&name, any)?;
        let addr = socket.local_addr().map_err(|source| Error::Bind {
            pod: name.clone(),
            addr: any,
            source,
        })?;
        let shared = Arc::new(Shared {
            name,
            addr,
            wanted: Mutex::new(Fault::Healthy),
            effective: watch::channel(Fault::Healthy).0,
            health: Mutex::new(None),
            upgrades: AtomicBool::new(true),
            killed: AtomicBool::new(false),
            listen: tokio::sync::Mutex::new(Listen::Held(socket)),
            epoch: watch::channel(0).0,
            flapper: Mutex::new(None),
            stats: Stats::default(),
        });
        shared.reconcile().await?;
        Ok(SimPod { shared })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The address the pod listens on (the same after `kill`/`revive`).
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Switches behaviour. Requests already being handled keep the fault they started with.
    pub async fn set_fault(&self, fault: Fault) -> Result<(), Error> {
        if let Some(f) = self.shared.flapper.lock().take() {
            f.abort();
        }
        *self.shared.wanted.lock() = fault.clone();
        match fault {
            Fault::Flapping { period, bad } => {
                let bad = flatten(*bad);
                self.shared.effective.send_replace(Fault::Healthy);
                self.shared.reconcile().await?;
                let shared = self.shared.clone();
                let task = tokio::spawn(async move {
                    let mut is_bad = false;
                    let mut next = Instant::now() + period;
                    loop {
                        tokio::time::sleep_until(next).await;
                        next += period;
                        is_bad = !is_bad;
                        let now = if is_bad { bad.clone() } else { Fault::Healthy };
                        shared.effective.send_replace(now);
                        if let Err(e) = shared.reconcile().await {
                            tracing::warn!(pod = %shared.name, error = %e, "flapping pod cannot listen");
                        }
                    }
                });
                *self.shared.flapper.lock() = Some(task);
            }
            other => {
                self.shared.effective.send_replace(other);
                self.shared.reconcile().await?;
            }
        }
        Ok(())
    }

    /// The fault last set (possibly `Flapping`).
    pub fn fault(&self) -> Fault {
        self.shared.wanted.lock().clone()
    }

    /// The fault in effect now (`Flapping` resolved to its current phase).
    pub fn effective_fault(&self) -> Fault {
        self.shared.effective.borrow().clone()
    }

    /// Makes `GET /healthz` behave as `fault` whatever the traffic fault is; `None` (the default)
    /// makes health checks follow the traffic fault.
    pub fn set_health_fault(&self, fault: Option<Fault>) {
        *self.shared.health.lock() = fault.map(flatten);
    }

    /// Whether `Upgrade` requests get `101 Switching Protocols` and an echo (default: yes).
    pub fn set_upgrades(&self, enabled: bool) {
        self.shared.upgrades.store(enabled, Ordering::Relaxed);
    }

    /// The process dies: the listener and every open connection close; the port stays reserved.
    pub async fn kill(&self) -> Result<(), Error> {
        self.shared.killed.store(true, Ordering::SeqCst);
        self.shared.reconcile().await
    }

    /// The process comes back on the same port with the fault it had.
    pub async fn revive(&self) -> Result<(), Error> {
        self.shared.killed.store(false, Ordering::SeqCst);
        self.shared.reconcile().await
    }

    pub fn is_killed(&self) -> bool {
        self.shared.killed.load(Ordering::SeqCst)
    }

    /// Closes every open connection (keep-alive ones included) without stopping to listen.
    pub fn close_connections(&self) {
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    pub fn counters(&self) -> Counters {
        let s = &self.shared.stats;
        Counters {
            requests: s.requests.load(Ordering::SeqCst),
            health_checks: s.health_checks.load(Ordering::SeqCst),
            connections: s.connections.load(Ordering::SeqCst),
            open_connections: s.open.load(Ordering::SeqCst),
            by_method: s.by_method.lock().clone(),
            by_status: s.by_status.lock().clone(),
        }
    }

    /// Requests seen, health checks excluded.
    pub fn requests(&self) -> u64 {
        self.shared.stats.requests.load(Ordering::SeqCst)
    }

    pub fn requests_by_method(&self, method: &str) -> u64 {
        let m = method.to_ascii_uppercase();
        self.shared
            .stats
            .by_method
            .lock()
            .get(&m)
            .copied()
            .unwrap_or(0)
    }

    pub fn health_checks(&self) -> u64 {
        self.shared.stats.health_checks.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> u64 {
        self.shared.stats.connections.load(Ordering::SeqCst)
    }

    pub fn open_connections(&self) -> usize {
        self.shared.stats.open.load(Ordering::SeqCst)
    }

    /// The most recent requests (health checks excluded), oldest first.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.shared.stats.recorded.lock().iter().cloned().collect()
    }

    /// The most recent request, if any.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.shared.stats.recorded.lock().back().cloned()
    }
}

impl Drop for SimPod {
    fn drop(&mut self) {
        if let Some(f) = self.shared.flapper.lock().take() {
            f.abort();
        }
        if let Ok(mut l) = self.shared.listen.try_lock() {
            if let Listen::Accepting { task, .. } = std::mem::replace(&mut *l, Listen::Stopped) {
                task.abort();
            }
        }
        self.shared.epoch.send_modify(|e| *e += 1);
    }
}

impl std::fmt::Debug for SimPod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimPod")
            .field("name", &self.shared.name)
            .field("addr", &self.shared.addr)
            .field("fault", &*self.shared.wanted.lock())
            .field("killed", &self.is_killed())
            .finish()
    }
}

/// `Flapping` inside `Flapping` would need two clocks; the inner one is read as its bad fault.
fn flatten(f: Fault) -> Fault {
    match f {
        Fault::Flapping { bad, .. } => flatten(*bad),
        other => other,
    }
}

fn bind(pod: &str, addr: SocketAddr) -> Result<TcpSocket, Error> {
    let err = |source| Error::Bind {
        pod: pod.to_string(),
        addr,
        source,
    };
    let socket = TcpSocket::new_v4().map_err(err)?;
    // Connections closed by `kill` sit in TIME_WAIT; `revive` must still get the port back.
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    Ok(socket)
}

// === impl Shared ===

impl Shared {
    /// Listens or stops listening so that the socket matches `killed` and the effective fault.
    async fn reconcile(self: &Arc<Self>) -> Result<(), Error> {
        let mut listen = self.listen.lock().await;
        let want = !self.killed.load(Ordering::SeqCst) && *self.effective.borrow() != Fault::Refuse;
        match (&*listen, want) {
            (Listen::Accepting { .. }, true) | (Listen::Held(_), false) | (Listen::Stopped, _) => {
                return Ok(())
            }
            _ => {}
        }
        match std::mem::replace(&mut *listen, Listen::Stopped) {
            Listen::Held(socket) => {
                let listener = socket.listen(1024).map_err(|source| Error::Listen {
                    pod: self.name.clone(),
                    addr: self.addr,
                    source,
                })?;
                let (stop, stop_rx) = oneshot::channel();
                let task = tokio::spawn(self.clone().accept_loop(listener, stop_rx));
                *listen = Listen::Accepting { stop, task };
            }
            Listen::Accepting { stop, task } => {
                let _ = stop.send(());
                // The listener must be closed before the port can be bound again.
                let _ = task.await;
                self.epoch.send_modify(|e| *e += 1);
                *listen = Listen::Held(bind(&self.name, self.addr)?);
            }
            Listen::Stopped => {}
        }
        Ok(())
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, mut stop: oneshot::Receiver<()>) {
        loop {
            tokio::select! {
                _ = &mut stop => return,
                res = listener.accept() => match res {
                    Ok((stream, _)) => {
                        let id = self.stats.connections.fetch_add(1, Ordering::SeqCst) + 1;
                        tokio::spawn(self.clone().serve(stream, id));
                    }
                    Err(e) => {
                        tracing::debug!(pod = %self.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
    }

    async fn serve(self: Arc<Self>, stream: TcpStream, id: u64) {
        self.stats.open.fetch_add(1, Ordering::SeqCst);
        struct Open<'a>(&'a AtomicUsize);
        impl Drop for Open<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _open = Open(&self.stats.open);
        let Some((io, ctl)) = split_handles(stream) else {
            return;
        };
        let (actions, actions_rx) = mpsc::unbounded_channel();
        let conn_state = Arc::new(ConnState {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            served: AtomicU64::new(0),
            activity: tokio::sync::Notify::new(),
            actions,
            id,
        });
        let svc = {
            let shared = self.clone();
            let conn_state = conn_state.clone();
            service_fn(move |req| {
                let shared = shared.clone();
                let conn_state = conn_state.clone();
                async move { Ok::<_, Infallible>(shared.handle(req, conn_state).await) }
            })
        };
        let mut conn = Box::pin(
            http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades(),
        );
        let Some(action) = self
            .next_socket_action(conn.as_mut(), &conn_state, actions_rx)
            .await
        else {
            return;
        };
        // hyper's handle goes first so that closing `ctl` is the socket's last close.
        drop(conn);
        self.act_on_socket(ctl, action).await;
    }

    /// Waits while hyper serves the connection: `None` when hyper is done with it, or what to do
    /// with the socket (a handler's fault, every connection closed, the idle timeout of
    /// `CloseIdleAfter`).
    async fn next_socket_action(
        &self,
        mut conn: std::pin::Pin<&mut (impl std::future::Future + ?Sized)>,
        conn_state: &ConnState,
        mut actions: mpsc::UnboundedReceiver<ConnAction>,
    ) -> Option<ConnAction> {
        let mut epoch = self.epoch.subscribe();
        let mut effective = self.effective.subscribe();
        loop {
            let armed = match &*effective.borrow_and_update() {
                Fault::CloseIdleAfter(d) if conn_state.in_flight.load(Ordering::SeqCst) == 0 => {
                    let since = *conn_state.idle_since.lock();
                    Some((since, since + *d))
                }
                _ => None,
            };
            let idle = async {
                match armed {
                    Some((_, at)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut conn => return None,
                Some(a) = actions.recv() => return Some(a),
                _ = epoch.changed() => return Some(ConnAction::Close),
                _ = effective.changed() => continue,
                _ = conn_state.activity.notified() => continue,
                _ = idle => {
                    // A request may have come and gone while we slept; then we start over.
                    let since = armed.map(|(since, _)| since);
                    if conn_state.in_flight.load(Ordering::SeqCst) == 0
                        && since == Some(*conn_state.idle_since.lock())
                    {
                        return Some(ConnAction::Close);
                    }
                }
            }
        }
    }

    /// Does `action` on the socket hyper no longer holds; dropping `ctl` closes it.
    async fn act_on_socket(&self, mut ctl: TcpStream, action: ConnAction) {
        match action {
            ConnAction::Close => {}
            ConnAction::Reset => {
                if let Err(e) = ctl.set_zero_linger() {
                    tracing::debug!(pod = %self.name, error = %e, "SO_LINGER 0 failed");
                }
            }
            ConnAction::Truncated => {
                let _ = ctl
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\ncontent-type: text/plain\r\n\r\nthe first bytes")
                    .await;
                let _ = ctl.flush().await;
                // Let the head and the first bytes go out before the close.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = ctl.shutdown().await;
            }
            ConnAction::Malformed => {
                let _ = ctl
                    .write_all(b"THIS IS NOT HTTP \x00\x01\x02 at all\r\n\r\n")
                    .await;
                let _ = ctl.shutdown().await;
            }
        }
    }

    async fn handle(&self, mut req: Request<Incoming>, conn: Arc<ConnState>) -> Response<Body> {
        conn.in_flight.fetch_add(1, Ordering::SeqCst);
        struct Done<'a>(&'a ConnState);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                *self.0.idle_since.lock() = Instant::now();
                self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
                self.0.served.fetch_add(1, Ordering::SeqCst);
                self.0.activity.notify_one();
            }
        }
        let idle_for = conn.idle_since.lock().elapsed();
        let reused = conn.served.load(Ordering::SeqCst) > 0;
        let _done = Done(&conn);

        let is_health = req.method() == Method::GET && req.uri().path() == HEALTH_PATH;
        let fault = self.fault_for(is_health);
        let upgrade = !is_health && wants_upgrade(req.headers());
        let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let (parts, body) = req.into_parts();
        // A body that fails mid-way (the client went away) still counts as a request seen.
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        if is_health {
            self.stats.health_checks.fetch_add(1, Ordering::SeqCst);
        } else {
            self.record(&parts, &body, conn.id);
        }

        let status = match answer_status(&fault, reused.then_some(idle_for)).await {
            Ok(status) => status,
            Err(action) => return self.act(&conn, action).await,
        };
        if !is_health {
            *self
                .stats
                .by_status
                .lock()
                .entry(status.as_u16())
                .or_default() += 1;
        }
        if let (Some(on_upgrade), true) = (on_upgrade, status == StatusCode::OK) {
            if self.upgrades.load(Ordering::Relaxed) {
                return self.switch_protocols(on_upgrade, &parts.headers);
            }
        }
        self.answer(status, body, conn.id)
    }

    /// The fault a request meets: health checks may have their own.
    fn fault_for(&self, is_health: bool) -> Fault {
        let traffic_fault = self.effective.borrow().clone();
        if is_health {
            self.health.lock().clone().unwrap_or(traffic_fault)
        } else {
            traffic_fault
        }
    }

    /// Counts a request (not a health check) and keeps it among the recent ones.
    fn record(&self, parts: &http::request::Parts, body: &Bytes, connection: u64) {
        let seq = self.stats.requests.fetch_add(1, Ordering::SeqCst) + 1;
        *self
            .stats
            .by_method
            .lock()
            .entry(parts.method.as_str().to_string())
            .or_default() += 1;
        let mut rec = self.stats.recorded.lock();
        if rec.len() == RECORDED_REQUESTS {
            rec.pop_front();
        }
        rec.push_back(RecordedRequest {
            seq,
            connection,
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body_len: body.len(),
            body: body.slice(..body.len().min(RECORDED_BODY_LIMIT)),
        });
    }

    /// `101 Switching Protocols`, then the upgraded connection echoes what it reads until every
    /// connection is closed.
    fn switch_protocols(
        &self,
        on_upgrade: hyper::upgrade::OnUpgrade,
        headers: &HeaderMap,
    ) -> Response<Body> {
        let proto = headers
            .get(header::UPGRADE)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("websocket"));
        let mut epoch = self.epoch.subscribe();
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let mut io = TokioIo::new(upgraded);
            let (mut r, mut w) = tokio::io::split(&mut io);
            tokio::select! {
                _ = tokio::io::copy(&mut r, &mut w) => {}
                _ = epoch.changed() => {}
            }
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, proto)
            .header("x-sim-pod", self.name.as_str())
            .body(Full::default())
            .expect("valid response")
    }

    /// A 200 echoes the request body (or names the pod); any other status says it is simulated.
    fn answer(&self, status: StatusCode, body: Bytes, connection: u64) -> Response<Body> {
        let text = if status == StatusCode::OK {
            if body.is_empty() {
                Bytes::from(format!("{}\n", self.name))
            } else {
                body.clone()
            }
        } else {
            Bytes::from(format!(
                "simulated {} from {}\n",
                status.as_u16(),
                self.name
            ))
        };
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain")
            .header("x-sim-pod", self.name.as_str())
            .header("x-sim-request-bytes", body.len())
            .header("x-sim-connection", connection)
            .body(Full::new(text))
            .expect("valid response")
    }

    /// Hands the socket to the connection task and never answers.
    async fn act(&self, conn: &ConnState, action: ConnAction) -> Response<Body> {
        let _ = conn.actions.send(action);
        std::future::pending().await
    }
}

/// The status a request gets under `fault`, or what its connection must do instead of answering.
/// `idle_on_reuse` is how long the connection was idle before this request, if it carried one
/// before.
async fn answer_status(
    fault: &Fault,
    idle_on_reuse: Option<Duration>,
) -> Result<StatusCode, ConnAction> {
    Ok(match fault {
        Fault::Healthy | Fault::CloseIdleAfter(_) | Fault::Flapping { .. } => StatusCode::OK,
        Fault::StaleKeepAlive(d) => {
            if idle_on_reuse.is_some_and(|idle| idle > *d) {
                return Err(ConnAction::Close);
            }
            StatusCode::OK
        }
        Fault::Slow(d) => {
            tokio::time::sleep(*d).await;
            StatusCode::OK
        }
        Fault::Always502 => StatusCode::BAD_GATEWAY,
        Fault::Always503 => StatusCode::SERVICE_UNAVAILABLE,
        Fault::Always504 => StatusCode::GATEWAY_TIMEOUT,
        // Refuse: the request raced the listener's close; treat it as the process dying.
        Fault::Refuse => return Err(ConnAction::Close),
        Fault::ResetAfterRequest => return Err(ConnAction::Reset),
        Fault::Malformed => return Err(ConnAction::Malformed),
        Fault::TruncatedBody => return Err(ConnAction::Truncated),
        // Healing does not answer what hung: like a stuck worker, the request is lost and
        // only the client's timeout (or `kill`) ends the connection.
        Fault::Hang => std::future::pending().await,
    })
}

/// Two handles on one socket: one for hyper, one to reset or write on once hyper is gone.
fn split_handles(stream: TcpStream) -> Option<(TcpStream, TcpStream)> {
    let std = stream.into_std().ok()?;
    let dup = std.try_clone().ok()?;
    Some((
        TcpStream::from_std(std).ok()?,
        TcpStream::from_std(dup).ok()?,
    ))
}

fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::client::conn::http1::SendRequest;
    use tokio::io::AsyncReadExt;

    const GENEROUS: Duration = Duration::from_secs(5);

    #[tokio::test(start_paused = true)]
    async fn each_fault_answers_its_status_or_acts_on_the_socket() {
        let ms = Duration::from_millis;
        for (fault, want) in [
            (Fault::Healthy, Ok(StatusCode::OK)),
            (Fault::CloseIdleAfter(ms(1)), Ok(StatusCode::OK)),
            (Fault::Always502, Ok(StatusCode::BAD_GATEWAY)),
            (Fault::Always503, Ok(StatusCode::SERVICE_UNAVAILABLE)),
            (Fault::Always504, Ok(StatusCode::GATEWAY_TIMEOUT)),
            (Fault::Refuse, Err(ConnAction::Close)),
            (Fault::ResetAfterRequest, Err(ConnAction::Reset)),
            (Fault::Malformed, Err(ConnAction::Malformed)),
            (Fault::TruncatedBody, Err(ConnAction::Truncated)),
        ] {
            assert_eq!(answer_status(&fault, Some(ms(9))).await, want, "{fault:?}");
        }
        let status =
            |f: Fault, idle: Option<Duration>| async move { answer_status(&f, idle).await };
        // A stale keep-alive drops only a request on a reused connection idle past the limit.
        let stale = || Fault::StaleKeepAlive(ms(100));
        assert_eq!(status(stale(), None).await, Ok(StatusCode::OK));
        assert_eq!(status(stale(), Some(ms(50))).await, Ok(StatusCode::OK));
        assert_eq!(status(stale(), Some(ms(150))).await, Err(ConnAction::Close));
        let t = Instant::now();
        assert_eq!(status(Fault::Slow(ms(300)), None).await, Ok(StatusCode::OK));
        assert!(t.elapsed() >= ms(300));
        let hang = tokio::time::timeout(Duration::from_secs(3600), status(Fault::Hang, None));
        assert!(hang.await.is_err(), "a hanging pod answered");
    }

    async fn connect(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        sender
    }

    fn req(method: &str, path: &str, body: &'static str) -> Request<Full<Bytes>> {
        Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "sim.test")
            .header("x-test", "yes")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    async fn send(
        sender: &mut SendRequest<Full<Bytes>>,
        r: Request<Full<Bytes>>,
    ) -> hyper::Result<(StatusCode, Bytes)> {
        sender.ready().await?;
        let resp = sender.send_request(r).await?;
        let status = resp.status();
        Ok((status, resp.into_body().collect().await?.to_bytes()))
    }

    async fn get(addr: SocketAddr, path: &str) -> hyper::Result<(StatusCode, Bytes)> {
        let mut s = connect(addr).await;
        send(&mut s, req("GET", path, "")).await
    }

    /// Writes one raw request and reads until the pod closes or resets.
    async fn raw(addr: SocketAddr) -> (Vec<u8>, Option<io::ErrorKind>) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /x HTTP/1.1\r\nHost: sim.test\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let res = tokio::time::timeout(GENEROUS, s.read_to_end(&mut out))
            .await
            .expect("pod neither answered nor closed");
        (out, res.err().map(|e| e.kind()))
    }

    #[tokio::test]
    async fn healthy_echoes_and_records_requests() {
        let pod = SimPod::start("p0").await.unwrap();
        let mut s = connect(pod.addr()).await;
        let (status, body) = send(&mut s, req("POST", "/orders?id=1", "hello"))
            .await
            .unwrap();
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]));
        let (status, body) = send(&mut s, req("GET", "/", "")).await.unwrap();
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"p0\n"[..]));

        let c = pod.counters();
        assert_eq!(c.requests, 2);
        assert_eq!(c.connections, 1, "keep-alive reuses the connection");
        assert_eq!(c.by_method.get("POST"), Some(&1));
        assert_eq!(pod.requests_by_method("get"), 1);
        assert_eq!(c.by_status.get(&200), Some(&2));
        let rec = pod.recorded();
        assert_eq!(rec.len(), 2);
        assert_eq!(rec[0].seq, 1);
        assert_eq!(rec[0].method, Method::POST);
        assert_eq!(rec[0].uri.to_string(), "/orders?id=1");
        assert_eq!(&rec[0].body[..], b"hello");
        assert_eq!(rec[0].body_len, 5);
        assert_eq!(rec[0].headers["x-test"], "yes");
        assert_eq!(rec[0].headers[header::HOST], "sim.test");
        assert_eq!(rec[1].connection, rec[0].connection);
    }

    #[tokio::test]
    async fn health_checks_are_counted_apart_and_follow_the_fault_unless_overridden() {
        let pod = SimPod::start("p0").await.unwrap();
        assert_eq!(
            get(pod.addr(), HEALTH_PATH).await.unwrap().0,
            StatusCode::OK
        );
        pod.set_fault(Fault::Always503).await.unwrap();
        assert_eq!(
            get(pod.addr(), HEALTH_PATH).await.unwrap().0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        pod.set_health_fault(Some(Fault::Healthy));
        assert_eq!(
            get(pod.addr(), HEALTH_PATH).await.unwrap().0,
            StatusCode::OK
        );
        assert_eq!(
            get(pod.addr(), "/").await.unwrap().0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        pod.set_health_fault(None);
        pod.set_fault(Fault::Healthy).await.unwrap();
        pod.set_health_fault(Some(Fault::Always502));
        assert_eq!(
            get(pod.addr(), HEALTH_PATH).await.unwrap().0,
            StatusCode::BAD_GATEWAY
        );
        let c = pod.counters();
        assert_eq!((c.health_checks, c.requests), (4, 1));
        assert!(pod.recorded().iter().all(|r| r.uri.path() != HEALTH_PATH));
    }

    #[tokio::test]
    async fn gateway_error_faults_answer_their_status() {
        let pod = SimPod::start("p0").await.unwrap();
        for (fault, want) in [
            (Fault::Always502, 502),
            (Fault::Always503, 503),
            (Fault::Always504, 504),
        ] {
            pod.set_fault(fault).await.unwrap();
            let (status, body) = get(pod.addr(), "/").await.unwrap();
            assert_eq!(status.as_u16(), want);
            assert!(String::from_utf8_lossy(&body).contains("p0"), "{body:?}");
        }
        assert_eq!(pod.counters().by_status.len(), 3);
    }

    #[tokio::test]
    async fn kill_closes_listener_and_open_connections_and_revive_rebinds_the_port() {
        let pod = SimPod::start("p0").await.unwrap();
        let addr = pod.addr();
        let mut open = TcpStream::connect(addr).await.unwrap();
        // Wait until the pod has accepted it, so kill has a connection to close.
        tokio::time::timeout(GENEROUS, async {
            while pod.open_connections() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();

        pod.kill().await.unwrap();
        assert!(pod.is_killed());
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(GENEROUS, open.read(&mut buf))
            .await
            .expect("open connection was not closed");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        let e = TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);

        pod.revive().await.unwrap();
        assert_eq!(pod.addr(), addr);
        assert_eq!(get(addr, "/").await.unwrap().0, StatusCode::OK);
        // Killing twice or reviving twice is harmless.
        pod.revive().await.unwrap();
        pod.kill().await.unwrap();
        pod.kill().await.unwrap();
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn refuse_fault_stops_listening_until_healed() {
        let pod = SimPod::start("p0").await.unwrap();
        pod.set_fault(Fault::Refuse).await.unwrap();
        let e = TcpStream::connect(pod.addr()).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        pod.set_fault(Fault::Healthy).await.unwrap();
        assert_eq!(get(pod.addr(), "/").await.unwrap().0, StatusCode::OK);
    }

    #[tokio::test]
    async fn hang_reads_the_request_and_never_answers_it() {
        let pod = SimPod::start("p0").await.unwrap();
        pod.set_fault(Fault::Hang).await.unwrap();
        let mut s = connect(pod.addr()).await;
        let pending = tokio::spawn(async move { send(&mut s, req("GET", "/", "")).await });
        tokio::time::timeout(GENEROUS, async {
            while pod.requests() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!pending.is_finished(), "a hanging pod answered");
        // Healed, the pod serves new requests, but what hung stays hung.
        pod.set_fault(Fault::Healthy).await.unwrap();
        assert_eq!(get(pod.addr(), "/").await.unwrap().0, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            !pending.is_finished(),
            "a hung request was answered after healing"
        );
        pod.close_connections();
        let res = tokio::time::timeout(GENEROUS, pending)
            .await
            .expect("close_connections did not close the hung connection")
            .unwrap();
        assert!(res.is_err(), "a hung request got an answer: {res:?}");
        assert_eq!(pod.counters().by_status.get(&200), Some(&1));
    }

    #[tokio::test]
    async fn reset_after_request_sends_rst_without_a_response_byte() {
        let pod = SimPod::start("p0").await.unwrap();
        pod.set_fault(Fault::ResetAfterRequest).await.unwrap();
        let (bytes, err) = raw(pod.addr()).await;
        assert!(bytes.is_empty(), "{bytes:?}");
        assert_eq!(err, Some(io::ErrorKind::ConnectionReset));
        assert_eq!(pod.requests(), 1);
    }

    #[tokio::test]
    async fn malformed_answers_bytes_that_are_not_http() {
        let pod = SimPod::start("p0").await.unwrap();
        pod.set_fault(Fault::Malformed).await.unwrap();
        let (bytes, err) = raw(pod.addr()).await;
        assert_eq!(err, None);
        assert!(bytes.starts_with(b"THIS IS NOT HTTP"), "{bytes:?}");
        let e = get(pod.addr(), "/").await.unwrap_err();
        assert!(e.is_parse(), "{e:?}");
    }

    #[tokio::test]
    async fn truncated_body_sends_a_head_and_part_of_the_body() {
        let pod = SimPod::start("p0").await.unwrap();
        pod.set_fault(Fault::TruncatedBody).await.unwrap();
        let (bytes, _) = raw(pod.addr()).await;
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nthe first bytes"), "{text}");
        let mut s = connect(pod.addr()).await;
        let e = send(&mut s, req("GET", "/", "")).await.unwrap_err();
        assert!(
            e.is_incomplete_message() || e.is_body_write_aborted() || !e.is_parse(),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn slow_answers_after_the_delay() {
        let pod = SimPod::start("p0").await.unwrap();
        pod.set_fault(Fault::Slow(Duration::from_millis(200)))
            .await
            .unwrap();
        let t = std::time::Instant::now();
        assert_eq!(get(pod.addr(), "/").await.unwrap().0, StatusCode::OK);
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn close_idle_after_closes_idle_keep_alive_connections_only() {
        let pod = SimPod::start("p0").await.unwrap();
        pod.set_fault(Fault::CloseIdleAfter(Duration::from_millis(300)))
            .await
            .unwrap();
        let mut s = connect(pod.addr()).await;
        // Requests 100 ms apart keep the connection busy enough to stay open.
        for _ in 0..3 {
            assert_eq!(
                send(&mut s, req("GET", "/", "")).await.unwrap().0,
                StatusCode::OK
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(pod.connections(), 1);
        tokio::time::timeout(GENEROUS, async {
            while !s.is_closed() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("idle connection was not closed");
        assert_eq!(pod.open_connections(), 0);
        assert_eq!(pod.requests(), 3);
    }

    #[tokio::test]
    async fn stale_keep_alive_drops_a_request_on_a_connection_idle_too_long() {
        let pod = SimPod::start("p0").await.unwrap();
        pod.set_fault(Fault::StaleKeepAlive(Duration::from_millis(100)))
            .await
            .unwrap();
        let mut s = connect(pod.addr()).await;
        assert_eq!(
            send(&mut s, req("GET", "/", "")).await.unwrap().0,
            StatusCode::OK
        );
        assert_eq!(
            send(&mut s, req("GET", "/", "")).await.unwrap().0,
            StatusCode::OK
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let e = send(&mut s, req("GET", "/", "")).await.unwrap_err();
        assert!(e.is_incomplete_message() || e.is_canceled(), "{e:?}");
        // A fresh connection is served at once.
        assert_eq!(get(pod.addr(), "/").await.unwrap().0, StatusCode::OK);
        assert_eq!(pod.requests(), 4);
    }

    #[tokio::test]
    async fn flapping_alternates_between_healthy_and_bad() {
        let pod = SimPod::start("p0").await.unwrap();
        pod.set_fault(Fault::Flapping {
            period: Duration::from_millis(100),
            bad: Box::new(Fault::Always502),
        })
        .await
        .unwrap();
        assert!(matches!(pod.fault(), Fault::Flapping { .. }));
        let mut seen = BTreeMap::new();
        let t = std::time::Instant::now();
        while seen.len() < 2 && t.elapsed() < GENEROUS {
            *seen
                .entry(get(pod.addr(), "/").await.unwrap().0.as_u16())
                .or_insert(0) += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(seen.keys().copied().collect::<Vec<_>>(), vec![200, 502]);
        pod.set_fault(Fault::Healthy).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(pod.effective_fault(), Fault::Healthy);
    }

    #[tokio::test]
    async fn flapping_refuse_toggles_the_listener() {
        let pod = SimPod::start("p0").await.unwrap();
        pod.set_fault(Fault::Flapping {
            period: Duration::from_millis(100),
            bad: Box::new(Fault::Refuse),
        })
        .await
        .unwrap();
        let (mut refused, mut served) = (0, 0);
        let t = std::time::Instant::now();
        while (refused == 0 || served == 0) && t.elapsed() < GENEROUS {
            match get_or_refused(pod.addr()).await {
                Some(_) => served += 1,
                None => refused += 1,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            refused > 0 && served > 0,
            "refused {refused}, served {served}"
        );
    }

    async fn get_or_refused(addr: SocketAddr) -> Option<StatusCode> {
        let stream = TcpStream::connect(addr).await.ok()?;
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        send(&mut s, req("GET", "/", "")).await.ok().map(|r| r.0)
    }

    #[tokio::test]
    async fn upgrade_switches_protocols_and_echoes() {
        let pod = SimPod::start("p0").await.unwrap();
        let mut s = connect(pod.addr()).await;
        let r = Request::builder()
            .uri("/ws")
            .header(header::HOST, "sim.test")
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .body(Full::default())
            .unwrap();
        let resp = s.send_request(r).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(resp.headers()[header::UPGRADE], "websocket");
        let upgraded = hyper::upgrade::on(resp).await.unwrap();
        let mut io = TokioIo::new(upgraded);
        io.write_all(b"ping over the tunnel").await.unwrap();
        let mut buf = [0u8; 20];
        tokio::time::timeout(GENEROUS, io.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"ping over the tunnel");

        pod.set_upgrades(false);
        let mut s = connect(pod.addr()).await;
        let r = Request::builder()
            .uri("/ws")
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .body(Full::default())
            .unwrap();
        assert_eq!(s.send_request(r).await.unwrap().status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn dropping_the_pod_closes_its_port() {
        let pod = SimPod::start("p0").await.unwrap();
        let addr = pod.addr();
        drop(pod);
        tokio::time::timeout(GENEROUS, async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("dropped pod still accepts");
    }
}
