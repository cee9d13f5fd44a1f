//! The CRD as users get it: `detour crd`, the committed YAML, and (with kubernetes-validate
//! installed) validation of the CRD and of sample policies against its schema.

use std::process::Command;

const CRD: &str = "crds/upstreampolicies.detour.dev.yaml";
const CHART_CRD: &str = "charts/detour/crds/upstreampolicies.detour.dev.yaml";

fn root() -> &'static str {
    env!("CARGO_MANIFEST_DIR")
}

#[test]
fn detour_crd_prints_the_committed_yaml() {
    let out = Command::new(env!("CARGO_BIN_EXE_detour"))
        .arg("crd")
        .output()
        .expect("run detour crd");
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    for path in [CRD, CHART_CRD] {
        let committed = std::fs::read_to_string(format!("{}/{path}", root())).unwrap();
        assert!(
            printed == committed,
            "{path} is stale: run `cargo run -q -- crd > {path}`"
        );
    }
}

/// `kubernetes-validate` (with the python-jsonschema and PyYAML it brings) works here. Without
/// it the test fails when `CI=true` (`.ci/test` installs it) and skips with a notice otherwise.
fn kubernetes_validate_available() -> bool {
    let works = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works("kubernetes-validate", &["--version"])
        && works("python3", &["-c", "import jsonschema, yaml"])
    {
        return true;
    }
    let msg = "kubernetes-validate and python3 must be available for this test \
               (`python3 -m pip install kubernetes-validate==1.37.0`; `bash .ci/test` installs it)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED crd_passes_kubernetes_validate: {msg}");
    false
}

/// Runs offline.
#[test]
fn crd_passes_kubernetes_validate_and_its_schema_refuses_bad_policies() {
    if !kubernetes_validate_available() {
        return;
    }
    for path in [CRD, CHART_CRD] {
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "-k", "1.33.0"])
            .arg(format!("{}/{path}", root()))
            .output()
            .expect("kubernetes-validate on PATH");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("passed"), "{text}");
    }
    // The openAPIV3Schema as JSON Schema (python-jsonschema comes with kubernetes-validate):
    // bounds, patterns and enums refuse bad input and name the field. CEL rules need a real API
    // server (tests/operator_cluster.rs).
    let script = r#"
import sys, json, yaml, jsonschema
crd = yaml.safe_load(open(sys.argv[1]))
schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
v = jsonschema.Draft7Validator(schema)
def policy(**spec):
    base = {"upstream": {"service": "pay", "port": "http"}, "listener": {"port": 18080}}
    base.update(spec)
    return {"apiVersion": "detour.dev/v1alpha1", "kind": "UpstreamPolicy", "metadata": {"name": "p"}, "spec": base}
cases = {
    "ok": policy(retries={"attempts": 3, "perTryTimeout": "250ms"}, timeouts={"request": "5s"}),
    "spec.retries.attempts": policy(retries={"attempts": 11}),
    "spec.retries.perTryTimeout": policy(retries={"perTryTimeout": "5 seconds"}),
    "spec.listener.port": policy(listener={"port": 80}),
    "spec.healthCheck.healthyThreshold": policy(healthCheck={"healthyThreshold": 0}),
    "spec.outlierDetection.maxEjectionPercent": policy(outlierDetection={"maxEjectionPercent": 101}),
    "spec.healthCheck.protocol": policy(healthCheck={"protocol": "grpc"}),
    "spec.upstream.service": policy(upstream={"service": "Pay_Svc", "port": 80}),
    "spec.panicThreshold": policy(panicThreshold=150),
}
for want, doc in cases.items():
    errs = list(v.iter_errors(doc))
    paths = [".".join(str(p) for p in e.absolute_path) for e in errs]
    if want == "ok":
        assert not errs, [e.message for e in errs]
    else:
        assert want in paths, (want, paths)
    print(want, "->", paths)
"#;
    let out = Command::new("python3")
        .args(["-c", script, &format!("{}/{CRD}", root())])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The CEL rules in the CRD, evaluated offline with kube's client-side CEL (schema defaults
/// applied first, as the API server does), agree with the Rust validation of config files.
#[test]
fn cel_rules_refuse_what_rust_validation_refuses() {
    use detour::{api::UpstreamPolicySpec, config::FieldErrors};
    use kube::core::cel::Validator;
    use serde_json::{json, Value};

    let crd = serde_json::to_value(detour::api::crd()).unwrap();
    let schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    let doc = |spec: Value| -> Value {
        let mut base =
            json!({"upstream": {"service": "pay", "port": 80}, "listener": {"port": 18080}});
        for (k, v) in spec.as_object().unwrap() {
            base[k] = v.clone();
        }
        json!({"apiVersion": "detour.dev/v1alpha1", "kind": "UpstreamPolicy", "metadata": {"name": "p"}, "spec": base})
    };
    let cases = [
        (json!({}), None),
        (
            json!({"retries": {"perTryTimeout": "250ms"}, "timeouts": {"request": "1s"}}),
            None,
        ),
        (
            json!({"retries": {"perTryTimeout": "20s"}}),
            Some((
                "retries.perTryTimeout",
                "retries.perTryTimeout must not exceed timeouts.request",
            )),
        ),
        (
            json!({"healthCheck": {"timeout": "3s"}}),
            Some(("healthCheck.timeout", "timeout must not exceed interval")),
        ),
        (
            json!({"outlierDetection": {"baseEjectionTime": "10m"}}),
            Some((
                "outlierDetection.baseEjectionTime",
                "baseEjectionTime must not exceed maxEjectionTime",
            )),
        ),
        (
            json!({"timeouts": {"connect": "20s"}}),
            Some(("timeouts.connect", "connect must not exceed request")),
        ),
        // `0s` matches the duration pattern; where Rust wants more, so does CEL.
        (
            json!({"healthCheck": {"interval": "0s", "timeout": "0s"}}),
            Some(("healthCheck.interval", "interval must be greater than 0s")),
        ),
        (
            json!({"outlierDetection": {"baseEjectionTime": "0s"}}),
            Some((
                "outlierDetection.baseEjectionTime",
                "baseEjectionTime must be greater than 0s",
            )),
        ),
        (
            json!({"retries": {"perTryTimeout": "0s"}}),
            Some((
                "retries.perTryTimeout",
                "perTryTimeout must be greater than 0s",
            )),
        ),
        (
            json!({"timeouts": {"connect": "0s"}}),
            Some(("timeouts.connect", "connect must be greater than 0s")),
        ),
        (
            json!({"timeouts": {"poolIdle": "0s"}}),
            Some(("timeouts.poolIdle", "poolIdle must be greater than 0s")),
        ),
        // The other direction: what Rust accepts, CEL accepts. `protocol: none` skips timing.
        (
            json!({"healthCheck": {"protocol": "none", "interval": "0s", "timeout": "3s"}}),
            None,
        ),
        (json!({"timeouts": {"poolIdle": "1ms"}}), None),
        (
            json!({"healthCheck": {"expectedStatuses": ["200-399", "404", "500-500"]}}),
            None,
        ),
    ];
    let validator = Validator::new();
    // spec.upstream.port is int-or-string: a number 1-65535 or a Service port name.
    for (port, ok) in [
        (json!(80), true),
        (json!("http"), true),
        (json!("grpc-web2"), true),
        (json!(0), false),
        (json!(70000), false),
        (json!("Bad_Name"), false),
        (json!("a-very-long-port-name"), false),
    ] {
        let obj = doc(json!({"upstream": {"service": "pay", "port": port}}));
        let res = validator.validate(&schema, &obj, None);
        match ok {
            true => assert!(res.is_ok(), "{port}: {:?}", res.unwrap_err()),
            false => {
                let errs = res
                    .expect_err(&format!("CEL accepted port {port}"))
                    .into_vec();
                assert!(
                    errs.iter().any(|e| e.field_path.contains("upstream.port")
                        && e.message.contains("port must be 1-65535")),
                    "{port}: {errs:?}"
                );
            }
        }
    }
    // A reversed status range cannot even be read by Rust ("cannot be read" at the field), so
    // the API server must refuse it before the operator sees it.
    for range in ["399-200", "201-200"] {
        let obj = doc(json!({"healthCheck": {"expectedStatuses": ["200", range]}}));
        let errs = validator
            .validate(&schema, &obj, None)
            .expect_err(&format!("CEL accepted status range {range}"))
            .into_vec();
        assert!(
            errs.iter()
                .any(|e| e.field_path.contains("healthCheck.expectedStatuses")
                    && e.message.contains("must not end below its start")),
            "{range}: {errs:?}"
        );
        let rust: Result<UpstreamPolicySpec, _> = serde_json::from_value(obj["spec"].clone());
        assert!(rust.is_err(), "Rust accepted status range {range}");
    }
    for (spec, want) in cases {
        let obj = doc(spec.clone());
        let cel = validator.validate(&schema, &obj, None);
        let parsed: UpstreamPolicySpec = serde_json::from_value(obj["spec"].clone()).unwrap();
        let mut rust = FieldErrors::default();
        parsed.policy.validate("spec", &mut rust);
        match want {
            None => {
                assert!(cel.is_ok(), "{spec}: {:?}", cel.unwrap_err());
                assert!(rust.is_empty(), "{spec}: {rust}");
            }
            Some((field, message)) => {
                let errs = cel.expect_err(&format!("CEL accepted {spec}")).into_vec();
                assert!(
                    errs.iter()
                        .any(|e| e.message.contains(message) && e.field_path.contains(field)),
                    "{spec}: {errs:?}"
                );
                let rust = rust.to_string();
                assert!(
                    rust.contains(&format!("spec.{field}: ")),
                    "Rust misses {field}: {rust}"
                );
            }
        }
    }
}
