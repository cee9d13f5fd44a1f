//! `detour sidecar`: the reverse-proxy data plane.
//!
//! A request flows listener (`runtime`) → `proxy::handle` → `balancer::pick` → `pool` → the
//! HTTP/1.1 codec `h1` → upstream, and failures flow back through `errors` (one response, one
//! cause label) and `upstream::record_failure` (outlier detection); a response body broken off
//! after its head reports through `body::BodyFailure`. Modules depend one way, in the layers
//! `tests/layering.rs` lists. Config changes flow from a `source` (a file, or
//! the `detour-config` ConfigMap watched through the API) → `SidecarHandle::apply`, which swaps
//! each listener's upstream atomically.

mod admin;
mod balancer;
mod body;
mod budget;
mod endpoint;
mod errors;
mod h1;
mod handle;
mod headers;
mod health_check;
mod labels;
mod metrics;
mod pool;
mod proxy;
mod runtime;
mod source;
mod upstream;
mod workers;

use std::{net::SocketAddr, path::PathBuf};

pub use self::endpoint::{EndpointSnapshot, Health};
pub use self::handle::{Sidecar, SidecarHandle};
pub use self::labels::matches as selector_matches;
use self::labels::parse_downward_labels;
pub use self::runtime::{Options, UpstreamView};
pub use self::source::ConfigSource;
use crate::config::{ConfigError, FieldErrors, CONFIG_MAP};

/// Flags of `detour sidecar`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Where the config comes from: `file` (--config, watched) or `kubernetes` (the ConfigMap
    /// --config-map of the pod's namespace, watched through the API: changes arrive in well
    /// under a second, where a mounted ConfigMap takes the kubelet's 1-2 minute sync).
    #[arg(long, env = "DETOUR_CONFIG_SOURCE", value_enum, default_value_t = SourceKind::File)]
    pub config_source: SourceKind,
    /// The config document (YAML or JSON), for `--config-source file`. Watched: a valid change
    /// is applied live, an invalid one is logged and counted and the running config stays.
    #[arg(long, short, env = "DETOUR_CONFIG")]
    pub config: Option<PathBuf>,
    /// The pod's namespace, for `--config-source kubernetes` (downward API `metadata.namespace`).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    /// The ConfigMap to watch in `--config-source kubernetes` mode (key `config.yaml`).
    #[arg(long, env = "DETOUR_CONFIG_MAP", default_value = CONFIG_MAP)]
    pub config_map: String,
    /// Admin server address: /metrics, /live, /ready, /config, /endpoints. In Kubernetes, bind
    /// 0.0.0.0 and name the container port detour-admin so the operator can read /endpoints.
    #[arg(long, env = "DETOUR_ADMIN", default_value = "127.0.0.1:9901")]
    pub admin: SocketAddr,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, env = "DETOUR_DRAIN_TIMEOUT", default_value = "30s")]
    pub drain_timeout: crate::config::Duration,
    /// How often the config file is checked for changes (`--config-source file`).
    #[arg(long, env = "DETOUR_RELOAD_INTERVAL", default_value = "1s")]
    pub reload_interval: crate::config::Duration,
    /// The pod's labels (downward API file, `key="value"` lines): only upstreams whose
    /// workloadSelector selects this pod are served.
    #[arg(long, env = "DETOUR_POD_LABELS")]
    pub pod_labels: Option<PathBuf>,
    /// Worker threads serving traffic (thread per core: each has its own accept socket and
    /// connection pools). Default: one per CPU.
    #[arg(long, env = "DETOUR_THREADS", value_parser = runtime::parse_threads)]
    pub threads: Option<usize>,
}

/// `--config-source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    File,
    Kubernetes,
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
    #[error("{0}")]
    Usage(String),
    #[error("connecting to the Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
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
    let source = config_source(&args).await?;
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
    // Start even without a valid config (the operator's ConfigMap may not exist yet): admin up,
    // /ready 503 until a valid config arrives.
    let sidecar = Sidecar::start_empty(opts).await?;
    tracing::info!(admin = %sidecar.admin_addr(), source = %source.describe(), "sidecar started");
    let following = sidecar.follow(source);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(Error::Signal)?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(Error::Signal)?;
    // The file source reloads on SIGHUP; otherwise it must not end the process.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(Error::Signal)?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => tracing::debug!("SIGHUP"),
        }
    }
    following.abort();
    tracing::info!(drain_timeout = %args.drain_timeout, "shutting down: draining in-flight requests");
    sidecar.shutdown(args.drain_timeout.get()).await;
    Ok(())
}

/// The source `args` name, with a clear error for a missing flag.
async fn config_source(args: &Args) -> Result<ConfigSource, Error> {
    match args.config_source {
        SourceKind::File => {
            let path = args.config.clone().ok_or_else(|| {
                Error::Usage(
                    "--config (or DETOUR_CONFIG) is required with --config-source file".into(),
                )
            })?;
            Ok(ConfigSource::File {
                path,
                interval: args.reload_interval.get(),
            })
        }
        SourceKind::Kubernetes => {
            let namespace = args.namespace.clone().ok_or_else(|| {
                Error::Usage(
                    "--namespace (or POD_NAMESPACE, from the downward API) is required with --config-source kubernetes".into(),
                )
            })?;
            let client = kube::Client::try_default().await.map_err(Error::Kube)?;
            Ok(ConfigSource::Kubernetes {
                client,
                namespace,
                name: args.config_map.clone(),
            })
        }
    }
}
