//! The demo's client: a few keep-alive connections sending a mix of GETs and POSTs that carry an
//! `Idempotency-Key`, counting every answer that is not a success as a client-visible error.
//! Pointed at the sidecar it is an application with detour; pointed at the pods themselves (in
//! turn, one keep-alive connection per pod, as a client behind a plain Service) it is the same
//! application without it.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::{net::TcpStream, sync::watch, task::JoinSet};

/// Errors kept verbatim for the final report (the rest are only counted).
const KEPT_ERRORS: usize = 5;

/// Kinds of client-visible errors, as the summary lists them.
pub const GATEWAY_ANSWER: &str = "answered 502/503/504";
pub const OTHER_STATUS: &str = "answered another error status";
pub const CONNECTION_FAILED: &str = "connection refused or broken";
pub const NO_ANSWER: &str = "no answer in time";

/// What the client saw.
#[derive(Default)]
pub struct Traffic {
    pub requests: AtomicU64,
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    first_errors: Mutex<Vec<String>>,
    by_kind: Mutex<BTreeMap<&'static str, u64>>,
}

impl Traffic {
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The first few errors, described.
    pub fn first_errors(&self) -> Vec<String> {
        self.first_errors.lock().clone()
    }

    /// Errors by kind (`GATEWAY_ANSWER`, `CONNECTION_FAILED`, ...).
    pub fn errors_by_kind(&self) -> BTreeMap<&'static str, u64> {
        self.by_kind.lock().clone()
    }

    fn error(&self, kind: &'static str, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.by_kind.lock().entry(kind).or_default() += 1;
        let mut kept = self.first_errors.lock();
        if kept.len() < KEPT_ERRORS {
            kept.push(what);
        }
    }
}

/// Runs `workers` client loops until `stop` turns true, each sending its requests to `targets`
/// in turn (one address: the sidecar; several: the pods themselves).
/// `patience`: how long a client waits for an answer before it counts a timeout.
pub fn spawn(
    targets: &[SocketAddr],
    workers: usize,
    pace: Duration,
    patience: Duration,
    traffic: Arc<Traffic>,
    stop: watch::Receiver<bool>,
) -> JoinSet<()> {
    let mut set = JoinSet::new();
    for id in 0..workers {
        set.spawn(worker(
            id,
            targets.to_vec(),
            pace,
            patience,
            traffic.clone(),
            stop.clone(),
        ));
    }
    set
}

async fn worker(
    id: usize,
    targets: Vec<SocketAddr>,
    pace: Duration,
    patience: Duration,
    traffic: Arc<Traffic>,
    mut stop: watch::Receiver<bool>,
) {
    // One keep-alive connection per target; workers start on different targets.
    let mut conns: Vec<Option<SendRequest<Full<Bytes>>>> = targets.iter().map(|_| None).collect();
    let mut n: u64 = 0;
    while !*stop.borrow() {
        n += 1;
        let t = (id + n as usize) % targets.len();
        let (addr, conn) = (targets[t], &mut conns[t]);
        let sender = match conn.as_mut() {
            Some(s) if !s.is_closed() => s,
            _ => match connect(addr).await {
                Ok(s) => conn.insert(s),
                Err(e) => {
                    traffic.requests.fetch_add(1, Ordering::Relaxed);
                    traffic.error(CONNECTION_FAILED, format!("connect to {addr}: {e}"));
                    *conn = None;
                    tokio::time::sleep(pace.max(Duration::from_millis(50))).await;
                    continue;
                }
            },
        };
        let req = nth_request(id, n);
        let method = req.method().clone();
        traffic.requests.fetch_add(1, Ordering::Relaxed);
        let outcome = send(sender, req, patience).await;
        if !traffic.record(&method, outcome, patience) {
            *conn = None;
        }
        tokio::select! {
            _ = tokio::time::sleep(pace) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Request `n` of worker `id`: one in five is a POST, whose Idempotency-Key makes it safe to
/// retry; the others are GETs.
fn nth_request(id: usize, n: u64) -> Request<Full<Bytes>> {
    if n.is_multiple_of(5) {
        Request::builder()
            .method(Method::POST)
            .uri("/orders")
            .header(header::HOST, "shop.demo")
            .header("idempotency-key", format!("w{id}-{n}"))
            .body(Full::new(Bytes::from(format!(
                "{{\"order\":\"w{id}-{n}\"}}"
            ))))
    } else {
        Request::builder()
            .uri(format!("/items/{}", n % 100))
            .header(header::HOST, "shop.demo")
            .body(Full::default())
    }
    .expect("valid request")
}

/// How one request ended, as the client saw it.
enum Outcome {
    /// A response came, and its whole body.
    Answered(http::response::Parts),
    Failed(hyper::Error),
    /// Nothing within the client's patience.
    TimedOut,
}

async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
    patience: Duration,
) -> Outcome {
    let res = tokio::time::timeout(patience, async {
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        body.collect().await?;
        Ok::<_, hyper::Error>(parts)
    })
    .await;
    match res {
        Ok(Ok(parts)) => Outcome::Answered(parts),
        Ok(Err(e)) => Outcome::Failed(e),
        Err(_) => Outcome::TimedOut,
    }
}

impl Traffic {
    /// Counts how a request ended; whether its connection may carry the next one.
    fn record(&self, method: &Method, outcome: Outcome, patience: Duration) -> bool {
        match outcome {
            Outcome::Answered(parts) if parts.status.is_success() => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                true
            }
            Outcome::Answered(parts) => {
                let kind = if matches!(parts.status.as_u16(), 502..=504) {
                    GATEWAY_ANSWER
                } else {
                    OTHER_STATUS
                };
                let why = parts
                    .headers
                    .get("proxy-status")
                    .and_then(|v| v.to_str().ok())
                    .map(|v| format!(" (Proxy-Status: {v})"))
                    .unwrap_or_default();
                self.error(kind, format!("{method} answered {}{why}", parts.status));
                true
            }
            Outcome::Failed(e) => {
                self.error(CONNECTION_FAILED, format!("{method} failed: {e}"));
                false
            }
            Outcome::TimedOut => {
                self.error(
                    NO_ANSWER,
                    format!("{method} got no answer within {patience:?} (client timeout)"),
                );
                false
            }
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_request_in_five_is_a_post_with_its_own_idempotency_key() {
        let get = nth_request(2, 7);
        assert_eq!(get.method(), Method::GET);
        assert_eq!(get.uri(), "/items/7");
        assert!(get.headers().get("idempotency-key").is_none());
        let post = nth_request(2, 10);
        assert_eq!(post.method(), Method::POST);
        assert_eq!(post.uri(), "/orders");
        assert_eq!(post.headers()["idempotency-key"], "w2-10");
        assert_ne!(
            nth_request(3, 10).headers()["idempotency-key"],
            post.headers()["idempotency-key"]
        );
    }

    fn answered(status: u16, proxy_status: Option<&str>) -> Outcome {
        let mut resp = http::Response::builder().status(status);
        if let Some(v) = proxy_status {
            resp = resp.header("proxy-status", v);
        }
        Outcome::Answered(resp.body(()).unwrap().into_parts().0)
    }

    #[test]
    fn every_answer_but_a_success_is_an_error_of_its_kind() {
        let t = Traffic::default();
        let patience = Duration::from_secs(2);
        assert!(t.record(&Method::GET, answered(200, None), patience));
        assert!(t.record(
            &Method::GET,
            answered(502, Some("detour; error=x")),
            patience
        ));
        assert!(t.record(&Method::POST, answered(404, None), patience));
        assert!(!t.record(&Method::GET, Outcome::TimedOut, patience));
        assert_eq!(t.ok.load(Ordering::Relaxed), 1);
        assert_eq!(t.errors(), 3);
        assert_eq!(
            t.errors_by_kind(),
            BTreeMap::from([(GATEWAY_ANSWER, 1), (OTHER_STATUS, 1), (NO_ANSWER, 1)])
        );
        assert_eq!(
            t.first_errors(),
            [
                "GET answered 502 Bad Gateway (Proxy-Status: detour; error=x)",
                "POST answered 404 Not Found",
                "GET got no answer within 2s (client timeout)",
            ]
        );
    }
}
