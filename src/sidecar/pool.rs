//! Keep-alive connections to one endpoint.
//!
//! LIFO reuse (the warmest connection first), and no connection is reused after it has been idle
//! for `poolIdle`: closing idle connections before the upstream does is what prevents the
//! keep-alive race (a request written into a connection the upstream is closing). Whether a
//! connection was reused is reported so the rare race that still happens can be told apart.

use std::{io, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::{
    net::TcpStream,
    time::{Instant, Sleep},
};

use super::body::ReqBody;

pub type Sender = http1::SendRequest<ReqBody>;

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
    tx: Sender,
    since: Instant,
    timer: Option<Timer>,
}

/// A per-try timer that travels with its connection. Moving a timer's deadline later is one
/// atomic store while it is still armed (tokio extends it in place), where a new timer per
/// request costs a timer-wheel insertion and removal.
pub type Timer = Pin<Box<Sleep>>;

/// A connection ready to send one request.
pub struct Conn {
    pub tx: Sender,
    /// It served a request before (a failure with no response byte is then a keep-alive race).
    pub reused: bool,
    pub timer: Option<Timer>,
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

    /// The most recently used connection that is idle (ready), still open and fresh enough.
    ///
    /// Connections go back into the pool as soon as their response head is in, still busy with
    /// the body; the connection task flips them to ready when the body is done, so returning a
    /// connection costs no task and no wake-up.
    pub fn checkout(&self) -> Option<Conn> {
        let now = Instant::now();
        let mut state = self.inner.state.lock();
        let idle_timeout = state.config.idle_timeout;
        let idle = &mut state.idle;
        // Oldest first: drop whatever is past the idle timeout, and closed connections.
        let stale = idle
            .iter()
            .take_while(|c| c.expired(now, idle_timeout))
            .count();
        idle.drain(..stale);
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            if idle[i].tx.is_closed() {
                idle.remove(i);
            } else if idle[i].tx.is_ready() {
                let c = idle.remove(i);
                return Some(Conn {
                    tx: c.tx,
                    reused: true,
                    timer: c.timer,
                });
            }
        }
        None
    }

    /// Opens a new connection (with upgrade support when asked: such connections are not pooled).
    pub async fn connect(&self, upgrades: bool) -> io::Result<Sender> {
        let cfg = self.config();
        let stream = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(self.inner.addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", cfg.connect_timeout),
                )
            })??;
        let _ = stream.set_nodelay(true);
        // One buffer, one write per request head (and small body): see the server side.
        let (tx, conn) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        if upgrades {
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
        } else {
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
        Ok(tx)
    }

    /// Returns a connection whose response head has arrived. It is handed out again only once
    /// its response body has been read to the end; if the body is abandoned the connection
    /// closes and is dropped at the next checkout.
    pub fn release(&self, tx: Sender, timer: Option<Timer>) {
        let since = Instant::now();
        let mut state = self.inner.state.lock();
        if state.idle.len() >= state.config.max_idle {
            state.idle.remove(0);
        }
        state.idle.push(Idle { tx, since, timer });
    }

    /// Closes connections idle for `poolIdle` (and forgets closed ones), so idle sockets do not
    /// linger until the upstream closes them. Run periodically by the sidecar.
    pub fn purge(&self) {
        let now = Instant::now();
        let mut state = self.inner.state.lock();
        let idle_timeout = state.config.idle_timeout;
        state
            .idle
            .retain(|c| !c.tx.is_closed() && !c.expired(now, idle_timeout));
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
    use std::time::Duration;

    use http_body_util::BodyExt;

    use super::*;
    use crate::demo::pod::SimPod;

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

    /// Sends one GET on `tx`, returns it to the pool at the response head (as the proxy does)
    /// and reads the body to the end, which makes the connection ready again.
    async fn exchange(pool: &Pool, mut tx: Sender) {
        let req = http::Request::get("/")
            .header(http::header::HOST, "pod")
            .body(ReqBody::empty())
            .unwrap();
        let resp = tx.send_request(req).await.expect("response head");
        assert_eq!(resp.status(), http::StatusCode::OK);
        pool.release(tx, None);
        resp.into_body().collect().await.expect("body");
    }

    /// Gives the connection task the turn in which it marks a finished connection ready.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_finished_connection_is_reused_and_max_idle_bounds_the_pool() {
        let pod = SimPod::start("p").await.unwrap();
        let pool = pool(&pod, Duration::from_secs(60));
        assert!(pool.checkout().is_none(), "nothing pooled yet");
        let a = pool.connect(false).await.unwrap();
        let b = pool.connect(false).await.unwrap();
        exchange(&pool, a).await;
        exchange(&pool, b).await;
        settle().await;
        assert_eq!(pool.idle_len(), 2);
        let first = pool.checkout().expect("a pooled connection");
        assert!(first.reused);
        exchange(&pool, first.tx).await;
        settle().await;
        // Three requests, two connections: the pool never opened a third.
        assert_eq!(pod.requests(), 3);
        assert_eq!(pod.connections(), 2);
        // max_idle 2: a third release pushes out the oldest.
        let c = pool.connect(false).await.unwrap();
        exchange(&pool, c).await;
        assert_eq!(pool.idle_len(), 2);
    }

    #[tokio::test]
    async fn expired_and_closed_connections_are_never_handed_out() {
        let pod = SimPod::start("p").await.unwrap();
        let short = pool(&pod, Duration::from_millis(50));
        let tx = short.connect(false).await.unwrap();
        exchange(&short, tx).await;
        // Generous: only "later than 50 ms" matters.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(short.checkout().is_none(), "past poolIdle");
        assert_eq!(short.idle_len(), 0);

        let long = pool(&pod, Duration::from_secs(60));
        let tx = long.connect(false).await.unwrap();
        exchange(&long, tx).await;
        settle().await;
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
        assert!(long.checkout().is_none());
    }
}
