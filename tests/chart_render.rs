//! The Helm chart (charts/detour) rendered by the real Helm v4 engine (PyPI helm-python-sdk,
//! through scripts/helm-chart.py), for the defaults and the value sets users pick: every
//! manifest validated strictly with kubernetes-validate, the Prometheus Operator objects with
//! the npm @kubernetes-models/prometheus-operator models, the operator flags checked against the
//! binary, and a wrong-typed values file refused. Without the tools the tests skip with a notice,
//! unless `CI=true` (`.ci/test` installs them), where they fail.

#[path = "support/validate.rs"]
mod validate;
#[path = "support/webhooks.rs"]
mod webhooks;
#[path = "support/yaml.rs"]
mod yaml;

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use serde_json::{json, Value};

const NS: &str = "detour-system";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> String {
    root().join("charts/detour").display().to_string()
}

/// Where `.ci/test` installs the npm models (a project-local dir under target/).
fn models_dir() -> PathBuf {
    root().join("target/tools/npm/node_modules/@kubernetes-models/prometheus-operator")
}

/// helm-python-sdk, node with the models, and kubernetes-validate can run here.
fn tools_available(test: &str) -> bool {
    if !validate::available(test) {
        return false;
    }
    let helm = Command::new("python3")
        .args(["-c", "import helm_python"])
        .output()
        .is_ok_and(|o| o.status.success());
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if helm && node && models_dir().join("package.json").exists() {
        return true;
    }
    let msg = "python3 with helm-python-sdk==0.2.2, node and npm \
               @kubernetes-models/prometheus-operator@6.0.0 in target/tools/npm \
               must be installed for this test (`bash .ci/test` installs them)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED {test}: {msg}");
    false
}

fn helper(args: &[&str], values: &[&str]) -> Output {
    let dir = tempfile_dir();
    let mut cmd = Command::new("python3");
    cmd.arg(root().join("scripts/helm-chart.py")).args(args);
    for (i, v) in values.iter().enumerate() {
        let path = dir.join(format!("values-{i}.yaml"));
        std::fs::write(&path, v).unwrap();
        cmd.arg(path);
    }
    let out = cmd.output().expect("python3");
    let _ = std::fs::remove_dir_all(dir);
    out
}

fn tempfile_dir() -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "detour-chart-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The rendered manifests (YAML text) for `values` layered over the defaults.
fn render_yaml(values: &[&str]) -> String {
    let out = helper(&["render", &chart(), NS], values);
    assert!(
        out.status.success(),
        "render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

struct Rendered {
    yaml: String,
    docs: Vec<Value>,
}

impl Rendered {
    fn new(values: &[&str]) -> Self {
        let yaml = render_yaml(values);
        let docs = validate::read_as_yaml_1_1(&yaml);
        Rendered { yaml, docs }
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let found = self.all(kind);
        assert_eq!(found.len(), 1, "one {kind} expected in:\n{}", self.yaml);
        found[0]
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.all(kind)
            .into_iter()
            .find(|d| d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in:\n{}", self.yaml))
    }

    fn container(&self) -> &Value {
        &self.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    }

    fn args(&self) -> Vec<String> {
        self.container()["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    }

    fn arg(&self, flag: &str) -> Option<String> {
        let prefix = format!("{flag}=");
        self.args()
            .iter()
            .find_map(|a| a.strip_prefix(&prefix).map(str::to_string))
    }

    /// Every manifest: the built-in kinds strictly with kubernetes-validate, the Prometheus
    /// Operator's with its models. cert-manager objects have no schema here: checked by fields.
    fn validate(&self) {
        let (monitoring, core): (Vec<&Value>, Vec<&Value>) = self
            .docs
            .iter()
            .filter(|d| {
                !d["apiVersion"]
                    .as_str()
                    .unwrap()
                    .starts_with("cert-manager.io/")
            })
            .partition(|d| {
                d["apiVersion"]
                    .as_str()
                    .unwrap()
                    .starts_with("monitoring.coreos.com/")
            });
        let core_yaml: String = core
            .iter()
            .map(|d| format!("---\n{}", yaml::to_string(d)))
            .collect();
        validate::assert_strict(&core_yaml);
        if !monitoring.is_empty() {
            validate_prometheus_operator(&monitoring).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

fn validate_prometheus_operator(objects: &[&Value]) -> Result<String, String> {
    let out = validate::output_with_stdin(
        Command::new("node")
            .arg(root().join("scripts/validate-prometheus-operator.js"))
            .arg(models_dir()),
        &serde_json::to_string(objects).unwrap(),
    );
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() && report.matches("valid ").count() == objects.len() {
        Ok(report)
    } else {
        Err(report)
    }
}

const MONITORING: &str = "
monitoring:
  podMonitor: {enabled: true, labels: {release: kube-prometheus-stack}}
  serviceMonitor: {enabled: true, labels: {release: kube-prometheus-stack}}
  prometheusRule: {enabled: true, labels: {release: kube-prometheus-stack}}
  dashboard: {enabled: true, folder: detour}
";
const CERT_MANAGER: &str = "
webhook:
  certManager: {enabled: true}
  failurePolicy: Ignore
  timeoutSeconds: 10
";
const ONE_REPLICA: &str = "
replicaCount: 1
sidecar:
  image: registry.example/detour:dev
  resources: {limits: {cpu: 500m, memory: 256Mi}}
  adminPort: 9911
  logFormat: text
";

/// The webhooks the chart must render: the ones tests/inject_webhook.rs runs the operator with.
fn expected_webhooks(failure_policy: &str, timeout: u64) -> Value {
    webhooks::injector_webhooks(NS, failure_policy, timeout)
}

#[test]
fn defaults_render_a_valid_ha_operator_with_its_webhook() {
    if !tools_available("defaults_render_a_valid_ha_operator_with_its_webhook") {
        return;
    }
    let r = Rendered::new(&[]);
    r.validate();

    let deploy = r.one("Deployment");
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pdb = r.one("PodDisruptionBudget");
    assert_eq!(
        pdb["spec"]["selector"], deploy["spec"]["selector"],
        "the PDB covers the operator's pods"
    );
    let pod = &deploy["spec"]["template"]["spec"];
    let anti = &pod["affinity"]["podAntiAffinity"]
        ["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(
        anti["labelSelector"]["matchLabels"],
        deploy["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(pod["serviceAccountName"], "detour-operator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );

    let c = r.container();
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/live");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "admin");
    let port = |name: &str| {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("container port {name}"))["containerPort"]
            .clone()
    };
    assert_eq!(port("admin"), 9902);
    assert_eq!(port("webhook"), 9443);
    assert_eq!(r.arg("--admin").as_deref(), Some("0.0.0.0:9902"));
    assert_eq!(r.arg("--webhook-addr").as_deref(), Some("0.0.0.0:9443"));
    assert!(c["resources"]["requests"]["memory"].is_string());
    for (env, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let e = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == env)
            .unwrap_or_else(|| panic!("env {env}"));
        assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], field);
    }
    assert_eq!(r.arg("--leader-election").as_deref(), Some("true"));
    assert_eq!(r.arg("--webhook-cert-source").as_deref(), Some("operator"));
    assert_eq!(r.arg("--sidecar-admin-port").as_deref(), Some("9901"));
    // The chart's appVersion is this build's version: the default image is the one
    // `detour operator` would inject without the flag.
    let image = format!("ghcr.io/detour-dev/detour:{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(c["image"], image);
    assert_eq!(r.arg("--sidecar-image"), Some(image));
    assert_eq!(
        r.arg("--sidecar-cpu-limit"),
        None,
        "no CPU limit by default"
    );

    // The webhook: the configuration the operator's tests run with, without a caBundle (the
    // operator's leader keeps it), behind a Service 443 -> the named webhook port.
    let mwc = r.named("MutatingWebhookConfiguration", webhooks::WEBHOOK_CONFIG);
    assert_eq!(mwc["webhooks"], expected_webhooks("Fail", 5));
    assert!(mwc["metadata"]["annotations"].is_null());
    let svc = r.named("Service", webhooks::WEBHOOK_SERVICE);
    assert_eq!(
        svc["spec"]["ports"],
        json!([{"name": "https", "port": 443, "targetPort": "webhook", "protocol": "TCP"}])
    );
    assert_eq!(
        svc["spec"]["selector"],
        deploy["spec"]["selector"]["matchLabels"]
    );
    let metrics = r.named("Service", "detour-metrics");
    assert_eq!(metrics["spec"]["ports"][0]["port"], 9902);
    assert_eq!(metrics["spec"]["ports"][0]["targetPort"], "admin");
    assert_eq!(
        r.arg("--webhook-service").as_deref(),
        Some(webhooks::WEBHOOK_SERVICE)
    );
    assert_eq!(
        r.arg("--webhook-config").as_deref(),
        Some(webhooks::WEBHOOK_CONFIG)
    );

    for kind in [
        "PodMonitor",
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
        "Certificate",
        "Issuer",
    ] {
        assert!(r.all(kind).is_empty(), "{kind} is off by default");
    }
}

/// Every flag the chart passes is one `detour operator` accepts (its --help lists it).
#[test]
fn every_flag_the_chart_passes_is_an_operator_flag() {
    if !tools_available("every_flag_the_chart_passes_is_an_operator_flag") {
        return;
    }
    let help = Command::new(env!("CARGO_BIN_EXE_detour"))
        .args(["operator", "--help"])
        .output()
        .expect("detour operator --help");
    let help = String::from_utf8(help.stdout).unwrap();
    for values in [&[][..], &[MONITORING, CERT_MANAGER, ONE_REPLICA][..]] {
        let r = Rendered::new(values);
        let args = r.args();
        assert_eq!(args[0], "operator");
        for a in &args[1..] {
            let flag = a.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}=")),
                "{flag} is not a flag of detour operator:\n{help}"
            );
        }
    }
}

#[test]
fn monitoring_on_renders_monitors_rules_and_dashboard_the_prometheus_operator_accepts() {
    if !tools_available("monitoring_on_renders_monitors_rules_and_dashboard") {
        return;
    }
    let r = Rendered::new(&[MONITORING]);
    r.validate();

    let pm = r.one("PodMonitor");
    assert_eq!(pm["metadata"]["labels"]["release"], "kube-prometheus-stack");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "detour-admin");
    assert_eq!(
        pm["spec"]["selector"]["matchExpressions"],
        json!([{"key": "detour.dev/sidecar", "operator": "Exists"}])
    );
    assert_eq!(pm["spec"]["namespaceSelector"]["any"], true);

    // The ServiceMonitor selects the metrics Service (and not the webhook's).
    let sm = r.one("ServiceMonitor");
    assert_eq!(sm["metadata"]["labels"]["release"], "kube-prometheus-stack");
    let selector = sm["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let selects = |svc: &Value| {
        selector
            .iter()
            .all(|(k, v)| &svc["metadata"]["labels"][k] == v)
    };
    assert!(selects(r.named("Service", "detour-metrics")));
    assert!(!selects(r.named("Service", webhooks::WEBHOOK_SERVICE)));
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "admin");

    // The rules file as it is: Prometheus templates survive (.Files.Get, not tpl).
    let rule = r.one("PrometheusRule");
    let rules_file =
        std::fs::read_to_string(root().join("charts/detour/rules/detour-rules.yaml")).unwrap();
    let file_groups = &validate::read_as_yaml_1_1(&rules_file)[0]["groups"];
    assert_eq!(&rule["spec"]["groups"], file_groups);
    assert!(rules_file.contains("{{ $labels"), "the file has templates");
    assert!(r.yaml.contains("{{ $labels"));

    let cm = r.named("ConfigMap", "detour-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "detour");
    let dashboard =
        std::fs::read_to_string(root().join("charts/detour/dashboards/detour.json")).unwrap();
    assert_eq!(
        cm["data"]["detour.json"].as_str().unwrap(),
        dashboard.trim_end()
    );

    // The models refuse what the Prometheus Operator refuses (not a test that cannot fail).
    let mut bad = pm.clone();
    bad["spec"]["podMetricsEndpoints"][0]["port"] = json!(9901);
    let report = validate_prometheus_operator(&[&bad]).expect_err("a numeric port name");
    assert!(report.contains("port"), "{report}");

    // Another label for Grafana's sidecar.
    let r = Rendered::new(&[
        MONITORING,
        "monitoring: {dashboard: {label: dashboards, labelValue: detour}}",
    ]);
    let cm = r.named("ConfigMap", "detour-dashboard");
    assert_eq!(cm["metadata"]["labels"]["dashboards"], "detour");
    assert!(cm["metadata"]["labels"]["grafana_dashboard"].is_null());
}

#[test]
fn cert_manager_issues_the_certificate_and_injects_the_ca() {
    if !tools_available("cert_manager_issues_the_certificate_and_injects_the_ca") {
        return;
    }
    let r = Rendered::new(&[CERT_MANAGER]);
    r.validate();
    assert_eq!(
        r.arg("--webhook-cert-source").as_deref(),
        Some("cert-manager")
    );
    let cert = r.one("Certificate");
    assert_eq!(
        Some(cert["spec"]["secretName"].as_str().unwrap().to_string()),
        r.arg("--webhook-secret")
    );
    assert!(cert["spec"]["dnsNames"]
        .as_array()
        .unwrap()
        .contains(&json!("detour-webhook.detour-system.svc")));
    // The operator only reads the Secret and leaves the caBundle alone: no grant for either.
    let cluster_role = serde_json::to_string(r.one("ClusterRole")).unwrap();
    assert!(
        !cluster_role.contains("mutatingwebhookconfigurations"),
        "{cluster_role}"
    );
    let secrets = r.one("Role")["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|rule| rule["resources"] == json!(["secrets"]))
        .expect("a rule for the Secret");
    assert_eq!(secrets["verbs"], json!(["get", "list", "watch"]));
    assert_eq!(secrets["resourceNames"], json!([webhooks::WEBHOOK_SECRET]));
    let issuer = r.one("Issuer");
    assert_eq!(
        cert["spec"]["issuerRef"]["name"],
        issuer["metadata"]["name"]
    );
    let mwc = r.one("MutatingWebhookConfiguration");
    assert_eq!(
        mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        format!("{NS}/{}", cert["metadata"]["name"].as_str().unwrap())
    );
    assert_eq!(mwc["webhooks"], expected_webhooks("Ignore", 10));

    // An existing issuer: no Issuer of the chart's own.
    let r = Rendered::new(&[
        CERT_MANAGER,
        "webhook: {certManager: {issuerRef: {name: corp-ca, kind: ClusterIssuer}}}",
    ]);
    assert!(r.all("Issuer").is_empty());
    assert_eq!(
        r.one("Certificate")["spec"]["issuerRef"],
        json!({"name": "corp-ca", "kind": "ClusterIssuer"})
    );
}

#[test]
fn one_replica_has_no_disruption_budget_and_its_sidecar_values_become_flags() {
    if !tools_available("one_replica_has_no_disruption_budget") {
        return;
    }
    let r = Rendered::new(&[ONE_REPLICA]);
    r.validate();
    assert_eq!(r.one("Deployment")["spec"]["replicas"], 1);
    assert!(r.all("PodDisruptionBudget").is_empty());
    for (flag, want) in [
        ("--sidecar-image", "registry.example/detour:dev"),
        ("--sidecar-cpu-request", "50m"),
        ("--sidecar-cpu-limit", "500m"),
        ("--sidecar-memory-limit", "256Mi"),
        ("--sidecar-admin-port", "9911"),
        ("--sidecar-log-format", "text"),
    ] {
        assert_eq!(r.arg(flag).as_deref(), Some(want), "{flag}");
    }
}

#[test]
fn lint_passes_and_wrong_values_are_refused() {
    if !tools_available("lint_passes_and_wrong_values_are_refused") {
        return;
    }
    for values in [&[][..], &[MONITORING, CERT_MANAGER, ONE_REPLICA][..]] {
        let out = helper(&["lint", &chart(), NS], values);
        assert!(
            out.status.success(),
            "lint: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (values, complaint) in [
        ("replicaCount: two", "/replicaCount"),
        ("replicaCount: \"2\"", "/replicaCount"),
        ("replicas: 2", "replicas"),
        (
            "webhook: {failurePolicy: Sometimes}",
            "/webhook/failurePolicy",
        ),
        ("webhook: {timeoutSeconds: 60}", "/webhook/timeoutSeconds"),
        ("sidecar: {adminPort: 70000}", "/sidecar/adminPort"),
        (
            "monitoring: {podMonitor: {enabled: \"yes\"}}",
            "/monitoring/podMonitor/enabled",
        ),
        ("operator: {debounce: soon}", "/operator/debounce"),
        ("sidecar: {resources: {limit: {cpu: 1}}}", "limit"),
    ] {
        let out = helper(&["render", &chart(), NS], &[values]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{values} was accepted");
        assert!(err.contains(complaint), "{values}: {err}");
    }
}

/// `.helmignore` keeps the rules' promtool tests out of the package.
#[test]
fn the_package_leaves_out_the_rules_tests() {
    if !tools_available("the_package_leaves_out_the_rules_tests") {
        return;
    }
    let out = helper(&["files", &chart()], &[]);
    assert!(out.status.success());
    let files = String::from_utf8(out.stdout).unwrap();
    assert!(files.contains("rules/detour-rules.yaml"), "{files}");
    assert!(files.contains("dashboards/detour.json"), "{files}");
    assert!(!files.contains("rules/tests/"), "{files}");
}
