//! The sidecar under test: a sidecar in front of simulated pods, a small HTTP/1.1 client,
//! `Proxy-Status` parsing and metric deltas. Everything binds 127.0.0.1:0.
#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub use detour::config::{Config, Duration as CfgDuration, Endpoint, HealthCheckProtocol, Policy};
pub use detour::demo::pod::{Fault, SimPod};
pub use detour::demo::prom::Metrics;
pub use detour::sidecar::{Options, Sidecar, SidecarHandle};

use super::{within, PATIENCE};

/// The upstream every test config names.
pub const UPSTREAM: &str = "test/web";

pub fn ms(n: u64) -> CfgDuration {
    CfgDuration::from_millis(n)
}

/// A policy with small timings so every test stays fast. Active health checks are off: each
/// test that needs them turns them on, so the data path alone decides what the tests see.
pub fn fast_policy() -> Policy {
    let mut p = Policy::default();
    p.health_check.protocol = HealthCheckProtocol::None;
    // A check must not time out just because the shared machine is busy.
    p.health_check.interval = ms(200);
    p.health_check.timeout = ms(150);
    p.health_check.jitter = ms(10);
    p.health_check.healthy_threshold = 1;
    p.health_check.unhealthy_threshold = 2;
    p.outlier_detection.consecutive_gateway_errors = 3;
    p.outlier_detection.base_ejection_time = CfgDuration::from_secs(30);
    p.outlier_detection.max_ejection_time = CfgDuration::from_secs(60);
    p.retries.attempts = 2;
    // Long enough that a healthy answer on a loaded 2-core machine never times out; short
    // enough that a hung endpoint costs well under a second.
    p.retries.per_try_timeout = CfgDuration::from_secs(1);
    p.retries.budget.min_per_second = 100;
    p.timeouts.request = CfgDuration::from_secs(6);
    p.timeouts.connect = ms(500);
    // Panic mode changes which endpoint is picked; the tests about it turn it on.
    p.panic_threshold = 0;
    p
}

pub fn config_for(addrs: &[SocketAddr], policy: Policy) -> Config {
    let mut cfg = Config::empty();
    cfg.upstreams.push(detour::config::Upstream {
        name: UPSTREAM.to_string(),
        listen: "127.0.0.1:0".to_string(),
        workload_selector: None,
        endpoints: addrs
            .iter()
            .enumerate()
            .map(|(i, a)| Endpoint {
                address: a.to_string(),
                pod: Some(format!("pod-{i}")),
                state: Default::default(),
            })
            .collect(),
        policy,
    });
    cfg
}

/// Simulated pods with the sidecar in front of them.
pub struct Harness {
    pub pods: Vec<SimPod>,
    pub sidecar: SidecarHandle,
    pub policy: Policy,
}

impl Harness {
    pub async fn start(pods: usize, policy: Policy) -> Harness {
        let mut sims = Vec::new();
        for i in 0..pods {
            sims.push(SimPod::start(format!("pod-{i}")).await.unwrap());
        }
        let addrs: Vec<_> = sims.iter().map(SimPod::addr).collect();
        let sidecar = Sidecar::start(config_for(&addrs, policy.clone()), Options::default())
            .await
            .expect("sidecar starts");
        Harness {
            pods: sims,
            sidecar,
            policy,
        }
    }

    /// Where the application would call the sidecar.
    pub fn addr(&self) -> SocketAddr {
        self.sidecar
            .listener_addr(UPSTREAM)
            .expect("listener of the test upstream")
    }

    pub fn config(&self) -> Config {
        config_for(
            &self.pods.iter().map(SimPod::addr).collect::<Vec<_>>(),
            self.policy.clone(),
        )
    }

    pub fn metrics(&self) -> Metrics {
        Metrics::parse(&self.sidecar.metrics_text()).expect("sidecar metrics parse")
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(request(Method::GET, path)).await
    }

    /// One request on a fresh client connection.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Resp {
        send_fresh(self.addr(), req).await.expect("client request")
    }

    /// GETs until `done` holds, each answered 200: see [`get_ok_until`].
    pub async fn get_ok_until(
        &self,
        prefix: &str,
        limit: usize,
        what: &str,
        done: impl FnMut() -> bool,
    ) -> usize {
        get_ok_until(self.addr(), prefix, limit, what, done).await
    }

    /// pod-0 starts answering with `fault` (a failure the sidecar retries on another pod), and
    /// GETs go through the sidecar, each answered 200, until pod-0 got one of them.
    pub async fn fail_pod0_until_it_is_asked(&self, fault: Fault) {
        self.pods[0].set_fault(fault).await.unwrap();
        let pod0 = &self.pods[0];
        self.get_ok_until("/", 100, "pod-0 to get a request", || pod0.requests() > 0)
            .await;
    }

    /// Waits until the upstream metric `name{labels}` has grown by exactly `by` since `before`
    /// (what is counted once a response has ended may come a moment after the client saw it).
    pub async fn counted(&self, before: &Metrics, name: &str, labels: &[(&str, &str)], by: f64) {
        let what = format!("{name}{labels:?} to grow by {by}");
        super::eventually(PATIENCE, &what, || {
            (d(&self.metrics(), before, name, labels) == by).then_some(())
        })
        .await;
    }

    /// Live state of the endpoint at `addr` as the sidecar sees it.
    pub fn endpoint(&self, addr: SocketAddr) -> detour::sidecar::EndpointSnapshot {
        let want = addr.to_string();
        self.sidecar
            .upstreams()
            .into_iter()
            .flat_map(|u| u.endpoints)
            .find(|e| e.address == want)
            .unwrap_or_else(|| panic!("no endpoint {want} in the sidecar"))
    }
}

/// Sends GETs `{prefix}0`, `{prefix}1`, ... to `addr`, each on a fresh connection and each
/// answered 200, until `done` holds; fails the test after `limit` requests without it. Returns
/// how many were sent.
pub async fn get_ok_until(
    addr: SocketAddr,
    prefix: &str,
    limit: usize,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> usize {
    for n in 0..limit {
        let r = send_fresh(addr, request(Method::GET, &format!("{prefix}{n}")))
            .await
            .expect("client request");
        assert_eq!(r.status, StatusCode::OK, "request {n}: {r:?}");
        if done() {
            return n + 1;
        }
    }
    panic!("no {what} after {limit} requests");
}

/// A metric of the test upstream: `m(&metrics, "detour_retries_total", &[("reason", "x")])`.
pub fn m(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut all = vec![("upstream", UPSTREAM)];
    all.extend_from_slice(labels);
    metrics.sum(name, &all)
}

/// The change of an upstream metric between two scrapes.
pub fn d(after: &Metrics, before: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    m(after, name, labels) - m(before, name, labels)
}

pub fn request(method: Method, path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "app.test")
        .body(Full::default())
        .unwrap()
}

pub fn request_with_body(
    method: Method,
    path: &str,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut r = request(method, path);
    *r.body_mut() = Full::new(body.into());
    r
}

/// A response as the client saw it.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// `Proxy-Status: detour; error=<error>; details="<details>"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyStatus {
    pub proxy: String,
    pub error: String,
    pub details: String,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn proxy_status(&self) -> Option<ProxyStatus> {
        let raw = self.headers.get("proxy-status")?.to_str().ok()?;
        parse_proxy_status(raw)
    }

    /// The `Proxy-Status` error type, panicking with the response when there is none.
    pub fn proxy_error(&self) -> ProxyStatus {
        self.proxy_status()
            .unwrap_or_else(|| panic!("no detour Proxy-Status in {self:?}"))
    }

    /// Which simulated pod answered.
    pub fn pod(&self) -> Option<&str> {
        self.headers.get("x-sim-pod")?.to_str().ok()
    }

    /// The `attempts=N` the sidecar reported in `Proxy-Status` details.
    pub fn attempts(&self) -> Option<u32> {
        let details = self.proxy_status()?.details;
        let at = details.rfind("attempts=")?;
        details[at + "attempts=".len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    }
}

/// Parses the first member of an RFC 9209 `Proxy-Status` list: `name; error=x; details="..."`.
pub fn parse_proxy_status(raw: &str) -> Option<ProxyStatus> {
    let (proxy, mut rest) = match raw.split_once(';') {
        Some((p, r)) => (p.trim(), r),
        None => (raw.trim(), ""),
    };
    let (mut error, mut details) = (String::new(), String::new());
    loop {
        rest = rest.trim_start_matches([' ', ';']);
        if rest.is_empty() {
            break;
        }
        let (key, after) = rest.split_once('=')?;
        let key = key.trim();
        let (value, after) = if let Some(q) = after.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => v.push(chars.next()?.1),
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => v.push(c),
                }
            }
            (v, &q[end?..])
        } else {
            let end = after.find(';').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        match key {
            "error" => error = value,
            "details" => details = value,
            _ => {}
        }
        rest = after;
    }
    Some(ProxyStatus {
        proxy: proxy.to_string(),
        error,
        details,
    })
}

/// Opens a client connection (HTTP/1.1 keep-alive, upgrades allowed).
pub async fn connect(addr: SocketAddr) -> hyper::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr)
        .await
        .expect("connect to 127.0.0.1");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn.with_upgrades());
    Ok(sender)
}

pub async fn send_on(
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> hyper::Result<Resp> {
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    Ok(Resp {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await?.to_bytes(),
    })
}

pub async fn send_fresh(addr: SocketAddr, req: Request<Full<Bytes>>) -> hyper::Result<Resp> {
    let mut s = connect(addr).await?;
    within(PATIENCE, "a response", send_on(&mut s, req)).await
}

/// An address that accepts no connection and refuses none: a listener with a full accept queue
/// that never accepts, so new SYNs are dropped and connects time out (a hung node, a black hole).
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: tokio::net::TcpListener,
    _queued: Vec<TcpStream>,
}

pub async fn blackhole() -> Blackhole {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let addr = socket.local_addr().unwrap();
    let listener = socket.listen(0).unwrap();
    let mut queued = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => queued.push(s),
            Ok(Err(e)) => panic!("black hole refused a connection: {e}"),
            Err(_) => {
                return Blackhole {
                    addr,
                    _listener: listener,
                    _queued: queued,
                }
            }
        }
    }
    panic!("the accept queue of {addr} never filled up");
}
