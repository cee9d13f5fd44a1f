//! Active health checks: one task per endpoint, first check at once, then every interval plus
//! random jitter. HTTP checks use their own short-lived connection (never a pooled one), so a
//! check never competes with traffic and always sees a fresh connect.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, Request};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::{net::TcpStream, task::JoinHandle};

use super::{
    endpoint::{Endpoint, HealthChange},
    metrics::UpstreamMetrics,
};
use crate::config::{HealthCheck, HealthCheckProtocol};

/// Starts checking `ep`; the task ends when aborted (endpoint removed, policy changed).
pub fn spawn(
    upstream: String,
    ep: Arc<Endpoint>,
    hc: HealthCheck,
    metrics: Arc<UpstreamMetrics>,
) -> Option<JoinHandle<()>> {
    if hc.protocol == HealthCheckProtocol::None {
        ep.reset_health();
        return None;
    }
    Some(tokio::spawn(async move {
        loop {
            let result = check_once(&ep, &hc).await;
            let ok = result.is_ok();
            if ok {
                metrics.checks_ok.inc();
            } else {
                metrics.checks_failed.inc();
            }
            match ep.record_check(ok, &hc) {
                Some(HealthChange::BecameUnhealthy) => tracing::warn!(
                    upstream = %upstream,
                    endpoint = %ep.addr,
                    pod = ep.pod.as_deref().unwrap_or(""),
                    reason = %result.err().unwrap_or_default(),
                    "endpoint failed its health check"
                ),
                Some(HealthChange::BecameHealthy) => tracing::info!(
                    upstream = %upstream,
                    endpoint = %ep.addr,
                    "endpoint passed its health check again"
                ),
                None => {}
            }
            let jitter_ms = hc.jitter.as_millis() as u64;
            let extra = if jitter_ms > 0 {
                rand::rng().random_range(0..=jitter_ms)
            } else {
                0
            };
            tokio::time::sleep(hc.interval.get() + Duration::from_millis(extra)).await;
        }
    }))
}

/// One check; the error says why it failed.
pub async fn check_once(ep: &Endpoint, hc: &HealthCheck) -> Result<(), String> {
    match tokio::time::timeout(hc.timeout.get(), probe(ep, hc)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {}", hc.timeout)),
    }
}

async fn probe(ep: &Endpoint, hc: &HealthCheck) -> Result<(), String> {
    let stream = TcpStream::connect(ep.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if hc.protocol == HealthCheckProtocol::Tcp {
        return Ok(());
    }
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req = Request::get(hc.path.as_str())
        .header(header::HOST, ep.addr.to_string())
        .header(header::USER_AGENT, "detour-health-check")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let resp = tx
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    if hc.expected_statuses.iter().any(|r| r.contains(status)) {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}
