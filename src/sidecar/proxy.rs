//! The request path: prepare the request, pick an endpoint, attempt, classify the outcome, and
//! retry elsewhere when that is safe. Every failure is counted by cause; a failure that ends the
//! request becomes exactly one response, built in `errors`.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use http::{header, request::Parts, HeaderValue, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::{body::Incoming, upgrade::OnUpgrade};
use hyper_util::rt::TokioIo;
use smallvec::SmallVec;
use tokio::time::Instant;

use super::{
    balancer,
    body::{ReqBody, RespBody},
    budget::Budget,
    endpoint::{Endpoint, Failure, InflightGuard},
    errors::{AttemptError, Cause, ProxyError, Reach},
    h1::{self, Timer},
    headers,
    metrics::{NoRetry, UpstreamMetrics},
    pool::{Checkout, Reuse},
    upstream::UpstreamRt,
};
use crate::config::{LoadBalancer, Policy, RetryOn};

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// A pooled keep-alive connection, or a new one. A request that cannot be replayed asks
    /// the kernel whether the pooled one is still open.
    Pooled(Reuse),
    /// A new connection (after a keep-alive race).
    Fresh,
    /// A new connection that can be upgraded (WebSocket); never pooled.
    Upgrade,
}

/// One attempt's plan: where it goes, how it connects, when it starts and how long it may take
/// to get a response head.
struct Plan<'a> {
    ep: &'a Arc<Endpoint>,
    mode: Mode,
    start: Instant,
    window: Duration,
}

/// How one attempt ended.
enum Outcome {
    Response(Answer),
    Failed {
        err: AttemptError,
        /// The body, when the request never left and the body was not consumed.
        body: Option<ReqBody>,
    },
    /// The client's request body failed while it was being sent.
    ClientAborted(String),
}

/// A response head from the upstream, with what the response still holds on to.
struct Answer {
    head: http::response::Parts,
    body: h1::ResponseBody,
    timer: Timer,
    guard: InflightGuard,
}

/// The request path: refuse what RFC 9112 says a proxy must, prepare the head and the body, then
/// attempt, settle and retry until the request has its response or its error.
async fn forward(
    mut req: Request<Incoming>,
    up: &Arc<UpstreamRt>,
    client: &Client,
    start: Instant,
) -> Result<Response<RespBody>, Reject> {
    refuse(&req)?;
    let upgrade = headers::is_upgrade(req.headers());
    let mut on_client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    prepare_head(&mut parts, client, upgrade);
    let idempotent = headers::is_idempotent(&parts.method, &parts.headers);
    let deadline = start + up.policy.timeouts.request.get();
    let has_body = !body.is_end_stream();
    let mut body = Some(if has_body {
        read_body(body, deadline, &up.policy).await?
    } else {
        ReqBody::empty()
    });
    up.budget.deposit(start);
    // The first attempt starts now. Reading the client's body took time that belongs to neither
    // the per-try timeout nor the endpoint's latency, so a request with a body reads the clock
    // afresh.
    let first = if has_body { Instant::now() } else { start };
    let mut attempts = Attempts::new(&up.policy, &up.budget, idempotent, deadline, first);
    loop {
        let plan = attempts.plan(up, connection_mode(upgrade, idempotent, &body))?;
        match attempt(&plan, &parts, body_for_attempt(&mut body)).await {
            Outcome::Response(answer) => {
                let have_body = body.is_some();
                let client_upgrade = &mut on_client_upgrade;
                if let Some(resp) =
                    settle_response(up, &mut attempts, &plan, answer, client_upgrade, have_body)
                {
                    return Ok(resp);
                }
            }
            Outcome::ClientAborted(msg) => {
                return Err(Reject::Client(
                    StatusCode::BAD_REQUEST,
                    format!("request body failed: {msg}"),
                ))
            }
            Outcome::Failed {
                err,
                body: returned,
            } => {
                if returned.is_some() {
                    body = returned;
                }
                settle_failure(up, &mut attempts, &plan, err, body.is_some())?;
            }
        }
    }
}

/// What RFC 9112 says a proxy must refuse, and CONNECT.
fn refuse(req: &Request<Incoming>) -> Result<(), Reject> {
    if req.method() == http::Method::CONNECT {
        // 501, not 405: a 405 must list the allowed methods, and every other method is.
        return Err(Reject::Client(
            StatusCode::NOT_IMPLEMENTED,
            "CONNECT is not supported: detour is a reverse proxy".into(),
        ));
    }
    match headers::refuse_request(req.headers()) {
        Some((status, why)) => Err(Reject::Client(status, why.into())),
        None => Ok(()),
    }
}

/// The client's body, buffered when it fits `retries.maxBufferedBodyBytes` (see `buffer_body`).
async fn read_body(body: Incoming, deadline: Instant, policy: &Policy) -> Result<ReqBody, Reject> {
    // A client that trickles its body must not hold the request past its deadline.
    let limit = policy.retries.max_buffered_body_bytes as usize;
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
        })
}

/// The body an attempt sends: a copy of a buffered one (a reference count), so a retry can
/// send it again; a streamed one goes, once (`None` is left).
fn body_for_attempt(body: &mut Option<ReqBody>) -> ReqBody {
    match body.as_ref().and_then(ReqBody::try_clone) {
        Some(copy) => copy,
        None => body.take().unwrap_or_else(ReqBody::empty),
    }
}

/// How a newly picked endpoint is connected to.
fn connection_mode(upgrade: bool, idempotent: bool, body: &Option<ReqBody>) -> Mode {
    if upgrade {
        Mode::Upgrade
    } else if idempotent && matches!(body, Some(ReqBody::Full(_))) {
        Mode::Pooled(Reuse::Replayable)
    } else {
        // A POST without `Idempotency-Key`, or a body too large to keep: a closed connection
        // cannot be made good by sending it again.
        Mode::Pooled(Reuse::AskKernel)
    }
}

/// Records how the endpoint answered and makes the client's response, or returns `None` when
/// the retry rules retry the upstream's 502-504 (its connection goes back to the pool).
fn settle_response(
    up: &UpstreamRt,
    attempts: &mut Attempts,
    plan: &Plan,
    answer: Answer,
    on_client_upgrade: &mut Option<OnUpgrade>,
    have_body: bool,
) -> Option<Response<RespBody>> {
    let (m, ep) = (&up.metrics, plan.ep);
    let status = answer.head.status;
    if up.policy.load_balancer == LoadBalancer::PeakEwma {
        ep.observe_latency(plan.start.elapsed(), Instant::now());
    }
    let Answer {
        head,
        body,
        timer,
        guard,
    } = answer;
    let body = match body {
        h1::ResponseBody::Upgraded { io, early } => {
            // h1 hands over a connection only for a 101 to an upgrade request.
            let on_client = on_client_upgrade
                .take()
                .expect("an upgrade request has the client's upgrade");
            ep.record_success();
            return Some(tunnel(head, io, early, on_client, guard));
        }
        other => other,
    };
    let gateway = is_gateway_error(status);
    if gateway {
        m.attempt_failure(&ep.labels, Cause::UpstreamStatus);
        up.record_failure(ep, Failure::Gateway, Instant::now());
    } else if status.is_server_error() {
        up.record_failure(ep, Failure::ServerError, Instant::now());
    } else {
        ep.record_success();
    }
    match attempts.on_response(status, have_body) {
        AfterResponse::Retry => {
            m.retry(Cause::UpstreamStatus);
            // A short 502 read whole leaves its connection usable.
            if let h1::ResponseBody::Done {
                idle: Some(conn), ..
            } = body
            {
                release(ep, conn, timer);
            }
            tracing::debug!(upstream = %up.name, endpoint = %ep.addr, %status, "retrying a gateway error");
            return None;
        }
        AfterResponse::PassOn(why) => {
            not_retried(m, why);
            m.upstream_error(status.as_u16());
        }
        AfterResponse::Answer => {}
    }
    if attempts.rescued(status) {
        m.rescued.inc();
    }
    Some(client_response(head, body, ep, timer, guard, gateway))
}

/// Counts a failed attempt, holds it against the endpoint when it was the endpoint's fault, and
/// asks the retry rules whether to go on: `Ok` to try again, the client's error otherwise.
fn settle_failure(
    up: &UpstreamRt,
    attempts: &mut Attempts,
    plan: &Plan,
    err: AttemptError,
    have_body: bool,
) -> Result<(), ProxyError> {
    let (m, ep) = (&up.metrics, plan.ep);
    m.attempt_failure(&ep.labels, err.cause);
    tracing::debug!(upstream = %up.name, endpoint = %ep.addr, cause = err.cause.as_str(), detail = %err.detail, "attempt failed");
    if err.cause == Cause::HttpResponseTimeout && up.policy.load_balancer == LoadBalancer::PeakEwma
    {
        ep.observe_latency(plan.window, Instant::now());
    }
    if err.cause == Cause::KeepaliveRace {
        m.keepalive_races.inc();
    } else if err.cause.is_endpoint_fault() {
        let failure = if err.cause == Cause::ConnectionRefused {
            Failure::Refused
        } else {
            Failure::Gateway
        };
        up.record_failure(ep, failure, Instant::now());
    }
    match attempts.on_failure(&err, have_body) {
        AfterFailure::RetryFresh => {
            m.keepalive_race_retries.inc();
            Ok(())
        }
        AfterFailure::Retry => {
            m.retry(err.cause);
            Ok(())
        }
        AfterFailure::Fail(why) => {
            not_retried(m, why);
            let mut detail = err.detail;
            detail.push_str(&format!("; not retried: {}", why.as_str()));
            Err(ProxyError {
                cause: err.cause,
                endpoint: Some(ep.addr),
                pod: ep.pod.clone(),
                attempts: attempts.picked,
                detail,
            })
        }
    }
}

fn not_retried(m: &UpstreamMetrics, why: NoRetry) {
    if why == NoRetry::BudgetExhausted {
        m.budget_exhausted.inc();
    }
    m.retry_skipped(why);
}

fn is_gateway_error(status: StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

// === impl Attempts ===

/// One request's retry state: what it has tried and what the retry rules still allow. Plain data
/// on the request's stack; `forward` asks it for each attempt's plan and, after the attempt,
/// what to do next.
struct Attempts<'a> {
    policy: &'a Policy,
    budget: &'a Budget,
    idempotent: bool,
    deadline: Instant,
    /// When the current attempt starts. The clock is read again only for retries.
    now: Instant,
    /// Endpoints picked so far (the keep-alive race's second go is not a pick).
    picked: u32,
    /// Addresses picked so far, which the balancer avoids while others are left.
    tried: SmallVec<[SocketAddr; 4]>,
    /// The endpoint of the last attempt. Endpoints are borrowed from the upstream, which
    /// outlives the request: no reference counting on the request path but the in-flight guard.
    last: Option<&'a Arc<Endpoint>>,
    /// The next attempt goes to `last` again, on a new connection (keep-alive race).
    fresh: bool,
    /// The one free retry of a keep-alive race is not used yet.
    race_retry_left: bool,
    /// An attempt failed: a good response now rescued the request.
    failed_before: bool,
}

/// What becomes of an attempt that got a response.
#[derive(Debug, PartialEq, Eq)]
enum AfterResponse {
    /// The client gets it.
    Answer,
    /// A 502-504 the rules retry: try again, elsewhere if possible.
    Retry,
    /// A 502-504 the rules do not retry: the client gets it as it is.
    PassOn(NoRetry),
}

/// What becomes of an attempt that failed without a response.
#[derive(Debug, PartialEq, Eq)]
enum AfterFailure {
    /// Try again, elsewhere if possible.
    Retry,
    /// The same endpoint again on a new connection: it closed an idle connection as we used it.
    RetryFresh,
    /// The client gets this failure.
    Fail(NoRetry),
}

impl<'a> Attempts<'a> {
    fn new(
        policy: &'a Policy,
        budget: &'a Budget,
        idempotent: bool,
        deadline: Instant,
        first: Instant,
    ) -> Self {
        Attempts {
            policy,
            budget,
            idempotent,
            deadline,
            now: first,
            picked: 0,
            tried: SmallVec::new(),
            last: None,
            fresh: false,
            race_retry_left: true,
            failed_before: false,
        }
    }

    /// The next attempt: the endpoint (picked, or the last one again after a keep-alive race),
    /// how to connect (`mode` for a picked one), and its time. Fails when the deadline passed
    /// or no endpoint is left.
    fn plan(&mut self, up: &'a UpstreamRt, mode: Mode) -> Result<Plan<'a>, ProxyError> {
        if self.picked > 0 {
            self.now = Instant::now();
        }
        let left = self.time_left()?;
        let (ep, mode) = match self.last.filter(|_| self.fresh) {
            Some(ep) => (ep, Mode::Fresh),
            None => (self.pick(up)?, mode),
        };
        self.fresh = false;
        if !self.tried.contains(&ep.addr) {
            self.tried.push(ep.addr);
        }
        self.last = Some(ep);
        Ok(Plan {
            ep,
            mode,
            start: self.now,
            window: self.try_window(left),
        })
    }

    fn time_left(&self) -> Result<Duration, ProxyError> {
        self.deadline
            .checked_duration_since(self.now)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| ProxyError {
                cause: Cause::HttpResponseTimeout,
                endpoint: self.last.map(|e| e.addr),
                pod: self.last.and_then(|e| e.pod.clone()),
                attempts: self.picked,
                detail: format!(
                    "request deadline (timeouts.request {}) passed before a response",
                    self.policy.timeouts.request
                ),
            })
    }

    fn pick(&mut self, up: &'a UpstreamRt) -> Result<&'a Arc<Endpoint>, ProxyError> {
        let pick = balancer::pick(
            &up.endpoints,
            &self.tried,
            self.policy.load_balancer,
            self.policy.panic_threshold,
            self.now,
        )
        .map_err(|why| ProxyError {
            cause: Cause::DestinationUnavailable,
            endpoint: None,
            pod: None,
            attempts: self.picked,
            detail: why.to_string(),
        })?;
        if pick.panic {
            up.metrics.panic.inc();
        }
        self.picked += 1;
        Ok(pick.endpoint)
    }

    /// How long an attempt may wait for a response head, with `left` before the deadline.
    /// Per-try timeouts exist to try elsewhere: a request that can never be retried on a
    /// timeout (non-idempotent, or timeouts not retried) gets the whole remaining deadline, so
    /// slow non-idempotent work is not cut short.
    fn try_window(&self, left: Duration) -> Duration {
        let r = &self.policy.retries;
        if self.idempotent && r.on.contains(&RetryOn::Timeout) && r.attempts > 0 {
            r.per_try_timeout.get().min(left)
        } else {
            left
        }
    }

    /// After a response with `status`; `have_body` says whether the request's body can be sent
    /// again.
    fn on_response(&mut self, status: StatusCode, have_body: bool) -> AfterResponse {
        if !is_gateway_error(status) {
            return AfterResponse::Answer;
        }
        match self.may_retry(RetryOn::GatewayError, Reach::MaybeProcessed, have_body) {
            Ok(()) => {
                self.failed_before = true;
                AfterResponse::Retry
            }
            Err(why) => AfterResponse::PassOn(why),
        }
    }

    /// After an attempt that failed with `err`.
    fn on_failure(&mut self, err: &AttemptError, have_body: bool) -> AfterFailure {
        let resend_ok = err.reach == Reach::NotSent || self.idempotent;
        if err.cause == Cause::KeepaliveRace && self.race_retry_left && resend_ok && have_body {
            // Not the endpoint's fault and not a real retry: the upstream closed an idle
            // connection just as we used it. Same endpoint, fresh connection.
            self.race_retry_left = false;
            self.failed_before = true;
            self.fresh = true;
            return AfterFailure::RetryFresh;
        }
        match self.may_retry(retry_kind(err.cause), err.reach, have_body) {
            Ok(()) => {
                self.failed_before = true;
                AfterFailure::Retry
            }
            Err(why) => AfterFailure::Fail(why),
        }
    }

    /// A response with `status` ends a request that failed before: it was rescued.
    fn rescued(&self, status: StatusCode) -> bool {
        self.failed_before && status.as_u16() < 500
    }

    /// The retry rules, in the order a user would ask "why was this not retried?". The budget
    /// is asked last: a retry allowed pays for itself.
    fn may_retry(&self, kind: RetryOn, reach: Reach, have_body: bool) -> Result<(), NoRetry> {
        let r = &self.policy.retries;
        if !r.on.contains(&kind) {
            return Err(NoRetry::NotRetryable);
        }
        if self.picked > r.attempts {
            return Err(NoRetry::AttemptsExhausted);
        }
        if reach == Reach::MaybeProcessed && !self.idempotent {
            return Err(NoRetry::NonIdempotent);
        }
        if !have_body {
            return Err(NoRetry::BodyNotReplayable);
        }
        if Instant::now() >= self.deadline {
            return Err(NoRetry::Deadline);
        }
        if !self.budget.try_withdraw() {
            return Err(NoRetry::BudgetExhausted);
        }
        Ok(())
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

// === attempts ===

/// One try on one endpoint: a connection, the request, the response head, all within the
/// plan's window. Running out of time while connecting means the request never left.
async fn attempt(plan: &Plan<'_>, parts: &Parts, body: ReqBody) -> Outcome {
    let until = plan.start + plan.window;
    let guard = plan.ep.start_request();
    let Checkout {
        mut conn,
        reused,
        seen_open,
    } = match connection(plan, until).await {
        Ok(c) => c,
        Err(err) => {
            return Outcome::Failed {
                err,
                body: Some(body),
            }
        }
    };
    let mut timer = response_timer(conn.timer.take(), until);
    let host = plan.ep.host_header();
    let send = conn.send(parts, host, body, plan.mode == Mode::Upgrade);
    match within(send, &mut timer, until).await {
        Some(Ok(received)) => Outcome::Response(Answer {
            head: received.head,
            body: received.body,
            timer,
            guard,
        }),
        Some(Err(failed)) => {
            if let h1::Error::ClientBody(msg) = failed.error {
                return Outcome::ClientAborted(msg);
            }
            let err = AttemptError::from_h1(&failed.error, reused);
            if err.cause == Cause::KeepaliveRace {
                plan.ep.pool().observe_race(seen_open);
            }
            Outcome::Failed {
                err,
                body: failed.unsent,
            }
        }
        None => Outcome::Failed {
            err: AttemptError::new(
                Cause::HttpResponseTimeout,
                Reach::MaybeProcessed,
                format!("no response headers within {}", fmt_dur(plan.window)),
            ),
            body: None,
        },
    }
}

/// A pooled connection (it comes at once, no timer needed), or a new one made by `until`.
/// Nothing is sent yet, so a failure here leaves the body with the caller.
async fn connection(plan: &Plan<'_>, until: Instant) -> Result<Checkout, AttemptError> {
    let pool = plan.ep.pool();
    if let Mode::Pooled(reuse) = plan.mode {
        if let Some(c) = pool.checkout(plan.start, reuse) {
            return Ok(c);
        }
    }
    let conn = match tokio::time::timeout_at(until, pool.connect()).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(AttemptError::connect(&e)),
        Err(_) => {
            return Err(AttemptError::new(
                Cause::ConnectionTimeout,
                Reach::NotSent,
                "connect: out of time for this attempt",
            ))
        }
    };
    if Instant::now() >= until {
        return Err(AttemptError::new(
            Cause::ConnectionTimeout,
            Reach::NotSent,
            "connect: the attempt's time ran out while connecting",
        ));
    }
    Ok(Checkout {
        conn,
        reused: false,
        seen_open: Duration::ZERO,
    })
}

/// The connection's timer, set to fire by `until`. It is moved only when it would fire late;
/// one that fires early (set by an earlier, shorter request) is moved then, in `within`: one
/// timer-wheel update per connection per per-try timeout, not one per request.
fn response_timer(timer: Option<Timer>, until: Instant) -> Timer {
    match timer {
        Some(mut t) => {
            if t.deadline() > until {
                t.as_mut().reset(until);
            }
            t
        }
        None => Box::pin(tokio::time::sleep_until(until)),
    }
}

/// `send`'s output, or `None` when `until` passed first; as `timeout_at`, the output first,
/// then the timer.
async fn within<F: Future>(send: F, timer: &mut Timer, until: Instant) -> Option<F::Output> {
    let mut send = std::pin::pin!(send);
    loop {
        tokio::select! {
            biased;
            r = &mut send => return Some(r),
            _ = timer.as_mut() => {
                if Instant::now() >= until {
                    return None;
                }
                timer.as_mut().reset(until);
            }
        }
    }
}

// === the response ===

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
    on_client: OnUpgrade,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryBudget;

    fn policy(on: &[RetryOn], attempts: u32) -> Policy {
        let mut p = Policy::default();
        p.retries.on = on.to_vec();
        p.retries.attempts = attempts;
        p
    }

    const ALL_ON: [RetryOn; 4] = [
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::GatewayError,
        RetryOn::Timeout,
    ];

    fn budget(percent: u32, min_per_second: u32) -> Budget {
        Budget::new(&RetryBudget {
            percent,
            min_per_second,
        })
    }

    /// A request's state after `picked` endpoints were tried.
    fn after_picks<'a>(
        p: &'a Policy,
        b: &'a Budget,
        idempotent: bool,
        picked: u32,
    ) -> Attempts<'a> {
        let now = Instant::now();
        let mut t = Attempts::new(p, b, idempotent, now + Duration::from_secs(15), now);
        t.picked = picked;
        t
    }

    fn failure(cause: Cause, reach: Reach) -> AttemptError {
        AttemptError::new(cause, reach, "test")
    }

    const BAD_GATEWAY: StatusCode = StatusCode::BAD_GATEWAY;

    #[tokio::test(start_paused = true)]
    async fn a_response_that_is_not_a_gateway_error_is_answered() {
        let (p, b) = (policy(&ALL_ON, 2), budget(0, 0));
        let mut t = after_picks(&p, &b, true, 1);
        for status in [
            StatusCode::OK,
            StatusCode::NOT_FOUND,
            StatusCode::INTERNAL_SERVER_ERROR,
        ] {
            assert_eq!(t.on_response(status, true), AfterResponse::Answer);
        }
        // 500 is the application's own answer, not the gateway's: never retried.
        assert!(!t.rescued(StatusCode::OK), "nothing failed before");
    }

    #[tokio::test(start_paused = true)]
    async fn a_good_response_after_a_retry_is_a_rescue() {
        let (p, b) = (policy(&ALL_ON, 2), budget(0, 10));
        let mut t = after_picks(&p, &b, true, 1);
        assert_eq!(t.on_response(BAD_GATEWAY, true), AfterResponse::Retry);
        t.picked = 2;
        assert_eq!(t.on_response(StatusCode::OK, true), AfterResponse::Answer);
        assert!(t.rescued(StatusCode::OK));
        assert!(t.rescued(StatusCode::NOT_FOUND));
        assert!(!t.rescued(StatusCode::INTERNAL_SERVER_ERROR));
    }

    #[tokio::test(start_paused = true)]
    async fn what_may_have_been_processed_is_retried_only_when_idempotent() {
        let (p, b) = (policy(&ALL_ON, 2), budget(0, 10));
        let mut post = after_picks(&p, &b, false, 1);
        assert_eq!(
            post.on_response(StatusCode::SERVICE_UNAVAILABLE, true),
            AfterResponse::PassOn(NoRetry::NonIdempotent)
        );
        let reset = failure(Cause::ConnectionTerminated, Reach::MaybeProcessed);
        assert_eq!(
            post.on_failure(&reset, true),
            AfterFailure::Fail(NoRetry::NonIdempotent)
        );
        // Never sent: safe whatever the method.
        let refused = failure(Cause::ConnectionRefused, Reach::NotSent);
        assert_eq!(post.on_failure(&refused, true), AfterFailure::Retry);

        let mut get = after_picks(&p, &b, true, 1);
        assert_eq!(get.on_failure(&reset, true), AfterFailure::Retry);
        assert_eq!(
            get.on_response(StatusCode::GATEWAY_TIMEOUT, true),
            AfterResponse::Retry
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_when_the_attempts_are_used_up() {
        let (p, b) = (policy(&ALL_ON, 2), budget(0, 100));
        let refused = failure(Cause::ConnectionRefused, Reach::NotSent);
        // The first attempt and two retries.
        for picked in 1..=2 {
            let mut t = after_picks(&p, &b, true, picked);
            assert_eq!(
                t.on_failure(&refused, true),
                AfterFailure::Retry,
                "{picked}"
            );
        }
        let mut t = after_picks(&p, &b, true, 3);
        assert_eq!(
            t.on_failure(&refused, true),
            AfterFailure::Fail(NoRetry::AttemptsExhausted)
        );
        assert_eq!(
            t.on_response(BAD_GATEWAY, true),
            AfterResponse::PassOn(NoRetry::AttemptsExhausted)
        );
        let (none, b) = (policy(&ALL_ON, 0), budget(0, 100));
        let mut t = after_picks(&none, &b, true, 1);
        assert_eq!(
            t.on_failure(&refused, true),
            AfterFailure::Fail(NoRetry::AttemptsExhausted)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_kinds_listed_in_retries_on_are_retried() {
        let (p, b) = (policy(&[RetryOn::ConnectFailure], 2), budget(0, 100));
        let mut t = after_picks(&p, &b, true, 1);
        for cause in [
            Cause::HttpResponseTimeout,
            Cause::ConnectionTerminated,
            Cause::HttpProtocolError,
        ] {
            assert_eq!(
                t.on_failure(&failure(cause, Reach::MaybeProcessed), true),
                AfterFailure::Fail(NoRetry::NotRetryable),
                "{cause}"
            );
        }
        assert_eq!(
            t.on_response(BAD_GATEWAY, true),
            AfterResponse::PassOn(NoRetry::NotRetryable)
        );
        for cause in [
            Cause::ConnectionRefused,
            Cause::ConnectionTimeout,
            Cause::ProxyInternalError,
        ] {
            assert_eq!(
                t.on_failure(&failure(cause, Reach::NotSent), true),
                AfterFailure::Retry,
                "{cause}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_was_streamed_is_not_sent_again() {
        let (p, b) = (policy(&ALL_ON, 2), budget(0, 100));
        let mut t = after_picks(&p, &b, true, 1);
        let refused = failure(Cause::ConnectionRefused, Reach::NotSent);
        assert_eq!(
            t.on_failure(&refused, false),
            AfterFailure::Fail(NoRetry::BodyNotReplayable)
        );
        let race = failure(Cause::KeepaliveRace, Reach::NotSent);
        assert_eq!(
            t.on_failure(&race, false),
            AfterFailure::Fail(NoRetry::BodyNotReplayable)
        );
        assert_eq!(
            t.on_response(BAD_GATEWAY, false),
            AfterResponse::PassOn(NoRetry::BodyNotReplayable)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_retried_once_the_deadline_passed() {
        let (p, b) = (policy(&ALL_ON, 2), budget(0, 100));
        let mut t = after_picks(&p, &b, true, 1);
        let refused = failure(Cause::ConnectionRefused, Reach::NotSent);
        tokio::time::advance(Duration::from_secs(14)).await;
        assert_eq!(t.on_failure(&refused, true), AfterFailure::Retry);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            t.on_failure(&refused, true),
            AfterFailure::Fail(NoRetry::Deadline)
        );
        // And no attempt starts after it.
        t.now = Instant::now();
        let err = t.time_left().unwrap_err();
        assert_eq!(err.cause, Cause::HttpResponseTimeout);
        assert_eq!(err.attempts, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_bounds_retries() {
        let p = policy(&ALL_ON, 10);
        let refused = failure(Cause::ConnectionRefused, Reach::NotSent);
        let empty = budget(0, 0);
        assert_eq!(
            after_picks(&p, &empty, true, 1).on_failure(&refused, true),
            AfterFailure::Fail(NoRetry::BudgetExhausted)
        );
        assert_eq!(
            after_picks(&p, &empty, true, 1).on_response(BAD_GATEWAY, true),
            AfterResponse::PassOn(NoRetry::BudgetExhausted)
        );
        // One retry a second: the second in the same second is refused.
        let one = budget(0, 1);
        let mut t = after_picks(&p, &one, true, 1);
        assert_eq!(t.on_failure(&refused, true), AfterFailure::Retry);
        assert_eq!(
            t.on_failure(&refused, true),
            AfterFailure::Fail(NoRetry::BudgetExhausted)
        );
        // A rule that refuses first does not spend the budget.
        let one = budget(0, 1);
        let mut post = after_picks(&p, &one, false, 1);
        let reset = failure(Cause::ConnectionTerminated, Reach::MaybeProcessed);
        assert_eq!(
            post.on_failure(&reset, true),
            AfterFailure::Fail(NoRetry::NonIdempotent)
        );
        assert_eq!(post.on_failure(&refused, true), AfterFailure::Retry);
    }

    #[tokio::test(start_paused = true)]
    async fn a_keepalive_race_gets_one_free_retry_on_a_fresh_connection() {
        let (p, b) = (policy(&ALL_ON, 2), budget(0, 0));
        // Free: neither an attempt (all used up here) nor paid from the (empty) budget.
        let mut t = after_picks(&p, &b, true, 3);
        let race = failure(Cause::KeepaliveRace, Reach::MaybeProcessed);
        assert_eq!(t.on_failure(&race, true), AfterFailure::RetryFresh);
        assert!(t.fresh, "the same endpoint next");
        assert!(t.failed_before);
        // Only once: a second race is an ordinary reset.
        assert_eq!(
            t.on_failure(&race, true),
            AfterFailure::Fail(NoRetry::AttemptsExhausted)
        );

        // A request that may have been processed is resent only when idempotent...
        let mut post = after_picks(&p, &b, false, 1);
        assert_eq!(
            post.on_failure(&race, true),
            AfterFailure::Fail(NoRetry::NonIdempotent)
        );
        // ...but one that never left is resent whatever the method.
        let mut post = after_picks(&p, &b, false, 1);
        let unsent = failure(Cause::KeepaliveRace, Reach::NotSent);
        assert_eq!(post.on_failure(&unsent, true), AfterFailure::RetryFresh);
    }

    #[tokio::test(start_paused = true)]
    async fn the_per_try_timeout_applies_only_to_requests_retried_on_timeouts() {
        let left = Duration::from_secs(10);
        let per_try = Duration::from_secs(3);
        let b = budget(0, 0);
        let p = policy(&ALL_ON, 2);
        assert_eq!(after_picks(&p, &b, true, 0).try_window(left), per_try);
        assert_eq!(
            after_picks(&p, &b, true, 0).try_window(Duration::from_secs(1)),
            Duration::from_secs(1),
            "never past the deadline"
        );
        assert_eq!(after_picks(&p, &b, false, 0).try_window(left), left);
        let no_timeouts = policy(&[RetryOn::ConnectFailure], 2);
        assert_eq!(
            after_picks(&no_timeouts, &b, true, 0).try_window(left),
            left
        );
        let no_retries = policy(&ALL_ON, 0);
        assert_eq!(after_picks(&no_retries, &b, true, 0).try_window(left), left);
    }
}
