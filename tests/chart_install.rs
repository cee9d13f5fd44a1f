//! What docs/install.md tells a platform engineer to run: the sample policy
//! (examples/upstreampolicy.yaml) is valid against the CRD (its schema with python-jsonschema,
//! its CEL rules with kube's client-side CEL, and the operator's own validation), and every
//! `--set` the guide uses is a key of the chart's values.yaml.

#[path = "support/validate.rs"]
mod validate;
#[path = "support/yaml.rs"]
mod yaml;

use std::{path::PathBuf, process::Command};

use detour::{api::UpstreamPolicySpec, config::FieldErrors};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn example() -> Value {
    yaml::from_str(&read("examples/upstreampolicy.yaml")).unwrap()
}

#[test]
fn the_sample_policy_passes_the_crd_cel_rules_and_the_operators_validation() {
    let policy = example();
    assert_eq!(policy["kind"], "UpstreamPolicy");
    let crd = serde_json::to_value(detour::api::crd()).unwrap();
    assert_eq!(
        policy["apiVersion"],
        format!(
            "{}/{}",
            crd["spec"]["group"].as_str().unwrap(),
            crd["spec"]["versions"][0]["name"].as_str().unwrap()
        )
    );
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    kube::core::cel::Validator::new()
        .validate(schema, &policy, None)
        .unwrap_or_else(|e| panic!("CEL: {:?}", e.into_vec()));
    let spec: UpstreamPolicySpec =
        serde_json::from_value(policy["spec"].clone()).expect("the operator reads the spec");
    let mut errors = FieldErrors::default();
    spec.policy.validate("spec", &mut errors);
    assert!(errors.is_empty(), "{errors}");
    assert_eq!(spec.listener.port, 18080);
}

/// The openAPIV3Schema of the chart's CRD as JSON Schema (python-jsonschema, which
/// kubernetes-validate brings), strictly: an unknown field is an error, as with
/// `kubectl apply --validate=strict`.
#[test]
fn the_sample_policy_passes_the_chart_crd_schema() {
    if !validate::available("the_sample_policy_passes_the_chart_crd_schema") {
        return;
    }
    let script = r#"
import sys, yaml, jsonschema
crd = yaml.safe_load(open(sys.argv[1]))
schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
def strict(s):
    if isinstance(s, dict):
        if s.get("type") == "object" and "properties" in s and "additionalProperties" not in s \
                and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
        for v in s.values():
            strict(v)
    elif isinstance(s, list):
        for v in s:
            strict(v)
strict(schema)
for k in ("apiVersion", "kind"):
    schema["properties"][k] = {"type": "string"}
schema["properties"]["metadata"] = {"type": "object"}
v = jsonschema.Draft7Validator(schema)
policy = yaml.safe_load(open(sys.argv[2]))
errs = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(policy)]
assert not errs, errs
policy["spec"]["retries"]["attemps"] = 3
assert any("attemps" in e.message for e in v.iter_errors(policy)), "a misspelt field passed"
print("valid")
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(root().join("charts/detour/crds/upstreampolicies.detour.dev.yaml"))
        .arg(root().join("examples/upstreampolicy.yaml"))
        .output()
        .expect("python3");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("valid"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every `--set a.b=c` in docs/install.md names a key of values.yaml (or one under a map
/// of labels), and the guide labels
/// namespaces with what the chart's webhook selects on.
#[test]
fn the_install_guide_uses_the_charts_values_and_labels() {
    let guide = read("docs/install.md");
    let values: Value = yaml::from_str(&read("charts/detour/values.yaml")).unwrap();
    let mut checked = 0;
    let words: Vec<&str> = guide.split_whitespace().collect();
    for pair in words.windows(2) {
        if pair[0] != "--set" && pair[0] != "--set-string" {
            continue;
        }
        let key = pair[1].split('=').next().unwrap();
        // A key under a free-form map (`labels: {}`) is the user's to name.
        let mut v = &values;
        for part in key.split('.') {
            if v.as_object().is_some_and(|m| m.is_empty()) {
                break;
            }
            v = &v[part];
        }
        assert!(
            !v.is_null(),
            "docs/install.md sets {key}, not in values.yaml"
        );
        checked += 1;
    }
    assert!(checked >= 3, "the guide sets {checked} values");
    let webhook = read("charts/detour/templates/webhook.yaml");
    assert!(webhook.contains("key: detour.dev/inject") && webhook.contains("values: [enabled]"));
    assert!(guide.contains("kubectl label namespace shop detour.dev/inject=enabled"));
    for must in [
        "kubectl apply -f charts/detour/crds/",
        "examples/upstreampolicy.yaml",
        "grafana_dashboard",
        "helm install detour charts/detour",
    ] {
        assert!(guide.contains(must), "docs/install.md lacks `{must}`");
    }
}
