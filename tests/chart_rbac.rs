//! The RBAC the chart renders against the API calls the operator makes: two replicas (leader
//! election, the webhook with its own certificate renewed several times) run a policy's whole
//! life on the in-memory API server, which logs every request. Every call is granted by the
//! chart's ClusterRole or its Role (with their resourceNames and namespace), and every verb the
//! chart grants was used, but for the ones documented as needed to grant the sidecars theirs.
//! Needs the chart tools of tests/chart_render.rs (skips with a notice without them, unless CI).

mod support;

use std::{collections::BTreeSet, path::PathBuf, process::Command, time::Duration};

use detour::operator::{Operator, Options};
use serde_json::{json, Value};
use support::{webhooks::*, *};

const SYSTEM: &str = "detour-system";
const T: Duration = Duration::from_secs(30);

/// Granted without the operator calling them itself: the sidecars' Role gets `get` and `watch`
/// on `detour-config`, and Kubernetes lets the operator grant only what it holds
/// (docs/operator.md, "Permissions").
const GRANTED_FOR_SIDECARS: [(&str, &str, &str); 2] =
    [("get", "", "configmaps"), ("watch", "", "configmaps")];

/// One API call: (verb, API group, resource[/subresource], namespace, name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    verb: String,
    group: String,
    resource: String,
    namespace: String,
    name: String,
}

/// The request a logged HTTP call is, as the API server's authorizer sees it.
fn call(method: &str, path: &str, query: &str) -> Call {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segs[0] {
        "api" => (String::new(), &segs[2..]),
        "apis" => (segs[1].to_string(), &segs[3..]),
        other => panic!("not an API path: {other} in {path}"),
    };
    let (namespace, rest) = if rest.len() >= 3 && rest[0] == "namespaces" {
        (rest[1].to_string(), &rest[2..])
    } else {
        (String::new(), rest)
    };
    let resource = match rest.get(2) {
        Some(sub) => format!("{}/{sub}", rest[0]),
        None => rest[0].to_string(),
    };
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    // A list or watch selecting one name by field is authorized as a request for that name
    // (which is how resourceNames can hold for them).
    let field_name = query.split('&').find_map(|kv| {
        let selector = kv.strip_prefix("fieldSelector=")?;
        let selector = selector.replace("%3D", "=").replace("%3d", "=");
        selector.strip_prefix("metadata.name=").map(str::to_string)
    });
    let name = match rest.get(1) {
        Some(n) => n.to_string(),
        None => field_name.unwrap_or_default(),
    };
    let verb = match (method, rest.get(1).is_none()) {
        ("GET", false) => "get",
        ("GET", true) if watch => "watch",
        ("GET", true) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", false) => "delete",
        ("DELETE", true) => "deletecollection",
        (m, _) => panic!("method {m}"),
    };
    Call {
        verb: verb.into(),
        group,
        resource,
        namespace,
        name,
    }
}

struct Rule {
    namespace: Option<String>,
    groups: Vec<String>,
    resources: Vec<String>,
    names: Vec<String>,
    verbs: Vec<String>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

impl Rule {
    fn allows(&self, c: &Call) -> bool {
        self.namespace.as_ref().is_none_or(|ns| *ns == c.namespace)
            && self.groups.contains(&c.group)
            && self.resources.contains(&c.resource)
            && self.verbs.contains(&c.verb)
            && (self.names.is_empty() || self.names.contains(&c.name))
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The chart's default manifests as JSON, or `None` (with a notice) without helm-python-sdk.
fn render_chart() -> Option<Vec<Value>> {
    let helm = Command::new("python3")
        .args(["-c", "import helm_python, yaml"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !helm {
        let msg = "python3 with helm-python-sdk==0.2.2 and PyYAML must be installed for this \
                   test (`bash .ci/test` installs them)";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED the_chart_grants_exactly_the_calls_the_operator_makes: {msg}");
        return None;
    }
    let script = "import sys, json, subprocess, yaml\n\
                  out = subprocess.run([sys.executable, sys.argv[1], 'render', sys.argv[2], sys.argv[3]],\n\
                  \x20   check=True, capture_output=True, text=True).stdout\n\
                  print(json.dumps([d for d in yaml.safe_load_all(out) if d]))";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(root().join("scripts/helm-chart.py"))
        .arg(root().join("charts/detour"))
        .arg(SYSTEM)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

fn rules(docs: &[Value]) -> Vec<Rule> {
    let mut rules = Vec::new();
    for d in docs {
        let namespace = match d["kind"].as_str() {
            Some("ClusterRole") => None,
            Some("Role") => Some(d["metadata"]["namespace"].as_str().unwrap().to_string()),
            _ => continue,
        };
        for r in d["rules"].as_array().unwrap() {
            rules.push(Rule {
                namespace: namespace.clone(),
                groups: strings(&r["apiGroups"]),
                resources: strings(&r["resources"]),
                names: strings(&r["resourceNames"]),
                verbs: strings(&r["verbs"]),
            });
        }
    }
    rules
}

fn replica(identity: &str) -> Options {
    Options {
        report_interval: Duration::from_millis(200),
        leader_election: Some(lease(SYSTEM, identity)),
        // renewed about every second
        webhook: Some(webhooks::chart_webhook(
            SYSTEM,
            Duration::from_secs(3),
            Duration::from_secs(2),
        )),
        ..operator_options()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_grants_exactly_the_calls_the_operator_makes() {
    let Some(docs) = render_chart() else {
        return;
    };
    let rules = rules(&docs);
    assert!(!rules.is_empty(), "no Role or ClusterRole rendered");

    let server = ApiServer::new();
    for d in &docs {
        if d["kind"] == "MutatingWebhookConfiguration" {
            server.put(d.clone());
        }
    }
    server.put(service("shop", "pay", &[("http", 80)]));
    let endpoints = |ready: bool| {
        slice(
            "shop",
            "pay-abc",
            "pay",
            "http",
            8080,
            &[
                ("10.0.0.1", ready, true, !ready),
                ("10.0.0.2", true, true, false),
            ],
        )
    };
    server.put(endpoints(true));
    server.put(policy("shop", "pay", "pay", json!("http"), 18080));
    // A policy whose Service is missing: a warning event, repeated below (a series: patched).
    server.put(policy("shop", "ghost", "nope", json!(80), 18081));
    // A sidecar pod (nothing listens on its admin port: the scrape fails, as with a real one
    // not yet started).
    server.put(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": "shop",
                     "labels": {"app": "web", "detour.dev/sidecar": "true"}},
        "spec": {"containers": [{"name": "detour", "image": "detour:1",
                 "ports": [{"name": "detour-admin", "containerPort": 1, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1"},
    }));

    let a = Operator::start(server.client(), replica("a"))
        .await
        .unwrap();
    let b = Operator::start(server.client(), replica("b"))
        .await
        .unwrap();
    eventually(T, "detour-config, its Role and RoleBinding", || {
        (server.get(CONFIG_MAPS, "shop", "detour-config").is_some()
            && server
                .get(
                    "rbac.authorization.k8s.io/v1/roles",
                    "shop",
                    "detour-sidecar",
                )
                .is_some()
            && server
                .get(
                    "rbac.authorization.k8s.io/v1/rolebindings",
                    "shop",
                    "detour-sidecar",
                )
                .is_some())
        .then_some(())
    })
    .await;
    eventually(T, "the status and an event", || {
        let p = server.get(POLICIES, "shop", "pay")?;
        (p["status"]["configHash"].is_string()
            && !server.list("events.k8s.io/v1/events").is_empty())
        .then_some(())
    })
    .await;
    let mut certs = BTreeSet::new();
    eventually(
        T,
        "the certificate renewed twice, both replicas serving",
        || {
            if let Some(s) = server.get("v1/secrets", SYSTEM, WEBHOOK_SECRET) {
                certs.insert(s["data"]["tls.crt"].to_string());
            }
            (certs.len() >= 3 && a.is_ready() && b.is_ready()).then_some(())
        },
    )
    .await;
    // The Service appears, then goes: the same warning again.
    let server_ref = &server;
    let resolved = |ready: &'static str| {
        move || {
            let p = server_ref.get(POLICIES, "shop", "ghost")?;
            (condition(&p, "ResolvedRefs").map(|c| c.0).as_deref() == Some(ready)).then_some(())
        }
    };
    eventually(T, "ghost unresolved", resolved("False")).await;
    server.put(service("shop", "nope", &[("http", 80)]));
    eventually(T, "ghost resolved", resolved("True")).await;
    assert!(server.delete(SERVICES, "shop", "nope"));
    eventually(T, "the repeated warning patched as a series", || {
        server
            .requests()
            .iter()
            .any(|r| r.method == "PATCH" && r.path.contains("/events/"))
            .then_some(())
    })
    .await;
    server.put(endpoints(false));
    assert!(server.delete(POLICIES, "shop", "ghost"));
    assert!(server.delete(POLICIES, "shop", "pay"));
    eventually(T, "the policy's config and grants removed", || {
        (server.get(CONFIG_MAPS, "shop", "detour-config").is_none()
            && server.get(POLICIES, "shop", "pay").is_none()
            && server.get(POLICIES, "shop", "ghost").is_none()
            && server
                .get(
                    "rbac.authorization.k8s.io/v1/roles",
                    "shop",
                    "detour-sidecar",
                )
                .is_none())
        .then_some(())
    })
    .await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();

    let calls: BTreeSet<Call> = server
        .requests()
        .iter()
        .map(|r| call(r.method.as_str(), &r.path, &r.query))
        .collect();
    let denied: Vec<&Call> = calls
        .iter()
        .filter(|c| !rules.iter().any(|r| r.allows(c)))
        .collect();
    assert!(
        denied.is_empty(),
        "calls the chart does not grant: {denied:#?}"
    );

    let used: BTreeSet<(String, String, String)> = calls
        .iter()
        .map(|c| (c.verb.clone(), c.group.clone(), c.resource.clone()))
        .collect();
    let mut unused = Vec::new();
    for r in &rules {
        for g in &r.groups {
            for res in &r.resources {
                for v in &r.verbs {
                    let key = (v.clone(), g.clone(), res.clone());
                    let documented = GRANTED_FOR_SIDECARS.iter().any(|(v2, g2, r2)| {
                        (*v2, *g2, *r2) == (v.as_str(), g.as_str(), res.as_str())
                    });
                    if !used.contains(&key) && !documented {
                        unused.push(key);
                    }
                }
            }
        }
    }
    eprintln!("{} distinct calls: {used:#?}", calls.len());
    assert!(unused.is_empty(), "granted but never used: {unused:#?}");
}
