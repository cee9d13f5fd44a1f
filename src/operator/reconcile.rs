//! Reconcile: read the caches → render the namespace (pure) → apply `detour-config` → write the
//! changed statuses. The unit of work is a namespace: any policy's reconcile renders every policy
//! in its namespace, serialized per namespace, and writes only what differs from the cache.

use std::{
    collections::{HashMap, HashSet},
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        core::v1::{ConfigMap, ObjectReference, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    api::{DeleteParams, Patch, PatchParams},
    core::DeserializeGuard,
    runtime::{
        controller::Action,
        events::{Event as KubeEvent, EventType, Recorder},
        reflector::{ObjectRef, Store},
    },
    Api, Client, Resource, ResourceExt,
};
use parking_lot::Mutex;
use serde_json::json;
use tracing::{debug, info, warn};

use super::{
    access,
    metrics::Metrics,
    render::{desired_status, render_namespace, Outcome, PolicyInput, RenderError, Rendered},
    sidecar_reports::{SidecarReports, UpstreamReport},
    ApiError,
};
use crate::{
    api::{condition, ConditionStatus, UpstreamPolicy, UpstreamPolicyStatus},
    config::{Config, Upstream, CONFIG_KEY, CONFIG_MAP},
};

/// Field manager of every write (ConfigMap, status).
pub const MANAGER: &str = "detour-operator";
/// Finalizer that lets a deleted policy leave the namespace's config before it disappears.
pub const FINALIZER: &str = "detour.dev/config";
/// Label on rendered ConfigMaps (the operator watches only these).
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "detour-operator");
/// Annotation with the config hash, for humans and sidecars.
pub const HASH_ANNOTATION: &str = "detour.dev/config-hash";

/// An UpstreamPolicy as the watches hold it: one that fails to deserialize is kept as the error,
/// so a malformed object reports itself instead of breaking the watch.
pub type PolicyObject = DeserializeGuard<UpstreamPolicy>;

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kube(#[from] ApiError),
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error("the {0} cache stopped")]
    CacheClosed(&'static str),
}

impl Error {
    /// Bounded label for `detour_operator_reconciles_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(e) => e.action,
            Error::Render(_) => "render",
            Error::CacheClosed(_) => "cache",
        }
    }
}

/// Everything a reconcile reads and writes, for one watch scope (all namespaces or one).
pub struct Context {
    pub client: Client,
    pub policies: Store<PolicyObject>,
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub config_maps: Store<ConfigMap>,
    /// Becomes true once all four caches hold a full list.
    pub synced: tokio::sync::watch::Receiver<bool>,
    pub shared: Arc<Shared>,
    /// What the sidecars of this scope last reported (`sidecar_reports::poll` fills it).
    pub reports: Arc<SidecarReports>,
}

/// State shared by every scope and kept across leadership changes.
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// One lock per namespace: two policies of a namespace never render concurrently.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Last write per object: (hash of what was written, resourceVersion the server returned).
    /// Until the cache reaches that version it may show the old state, and the write must not
    /// be repeated.
    written: Mutex<HashMap<String, (u64, Option<String>)>>,
    /// Config hash last applied per namespace, to recognise our own ConfigMap writes.
    applied: Mutex<HashMap<String, String>>,
    /// Consecutive failures per object, for backoff.
    failures: Mutex<HashMap<ObjectRef<PolicyObject>, u32>>,
    /// Namespaces whose sidecar Role and RoleBinding this process applied.
    access: Mutex<HashSet<String>>,
}

// === impl Shared ===

impl Shared {
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: Option<String>) -> Self {
        let reporter = kube::runtime::events::Reporter {
            controller: MANAGER.to_string(),
            instance,
        };
        Shared {
            metrics,
            recorder: Recorder::new(client, reporter),
            locks: Mutex::default(),
            written: Mutex::default(),
            applied: Mutex::default(),
            failures: Mutex::default(),
            access: Mutex::default(),
        }
    }

    fn lock(&self, ns: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().entry(ns.to_string()).or_default().clone()
    }

    /// True when `value` was already written and the cache has not caught up with that write
    /// yet (it shows an older resourceVersion, or none). Writing again would only repeat it.
    fn already_written(&self, key: &str, value: u64, cached_rv: Option<&str>) -> bool {
        newer_write(&self.written.lock(), key, cached_rv) == Some(value)
    }

    /// What was last written under `key` when that write is newer than the cache; the cache
    /// then shows an older state than the server holds.
    fn pending_write(&self, key: &str, cached_rv: Option<&str>) -> Option<u64> {
        newer_write(&self.written.lock(), key, cached_rv)
    }

    /// True when `hash` is what this operator last applied in `ns`.
    pub fn is_own_config(&self, ns: &str, hash: &str) -> bool {
        self.applied.lock().get(ns).is_some_and(|h| h == hash)
    }

    /// A policy is gone: drop what was remembered about writing it.
    pub fn forget_policy(&self, ns: &str, name: &str) {
        let mut w = self.written.lock();
        w.remove(&format!("status/{ns}/{name}"));
        w.remove(&format!("finalizer/{ns}/{name}"));
    }

    /// Records that the sidecars' Role and RoleBinding of `ns` are in place, as this process
    /// does once it has checked or written them (and tests do for an operator that already did).
    pub fn remember_access(&self, ns: &str) {
        self.access.lock().insert(ns.to_string());
    }

    /// A new leadership term: another replica may have written (or deleted) since this one
    /// last led, so nothing remembered about writes is trusted.
    pub fn forget_writes(&self) {
        self.written.lock().clear();
        self.applied.lock().clear();
        self.access.lock().clear();
    }

    /// The rendered ConfigMap of `ns` was deleted: forget writing it, so it is written again.
    pub fn forget_config(&self, ns: &str) {
        self.written.lock().remove(&format!("configmap/{ns}"));
        self.applied.lock().remove(ns);
        self.access.lock().remove(ns);
    }

    fn remember(&self, key: String, value: u64, rv: Option<String>) {
        self.written.lock().insert(key, (value, rv));
    }
}

/// The value remembered under `key` if its write is newer than `cached_rv`.
fn newer_write(
    memo: &HashMap<String, (u64, Option<String>)>,
    key: &str,
    cached_rv: Option<&str>,
) -> Option<u64> {
    let (v, written) = memo.get(key)?;
    let newer = match (written.as_deref(), cached_rv) {
        (None, _) | (Some(_), None) => true,
        // resourceVersions are opaque, but every API server in use issues increasing
        // integers; when they are not, the cache is taken as stale while it differs.
        (Some(w), Some(c)) => match (w.parse::<u64>(), c.parse::<u64>()) {
            (Ok(w), Ok(c)) => c < w,
            _ => c != w,
        },
    };
    newer.then_some(*v)
}

/// Whether the desired status needs no write. The cache can lag behind our last write: then
/// that write, not the cache, is what the server holds (a quick flip back must be written).
fn status_unchanged(
    cached: Option<&UpstreamPolicyStatus>,
    desired: &UpstreamPolicyStatus,
    pending: Option<u64>,
) -> bool {
    match pending {
        Some(written) => written == hash_of(&without_times(desired)),
        None => cached == Some(desired),
    }
}

/// Backoff for a failing object: 500 ms doubling to 5 min.
pub fn backoff(failures: u32) -> Duration {
    let ms = 500u64.saturating_mul(1u64 << failures.min(10));
    Duration::from_millis(ms.min(300_000))
}

pub async fn reconcile(obj: Arc<PolicyObject>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let key = ObjectRef::from_obj(&*obj);
    let res = reconcile_inner(&obj, &ctx).await;
    let label = match &res {
        Ok(_) => {
            ctx.shared.failures.lock().remove(&key);
            "ok"
        }
        Err(e) => e.metric_label(),
    };
    ctx.shared
        .metrics
        .reconciled(label, started.elapsed().as_secs_f64());
    res
}

pub fn error_policy(obj: Arc<PolicyObject>, err: &Error, ctx: Arc<Context>) -> Action {
    let key = ObjectRef::from_obj(&*obj);
    let n = {
        let mut f = ctx.shared.failures.lock();
        let n = f.entry(key).or_insert(0);
        *n += 1;
        *n
    };
    let delay = backoff(n - 1);
    warn!(policy = %obj.name_any(), namespace = ?obj.namespace(), error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

async fn reconcile_inner(obj: &PolicyObject, ctx: &Context) -> Result<Action, Error> {
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let lock = ctx.shared.lock(&ns);
    let _guard = lock.lock().await;
    // Rendering from half-filled caches would report missing Services that exist. (A
    // tokio watch, not `Store::wait_until_ready`: that wakes only one of many waiters.)
    if ctx.synced.clone().wait_for(|s| *s).await.is_err() {
        return Err(Error::CacheClosed("a watch"));
    }
    // The cache may be newer than the trigger (the object could be gone or re-created); the
    // namespace is rendered either way, so a vanished policy leaves the config.
    let current = ctx.policies.get(&ObjectRef::from_obj(obj));
    render_and_apply(&ns, ctx).await?;

    let Some(current) = current else {
        return Ok(Action::await_change());
    };
    if current.meta().deletion_timestamp.is_some() {
        // Another controller's finalizer may still hold the object; ours goes once the
        // render above has dropped the policy.
        let policy_api: Api<PolicyObject> = Api::namespaced(ctx.client.clone(), &ns);
        remove_finalizer(&policy_api, &current).await?;
        ctx.shared.forget_policy(&ns, &name);
        ctx.shared
            .metrics
            .policy_conditions(&format!("{ns}/{name}"), None);
        info!(namespace = %ns, policy = %name, "policy removed from the config");
    }
    Ok(Action::await_change())
}

/// Renders `ns` without a policy to start from: a deleted policy, an orphaned or edited
/// ConfigMap. The Controller cannot do this (it runs only objects still in its cache).
pub async fn reconcile_namespace(ns: &str, ctx: &Context) -> Result<(), Error> {
    let started = Instant::now();
    let res = async {
        let lock = ctx.shared.lock(ns);
        let _guard = lock.lock().await;
        if ctx.synced.clone().wait_for(|s| *s).await.is_err() {
            return Err(Error::CacheClosed("a watch"));
        }
        render_and_apply(ns, ctx).await
    }
    .await;
    let label = match &res {
        Ok(()) => "ok",
        Err(e) => e.metric_label(),
    };
    ctx.shared
        .metrics
        .reconciled(label, started.elapsed().as_secs_f64());
    res
}

/// The live policies of `ns` that carry our finalizer, adding it where it is missing. Only these
/// are rendered: a policy without it could vanish with no event that renders it out again.
async fn finalized_policies(ns: &str, ctx: &Context) -> Result<Vec<Arc<PolicyObject>>, Error> {
    let live = ctx.policies.state().into_iter().filter(|policy| {
        policy.meta().namespace.as_deref() == Some(ns) && policy.meta().deletion_timestamp.is_none()
    });
    let api: Api<PolicyObject> = Api::namespaced(ctx.client.clone(), ns);
    let mut out = Vec::new();
    for policy in live {
        let key = format!("finalizer/{ns}/{}", policy.name_any());
        let cached_rv = policy.meta().resource_version.as_deref();
        // A second render can run before the cache shows the finalizer just added.
        if policy.finalizers().iter().any(|f| f == FINALIZER)
            || ctx.shared.already_written(&key, 1, cached_rv)
        {
            out.push(policy);
            continue;
        }
        match add_finalizer(&api, &policy).await? {
            Patched::Done(rv) => {
                ctx.shared.remember(key, 1, rv);
                out.push(policy);
            }
            // Deleted before it was ever rendered: nothing to take out of the config.
            Patched::Gone => {}
        }
    }
    Ok(out)
}

/// Renders the namespace from the caches and writes what changed.
async fn render_and_apply(ns: &str, ctx: &Context) -> Result<(), Error> {
    let policies = finalized_policies(ns, ctx).await?;
    let rendered = render(ns, ctx, &policies)?;
    let hash = rendered.config.hash();
    // A refused ConfigMap (too large, RBAC, 422) must still show in every status.
    let config = (!policies.is_empty()).then_some(&rendered.config);
    let applied = apply_config_map(ns, ctx, config, &hash).await;
    // What the sidecars run when the write failed: the ConfigMap as it still is.
    let running_hash = match &applied {
        Ok(()) => Some(hash),
        Err(_) => ctx
            .config_maps
            .get(&ObjectRef::new(CONFIG_MAP).within(ns))
            .and_then(|c| c.annotations().get(HASH_ANNOTATION).cloned()),
    };
    let mut first_error = applied.err();
    let reports = ctx.reports.latest();
    let upstreams: HashMap<&str, &Upstream> = rendered
        .config
        .upstreams
        .iter()
        .map(|u| (u.name.as_str(), u))
        .collect();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    for policy in &policies {
        let name = policy.meta().name.clone().unwrap_or_default();
        let Some(outcome) = rendered.outcomes.get(&name) else {
            continue;
        };
        let mut outcome = outcome.clone();
        if let Some(e) = &first_error {
            outcome.config_not_applied(CONFIG_MAP, &e.to_string());
        }
        let upstream = format!("{ns}/{name}");
        let previous = previous_status(policy);
        add_sidecar_figures(
            &mut outcome,
            upstreams.get(upstream.as_str()).copied(),
            reports.as_deref().map(|r| r.get(&upstream)),
            previous.as_ref(),
        );
        let status = desired_status(
            &outcome,
            policy.meta().generation,
            running_hash.as_deref(),
            previous.as_ref(),
            &now,
        );
        let statuses = outcome.conditions().map(|(_, c)| c.status);
        ctx.shared
            .metrics
            .policy_conditions(&upstream, Some(statuses));
        // One refused status write does not keep the others stale.
        if let Err(e) = update_status(ns, policy, status, previous.as_ref(), ctx).await {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The namespace's config and outcomes, from `policies` and the cached Services, EndpointSlices
/// and running config.
fn render(ns: &str, ctx: &Context, policies: &[Arc<PolicyObject>]) -> Result<Rendered, Error> {
    let in_ns = |m: &kube::core::ObjectMeta| m.namespace.as_deref() == Some(ns);
    let services = ctx.services.state_filter(|s| in_ns(&s.metadata));
    let slices = ctx.slices.state_filter(|s| in_ns(&s.metadata));
    let running = running_config(ns, ctx);
    let inputs: Vec<PolicyInput<'_>> = policies
        .iter()
        .map(|p| {
            let name = p.meta().name.as_deref().unwrap_or_default();
            PolicyInput {
                name,
                created: p.meta().creation_timestamp.as_ref(),
                spec: match &p.0 {
                    Ok(p) => Ok(&p.spec),
                    Err(e) => Err(format!("the object cannot be read: {}", e.error)),
                },
                last_accepted: running.as_ref().and_then(|c| {
                    c.upstreams
                        .iter()
                        .find(|u| u.name == format!("{ns}/{name}"))
                }),
            }
        })
        .collect();
    let svc_refs: Vec<&Service> = services.iter().map(|s| &**s).collect();
    let slice_refs: Vec<&EndpointSlice> = slices.iter().map(|s| &**s).collect();
    Ok(render_namespace(ns, &inputs, &svc_refs, &slice_refs)?)
}

/// The status the policy shows now (none for an object that cannot be read).
fn previous_status(p: &PolicyObject) -> Option<UpstreamPolicyStatus> {
    p.0.as_ref().ok().and_then(|p| p.status.clone())
}

/// How many sidecars run the policy's upstream and how many of its endpoints they ejected.
/// `report` is `None` before the first scrape round (just started or took over): then the
/// status keeps what it says.
fn add_sidecar_figures(
    outcome: &mut Outcome,
    upstream: Option<&Upstream>,
    report: Option<Option<&UpstreamReport>>,
    previous: Option<&UpstreamPolicyStatus>,
) {
    match report {
        Some(report) => {
            let addresses = upstream
                .into_iter()
                .flat_map(|u| u.endpoints.iter().map(|e| e.address.as_str()));
            let (sidecars, ejected) =
                report.map_or((0, 0), |r| (r.sidecars, r.ejected_among(addresses)));
            outcome.sidecar_figures(sidecars, ejected);
        }
        None => {
            if let Some(prev) = previous {
                let ejected = prev.endpoints.ejected.min(outcome.endpoints.total);
                outcome.sidecar_figures(prev.sidecars, ejected);
            }
        }
    }
}

/// Writes `status` unless the server already holds it, then publishes its transitions.
async fn update_status(
    ns: &str,
    policy: &PolicyObject,
    status: UpstreamPolicyStatus,
    previous: Option<&UpstreamPolicyStatus>,
    ctx: &Context,
) -> Result<(), Error> {
    let name = policy.name_any();
    let key = format!("status/{ns}/{name}");
    let value = hash_of(&without_times(&status));
    // An unreadable object shows no status in the cache, so only our own memory stops a write
    // loop for it.
    let cached_rv = match &policy.0 {
        Ok(_) => policy.meta().resource_version.as_deref(),
        Err(_) => None,
    };
    let pending = ctx.shared.pending_write(&key, cached_rv);
    if status_unchanged(previous, &status, pending) {
        return Ok(());
    }
    match patch_status(ns, &name, &status, ctx).await {
        Ok(written_rv) => {
            ctx.shared
                .remember(key, value, written_rv.filter(|_| policy.0.is_ok()));
            publish_transitions(policy, previous, &status, ctx).await;
            Ok(())
        }
        Err(e) => {
            warn!(namespace = %ns, policy = %name, error = %e, "status write failed");
            Err(e)
        }
    }
}

/// The config the sidecars of `ns` run now: the rendered ConfigMap in the cache.
fn running_config(ns: &str, ctx: &Context) -> Option<Config> {
    let cm = ctx
        .config_maps
        .get(&ObjectRef::new(CONFIG_MAP).within(ns))?;
    let text = cm.data.as_ref()?.get(CONFIG_KEY)?;
    Config::from_str_validated(text).ok()
}

/// Writes the namespace's ConfigMap (`config`), or deletes it when no policy is left (`None`).
async fn apply_config_map(
    ns: &str,
    ctx: &Context,
    config: Option<&Config>,
    hash: &str,
) -> Result<(), Error> {
    let cached = ctx.config_maps.get(&ObjectRef::new(CONFIG_MAP).within(ns));
    match config {
        Some(config) => write_config_map(ns, ctx, config, hash, cached.as_deref()).await,
        None => delete_config_map(ns, ctx, cached.as_deref()).await,
    }
}

async fn write_config_map(
    ns: &str,
    ctx: &Context,
    config: &Config,
    hash: &str,
    cached: Option<&ConfigMap>,
) -> Result<(), Error> {
    // The sidecars' read access first, so that they can read what is written next.
    if !ctx.shared.access.lock().contains(ns) {
        access::apply(&ctx.client, ns).await?;
        ctx.shared.remember_access(ns);
    }
    let yaml = config.to_yaml();
    let key = format!("configmap/{ns}");
    let value = hash_of(&yaml);
    ctx.shared
        .applied
        .lock()
        .insert(ns.to_string(), hash.to_string());
    let rv = cached.and_then(|c| c.metadata.resource_version.as_deref());
    if cached.is_some_and(|c| holds(c, &yaml, hash)) || ctx.shared.already_written(&key, value, rv)
    {
        ctx.shared.metrics.rendered("unchanged");
        return Ok(());
    }
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    let written = api
        .patch(
            CONFIG_MAP,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&config_map(ns, hash, &yaml)),
        )
        .await
        .map_err(ApiError::of(
            "apply",
            format!("configmap {ns}/{CONFIG_MAP}"),
        ))?;
    ctx.shared
        .remember(key, value, written.metadata.resource_version);
    ctx.shared.metrics.rendered("applied");
    debug!(namespace = %ns, %hash, upstreams = config.upstreams.len(), "applied {CONFIG_MAP}");
    Ok(())
}

/// No policies left in the namespace: the ConfigMap goes, and the sidecars' access with it.
async fn delete_config_map(
    ns: &str,
    ctx: &Context,
    cached: Option<&ConfigMap>,
) -> Result<(), Error> {
    let key = format!("configmap/{ns}");
    let rv = cached.and_then(|c| c.metadata.resource_version.as_deref());
    // Remembered without a version: skipped until the cache drops the deleted object.
    let delete = cached.is_some() && !ctx.shared.already_written(&key, 0, rv);
    if delete {
        let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
        match api.delete(CONFIG_MAP, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                let target = format!("configmap {ns}/{CONFIG_MAP}");
                return Err(ApiError::of("delete", target)(source).into());
            }
        }
        ctx.shared.remember(key, 0, None);
        ctx.shared.metrics.rendered("deleted");
        info!(namespace = %ns, "deleted {CONFIG_MAP}: no policies left");
        // Remembered first, so that a failed removal is tried again.
        ctx.shared.remember_access(ns);
    }
    if ctx.shared.access.lock().contains(ns) {
        access::remove(&ctx.client, ns).await?;
        ctx.shared.access.lock().remove(ns);
    }
    Ok(())
}

/// The ConfigMap as this operator writes it (server-side apply).
fn config_map(ns: &str, hash: &str, yaml: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CONFIG_MAP,
            "namespace": ns,
            "labels": { MANAGED_BY.0: MANAGED_BY.1 },
            "annotations": { HASH_ANNOTATION: hash },
        },
        "data": { CONFIG_KEY: yaml },
    })
}

/// `cached` already holds this document, hash and label: nothing to write.
fn holds(cached: &ConfigMap, yaml: &str, hash: &str) -> bool {
    cached
        .data
        .as_ref()
        .and_then(|d| d.get(CONFIG_KEY))
        .map(String::as_str)
        == Some(yaml)
        && cached
            .annotations()
            .get(HASH_ANNOTATION)
            .map(String::as_str)
            == Some(hash)
        && cached.labels().get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1)
}

async fn patch_status(
    ns: &str,
    name: &str,
    status: &UpstreamPolicyStatus,
    ctx: &Context,
) -> Result<Option<String>, Error> {
    let api: Api<PolicyObject> = Api::namespaced(ctx.client.clone(), ns);
    let body = json!({
        "apiVersion": UpstreamPolicy::api_version(&()),
        "kind": UpstreamPolicy::kind(&()),
        "status": status,
    });
    let res = api
        .patch_status(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await;
    match res {
        Ok(obj) => {
            ctx.shared.metrics.status_patched("ok");
            Ok(obj.meta().resource_version.clone())
        }
        // Deleted meanwhile: its own event will follow.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(source) => {
            ctx.shared.metrics.status_patched("error");
            Err(ApiError::of("patch_status", format!("upstreampolicy {ns}/{name}"))(source).into())
        }
    }
}

/// Result of a JSON patch on a policy.
enum Patched {
    /// Written; the resourceVersion the server returned.
    Done(Option<String>),
    /// The policy no longer exists.
    Gone,
}

async fn add_finalizer(api: &Api<PolicyObject>, obj: &PolicyObject) -> Result<Patched, Error> {
    // `test` makes the patch fail, not clobber, if someone else changed the list meanwhile.
    let ops = match &obj.meta().finalizers {
        None => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ]),
        Some(list) => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": list},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ]),
    };
    json_patch_policy(api, obj, ops, "add_finalizer").await
}

async fn remove_finalizer(api: &Api<PolicyObject>, obj: &PolicyObject) -> Result<Patched, Error> {
    let Some(i) = obj.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(Patched::Done(None));
    };
    let ops = json!([
        {"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{i}")},
    ]);
    json_patch_policy(api, obj, ops, "remove_finalizer").await
}

async fn json_patch_policy(
    api: &Api<PolicyObject>,
    obj: &PolicyObject,
    ops: serde_json::Value,
    action: &'static str,
) -> Result<Patched, Error> {
    let name = obj.name_any();
    let patch: json_patch::Patch = serde_json::from_value(ops).expect("valid JSON patch");
    match api
        .patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
    {
        Ok(obj) => Ok(Patched::Done(obj.meta().resource_version.clone())),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Patched::Gone),
        Err(source) => {
            let ns = obj.namespace().unwrap_or_default();
            Err(ApiError::of(action, format!("upstreampolicy {ns}/{name}"))(source).into())
        }
    }
}

/// One Event per condition whose status changed (or first appeared).
async fn publish_transitions(
    obj: &PolicyObject,
    previous: Option<&UpstreamPolicyStatus>,
    status: &UpstreamPolicyStatus,
    ctx: &Context,
) {
    let reference = ObjectReference {
        api_version: Some(UpstreamPolicy::api_version(&()).into_owned()),
        kind: Some(UpstreamPolicy::kind(&()).into_owned()),
        name: obj.meta().name.clone(),
        namespace: obj.meta().namespace.clone(),
        uid: obj.meta().uid.clone(),
        resource_version: None,
        field_path: None,
    };
    for c in &status.conditions {
        let before = previous.and_then(|p| p.conditions.iter().find(|x| x.type_ == c.type_));
        if before.is_some_and(|b| b.status == c.status && b.reason == c.reason) {
            continue;
        }
        // Accepted=True with reason Accepted is the normal case; it needs no event.
        if before.is_none()
            && c.status == ConditionStatus::True.as_str()
            && c.type_ != condition::READY
        {
            continue;
        }
        let ev = KubeEvent {
            type_: if c.status == ConditionStatus::True.as_str() {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: c.reason.clone(),
            note: Some(format!("{} is {}: {}", c.type_, c.status, c.message)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.shared.recorder.publish(&ev, &reference).await {
            debug!(error = %e, "publishing event failed");
        }
    }
}

fn without_times(s: &UpstreamPolicyStatus) -> UpstreamPolicyStatus {
    let mut s = s.clone();
    for c in &mut s.conditions {
        c.last_transition_time = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    }
    s
}

fn hash_of<T: serde::Serialize>(v: &T) -> u64 {
    let mut h = DefaultHasher::new();
    serde_json::to_string(v).expect("serializes").hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(ready: &str) -> UpstreamPolicyStatus {
        let t = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        UpstreamPolicyStatus {
            observed_generation: Some(1),
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "Ready".into(),
                status: ready.into(),
                reason: "Ready".into(),
                message: String::new(),
                observed_generation: Some(1),
                last_transition_time: t,
            }],
            endpoints: Default::default(),
            sidecars: 0,
            config_hash: None,
        }
    }

    #[test]
    fn a_quick_flip_back_is_written_while_the_cache_lags() {
        let (a, b) = (status("True"), status("False"));
        let mut memo = HashMap::new();
        // Cache at rv 10 shows A; we wrote B, the server answered rv 11.
        memo.insert(
            "status/ns/p".to_string(),
            (hash_of(&without_times(&b)), Some("11".into())),
        );
        let pending = newer_write(&memo, "status/ns/p", Some("10"));
        assert!(pending.is_some());
        // Back to A before the cache caught up: the server holds B, so A must be written...
        assert!(!status_unchanged(Some(&a), &a, pending));
        // ...and B need not be written again.
        assert!(status_unchanged(Some(&a), &b, pending));
        // Once the cache reaches our write, it is the reference again.
        let caught_up = newer_write(&memo, "status/ns/p", Some("11"));
        assert_eq!(caught_up, None);
        assert!(status_unchanged(Some(&b), &b, caught_up));
        assert!(!status_unchanged(Some(&b), &a, caught_up));
        // Nothing remembered: the cache decides.
        assert_eq!(newer_write(&memo, "status/ns/q", Some("10")), None);
        assert!(status_unchanged(Some(&a), &a, None));
    }

    #[test]
    fn a_config_map_holds_a_document_only_with_its_hash_and_label() {
        let ours: ConfigMap = serde_json::from_value(config_map("shop", "abc", "doc")).unwrap();
        assert!(holds(&ours, "doc", "abc"));
        assert!(!holds(&ours, "other", "abc"));
        assert!(!holds(&ours, "doc", "def"));
        let mut unlabelled = ours.clone();
        unlabelled.metadata.labels = None;
        assert!(
            !holds(&unlabelled, "doc", "abc"),
            "a label removed is put back"
        );
        assert_eq!(ours.metadata.name.as_deref(), Some(CONFIG_MAP));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(0), Duration::from_millis(500));
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(30), Duration::from_secs(300));
    }
}
