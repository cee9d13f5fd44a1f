//! The demo's client: a few keep-alive connections sending a mix of GETs and POSTs that carry an
//! `Idempotency-Key`, counting every answer that is not a success as a client-visible error.

use std::{
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

/// What the client saw.
#[derive(Default)]
pub struct Traffic {
    pub requests: AtomicU64,
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    first_errors: Mutex<Vec<String>>,
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

    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut kept = self.first_errors.lock();
        if kept.len() < KEPT_ERRORS {
            kept.push(what);
        }
    }
}

/// Runs `workers` client loops against `addr` until `stop` turns true.
/// `patience`: how long a client waits for an answer before it counts a timeout.
pub fn spawn(
    addr: SocketAddr,
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
            addr,
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
    addr: SocketAddr,
    pace: Duration,
    patience: Duration,
    traffic: Arc<Traffic>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conn: Option<SendRequest<Full<Bytes>>> = None;
    let mut n: u64 = 0;
    while !*stop.borrow() {
        n += 1;
        let sender = match conn.as_mut() {
            Some(s) if !s.is_closed() => s,
            _ => match connect(addr).await {
                Ok(s) => conn.insert(s),
                Err(e) => {
                    traffic.requests.fetch_add(1, Ordering::Relaxed);
                    traffic.error(format!("connect to the sidecar: {e}"));
                    conn = None;
                    tokio::time::sleep(pace.max(Duration::from_millis(50))).await;
                    continue;
                }
            },
        };
        // One request in five is a POST; its Idempotency-Key makes it safe to retry.
        let req = if n.is_multiple_of(5) {
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
        .expect("valid request");
        let method = req.method().clone();
        traffic.requests.fetch_add(1, Ordering::Relaxed);
        let res = tokio::time::timeout(patience, async {
            sender.ready().await?;
            let resp = sender.send_request(req).await?;
            let (parts, body) = resp.into_parts();
            body.collect().await?;
            Ok::<_, hyper::Error>(parts)
        })
        .await;
        match res {
            Ok(Ok(parts)) if parts.status.is_success() => {
                traffic.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(parts)) => {
                let why = parts
                    .headers
                    .get("proxy-status")
                    .and_then(|v| v.to_str().ok())
                    .map(|v| format!(" (Proxy-Status: {v})"))
                    .unwrap_or_default();
                traffic.error(format!("{method} answered {}{why}", parts.status));
            }
            Ok(Err(e)) => {
                traffic.error(format!("{method} failed: {e}"));
                conn = None;
            }
            Err(_) => {
                traffic.error(format!(
                    "{method} got no answer within {patience:?} (client timeout)"
                ));
                conn = None;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pace) => {}
            _ = stop.changed() => {}
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
