//! Why an attempt or a request failed, as small typed values, and the one place that turns a
//! failure into the response the client sees (status, RFC 9209 `Proxy-Status`, body) and into the
//! fixed `cause` label set of the metrics.

use std::{error::Error as StdError, fmt, io, net::SocketAddr};

use http::{header, HeaderValue, Response, StatusCode};

use super::{body::RespBody, h1};

/// The closed set of failure causes. Labels are RFC 9209 proxy error types where one fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cause {
    /// The endpoint refused the TCP connection (nothing listening: pod gone).
    ConnectionRefused,
    /// The TCP connection could not be established in time.
    ConnectionTimeout,
    /// The connection closed or reset before a complete response head arrived.
    ConnectionTerminated,
    /// A reused keep-alive connection was closed by the upstream as the request went out.
    KeepaliveRace,
    /// No response head within the per-try timeout or the request deadline.
    HttpResponseTimeout,
    /// The response body ended early (the connection broke mid-body).
    HttpResponseIncomplete,
    /// The upstream answered bytes that are not a valid HTTP/1 response.
    HttpProtocolError,
    /// No endpoint to send the request to.
    DestinationUnavailable,
    /// The endpoint answered 502, 503 or 504 itself.
    UpstreamStatus,
    /// The sidecar itself could not open a connection (out of ports or file descriptors): not
    /// the endpoint's fault, so it is not held against it.
    ProxyInternalError,
}

/// How far a failed attempt got, which decides whether it may be retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// The request never left: safe to retry whatever the method.
    NotSent,
    /// Bytes may have reached the upstream: only idempotent requests are retried.
    MaybeProcessed,
}

/// One failed attempt.
#[derive(Debug)]
pub struct AttemptError {
    pub cause: Cause,
    pub reach: Reach,
    pub detail: String,
}

/// The failure the client is told about.
#[derive(Debug, Clone)]
pub struct ProxyError {
    pub cause: Cause,
    /// Endpoint of the last attempt, when there was one.
    pub endpoint: Option<SocketAddr>,
    pub pod: Option<String>,
    pub attempts: u32,
    pub detail: String,
}

// === impl Cause ===

impl Cause {
    /// Every cause, in declaration order (`index` is the position here).
    pub const ALL: [Cause; 10] = [
        Cause::ConnectionRefused,
        Cause::ConnectionTimeout,
        Cause::ConnectionTerminated,
        Cause::KeepaliveRace,
        Cause::HttpResponseTimeout,
        Cause::HttpResponseIncomplete,
        Cause::HttpProtocolError,
        Cause::DestinationUnavailable,
        Cause::UpstreamStatus,
        Cause::ProxyInternalError,
    ];

    /// The position in `ALL`, for series kept per cause.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The metric label and, for final errors, the RFC 9209 `error` parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::ConnectionRefused => "connection_refused",
            Cause::ConnectionTimeout => "connection_timeout",
            Cause::ConnectionTerminated => "connection_terminated",
            Cause::KeepaliveRace => "keepalive_race",
            Cause::HttpResponseTimeout => "http_response_timeout",
            Cause::HttpResponseIncomplete => "http_response_incomplete",
            Cause::HttpProtocolError => "http_protocol_error",
            Cause::DestinationUnavailable => "destination_unavailable",
            Cause::UpstreamStatus => "upstream_status",
            Cause::ProxyInternalError => "proxy_internal_error",
        }
    }

    /// The RFC 9209 error type reported in `Proxy-Status` when this cause ends a request.
    pub fn proxy_status_error(self) -> &'static str {
        match self {
            // A race is a connection closed under us; the RFC has no finer type.
            Cause::KeepaliveRace => "connection_terminated",
            other => other.as_str(),
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Cause::DestinationUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Cause::HttpResponseTimeout | Cause::ConnectionTimeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// Failures that say something about the endpoint (for outlier detection).
    pub fn is_endpoint_fault(self) -> bool {
        !matches!(
            self,
            Cause::DestinationUnavailable | Cause::KeepaliveRace | Cause::ProxyInternalError
        )
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl AttemptError ===

impl AttemptError {
    pub fn new(cause: Cause, reach: Reach, detail: impl Into<String>) -> Self {
        AttemptError {
            cause,
            reach,
            detail: detail.into(),
        }
    }

    /// Classifies a connect failure. The request never left.
    pub fn connect(err: &io::Error) -> Self {
        let cause = match err.kind() {
            io::ErrorKind::TimedOut => Cause::ConnectionTimeout,
            io::ErrorKind::AddrNotAvailable => Cause::ProxyInternalError,
            _ if err
                .raw_os_error()
                .is_some_and(|c| errno::OWN_RESOURCES.contains(&c)) =>
            {
                Cause::ProxyInternalError
            }
            // Refused, unreachable, reset during the handshake: the endpoint cannot be reached.
            _ => Cause::ConnectionRefused,
        };
        AttemptError::new(cause, Reach::NotSent, format!("connect: {err}"))
    }

    /// Classifies a failed exchange on a connection that was up. `reused`: the connection had
    /// served a request before; a failure with no response byte on such a connection is the
    /// keep-alive race.
    pub fn from_h1(err: &h1::Error, reused: bool) -> Self {
        let detail = err.detail();
        let (cause, reach) = match err {
            h1::Error::Write { source, sent } => {
                let reach = if *sent {
                    Reach::MaybeProcessed
                } else {
                    Reach::NotSent
                };
                let cause = if reused && is_reset(source) {
                    Cause::KeepaliveRace
                } else {
                    Cause::ConnectionTerminated
                };
                (cause, reach)
            }
            h1::Error::Closed { received: 0 } if reused => {
                (Cause::KeepaliveRace, Reach::MaybeProcessed)
            }
            h1::Error::Read {
                source,
                received: 0,
            } if reused && is_reset(source) => (Cause::KeepaliveRace, Reach::MaybeProcessed),
            h1::Error::Closed { .. } | h1::Error::Read { .. } => {
                (Cause::ConnectionTerminated, Reach::MaybeProcessed)
            }
            h1::Error::Parse(_) => (Cause::HttpProtocolError, Reach::MaybeProcessed),
            // The proxy answers a failed client body itself; classified for completeness.
            h1::Error::ClientBody(_) => (Cause::ConnectionTerminated, Reach::MaybeProcessed),
        };
        AttemptError::new(cause, reach, detail)
    }
}

/// Linux errno values of a connect that failed because the sidecar's own resources ran out
/// (std names no error kind for most of them).
mod errno {
    const ENOMEM: i32 = 12;
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    const EADDRNOTAVAIL: i32 = 99;
    const ENOBUFS: i32 = 105;
    pub const OWN_RESOURCES: [i32; 5] = [EADDRNOTAVAIL, EMFILE, ENFILE, ENOBUFS, ENOMEM];
}

fn is_reset(err: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            );
        }
        cur = e.source();
    }
    false
}

// === impl ProxyError ===

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        self.cause.status()
    }

    /// `detour; error=connection_refused; details="..."` (RFC 9209 structured field).
    pub fn proxy_status(&self) -> String {
        format!(
            "detour; error={}; details={}",
            self.cause.proxy_status_error(),
            sf_string(&self.details())
        )
    }

    pub fn details(&self) -> String {
        let mut s = String::new();
        match (&self.endpoint, &self.pod) {
            (Some(ep), Some(pod)) => s.push_str(&format!("endpoint {ep} (pod {pod}): ")),
            (Some(ep), None) => s.push_str(&format!("endpoint {ep}: ")),
            _ => {}
        }
        s.push_str(&self.detail);
        s.push_str(&format!("; attempts={}", self.attempts));
        s
    }

    /// The response the sidecar answers itself.
    pub fn to_response(&self) -> Response<RespBody> {
        let status = self.status();
        let body = format!(
            "{} {}: {}\n{}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            self.cause.proxy_status_error(),
            self.details()
        );
        let mut resp = Response::new(RespBody::full(body));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Ok(v) = HeaderValue::from_str(&self.proxy_status()) {
            h.insert("proxy-status", v);
        }
        resp
    }
}

/// Encodes a structured-field string (RFC 8941 sf-string): printable ASCII, `"` and `\` escaped.
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_cause() {
        assert_eq!(Cause::ConnectionRefused.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            Cause::HttpResponseTimeout.status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            Cause::ConnectionTimeout.status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            Cause::DestinationUnavailable.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            Cause::KeepaliveRace.proxy_status_error(),
            "connection_terminated"
        );
    }

    #[test]
    fn proxy_status_is_a_valid_structured_field() {
        let e = ProxyError {
            cause: Cause::ConnectionRefused,
            endpoint: Some("127.0.0.1:9".parse().unwrap()),
            pod: Some("web-1".into()),
            attempts: 3,
            detail: "connect: Connection \"refused\"\n".into(),
        };
        assert_eq!(
            e.proxy_status(),
            r#"detour; error=connection_refused; details="endpoint 127.0.0.1:9 (pod web-1): connect: Connection \"refused\"?; attempts=3""#
        );
        let resp = e.to_response();
        assert_eq!(resp.status(), 502);
        assert!(resp.headers()["proxy-status"].to_str().is_ok());
    }

    #[test]
    fn connect_errors_classify() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(
            AttemptError::connect(&refused).cause,
            Cause::ConnectionRefused
        );
        let slow = io::Error::from(io::ErrorKind::TimedOut);
        let e = AttemptError::connect(&slow);
        assert_eq!(e.cause, Cause::ConnectionTimeout);
        assert_eq!(e.reach, Reach::NotSent);
    }

    #[test]
    fn labels_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for c in Cause::ALL {
            assert!(seen.insert(c.as_str()));
        }
    }

    #[test]
    fn every_cause_is_listed_once_at_its_index() {
        for (i, c) in Cause::ALL.into_iter().enumerate() {
            assert_eq!(c.index(), i, "{c}");
        }
    }

    #[test]
    fn running_out_of_our_own_resources_is_not_the_endpoints_fault() {
        for code in errno::OWN_RESOURCES {
            let e = AttemptError::connect(&io::Error::from_raw_os_error(code));
            assert_eq!(e.cause, Cause::ProxyInternalError, "errno {code}");
            assert_eq!(e.reach, Reach::NotSent);
        }
    }
}
