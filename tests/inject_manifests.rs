//! What gets injected, through the library calls the webhook and `detour inject` make: every
//! workload kind of one multi-document file, pods as the API server hands them to the webhook
//! (`pod_patch`), and bad input. Every result validates strictly against the Kubernetes schema.

#[path = "support/validate.rs"]
mod validate;
#[path = "support/yaml.rs"]
mod yaml;

use detour::operator::inject::{
    inject_manifests, inject_manifests_with_report, pod_patch, Outcome, Settings, Skip,
    ADMIN_PORT_NAME, CONTAINER, SIDECAR_LABEL,
};
use serde_json::{json, Value};

const WORKLOADS: &str = "examples/inject/workloads.yaml";
const INJECTED: &str = "examples/inject/workloads.injected.yaml";
const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The settings the committed example was made with (the image tag does not follow the crate
/// version, so the example stays put across releases).
fn settings() -> Settings {
    Settings {
        image: "ghcr.io/detour-dev/detour:0.1.0".into(),
        ..Settings::default()
    }
}

fn documents(text: &str) -> Vec<Value> {
    yaml::documents(text)
}

/// The pod template of a workload (the object itself for a Pod).
fn template(obj: &Value) -> Option<&Value> {
    match obj["kind"].as_str()? {
        "Pod" => Some(obj),
        "CronJob" => obj.pointer("/spec/jobTemplate/spec/template"),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => obj.pointer("/spec/template"),
        _ => None,
    }
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|l| l.iter().map(|c| c["name"].as_str().unwrap()).collect())
        .unwrap_or_default()
}

/// The injected sidecar of a pod (template), checked to be what the issue asks for.
fn assert_injected(pod: &Value, original: &Value) {
    let spec = &pod["spec"];
    let init = names(&spec["initContainers"]);
    let mut want = vec![CONTAINER];
    want.extend(names(&original["spec"]["initContainers"]));
    assert_eq!(
        init, want,
        "the sidecar first, the pod's own init containers after it"
    );
    assert_eq!(
        spec["containers"], original["spec"]["containers"],
        "app containers untouched"
    );
    assert_eq!(pod["metadata"]["labels"][SIDECAR_LABEL], "true");
    let c = &spec["initContainers"][0];
    assert_eq!(c["restartPolicy"], "Always");
    assert_eq!(
        c["args"].as_array().unwrap()[1..3],
        ["--config-source", "kubernetes"]
    );
    let env: Vec<&str> = names(&c["env"]);
    assert_eq!(env, ["POD_NAME", "POD_NAMESPACE", "DETOUR_LOG_FORMAT"]);
    assert_eq!(c["ports"][0]["name"], ADMIN_PORT_NAME);
    assert_eq!(c["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(c["startupProbe"]["periodSeconds"], 1);
    assert_eq!(c["startupProbe"]["failureThreshold"], 120);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/live");
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    // every mount of the sidecar is one of the volumes it brought, the token among them
    let volumes = spec["volumes"].as_array().unwrap();
    for m in c["volumeMounts"].as_array().unwrap() {
        let v = volumes.iter().find(|v| v["name"] == m["name"]).unwrap();
        assert!(v["name"].as_str().unwrap().starts_with("detour-"), "{v}");
        if m["mountPath"] == TOKEN_DIR {
            let sources = v["projected"]["sources"].as_array().unwrap();
            assert!(sources.iter().any(|s| s["serviceAccountToken"].is_object()));
            assert!(sources
                .iter()
                .any(|s| s["configMap"]["name"] == "kube-root-ca.crt"));
        }
    }
    assert!(c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["mountPath"] == TOKEN_DIR));
}

#[test]
fn every_workload_kind_in_one_file_gets_the_sidecar_and_nothing_else_changes() {
    let input = read(WORKLOADS);
    let (out, reports) = inject_manifests_with_report(&input, &settings()).unwrap();
    let (before, after) = (documents(&input), documents(&out));
    assert_eq!(before.len(), after.len());
    let mut kinds = Vec::new();
    for ((old, new), report) in before.iter().zip(&after).zip(&reports) {
        let kind = old["kind"].as_str().unwrap();
        let opted_out =
            template(old).is_some_and(|t| t["metadata"]["labels"]["detour.dev/inject"] == "false");
        match template(old) {
            Some(_) if opted_out => {
                assert_eq!(new, old);
                assert_eq!(report.outcome, Outcome::Skipped(Skip::OptedOut));
            }
            Some(t) => {
                assert_injected(template(new).unwrap(), t);
                assert_eq!(report.outcome, Outcome::Injected);
                // outside the pod template, the object is as it was
                let (mut a, mut b) = (old.clone(), new.clone());
                for v in [&mut a, &mut b] {
                    if kind != "Pod" {
                        *v.pointer_mut(pod_pointer(kind)).unwrap() = Value::Null;
                    } else {
                        v["spec"] = Value::Null;
                        v["metadata"]["labels"] = Value::Null;
                    }
                }
                assert_eq!(a, b, "{kind}");
            }
            None => {
                assert_eq!(new, old, "{kind} passes through");
                assert_eq!(report.outcome, Outcome::NotAWorkload);
            }
        }
        kinds.push(kind);
    }
    for kind in [
        "Pod",
        "Deployment",
        "StatefulSet",
        "DaemonSet",
        "ReplicaSet",
        "ReplicationController",
        "Job",
        "CronJob",
        "Service",
        "ConfigMap",
    ] {
        assert!(kinds.contains(&kind), "the example has no {kind}");
    }

    // idempotent: injecting the output again changes nothing
    let (again, reports) = inject_manifests_with_report(&out, &settings()).unwrap();
    assert_eq!(again, out);
    assert!(reports
        .iter()
        .all(|r| r.outcome != Outcome::Injected && r.outcome != Outcome::Skipped(Skip::Windows)));

    // the committed example output is what the code produces
    if std::env::var_os("DETOUR_UPDATE_EXAMPLES").is_some() {
        std::fs::write(format!("{}/{INJECTED}", env!("CARGO_MANIFEST_DIR")), &out).unwrap();
    }
    assert!(
        out == read(INJECTED),
        "{INJECTED} is stale: DETOUR_UPDATE_EXAMPLES=1 cargo test --test inject_manifests"
    );

    if validate::available("every_workload_kind_in_one_file") {
        validate::assert_strict(&input);
        validate::assert_strict(&out);
        // Kubernetes reads YAML 1.1: the output means there what it means here
        assert_eq!(validate::read_as_yaml_1_1(&out), after);
        assert_eq!(validate::read_as_yaml_1_1(&input), before);
    }
}

fn pod_pointer(kind: &str) -> &'static str {
    if kind == "CronJob" {
        "/spec/jobTemplate/spec/template"
    } else {
        "/spec/template"
    }
}

/// Pods as the API server sends them to the webhook: defaults filled in and, unless
/// `automountServiceAccountToken: false`, the token volume the ServiceAccount admission plugin
/// mounted into every container already there.
fn admitted_pods() -> Vec<(&'static str, Value)> {
    let token_volume = json!({"name": "kube-api-access-7xk2p", "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
    ]}});
    let token_mount =
        json!({"name": "kube-api-access-7xk2p", "mountPath": TOKEN_DIR, "readOnly": true});
    let container = |name: &str| {
        json!({"name": name, "image": "ghcr.io/example/web:1", "imagePullPolicy": "IfNotPresent",
               "resources": {}, "terminationMessagePath": "/dev/termination-log",
               "terminationMessagePolicy": "File", "volumeMounts": [token_mount.clone()]})
    };
    let pod = |spec_extra: Value| {
        let mut spec = json!({
            "containers": [container("web")],
            "dnsPolicy": "ClusterFirst", "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0, "restartPolicy": "Always", "schedulerName": "default-scheduler",
            "securityContext": {}, "serviceAccount": "default", "serviceAccountName": "default",
            "terminationGracePeriodSeconds": 30,
            "tolerations": [{"effect": "NoExecute", "key": "node.kubernetes.io/not-ready", "operator": "Exists", "tolerationSeconds": 300}],
            "volumes": [token_volume.clone()],
        });
        for (k, v) in spec_extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-7d4b9c-", "namespace": "shop",
                         "labels": {"app": "web", "pod-template-hash": "7d4b9c"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c",
                                              "uid": "1b0f8c1e-2a43-4c39-9b57-0d1f3c6a1a11", "controller": true, "blockOwnerDeletion": true}]},
            "spec": spec,
        })
    };
    let mut no_token = pod(json!({"automountServiceAccountToken": false}));
    no_token["spec"]["volumes"] = json!([]);
    no_token["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("volumeMounts");
    let mut no_labels = pod(json!({}));
    no_labels["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("labels");
    vec![
        ("plain", pod(json!({}))),
        (
            "own init containers",
            pod(json!({"initContainers": [container("migrate"), container("seed")]})),
        ),
        ("automountServiceAccountToken: false", no_token),
        ("no labels", no_labels),
        (
            "opted in, restricted security context",
            pod(
                json!({"securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}}}),
            ),
        ),
    ]
}

#[test]
fn patched_pods_are_injected_exactly_as_detour_inject_does_and_validate() {
    let s = settings();
    let mut patched_all = Vec::new();
    for (case, pod) in admitted_pods() {
        let (patch, skip) = pod_patch(&pod, &s).unwrap();
        assert_eq!(skip, None, "{case}");
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_injected(&patched, &pod);

        // the sidecar's token is its own: no other container sees it, and it has no other
        for (i, c) in patched["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                assert!(
                    !m["name"].as_str().unwrap().starts_with("detour-"),
                    "{case}: container {i}"
                );
            }
        }
        let sidecar_token_mounts = patched["spec"]["initContainers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["mountPath"] == TOKEN_DIR)
            .count();
        assert_eq!(sidecar_token_mounts, 1, "{case}");

        // one code path: detour inject on the same pod gives the same pod
        let text = yaml::to_string(&pod);
        let injected = documents(&inject_manifests(&text, &s).unwrap()).remove(0);
        assert_eq!(injected, patched, "{case}");

        // idempotent: the patched pod gets an empty patch
        let (again, skip) = pod_patch(&patched, &s).unwrap();
        assert!(again.0.is_empty(), "{case}");
        assert_eq!(skip, Some(Skip::AlreadyInjected), "{case}");
        // kubernetes-validate names what it checks: give the pod the name the API server
        // generates from generateName after admission
        patched["metadata"]["name"] = format!("web-{}", patched_all.len()).into();
        patched_all.push(yaml::to_string(&patched));
    }
    if validate::available("patched_pods_validate") {
        let all = patched_all.join("---\n");
        validate::assert_strict(&all);
        // the validator is strict: a misspelt field in the sidecar fails
        let bad = all.replacen("restartPolicy: Always", "restartPolicyy: Always", 1);
        assert!(validate::strict(&bad).is_err());
    }
}

#[test]
fn bad_input_is_an_error_naming_the_document() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: app, image: x}]}\n";
    let cases: &[(String, &str)] = &[
        (format!("{pod}---\nkind: [unclosed\n"), "document 2: not valid YAML"),
        (format!("{pod}---\njust a string\n"), "document 2: not a Kubernetes object: expected a mapping with apiVersion and kind, found a string"),
        (format!("{pod}---\n- a\n- list\n"), "document 2: not a Kubernetes object: expected a mapping with apiVersion and kind, found a list"),
        (format!("{pod}---\napiVersion: v1\nmetadata: {{name: x}}\n"), "document 2: not a Kubernetes object: kind is missing"),
        (format!("{pod}---\nkind: Pod\n"), "document 2: not a Kubernetes object: apiVersion is missing"),
        (format!("{pod}---\napiVersion: v1\nkind: 3\n"), "document 2: not a Kubernetes object: kind must be a non-empty string"),
        (
            format!("{pod}---\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec: {{}}\n"),
            "document 3 (Deployment web): spec.template: missing",
        ),
        (
            "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: c}\nspec: {jobTemplate: {spec: {template: {spec: {containers: [{name: detour, image: x}]}}}}}\n".into(),
            "document 1 (CronJob c): spec.jobTemplate.spec.template.spec.containers[0].name: a container is already named \"detour\"",
        ),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {template: {spec: {containers: [{name: app, image: x}], volumes: [{name: detour-podinfo, emptyDir: {}}]}}}\n".into(),
            "document 1 (Deployment web): spec.template.spec.volumes[0].name: the volume name \"detour-podinfo\" is reserved",
        ),
        (format!("{pod}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: q}}\n"), "document 2 (Pod q): spec: missing"),
    ];
    for (input, want) in cases {
        let err = inject_manifests(input, &Settings::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(want), "{err}\n  wanted: {want}");
    }
    // empty input and empty documents are no manifests, not an error
    assert_eq!(inject_manifests("", &Settings::default()).unwrap(), "");
    assert_eq!(
        inject_manifests("---\n# nothing\n---\n", &Settings::default()).unwrap(),
        ""
    );
}

/// Every prefix of a real file (cut anywhere, mid-token included) is an answer or an error,
/// never a panic.
#[test]
fn truncated_input_never_panics() {
    let input = read(WORKLOADS);
    let (mut ok, mut err) = (0, 0);
    for end in (0..input.len()).step_by(29) {
        if !input.is_char_boundary(end) {
            continue;
        }
        let r = std::panic::catch_unwind(|| inject_manifests(&input[..end], &settings()));
        match r.unwrap_or_else(|_| panic!("panicked on the first {end} bytes")) {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    }
    assert!(ok > 0 && err > 0, "ok {ok}, err {err}");
}
