//! The request path: prepare the request, pick an endpoint, attempt, classify the outcome, and
//! retry elsewhere when that is safe. Every failure is counted by cause; a failure that ends the
//! request becomes exactly one response, built in `errors`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use http::{header, request::Parts, HeaderValue, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use smallvec::SmallVec;
use tokio::time::Instant;

use super::{
    balancer,
    body::{ReqBody, RespBody},
    endpoint::{Endpoint, Failure, InflightGuard},
    errors::{AttemptError, Cause, ProxyError, Reach},
    h1::{self, Timer},
    headers,
    metrics::NoRetry,
    pool::{Checkout, Reuse},
    upstream::UpstreamRt,
};
use crate::config::{LoadBalancer, RetryOn};

/// Who is calling, computed once per client connection.
#[derive(Clone, Debug)]
pub struct Client {
    pub addr: SocketAddr,
    /// The client IP as a header value, for `X-Forwarded-For`.
    pub ip_header: HeaderValue,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        let ip_header = HeaderValue::from_str(&addr.ip().to_string()).expect("an IP is ASCII");
        Client { addr, ip_header }
    }
}

/// Handles one client request end to end and always produces a response.
pub async fn handle(
    req: Request<Incoming>,
    up: Arc<UpstreamRt>,
    client: &Client,
) -> Response<RespBody> {
    let start = Instant::now();
    let mut resp = match forward(req, &up, client, start).await {
        Ok(resp) => resp,
        Err(Reject::Proxy(e)) => {
            up.metrics.proxy_error(e.cause);
            tracing::warn!(
                upstream = %up.name,
                client = %client.addr,
                status = e.status().as_u16(),
                cause = e.cause.proxy_status_error(),
                details = %e.details(),
                "answering with a gateway error"
            );
            e.to_response()
        }
        Err(Reject::Client(status, msg)) => {
            let mut r = Response::new(RespBody::full(format!("{msg}\n")));
            *r.status_mut() = status;
            r
        }
    };
    up.metrics.response(resp.status().as_u16());
    up.metrics.duration.observe(start.elapsed().as_secs_f64());
    if let RespBody::Upstream { upstream, .. } = resp.body_mut() {
        // Moved, not cloned: one reference count operation less on a value every worker shares.
        *upstream = Some(up);
    }
    resp
}

enum Reject {
    Proxy(ProxyError),
    /// The client's own fault (bad or aborted body...): not a gateway error.
    Client(StatusCode, String),
}

impl From<ProxyError> for Reject {
    fn from(e: ProxyError) -> Self {
        Reject::Proxy(e)
    }
}

/// How an attempt gets its connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A pooled keep-alive connection, or a new one. A request that cannot be replayed asks
    /// the kernel whether the pooled one is still open.
    Pooled(Reuse),
    /// A new connection (after a keep-alive race).
    Fresh,
    /// A new connection that can be upgraded (WebSocket); never pooled.
    Upgrade,
}

/// The result of one attempt.
enum Attempt {
    Response {
        head: http::response::Parts,
        body: h1::ResponseBody,
        timer: Timer,
        guard: InflightGuard,
    },
    Failed {
        err: AttemptError,
        /// The body, when the request never left and the body was not consumed.
        body: Option<ReqBody>,
    },
    /// The client's request body failed while it was being sent.
    ClientAborted(String),
}

async fn forward(
    req: Request<Incoming>,
    up: &Arc<UpstreamRt>,
    client: &Client,
    start: Instant,
) -> Result<Response<RespBody>, Reject> {
    let policy = &up.policy;
    let retries = &policy.retries;
    let m = &up.metrics;
    if req.method() == http::Method::CONNECT {
        // 501, not 405: a 405 must list the allowed methods, and every other method is.
        return Err(Reject::Client(
            StatusCode::NOT_IMPLEMENTED,
            "CONNECT is not supported: detour is a reverse proxy".into(),
        ));
    }
    if let Some((status, why)) = headers::refuse_request(req.headers()) {
        return Err(Reject::Client(status, why.into()));
    }
    let mut req = req;
    let upgrade = headers::is_upgrade(req.headers());
    let mut on_client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    prepare_head(&mut parts, client, upgrade);
    let idempotent = headers::is_idempotent(&parts.method, &parts.headers);
    let deadline = start + policy.timeouts.request.get();

    let has_body = !body.is_end_stream();
    let mut body = Some(if !has_body {
        ReqBody::empty()
    } else {
        // A client that trickles its body must not hold the request past its deadline.
        let limit = retries.max_buffered_body_bytes as usize;
        tokio::time::timeout_at(deadline, buffer_body(body, limit))
            .await
            .map_err(|_| {
                Reject::Client(
                    StatusCode::REQUEST_TIMEOUT,
                    "request body not received in time".into(),
                )
            })?
            .map_err(|e| {
                Reject::Client(
                    StatusCode::BAD_REQUEST,
                    format!("reading request body: {e}"),
                )
            })?
    });

    up.budget.deposit(start);
    let mut tried: SmallVec<[SocketAddr; 4]> = SmallVec::new();
    let mut attempts = 0u32;
    let mut race_retry_left = true;
    let mut failed_before = false;
    // Endpoints are borrowed from `up`, which outlives the request: no reference counting on
    // the request path except the in-flight guard.
    let mut fresh_on: Option<&Arc<Endpoint>> = None;
    let mut last: Option<&Arc<Endpoint>> = None;
    // The first attempt starts now; the clock is read again only for retries. Reading the
    // client's body took time that belongs to neither the per-try timeout nor the endpoint's
    // latency, so a request with a body reads the clock afresh.
    let mut now = if has_body { Instant::now() } else { start };

    loop {
        if attempts > 0 {
            now = Instant::now();
        }
        let Some(left) = deadline
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())
        else {
            return Err(ProxyError {
                cause: Cause::HttpResponseTimeout,
                endpoint: last.as_ref().map(|e| e.addr),
                pod: last.as_ref().and_then(|e| e.pod.clone()),
                attempts,
                detail: format!(
                    "request deadline (timeouts.request {}) passed before a response",
                    policy.timeouts.request
                ),
            }
            .into());
        };
        let (ep, mode) = match fresh_on.take() {
            // Keep-alive race: the same endpoint again, on a new connection.
            Some(ep) => (ep, Mode::Fresh),
            None => {
                let pick = balancer::pick(
                    &up.endpoints,
                    &tried,
                    policy.load_balancer,
                    policy.panic_threshold,
                    now,
                )
                .map_err(|why| ProxyError {
                    cause: Cause::DestinationUnavailable,
                    endpoint: None,
                    pod: None,
                    attempts,
                    detail: why.to_string(),
                })?;
                if pick.panic {
                    m.panic.inc();
                }
                attempts += 1;
                let mode = if upgrade {
                    Mode::Upgrade
                } else if idempotent && matches!(body, Some(ReqBody::Full(_))) {
                    Mode::Pooled(Reuse::Replayable)
                } else {
                    // A POST without `Idempotency-Key`, or a body too large to keep: a closed
                    // connection cannot be made good by sending it again.
                    Mode::Pooled(Reuse::AskKernel)
                };
                (pick.endpoint, mode)
            }
        };
        if !tried.contains(&ep.addr) {
            tried.push(ep.addr);
        }
        last = Some(ep);
        // Per-try timeouts exist to try elsewhere: a request that can never be retried on a
        // timeout (non-idempotent, or timeouts not retried) gets the whole remaining deadline,
        // so slow non-idempotent work is not cut short.
        let retry_on_timeout =
            idempotent && retries.on.contains(&RetryOn::Timeout) && retries.attempts > 0;
        let try_budget = if retry_on_timeout {
            retries.per_try_timeout.get().min(left)
        } else {
            left
        };
        let this_body = match body.as_ref().and_then(ReqBody::try_clone) {
            Some(copy) => copy,
            None => body.take().unwrap_or_else(ReqBody::empty),
        };

        match attempt(ep, &parts, this_body, mode, now, now + try_budget).await {
            Attempt::Response {
                head,
                body: resp_body,
                timer,
                guard,
            } => {
                let status = head.status;
                if policy.load_balancer == LoadBalancer::PeakEwma {
                    ep.observe_latency(now.elapsed(), Instant::now());
                }
                let resp_body = match resp_body {
                    h1::ResponseBody::Upgraded { io, early } => {
                        // h1 hands over a connection only for a 101 to an upgrade request.
                        let on_client = on_client_upgrade
                            .take()
                            .expect("an upgrade request has the client's upgrade");
                        ep.record_success();
                        return Ok(tunnel(head, io, early, on_client, guard));
                    }
                    other => other,
                };
                let gateway = matches!(status.as_u16(), 502..=504);
                if gateway {
                    m.attempt_failure(&ep.labels, Cause::UpstreamStatus);
                    up.record_failure(ep, Failure::Gateway, Instant::now());
                    let can = may_retry(
                        up,
                        RetryOn::GatewayError,
                        Reach::MaybeProcessed,
                        idempotent,
                        body.is_some(),
                        attempts,
                        deadline,
                    );
                    match can {
                        Ok(()) => {
                            m.retry(Cause::UpstreamStatus);
                            failed_before = true;
                            // A short 502 read whole leaves its connection usable.
                            if let h1::ResponseBody::Done {
                                idle: Some(conn), ..
                            } = resp_body
                            {
                                release(ep, conn, timer);
                            }
                            tracing::debug!(upstream = %up.name, endpoint = %ep.addr, %status, "retrying a gateway error");
                            continue;
                        }
                        Err(why) => m.retry_skipped(why),
                    }
                    m.upstream_error(status.as_u16());
                } else if status.is_server_error() {
                    up.record_failure(ep, Failure::ServerError, Instant::now());
                } else {
                    ep.record_success();
                }
                if failed_before && status.as_u16() < 500 {
                    m.rescued.inc();
                }
                return Ok(client_response(head, resp_body, ep, timer, guard, gateway));
            }
            Attempt::ClientAborted(msg) => {
                return Err(Reject::Client(
                    StatusCode::BAD_REQUEST,
                    format!("request body failed: {msg}"),
                ))
            }
            Attempt::Failed {
                err,
                body: returned,
            } => {
                m.attempt_failure(&ep.labels, err.cause);
                if returned.is_some() {
                    body = returned;
                }
                tracing::debug!(upstream = %up.name, endpoint = %ep.addr, cause = err.cause.as_str(), detail = %err.detail, "attempt failed");
                if err.cause == Cause::HttpResponseTimeout
                    && policy.load_balancer == LoadBalancer::PeakEwma
                {
                    ep.observe_latency(try_budget, Instant::now());
                }
                if err.cause == Cause::KeepaliveRace {
                    m.keepalive_races.inc();
                    let resend_ok = err.reach == Reach::NotSent || idempotent;
                    if race_retry_left && resend_ok && body.is_some() {
                        // Not the endpoint's fault and not a real retry: the upstream closed an
                        // idle connection just as we used it. Same endpoint, fresh connection.
                        race_retry_left = false;
                        m.keepalive_race_retries.inc();
                        failed_before = true;
                        fresh_on = Some(ep);
                        continue;
                    }
                } else if err.cause.is_endpoint_fault() {
                    let failure = if err.cause == Cause::ConnectionRefused {
                        Failure::Refused
                    } else {
                        Failure::Gateway
                    };
                    up.record_failure(ep, failure, Instant::now());
                }
                match may_retry(
                    up,
                    retry_kind(err.cause),
                    err.reach,
                    idempotent,
                    body.is_some(),
                    attempts,
                    deadline,
                ) {
                    Ok(()) => {
                        m.retry(err.cause);
                        failed_before = true;
                        continue;
                    }
                    Err(why) => {
                        m.retry_skipped(why);
                        let mut detail = err.detail;
                        detail.push_str(&format!("; not retried: {}", why.as_str()));
                        return Err(ProxyError {
                            cause: err.cause,
                            endpoint: Some(ep.addr),
                            pod: ep.pod.clone(),
                            attempts,
                            detail,
                        }
                        .into());
                    }
                }
            }
        }
    }
}

/// One try on one endpoint: a connection, the request, the response head, all by `until`.
/// Running out of time while connecting means the request never left.
async fn attempt(
    ep: &Arc<Endpoint>,
    parts: &Parts,
    body: ReqBody,
    mode: Mode,
    started: Instant,
    until: Instant,
) -> Attempt {
    let window = until.saturating_duration_since(started);
    let guard = ep.start_request();
    // A pooled connection needs no timer; only connecting does.
    let pooled = match mode {
        Mode::Pooled(reuse) => ep.pool().checkout(started, reuse),
        _ => None,
    };
    let connected = match pooled {
        Some(c) => Ok(Ok(c)),
        None => tokio::time::timeout_at(until, ep.pool().connect())
            .await
            .map(|r| {
                r.map(|conn| Checkout {
                    conn,
                    reused: false,
                    seen_open: Duration::ZERO,
                })
            }),
    };
    let Checkout {
        mut conn,
        reused,
        seen_open,
    } = match connected {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Attempt::Failed {
                err: AttemptError::connect(&e),
                body: Some(body),
            }
        }
        Err(_) => {
            return Attempt::Failed {
                err: AttemptError::new(
                    Cause::ConnectionTimeout,
                    Reach::NotSent,
                    "connect: out of time for this attempt",
                ),
                body: Some(body),
            }
        }
    };
    // A pooled connection came at once; only a new one can have used up the window.
    if !reused && Instant::now() >= until {
        // Connecting used the whole window: nothing was sent, the body is still ours.
        return Attempt::Failed {
            err: AttemptError::new(
                Cause::ConnectionTimeout,
                Reach::NotSent,
                "connect: the attempt's time ran out while connecting",
            ),
            body: Some(body),
        };
    }
    // The connection's timer is moved only when it would fire late. One that fires early (set
    // by an earlier, shorter request) is moved then: one timer-wheel update per connection per
    // per-try timeout, not one per request.
    let mut timer = match conn.timer.take() {
        Some(mut t) => {
            if t.deadline() > until {
                t.as_mut().reset(until);
            }
            t
        }
        None => Box::pin(tokio::time::sleep_until(until)),
    };
    let host = ep.host_header();
    let mut send = std::pin::pin!(conn.send(parts, host, body, mode == Mode::Upgrade));
    // As `timeout_at`: the response first, then the timer.
    let sent = loop {
        tokio::select! {
            biased;
            r = &mut send => break Ok(r),
            _ = timer.as_mut() => {
                if Instant::now() >= until {
                    break Err(());
                }
                timer.as_mut().reset(until);
            }
        }
    };
    match sent {
        Ok(Ok(received)) => Attempt::Response {
            head: received.head,
            body: received.body,
            timer,
            guard,
        },
        Ok(Err(failed)) => {
            if let h1::Error::ClientBody(msg) = failed.error {
                return Attempt::ClientAborted(msg);
            }
            let err = AttemptError::from_h1(&failed.error, reused);
            if err.cause == Cause::KeepaliveRace {
                ep.pool().observe_race(seen_open);
            }
            Attempt::Failed {
                err,
                body: failed.unsent,
            }
        }
        Err(_) => Attempt::Failed {
            err: AttemptError::new(
                Cause::HttpResponseTimeout,
                Reach::MaybeProcessed,
                format!("no response headers within {}", fmt_dur(window)),
            ),
            body: None,
        },
    }
}

/// Maps an attempt failure to the `retries.on` kind that allows retrying it.
fn retry_kind(cause: Cause) -> RetryOn {
    match cause {
        Cause::ConnectionRefused | Cause::ConnectionTimeout | Cause::ProxyInternalError => {
            RetryOn::ConnectFailure
        }
        Cause::HttpResponseTimeout => RetryOn::Timeout,
        Cause::UpstreamStatus | Cause::HttpProtocolError => RetryOn::GatewayError,
        _ => RetryOn::Reset,
    }
}

/// The retry rules, in the order a user would ask "why was this not retried?".
fn may_retry(
    up: &UpstreamRt,
    kind: RetryOn,
    reach: Reach,
    idempotent: bool,
    have_body: bool,
    attempts: u32,
    deadline: Instant,
) -> Result<(), NoRetry> {
    let r = &up.policy.retries;
    if !r.on.contains(&kind) {
        return Err(NoRetry::NotRetryable);
    }
    if attempts > r.attempts {
        return Err(NoRetry::AttemptsExhausted);
    }
    if reach == Reach::MaybeProcessed && !idempotent {
        return Err(NoRetry::NonIdempotent);
    }
    if !have_body {
        return Err(NoRetry::BodyNotReplayable);
    }
    if Instant::now() >= deadline {
        return Err(NoRetry::Deadline);
    }
    if !up.budget.try_withdraw() {
        up.metrics.budget_exhausted.inc();
        return Err(NoRetry::BudgetExhausted);
    }
    Ok(())
}

/// Request head as it goes upstream: origin-form URI, Host kept, hop-by-hop removed, forwarding
/// headers added.
fn prepare_head(parts: &mut Parts, client: &Client, upgrade: bool) {
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        // Absolute-form (a client that treats us as a forward proxy): Host comes from the URI.
        if let Some(auth) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
                parts.headers.insert(header::HOST, v);
            }
        }
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        if let Ok(u) = pq.parse::<Uri>() {
            parts.uri = u;
        }
    }
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    headers::add_forwarded(&mut parts.headers, &client.ip_header);
}

/// Buffers the body when it fits the replay limit, so it can be sent again on a retry. A larger
/// body is streamed: the part read so far goes first, the rest follows from the client.
async fn buffer_body(mut body: Incoming, limit: usize) -> Result<ReqBody, hyper::Error> {
    let hint = body.size_hint();
    if hint.lower() as usize > limit {
        return Ok(ReqBody::Stream(body));
    }
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        // The common case, a body in one frame, is kept without a copy.
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            prev => {
                if let Some(p) = prev {
                    buf.extend_from_slice(&p);
                }
                buf.extend_from_slice(&data);
            }
        }
        let len = first.as_ref().map_or(buf.len(), |b| b.len());
        if len > limit {
            let sofar = first.take().unwrap_or_else(|| buf.split().freeze());
            return Ok(ReqBody::Prefixed(Some(sofar), body));
        }
    }
    Ok(ReqBody::Full(Some(first.unwrap_or_else(|| buf.freeze()))))
}

/// The upstream's response as the client gets it. A body that came whole with the head frees
/// its connection (and the endpoint's in-flight count) at once; a longer one does so at its end.
/// `handle` hands the body its upstream once the metrics are recorded.
fn client_response(
    mut parts: http::response::Parts,
    body: h1::ResponseBody,
    ep: &Endpoint,
    timer: Timer,
    guard: InflightGuard,
    passed_gateway_error: bool,
) -> Response<RespBody> {
    headers::strip_hop_by_hop(&mut parts.headers, false);
    headers::add_via(&mut parts.headers);
    if passed_gateway_error {
        let v = format!("detour; received-status={}", parts.status.as_u16());
        if let Ok(v) = HeaderValue::from_str(&v) {
            parts.headers.append("proxy-status", v);
        }
    }
    let body = match body {
        h1::ResponseBody::Done { data, idle } => {
            if let Some(conn) = idle {
                release(ep, conn, timer);
            }
            drop(guard);
            RespBody::Full(data)
        }
        h1::ResponseBody::Streaming(mut body) => {
            body.keep_timer(timer);
            RespBody::Upstream {
                body,
                guard: Some(guard),
                upstream: None,
            }
        }
        h1::ResponseBody::Upgraded { .. } => unreachable!("an upgraded connection is tunnelled"),
    };
    Response::from_parts(parts, body)
}

/// A connection whose response was read whole goes back to its pool, its per-try timer with it.
fn release(ep: &Endpoint, mut conn: h1::Conn, timer: Timer) {
    conn.timer = Some(timer);
    ep.pool().release(conn);
}

/// A `101 Switching Protocols`: both sides are joined byte for byte until either closes. The
/// endpoint counts the tunnel as in flight while it lasts.
fn tunnel(
    mut parts: http::response::Parts,
    upstream: tokio::net::TcpStream,
    early: Bytes,
    on_client: hyper::upgrade::OnUpgrade,
    guard: InflightGuard,
) -> Response<RespBody> {
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _guard = guard;
        let Ok(client_io) = on_client.await else {
            return;
        };
        let mut a = TokioIo::new(client_io);
        let mut b = upstream;
        // Bytes of the new protocol that came with the 101 go first.
        if !early.is_empty() && a.write_all(&early).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
    });
    headers::strip_hop_by_hop(&mut parts.headers, true);
    headers::add_via(&mut parts.headers);
    Response::from_parts(parts, RespBody::empty())
}

fn fmt_dur(d: Duration) -> String {
    crate::config::Duration::from_millis(d.as_millis() as u64).to_string()
}
