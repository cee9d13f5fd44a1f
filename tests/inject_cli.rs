//! `detour inject` as a process: a file or standard input in, the manifests with the sidecar on
//! standard output, one line per object on standard error; bad input is a message and a
//! non-zero exit.

#[path = "support/validate.rs"]
mod validate;
#[path = "support/yaml.rs"]
mod yaml;

use std::process::{Command, Output};

use detour::operator::inject::{inject_manifests, Settings};

const WORKLOADS: &str = "examples/inject/workloads.yaml";

fn path(rel: &str) -> String {
    format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"))
}

/// `detour inject ARGS` with `stdin` piped in, without any DETOUR_SIDECAR_* from the
/// environment of the test run.
fn detour_inject(args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_detour"));
    cmd.arg("inject").args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("DETOUR_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    validate::output_with_stdin(&mut cmd, stdin)
}

fn text(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).unwrap()
}

#[test]
fn a_file_and_stdin_give_what_the_library_gives() {
    let input = std::fs::read_to_string(path(WORKLOADS)).unwrap();
    let want = inject_manifests(&input, &Settings::default()).unwrap();

    let from_file = detour_inject(&["-f", &path(WORKLOADS)], "", &[]);
    assert!(from_file.status.success(), "{}", text(&from_file.stderr));
    assert_eq!(text(&from_file.stdout), want);
    let report = text(&from_file.stderr);
    for line in [
        "Deployment web: injected",
        "CronJob nightly: injected",
        "Deployment admin: skipped: the pod opted out with the label detour.dev/inject=false",
        "Service web: no pod template, unchanged",
    ] {
        assert!(report.lines().any(|l| l == line), "{line:?} in\n{report}");
    }

    let from_stdin = detour_inject(&["--filename", "-"], &input, &[]);
    assert!(from_stdin.status.success(), "{}", text(&from_stdin.stderr));
    assert_eq!(text(&from_stdin.stdout), want);

    // piped into itself: nothing more is added
    let twice = detour_inject(&["-f", "-"], &want, &[]);
    assert_eq!(text(&twice.stdout), want);
    assert!(!text(&twice.stderr).contains(": injected"));

    if validate::available("a_file_and_stdin_give_what_the_library_gives") {
        validate::assert_strict(&text(&from_stdin.stdout));
    }
}

#[test]
fn flags_and_environment_set_the_sidecar() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: app, image: x}]}\n";
    let out = detour_inject(
        &[
            "-f",
            "-",
            "--sidecar-cpu-request=100m",
            "--sidecar-cpu-limit=500m",
            "--sidecar-memory-limit=256Mi",
            "--sidecar-admin-port=9911",
            "--sidecar-log-format=text",
        ],
        pod,
        &[
            ("DETOUR_SIDECAR_IMAGE", "registry.example/detour:pinned"),
            ("DETOUR_SIDECAR_MEMORY_REQUEST", "48Mi"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pod: serde_json::Value = yaml::from_str(&text(&out.stdout)).unwrap();
    let c = &pod["spec"]["initContainers"][0];
    assert_eq!(c["image"], "registry.example/detour:pinned");
    assert_eq!(
        c["resources"],
        serde_json::json!({"requests": {"cpu": "100m", "memory": "48Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}})
    );
    assert_eq!(c["ports"][0]["containerPort"], 9911);
    assert_eq!(c["startupProbe"]["httpGet"]["port"], 9911);
    assert_eq!(c["args"][6], "0.0.0.0:9911");
    assert_eq!(c["env"][2]["value"], "text");
}

#[test]
fn bad_input_and_flags_exit_non_zero_with_a_message() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: app, image: x}]}\n";
    let cases: &[(&[&str], String, &str)] = &[
        (
            &["-f", "-"],
            format!("{pod}---\n: : [\n"),
            "document 2: not valid YAML",
        ),
        (
            &["-f", "-"],
            format!("{pod}---\nhello\n"),
            "document 2: not a Kubernetes object",
        ),
        (
            &["-f", "-"],
            format!("{pod}---\nmetadata: {{name: x}}\n"),
            "document 2: not a Kubernetes object: apiVersion is missing",
        ),
        (
            &["-f", "/nonexistent/manifests.yaml"],
            String::new(),
            "reading /nonexistent/manifests.yaml",
        ),
        (
            &["-f", "-", "--sidecar-memory-request=1Gi"],
            pod.to_owned(),
            "--sidecar-memory-request 1Gi is more than --sidecar-memory-limit 128Mi",
        ),
        (
            &["-f", "-", "--sidecar-cpu-request=lots"],
            pod.to_owned(),
            "--sidecar-cpu-request",
        ),
        (
            &["-f", "-", "--sidecar-admin-port=70000"],
            pod.to_owned(),
            "--sidecar-admin-port",
        ),
        (&[], pod.to_owned(), "--filename"),
    ];
    for (args, stdin, want) in cases {
        let out = detour_inject(args, stdin, &[]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(want), "{args:?}: {want:?} not in\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(
            text(&out.stdout),
            "",
            "{args:?}: nothing printed on failure"
        );
    }
}
