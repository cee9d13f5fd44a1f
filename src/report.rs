//! The `/endpoints` report: the wire contract between a sidecar (which serves it on its admin
//! port) and the operator (which reads it from every sidecar to put ejections in the policies'
//! status). Both sides import it from here, so neither imports the other.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `GET /endpoints`: each upstream's endpoints and their live state, without the config. The
/// operator scrapes this from every sidecar to report ejections in the policies' status, so it
/// stays small (no policy, no counters) and is read with the same type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointsReport {
    /// Hash of the running config (as `/config` and `detour_config_info` show it).
    #[serde(default)]
    pub hash: String,
    /// Upstream name → its endpoints.
    #[serde(default)]
    pub upstreams: BTreeMap<String, Vec<ReportedEndpoint>>,
}

/// One endpoint in [`EndpointsReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportedEndpoint {
    /// `ip:port` (`[v6]:port`).
    pub address: String,
    pub state: LiveState,
}

/// One word for an endpoint's state, as `detour_endpoints{state}` and `GET /endpoints` report
/// it. An endpoint in several states shows the first of terminating, ejected, unhealthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LiveState {
    /// Eligible: not terminating, not ejected, not failing active checks.
    Healthy,
    /// Failing active health checks.
    Unhealthy,
    /// Ejected by outlier detection (passive, on live traffic).
    Ejected,
    /// Kubernetes says the pod is terminating.
    Terminating,
    /// A state a newer sidecar reports that this build does not know (read side only).
    #[serde(other)]
    Unknown,
}
