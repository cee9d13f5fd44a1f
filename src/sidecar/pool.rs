//! Keep-alive connections to one endpoint.
//!
//! LIFO reuse (the warmest connection first), and no connection is reused after it has been idle
//! for `poolIdle`: closing idle connections before the upstream does is what prevents the
//! keep-alive race (a request written into a connection the upstream is closing). A connection
//! the upstream has already closed is noticed at checkout, without a system call while it has
//! not. Whether a connection was reused is reported so the rare race that still happens can be
//! told apart.

use std::{io, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use parking_lot::Mutex;
use tokio::time::{Instant, Sleep};

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

/// Cheap to clone: all clones share one set of idle connections.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    /// One lock for both: checkout and release need the config's timings anyway.
    state: Mutex<State>,
}

struct State {
    config: PoolConfig,
    idle: Vec<Idle>,
}

struct Idle {
    conn: h1::Conn,
    since: Instant,
}

/// A per-try timer that travels with its connection. Moving a timer's deadline later is one
/// atomic store while it is still armed (tokio extends it in place), where a new timer per
/// request costs a timer-wheel insertion and removal.
pub type Timer = Pin<Box<Sleep>>;

/// A connection ready to send one request.
pub struct Conn {
    pub conn: h1::Conn,
    /// It served a request before (a failure with no response byte is then a keep-alive race).
    pub reused: bool,
}

// === impl Pool ===

impl Pool {
    pub fn new(addr: SocketAddr, config: PoolConfig) -> Self {
        Pool {
            inner: Arc::new(Inner {
                addr,
                state: Mutex::new(State {
                    config,
                    idle: Vec::new(),
                }),
            }),
        }
    }

    pub fn set_config(&self, config: PoolConfig) {
        self.inner.state.lock().config = config;
    }

    pub fn config(&self) -> PoolConfig {
        self.inner.state.lock().config
    }

    pub fn idle_len(&self) -> usize {
        self.inner.state.lock().idle.len()
    }

    /// The most recently used idle connection that is still open and fresh enough. `now` is the
    /// caller's clock reading (one read per request is enough).
    pub fn checkout(&self, now: Instant) -> Option<Conn> {
        // Closed after the lock is let go: closing is a system call.
        let mut dead: Vec<Idle> = Vec::new();
        let mut state = self.inner.state.lock();
        let idle_timeout = state.config.idle_timeout;
        let idle = &mut state.idle;
        // Oldest first: whatever is past the idle timeout.
        let stale = idle
            .iter()
            .take_while(|c| c.expired(now, idle_timeout))
            .count();
        if stale > 0 {
            dead.extend(idle.drain(..stale));
        }
        // Newest first; one the upstream closed is dropped on the way.
        let mut found = None;
        while let Some(c) = idle.pop() {
            if !c.expired(now, idle_timeout) && c.conn.is_idle_usable() {
                found = Some(Conn {
                    conn: c.conn,
                    reused: true,
                });
                break;
            }
            dead.push(c);
        }
        drop(state);
        drop(dead);
        found
    }

    /// Opens a new connection, within `connect_timeout`.
    pub async fn connect(&self) -> io::Result<h1::Conn> {
        let cfg = self.config();
        tokio::time::timeout(cfg.connect_timeout, h1::Conn::connect(self.inner.addr))
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
        let mut state = self.inner.state.lock();
        let evicted = (state.idle.len() >= state.config.max_idle).then(|| state.idle.remove(0));
        state.idle.push(Idle { conn, since });
        drop(state);
        // Closed after the lock is let go: closing is a system call.
        drop(evicted);
    }

    /// Closes connections idle for `poolIdle` and those the upstream closed, so idle sockets
    /// do not linger. Run periodically by the sidecar.
    pub fn purge(&self) {
        let now = Instant::now();
        let mut state = self.inner.state.lock();
        let idle_timeout = state.config.idle_timeout;
        let (keep, dead): (Vec<Idle>, Vec<Idle>) = std::mem::take(&mut state.idle)
            .into_iter()
            .partition(|c| !c.expired(now, idle_timeout) && c.conn.is_idle_usable());
        state.idle = keep;
        drop(state);
        // Closed after the lock is let go: closing is a system call.
        drop(dead);
    }
}

// === impl Idle ===

impl Idle {
    /// Past `poolIdle`: closed rather than risked (the upstream may be closing it right now).
    fn expired(&self, now: Instant, idle_timeout: Duration) -> bool {
        now.saturating_duration_since(self.since) >= idle_timeout
    }
}

#[cfg(test)]
mod tests {
    use std::{future::poll_fn, time::Duration};

    use http::HeaderValue;

    use super::*;
    use crate::demo::pod::SimPod;
    use crate::sidecar::body::ReqBody;

    fn pool(pod: &SimPod, idle_timeout: Duration) -> Pool {
        Pool::new(
            pod.addr(),
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
        let host = HeaderValue::from_static("pod");
        let got = conn
            .send(&parts, &host, ReqBody::empty(), false)
            .await
            .expect("response head");
        assert_eq!(got.head.status, http::StatusCode::OK);
        let idle = match got.body {
            h1::Incoming::Done { idle, .. } => idle,
            h1::Incoming::Streaming(mut body) => {
                while let Some(chunk) = poll_fn(|cx| body.poll_data(cx)).await {
                    chunk.expect("body");
                }
                body.take_idle()
            }
            h1::Incoming::Upgraded { .. } => panic!("no upgrade asked"),
        };
        pool.release(idle.expect("a keep-alive connection"));
    }

    #[tokio::test]
    async fn a_finished_connection_is_reused_and_max_idle_bounds_the_pool() {
        let pod = SimPod::start("p").await.unwrap();
        let pool = pool(&pod, Duration::from_secs(60));
        assert!(
            pool.checkout(Instant::now()).is_none(),
            "nothing pooled yet"
        );
        let a = pool.connect().await.unwrap();
        let b = pool.connect().await.unwrap();
        exchange(&pool, a).await;
        exchange(&pool, b).await;
        assert_eq!(pool.idle_len(), 2);
        let first = pool.checkout(Instant::now()).expect("a pooled connection");
        assert!(first.reused);
        exchange(&pool, first.conn).await;
        // Three requests, two connections: the pool never opened a third.
        assert_eq!(pod.requests(), 3);
        assert_eq!(pod.connections(), 2);
        // max_idle 2: a third release pushes out the oldest.
        let c = pool.connect().await.unwrap();
        exchange(&pool, c).await;
        assert_eq!(pool.idle_len(), 2);
    }

    #[tokio::test]
    async fn expired_and_closed_connections_are_never_handed_out() {
        let pod = SimPod::start("p").await.unwrap();
        let short = pool(&pod, Duration::from_millis(50));
        let conn = short.connect().await.unwrap();
        exchange(&short, conn).await;
        // Generous: only "later than 50 ms" matters.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(short.checkout(Instant::now()).is_none(), "past poolIdle");
        assert_eq!(short.idle_len(), 0);

        let long = pool(&pod, Duration::from_secs(60));
        let conn = long.connect().await.unwrap();
        exchange(&long, conn).await;
        assert_eq!(long.idle_len(), 1);
        // The upstream closes its side: the connection is forgotten, by checkout or purge.
        pod.close_connections();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while long.idle_len() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "closed connection kept"
            );
            long.purge();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(long.checkout(Instant::now()).is_none());

        // Checkout alone notices a closed connection too, and hands out none.
        let conn = long.connect().await.unwrap();
        exchange(&long, conn).await;
        pod.close_connections();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            // A connection handed out while the close is still in flight goes back.
            match long.checkout(Instant::now()) {
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
}
