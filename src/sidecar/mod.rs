//! `detour sidecar`: the reverse-proxy data plane.
//!
//! A request flows listener (`runtime`) → `proxy::handle` → `balancer::pick` → `pool` →
//! upstream, and failures flow back through `errors` (one response, one cause label) and
//! `upstream::record_failure` (outlier detection). Config changes flow file → `run`'s poller →
//! `SidecarHandle::apply`, which swaps each listener's upstream atomically.

mod admin;
mod balancer;
mod body;
mod budget;
mod endpoint;
mod errors;
mod h1;
mod headers;
mod health;
mod labels;
mod metrics;
mod pool;
mod proxy;
mod runtime;
mod upstream;
mod workers;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

pub use self::admin::{EndpointsReport, ReportedEndpoint};
pub use self::endpoint::{EndpointSnapshot, Health, LiveState};
pub use self::errors::Cause;
pub use self::labels::{matches as selector_matches, parse_downward_labels};
pub use self::runtime::{Options, Sidecar, SidecarHandle, UpstreamView};
use crate::config::{Config, ConfigError, FieldErrors};

/// Flags of `detour sidecar`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The config document (YAML or JSON). Watched: a valid change is applied live, an invalid
    /// one is logged and counted and the running config stays.
    #[arg(long, short, env = "DETOUR_CONFIG")]
    pub config: PathBuf,
    /// Admin server address: /metrics, /live, /ready, /config, /endpoints. In Kubernetes, bind
    /// 0.0.0.0 and name the container port detour-admin so the operator can read /endpoints.
    #[arg(long, env = "DETOUR_ADMIN", default_value = "127.0.0.1:9901")]
    pub admin: SocketAddr,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, env = "DETOUR_DRAIN_TIMEOUT", default_value = "30s")]
    pub drain_timeout: crate::config::Duration,
    /// How often the config file is checked for changes.
    #[arg(long, env = "DETOUR_RELOAD_INTERVAL", default_value = "1s")]
    pub reload_interval: crate::config::Duration,
    /// The pod's labels (downward API file, `key="value"` lines): only upstreams whose
    /// workloadSelector selects this pod are served.
    #[arg(long, env = "DETOUR_POD_LABELS")]
    pub pod_labels: Option<PathBuf>,
    /// Worker threads serving traffic (thread per core: each has its own accept socket and
    /// connection pools). Default: one per CPU.
    #[arg(long, env = "DETOUR_THREADS")]
    pub threads: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid config:\n{0}")]
    Invalid(FieldErrors),
    #[error("{what}: cannot listen on {addr}: {source}")]
    Bind {
        what: String,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("reading pod labels from {path}: {source}")]
    PodLabels {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for signals: {0}")]
    Signal(#[source] std::io::Error),
    #[error(transparent)]
    Io(std::io::Error),
}

/// Runs until SIGTERM or SIGINT, then drains.
pub async fn run(args: Args) -> Result<(), Error> {
    let pod_labels = match &args.pod_labels {
        Some(p) => Some(parse_downward_labels(&std::fs::read_to_string(p).map_err(
            |source| Error::PodLabels {
                path: p.display().to_string(),
                source,
            },
        )?)),
        None => None,
    };
    let workers = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let opts = Options {
        admin: args.admin,
        drain_timeout: args.drain_timeout.get(),
        pod_labels,
        workers,
    };
    // Start even without a valid file (the operator's ConfigMap may not exist yet): admin up,
    // /ready 503 until a valid config arrives.
    let sidecar = Sidecar::start_empty(opts).await?;
    tracing::info!(admin = %sidecar.admin_addr(), config = %args.config.display(), "sidecar started");
    let mut last = None;
    reload_if_changed(&sidecar, &args.config, &mut last).await;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(Error::Signal)?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(Error::Signal)?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(Error::Signal)?;
    let mut tick = tokio::time::interval(args.reload_interval.get().max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => reload_if_changed(&sidecar, &args.config, &mut last).await,
            _ = hup.recv() => {
                last = None;
                reload_if_changed(&sidecar, &args.config, &mut last).await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(drain_timeout = %args.drain_timeout, "shutting down: draining in-flight requests");
    sidecar.shutdown(args.drain_timeout.get()).await;
    Ok(())
}

/// Re-reads the file when its bytes changed. Comparing content (not mtime) also catches the
/// symlink swap Kubernetes uses to update mounted ConfigMaps.
async fn reload_if_changed(sidecar: &SidecarHandle, path: &Path, last: &mut Option<Vec<u8>>) {
    let bytes = match tokio::fs::read(path).await {
        Ok(b) => b,
        Err(e) => {
            if last.is_none() && !sidecar.is_ready() {
                tracing::warn!(path = %path.display(), error = %e, "config file not readable yet");
            }
            return;
        }
    };
    if last.as_deref() == Some(&bytes[..]) {
        return;
    }
    *last = Some(bytes.clone());
    let parsed = std::str::from_utf8(&bytes)
        .map_err(|e| ConfigError::Parse {
            path: "document".into(),
            message: format!("not UTF-8: {e}"),
        })
        .and_then(Config::from_str_validated);
    match parsed {
        Ok(cfg) => match sidecar.apply(cfg).await {
            Ok(()) => tracing::info!(path = %path.display(), "config loaded"),
            // The port may free up (an old process still draining): try the same bytes again.
            Err(Error::Bind { .. }) => *last = None,
            Err(_) => {}
        },
        Err(e) => sidecar.record_rejected(&e),
    }
}
