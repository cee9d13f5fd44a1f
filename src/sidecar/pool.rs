//! Keep-alive connections to one endpoint.
//!
//! LIFO reuse (the warmest connection first), and no connection is reused after it has been idle
//! for `poolIdle`, or for less when the upstream is known to close idle connections sooner (its
//! `Keep-Alive: timeout=N`, or what its closes taught the upstream's [`IdleLearner`]): closing
//! idle connections before the upstream does is what prevents the keep-alive race (a request
//! written into a connection the upstream is closing). A connection the upstream has already
//! closed is noticed at checkout, without a system call while the reactor has not seen it close;
//! a request that cannot be replayed asks the kernel as well (`h1::Conn::is_open_now`). Whether a
//! connection was reused is reported so the rare race that still happens can be told apart.

use std::{
    collections::VecDeque,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

use super::h1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(4),
            max_idle: 512,
        }
    }
}

/// The idle connections of one endpoint on one worker thread.
pub struct Pool {
    addr: SocketAddr,
    /// One lock for both: checkout and release need the config's timings anyway.
    state: Mutex<State>,
}

struct State {
    config: PoolConfig,
    idle: Vec<Idle>,
    /// Shared by every pool of the upstream: what its closes and headers say.
    learner: Option<Arc<IdleLearner>>,
}

struct Idle {
    conn: h1::Conn,
    since: Instant,
    /// The longest idle time at which the connection was seen open (the reaper looks every
    /// 250 ms): if the upstream closes it, it did so after this.
    seen_open: Duration,
}

/// A connection taken from the pool, ready to send one request, with what the pool knows of it.
pub struct Checkout {
    pub conn: h1::Conn,
    /// It served a request before (a failure with no response byte is then a keep-alive race).
    pub reused: bool,
    /// For a reused connection: how long it was idle and last known open.
    pub seen_open: Duration,
}

/// How careful a checkout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// The request can be replayed if the connection turns out closed: the reactor's word that
    /// it is open is enough (no system call).
    Replayable,
    /// It cannot: the kernel is asked too, just before the connection is handed out.
    AskKernel,
}

// === impl Pool ===

impl Pool {
    pub fn new(addr: SocketAddr, config: PoolConfig) -> Self {
        Pool {
            addr,
            state: Mutex::new(State {
                config,
                idle: Vec::new(),
                learner: None,
            }),
        }
    }

    pub fn set_config(&self, config: PoolConfig) {
        self.state.lock().config = config;
    }

    pub fn config(&self) -> PoolConfig {
        self.state.lock().config
    }

    /// The upstream's learner, which this pool reports to and takes its limit from.
    pub fn set_learner(&self, learner: Arc<IdleLearner>) {
        self.state.lock().learner = Some(learner);
    }

    pub fn idle_len(&self) -> usize {
        self.state.lock().idle.len()
    }

    /// The most recently used idle connection that is still open and fresh enough. `now` is the
    /// caller's clock reading (one read per request is enough).
    pub fn checkout(&self, now: Instant, reuse: Reuse) -> Option<Checkout> {
        loop {
            let (found, learner) = self.pop_usable(now);
            let idle = found?;
            if reuse == Reuse::Replayable || idle.conn.is_open_now() {
                return Some(Checkout {
                    seen_open: now.saturating_duration_since(idle.since),
                    conn: idle.conn,
                    reused: true,
                });
            }
            // Closed, and the reactor had not noticed yet: the next one.
            if let Some(l) = learner {
                l.observe_close(idle.seen_open, now);
            }
        }
    }

    /// Pops the newest connection that is within its idle limit and not known to be closed;
    /// closes the others on the way (after the lock is let go: closing is a system call).
    fn pop_usable(&self, now: Instant) -> (Option<Idle>, Option<Arc<IdleLearner>>) {
        let mut dead: Vec<Idle> = Vec::new();
        let mut state = self.state.lock();
        let limit = state.idle_limit();
        let learner = state.learner.clone();
        let idle = &mut state.idle;
        // Oldest first: whatever is past the idle limit.
        let stale = idle.iter().take_while(|c| c.expired(now, limit)).count();
        if stale > 0 {
            dead.extend(idle.drain(..stale));
        }
        // Newest first; one the upstream closed is dropped on the way.
        let mut found = None;
        let mut closed = Vec::new();
        while let Some(c) = idle.pop() {
            if c.expired(now, limit) {
                dead.push(c);
            } else if c.conn.is_idle_usable() {
                found = Some(c);
                break;
            } else {
                closed.push(c.seen_open);
                dead.push(c);
            }
        }
        drop(state);
        drop(dead);
        if let Some(l) = &learner {
            for seen_open in closed {
                l.observe_close(seen_open, now);
            }
        }
        (found, learner)
    }

    /// Opens a new connection, within `connect_timeout`.
    pub async fn connect(&self) -> io::Result<h1::Conn> {
        let cfg = self.config();
        tokio::time::timeout(cfg.connect_timeout, h1::Conn::connect(self.addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", cfg.connect_timeout),
                )
            })?
    }

    /// Returns a connection whose response has been read to the end.
    pub fn release(&self, mut conn: h1::Conn) {
        conn.make_idle();
        let since = Instant::now();
        let mut state = self.state.lock();
        if let (Some(l), Some(t)) = (&state.learner, conn.keep_alive_timeout()) {
            l.observe_header(t);
        }
        let evicted = (state.idle.len() >= state.config.max_idle).then(|| state.idle.remove(0));
        state.idle.push(Idle {
            conn,
            since,
            seen_open: Duration::ZERO,
        });
        drop(state);
        // Closed after the lock is let go: closing is a system call.
        drop(evicted);
    }

    /// A reused connection turned out closed as a request went out on it (the keep-alive race):
    /// the upstream closed it after `seen_open` of idleness.
    pub fn observe_race(&self, seen_open: Duration) {
        let learner = self.state.lock().learner.clone();
        if let Some(l) = learner {
            l.observe_close(seen_open, Instant::now());
        }
    }

    /// Closes connections past their idle limit and those the upstream closed, so idle sockets
    /// do not linger; notes how long the others have been seen open. Run every 250 ms by the
    /// sidecar.
    pub fn purge(&self) {
        let now = Instant::now();
        let mut state = self.state.lock();
        let limit = state.idle_limit();
        let learner = state.learner.clone();
        let mut closed = Vec::new();
        let (keep, dead): (Vec<Idle>, Vec<Idle>) =
            std::mem::take(&mut state.idle).into_iter().partition(|c| {
                if c.expired(now, limit) {
                    return false;
                }
                if !c.conn.is_idle_usable() {
                    closed.push(c.seen_open);
                    return false;
                }
                true
            });
        state.idle = keep;
        for c in state.idle.iter_mut() {
            c.seen_open = now.saturating_duration_since(c.since);
        }
        drop(state);
        // Closed after the lock is let go: closing is a system call.
        drop(dead);
        if let Some(l) = learner {
            for seen_open in closed {
                l.observe_close(seen_open, now);
            }
        }
    }
}

// === impl State ===

impl State {
    /// How long any connection may idle: `poolIdle`, or less when the upstream is known to close
    /// sooner.
    fn idle_limit(&self) -> Duration {
        let learned = self.learner.as_ref().and_then(|l| l.retire_after());
        learned.map_or(self.config.idle_timeout, |l| {
            l.min(self.config.idle_timeout)
        })
    }
}

// === impl Idle ===

impl Idle {
    /// Past its idle limit: closed rather than risked (the upstream may be closing it right
    /// now). A connection whose upstream announced its own `Keep-Alive: timeout` goes before it.
    fn expired(&self, now: Instant, limit: Duration) -> bool {
        let limit = match self.conn.keep_alive_timeout() {
            Some(t) => limit.min(retire_before(t)),
            None => limit,
        };
        now.saturating_duration_since(self.since) >= limit
    }
}

// === impl IdleLearner ===

/// Observations kept per upstream; the estimate is their median, so one odd close (a pod that
/// restarted, closing every connection at once) does not move it.
const CLOSES: usize = 5;
/// Observations needed before closes are trusted: one. Waiting for a second lets requests meet
/// connections being closed in between (bursts 1 s apart against a 1 s idle timeout: the burst
/// between the first and the second observation did).
const CLOSES_NEEDED: usize = 1;
/// Closes seen closer together than this count once: a restart closes every connection at once.
const CLOSE_SPACING: Duration = Duration::from_millis(500);

/// What one upstream's idle keep-alive connections say about its idle timeout, shared by the
/// pools of all its endpoints and carried over reloads. Learned from two sources: the
/// `Keep-Alive: timeout=N` header (exact), and the closes the upstream makes (each bounded from
/// below by how long the connection was last seen open). Pooled connections are then retired
/// safely before that, whatever `poolIdle` says, and a `poolIdle` that is too long is reported
/// once.
pub struct IdleLearner {
    /// Pooled connections are not reused after idling this long, in ms (0: nothing learned).
    retire_after_ms: AtomicU64,
    /// The last `Keep-Alive: timeout` seen, in ms + 1 (0: none): changes take the lock.
    header_ms: AtomicU64,
    state: Mutex<Learned>,
}

#[derive(Default)]
struct Learned {
    header: Option<Duration>,
    /// Lower bounds of the idle time after which the upstream closed, newest last.
    closes: VecDeque<Duration>,
    last_close: Option<Instant>,
    pool_idle: Duration,
    report: Option<IdleReport>,
    reported: bool,
}

/// Where the learner reports: the upstream's name (for the log line) and its metric handles.
pub struct IdleReport {
    pub upstream: String,
    /// `detour_upstream_idle_timeout_seconds`.
    pub timeout_seconds: prometheus::Gauge,
    /// `detour_pool_idle_mismatch`.
    pub mismatch: prometheus::IntGauge,
}

/// The learner's state as `/config` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IdleView {
    /// The upstream's `Keep-Alive: timeout`, when it sends one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_alive_timeout_ms: Option<u64>,
    /// The upstream closes idle connections after about this long, as its closes showed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learned_idle_timeout_ms: Option<u64>,
    /// Closes of idle connections observed (at most the last few are kept).
    pub observed_closes: usize,
    /// Pooled connections are retired after idling this long: `poolIdle`, or less.
    pub retire_after_ms: u64,
    /// The upstream closes idle connections before `poolIdle` would.
    pub pool_idle_mismatch: bool,
}

/// When to stop reusing a connection the upstream closes after `timeout` idle: a margin of a
/// quarter of it, at least 100 ms and at most 1 s (clock and timer slack on both sides, and the
/// request's own trip).
pub fn retire_before(timeout: Duration) -> Duration {
    let margin = (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    timeout.saturating_sub(margin)
}

impl Default for IdleLearner {
    fn default() -> Self {
        IdleLearner {
            retire_after_ms: AtomicU64::new(0),
            header_ms: AtomicU64::new(0),
            state: Mutex::new(Learned::default()),
        }
    }
}

impl IdleLearner {
    /// The upstream's `poolIdle` and where to report; a new `poolIdle` is judged afresh.
    pub fn configure(&self, pool_idle: Duration, report: IdleReport) {
        let mut s = self.state.lock();
        if s.pool_idle != pool_idle {
            s.reported = false;
        }
        s.pool_idle = pool_idle;
        s.report = Some(report);
        self.update(&mut s);
    }

    /// Idle connections are retired after this, when something was learned.
    pub fn retire_after(&self) -> Option<Duration> {
        match self.retire_after_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// A response carried `Keep-Alive: timeout=N`. One atomic load when it did not change.
    pub fn observe_header(&self, timeout: Duration) {
        let ms = timeout.as_millis() as u64 + 1;
        if self.header_ms.swap(ms, Ordering::Relaxed) == ms {
            return;
        }
        let mut s = self.state.lock();
        s.header = Some(timeout);
        self.update(&mut s);
    }

    /// The upstream closed an idle connection that had been seen open after `seen_open`. One
    /// never seen open after its release (closed within the reaper's first 250 ms) says nothing
    /// about an idle timeout.
    pub fn observe_close(&self, seen_open: Duration, now: Instant) {
        if seen_open.is_zero() {
            return;
        }
        let mut s = self.state.lock();
        if s.last_close
            .is_some_and(|t| now.saturating_duration_since(t) < CLOSE_SPACING)
        {
            return;
        }
        s.last_close = Some(now);
        if s.closes.len() == CLOSES {
            s.closes.pop_front();
        }
        s.closes.push_back(seen_open);
        self.update(&mut s);
    }

    pub fn view(&self) -> IdleView {
        let s = self.state.lock();
        let upstream = s.upstream_timeout();
        IdleView {
            keep_alive_timeout_ms: s.header.map(|d| d.as_millis() as u64),
            learned_idle_timeout_ms: s.learned().map(|d| d.as_millis() as u64),
            observed_closes: s.closes.len(),
            retire_after_ms: upstream
                .map_or(s.pool_idle, |t| retire_before(t).min(s.pool_idle))
                .as_millis() as u64,
            pool_idle_mismatch: upstream.is_some_and(|t| t <= s.pool_idle),
        }
    }

    fn update(&self, s: &mut Learned) {
        let Some(timeout) = s.upstream_timeout() else {
            return;
        };
        let retire = retire_before(timeout);
        // At least 1 ms: 0 means "nothing learned".
        self.retire_after_ms
            .store((retire.as_millis() as u64).max(1), Ordering::Relaxed);
        let mismatch = timeout <= s.pool_idle;
        let pool_idle = s.pool_idle;
        let Some(report) = &s.report else {
            return;
        };
        report.timeout_seconds.set(timeout.as_secs_f64());
        report.mismatch.set(mismatch as i64);
        if mismatch && !s.reported {
            tracing::warn!(
                upstream = %report.upstream,
                upstream_idle_timeout = %fmt_secs(timeout),
                pool_idle = %fmt_secs(pool_idle),
                source = if s.header == Some(timeout) { "Keep-Alive header" } else { "observed closes" },
                "the upstream closes idle keep-alive connections after about {} while timeouts.poolIdle is {}: \
                 detour now retires them after {}; fix: set timeouts.poolIdle to {} or less, or raise \
                 the upstream's keep-alive timeout above {}",
                fmt_secs(timeout),
                fmt_secs(pool_idle),
                fmt_secs(retire),
                fmt_secs(retire),
                fmt_secs(pool_idle),
            );
            s.reported = true;
        }
    }
}

impl Learned {
    /// The median of the closes seen (the lower of the two middle ones), once there are enough.
    fn learned(&self) -> Option<Duration> {
        if self.closes.len() < CLOSES_NEEDED {
            return None;
        }
        let mut v: Vec<Duration> = self.closes.iter().copied().collect();
        v.sort();
        Some(v[(v.len() - 1) / 2])
    }

    /// What the upstream is known to close idle connections after: the shorter of its header
    /// and its closes.
    fn upstream_timeout(&self) -> Option<Duration> {
        match (self.header, self.learned()) {
            (Some(h), Some(l)) => Some(h.min(l)),
            (h, l) => h.or(l),
        }
    }
}

/// `1.5s`, `250ms`.
fn fmt_secs(d: Duration) -> String {
    crate::config::Duration::from_millis(d.as_millis() as u64).to_string()
}

#[cfg(test)]
mod tests {
    use std::{
        future::poll_fn,
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use bytes::Bytes;
    use http::HeaderValue;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
        sync::watch,
    };

    use super::*;

    /// A keep-alive HTTP/1.1 server on 127.0.0.1 that answers every request `200 ok`, counts
    /// requests and connections, and closes its connections when told to.
    struct Server {
        addr: SocketAddr,
        requests: Arc<AtomicUsize>,
        connections: Arc<AtomicUsize>,
        close: watch::Sender<u64>,
    }

    impl Server {
        async fn start() -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let server = Server {
                addr: listener.local_addr().unwrap(),
                requests: Arc::default(),
                connections: Arc::default(),
                close: watch::channel(0).0,
            };
            let (requests, connections) = (server.requests.clone(), server.connections.clone());
            let close = server.close.clone();
            tokio::spawn(async move {
                while let Ok((io, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::SeqCst);
                    let mut closing = close.subscribe();
                    closing.mark_unchanged();
                    let requests = requests.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = serve(io, &requests) => {}
                            _ = closing.changed() => {}
                        }
                    });
                }
            });
            server
        }

        fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }

        fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }

        /// Closes every connection open now.
        fn close_connections(&self) {
            self.close.send_modify(|n| *n += 1);
        }
    }

    /// Answers each bodiless request on `io` until the client closes.
    async fn serve(mut io: TcpStream, requests: &AtomicUsize) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                buf.drain(..end + 4);
                requests.fetch_add(1, Ordering::SeqCst);
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if io.write_all(answer).await.is_err() {
                    return;
                }
            }
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn pool(server: &Server, idle_timeout: Duration) -> Pool {
        Pool::new(
            server.addr,
            PoolConfig {
                idle_timeout,
                max_idle: 2,
                ..PoolConfig::default()
            },
        )
    }

    /// Sends one GET on `conn`, reads the body to the end and returns the connection to the
    /// pool, as the proxy does.
    async fn exchange(pool: &Pool, conn: h1::Conn) {
        let parts = http::Request::get("/").body(()).unwrap().into_parts().0;
        let host = HeaderValue::from_static("server");
        let got = conn
            .send(&parts, &host, http_body_util::Empty::<Bytes>::new(), false)
            .await
            .expect("response head");
        assert_eq!(got.head.status, http::StatusCode::OK);
        let idle = match got.body {
            h1::ResponseBody::Done { idle, .. } => idle,
            h1::ResponseBody::Streaming(mut body) => {
                while let Some(chunk) = poll_fn(|cx| body.poll_data(cx)).await {
                    chunk.expect("body");
                }
                body.take_idle()
            }
            h1::ResponseBody::Upgraded { .. } => panic!("no upgrade asked"),
        };
        pool.release(idle.expect("a keep-alive connection"));
    }

    #[tokio::test]
    async fn a_finished_connection_is_reused_and_max_idle_bounds_the_pool() {
        let server = Server::start().await;
        let pool = pool(&server, Duration::from_secs(60));
        assert!(
            pool.checkout(Instant::now(), Reuse::Replayable).is_none(),
            "nothing pooled yet"
        );
        let a = pool.connect().await.unwrap();
        let b = pool.connect().await.unwrap();
        exchange(&pool, a).await;
        exchange(&pool, b).await;
        assert_eq!(pool.idle_len(), 2);
        let first = pool
            .checkout(Instant::now(), Reuse::Replayable)
            .expect("a pooled connection");
        assert!(first.reused);
        exchange(&pool, first.conn).await;
        // Three requests, two connections: the pool never opened a third.
        assert_eq!(server.requests(), 3);
        assert_eq!(server.connections(), 2);
        // max_idle 2: a third release pushes out the oldest.
        let c = pool.connect().await.unwrap();
        exchange(&pool, c).await;
        assert_eq!(pool.idle_len(), 2);
    }

    #[tokio::test]
    async fn expired_and_closed_connections_are_never_handed_out() {
        let server = Server::start().await;
        let short = pool(&server, Duration::from_millis(50));
        let conn = short.connect().await.unwrap();
        exchange(&short, conn).await;
        // Generous: only "later than 50 ms" matters.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            short.checkout(Instant::now(), Reuse::Replayable).is_none(),
            "past poolIdle"
        );
        assert_eq!(short.idle_len(), 0);

        let long = pool(&server, Duration::from_secs(60));
        let conn = long.connect().await.unwrap();
        exchange(&long, conn).await;
        assert_eq!(long.idle_len(), 1);
        // The upstream closes its side: the connection is forgotten, by checkout or purge.
        server.close_connections();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while long.idle_len() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "closed connection kept"
            );
            long.purge();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(long.checkout(Instant::now(), Reuse::Replayable).is_none());

        // Checkout alone notices a closed connection too, and hands out none.
        let conn = long.connect().await.unwrap();
        exchange(&long, conn).await;
        server.close_connections();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            // A connection handed out while the close is still in flight goes back.
            match long.checkout(Instant::now(), Reuse::Replayable) {
                Some(c) => long.release(c.conn),
                None => break,
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "closed connection handed out"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(long.idle_len(), 0);
    }

    #[tokio::test]
    async fn the_kernel_knows_of_a_close_the_reactor_has_not_seen_yet() {
        // A blocking server side: closing it involves no await, so the sidecar's reactor (this
        // test's own runtime) does not run between the close and the checkouts below.
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let pool = Pool::new(server.local_addr().unwrap(), PoolConfig::default());
        let learner = Arc::new(IdleLearner::default());
        pool.set_learner(learner.clone());
        let conn = pool.connect().await.unwrap();
        let (peer, _) = server.accept().unwrap();
        pool.release(conn);
        drop(peer);
        // The FIN is in our kernel well within this (loopback), yet nothing polled the reactor.
        std::thread::sleep(Duration::from_millis(50));
        let stale = pool
            .checkout(Instant::now(), Reuse::Replayable)
            .expect("the reactor's cached readiness still says open");
        assert!(!stale.conn.is_open_now(), "the kernel says closed");
        pool.release(stale.conn);
        assert!(pool.checkout(Instant::now(), Reuse::AskKernel).is_none());
        assert_eq!(pool.idle_len(), 0, "the closed connection was dropped");
        // Never seen open by the reaper since its release: it says nothing about a timeout.
        assert_eq!(learner.view().observed_closes, 0);
    }

    fn report() -> (IdleReport, prometheus::Gauge, prometheus::IntGauge) {
        let timeout = prometheus::Gauge::new("t", "t").unwrap();
        let mismatch = prometheus::IntGauge::new("m", "m").unwrap();
        let r = IdleReport {
            upstream: "shop/web".into(),
            timeout_seconds: timeout.clone(),
            mismatch: mismatch.clone(),
        };
        (r, timeout, mismatch)
    }

    #[test]
    fn retirement_keeps_a_margin_before_the_upstreams_timeout() {
        let ms = Duration::from_millis;
        assert_eq!(retire_before(Duration::from_secs(5)), ms(4000));
        assert_eq!(
            retire_before(Duration::from_secs(60)),
            Duration::from_secs(59)
        );
        assert_eq!(retire_before(ms(1000)), ms(750));
        assert_eq!(retire_before(ms(300)), ms(200));
        assert_eq!(retire_before(ms(50)), Duration::ZERO);
    }

    #[test]
    fn closes_are_learned_by_their_median_and_a_burst_of_them_counts_once() {
        let ms = Duration::from_millis;
        let l = IdleLearner::default();
        let (r, timeout, mismatch) = report();
        l.configure(Duration::from_secs(4), r);
        let t0 = Instant::now();
        l.observe_close(Duration::ZERO, t0);
        assert_eq!(
            l.retire_after(),
            None,
            "a close never seen open says nothing"
        );
        l.observe_close(ms(900), t0);
        assert_eq!(l.retire_after(), Some(ms(675)), "one close is enough");
        // A restart closing every connection at once: the same instant counts once.
        l.observe_close(ms(10), t0 + ms(1));
        l.observe_close(ms(20), t0 + ms(2));
        assert_eq!(l.view().observed_closes, 1);
        l.observe_close(ms(800), t0 + ms(600));
        l.observe_close(ms(30), t0 + ms(1200));
        // Median of 900, 800, 30 (the lower middle of an even count) is 800.
        let v = l.view();
        assert_eq!(v.learned_idle_timeout_ms, Some(800));
        assert_eq!(l.retire_after(), Some(ms(600)));
        assert_eq!(v.retire_after_ms, 600);
        assert!(v.pool_idle_mismatch);
        assert_eq!((timeout.get(), mismatch.get()), (0.8, 1));
        // Bounded: only the last few closes are kept.
        for i in 0..20 {
            l.observe_close(ms(2000), t0 + ms(2000 + 600 * i));
        }
        assert_eq!(l.view().observed_closes, CLOSES);
        assert_eq!(l.view().learned_idle_timeout_ms, Some(2000));
    }

    #[test]
    fn a_keep_alive_header_is_honoured_and_the_shorter_source_wins() {
        let ms = Duration::from_millis;
        let l = IdleLearner::default();
        let (r, timeout, mismatch) = report();
        l.configure(Duration::from_secs(4), r);
        l.observe_header(Duration::from_secs(10));
        let v = l.view();
        assert_eq!(v.keep_alive_timeout_ms, Some(10_000));
        assert!(!v.pool_idle_mismatch, "10 s is longer than poolIdle");
        assert_eq!(v.retire_after_ms, 4000, "poolIdle still applies");
        assert_eq!((timeout.get(), mismatch.get()), (10.0, 0));
        l.observe_header(Duration::from_secs(5));
        l.observe_header(Duration::from_secs(2));
        assert_eq!(l.retire_after(), Some(ms(1500)));
        assert_eq!(mismatch.get(), 1);
        l.observe_close(ms(700), Instant::now());
        assert_eq!(l.retire_after(), Some(ms(525)), "the closes say sooner");
    }

    /// A writer that keeps what the log subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_mismatch_is_logged_once_with_the_fix_and_again_only_for_a_new_pool_idle() {
        let ms = Duration::from_millis;
        let out = Captured::default();
        let w = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .finish();
        let l = IdleLearner::default();
        tracing::subscriber::with_default(subscriber, || {
            l.configure(Duration::from_secs(4), report().0);
            let t0 = Instant::now();
            for i in 0..4 {
                l.observe_close(ms(1000), t0 + ms(600 * i));
            }
            l.observe_header(Duration::from_secs(1));
            // A reload with the same poolIdle: nothing new to say.
            l.configure(Duration::from_secs(4), report().0);
            // A reload with another poolIdle that is still too long: said again.
            l.configure(Duration::from_secs(3), report().0);
            // One that fits: nothing.
            l.configure(ms(700), report().0);
        });
        let text = String::from_utf8(out.0.lock().clone()).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("poolIdle")).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains("after about 1s while timeouts.poolIdle is 4s")
                && lines[0].contains("set timeouts.poolIdle to 750ms or less"),
            "{text}"
        );
        assert!(lines[1].contains("poolIdle is 3s"), "{text}");
    }
}
