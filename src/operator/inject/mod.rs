//! What gets injected: the detour sidecar as a native sidecar (the first init container, with
//! `restartPolicy: Always`), the volumes it needs and the pod label that marks it.
//!
//! One code path serves both entry points: the operator's admission webhook ([`pod_patch`], the
//! JSON Patch between a pod and the same pod after [`inject_pod`]) and `detour inject`
//! ([`inject_manifests`], which runs [`inject_pod`] on the pod template of every workload of a
//! multi-document YAML stream). Everything here is pure: no client, no I/O.

use std::fmt;

use json_patch::{jsonptr::PointerBuf, AddOperation, Patch, PatchOperation, RemoveOperation};
use serde_json::{json, Map, Value};

mod manifests;
mod quantity;
mod yaml;

pub use self::manifests::{inject_manifests, inject_manifests_with_report, Outcome, Report};
pub use self::quantity::Quantity;

/// Label that selects what gets injected: `enabled` on a namespace, `true` on a pod elsewhere,
/// `false` on a pod to opt it out.
pub const INJECT_LABEL: &str = "detour.dev/inject";
/// Label set (`"true"`) on every injected pod; the operator's status scrape selects on it.
pub const SIDECAR_LABEL: &str = crate::api::SIDECAR_LABEL;
/// Name of the native sidecar (init) container.
pub const CONTAINER: &str = "detour";
/// Name of the sidecar's admin port (`/ready`, `/live`, `/metrics`, `/endpoints`).
pub const ADMIN_PORT_NAME: &str = crate::api::SIDECAR_ADMIN_PORT;

/// The downward-API volume with the pod's labels (`--pod-labels`).
const PODINFO_VOLUME: &str = "detour-podinfo";
const PODINFO_DIR: &str = "/var/run/detour/podinfo";
/// The projected service-account token, CA and namespace the sidecar reads the API with.
const TOKEN_VOLUME: &str = "detour-token";
const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// What the ServiceAccount admission plugin gives a projected token (kubelet refreshes it).
const TOKEN_EXPIRATION_SECONDS: i64 = 3607;
/// The sidecar's user and group (the distroless `nonroot` ids).
const SIDECAR_UID: i64 = 65532;

const DEFAULT_IMAGE: &str = concat!("ghcr.io/detour-dev/detour:", env!("CARGO_PKG_VERSION"));
const DEFAULT_CPU_REQUEST: &str = "50m";
const DEFAULT_MEMORY_REQUEST: &str = "32Mi";
const DEFAULT_MEMORY_LIMIT: &str = "128Mi";
const DEFAULT_ADMIN_PORT: u16 = 9901;

// === impl Args, Settings ===

/// Flags of `detour inject`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// The manifests (YAML, several documents allowed); `-` reads standard input.
    #[arg(short = 'f', long = "filename")]
    pub filename: std::path::PathBuf,
    #[command(flatten)]
    pub settings: Settings,
}

/// Sidecar settings: flags shared by `detour operator` (flattened into its Args) and
/// `detour inject`. Explicit ids keep them apart from the operator's own `--admin` and the
/// global `--log-format`.
#[derive(Clone, Debug, PartialEq, clap::Args)]
pub struct Settings {
    /// Image of the injected sidecar.
    #[arg(id = "sidecar_image", long = "sidecar-image", value_name = "IMAGE", env = "DETOUR_SIDECAR_IMAGE", default_value = DEFAULT_IMAGE)]
    pub image: String,
    /// CPU request of the sidecar (a Kubernetes quantity).
    #[arg(id = "sidecar_cpu_request", long = "sidecar-cpu-request", value_name = "QUANTITY", env = "DETOUR_SIDECAR_CPU_REQUEST", default_value = DEFAULT_CPU_REQUEST)]
    pub cpu_request: Quantity,
    /// Memory request of the sidecar.
    #[arg(id = "sidecar_memory_request", long = "sidecar-memory-request", value_name = "QUANTITY", env = "DETOUR_SIDECAR_MEMORY_REQUEST", default_value = DEFAULT_MEMORY_REQUEST)]
    pub memory_request: Quantity,
    /// CPU limit of the sidecar; none by default (a CPU limit throttles the proxy under load).
    #[arg(
        id = "sidecar_cpu_limit",
        long = "sidecar-cpu-limit",
        value_name = "QUANTITY",
        env = "DETOUR_SIDECAR_CPU_LIMIT"
    )]
    pub cpu_limit: Option<Quantity>,
    /// Memory limit of the sidecar.
    #[arg(id = "sidecar_memory_limit", long = "sidecar-memory-limit", value_name = "QUANTITY", env = "DETOUR_SIDECAR_MEMORY_LIMIT", default_value = DEFAULT_MEMORY_LIMIT)]
    pub memory_limit: Quantity,
    /// Log format of the sidecar (its DETOUR_LOG_FORMAT).
    #[arg(id = "sidecar_log_format", long = "sidecar-log-format", value_name = "FORMAT", env = "DETOUR_SIDECAR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// Port of the sidecar's admin server: it gets `--admin 0.0.0.0:<port>`, a container port
    /// named detour-admin and its probes there.
    #[arg(id = "sidecar_admin_port", long = "sidecar-admin-port", value_name = "PORT", env = "DETOUR_SIDECAR_ADMIN_PORT", default_value_t = DEFAULT_ADMIN_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub admin_port: u16,
}

impl Default for Settings {
    fn default() -> Self {
        let q = |s: &str| {
            s.parse::<Quantity>()
                .expect("the default quantities are valid")
        };
        Settings {
            image: DEFAULT_IMAGE.to_owned(),
            cpu_request: q(DEFAULT_CPU_REQUEST),
            memory_request: q(DEFAULT_MEMORY_REQUEST),
            cpu_limit: None,
            memory_limit: q(DEFAULT_MEMORY_LIMIT),
            log_format: LogFormat::Json,
            admin_port: DEFAULT_ADMIN_PORT,
        }
    }
}

impl Settings {
    /// What flags alone cannot check: an image, a port, and requests within their limits (the
    /// API server refuses a pod whose request exceeds its limit).
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::Settings(msg));
        if self.image.trim().is_empty() {
            return bad("--sidecar-image must not be empty".into());
        }
        if self.admin_port == 0 {
            return bad("--sidecar-admin-port must be 1-65535".into());
        }
        let pairs = [
            ("cpu", Some(&self.cpu_request), self.cpu_limit.as_ref()),
            (
                "memory",
                Some(&self.memory_request),
                Some(&self.memory_limit),
            ),
        ];
        for (what, request, limit) in pairs {
            if let (Some(r), Some(l)) = (request, limit) {
                if r.value() > l.value() {
                    return bad(format!(
                        "--sidecar-{what}-request {r} is more than --sidecar-{what}-limit {l}"
                    ));
                }
            }
        }
        Ok(())
    }

    fn resources(&self) -> Value {
        let mut limits = Map::new();
        if let Some(cpu) = &self.cpu_limit {
            limits.insert("cpu".into(), cpu.as_str().into());
        }
        limits.insert("memory".into(), self.memory_limit.as_str().into());
        json!({
            "requests": {"cpu": self.cpu_request.as_str(), "memory": self.memory_request.as_str()},
            "limits": limits,
        })
    }
}

/// `--sidecar-log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

// === impl Skip, Error ===

/// Why a pod is left as it is (not an error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// It already runs the sidecar (label `detour.dev/sidecar`, or an init container `detour`).
    AlreadyInjected,
    /// It carries the label `detour.dev/inject=false`.
    OptedOut,
    /// `hostNetwork: true`: the sidecar's ports would be the node's.
    HostNetwork,
    /// `os.name: windows`: the sidecar is a Linux image.
    Windows,
}

impl Skip {
    pub const ALL: [Skip; 4] = [
        Skip::AlreadyInjected,
        Skip::OptedOut,
        Skip::HostNetwork,
        Skip::Windows,
    ];

    /// A short, fixed name (metric labels, event reasons).
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::AlreadyInjected => "already_injected",
            Skip::OptedOut => "opted_out",
            Skip::HostNetwork => "host_network",
            Skip::Windows => "windows",
        }
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Skip::AlreadyInjected => "the pod already has the detour sidecar",
            Skip::OptedOut => "the pod opted out with the label detour.dev/inject=false",
            Skip::HostNetwork => {
                "the pod uses the node's network (hostNetwork), where the sidecar's ports would be the node's"
            }
            Skip::Windows => "the pod runs on Windows and the sidecar is a Linux image",
        })
    }
}

/// A pod or a manifest the injector cannot handle; the message names the field or document.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field is not what a pod has there (`spec.volumes: must be a list`).
    #[error("{field}: {problem}")]
    Malformed { field: String, problem: String },
    /// The pod already uses a name or port the sidecar needs.
    #[error("{field}: {problem}")]
    Conflict { field: String, problem: String },
    #[error("sidecar settings: {0}")]
    Settings(String),
    /// A YAML document that does not parse (documents counted from 1).
    #[error("document {index}: not valid YAML: {error}")]
    Yaml {
        index: usize,
        error: serde_saphyr::Error,
    },
    /// A document that is not a Kubernetes object (no mapping, no kind or apiVersion).
    #[error("document {index}: not a Kubernetes object: {problem}")]
    NotAnObject { index: usize, problem: String },
    /// The object of document `index` (`Deployment web`) cannot be injected.
    #[error("document {index} ({object}): {error}")]
    Document {
        index: usize,
        object: String,
        error: Box<Error>,
    },
}

impl Error {
    fn malformed(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::Malformed {
            field: field.into(),
            problem: problem.into(),
        }
    }

    fn conflict(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::Conflict {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// The same error with its field path below `prefix` (a pod template's place in a workload).
    fn under(self, prefix: &str) -> Self {
        match self {
            Error::Malformed { field, problem } => Error::Malformed {
                field: format!("{prefix}{field}"),
                problem,
            },
            Error::Conflict { field, problem } => Error::Conflict {
                field: format!("{prefix}{field}"),
                problem,
            },
            other => other,
        }
    }
}

// === inject_pod ===

/// Adds the sidecar to a pod spec and its metadata (labels), in place. `Ok(None)`: injected;
/// `Ok(Some(skip))`: left unchanged, and why; `Err`: cannot handle (left unchanged).
pub fn inject_pod(meta: &mut Value, spec: &mut Value, s: &Settings) -> Result<Option<Skip>, Error> {
    s.validate()?;
    let labels = labels(meta)?;
    if labels.get(INJECT_LABEL).and_then(Value::as_str) == Some("false") {
        return Ok(Some(Skip::OptedOut));
    }
    let spec_map = match spec {
        Value::Object(m) => m,
        Value::Null => return Err(Error::malformed("spec", "missing: a pod needs a spec")),
        _ => return Err(Error::malformed("spec", "must be an object")),
    };
    let init = containers(spec_map, "initContainers")?;
    if labels.contains_key(SIDECAR_LABEL) || init.iter().any(|(_, name)| name == CONTAINER) {
        return Ok(Some(Skip::AlreadyInjected));
    }
    if spec_map.get("hostNetwork") == Some(&Value::Bool(true)) {
        return Ok(Some(Skip::HostNetwork));
    }
    if spec_map
        .get("os")
        .and_then(|os| os.get("name"))
        .and_then(Value::as_str)
        == Some("windows")
    {
        return Ok(Some(Skip::Windows));
    }
    check_conflicts(spec_map, s)?;

    // Nothing can fail from here on: the types were checked above.
    or_empty(spec_map, "initContainers", json!([]))
        .as_array_mut()
        .expect("checked: a list")
        .insert(0, container(s));
    or_empty(spec_map, "volumes", json!([]))
        .as_array_mut()
        .expect("checked: a list")
        .extend(volumes());
    if meta.is_null() {
        *meta = json!({});
    }
    let meta = meta.as_object_mut().expect("checked: an object");
    or_empty(meta, "labels", json!({}))
        .as_object_mut()
        .expect("checked: a map")
        .insert(SIDECAR_LABEL.into(), "true".into());
    Ok(None)
}

/// The value of `key`, set to `empty` first when it is missing or null.
fn or_empty<'a>(map: &'a mut Map<String, Value>, key: &str, empty: Value) -> &'a mut Value {
    let v = map.entry(key).or_insert(Value::Null);
    if v.is_null() {
        *v = empty;
    }
    v
}

/// The pod's labels (empty when there are none).
fn labels(meta: &Value) -> Result<Map<String, Value>, Error> {
    let meta = match meta {
        Value::Null => return Ok(Map::new()),
        Value::Object(m) => m,
        _ => return Err(Error::malformed("metadata", "must be an object")),
    };
    match meta.get("labels") {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(l)) => {
            if let Some((k, _)) = l.iter().find(|(_, v)| !v.is_string()) {
                return Err(Error::malformed(
                    format!("metadata.labels.{k}"),
                    "must be a string",
                ));
            }
            Ok(l.clone())
        }
        Some(_) => Err(Error::malformed(
            "metadata.labels",
            "must be a map of strings",
        )),
    }
}

/// `(index, name)` of each container of the list `key` (missing: none).
fn containers(spec: &Map<String, Value>, key: &str) -> Result<Vec<(usize, String)>, Error> {
    list(spec, key)?
        .iter()
        .enumerate()
        .map(|(i, c)| match c.get("name").and_then(Value::as_str) {
            Some(name) => Ok((i, name.to_owned())),
            None => Err(Error::malformed(
                format!("spec.{key}[{i}].name"),
                "missing: every container needs a name",
            )),
        })
        .collect()
}

/// The list `key` of the pod spec; missing or null is empty.
fn list<'a>(spec: &'a Map<String, Value>, key: &str) -> Result<&'a [Value], Error> {
    match spec.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => {
            if let Some(i) = items.iter().position(|v| !v.is_object()) {
                return Err(Error::malformed(
                    format!("spec.{key}[{i}]"),
                    "must be an object",
                ));
            }
            Ok(items)
        }
        Some(_) => Err(Error::malformed(format!("spec.{key}"), "must be a list")),
    }
}

/// Names and ports the sidecar brings must be free in the pod.
fn check_conflicts(spec: &Map<String, Value>, s: &Settings) -> Result<(), Error> {
    for key in ["containers", "ephemeralContainers"] {
        if let Some((i, _)) = containers(spec, key)?
            .into_iter()
            .find(|(_, name)| name == CONTAINER)
        {
            return Err(Error::conflict(
                format!("spec.{key}[{i}].name"),
                format!(
                    "a container is already named {CONTAINER:?}, the sidecar's name (if it is the \
                     detour sidecar, label the pod {SIDECAR_LABEL}=true)"
                ),
            ));
        }
    }
    for (i, v) in list(spec, "volumes")?.iter().enumerate() {
        let name = v.get("name").and_then(Value::as_str);
        if let Some(name) = name.filter(|n| [PODINFO_VOLUME, TOKEN_VOLUME].contains(n)) {
            return Err(Error::conflict(
                format!("spec.volumes[{i}].name"),
                format!("the volume name {name:?} is reserved for the detour sidecar"),
            ));
        }
    }
    // Every container of a pod shares its network: the admin port must be free in all of them.
    for key in ["initContainers", "containers"] {
        for (i, c) in list(spec, key)?.iter().enumerate() {
            let ports = match c.get("ports") {
                None | Some(Value::Null) => continue,
                Some(Value::Array(p)) => p,
                Some(_) => {
                    return Err(Error::malformed(
                        format!("spec.{key}[{i}].ports"),
                        "must be a list",
                    ))
                }
            };
            for (j, p) in ports.iter().enumerate() {
                let field = format!("spec.{key}[{i}].ports[{j}]");
                let tcp = matches!(
                    p.get("protocol").and_then(Value::as_str),
                    None | Some("TCP")
                );
                if tcp
                    && p.get("containerPort").and_then(Value::as_u64) == Some(s.admin_port.into())
                {
                    return Err(Error::conflict(
                        format!("{field}.containerPort"),
                        format!(
                            "port {} is the detour sidecar's admin port (choose another with \
                             --sidecar-admin-port)",
                            s.admin_port
                        ),
                    ));
                }
                if p.get("name").and_then(Value::as_str) == Some(ADMIN_PORT_NAME) {
                    return Err(Error::conflict(
                        format!("{field}.name"),
                        format!(
                            "the port name {ADMIN_PORT_NAME:?} is reserved for the detour sidecar"
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The native sidecar container.
fn container(s: &Settings) -> Value {
    let probe = |path: &str| json!({"httpGet": {"path": path, "port": s.admin_port}});
    let mut startup = probe("/ready");
    startup["periodSeconds"] = 1.into();
    startup["failureThreshold"] = 120.into();
    json!({
        "name": CONTAINER,
        "image": s.image,
        // Native sidecar: started before the next init container, stopped after the app.
        "restartPolicy": "Always",
        "args": [
            "sidecar",
            "--config-source", "kubernetes",
            "--pod-labels", format!("{PODINFO_DIR}/labels"),
            "--admin", format!("0.0.0.0:{}", s.admin_port),
        ],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "DETOUR_LOG_FORMAT", "value": s.log_format.as_str()},
        ],
        "ports": [{"name": ADMIN_PORT_NAME, "containerPort": s.admin_port, "protocol": "TCP"}],
        // The app containers start only once the sidecar has its config.
        "startupProbe": startup,
        "readinessProbe": probe("/ready"),
        "livenessProbe": probe("/live"),
        "resources": s.resources(),
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": PODINFO_VOLUME, "mountPath": PODINFO_DIR, "readOnly": true},
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
        ],
    })
}

/// The pod's labels for `--pod-labels`, and a service-account token of the sidecar's own (as
/// the ServiceAccount admission plugin would project it) so that the API works for it even with
/// `automountServiceAccountToken: false`, mounted in the sidecar only.
fn volumes() -> [Value; 2] {
    [
        json!({
            "name": PODINFO_VOLUME,
            "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]},
        }),
        json!({
            "name": TOKEN_VOLUME,
            "projected": {"sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": TOKEN_EXPIRATION_SECONDS}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
            ]},
        }),
    ]
}

// === pod_patch ===

/// The JSON Patch (RFC 6902) the webhook returns for `pod` (a whole Pod object): the difference
/// between the pod and the pod after [`inject_pod`]. An empty patch and the reason when the pod
/// is left alone.
pub fn pod_patch(pod: &Value, s: &Settings) -> Result<(Patch, Option<Skip>), Error> {
    if !pod.is_object() {
        return Err(Error::malformed("pod", "must be a JSON object"));
    }
    let mut meta = pod.get("metadata").cloned().unwrap_or(Value::Null);
    let mut spec = pod.get("spec").cloned().unwrap_or(Value::Null);
    if let Some(skip) = inject_pod(&mut meta, &mut spec, s)? {
        return Ok((Patch(Vec::new()), Some(skip)));
    }
    let mut ops = Vec::new();
    let mut at = PointerBuf::new();
    for (key, new) in [("metadata", meta), ("spec", spec)] {
        at.push_back(key);
        match pod.get(key) {
            Some(old) => diff(old, &new, &mut at, &mut ops),
            None => ops.push(add(&at, new)),
        }
        at.pop_back();
    }
    Ok((Patch(ops), None))
}

/// Appends to `ops` what turns `old` into `new` at `at`. Lists that only grew at the front or
/// back (the init containers, the volumes) get `add`s at the right index, as Linkerd's injector
/// patches them; any other change replaces the value.
fn diff(old: &Value, new: &Value, at: &mut PointerBuf, ops: &mut Vec<PatchOperation>) {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            for (k, ov) in o {
                at.push_back(k);
                match n.get(k) {
                    Some(nv) => diff(ov, nv, at, ops),
                    None => ops.push(PatchOperation::Remove(RemoveOperation { path: at.clone() })),
                }
                at.pop_back();
            }
            for (k, nv) in n.iter().filter(|(k, _)| !o.contains_key(*k)) {
                at.push_back(k);
                ops.push(add(at, nv.clone()));
                at.pop_back();
            }
        }
        (Value::Array(o), Value::Array(n)) if n.len() >= o.len() => {
            let front = o.iter().zip(n).take_while(|(a, b)| a == b).count();
            let back = o[front..]
                .iter()
                .rev()
                .zip(n[front..].iter().rev())
                .take_while(|(a, b)| a == b)
                .count();
            if front + back == o.len() {
                for (i, item) in n[front..n.len() - back].iter().enumerate() {
                    at.push_back(front + i);
                    ops.push(add(at, item.clone()));
                    at.pop_back();
                }
            } else {
                ops.push(replace(at, new.clone()));
            }
        }
        _ if old == new => {}
        _ => ops.push(replace(at, new.clone())),
    }
}

fn add(at: &PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: at.clone(),
        value,
    })
}

fn replace(at: &PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Replace(json_patch::ReplaceOperation {
        path: at.clone(),
        value,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn pod() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {
                "initContainers": [{"name": "migrate", "image": "migrate:1"}],
                "containers": [{"name": "app", "image": "web:1", "ports": [{"containerPort": 8080}]}],
                "volumes": [{"name": "data", "emptyDir": {}}],
            },
        })
    }

    /// Sets the field at JSON pointer `at` (its parent must exist).
    fn set(v: &mut Value, at: &str, value: Value) {
        let (parent, key) = at.rsplit_once('/').unwrap();
        match v.pointer_mut(parent) {
            Some(Value::Object(m)) => drop(m.insert(key.to_owned(), value)),
            Some(Value::Array(a)) => a[key.parse::<usize>().unwrap()] = value,
            _ => panic!("no parent for {at}"),
        }
    }

    /// Runs inject_pod on a whole pod object.
    fn inject(pod: &mut Value, s: &Settings) -> Result<Option<Skip>, Error> {
        let (mut meta, mut spec) = (pod["metadata"].take(), pod["spec"].take());
        let r = inject_pod(&mut meta, &mut spec, s);
        pod["metadata"] = meta;
        pod["spec"] = spec;
        r
    }

    #[derive(Parser)]
    struct Cli {
        /// The neighbours Settings is flattened next to: the operator's `--admin` and the global
        /// `--log-format`.
        #[arg(long, default_value = "0.0.0.0:9902")]
        admin: String,
        #[arg(long, default_value = "text")]
        log_format: String,
        #[command(flatten)]
        settings: Settings,
    }

    fn parse(args: &[&str]) -> Result<Settings, clap::Error> {
        Cli::try_parse_from(std::iter::once("detour").chain(args.iter().copied()))
            .map(|c| c.settings)
    }

    #[test]
    fn flags_default_to_settings_default_and_live_next_to_the_operators() {
        Cli::command_for_test().debug_assert();
        // and within the real operator flags, which flatten them (next to the global --log-format)
        let log_format = clap::Arg::new("log_format").long("log-format").global(true);
        <crate::operator::Args as clap::Args>::augment_args(
            clap::Command::new("operator").arg(log_format),
        )
        .debug_assert();
        assert_eq!(parse(&[]).unwrap(), Settings::default());
        let s = parse(&[
            "--sidecar-image=img:2",
            "--sidecar-cpu-request=100m",
            "--sidecar-memory-request=64Mi",
            "--sidecar-cpu-limit=1",
            "--sidecar-memory-limit=256Mi",
            "--sidecar-log-format=text",
            "--sidecar-admin-port=9999",
            "--admin=1.2.3.4:1",
            "--log-format=json",
        ])
        .unwrap();
        assert_eq!(s.image, "img:2");
        assert_eq!(s.cpu_limit.as_ref().map(Quantity::as_str), Some("1"));
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.admin_port, 9999);
        let c = container(&s);
        assert_eq!(
            c["resources"]["limits"],
            json!({"cpu": "1", "memory": "256Mi"})
        );
        assert_eq!(c["args"][6], "0.0.0.0:9999");
        assert_eq!(
            c["env"][2],
            json!({"name": "DETOUR_LOG_FORMAT", "value": "text"})
        );
    }

    impl Cli {
        fn command_for_test() -> clap::Command {
            <Cli as clap::CommandFactory>::command()
        }
    }

    #[test]
    fn bad_flags_are_errors_naming_the_flag() {
        let err = parse(&["--sidecar-memory-limit", "lots"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--sidecar-memory-limit") && err.contains("not a Kubernetes quantity"),
            "{err}"
        );
        let err = parse(&["--sidecar-admin-port", "0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--sidecar-admin-port"), "{err}");
        let err = parse(&["--sidecar-log-format", "xml"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--sidecar-log-format"), "{err}");
        let s = parse(&["--sidecar-memory-request", "1Gi"]).unwrap();
        let err = s.validate().unwrap_err().to_string();
        assert!(
            err.contains("--sidecar-memory-request 1Gi is more than --sidecar-memory-limit 128Mi"),
            "{err}"
        );
        // and a pod is then refused, unchanged
        let mut p = pod();
        assert!(matches!(inject(&mut p, &s), Err(Error::Settings(_))));
        assert_eq!(p, pod());
    }

    #[test]
    fn the_sidecar_comes_first_with_its_volumes_and_label() {
        let mut p = pod();
        assert_eq!(inject(&mut p, &Settings::default()).unwrap(), None);
        let names = |key: &str| -> Vec<String> {
            p["spec"][key]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(names("initContainers"), ["detour", "migrate"]);
        assert_eq!(names("containers"), ["app"]);
        assert_eq!(names("volumes"), ["data", PODINFO_VOLUME, TOKEN_VOLUME]);
        assert_eq!(
            p["metadata"]["labels"],
            json!({"app": "web", SIDECAR_LABEL: "true"})
        );
        let c = &p["spec"]["initContainers"][0];
        assert_eq!(c["restartPolicy"], "Always");
        assert_eq!(c["image"], DEFAULT_IMAGE);
        assert_eq!(
            c["args"],
            json!([
                "sidecar",
                "--config-source",
                "kubernetes",
                "--pod-labels",
                "/var/run/detour/podinfo/labels",
                "--admin",
                "0.0.0.0:9901"
            ])
        );
        // every mount of the sidecar is a volume the pod now has
        for m in c["volumeMounts"].as_array().unwrap() {
            assert!(
                names("volumes").iter().any(|v| m["name"] == v.as_str()),
                "{m}"
            );
        }
        assert_eq!(
            c["startupProbe"]["httpGet"],
            json!({"path": "/ready", "port": 9901})
        );
        assert_eq!(c["ports"][0]["name"], ADMIN_PORT_NAME);
        // the app containers are untouched: the token is mounted in the sidecar only
        assert_eq!(p["spec"]["containers"], pod()["spec"]["containers"]);
    }

    #[test]
    fn a_bare_pod_gets_labels_init_containers_and_volumes() {
        let mut meta = Value::Null;
        let mut spec = json!({"containers": [{"name": "app", "image": "web:1"}]});
        assert_eq!(
            inject_pod(&mut meta, &mut spec, &Settings::default()).unwrap(),
            None
        );
        assert_eq!(meta, json!({"labels": {SIDECAR_LABEL: "true"}}));
        assert_eq!(spec["initContainers"].as_array().unwrap().len(), 1);
        assert_eq!(spec["volumes"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn null_lists_and_labels_are_as_good_as_missing() {
        let mut meta = json!({"name": "p", "labels": null});
        let mut spec = json!({"containers": [{"name": "app", "image": "x"}], "initContainers": null, "volumes": null});
        assert_eq!(
            inject_pod(&mut meta, &mut spec, &Settings::default()).unwrap(),
            None
        );
        assert_eq!(meta["labels"], json!({SIDECAR_LABEL: "true"}));
        assert_eq!(spec["initContainers"][0]["name"], CONTAINER);
        assert_eq!(spec["volumes"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn skips_leave_the_pod_as_it_is() {
        let cases: [(&str, Value, Skip); 5] = [
            (
                "/metadata/labels",
                json!({INJECT_LABEL: "false"}),
                Skip::OptedOut,
            ),
            (
                "/metadata/labels",
                json!({SIDECAR_LABEL: "yes"}),
                Skip::AlreadyInjected,
            ),
            (
                "/spec/initContainers",
                json!([{"name": "detour", "image": "x"}]),
                Skip::AlreadyInjected,
            ),
            ("/spec/hostNetwork", json!(true), Skip::HostNetwork),
            ("/spec/os", json!({"name": "windows"}), Skip::Windows),
        ];
        for (at, value, want) in cases {
            let mut p = pod();
            set(&mut p, at, value);
            let before = p.clone();
            assert_eq!(
                inject(&mut p, &Settings::default()).unwrap(),
                Some(want),
                "{at}"
            );
            assert_eq!(p, before, "{at}");
            assert!(!want.to_string().is_empty() && Skip::ALL.contains(&want));
        }
        // injecting twice is injecting once
        let mut p = pod();
        inject(&mut p, &Settings::default()).unwrap();
        let once = p.clone();
        assert_eq!(
            inject(&mut p, &Settings::default()).unwrap(),
            Some(Skip::AlreadyInjected)
        );
        assert_eq!(p, once);
        // opting in explicitly is not opting out
        let mut p = pod();
        p["metadata"]["labels"][INJECT_LABEL] = "true".into();
        assert_eq!(inject(&mut p, &Settings::default()).unwrap(), None);
    }

    #[test]
    fn clashes_and_malformed_fields_are_errors_naming_the_field() {
        let cases: [(&str, Value, &str); 11] = [
            (
                "/spec/volumes/0/name",
                json!("detour-token"),
                "spec.volumes[0].name",
            ),
            (
                "/spec/containers/0/name",
                json!("detour"),
                "spec.containers[0].name",
            ),
            (
                "/spec/ephemeralContainers",
                json!([{"name": "detour"}]),
                "spec.ephemeralContainers[0].name",
            ),
            (
                "/spec/containers/0/ports/0/containerPort",
                json!(9901),
                "spec.containers[0].ports[0].containerPort",
            ),
            (
                "/spec/initContainers/0/ports",
                json!([{"name": "detour-admin", "containerPort": 1}]),
                "spec.initContainers[0].ports[0].name",
            ),
            (
                "/spec/initContainers",
                json!({"name": "x"}),
                "spec.initContainers",
            ),
            ("/spec/volumes", json!(["data"]), "spec.volumes[0]"),
            (
                "/spec/containers/0/name",
                json!(7),
                "spec.containers[0].name",
            ),
            ("/metadata/labels", json!(["app"]), "metadata.labels"),
            ("/metadata/labels/app", json!(1), "metadata.labels.app"),
            ("/spec", json!("none"), "spec"),
        ];
        for (at, value, field) in cases {
            let mut p = pod();
            set(&mut p, at, value);
            let before = p.clone();
            let err = inject(&mut p, &Settings::default()).unwrap_err();
            assert!(
                matches!(err, Error::Malformed { .. } | Error::Conflict { .. }),
                "{err:?}"
            );
            assert!(
                err.to_string().starts_with(&format!("{field}: ")),
                "{at}: {err}"
            );
            assert_eq!(p, before, "{at}");
        }
        // the admin port over UDP does not clash; a missing spec does
        let mut p = pod();
        p["spec"]["containers"][0]["ports"] = json!([{"containerPort": 9901, "protocol": "UDP"}]);
        assert_eq!(inject(&mut p, &Settings::default()).unwrap(), None);
        let err = inject_pod(&mut json!({}), &mut Value::Null, &Settings::default()).unwrap_err();
        assert!(err.to_string().starts_with("spec: missing"), "{err}");
    }

    fn ops(patch: &Patch) -> Vec<(String, String)> {
        let v = serde_json::to_value(patch).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|op| {
                (
                    op["op"].as_str().unwrap().to_owned(),
                    op["path"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn the_patch_inserts_what_inject_pod_adds() {
        let s = Settings::default();
        let original = pod();
        let (patch, skip) = pod_patch(&original, &s).unwrap();
        assert_eq!(skip, None);
        assert_eq!(
            ops(&patch),
            [
                ("add", "/metadata/labels/detour.dev~1sidecar"),
                ("add", "/spec/initContainers/0"),
                ("add", "/spec/volumes/1"),
                ("add", "/spec/volumes/2"),
            ]
            .map(|(o, p)| (o.to_owned(), p.to_owned()))
        );
        let mut patched = original.clone();
        json_patch::patch(&mut patched, &patch).unwrap();
        let mut injected = original.clone();
        inject(&mut injected, &s).unwrap();
        assert_eq!(patched, injected);

        // a pod with none of the lists or labels gets them whole
        let bare = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": "x"}]}});
        let (patch, _) = pod_patch(&bare, &s).unwrap();
        assert_eq!(
            ops(&patch),
            [
                ("add", "/metadata/labels"),
                ("add", "/spec/initContainers"),
                ("add", "/spec/volumes")
            ]
            .map(|(o, p)| (o.to_owned(), p.to_owned()))
        );
        // skipped: empty patch; not a pod: error
        let mut done = pod();
        inject(&mut done, &s).unwrap();
        assert_eq!(
            pod_patch(&done, &s).unwrap(),
            (Patch(Vec::new()), Some(Skip::AlreadyInjected))
        );
        assert!(pod_patch(&json!([1]), &s).is_err());
        assert!(pod_patch(&json!({"metadata": {}}), &s)
            .unwrap_err()
            .to_string()
            .starts_with("spec: missing"));
    }

    #[test]
    fn diff_adds_to_either_end_and_replaces_anything_else() {
        let patch_of = |old: Value, new: Value| {
            let mut ops = Vec::new();
            diff(&old, &new, &mut PointerBuf::new(), &mut ops);
            let mut applied = old.clone();
            json_patch::patch(&mut applied, &ops).unwrap();
            assert_eq!(applied, new);
            self::ops(&Patch(ops))
        };
        let o = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            patch_of(json!({"a": [1, 2]}), json!({"a": [7, 8, 1, 2]})),
            o(&[("add", "/a/0"), ("add", "/a/1")])
        );
        assert_eq!(
            patch_of(json!({"a": [1, 2]}), json!({"a": [1, 2, 3]})),
            o(&[("add", "/a/2")])
        );
        // two separate insertions: one replace
        assert_eq!(
            patch_of(json!({"a": [1, 2]}), json!({"a": [0, 1, 2, 3]})),
            o(&[("replace", "/a")])
        );
        assert_eq!(
            patch_of(json!({"a": [1, 2]}), json!({"a": [1, 9, 2]})),
            o(&[("add", "/a/1")])
        );
        assert_eq!(
            patch_of(json!({"a": [1, 2]}), json!({"a": [2, 1]})),
            o(&[("replace", "/a")])
        );
        assert_eq!(
            patch_of(json!({"a": [1, 2]}), json!({"a": [1]})),
            o(&[("replace", "/a")])
        );
        assert_eq!(
            patch_of(json!({"a": 1, "b": 2}), json!({"b": 3, "c/~": 4})),
            o(&[("remove", "/a"), ("replace", "/b"), ("add", "/c~1~0")])
        );
        assert_eq!(
            patch_of(json!({"a": {"x": 1}}), json!({"a": {"x": 1}})),
            o(&[])
        );
    }
}
