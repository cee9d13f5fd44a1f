//! The running sidecar as the program that embeds it sees it: start it, apply configs or follow
//! a config source, read its state, shut it down. This module wires the parts together (the
//! listeners and upstreams of `runtime`, the `admin` server, a `source` of configs), so none of
//! them needs to know the others: it sits above all of them.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::{net::TcpListener, sync::mpsc, sync::Notify, task::JoinHandle};

use super::{
    admin,
    runtime::{Options, Shared, UpstreamView},
    source::{ConfigSource, Update},
    Error,
};
use crate::config::Config;

/// Starts sidecars.
pub struct Sidecar;

/// A running sidecar. Dropping it does not stop it; call `shutdown`.
pub struct SidecarHandle {
    shared: Arc<Shared>,
    admin_addr: SocketAddr,
    admin_stop: Arc<Notify>,
    admin_task: JoinHandle<()>,
}

// === impl Sidecar ===

impl Sidecar {
    /// Validates `config`, binds the admin server and every listener, and starts serving.
    pub async fn start(config: Config, opts: Options) -> Result<SidecarHandle, Error> {
        let handle = Self::start_empty(opts).await?;
        handle.apply(config).await?;
        Ok(handle)
    }

    /// Starts with no upstreams and not ready (`/ready` answers 503) until a config is applied.
    pub async fn start_empty(opts: Options) -> Result<SidecarHandle, Error> {
        let admin_listener = TcpListener::bind(opts.admin)
            .await
            .map_err(|source| Error::Bind {
                what: "--admin".into(),
                addr: opts.admin.to_string(),
                source,
            })?;
        let admin_addr = admin_listener.local_addr().map_err(Error::Io)?;
        let shared = Shared::new(opts)?;
        let admin_stop = Arc::new(Notify::new());
        let admin_task = tokio::spawn(admin::serve(
            admin_listener,
            shared.clone(),
            admin_stop.clone(),
        ));
        Ok(SidecarHandle {
            shared,
            admin_addr,
            admin_stop,
            admin_task,
        })
    }
}

// === impl SidecarHandle ===

impl SidecarHandle {
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The bound address of an upstream's listener (useful with `listen: 127.0.0.1:0`).
    pub fn listener_addr(&self, upstream: &str) -> Option<SocketAddr> {
        self.shared
            .view
            .load()
            .upstreams
            .iter()
            .find(|(n, _, _)| n == upstream)
            .map(|(_, a, _)| *a)
    }

    pub fn metrics_text(&self) -> String {
        self.shared.metrics_text()
    }

    /// The running config.
    pub fn config(&self) -> Config {
        self.shared.view.load().config.clone()
    }

    /// Live endpoint state per upstream, as `/config` shows it.
    pub fn upstreams(&self) -> Vec<UpstreamView> {
        self.shared.upstream_views()
    }

    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Relaxed)
    }

    /// Applies a new config. An invalid one (or one whose listener cannot be bound) is refused
    /// with every problem named, and the running config keeps serving.
    pub async fn apply(&self, config: Config) -> Result<(), Error> {
        self.shared.apply_counted(config).await
    }

    /// Follows `source` in a task: every valid document it reports is applied as [`apply`]
    /// does; whatever goes wrong with the source leaves the running config in place (see
    /// `sidecar::source`). Abort the task to stop following.
    ///
    /// [`apply`]: Self::apply
    pub fn follow(&self, source: ConfigSource) -> JoinHandle<()> {
        tokio::spawn(follow(self.shared.clone(), source))
    }

    /// Counts a config that failed before it could be applied (unreadable or unparsable file).
    pub fn record_rejected(&self, err: &dyn std::error::Error) {
        self.shared.metrics.reloads_failure.inc();
        tracing::error!(error = %err, "config rejected; the running config stays in place");
    }

    /// Stops accepting, lets in-flight requests finish (up to `drain`), then stops.
    pub async fn shutdown(self, drain: Duration) {
        self.shared.drain(drain).await;
        self.admin_stop.notify_one();
        let _ = self.admin_task.await;
    }
}

// === following a source ===

/// Applies what `source` reports to the sidecar until the source ends or the task is aborted.
async fn follow(shared: Arc<Shared>, source: ConfigSource) {
    shared
        .source
        .lock()
        .set_source(source.kind(), source.describe());
    let (tx, mut rx) = mpsc::channel(8);
    let task = tokio::spawn(source.run(tx));
    let _stop = AbortOnDrop(task);
    // A document refused only because its listener's port is still taken (an old process
    // draining) is tried again.
    let mut retry: Option<String> = None;
    let mut last_applied: Option<String> = None;
    loop {
        let update = tokio::select! {
            u = rx.recv() => match u {
                Some(u) => u,
                None => return,
            },
            _ = tokio::time::sleep(Duration::from_secs(1)), if retry.is_some() => {
                Update::Document(retry.take().expect("checked"))
            }
        };
        match update {
            Update::Document(text) => {
                retry = None;
                if last_applied.as_deref() == Some(text.as_str()) {
                    // The same document again (a ConfigMap restored after a deletion): nothing
                    // to apply, but the source is fine again.
                    resolve(&shared);
                    continue;
                }
                match Config::from_str_validated(&text) {
                    Err(e) => {
                        shared.metrics.reloads_failure.inc();
                        refuse(&shared, &e, "holds an invalid config");
                    }
                    Ok(cfg) => match shared.apply_counted(cfg).await {
                        Ok(()) => {
                            last_applied = Some(text);
                            resolve(&shared);
                        }
                        Err(e @ Error::Bind { .. }) => {
                            refuse(&shared, &e, "cannot be applied yet");
                            retry = Some(text);
                        }
                        Err(e) => refuse(&shared, &e, "holds an invalid config"),
                    },
                }
            }
            Update::Unusable(why) => {
                retry = None;
                shared.metrics.reloads_failure.inc();
                problem(&shared, why);
            }
            Update::Missing(why) => {
                retry = None;
                if !shared.ready.load(std::sync::atomic::Ordering::Relaxed) {
                    // No config for this namespace at all (no policy yet, or none left): serve
                    // nothing rather than keep the pod from starting (the startupProbe waits
                    // on /ready).
                    let _ = shared.apply_counted(Config::empty()).await;
                }
                problem(&shared, why);
            }
            Update::Disconnected(error) => {
                let hash = shared.view.load().hash.clone();
                shared.source.lock().disconnected(&error, &hash);
            }
            Update::Connected => shared.source.lock().reconnected(),
        }
    }
}

fn refuse(shared: &Shared, err: &dyn std::error::Error, what: &str) {
    let hash = shared.view.load().hash.clone();
    shared.source.lock().refused(err, what, &hash);
}

fn problem(shared: &Shared, why: String) {
    let hash = shared.view.load().hash.clone();
    shared.source.lock().problem(why, &hash);
}

fn resolve(shared: &Shared) {
    shared.source.lock().resolved();
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
