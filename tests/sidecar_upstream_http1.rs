//! The sidecar's own HTTP/1.1 client (`src/sidecar/h1.rs`) against a scripted upstream: a raw TCP
//! server that writes exactly the bytes each test scripts and records what it received, so every
//! test checks both what the client saw and what went over the upstream wire.

// The shared helpers re-export fault types these tests have no use for.
#[allow(unused_imports)]
mod support;

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{header, Method, Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use support::{sidecar::*, *};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, Notify},
};

// === scripted upstream ===

/// A request as the scripted upstream parsed it.
#[derive(Debug, Clone)]
struct SeenRequest {
    method: String,
    target: String,
    /// Names lower-cased, in wire order.
    headers: Vec<(String, String)>,
    /// After de-chunking; empty when the script read the head only.
    body: Vec<u8>,
}

impl SeenRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What one upstream connection received.
#[derive(Debug, Default, Clone)]
struct ConnLog {
    raw: Vec<u8>,
    requests: Vec<SeenRequest>,
    /// The sidecar closed its side.
    eof: bool,
}

type Log = Arc<Mutex<Vec<ConnLog>>>;
type Handler = Arc<dyn Fn(Peer) -> BoxFuture<'static, ()> + Send + Sync>;

struct Upstream {
    addr: SocketAddr,
    log: Log,
}

/// One step of a scripted reply.
#[derive(Clone)]
enum Step {
    Send(Vec<u8>),
    /// One byte per write, with a short pause between writes.
    Dribble(Vec<u8>),
    /// Waits until the test says go.
    Wait(Arc<Notify>),
    /// Closes the connection (the remaining replies go to later connections).
    Close,
}

fn send(s: &str) -> Step {
    Step::Send(s.as_bytes().to_vec())
}

impl Upstream {
    async fn start(handler: Handler) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Log = Arc::default();
        let l = log.clone();
        tokio::spawn(async move {
            loop {
                let Ok((io, _)) = listener.accept().await else {
                    return;
                };
                let _ = io.set_nodelay(true);
                let idx = {
                    let mut log = l.lock().unwrap();
                    log.push(ConnLog::default());
                    log.len() - 1
                };
                let peer = Peer {
                    io,
                    buf: Vec::new(),
                    idx,
                    log: l.clone(),
                };
                tokio::spawn(handler(peer));
            }
        });
        Upstream { addr, log }
    }

    /// Every request, on whichever connection, gets the next scripted reply; a connection ends
    /// after a `Close` step, or when the script has no reply left.
    async fn script(replies: Vec<Vec<Step>>) -> Upstream {
        let queue = Arc::new(Mutex::new(VecDeque::from(replies)));
        Upstream::start(Arc::new(move |mut peer: Peer| {
            let queue = queue.clone();
            Box::pin(async move {
                while peer.read_request(true).await.is_some() {
                    let Some(reply) = queue.lock().unwrap().pop_front() else {
                        return;
                    };
                    if !peer.play(reply).await {
                        return;
                    }
                }
            })
        }))
        .await
    }

    fn conns(&self) -> Vec<ConnLog> {
        self.log.lock().unwrap().clone()
    }

    /// Requests per connection, in connection order.
    fn requests_per_conn(&self) -> Vec<usize> {
        self.conns().iter().map(|c| c.requests.len()).collect()
    }

    fn requests(&self) -> Vec<SeenRequest> {
        self.conns().into_iter().flat_map(|c| c.requests).collect()
    }
}

/// The upstream's end of one connection.
struct Peer {
    io: TcpStream,
    /// Received and not yet parsed.
    buf: Vec<u8>,
    idx: usize,
    log: Log,
}

impl Peer {
    /// Reads more bytes; false at the end of the stream (or a reset).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        let n = self.io.read(&mut chunk).await.unwrap_or(0);
        let mut log = self.log.lock().unwrap();
        if n == 0 {
            log[self.idx].eof = true;
            return false;
        }
        log[self.idx].raw.extend_from_slice(&chunk[..n]);
        self.buf.extend_from_slice(&chunk[..n]);
        true
    }

    async fn line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..i].to_vec();
                self.buf.drain(..i + 2);
                return Some(line);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    /// Reads one request head and, with `body`, its body (by `Content-Length` or chunked).
    /// Records it; `None` when the connection ends first.
    async fn read_request(&mut self, body: bool) -> Option<SeenRequest> {
        let head_len = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head: Vec<u8> = self.buf.drain(..head_len).collect();
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(&head).unwrap().is_complete());
        let mut seen = SeenRequest {
            method: req.method.unwrap().to_string(),
            target: req.path.unwrap().to_string(),
            headers: req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect(),
            body: Vec::new(),
        };
        if body {
            if seen
                .header("transfer-encoding")
                .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
            {
                loop {
                    let line = self.line().await?;
                    let hex: String = String::from_utf8_lossy(&line)
                        .chars()
                        .take_while(char::is_ascii_hexdigit)
                        .collect();
                    let size = usize::from_str_radix(&hex, 16).expect("chunk size");
                    if size == 0 {
                        while !self.line().await?.is_empty() {}
                        break;
                    }
                    let data = self.take(size).await?;
                    seen.body.extend_from_slice(&data);
                    assert!(self.line().await?.is_empty(), "chunk data ends in CRLF");
                }
            } else if let Some(len) = seen.header("content-length") {
                seen.body = self.take(len.parse().unwrap()).await?;
            }
        }
        self.log.lock().unwrap()[self.idx]
            .requests
            .push(seen.clone());
        Some(seen)
    }

    /// Plays a scripted reply; false when the connection is to end.
    async fn play(&mut self, reply: Vec<Step>) -> bool {
        for step in reply {
            match step {
                Step::Send(bytes) => {
                    if self.io.write_all(&bytes).await.is_err() {
                        return false;
                    }
                }
                Step::Dribble(bytes) => {
                    for b in bytes {
                        if self.io.write_all(&[b]).await.is_err() {
                            return false;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                Step::Wait(go) => go.notified().await,
                Step::Close => return false,
            }
        }
        true
    }
}

// === sidecar and client helpers ===

struct Rig {
    up: Upstream,
    sidecar: SidecarHandle,
}

impl Rig {
    async fn start(up: Upstream, policy: Policy) -> Rig {
        let sidecar = Sidecar::start(config_for(&[up.addr], policy), Options::default())
            .await
            .expect("sidecar starts");
        Rig { up, sidecar }
    }

    fn addr(&self) -> SocketAddr {
        self.sidecar.listener_addr(UPSTREAM).unwrap()
    }

    fn metrics(&self) -> Metrics {
        Metrics::parse(&self.sidecar.metrics_text()).unwrap()
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Resp {
        send_fresh(self.addr(), req).await.expect("client request")
    }

    async fn get(&self, path: &str) -> Resp {
        self.send(request(Method::GET, path)).await
    }

    fn idle_connections(&self) -> usize {
        self.sidecar
            .upstreams()
            .into_iter()
            .flat_map(|u| u.endpoints)
            .map(|e| e.idle_connections)
            .sum()
    }
}

/// A request body the test feeds frame by frame; it ends when the sender is dropped.
struct ChanBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// Sends a request whose body the test streams; returns the response once its head is in.
async fn streamed(
    addr: SocketAddr,
    path: &str,
) -> (
    mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<hyper::Result<http::Response<hyper::body::Incoming>>>,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel(16);
    let req = Request::post(path)
        .header(header::HOST, "app.test")
        .body(ChanBody(rx))
        .unwrap();
    let resp = tokio::spawn(async move { sender.send_request(req).await });
    (tx, resp)
}

/// A 200 with a short body; keep-alive.
fn ok(body: &str) -> Vec<Step> {
    vec![Step::Send(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )]
}

fn attempt_failures(after: &Metrics, before: &Metrics, cause: &str) -> f64 {
    d(
        after,
        before,
        "detour_attempt_failures_total",
        &[("cause", cause)],
    )
}

/// The bytes after the first request head on a connection.
fn after_head(raw: &[u8]) -> &[u8] {
    let i = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a request head");
    &raw[i + 4..]
}

// === a. chunked ===

#[tokio::test]
async fn a_chunked_response_with_extensions_and_trailers_arrives_whole_and_frees_its_connection() {
    let up = Upstream::script(vec![
        vec![
            send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n5;name=value\r\nhello\r\n"),
            send("1\r\n \r\n6;a=1;b=\"q\"\r\nworld!\r\n"),
            send("0\r\nX-Sum: 42\r\n\r\n"),
        ],
        ok("second"),
    ])
    .await;
    let rig = Rig::start(up, fast_policy()).await;
    let r = rig.get("/chunked").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.text(), "hello world!");
    assert!(
        r.headers.get("x-sum").is_none(),
        "a trailer became a header"
    );
    let r = rig.get("/next").await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "second"));
    assert_eq!(
        rig.up.requests_per_conn(),
        [2],
        "the chunked response's connection was not reused"
    );
    let targets: Vec<_> = rig.up.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/chunked", "/next"]);
}

// === b. close-delimited ===

#[tokio::test]
async fn a_close_delimited_response_arrives_whole_and_its_connection_is_not_reused() {
    let body = "no length, no chunks: the close ends me";
    let up = Upstream::script(vec![
        vec![
            send("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"),
            send(&body[..10]),
            send(&body[10..]),
            Step::Close,
        ],
        ok("fresh"),
    ])
    .await;
    let rig = Rig::start(up, fast_policy()).await;
    let before = rig.metrics();
    let r = rig.get("/close").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.text(), body);
    let r = rig.get("/next").await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "fresh"));
    assert_eq!(rig.up.requests_per_conn(), [1, 1]);
    let after = rig.metrics();
    assert_eq!(
        d(&after, &before, "detour_attempt_failures_total", &[]),
        0.0
    );
    assert_eq!(
        d(&after, &before, "detour_response_body_errors_total", &[]),
        0.0
    );
}

// === c. interim responses ===

#[tokio::test]
async fn interim_100_and_103_responses_are_skipped_for_the_final_one() {
    let up = Upstream::script(vec![
        vec![
            send("HTTP/1.1 100 Continue\r\n\r\n"),
            send("HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"),
            send("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nfinal"),
        ],
        // All three in one write.
        vec![send(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.js>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nnew",
        )],
    ])
    .await;
    let rig = Rig::start(up, fast_policy()).await;
    let r = rig.get("/hints").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.text(), "final");
    assert_eq!(r.headers["x-final"], "yes");
    assert!(r.headers.get("link").is_none(), "{r:?}");
    let r = rig.get("/again").await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::CREATED, "new"));
    assert_eq!(rig.up.requests_per_conn(), [2]);
}

// === d. bodiless responses ===

#[tokio::test]
async fn head_204_and_304_responses_have_no_body_and_keep_their_connection() {
    let up = Upstream::script(vec![
        vec![send("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")],
        ok("after-head"),
        vec![send("HTTP/1.1 204 No Content\r\nX-N: 204\r\n\r\n")],
        ok("after-204"),
        vec![send(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nETag: \"v1\"\r\n\r\n",
        )],
        ok("after-304"),
    ])
    .await;
    let rig = Rig::start(up, fast_policy()).await;
    let r = rig.send(request(Method::HEAD, "/head")).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.headers[header::CONTENT_LENGTH], "10");
    assert!(r.body.is_empty());
    let r = rig.get("/1").await;
    assert_eq!(r.text(), "after-head", "{r:?}");

    let r = rig.get("/no-content").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    assert_eq!(r.headers["x-n"], "204");
    assert!(r.body.is_empty());
    let r = rig.get("/2").await;
    assert_eq!(r.text(), "after-204", "{r:?}");

    let r = rig.get("/not-modified").await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED, "{r:?}");
    assert_eq!(r.headers[header::ETAG], "\"v1\"");
    assert!(r.body.is_empty());
    let r = rig.get("/3").await;
    assert_eq!(r.text(), "after-304", "{r:?}");

    assert_eq!(
        rig.up.requests_per_conn(),
        [6],
        "a bodiless response cost its connection"
    );
    let methods: Vec<_> = rig.up.requests().into_iter().map(|r| r.method).collect();
    assert_eq!(methods, ["HEAD", "GET", "GET", "GET", "GET", "GET"]);
}

// === e. broken bodies ===

/// Sends a GET, checks the 200 head arrived, then releases `go` and reads the body, returning
/// what arrived before the break (panics if the body did not break).
async fn body_breaks_after_head(rig: &Rig, go: &Notify) -> Vec<u8> {
    let mut client = connect(rig.addr()).await.unwrap();
    let resp = within(
        PATIENCE,
        "the response head",
        client.send_request(request(Method::GET, "/broken")),
    )
    .await
    .expect("the head reaches the client");
    assert_eq!(resp.status(), StatusCode::OK);
    go.notify_one();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    loop {
        match within(PATIENCE, "a body frame", body.frame()).await {
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    got.extend_from_slice(&data);
                }
            }
            Some(Err(_)) => return got,
            None => panic!(
                "the broken body reached the client as complete: {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

/// A chunked 200 whose first chunk (`hello`) reaches the client, then `tail` once the client has
/// the head; the next request gets `next`. Returns the rig, what the client read before the
/// break and the metrics from before the request, once the break is counted as one broken body
/// and one `http_response_incomplete` attempt failure, and nothing else.
async fn broken_chunked_body(tail: Vec<Step>) -> (Rig, Vec<u8>, Metrics) {
    let go = Arc::new(Notify::new());
    let mut reply = vec![
        send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"),
        Step::Wait(go.clone()),
    ];
    reply.extend(tail);
    let up = Upstream::script(vec![reply, ok("next")]).await;
    let mut p = fast_policy();
    p.outlier_detection.consecutive_gateway_errors = 0;
    let rig = Rig::start(up, p).await;
    let before = rig.metrics();
    let got = body_breaks_after_head(&rig, &go).await;
    eventually(PATIENCE, "the broken body is counted", || {
        (attempt_failures(&rig.metrics(), &before, "http_response_incomplete") == 1.0).then_some(())
    })
    .await;
    let after = rig.metrics();
    assert_eq!(
        d(&after, &before, "detour_response_body_errors_total", &[]),
        1.0
    );
    assert_eq!(
        d(&after, &before, "detour_attempt_failures_total", &[]),
        1.0
    );
    (rig, got, before)
}

#[tokio::test]
async fn a_chunked_body_cut_off_is_a_broken_body_and_an_incomplete_response() {
    let (rig, got, before) = broken_chunked_body(vec![send("a\r\nwor"), Step::Close]).await;
    assert!(b"hellowor".starts_with(&got), "{got:?}");
    assert_eq!(d(&rig.metrics(), &before, "detour_retries_total", &[]), 0.0);
    let r = rig.get("/next").await;
    assert_eq!(r.text(), "next");
    assert_eq!(rig.up.requests_per_conn(), [1, 1]);
}

#[tokio::test]
async fn an_invalid_chunk_size_line_is_a_broken_body_and_the_connection_is_dropped() {
    // Not hex; the connection stays open: the sidecar must give up on it by itself.
    let (rig, got, _) = broken_chunked_body(vec![send("zz\r\nwhatever\r\n0\r\n\r\n")]).await;
    assert!(b"hello".starts_with(&got), "{got:?}");
    eventually(PATIENCE, "the sidecar closes the connection", || {
        (rig.up.conns()[0].eof).then_some(())
    })
    .await;
    let r = rig.get("/next").await;
    assert_eq!(r.text(), "next");
    assert_eq!(rig.up.requests_per_conn(), [1, 1]);
}

// === f. streamed uploads ===

fn small_buffer_policy() -> Policy {
    let mut p = fast_policy();
    p.retries.max_buffered_body_bytes = 1024;
    p
}

#[tokio::test]
async fn a_streamed_upload_without_length_goes_upstream_chunked() {
    let up = Upstream::script(vec![ok("stored"), ok("next")]).await;
    let rig = Rig::start(up, small_buffer_policy()).await;
    let parts: Vec<Bytes> = (0..5u8)
        .map(|i| Bytes::from(vec![b'a' + i; 700 + i as usize]))
        .collect();
    let want: Vec<u8> = parts.iter().flat_map(|b| b.to_vec()).collect();
    let (tx, resp) = streamed(rig.addr(), "/upload").await;
    for p in &parts {
        tx.send(p.clone()).await.unwrap();
    }
    drop(tx);
    let resp = within(PATIENCE, "the response", resp)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"stored");

    let seen = &rig.up.requests()[0];
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
    assert_eq!(seen.header("content-length"), None);
    assert_eq!(seen.body.len(), want.len());
    assert!(seen.body == want, "the de-chunked body differs");
    // Sent to its end: the connection serves the next request.
    assert_eq!(rig.get("/next").await.text(), "next");
    assert_eq!(rig.up.requests_per_conn(), [2]);
}

#[tokio::test]
async fn a_streamed_upload_with_length_goes_upstream_raw_with_that_length() {
    let up = Upstream::script(vec![ok("stored"), ok("next")]).await;
    let rig = Rig::start(up, small_buffer_policy()).await;
    let body: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let mut req = request_with_body(Method::PUT, "/upload", body.clone());
    req.headers_mut()
        .insert(header::CONTENT_LENGTH, body.len().into());
    let r = rig.send(req).await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "stored"));

    let conns = rig.up.conns();
    let seen = &conns[0].requests[0];
    assert_eq!(seen.header("content-length"), Some("5000"));
    assert_eq!(seen.header("transfer-encoding"), None);
    assert!(seen.body == body, "the body differs");
    // On the wire: the head, then exactly the body's bytes (then the next request's head).
    let wire = after_head(&conns[0].raw);
    assert!(wire.starts_with(&body), "raw body bytes differ");
    assert_eq!(rig.get("/next").await.text(), "next");
    let wire = after_head(&rig.up.conns()[0].raw).to_vec();
    assert!(
        wire[body.len()..].starts_with(b"GET /next HTTP/1.1\r\n"),
        "{:?}",
        String::from_utf8_lossy(&wire[body.len()..])
    );
    assert_eq!(rig.up.requests_per_conn(), [2]);
}

// === g. early responses ===

/// The first connection reads a request head only, answers 413 and closes; later ones serve.
async fn rejecting_upstream() -> Upstream {
    Upstream::start(Arc::new(|mut peer: Peer| {
        Box::pin(async move {
            if peer.idx == 0 {
                if peer.read_request(false).await.is_some() {
                    let _ = peer
                        .io
                        .write_all(
                            b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 9\r\n\r\ntoo large",
                        )
                        .await;
                }
                return;
            }
            while peer.read_request(true).await.is_some() {
                let _ = peer
                    .io
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
                    .await;
            }
        })
    }))
    .await
}

#[tokio::test]
async fn an_early_413_to_a_stalled_upload_reaches_the_client() {
    let rig = Rig::start(rejecting_upstream().await, small_buffer_policy()).await;
    let before = rig.metrics();
    let (tx, resp) = streamed(rig.addr(), "/upload").await;
    tx.send(Bytes::from(vec![b'x'; 4096])).await.unwrap();
    // The client holds the rest of its body back until it has an answer.
    let resp = within(PATIENCE, "the response", resp)
        .await
        .unwrap()
        .expect("a response before the body was done");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    drop(tx);
    let body = within(PATIENCE, "the body", resp.into_body().collect()).await;
    assert_eq!(&body.unwrap().to_bytes()[..], b"too large");
    let seen = &rig.up.requests()[0];
    assert_eq!(seen.target, "/upload");
    assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
    let after = rig.metrics();
    assert_eq!(d(&after, &before, "detour_gateway_errors_total", &[]), 0.0);
    assert_eq!(
        d(
            &after,
            &before,
            "detour_requests_total",
            &[("status", "413")]
        ),
        1.0
    );
    // The rejected connection is not reused.
    assert_eq!(rig.get("/next").await.text(), "next");
    assert_eq!(rig.up.conns().len(), 2);
}

#[tokio::test]
async fn an_early_413_to_an_upload_at_full_speed_reaches_the_client() {
    let rig = Rig::start(rejecting_upstream().await, small_buffer_policy()).await;
    let before = rig.metrics();
    // A raw client: it writes its whole body while it reads, so a reset of its own connection
    // cannot hide a response that arrived.
    let size = 32 << 20;
    let io = TcpStream::connect(rig.addr()).await.unwrap();
    let (mut rd, mut wr) = io.into_split();
    let writer = tokio::spawn(async move {
        let head =
            format!("POST /upload HTTP/1.1\r\nhost: app.test\r\ncontent-length: {size}\r\n\r\n");
        wr.write_all(head.as_bytes()).await?;
        let block = vec![b'y'; 64 * 1024];
        for _ in 0..size / block.len() {
            wr.write_all(&block).await?;
        }
        Ok::<_, std::io::Error>(wr)
    });
    let mut got = Vec::new();
    within(PATIENCE, "a response head", async {
        let mut chunk = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    writer.abort();
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 413"),
        "the client got {:?}",
        text.lines().collect::<Vec<_>>()
    );
    let after = rig.metrics();
    assert_eq!(d(&after, &before, "detour_gateway_errors_total", &[]), 0.0);
    let seen = &rig.up.requests()[0];
    assert_eq!(
        seen.header("content-length"),
        Some(size.to_string().as_str())
    );
}

// === h. dribbled responses ===

#[tokio::test]
async fn a_response_dribbled_one_byte_at_a_time_parses() {
    let up = Upstream::script(vec![
        vec![Step::Dribble(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n5;x=y\r\npedia\r\n0\r\nT: 1\r\n\r\n".to_vec(),
        )],
        vec![Step::Dribble(
            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Slow: 1\r\n\r\nhello world".to_vec(),
        )],
    ])
    .await;
    let mut p = fast_policy();
    // Each byte is a write and a timer: slow on a busy machine, never too slow for these.
    p.retries.per_try_timeout = CfgDuration::from_secs(20);
    p.timeouts.request = CfgDuration::from_secs(30);
    let rig = Rig::start(up, p).await;
    let mut client = connect(rig.addr()).await.unwrap();
    let r = within(
        Duration::from_secs(30),
        "the dribbled response",
        send_on(&mut client, request(Method::GET, "/slow/1")),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "wikipedia"));
    assert_eq!(r.headers[header::CONTENT_TYPE], "text/plain");
    let r = within(
        Duration::from_secs(30),
        "the dribbled response",
        send_on(&mut client, request(Method::GET, "/slow/2")),
    )
    .await
    .unwrap();
    assert_eq!(
        (r.status, r.text().as_str()),
        (StatusCode::OK, "hello world")
    );
    assert_eq!(r.headers["x-slow"], "1");
    assert_eq!(rig.up.requests_per_conn(), [2]);
}

// === i. protocol errors ===

fn no_retry_policy() -> Policy {
    let mut p = fast_policy();
    p.retries.attempts = 0;
    p.outlier_detection.consecutive_gateway_errors = 0;
    p
}

async fn assert_protocol_error(reply: Vec<Step>) {
    let up = Upstream::script(vec![reply]).await;
    let rig = Rig::start(up, no_retry_policy()).await;
    let before = rig.metrics();
    let r = rig.get("/bad").await;
    assert_eq!(
        r.status,
        StatusCode::BAD_GATEWAY,
        "{} response headers",
        r.headers.len()
    );
    assert_eq!(r.proxy_error().error, "http_protocol_error", "{r:?}");
    let after = rig.metrics();
    assert_eq!(
        attempt_failures(&after, &before, "http_protocol_error"),
        1.0
    );
    assert_eq!(rig.up.requests().len(), 1);
}

#[tokio::test]
async fn conflicting_content_lengths_are_a_protocol_error() {
    assert_protocol_error(vec![send(
        "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    )])
    .await;
}

#[tokio::test]
async fn a_response_head_larger_than_64_kib_is_a_protocol_error() {
    // 70 headers of 1000 bytes: under the header-count limit, over the size limit.
    let pad = "p".repeat(990);
    let fields: String = (0..70)
        .map(|i| format!("x-pad-{i:02}: {pad}\r\n"))
        .collect();
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n{fields}\r\nok");
    assert!(head.len() > 70 * 1000);
    assert_protocol_error(vec![Step::Send(head.into_bytes())]).await;
}

#[tokio::test]
async fn a_response_head_larger_than_64_kib_is_refused_however_it_is_split() {
    // 65,000 bytes first: the sidecar reads them (8 + 8 + 16 + 33 KiB) into a 64 KiB buffer
    // without reaching the limit, grows the buffer, and the last 1,000 bytes complete the head
    // in one read. The pause only gives the sidecar time to read the first part: were it too
    // short, both parts would arrive together and the head would be refused, as it should be.
    let pad = "p".repeat(990);
    let fields: String = (0..65)
        .map(|i| format!("x-pad-{i:02}: {pad}\r\n"))
        .collect();
    let mut head = format!("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n{fields}").into_bytes();
    let filler = 66_000 - head.len() - "x-last: \r\n\r\nok".len();
    head.extend_from_slice(format!("x-last: {}\r\n\r\nok", "q".repeat(filler)).as_bytes());
    assert_eq!(head.len(), 66_000);
    let rest = head.split_off(65_000);
    let go = Arc::new(Notify::new());
    let pause = go.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        pause.notify_one();
    });
    assert_protocol_error(vec![Step::Send(head), Step::Wait(go), Step::Send(rest)]).await;
}

// === j. idle connection closed by the upstream ===

#[tokio::test]
async fn an_idle_connection_the_upstream_closed_is_not_used_again() {
    let close = Arc::new(Notify::new());
    let up = Upstream::script(vec![
        // Keep-alive as far as the head says; then the upstream closes it while it is idle.
        vec![
            send("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"),
            Step::Wait(close.clone()),
            Step::Close,
        ],
        ok("second"),
    ])
    .await;
    let mut p = fast_policy();
    // Only the upstream's close may take the connection out of the pool.
    p.timeouts.pool_idle = CfgDuration::from_secs(30);
    let rig = Rig::start(up, p).await;
    assert_eq!(rig.get("/1").await.text(), "first");
    assert_eq!(rig.idle_connections(), 1);
    let before = rig.metrics();
    close.notify_one();
    eventually(PATIENCE, "the sidecar notices the close", || {
        (rig.idle_connections() == 0).then_some(())
    })
    .await;
    let r = rig.get("/2").await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "second"));
    assert_eq!(rig.up.requests_per_conn(), [1, 1]);
    let after = rig.metrics();
    assert_eq!(d(&after, &before, "detour_keepalive_races_total", &[]), 0.0);
    assert_eq!(
        d(&after, &before, "detour_attempt_failures_total", &[]),
        0.0
    );
}

// === k. upgrades ===

#[tokio::test]
async fn an_upgrade_passes_protocol_bytes_sent_with_the_101_then_echoes() {
    let up = Upstream::start(Arc::new(|mut peer: Peer| {
        Box::pin(async move {
            if peer.read_request(false).await.is_none() {
                return;
            }
            let _ = peer
                .io
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nEARLY:hello-from-upstream;")
                .await;
            // Echo, starting with whatever came after the head.
            loop {
                if !peer.buf.is_empty() {
                    let data = std::mem::take(&mut peer.buf);
                    if peer.io.write_all(&data).await.is_err() {
                        return;
                    }
                }
                if !peer.fill().await {
                    return;
                }
            }
        })
    }))
    .await;
    let rig = Rig::start(up, fast_policy()).await;
    let mut conn = connect(rig.addr()).await.unwrap();
    let req = Request::builder()
        .uri("/ws")
        .header(header::HOST, "app.test")
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-version", "13")
        .body(Full::default())
        .unwrap();
    let resp = within(PATIENCE, "the 101", conn.send_request(req))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = within(PATIENCE, "the upgrade", hyper::upgrade::on(resp))
        .await
        .unwrap();
    let mut io = TokioIo::new(upgraded);
    let early = b"EARLY:hello-from-upstream;";
    let mut buf = vec![0u8; early.len()];
    within(PATIENCE, "the early bytes", io.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(buf, early);
    for msg in [&b"ping"[..], &b"a second frame, longer"[..]] {
        io.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        within(PATIENCE, "the echo", io.read_exact(&mut buf))
            .await
            .unwrap();
        assert_eq!(buf, msg);
    }
    let seen = &rig.up.requests()[0];
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    assert!(seen
        .header("connection")
        .is_some_and(|c| c.eq_ignore_ascii_case("upgrade")));
    assert_eq!(
        seen.header("sec-websocket-key"),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );
    assert_eq!(rig.up.conns().len(), 1);
}

// === review follow-ups ===

#[tokio::test]
async fn a_content_length_body_longer_than_one_read_frees_its_connection() {
    // hyper stops polling a body once it says it has ended: the connection must be freed with
    // the last bytes, not on a final poll.
    let big = vec![b'z'; 300_000];
    let mut reply =
        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", big.len()).into_bytes();
    reply.extend_from_slice(&big);
    let up = Upstream::script(vec![vec![Step::Send(reply)], ok("next")]).await;
    let rig = Rig::start(up, fast_policy()).await;
    let r = rig.get("/big").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text().len(), big.len());
    eventually(PATIENCE, "the connection is back in the pool", || {
        (rig.idle_connections() == 1).then_some(())
    })
    .await;
    assert_eq!(rig.get("/next").await.text(), "next");
    assert_eq!(rig.up.requests_per_conn(), [2]);
}

#[tokio::test]
async fn a_100_continue_while_the_body_streams_lets_the_body_go_on() {
    let sent_continue = Arc::new(Notify::new());
    let told = sent_continue.clone();
    let up = Upstream::start(Arc::new(move |mut peer: Peer| {
        let told = told.clone();
        Box::pin(async move {
            if peer.read_request(false).await.is_none() {
                return;
            }
            if peer
                .io
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            told.notify_one();
            // The rest of the chunked body, to its last chunk.
            while !peer.buf.ends_with(b"0\r\n\r\n") {
                if !peer.fill().await {
                    return;
                }
            }
            let _ = peer
                .io
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
                .await;
        })
    }))
    .await;
    let rig = Rig::start(up, small_buffer_policy()).await;
    let (tx, resp) = streamed(rig.addr(), "/upload").await;
    tx.send(Bytes::from(vec![b'a'; 2048])).await.unwrap();
    within(PATIENCE, "the 100 Continue", sent_continue.notified()).await;
    // Let the sidecar see the 100 while the body is still open.
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.send(Bytes::from(vec![b'b'; 2048])).await.unwrap();
    drop(tx);
    let resp = within(PATIENCE, "the final response", resp)
        .await
        .unwrap()
        .expect("a response");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"done");
    let raw = rig.up.conns()[0].raw.clone();
    let body_bytes = after_head(&raw);
    assert!(
        body_bytes.windows(4).any(|w| w == b"bbbb"),
        "the rest of the body never reached the upstream"
    );
}

#[tokio::test]
async fn transfer_encoding_wins_over_content_length_and_the_length_is_not_passed_on() {
    let up = Upstream::script(vec![
        vec![send(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )],
        ok("next"),
    ])
    .await;
    let rig = Rig::start(up, fast_policy()).await;
    let r = rig.get("/both").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "hello", "the body was framed by the stale length");
    assert_ne!(
        r.headers.get(header::CONTENT_LENGTH).map(|v| v.as_bytes()),
        Some(&b"3"[..])
    );
    // Such a connection is not trusted again.
    assert_eq!(rig.get("/next").await.text(), "next");
    assert_eq!(rig.up.requests_per_conn(), [1, 1]);
}

#[tokio::test]
async fn connect_is_refused_with_501_and_never_reaches_the_upstream() {
    let up = Upstream::script(vec![ok("never")]).await;
    let rig = Rig::start(up, fast_policy()).await;
    let got = raw_exchange(
        rig.addr(),
        "CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 501"), "{got:?}");
    assert!(rig.up.conns().is_empty());
}

/// Writes `wire` to a new client connection and returns the response head (as text).
async fn raw_exchange(addr: SocketAddr, wire: &str) -> String {
    let mut io = TcpStream::connect(addr).await.unwrap();
    io.write_all(wire.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = within(PATIENCE, "the answer", io.read(&mut chunk))
            .await
            .unwrap();
        assert!(
            n > 0,
            "closed without an answer: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

// === l. RFC 9112 rules for requests (§3.2, §6.1) ===

#[tokio::test]
async fn a_request_with_two_host_lines_gets_400_and_never_reaches_the_upstream() {
    let up = Upstream::script(vec![ok("never")]).await;
    let rig = Rig::start(up, fast_policy()).await;
    let got = raw_exchange(
        rig.addr(),
        "GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got:?}");
    assert!(rig.up.conns().is_empty());
}

#[tokio::test]
async fn an_absolute_form_target_replaces_host() {
    let up = Upstream::script(vec![ok("abs")]).await;
    let rig = Rig::start(up, fast_policy()).await;
    let got = raw_exchange(
        rig.addr(),
        "GET http://shop.example:8080/p?q=1 HTTP/1.1\r\nHost: wrong.example\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
    let seen = rig.up.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "/p?q=1");
    let hosts: Vec<_> = seen[0]
        .headers
        .iter()
        .filter(|(n, _)| n == "host")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(hosts, ["shop.example:8080"]);
}

#[tokio::test]
async fn a_request_coding_before_chunked_gets_501_and_other_codings_keep_hyper_400() {
    let up = Upstream::script(vec![ok("never")]).await;
    let rig = Rig::start(up, fast_policy()).await;
    let body = "5\r\nhello\r\n0\r\n\r\n";
    for (codings, status) in [
        ("gzip, chunked", "501"),
        ("gzip\r\nTransfer-Encoding: chunked", "501"),
        ("chunked, gzip", "400"),
        ("gzip", "400"),
        ("identity", "400"),
    ] {
        let got = raw_exchange(
            rig.addr(),
            &format!(
                "POST /up HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: {codings}\r\n\r\n{body}"
            ),
        )
        .await;
        assert!(
            got.starts_with(&format!("HTTP/1.1 {status}")),
            "{codings:?}: {got:?}"
        );
    }
    assert!(rig.up.conns().is_empty(), "nothing reached the upstream");
}

// === m. response transfer codings ===

#[tokio::test]
async fn a_response_coded_gzip_then_chunked_is_a_protocol_error_not_passed_on() {
    assert_protocol_error(vec![send(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\ngz!\r\n0\r\n\r\n",
    )])
    .await;
}

#[tokio::test]
async fn a_response_coded_chunked_then_gzip_read_until_close_is_a_protocol_error() {
    assert_protocol_error(vec![
        send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\ncompressed"),
        Step::Close,
    ])
    .await;
}

#[tokio::test]
async fn a_response_coded_gzip_alone_is_a_protocol_error() {
    assert_protocol_error(vec![
        send("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\ncompressed"),
        Step::Close,
    ])
    .await;
}

// === n. idle timeouts: the upstream's Keep-Alive header and its closes ===

/// Answers every request with `reply`, and closes a connection once it has been idle for
/// `idle` (a server's keep-alive timeout, closing without warning as most servers do).
async fn idle_closing(idle: Duration, reply: &'static str) -> Upstream {
    Upstream::start(Arc::new(move |mut peer: Peer| {
        Box::pin(async move {
            while let Ok(Some(_)) = tokio::time::timeout(idle, peer.read_request(true)).await {
                if !peer.play(vec![send(reply)]).await {
                    return;
                }
            }
        })
    }))
    .await
}

async fn admin_config(rig: &Rig) -> serde_json::Value {
    let r = send_fresh(rig.sidecar.admin_addr(), request(Method::GET, "/config"))
        .await
        .unwrap();
    serde_json::from_slice(&r.body).unwrap()
}

fn long_pool_idle() -> Policy {
    let mut p = fast_policy();
    // Only what the upstream says or does may retire a connection early.
    p.timeouts.pool_idle = CfgDuration::from_secs(30);
    p
}

#[tokio::test]
async fn a_keep_alive_timeout_header_retires_the_connection_before_it() {
    // The upstream announces 1 s and, so that only the header can explain a new connection,
    // keeps idle connections far longer.
    let up = idle_closing(
        Duration::from_secs(60),
        "HTTP/1.1 200 OK\r\nKeep-Alive: timeout=1, max=100\r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    let rig = Rig::start(up, long_pool_idle()).await;
    assert_eq!(rig.get("/1").await.status, StatusCode::OK);
    assert_eq!(rig.get("/2").await.status, StatusCode::OK);
    // Past 750 ms (1 s less its margin), well short of 30 s.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let r = rig.get("/3").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!r.headers.contains_key("keep-alive"), "hop-by-hop");
    assert_eq!(rig.up.requests_per_conn(), [2, 1]);
    let idle = &admin_config(&rig).await["idleTimeouts"][UPSTREAM];
    assert_eq!(idle["keepAliveTimeoutMs"], 1000, "{idle}");
    assert_eq!(idle["retireAfterMs"], 750, "{idle}");
    assert_eq!(idle["poolIdleMismatch"], true, "{idle}");
    let m = rig.metrics();
    let up = [("upstream", UPSTREAM)];
    assert_eq!(
        support::sidecar::m(&m, "detour_upstream_idle_timeout_seconds", &up),
        1.0
    );
    assert_eq!(
        support::sidecar::m(&m, "detour_pool_idle_mismatch", &up),
        1.0
    );
}

#[tokio::test]
async fn an_idle_timeout_is_learned_from_the_upstreams_closes_and_posts_go_out_before_it() {
    const CLOSES_AFTER: Duration = Duration::from_millis(400);
    let up = idle_closing(
        CLOSES_AFTER,
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    let rig = Rig::start(up, long_pool_idle()).await;
    let before = rig.metrics();
    // Each round: one request, then the upstream closes the idle connection and the sidecar
    // notices (its reaper looks every 250 ms). No request meets a closed connection here.
    let learned = within(PATIENCE, "a learned idle timeout", async {
        loop {
            assert_eq!(rig.get("/learn").await.status, StatusCode::OK);
            eventually(PATIENCE, "the close is noticed", || {
                (rig.idle_connections() == 0).then_some(())
            })
            .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Some(ms) =
                admin_config(&rig).await["idleTimeouts"][UPSTREAM]["learnedIdleTimeoutMs"].as_u64()
            {
                break Duration::from_millis(ms);
            }
        }
    })
    .await;
    // A lower bound: the last time a connection was seen open before the upstream closed it.
    assert!(learned <= CLOSES_AFTER && !learned.is_zero(), "{learned:?}");
    let idle = &admin_config(&rig).await["idleTimeouts"][UPSTREAM];
    let retire = Duration::from_millis(idle["retireAfterMs"].as_u64().unwrap());
    assert!(retire < learned, "{idle}");
    assert_eq!(idle["poolIdleMismatch"], true, "{idle}");
    let m = rig.metrics();
    let up = [("upstream", UPSTREAM)];
    // `/config` shows whole milliseconds.
    let gauge = support::sidecar::m(&m, "detour_upstream_idle_timeout_seconds", &up);
    assert!((gauge - learned.as_secs_f64()).abs() < 0.001, "{gauge}");
    assert_eq!(
        support::sidecar::m(&m, "detour_pool_idle_mismatch", &up),
        1.0
    );

    // POSTs (not replayable) a little after the retirement point and before the upstream's
    // close: each goes out on a new connection, none meets a closed one.
    let conns = rig.up.conns().len();
    for i in 0..3 {
        let r = rig
            .send(request_with_body(Method::POST, "/order", "id=1"))
            .await;
        assert_eq!(r.status, StatusCode::OK, "POST {i}");
        tokio::time::sleep(retire + Duration::from_millis(50)).await;
    }
    assert_eq!(
        rig.up.conns().len(),
        conns + 3,
        "{:?}",
        rig.up.requests_per_conn()
    );
    let after = rig.metrics();
    assert_eq!(d(&after, &before, "detour_keepalive_races_total", &[]), 0.0);
    assert_eq!(
        d(&after, &before, "detour_attempt_failures_total", &[]),
        0.0
    );
}
