//! `detour operator`: reconciles UpstreamPolicy resources into one `detour-config` ConfigMap per
//! namespace (the sidecar config document) and reports each policy's status.
//!
//! Layout: [`render`] is the pure desired state, [`reconcile`] the client side (apply, status,
//! finalizer, events), this file the wiring (watches, leader election, admin server).

mod admin;
mod metrics;
pub mod reconcile;
pub mod render;

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use futures::{future, FutureExt, StreamExt};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    core::DeserializeGuard,
    runtime::{
        controller::{self, Controller},
        reflector::{self, ObjectRef, Store},
        watcher, PredicateConfig, WatchStreamExt,
    },
    Api, Client, Resource, ResourceExt,
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::api::UpstreamPolicy;

pub use self::admin::Health;
pub use self::metrics::Metrics;
use self::reconcile::{Context, Shared, MANAGED_BY};
use self::render::SERVICE_NAME_LABEL;

type Policy = DeserializeGuard<UpstreamPolicy>;

/// Flags of `detour operator`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Namespaces to watch, comma separated; empty watches all.
    #[arg(long, env = "DETOUR_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Admin server address (/metrics, /live, /ready).
    #[arg(long, env = "DETOUR_ADMIN_ADDR", default_value = "0.0.0.0:9902")]
    pub admin: SocketAddr,
    /// Hold a coordination.k8s.io Lease so only one replica writes.
    #[arg(long, env = "DETOUR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Namespace of the Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "detour-system")]
    pub lease_namespace: String,
    /// Name of the Lease.
    #[arg(long, env = "DETOUR_LEASE_NAME", default_value = "detour-operator")]
    pub lease_name: String,
    /// Identity of this replica in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Changes arriving within this window are reconciled once (the last state wins).
    #[arg(long, env = "DETOUR_DEBOUNCE", default_value = "100ms")]
    pub debounce: crate::config::Duration,
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to the Kubernetes API: {0}")]
    Client(#[source] kube::Error),
    #[error("binding the admin server on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("leader election on Lease {lease}: {source}")]
    Lease {
        lease: String,
        #[source]
        source: kube_lease_manager::LeaseManagerError,
    },
    #[error("installing the signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("the operator task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// Leader election settings.
#[derive(Clone, Debug)]
pub struct LeaseOptions {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// Seconds a lease stays valid without renewal.
    pub duration: u64,
    /// Seconds before expiry the holder renews.
    pub grace: u64,
}

/// How to run (the library form of [`Args`]).
#[derive(Clone, Debug)]
pub struct Options {
    /// Empty: all namespaces.
    pub namespaces: Vec<String>,
    pub admin: SocketAddr,
    /// `None` runs without a Lease (single replica, tests).
    pub leader_election: Option<LeaseOptions>,
    pub debounce: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            namespaces: Vec::new(),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            leader_election: None,
            debounce: Duration::from_millis(100),
        }
    }
}

impl From<Args> for Options {
    fn from(a: Args) -> Self {
        let identity = a.identity.unwrap_or_else(|| {
            use rand::{rngs::StdRng, RngCore, SeedableRng};
            format!("detour-operator-{:016x}", StdRng::from_os_rng().next_u64())
        });
        Options {
            namespaces: a.namespaces.into_iter().filter(|n| !n.is_empty()).collect(),
            admin: a.admin,
            leader_election: a.leader_election.then_some(LeaseOptions {
                namespace: a.lease_namespace,
                name: a.lease_name,
                identity,
                duration: 15,
                grace: 5,
            }),
            debounce: a.debounce.get(),
        }
    }
}

pub async fn run(args: Args) -> Result<(), Error> {
    let client = Client::try_default().await.map_err(Error::Client)?;
    let op = Operator::start(client, args.into()).await?;
    info!(admin = %op.admin_addr(), "operator started");
    op.run_until_signal().await
}

/// A running operator.
pub struct Operator {
    admin_addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), Error>>,
    admin_task: JoinHandle<()>,
}

// === impl Operator ===

impl Operator {
    pub async fn start(client: Client, opts: Options) -> Result<Self, Error> {
        let listener = admin::bind(opts.admin)
            .await
            .map_err(|source| Error::Admin {
                addr: opts.admin,
                source,
            })?;
        let admin_addr = listener.local_addr().map_err(|source| Error::Admin {
            addr: opts.admin,
            source,
        })?;
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        let admin_task = tokio::spawn(admin::serve(listener, metrics.clone(), health.clone()));
        let instance = opts.leader_election.as_ref().map(|l| l.identity.clone());
        let shared = Arc::new(Shared::new(client.clone(), metrics.clone(), instance));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(lead(client, opts, shared, health.clone(), stopped));
        Ok(Operator {
            admin_addr,
            metrics,
            health,
            stop,
            task,
            admin_task,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn metrics_text(&self) -> String {
        self.metrics.text()
    }

    /// Leading (or no lease needed) and every cache synced.
    pub fn is_ready(&self) -> bool {
        self.health.ready()
    }

    /// Stops the controllers and releases the Lease.
    pub async fn shutdown(self) -> Result<(), Error> {
        let _ = self.stop.send(true);
        let res = self.task.await.map_err(Error::Task)?;
        self.admin_task.abort();
        res
    }

    async fn run_until_signal(mut self) -> Result<(), Error> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(Error::Signal)?;
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping"),
            res = &mut self.task => {
                self.admin_task.abort();
                return res.map_err(Error::Task)?;
            }
        }
        self.shutdown().await
    }
}

/// Runs the controllers while this replica leads.
async fn lead(
    client: Client,
    opts: Options,
    shared: Arc<Shared>,
    health: Arc<Health>,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), Error> {
    let Some(lease) = opts.leader_election.clone() else {
        health.leader.store(true, Ordering::Release);
        shared.metrics.set_leader(true);
        tokio::select! {
            _ = run_scopes(&client, &opts, &shared, &health) => {}
            _ = stopped.wait_for(|s| *s) => {}
        }
        return Ok(());
    };
    let lease_err = |source| Error::Lease {
        lease: format!("{}/{}", lease.namespace, lease.name),
        source,
    };
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_duration(lease.duration)
        .with_grace(lease.grace)
        .with_field_manager(reconcile::MANAGER)
        .build()
        .await
        .map_err(lease_err)?;
    let (mut leading, task) = manager.watch().await;
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            r = leading.wait_for(|l| *l) => if r.is_err() { break },
        }
        info!(identity = %lease.identity, "leading: starting controllers");
        health.leader.store(true, Ordering::Release);
        shared.metrics.set_leader(true);
        let stop = tokio::select! {
            _ = run_scopes(&client, &opts, &shared, &health) => false,
            _ = leading.wait_for(|l| !*l) => {
                warn!("lost the lease: stopping controllers");
                false
            }
            _ = stopped.wait_for(|s| *s) => true,
        };
        health.leader.store(false, Ordering::Release);
        health.synced.store(false, Ordering::Release);
        shared.metrics.set_leader(false);
        if stop {
            break;
        }
    }
    drop(leading);
    match task.await {
        Ok(Ok(manager)) => {
            if let Err(e) = manager.release().await {
                warn!(error = %e, "releasing the lease failed; it expires on its own");
            }
            Ok(())
        }
        Ok(Err(e)) => Err(lease_err(e)),
        Err(e) => Err(Error::Task(e)),
    }
}

/// One controller per watch scope: all namespaces, or each listed one (a reflector store holds
/// one list, so scopes do not share stores).
async fn run_scopes(client: &Client, opts: &Options, shared: &Arc<Shared>, health: &Arc<Health>) {
    let scopes: Vec<Option<String>> = if opts.namespaces.is_empty() {
        vec![None]
    } else {
        opts.namespaces.iter().cloned().map(Some).collect()
    };
    let mut runs = Vec::new();
    let mut syncs = Vec::new();
    for ns in scopes {
        let (run, synced) = scope(client.clone(), ns, shared.clone(), opts.debounce);
        runs.push(run);
        syncs.push(synced);
    }
    let health = health.clone();
    let synced = async move {
        future::join_all(syncs).await;
        health.synced.store(true, Ordering::Release);
        info!("caches synced");
        future::pending::<()>().await;
    };
    tokio::select! {
        _ = future::join_all(runs) => {}
        _ = synced => {}
    }
}

fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The controller of one scope, and a future that completes when its caches are synced.
fn scope(
    client: Client,
    ns: Option<String>,
    shared: Arc<Shared>,
    debounce: Duration,
) -> (
    future::BoxFuture<'static, ()>,
    future::BoxFuture<'static, ()>,
) {
    let wc = watcher::Config::default();
    // Our own status writes and finalizer patches come back as watch events; only spec,
    // deletion and re-creation need a reconcile.
    let (policies, w) = reflector::store::<Policy>();
    let policy_stream = watcher(api::<Policy>(&client, &ns), wc.clone())
        .default_backoff()
        .reflect(w)
        .applied_objects()
        .predicate_filter(worth_reconciling, PredicateConfig::default());
    let controller = Controller::for_stream(policy_stream, policies.clone())
        .with_config(controller::Config::default().debounce(debounce));

    let (services, w) = reflector::store::<Service>();
    let svc_stream = watcher(api::<Service>(&client, &ns), wc.clone())
        .default_backoff()
        .modify(|o| o.managed_fields_mut().clear())
        .reflect(w)
        .touched_objects();
    let (slices, w) = reflector::store::<EndpointSlice>();
    let slice_stream = watcher(
        api::<EndpointSlice>(&client, &ns),
        wc.clone().labels(SERVICE_NAME_LABEL),
    )
    .default_backoff()
    .modify(|o| o.managed_fields_mut().clear())
    .reflect(w)
    .touched_objects();
    let (config_maps, w) = reflector::store::<ConfigMap>();
    let cm_stream = watcher(
        api::<ConfigMap>(&client, &ns),
        wc.labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1)),
    )
    .default_backoff()
    .modify(|o| o.managed_fields_mut().clear())
    .reflect(w)
    .touched_objects();

    let (synced_tx, synced) = watch::channel(false);
    let sync = {
        let stores = (
            policies.clone(),
            services.clone(),
            slices.clone(),
            config_maps.clone(),
        );
        async move {
            // One waiter per store: `wait_until_ready` wakes only the last of several waiters.
            let _ = stores.0.wait_until_ready().await;
            let _ = stores.1.wait_until_ready().await;
            let _ = stores.2.wait_until_ready().await;
            let _ = stores.3.wait_until_ready().await;
            // Waiters see `true` even after the sender is gone.
            let _ = synced_tx.send(true);
        }
    };
    let own = shared.clone();
    let cms = config_maps.clone();
    let ctx = Arc::new(Context {
        client,
        policies: policies.clone(),
        services,
        slices,
        config_maps,
        synced,
        shared,
    });
    let (p1, p2, p3) = (policies.clone(), policies.clone(), policies);
    let run = controller
        .watches_stream(svc_stream, move |svc: Service| {
            using_service(&p1, svc.namespace(), &svc.name_any())
        })
        .watches_stream(slice_stream, move |s: EndpointSlice| {
            match s.labels().get(SERVICE_NAME_LABEL) {
                Some(svc) => using_service(&p2, s.namespace(), svc),
                None => Vec::new(),
            }
        })
        // Someone edited or deleted the rendered ConfigMap: render the namespace again.
        .watches_stream(cm_stream, move |cm: ConfigMap| {
            let ns = cm.namespace();
            // Our own write coming back: nothing to repair. A deleted one is gone from the
            // store by the time the mapper sees it.
            let still_there = cms.get(&ObjectRef::from_obj(&cm)).is_some();
            if !still_there {
                own.forget_config(ns.as_deref().unwrap_or_default());
            }
            let hash = cm.annotations().get(reconcile::HASH_ANNOTATION);
            if still_there
                && hash.is_some_and(|h| own.is_own_config(ns.as_deref().unwrap_or_default(), h))
            {
                return Vec::new();
            }
            p3.state()
                .iter()
                .filter(|p| p.namespace() == ns)
                .take(1)
                .map(|p| ObjectRef::from_obj(&**p))
                .collect::<Vec<_>>()
        })
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|res| {
            if let Err(e) = res {
                debug!(error = %e, "controller");
            }
            future::ready(())
        })
        .boxed();
    (run, sync.boxed())
}

/// Changes that need a reconcile: spec (generation), deletion, re-creation (uid).
fn worth_reconciling(p: &Policy) -> Option<u64> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let m = p.meta();
    let mut h = DefaultHasher::new();
    (m.generation, m.deletion_timestamp.is_some(), &m.uid).hash(&mut h);
    Some(h.finish())
}

/// A policy of `ns` whose upstream is Service `name`.
fn using_service(
    policies: &Store<Policy>,
    ns: Option<String>,
    name: &str,
) -> Vec<ObjectRef<Policy>> {
    policies
        .state()
        .iter()
        .filter(|p| p.namespace() == ns)
        .filter(|p| matches!(&p.0, Ok(p) if p.spec.upstream.service == name))
        // A reconcile renders the whole namespace, so one trigger is enough.
        .take(1)
        .map(|p| ObjectRef::from_obj(&**p))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn flags_become_options() {
        let cli = Cli::parse_from([
            "detour",
            "--namespaces",
            "shop,pay",
            "--leader-election=false",
            "--debounce",
            "250ms",
            "--admin",
            "127.0.0.1:0",
        ]);
        let o = Options::from(cli.args);
        assert_eq!(o.namespaces, vec!["shop", "pay"]);
        assert!(o.leader_election.is_none());
        assert_eq!(o.debounce, Duration::from_millis(250));

        let o = Options::from(Cli::parse_from(["detour", "--identity", "pod-1"]).args);
        assert!(o.namespaces.is_empty(), "all namespaces by default");
        let lease = o.leader_election.expect("leader election by default");
        assert_eq!(
            (
                lease.namespace.as_str(),
                lease.name.as_str(),
                lease.identity.as_str()
            ),
            ("detour-system", "detour-operator", "pod-1")
        );
        assert!(Cli::try_parse_from(["detour", "--debounce", "soon"]).is_err());
    }
}
