//! Reverse-proxy HTTP semantics: header rewriting, upgrades passed through, graceful shutdown.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use support::{sidecar::*, *};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn hop_by_hop_headers_are_removed_and_forwarding_headers_added() {
    let h = Harness::start(1, fast_policy()).await;
    let req = Request::builder()
        .method(Method::PUT)
        .uri("/things/7?x=1")
        .header(header::HOST, "app.example:8080")
        .header(header::CONNECTION, "keep-alive, x-session-hop")
        .header("x-session-hop", "per-connection")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header(header::TE, "trailers")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let r = h.send(req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "payload");

    let rec = h.pods[0].last_request().expect("the pod got the request");
    assert_eq!(rec.method, Method::PUT);
    assert_eq!(rec.uri.to_string(), "/things/7?x=1");
    let hd = &rec.headers;
    for gone in ["x-session-hop", "keep-alive", "proxy-connection", "te"] {
        assert!(!hd.contains_key(gone), "{gone} was forwarded: {hd:?}");
    }
    // The upstream connection's own `Connection` header, if any, names nothing of the client's.
    for v in hd.get_all(header::CONNECTION) {
        assert!(!v.to_str().unwrap().contains("x-session-hop"), "{hd:?}");
    }
    assert_eq!(hd["x-end-to-end"], "kept");
    assert_eq!(
        hd[header::HOST],
        "app.example:8080",
        "Host is what the client asked for"
    );
    assert!(
        hd[header::VIA].to_str().unwrap().contains("detour"),
        "{:?}",
        hd[header::VIA]
    );
    assert_eq!(hd["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(hd["x-forwarded-proto"], "http");
    assert_eq!(hd["x-forwarded-host"], "app.example:8080");
    assert_eq!(&rec.body[..], b"payload");
    assert_eq!(rec.version, http::Version::HTTP_11);
}

#[tokio::test]
async fn a_client_keep_alive_connection_serves_many_requests() {
    let h = Harness::start(2, fast_policy()).await;
    let mut conn = connect(h.addr()).await.unwrap();
    for n in 0..20 {
        let r = send_on(&mut conn, request(Method::GET, &format!("/{n}")))
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
    }
    // The sidecar pools its upstream connections too: far fewer than one per request.
    let conns: u64 = h.pods.iter().map(SimPod::connections).sum();
    assert!(
        conns <= 4,
        "{conns} upstream connections for 20 sequential requests"
    );
}

#[tokio::test]
async fn websocket_upgrade_passes_through() {
    let h = Harness::start(1, fast_policy()).await;
    let mut conn = connect(h.addr()).await.unwrap();
    let req = Request::builder()
        .uri("/chat")
        .header(header::HOST, "app.test")
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Full::default())
        .unwrap();
    let resp = within(PATIENCE, "101", conn.send_request(req))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(resp.headers()[header::UPGRADE], "websocket");
    let rec = h.pods[0].last_request().unwrap();
    assert_eq!(rec.headers[header::UPGRADE], "websocket");
    assert_eq!(rec.headers["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");

    let upgraded = within(PATIENCE, "upgrade", hyper::upgrade::on(resp))
        .await
        .unwrap();
    let mut io = TokioIo::new(upgraded);
    for msg in [&b"hello through detour"[..], &b"and a second frame"[..]] {
        io.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        within(PATIENCE, "echo", io.read_exact(&mut buf))
            .await
            .unwrap();
        assert_eq!(buf, msg);
    }
}

#[tokio::test]
async fn graceful_shutdown_finishes_an_in_flight_slow_request() {
    let h = Harness::start(1, fast_policy()).await;
    h.pods[0]
        .set_fault(Fault::Slow(Duration::from_millis(250)))
        .await
        .unwrap();
    let addr = h.addr();
    let in_flight = tokio::spawn(send_fresh(addr, request(Method::GET, "/slow")));
    eventually(PATIENCE, "the slow request reached the pod", || {
        (h.pods[0].requests() == 1).then_some(())
    })
    .await;

    let Harness { sidecar, pods, .. } = h;
    let t = std::time::Instant::now();
    within(
        PATIENCE,
        "shutdown",
        sidecar.shutdown(Duration::from_secs(5)),
    )
    .await;
    let r = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.pod(), Some("pod-0"));
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "drain waited for the timeout"
    );
    // No new connections once shut down.
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(refused.is_err(), "still accepting after shutdown");
    drop(pods);
}

#[tokio::test]
async fn shutdown_gives_up_on_requests_slower_than_the_drain_timeout() {
    let h = Harness::start(1, fast_policy()).await;
    h.pods[0].set_fault(Fault::Hang).await.unwrap();
    let mut policy = fast_policy();
    policy.retries.per_try_timeout = CfgDuration::from_secs(3);
    h.sidecar
        .apply(config_for(&[h.pods[0].addr()], policy))
        .await
        .unwrap();
    let addr = h.addr();
    let _stuck = tokio::spawn(send_fresh(addr, request(Method::GET, "/stuck")));
    eventually(PATIENCE, "the request reached the pod", || {
        (h.pods[0].requests() == 1).then_some(())
    })
    .await;
    let t = std::time::Instant::now();
    h.sidecar.shutdown(Duration::from_millis(200)).await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test]
async fn a_client_connection_close_does_not_close_the_upstream_connection() {
    let h = Harness::start(1, fast_policy()).await;
    for n in 0..5 {
        let mut req = request(Method::GET, &format!("/{n}"));
        req.headers_mut()
            .insert(header::CONNECTION, "close".parse().unwrap());
        let r = h.send(req).await;
        assert_eq!(r.status, StatusCode::OK);
        let rec = h.pods[0].last_request().unwrap();
        assert!(
            rec.headers
                .get(header::CONNECTION)
                .is_none_or(|v| v != "close"),
            "the client's Connection: close was forwarded"
        );
    }
    assert_eq!(
        h.pods[0].connections(),
        1,
        "the pooled upstream connection was not reused"
    );
}

#[tokio::test]
async fn http_1_0_clients_are_served() {
    let h = Harness::start(1, fast_policy()).await;
    let mut s = tokio::net::TcpStream::connect(h.addr()).await.unwrap();
    s.write_all(b"GET /old HTTP/1.0\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    within(PATIENCE, "an HTTP/1.0 answer", s.read_to_end(&mut out))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1."), "{text}");
    assert!(text.contains(" 200 "), "{text}");
    assert!(text.ends_with("pod-0\n"), "{text}");
}

/// Sends one GET on a raw connection and reads its response (head and content-length body).
async fn raw_get(s: &mut tokio::net::TcpStream) -> String {
    s.write_all(b"GET /idle HTTP/1.1\r\nhost: app\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .expect("a content-length response");
            if got.len() >= end + 4 + len {
                return String::from_utf8_lossy(&got).into_owned();
            }
        }
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed mid-response");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_client_connection_is_closed_after_30_to_40_seconds() {
    let h = Harness::start(1, fast_policy()).await;
    let mut s = tokio::net::TcpStream::connect(h.addr()).await.unwrap();
    assert!(raw_get(&mut s).await.starts_with("HTTP/1.1 200"));
    // Idle for less than 30 s: still open.
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert!(raw_get(&mut s).await.starts_with("HTTP/1.1 200"));
    // Idle for 45 s: the sidecar has closed it (end of stream, nothing else).
    tokio::time::sleep(Duration::from_secs(45)).await;
    let mut buf = [0u8; 64];
    let n = within(Duration::from_secs(1), "end of stream", s.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(n, 0, "expected the idle connection closed");
}

#[tokio::test(start_paused = true)]
async fn a_request_slower_than_the_idle_timeout_is_not_cut() {
    let mut policy = fast_policy();
    policy.retries.per_try_timeout = CfgDuration::from_secs(90);
    policy.timeouts.request = CfgDuration::from_secs(120);
    let h = Harness::start(1, policy).await;
    h.pods[0]
        .set_fault(Fault::Slow(Duration::from_secs(50)))
        .await
        .unwrap();
    let mut s = tokio::net::TcpStream::connect(h.addr()).await.unwrap();
    assert!(raw_get(&mut s).await.starts_with("HTTP/1.1 200"));
    // The connection stays usable after the long request.
    h.pods[0].set_fault(Fault::Healthy).await.unwrap();
    assert!(raw_get(&mut s).await.starts_with("HTTP/1.1 200"));
}

/// A listener leaving the config stops its connections gracefully; one whose client stalled
/// halfway through a request head is still closed by the idle check, not waited for forever.
#[tokio::test(start_paused = true)]
async fn a_half_sent_request_head_does_not_hold_a_removed_listener_open() {
    let h = Harness::start(1, fast_policy()).await;
    let mut s = tokio::net::TcpStream::connect(h.addr()).await.unwrap();
    s.write_all(b"GET /stalled HTTP/1.1\r\nhost: app\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.sidecar
        .apply(Config::empty())
        .await
        .expect("empty config");
    tokio::time::sleep(Duration::from_secs(45)).await;
    let mut buf = [0u8; 256];
    let res = within(
        Duration::from_secs(1),
        "the stalled connection closed",
        s.read(&mut buf),
    )
    .await;
    assert!(matches!(res, Ok(0) | Err(_)), "{res:?}");
    assert_eq!(h.pods[0].requests(), 0);
}

/// The per-try timeout starts when the request is sent upstream, not when its head arrived: a
/// client that takes longer than `perTryTimeout` to upload its body costs no attempt.
#[tokio::test]
async fn a_slow_upload_does_not_use_up_the_per_try_timeout() {
    let mut policy = fast_policy();
    policy.retries.per_try_timeout = CfgDuration::from_millis(300);
    let h = Harness::start(1, policy).await;
    let before = h.metrics();
    let mut s = tokio::net::TcpStream::connect(h.addr()).await.unwrap();
    s.write_all(b"PUT /upload HTTP/1.1\r\nhost: app\r\ncontent-length: 10\r\n\r\nhello")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.write_all(b"world").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = within(PATIENCE, "the response", s.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let after = h.metrics();
    assert_eq!(
        d(&after, &before, "detour_attempt_failures_total", &[]),
        0.0,
        "{text}"
    );
    assert_eq!(h.pods[0].requests(), 1);
}
