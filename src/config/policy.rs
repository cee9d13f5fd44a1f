//! The resilience policy of one upstream: the public API shared by the sidecar's config document
//! and the `UpstreamPolicy` CRD. Defaults live here and only here (serde defaults + `Default`
//! impls), and `validate` holds the same rules the CRD publishes as schema bounds and CEL.

use std::{borrow::Cow, fmt, str::FromStr};

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Duration, FieldErrors};

/// Resilience settings for one upstream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// Active health checking of every endpoint.
    #[serde(default, deserialize_with = "super::null_as_empty::section")]
    pub health_check: HealthCheck,
    /// Passive outlier detection: eject endpoints that fail live traffic.
    #[serde(default, deserialize_with = "super::null_as_empty::section")]
    pub outlier_detection: OutlierDetection,
    /// When and how failed attempts are retried on another endpoint.
    #[serde(default, deserialize_with = "super::null_as_empty::section")]
    pub retries: Retries,
    /// Request, connect and connection-pool timeouts.
    #[serde(default, deserialize_with = "super::null_as_empty::section")]
    pub timeouts: Timeouts,
    /// Percent (0-100). When fewer than this share of endpoints is eligible, balance over all
    /// endpoints instead (panic mode), as Envoy does. 0 disables panic mode.
    #[serde(default = "defaults::panic_threshold")]
    #[schemars(range(min = 0, max = 100))]
    pub panic_threshold: u32,
    /// Endpoint choice among eligible endpoints (power of two choices).
    #[serde(default)]
    pub load_balancer: LoadBalancer,
}

/// Active health check of each endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
// `protocol: none` skips every timing rule, as `Policy::validate` does.
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.protocol == 'none' || duration(self.timeout) <= duration(self.interval)",
     "message": "timeout must not exceed interval", "fieldPath": ".timeout"},
    {"rule": "self.protocol == 'none' || duration(self.interval) > duration('0s')",
     "message": "interval must be greater than 0s", "fieldPath": ".interval"},
    {"rule": "self.protocol == 'none' || duration(self.timeout) > duration('0s')",
     "message": "timeout must be greater than 0s", "fieldPath": ".timeout"}
]))]
pub struct HealthCheck {
    /// `http` (GET `path`, expect a status in `expectedStatuses`), `tcp` (connect only) or `none`.
    #[serde(default)]
    pub protocol: HealthCheckProtocol,
    /// Path of the HTTP GET check.
    #[serde(default = "defaults::hc_path")]
    #[schemars(regex(pattern = r"^/[^\s]*$"), length(max = 1024))]
    pub path: String,
    /// Status ranges that count as healthy, e.g. `["200-399"]` or `["200", "204"]`.
    #[serde(
        default = "defaults::hc_statuses",
        deserialize_with = "super::null_as_empty::seq"
    )]
    #[schemars(length(min = 1, max = 16))]
    pub expected_statuses: Vec<StatusRange>,
    /// Time between two checks of one endpoint.
    #[serde(default = "defaults::hc_interval")]
    pub interval: Duration,
    /// Time a check may take before it counts as failed.
    #[serde(default = "defaults::hc_timeout")]
    pub timeout: Duration,
    /// Up to this much random time is added to each interval so checks do not align.
    #[serde(default = "defaults::hc_jitter")]
    pub jitter: Duration,
    /// Consecutive passing checks that make an unhealthy endpoint healthy again (1-100).
    #[serde(default = "defaults::hc_healthy")]
    #[schemars(range(min = 1, max = 100))]
    pub healthy_threshold: u32,
    /// Consecutive failing checks that make a healthy endpoint unhealthy (1-100).
    #[serde(default = "defaults::hc_unhealthy")]
    #[schemars(range(min = 1, max = 100))]
    pub unhealthy_threshold: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckProtocol {
    #[default]
    Http,
    Tcp,
    None,
}

/// Passive outlier detection (ejection) on live traffic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "duration(self.baseEjectionTime) <= duration(self.maxEjectionTime)",
     "message": "baseEjectionTime must not exceed maxEjectionTime", "fieldPath": ".baseEjectionTime"},
    {"rule": "duration(self.baseEjectionTime) > duration('0s')",
     "message": "baseEjectionTime must be greater than 0s", "fieldPath": ".baseEjectionTime"}
]))]
pub struct OutlierDetection {
    /// Consecutive gateway errors (502/503/504 from the endpoint, connect failures, resets,
    /// timeouts) that eject an endpoint. 0 disables.
    #[serde(default = "defaults::od_gateway")]
    #[schemars(range(min = 0, max = 1000))]
    pub consecutive_gateway_errors: u32,
    /// Consecutive 5xx responses of any kind that eject an endpoint. 0 (default) disables.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub consecutive_5xx: u32,
    /// A refused connection ejects the endpoint at once: nothing listens there.
    #[serde(default = "defaults::yes")]
    pub eject_on_connect_refused: bool,
    /// Ejection time is this times the number of times the endpoint was ejected.
    #[serde(default = "defaults::od_base")]
    pub base_ejection_time: Duration,
    /// Upper bound of one ejection.
    #[serde(default = "defaults::od_max")]
    pub max_ejection_time: Duration,
    /// At most this percent (0-100) of an upstream's endpoints are ejected at once, but at least
    /// one may always be (as in Envoy); 0 disables ejection.
    #[serde(default = "defaults::od_max_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: u32,
}

/// Retries of failed attempts, always on another endpoint when one exists.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "duration(self.perTryTimeout) > duration('0s')",
     "message": "perTryTimeout must be greater than 0s", "fieldPath": ".perTryTimeout"}
]))]
pub struct Retries {
    /// Retries after the first attempt (0-10). 0 disables retries.
    #[serde(default = "defaults::retry_attempts")]
    #[schemars(range(min = 0, max = 10))]
    pub attempts: u32,
    /// Failure kinds that are retried.
    #[serde(
        default = "defaults::retry_on",
        deserialize_with = "super::null_as_empty::seq"
    )]
    #[schemars(length(max = 4), extend("x-kubernetes-list-type" = "set"))]
    pub on: Vec<RetryOn>,
    /// Time each attempt may take to produce response headers, for requests that can be retried
    /// on a timeout (idempotent, `timeout` in `on`, `attempts` > 0). Other requests get the whole
    /// `timeouts.request`, so slow non-idempotent work is not cut short.
    #[serde(default = "defaults::per_try_timeout")]
    pub per_try_timeout: Duration,
    /// Retry budget, so retries cannot multiply load during an outage.
    #[serde(default)]
    pub budget: RetryBudget,
    /// Request bodies up to this size are buffered so they can be replayed; larger bodies are
    /// streamed and never retried once sent (0-16777216).
    #[serde(default = "defaults::max_buffered_body")]
    #[schemars(range(min = 0, max = 16_777_216))]
    pub max_buffered_body_bytes: u32,
}

/// Failure kinds a retry may follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// The connection could not be established (refused, timed out). Always safe.
    ConnectFailure,
    /// The connection was reset or closed before response headers.
    Reset,
    /// The endpoint answered 502, 503 or 504.
    GatewayError,
    /// No response headers within `perTryTimeout`.
    Timeout,
}

/// Retries are allowed while they stay under `percent` of recent requests, plus `minPerSecond`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries as a percent (0-1000) of requests over the last 10 seconds.
    #[serde(default = "defaults::budget_percent")]
    #[schemars(range(min = 0, max = 1000))]
    pub percent: u32,
    /// Retries per second always allowed, so low-traffic upstreams can still retry.
    #[serde(default = "defaults::budget_min")]
    #[schemars(range(min = 0, max = 100000))]
    pub min_per_second: u32,
}

/// Timeouts of one upstream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "duration(self.connect) <= duration(self.request)",
     "message": "connect must not exceed request", "fieldPath": ".connect"},
    {"rule": "duration(self.request) > duration('0s')",
     "message": "request must be greater than 0s", "fieldPath": ".request"},
    {"rule": "duration(self.connect) > duration('0s')",
     "message": "connect must be greater than 0s", "fieldPath": ".connect"},
    {"rule": "duration(self.poolIdle) > duration('0s')",
     "message": "poolIdle must be greater than 0s", "fieldPath": ".poolIdle"}
]))]
pub struct Timeouts {
    /// Overall deadline of one client request, retries included, until response headers.
    #[serde(default = "defaults::request_timeout")]
    pub request: Duration,
    /// Time to establish a TCP connection to an endpoint.
    #[serde(default = "defaults::connect_timeout")]
    pub connect: Duration,
    /// Idle pooled connections to endpoints are closed after this long. Keep it below the
    /// upstream's own keep-alive timeout (Node.js 5s, Apache 5s, nginx 75s) so the proxy, not the
    /// upstream, closes idle connections and requests never race a closing connection.
    #[serde(default = "defaults::pool_idle")]
    pub pool_idle: Duration,
}

/// How an endpoint is chosen among the eligible ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    /// Power of two choices, fewest requests in flight.
    #[default]
    LeastRequest,
    /// Power of two choices, lowest peak-EWMA latency × requests in flight.
    PeakEwma,
}

/// An HTTP status code or an inclusive range of them: `200`, `200-399`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusRange {
    pub start: u16,
    pub end: u16,
}

mod defaults {
    use super::*;

    pub fn yes() -> bool {
        true
    }
    pub fn panic_threshold() -> u32 {
        50
    }
    pub fn hc_path() -> String {
        "/healthz".to_string()
    }
    pub fn hc_statuses() -> Vec<StatusRange> {
        vec![StatusRange {
            start: 200,
            end: 399,
        }]
    }
    pub fn hc_interval() -> Duration {
        Duration::from_secs(2)
    }
    pub fn hc_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn hc_jitter() -> Duration {
        Duration::from_millis(200)
    }
    pub fn hc_healthy() -> u32 {
        2
    }
    pub fn hc_unhealthy() -> u32 {
        2
    }
    pub fn od_gateway() -> u32 {
        3
    }
    pub fn od_base() -> Duration {
        Duration::from_secs(10)
    }
    pub fn od_max() -> Duration {
        Duration::from_secs(300)
    }
    pub fn od_max_percent() -> u32 {
        50
    }
    pub fn retry_attempts() -> u32 {
        2
    }
    pub fn retry_on() -> Vec<RetryOn> {
        vec![
            RetryOn::ConnectFailure,
            RetryOn::Reset,
            RetryOn::GatewayError,
            RetryOn::Timeout,
        ]
    }
    pub fn per_try_timeout() -> Duration {
        Duration::from_secs(3)
    }
    pub fn max_buffered_body() -> u32 {
        64 * 1024
    }
    pub fn budget_percent() -> u32 {
        20
    }
    pub fn budget_min() -> u32 {
        10
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(15)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn pool_idle() -> Duration {
        Duration::from_secs(4)
    }
}

// === impl Default ===

/// Every `Default` goes through serde so the defaults are written exactly once.
macro_rules! default_via_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                serde_json::from_value(serde_json::json!({})).expect("all fields have defaults")
            }
        }
    )*};
}
default_via_serde!(
    Policy,
    HealthCheck,
    OutlierDetection,
    Retries,
    RetryBudget,
    Timeouts
);

// === impl Policy ===

impl Policy {
    /// Checks every rule; each problem is recorded with its path below `path`.
    pub fn validate(&self, path: &str, errs: &mut FieldErrors) {
        self.health_check
            .validate(&format!("{path}.healthCheck"), errs);
        self.outlier_detection
            .validate(&format!("{path}.outlierDetection"), errs);
        self.retries
            .validate(&format!("{path}.retries"), &self.timeouts, errs);
        self.timeouts.validate(&format!("{path}.timeouts"), errs);
        range(
            errs,
            format!("{path}.panicThreshold"),
            self.panic_threshold,
            0,
            100,
        );
    }
}

// === impl HealthCheck ===

impl HealthCheck {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        let at = |f: &str| format!("{path}.{f}");
        if self.protocol == HealthCheckProtocol::Http {
            if !self.path.starts_with('/') || self.path.chars().any(char::is_whitespace) {
                errs.push(at("path"), "must start with / and contain no white space");
            }
            if self.expected_statuses.is_empty() {
                errs.push(at("expectedStatuses"), "must not be empty");
            }
        }
        if self.protocol != HealthCheckProtocol::None {
            if self.interval.is_zero() {
                errs.push(at("interval"), "must be greater than 0s");
            }
            if self.timeout.is_zero() {
                errs.push(at("timeout"), "must be greater than 0s");
            }
            if self.timeout > self.interval {
                errs.push(at("timeout"), "must not exceed healthCheck.interval");
            }
        }
        range(errs, at("healthyThreshold"), self.healthy_threshold, 1, 100);
        range(
            errs,
            at("unhealthyThreshold"),
            self.unhealthy_threshold,
            1,
            100,
        );
    }
}

// === impl OutlierDetection ===

impl OutlierDetection {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        let at = |f: &str| format!("{path}.{f}");
        let gateway = self.consecutive_gateway_errors;
        range(errs, at("consecutiveGatewayErrors"), gateway, 0, 1000);
        range(errs, at("consecutive5xx"), self.consecutive_5xx, 0, 1000);
        range(
            errs,
            at("maxEjectionPercent"),
            self.max_ejection_percent,
            0,
            100,
        );
        if self.base_ejection_time.is_zero() {
            errs.push(at("baseEjectionTime"), "must be greater than 0s");
        }
        if self.base_ejection_time > self.max_ejection_time {
            errs.push(
                at("baseEjectionTime"),
                "must not exceed outlierDetection.maxEjectionTime",
            );
        }
    }
}

// === impl Retries ===

impl Retries {
    /// `timeouts` bounds the per-try timeout.
    fn validate(&self, path: &str, timeouts: &Timeouts, errs: &mut FieldErrors) {
        let at = |f: &str| format!("{path}.{f}");
        range(errs, at("attempts"), self.attempts, 0, 10);
        range(errs, at("budget.percent"), self.budget.percent, 0, 1000);
        let min_per_second = self.budget.min_per_second;
        range(errs, at("budget.minPerSecond"), min_per_second, 0, 100_000);
        let buffered = self.max_buffered_body_bytes;
        range(errs, at("maxBufferedBodyBytes"), buffered, 0, 16_777_216);
        let mut seen = Vec::new();
        for (i, on) in self.on.iter().enumerate() {
            if seen.contains(on) {
                errs.push(at(&format!("on[{i}]")), "duplicate entry");
            }
            seen.push(*on);
        }
        if self.per_try_timeout.is_zero() {
            errs.push(at("perTryTimeout"), "must be greater than 0s");
        }
        if self.per_try_timeout > timeouts.request {
            errs.push(at("perTryTimeout"), "must not exceed timeouts.request");
        }
    }
}

// === impl Timeouts ===

impl Timeouts {
    fn validate(&self, path: &str, errs: &mut FieldErrors) {
        let at = |f: &str| format!("{path}.{f}");
        for (name, d) in [
            ("request", self.request),
            ("connect", self.connect),
            ("poolIdle", self.pool_idle),
        ] {
            if d.is_zero() {
                errs.push(at(name), "must be greater than 0s");
            }
        }
        if self.connect > self.request {
            errs.push(at("connect"), "must not exceed timeouts.request");
        }
    }
}

fn range(errs: &mut FieldErrors, path: String, v: u32, min: u32, max: u32) {
    if v < min || v > max {
        errs.push(path, format!("must be {min}..={max}, got {v}"));
    }
}

// === impl RetryOn ===

impl RetryOn {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryOn::ConnectFailure => "connect-failure",
            RetryOn::Reset => "reset",
            RetryOn::GatewayError => "gateway-error",
            RetryOn::Timeout => "timeout",
        }
    }
}

// === impl StatusRange ===

impl StatusRange {
    pub fn contains(&self, status: u16) -> bool {
        (self.start..=self.end).contains(&status)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid status range {0:?}: expected a code 100-599 or a range like 200-399")]
pub struct ParseStatusRangeError(String);

impl FromStr for StatusRange {
    type Err = ParseStatusRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseStatusRangeError(s.to_string());
        let code = |t: &str| -> Result<u16, ParseStatusRangeError> {
            let v: u16 = t.trim().parse().map_err(|_| err())?;
            if (100..=599).contains(&v) {
                Ok(v)
            } else {
                Err(err())
            }
        };
        let (start, end) = match s.split_once('-') {
            Some((a, b)) => (code(a)?, code(b)?),
            None => {
                let c = code(s)?;
                (c, c)
            }
        };
        if start > end {
            return Err(err());
        }
        Ok(StatusRange { start, end })
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl Serialize for StatusRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Accept a bare number too (`200`), as YAML users write it.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw<'a> {
            Num(u16),
            Str(Cow<'a, str>),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => n.to_string().parse().map_err(serde::de::Error::custom),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl JsonSchema for StatusRange {
    fn schema_name() -> Cow<'static, str> {
        "StatusRange".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^[1-5][0-9][0-9](-[1-5][0-9][0-9])?$",
            "description": "An HTTP status code (200) or inclusive range (200-399).",
            // Both ends have three digits (the pattern), so comparing them as strings orders
            // them as numbers.
            "x-kubernetes-validations": [{
                "rule": "!self.contains('-') || self.split('-')[0] <= self.split('-')[1]",
                "message": "a status range must not end below its start (write 200-399, not 399-200)"
            }]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let p = Policy::default();
        let mut errs = FieldErrors::default();
        p.validate("policy", &mut errs);
        assert!(errs.is_empty(), "{errs}");
        assert_eq!(p.retries.attempts, 2);
        assert_eq!(p.retries.per_try_timeout, Duration::from_secs(3));
        assert_eq!(p.timeouts.pool_idle, Duration::from_secs(4));
        assert_eq!(p.panic_threshold, 50);
        assert_eq!(p.health_check.expected_statuses.len(), 1);
        assert!(p.outlier_detection.eject_on_connect_refused);
    }

    #[test]
    fn every_rule_names_its_field() {
        let mut p = Policy::default();
        p.retries.attempts = 11;
        p.retries.per_try_timeout = Duration::from_secs(60);
        p.health_check.healthy_threshold = 0;
        p.health_check.timeout = Duration::from_secs(10);
        p.outlier_detection.max_ejection_percent = 101;
        p.outlier_detection.base_ejection_time = Duration::from_secs(600);
        p.timeouts.connect = Duration::ZERO;
        p.panic_threshold = 200;
        p.retries.on = vec![RetryOn::Reset, RetryOn::Reset];
        let mut errs = FieldErrors::default();
        p.validate("upstreams[1].policy", &mut errs);
        let text = errs.to_string();
        for want in [
            "upstreams[1].policy.retries.attempts: must be 0..=10, got 11",
            "upstreams[1].policy.retries.perTryTimeout: must not exceed timeouts.request",
            "upstreams[1].policy.healthCheck.healthyThreshold: must be 1..=100",
            "upstreams[1].policy.healthCheck.timeout: must not exceed healthCheck.interval",
            "upstreams[1].policy.outlierDetection.maxEjectionPercent: must be 0..=100",
            "upstreams[1].policy.outlierDetection.baseEjectionTime: must not exceed",
            "upstreams[1].policy.timeouts.connect: must be greater than 0s",
            "upstreams[1].policy.panicThreshold: must be 0..=100",
            "upstreams[1].policy.retries.on[1]: duplicate entry",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn status_ranges() {
        let r: StatusRange = "200-399".parse().unwrap();
        assert!(r.contains(200) && r.contains(399) && !r.contains(400));
        let one: StatusRange = serde_json::from_str("204").unwrap();
        assert_eq!(one.to_string(), "204");
        assert!("399-200".parse::<StatusRange>().is_err());
        assert!("600".parse::<StatusRange>().is_err());
        assert!("2xx".parse::<StatusRange>().is_err());
    }

    #[test]
    fn retry_on_spelling_matches_serde() {
        for on in defaults::retry_on() {
            assert_eq!(serde_json::to_value(on).unwrap(), on.as_str());
        }
    }
}
