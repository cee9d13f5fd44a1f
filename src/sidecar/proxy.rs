//! The request path: prepare the request, pick an endpoint, attempt, classify the outcome, and
//! retry elsewhere when that is safe. Every failure is counted by cause; a failure that ends the
//! request becomes exactly one response, built in `errors`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use http::{header, request::Parts, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use smallvec::SmallVec;
use tokio::time::Instant;

use super::{
    balancer,
    body::{ReqBody, RespBody},
    endpoint::{Endpoint, Failure},
    errors::{AttemptError, Cause, ProxyError, Reach},
    headers,
    metrics::NoRetry,
    pool::Sender,
    upstream::UpstreamRt,
};
use crate::config::{LoadBalancer, RetryOn};

/// Handles one client request end to end and always produces a response.
pub async fn handle(
    req: Request<Incoming>,
    up: Arc<UpstreamRt>,
    client: SocketAddr,
) -> Response<RespBody> {
    let start = Instant::now();
    let resp = match forward(req, &up, client, start).await {
        Ok(resp) => resp,
        Err(Reject::Proxy(e)) => {
            up.metrics.proxy_error(e.cause);
            tracing::warn!(
                upstream = %up.name,
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
    resp
}

enum Reject {
    Proxy(ProxyError),
    /// The client's own fault (bad body...): not a gateway error.
    Client(StatusCode, String),
}

impl From<ProxyError> for Reject {
    fn from(e: ProxyError) -> Self {
        Reject::Proxy(e)
    }
}

/// The result of one attempt.
enum Attempt {
    Response {
        resp: Response<Incoming>,
        tx: Sender,
        guard: super::endpoint::InflightGuard,
    },
    Failed {
        err: AttemptError,
        /// The body, when the request never left and the body was not consumed.
        body: Option<ReqBody>,
    },
}

async fn forward(
    req: Request<Incoming>,
    up: &Arc<UpstreamRt>,
    client: SocketAddr,
    start: Instant,
) -> Result<Response<RespBody>, Reject> {
    let policy = &up.policy;
    let m = &up.metrics;
    let mut req = req;
    let upgrade = headers::is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    prepare_head(&mut parts, client, upgrade);
    let idempotent = headers::is_idempotent(&parts.method, &parts.headers);

    if let Some(on_client) = client_upgrade {
        return forward_upgrade(parts, body, on_client, up).await;
    }

    let limit = policy.retries.max_buffered_body_bytes as usize;
    // A client that trickles its body must not hold the request past its deadline.
    let buffered = tokio::time::timeout(policy.timeouts.request.get(), buffer_body(body, limit))
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
        })?;
    let mut body = Some(buffered);

    let deadline = start + policy.timeouts.request.get();
    let per_try = policy.retries.per_try_timeout.get();
    up.budget.deposit();
    let mut tried: SmallVec<[SocketAddr; 4]> = SmallVec::new();
    let mut attempts = 0u32;
    let mut race_retry_left = true;
    let mut failed_before = false;
    let mut fresh_on: Option<SocketAddr> = None;

    loop {
        let now = Instant::now();
        let fresh = fresh_on.take();
        let ep = match fresh {
            // Keep-alive race: the same endpoint again, on a new connection.
            Some(addr) => up
                .endpoints
                .iter()
                .find(|e| e.addr == addr)
                .cloned()
                .expect("endpoint of this upstream"),
            None => {
                match balancer::pick(
                    &up.endpoints,
                    &tried,
                    policy.load_balancer,
                    policy.panic_threshold,
                    now,
                ) {
                    Ok(p) => {
                        if p.panic {
                            m.panic.inc();
                        }
                        attempts += 1;
                        p.endpoint
                    }
                    Err(why) => {
                        return Err(ProxyError {
                            cause: Cause::DestinationUnavailable,
                            endpoint: None,
                            pod: None,
                            attempts,
                            detail: why.to_string(),
                        }
                        .into())
                    }
                }
            }
        };
        if !tried.contains(&ep.addr) {
            tried.push(ep.addr);
        }
        let Some(left) = deadline
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())
        else {
            return Err(ProxyError {
                cause: Cause::HttpResponseTimeout,
                endpoint: Some(ep.addr),
                pod: ep.pod.clone(),
                attempts,
                detail: format!(
                    "request deadline of {} passed before a response",
                    policy.timeouts.request
                ),
            }
            .into());
        };
        let try_timeout = per_try.min(left);
        let replayable = body.as_ref().and_then(ReqBody::try_clone);
        let this_body = match replayable {
            Some(copy) => copy,
            None => body.take().unwrap_or_else(ReqBody::empty),
        };
        let outcome = match tokio::time::timeout(
            try_timeout,
            attempt(&ep, &parts, this_body, fresh.is_some()),
        )
        .await
        {
            Ok(o) => o,
            Err(_) => Attempt::Failed {
                err: AttemptError::new(
                    Cause::HttpResponseTimeout,
                    Reach::MaybeProcessed,
                    format!("no response headers within {}", fmt_dur(try_timeout)),
                ),
                body: None,
            },
        };

        match outcome {
            Attempt::Response { resp, tx, guard } => {
                let status = resp.status();
                if policy.load_balancer == LoadBalancer::PeakEwma {
                    ep.observe_latency(now.elapsed(), Instant::now());
                }
                let gateway = matches!(status.as_u16(), 502..=504);
                if gateway {
                    m.attempt_failure(Cause::UpstreamStatus);
                    up.record_failure(&ep, Failure::Gateway, Instant::now());
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
                            tracing::debug!(upstream = %up.name, endpoint = %ep.addr, %status, "retrying a gateway error");
                            continue;
                        }
                        Err(why) => note_no_retry(up, why),
                    }
                    m.upstream_error(status.as_u16());
                } else if status.is_server_error() {
                    up.record_failure(&ep, Failure::ServerError, Instant::now());
                } else {
                    ep.record_success();
                }
                if failed_before && !gateway {
                    m.rescued.inc();
                }
                ep.pool.release(tx);
                return Ok(client_response(resp, guard, up, gateway));
            }
            Attempt::Failed {
                err,
                body: returned,
            } => {
                m.attempt_failure(err.cause);
                if returned.is_some() {
                    body = returned;
                }
                tracing::debug!(upstream = %up.name, endpoint = %ep.addr, cause = err.cause.as_str(), detail = %err.detail, "attempt failed");
                if err.cause == Cause::KeepaliveRace {
                    m.keepalive_races.inc();
                    let resend_ok = err.reach == Reach::NotSent || idempotent;
                    if race_retry_left && resend_ok && body.is_some() {
                        // Not the endpoint's fault and not a real retry: the upstream closed an
                        // idle connection just as we used it. Same endpoint, fresh connection.
                        race_retry_left = false;
                        m.keepalive_race_retries.inc();
                        failed_before = true;
                        fresh_on = Some(ep.addr);
                        continue;
                    }
                } else {
                    let failure = if err.cause == Cause::ConnectionRefused {
                        Failure::Refused
                    } else {
                        Failure::Gateway
                    };
                    up.record_failure(&ep, failure, Instant::now());
                }
                let kind = retry_kind(err.cause);
                match may_retry(
                    up,
                    kind,
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
                        note_no_retry(up, why);
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

/// One try on one endpoint: a connection (pooled unless `fresh`), the request, the response head.
async fn attempt(ep: &Arc<Endpoint>, parts: &Parts, body: ReqBody, fresh: bool) -> Attempt {
    let guard = ep.start_request();
    let conn = if fresh {
        ep.pool
            .connect(false)
            .await
            .map(|tx| super::pool::Conn { tx, reused: false })
    } else {
        ep.pool.get().await
    };
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => {
            return Attempt::Failed {
                err: AttemptError::connect(&e),
                body: Some(body),
            }
        }
    };
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = parts.headers.clone();
    if !req.headers().contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::from_str(&ep.addr.to_string()) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    match conn.tx.try_send_request(req).await {
        Ok(resp) => Attempt::Response {
            resp,
            tx: conn.tx,
            guard,
        },
        Err(mut e) => {
            let unsent = e.take_message().map(|r| r.into_body());
            let err = AttemptError::from_hyper(e.error(), unsent.is_none(), conn.reused);
            Attempt::Failed { err, body: unsent }
        }
    }
}

/// Maps an attempt failure to the `retries.on` kind that allows retrying it.
fn retry_kind(cause: Cause) -> RetryOn {
    match cause {
        Cause::ConnectionRefused | Cause::ConnectionTimeout => RetryOn::ConnectFailure,
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

fn note_no_retry(up: &UpstreamRt, why: NoRetry) {
    up.metrics.retry_skipped(why);
}

/// Request head as it goes upstream: origin-form URI, Host kept, hop-by-hop removed, forwarding
/// headers added.
fn prepare_head(parts: &mut Parts, client: SocketAddr, upgrade: bool) {
    if let Some(auth) = parts.uri.authority().cloned() {
        // Absolute-form (a client that treats us as a forward proxy): Host comes from the URI.
        if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
            parts.headers.insert(header::HOST, v);
        }
    }
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        if let Ok(u) = pq.parse::<Uri>() {
            parts.uri = u;
        }
    }
    let host = parts.headers.get(header::HOST).cloned();
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    headers::add_forwarded(&mut parts.headers, client.ip(), host.as_ref());
}

/// Buffers the body when it fits the replay limit, so it can be sent again on a retry. A larger
/// body is streamed: the part read so far goes first, the rest follows from the client.
async fn buffer_body(mut body: Incoming, limit: usize) -> Result<ReqBody, hyper::Error> {
    if body.is_end_stream() {
        return Ok(ReqBody::empty());
    }
    let hint = body.size_hint();
    if hint.lower() as usize > limit {
        return Ok(ReqBody::Stream(body));
    }
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > limit {
                return Ok(ReqBody::Prefixed(Some(buf.freeze()), body));
            }
        }
    }
    Ok(ReqBody::Full(Some(Bytes::from(buf))))
}

/// The upstream's response as the client gets it.
fn client_response(
    resp: Response<Incoming>,
    guard: super::endpoint::InflightGuard,
    up: &UpstreamRt,
    passed_gateway_error: bool,
) -> Response<RespBody> {
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    headers::append_list(&mut parts.headers, header::VIA, headers::VIA_VALUE);
    if passed_gateway_error {
        let v = format!("detour; received-status={}", parts.status.as_u16());
        if let Ok(v) = HeaderValue::from_str(&v) {
            parts.headers.append("proxy-status", v);
        }
    }
    let body = RespBody::Upstream {
        body,
        guard: Some(guard),
        on_error: Some(up.metrics.incomplete_bodies.clone()),
    };
    Response::from_parts(parts, body)
}

/// Upgrades (WebSocket): one attempt on a fresh connection; retried only if it never connected.
async fn forward_upgrade(
    parts: Parts,
    body: Incoming,
    on_client: hyper::upgrade::OnUpgrade,
    up: &Arc<UpstreamRt>,
) -> Result<Response<RespBody>, Reject> {
    let policy = &up.policy;
    let mut tried = Vec::new();
    let mut attempts = 0;
    let mut body = Some(body);
    loop {
        let pick = balancer::pick(
            &up.endpoints,
            &tried,
            policy.load_balancer,
            policy.panic_threshold,
            Instant::now(),
        )
        .map_err(|why| ProxyError {
            cause: Cause::DestinationUnavailable,
            endpoint: None,
            pod: None,
            attempts,
            detail: why.to_string(),
        })?;
        let ep = pick.endpoint;
        attempts += 1;
        tried.push(ep.addr);
        let fail = |err: AttemptError| ProxyError {
            cause: err.cause,
            endpoint: Some(ep.addr),
            pod: ep.pod.clone(),
            attempts,
            detail: err.detail,
        };
        let mut tx = match ep.pool.connect(true).await {
            Ok(tx) => tx,
            Err(e) => {
                let err = AttemptError::connect(&e);
                up.metrics.attempt_failure(err.cause);
                up.record_failure(&ep, Failure::Refused, Instant::now());
                if attempts <= policy.retries.attempts
                    && policy.retries.on.contains(&RetryOn::ConnectFailure)
                {
                    up.metrics.retry(err.cause);
                    continue;
                }
                return Err(fail(err).into());
            }
        };
        let mut req = Request::new(ReqBody::Stream(body.take().expect("body sent once")));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.headers_mut() = parts.headers.clone();
        let timeout = policy.retries.per_try_timeout.get();
        let mut resp = match tokio::time::timeout(timeout, tx.send_request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let err = AttemptError::from_hyper(&e, true, false);
                up.metrics.attempt_failure(err.cause);
                return Err(fail(err).into());
            }
            Err(_) => {
                let err = AttemptError::new(
                    Cause::HttpResponseTimeout,
                    Reach::MaybeProcessed,
                    format!("no upgrade response within {}", fmt_dur(timeout)),
                );
                up.metrics.attempt_failure(err.cause);
                return Err(fail(err).into());
            }
        };
        ep.record_success();
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let guard = ep.start_request();
            return Ok(client_response(resp, guard, up, false));
        }
        let on_upstream = hyper::upgrade::on(&mut resp);
        let guard = ep.start_request();
        tokio::spawn(async move {
            let _guard = guard;
            let (Ok(client_io), Ok(upstream_io)) = tokio::join!(on_client, on_upstream) else {
                return;
            };
            let mut a = TokioIo::new(client_io);
            let mut b = TokioIo::new(upstream_io);
            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
        });
        let (mut parts, _) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, true);
        headers::append_list(&mut parts.headers, header::VIA, headers::VIA_VALUE);
        return Ok(Response::from_parts(parts, RespBody::empty()));
    }
}

fn fmt_dur(d: Duration) -> String {
    crate::config::Duration::from_millis(d.as_millis() as u64).to_string()
}
