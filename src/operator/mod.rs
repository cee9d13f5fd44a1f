//! `detour operator`: reconciles UpstreamPolicy resources into one `detour-config` ConfigMap per
//! namespace (the sidecar config document) and reports each policy's status.
//!
//! Layout: [`render`] is the pure desired state, [`reconcile`] the client side (apply, status,
//! finalizer, events), this file the wiring (watches, leader election, admin server).

pub mod access;
mod admin;
pub mod certs;
pub mod inject;
mod metrics;
pub mod reconcile;
pub mod render;
pub mod sidecar_reports;
pub mod webhook;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use futures::{
    future::{self, BoxFuture},
    FutureExt, Stream, StreamExt,
};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{
        controller::{self, Controller},
        predicates,
        reflector::{self, ObjectRef, Store},
        watcher, Predicate, PredicateConfig, WatchStreamExt,
    },
    Api, Client, Resource, ResourceExt,
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::api::SIDECAR_LABEL;

use self::admin::Readiness;
pub use self::metrics::Metrics;
use self::reconcile::{Context, PolicyObject, Shared, MANAGED_BY};
use self::render::SERVICE_NAME_LABEL;

/// Lower bound of `--report-interval`.
const MIN_REPORT_INTERVAL: Duration = Duration::from_millis(50);

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
    /// How often every sidecar pod (label detour.dev/sidecar, port detour-admin) is asked for
    /// its endpoints' live state, reported as status.endpoints.ejected and status.sidecars.
    #[arg(
        long,
        env = "DETOUR_REPORT_INTERVAL",
        default_value = "10s",
        alias = "health-interval"
    )]
    pub report_interval: crate::config::Duration,
    /// Serve the sidecar-injection admission webhook (HTTPS, POST /inject). Every replica serves
    /// it; a replica is Ready once it serves a valid certificate.
    #[arg(long, env = "DETOUR_WEBHOOK", default_value_t = true, action = clap::ArgAction::Set)]
    pub webhook: bool,
    /// Address of the webhook server.
    #[arg(long, env = "DETOUR_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_addr: SocketAddr,
    /// The webhook's Service (in the operator's namespace): its certificate is for
    /// <service>.<namespace>.svc.
    #[arg(long, env = "DETOUR_WEBHOOK_SERVICE", default_value = "detour-webhook")]
    pub webhook_service: String,
    /// The Secret holding the webhook's certificate (kubernetes.io/tls).
    #[arg(
        long,
        env = "DETOUR_WEBHOOK_SECRET",
        default_value = "detour-webhook-tls"
    )]
    pub webhook_secret: String,
    /// The MutatingWebhookConfiguration whose caBundle the leader keeps current.
    #[arg(long, env = "DETOUR_WEBHOOK_CONFIG", default_value = "detour-injector")]
    pub webhook_config: String,
    /// Who issues the webhook's certificate: the operator, or cert-manager (then the operator
    /// only reads the Secret and leaves the caBundle to cert-manager's CA injector).
    #[arg(long, env = "DETOUR_WEBHOOK_CERT_SOURCE", value_enum, default_value_t = certs::CertSource::Operator)]
    pub webhook_cert_source: certs::CertSource,
    /// Lifetime of a serving certificate the operator issues (the CA lives ten times as long).
    #[arg(long, env = "DETOUR_WEBHOOK_CERT_LIFETIME", default_value = "720h")]
    pub webhook_cert_lifetime: crate::config::Duration,
    /// Renew the serving certificate this long before it expires.
    #[arg(long, env = "DETOUR_WEBHOOK_CERT_RENEW_BEFORE", default_value = "168h")]
    pub webhook_cert_renew_before: crate::config::Duration,
    /// What the webhook (and `detour inject`) adds to pods.
    #[command(flatten)]
    pub sidecar: inject::Settings,
}

/// The admission webhook's settings.
#[derive(Clone, Debug)]
pub struct WebhookOptions {
    pub addr: SocketAddr,
    pub tls: certs::TlsOptions,
    pub sidecar: inject::Settings,
    /// Never injected, whatever the selectors let through: the operator's own namespace and
    /// `kube-system`.
    pub excluded_namespaces: Vec<String>,
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
    #[error("binding the webhook server on {addr}: {source}")]
    Webhook {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("sidecar settings: {0}")]
    Sidecar(#[source] inject::Error),
    #[error("{0}")]
    Usage(String),
    #[error("installing the signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("the operator task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// A call to the API server that failed: what was done, to which object.
#[derive(Debug, thiserror::Error)]
#[error("{action} {target}: {source}")]
pub struct ApiError {
    /// The verb, also the `result` label of a failed reconcile (`apply`, `delete`, ...).
    pub action: &'static str,
    /// `configmap shop/detour-config`
    pub target: String,
    #[source]
    pub source: kube::Error,
}

impl ApiError {
    /// For `map_err`: the failed `action` on `target`.
    pub fn of(action: &'static str, target: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let target = target.into();
        move |source| ApiError {
            action,
            target,
            source,
        }
    }
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
    /// Time between two scrapes of the sidecars.
    pub report_interval: Duration,
    /// The sidecar-injection webhook; `None` serves none.
    pub webhook: Option<WebhookOptions>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            namespaces: Vec::new(),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            leader_election: None,
            debounce: Duration::from_millis(100),
            report_interval: Duration::from_secs(10),
            webhook: None,
        }
    }
}

impl From<Args> for Options {
    fn from(args: Args) -> Self {
        let identity = args.identity.unwrap_or_else(|| {
            use rand::{rngs::StdRng, RngCore, SeedableRng};
            format!("detour-operator-{:016x}", StdRng::from_os_rng().next_u64())
        });
        let webhook = args.webhook.then(|| WebhookOptions {
            addr: args.webhook_addr,
            tls: certs::TlsOptions {
                namespace: args.lease_namespace.clone(),
                service: args.webhook_service,
                secret: args.webhook_secret,
                webhook_config: args.webhook_config,
                source: args.webhook_cert_source,
                lifetime: args.webhook_cert_lifetime.get(),
                renew_before: args.webhook_cert_renew_before.get(),
            },
            sidecar: args.sidecar,
            excluded_namespaces: vec![args.lease_namespace.clone(), "kube-system".into()],
        });
        Options {
            webhook,
            namespaces: args
                .namespaces
                .into_iter()
                .filter(|n| !n.is_empty())
                .collect(),
            admin: args.admin,
            leader_election: args.leader_election.then_some(LeaseOptions {
                namespace: args.lease_namespace,
                name: args.lease_name,
                identity,
                duration: 15,
                grace: 5,
            }),
            debounce: args.debounce.get(),
            // A zero interval would scrape in a busy loop.
            report_interval: args.report_interval.get().max(MIN_REPORT_INTERVAL),
        }
    }
}

pub async fn run(args: Args) -> Result<(), Error> {
    let opts: Options = args.into();
    if let Some(webhook) = &opts.webhook {
        // A bad sidecar setting stops the operator here rather than failing every pod.
        webhook.sidecar.validate().map_err(Error::Sidecar)?;
        if webhook.tls.renew_before >= webhook.tls.lifetime {
            return Err(Error::Usage(format!(
                "--webhook-cert-renew-before ({:?}) must be shorter than --webhook-cert-lifetime ({:?})",
                webhook.tls.renew_before, webhook.tls.lifetime
            )));
        }
    }
    let client = Client::try_default().await.map_err(Error::Client)?;
    let op = Operator::start(client, opts).await?;
    info!(admin = %op.admin_addr(), "operator started");
    op.run_until_signal().await
}

/// A running operator.
pub struct Operator {
    admin_addr: SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), Error>>,
    admin_task: JoinHandle<()>,
    /// The webhook server and its Secret follower, when serving the webhook.
    webhook: Option<(SocketAddr, Arc<certs::CertStore>, Vec<JoinHandle<()>>)>,
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
        let readiness = Arc::new(Readiness::default());
        let admin_task = tokio::spawn(admin::serve(listener, metrics.clone(), readiness.clone()));
        let instance = opts.leader_election.as_ref().map(|l| l.identity.clone());
        let webhook = match &opts.webhook {
            Some(w) => {
                Some(start_webhook(&client, w, &metrics, &readiness, instance.clone()).await?)
            }
            None => None,
        };
        let shared = Arc::new(Shared::new(client.clone(), metrics.clone(), instance));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(lead(client, opts, shared, readiness.clone(), stopped));
        Ok(Operator {
            admin_addr,
            metrics,
            readiness,
            stop,
            task,
            admin_task,
            webhook,
        })
    }

    /// The webhook server's bound address, when it serves one.
    pub fn webhook_addr(&self) -> Option<SocketAddr> {
        self.webhook.as_ref().map(|(a, _, _)| *a)
    }

    /// The certificate this replica serves on the webhook (PEM), once it has one.
    pub fn webhook_certificate(&self) -> Option<String> {
        self.webhook.as_ref().and_then(|(_, c, _)| c.serving_pem())
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn metrics_text(&self) -> String {
        self.metrics.text()
    }

    /// Leading (or no lease needed) and every cache synced.
    pub fn is_ready(&self) -> bool {
        self.readiness.ready()
    }

    /// Stops the controllers and releases the Lease.
    pub async fn shutdown(self) -> Result<(), Error> {
        let _ = self.stop.send(true);
        let res = self.task.await.map_err(Error::Task)?;
        self.admin_task.abort();
        for t in self.webhook.iter().flat_map(|(_, _, t)| t) {
            t.abort();
        }
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

/// Every replica: the webhook server and the Secret follower that feeds it certificates.
async fn start_webhook(
    client: &Client,
    options: &WebhookOptions,
    metrics: &Arc<Metrics>,
    readiness: &Arc<Readiness>,
    instance: Option<String>,
) -> Result<(SocketAddr, Arc<certs::CertStore>, Vec<JoinHandle<()>>), Error> {
    let bind_err = |source| Error::Webhook {
        addr: options.addr,
        source,
    };
    let listener = tokio::net::TcpListener::bind(options.addr)
        .await
        .map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    let store = Arc::new(certs::CertStore::default());
    let _ = readiness.webhook.set(store.clone());
    let sidecar = options.sidecar.clone();
    let ctx = Arc::new(webhook::WebhookContext {
        inject: Arc::new(move |pod| {
            inject::pod_patch(pod, &sidecar)
                .map(|(patch, skip)| (patch, skip.map(|s| s.to_string())))
                .map_err(|e| e.to_string())
        }),
        excluded_namespaces: options.excluded_namespaces.clone(),
        metrics: metrics.clone(),
        recorder: Some(kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: format!("{}-webhook", reconcile::MANAGER),
                instance,
            },
        )),
    });
    let tasks = vec![
        tokio::spawn(certs::follow_secret(
            client.clone(),
            options.tls.clone(),
            store.clone(),
        )),
        tokio::spawn(webhook::serve(listener, store.clone(), ctx)),
    ];
    info!(%addr, "serving the injection webhook");
    Ok((addr, store, tasks))
}

/// What only the leader runs: the controllers, and the webhook certificate's upkeep.
async fn leader_work(
    client: &Client,
    opts: &Options,
    shared: &Arc<Shared>,
    readiness: &Arc<Readiness>,
) {
    let certs = async {
        match &opts.webhook {
            Some(webhook) => certs::maintain(client.clone(), webhook.tls.clone()).await,
            None => std::future::pending().await,
        }
    };
    // Either ending ends the term's work (the lead loop starts it again).
    tokio::select! {
        _ = run_scopes(client, opts, shared, readiness) => {}
        _ = certs => {}
    }
}

/// Runs the controllers while this replica leads.
async fn lead(
    client: Client,
    opts: Options,
    shared: Arc<Shared>,
    readiness: Arc<Readiness>,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), Error> {
    let Some(lease) = opts.leader_election.clone() else {
        readiness.leader.store(true, Ordering::Release);
        shared.metrics.set_leader(true);
        tokio::select! {
            _ = leader_work(&client, &opts, &shared, &readiness) => {}
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
        shared.forget_writes();
        readiness.leader.store(true, Ordering::Release);
        shared.metrics.set_leader(true);
        let stop = tokio::select! {
            _ = leader_work(&client, &opts, &shared, &readiness) => false,
            _ = leading.wait_for(|l| !*l) => {
                warn!("lost the lease: stopping controllers");
                false
            }
            _ = stopped.wait_for(|s| *s) => true,
        };
        readiness.leader.store(false, Ordering::Release);
        readiness.synced.store(false, Ordering::Release);
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
async fn run_scopes(
    client: &Client,
    opts: &Options,
    shared: &Arc<Shared>,
    readiness: &Arc<Readiness>,
) {
    let scopes: Vec<Option<String>> = if opts.namespaces.is_empty() {
        vec![None]
    } else {
        opts.namespaces.iter().cloned().map(Some).collect()
    };
    let mut runs = Vec::new();
    let mut syncs = Vec::new();
    for ns in scopes {
        let (run, synced) = scope(client.clone(), ns, shared.clone(), opts);
        runs.push(run);
        syncs.push(synced);
    }
    let readiness = readiness.clone();
    let synced = async move {
        future::join_all(syncs).await;
        readiness.synced.store(true, Ordering::Release);
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
    opts: &Options,
) -> (BoxFuture<'static, ()>, BoxFuture<'static, ()>) {
    let watch_config = watcher::Config::default();
    let (policies, policy_writer) = reflector::store::<PolicyObject>();
    let (services, svc_writer) = reflector::store::<Service>();
    let (slices, slice_writer) = reflector::store::<EndpointSlice>();
    let (config_maps, cm_writer) = reflector::store::<ConfigMap>();
    let (synced_tx, synced) = watch::channel(false);
    // Namespaces to render without a policy to start from (see `reconcile_namespace`).
    let (janitor_tx, janitor_rx) = mpsc::unbounded_channel::<String>();
    let ctx = Arc::new(Context {
        client: client.clone(),
        policies: policies.clone(),
        services: services.clone(),
        slices: slices.clone(),
        config_maps: config_maps.clone(),
        synced,
        shared: shared.clone(),
        reports: Arc::new(sidecar_reports::SidecarReports::default()),
    });

    let policy_events = watcher(api::<PolicyObject>(&client, &ns), watch_config.clone())
        .default_backoff()
        .reflect(policy_writer);
    let policy_changes = policy_changes(policy_events, janitor_tx.clone(), ctx.clone());
    // The sidecars' reports change a policy's status without any object changing.
    let (report_trigger, report_triggered) = futures::channel::mpsc::unbounded();
    let poller = sidecar_poller(&client, &ns, &ctx, report_trigger, opts.report_interval);
    let controller = Controller::for_stream(policy_changes, policies.clone())
        .with_config(controller::Config::default().debounce(opts.debounce))
        .reconcile_on(report_triggered);

    let service_owners = policies.clone();
    let slice_owners = policies.clone();
    let rendered = (config_maps.clone(), shared, janitor_tx.clone());
    let managed = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    let run = controller
        .watches_stream(
            slimmed(&client, &ns, watch_config.clone(), svc_writer),
            move |svc: Service| using_service(&service_owners, svc.namespace(), &svc.name_any()),
        )
        .watches_stream(
            slimmed(
                &client,
                &ns,
                watch_config.clone().labels(SERVICE_NAME_LABEL),
                slice_writer,
            ),
            move |slice: EndpointSlice| match slice.labels().get(SERVICE_NAME_LABEL) {
                Some(svc) => using_service(&slice_owners, slice.namespace(), svc),
                None => Vec::new(),
            },
        )
        .watches_stream(
            slimmed(&client, &ns, watch_config.labels(&managed), cm_writer),
            move |cm: ConfigMap| config_map_changed(&cm, &rendered.0, &rendered.1, &rendered.2),
        )
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|res| {
            if let Err(e) = res {
                debug!(error = %e, "controller");
            }
            future::ready(())
        });
    let sync = caches_synced(ctx.clone(), synced_tx, janitor_tx.clone());
    let janitor = janitor(janitor_rx, janitor_tx, ctx);
    let run = async move {
        futures::pin_mut!(run, janitor, poller);
        future::select(future::select(run, janitor), poller).await;
    };
    (run.boxed(), sync.boxed())
}

/// Policy changes worth a reconcile. A deleted policy is no longer in the cache, so the
/// Controller would drop it: its namespace goes to the janitor instead, as do namespaces a
/// re-list finds orphaned (a re-list reports no Delete for what went meanwhile).
fn policy_changes(
    events: impl Stream<Item = Result<watcher::Event<PolicyObject>, watcher::Error>> + Send,
    janitor: mpsc::UnboundedSender<String>,
    ctx: Arc<Context>,
) -> impl Stream<Item = Result<PolicyObject, watcher::Error>> + Send {
    let policies = events.filter_map(move |ev| {
        let out = match ev {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => Some(Ok(p)),
            Ok(watcher::Event::Delete(p)) => {
                let ns = p.namespace().unwrap_or_default();
                ctx.shared.forget_policy(&ns, &p.name_any());
                let _ = janitor.send(ns);
                None
            }
            Ok(watcher::Event::InitDone) => {
                for ns in orphaned(&ctx.policies, &ctx.config_maps) {
                    let _ = janitor.send(ns);
                }
                None
            }
            Ok(watcher::Event::Init) => None,
            Err(e) => Some(Err(e)),
        };
        future::ready(out)
    });
    policies.predicate_filter(worth_reconciling(), PredicateConfig::default())
}

/// What needs a reconcile: a new spec (generation) or the deletion mark. The filter keys
/// objects by uid too, so a re-created policy always passes. Our own status writes and
/// finalizer patches come back as watch events and change neither.
fn worth_reconciling() -> impl Predicate<PolicyObject> {
    let deletion_marked = |p: &PolicyObject| Some(u64::from(p.meta().deletion_timestamp.is_some()));
    predicates::generation.combine(deletion_marked)
}

/// A watch feeding `writer`, its objects without managed fields (memory stays small in big
/// clusters), every change passed on.
fn slimmed<K>(
    client: &Client,
    ns: &Option<String>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    watcher(api::<K>(client, ns), config)
        .default_backoff()
        .modify(|o| o.managed_fields_mut().clear())
        .reflect(writer)
        .touched_objects()
}

/// The loop that scrapes the scope's sidecar pods and triggers reconciles where their reports
/// change a status.
fn sidecar_poller(
    client: &Client,
    ns: &Option<String>,
    ctx: &Arc<Context>,
    trigger: futures::channel::mpsc::UnboundedSender<ObjectRef<PolicyObject>>,
    interval: Duration,
) -> impl std::future::Future<Output = ()> + Send {
    let (pods, pod_writer) = reflector::store::<Pod>();
    // Only sidecar pods, slimmed to what eligibility reads: memory stays small in big clusters.
    let pod_events = watcher(
        api::<Pod>(client, ns),
        watcher::Config::default().labels(SIDECAR_LABEL),
    )
    .default_backoff()
    .modify(sidecar_reports::slim)
    .reflect(pod_writer);
    sidecar_reports::poll(
        pod_events,
        sidecar_reports::Poller {
            pods,
            policies: ctx.policies.clone(),
            reports: ctx.reports.clone(),
            trigger,
            interval,
            metrics: ctx.shared.metrics.clone(),
            synced: ctx.synced.clone(),
        },
    )
}

/// Someone edited or deleted a rendered ConfigMap: its namespace is rendered again, with or
/// without policies left in it. Maps to no policy (the janitor renders the namespace).
fn config_map_changed(
    cm: &ConfigMap,
    config_maps: &Store<ConfigMap>,
    shared: &Shared,
    janitor: &mpsc::UnboundedSender<String>,
) -> Vec<ObjectRef<PolicyObject>> {
    let ns = cm.namespace().unwrap_or_default();
    // A deleted one is gone from the store by the time the mapper sees it.
    let still_there = config_maps.get(&ObjectRef::from_obj(cm)).is_some();
    if !still_there {
        shared.forget_config(&ns);
    }
    // Our own write coming back: nothing to repair.
    let hash = cm.annotations().get(reconcile::HASH_ANNOTATION);
    if !(still_there && hash.is_some_and(|h| shared.is_own_config(&ns, h))) {
        let _ = janitor.send(ns);
    }
    Vec::new()
}

/// Completes once the scope's four caches hold a full list, then sends the namespaces whose
/// ConfigMaps were left by policies deleted while no operator ran to the janitor.
async fn caches_synced(
    ctx: Arc<Context>,
    synced: watch::Sender<bool>,
    janitor: mpsc::UnboundedSender<String>,
) {
    // One waiter per store: `wait_until_ready` wakes only the last of several waiters.
    let _ = ctx.policies.wait_until_ready().await;
    let _ = ctx.services.wait_until_ready().await;
    let _ = ctx.slices.wait_until_ready().await;
    let _ = ctx.config_maps.wait_until_ready().await;
    // Waiters see `true` even after the sender is gone.
    let _ = synced.send(true);
    for ns in orphaned(&ctx.policies, &ctx.config_maps) {
        let _ = janitor.send(ns);
    }
}

/// Renders the namespaces it is sent, one at a time, coalescing repeats; failures retry with
/// the per-object backoff.
async fn janitor(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    tx: tokio::sync::mpsc::UnboundedSender<String>,
    ctx: Arc<Context>,
) {
    let mut failures: HashMap<String, u32> = HashMap::new();
    while let Some(first) = rx.recv().await {
        let mut batch = std::collections::BTreeSet::from([first]);
        while let Ok(ns) = rx.try_recv() {
            batch.insert(ns);
        }
        for ns in batch {
            match reconcile::reconcile_namespace(&ns, &ctx).await {
                Ok(()) => {
                    failures.remove(&ns);
                }
                Err(e) => {
                    let n = failures.entry(ns.clone()).or_insert(0);
                    let delay = reconcile::backoff(*n);
                    *n += 1;
                    warn!(namespace = %ns, error = %e, retry_in = ?delay, "rendering the namespace failed");
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = tx.send(ns);
                    });
                }
            }
        }
    }
}

/// Namespaces holding a rendered ConfigMap but no live policy.
fn orphaned(policies: &Store<PolicyObject>, config_maps: &Store<ConfigMap>) -> Vec<String> {
    let live: std::collections::BTreeSet<String> = policies
        .state()
        .iter()
        .filter(|p| p.meta().deletion_timestamp.is_none())
        .filter_map(|p| p.namespace())
        .collect();
    config_maps
        .state()
        .iter()
        .filter_map(|c| c.namespace())
        .filter(|ns| !live.contains(ns))
        .collect()
}

/// A policy of `ns` whose upstream is Service `name`.
fn using_service(
    policies: &Store<PolicyObject>,
    ns: Option<String>,
    name: &str,
) -> Vec<ObjectRef<PolicyObject>> {
    policies
        .state()
        .iter()
        .filter(|p| p.namespace() == ns)
        // A policy being deleted may never render again (another finalizer can hold it).
        .filter(|p| p.meta().deletion_timestamp.is_none())
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
            "--report-interval",
            "2s",
        ]);
        let o = Options::from(cli.args);
        assert_eq!(o.namespaces, vec!["shop", "pay"]);
        assert!(o.leader_election.is_none());
        assert_eq!(o.debounce, Duration::from_millis(250));
        assert_eq!(o.report_interval, Duration::from_secs(2));
        let o = Options::from(Cli::parse_from(["detour", "--report-interval", "0s"]).args);
        assert_eq!(o.report_interval, MIN_REPORT_INTERVAL);

        let o = Options::from(Cli::parse_from(["detour", "--identity", "pod-1"]).args);
        assert!(o.namespaces.is_empty(), "all namespaces by default");
        assert_eq!(o.report_interval, Duration::from_secs(10));
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

    fn stored(ns: &str, name: &str, svc: &str, deleting: bool) -> PolicyObject {
        let mut p = serde_json::json!({
            "apiVersion": "detour.dev/v1alpha1", "kind": "UpstreamPolicy",
            "metadata": {"name": name, "namespace": ns, "uid": name},
            "spec": {"upstream": {"service": svc, "port": 80}, "listener": {"port": 18080}},
        });
        if deleting {
            p["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
        }
        serde_json::from_value(p).unwrap()
    }

    #[tokio::test]
    async fn only_spec_changes_deletion_marks_and_re_creations_are_worth_reconciling() {
        let at = |generation: i64, uid: &str, status: u32, deleting: bool| {
            let mut p = stored("shop", "p", "pay", deleting);
            p.meta_mut().generation = Some(generation);
            p.meta_mut().uid = Some(uid.into());
            if let Ok(obj) = &mut p.0 {
                obj.status = Some(crate::api::UpstreamPolicyStatus {
                    sidecars: status,
                    ..Default::default()
                });
            }
            p
        };
        let events = [
            at(1, "a", 0, false),
            at(1, "a", 1, false), // our status write
            at(2, "a", 1, false), // a spec edit
            at(2, "a", 2, false),
            at(2, "a", 2, true), // marked for deletion
            at(2, "a", 2, true),
            at(1, "b", 0, false), // deleted and created again
        ];
        let passed: Vec<(i64, String, bool)> = futures::stream::iter(events.map(Ok))
            .predicate_filter(worth_reconciling(), PredicateConfig::default())
            .map(|p| {
                let p = p.unwrap();
                let m = p.meta();
                let deleting = m.deletion_timestamp.is_some();
                (m.generation.unwrap(), m.uid.clone().unwrap(), deleting)
            })
            .collect()
            .await;
        assert_eq!(
            passed,
            [
                (1, "a".into(), false),
                (2, "a".into(), false),
                (2, "a".into(), true),
                (1, "b".into(), false),
            ]
        );
    }

    #[test]
    fn service_changes_never_map_to_a_policy_being_deleted() {
        let (store, mut w) = reflector::store::<PolicyObject>();
        w.apply_watcher_event(&watcher::Event::Apply(stored("shop", "old", "pay", true)));
        w.apply_watcher_event(&watcher::Event::Apply(stored("shop", "other", "db", false)));
        assert!(using_service(&store, Some("shop".into()), "pay").is_empty());
        w.apply_watcher_event(&watcher::Event::Apply(stored("shop", "new", "pay", false)));
        let picked = using_service(&store, Some("shop".into()), "pay");
        assert_eq!(picked, vec![ObjectRef::new("new").within("shop")]);
    }

    #[test]
    fn orphaned_lists_namespaces_with_a_config_but_no_live_policy() {
        let (policies, mut w) = reflector::store::<PolicyObject>();
        w.apply_watcher_event(&watcher::Event::Apply(stored("a", "p", "pay", false)));
        w.apply_watcher_event(&watcher::Event::Apply(stored("b", "p", "pay", true)));
        let (cms, mut cw) = reflector::store::<ConfigMap>();
        for ns in ["a", "b", "c"] {
            let mut cm = ConfigMap::default();
            cm.metadata.name = Some("detour-config".into());
            cm.metadata.namespace = Some(ns.into());
            cw.apply_watcher_event(&watcher::Event::Apply(cm));
        }
        let mut got = orphaned(&policies, &cms);
        got.sort();
        assert_eq!(got, vec!["b", "c"]);
    }
}
