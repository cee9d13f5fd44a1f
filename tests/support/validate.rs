//! Strict validation of Kubernetes manifests against the official schemas with PyPI
//! `kubernetes-validate` (offline; `.ci/test` installs it). Without it a test skips with a
//! notice, unless `CI=true`, where it fails.
// Included by path too (`#[path = "support/validate.rs"]`), by tests that use a part of it.
#![allow(dead_code)]

use std::{
    io::Write,
    process::{Command, Stdio},
};

/// The Kubernetes versions manifests are checked against: the oldest with native sidecars
/// (`restartPolicy` on init containers) and the newest the pinned kubernetes-validate knows.
pub const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

/// `kubernetes-validate` (and python3 with the PyYAML it brings) can run here; `false` (with a notice naming `test`) when it cannot and
/// this is not CI.
pub fn available(test: &str) -> bool {
    let works = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works("kubernetes-validate", &["--version"]) && works("python3", &["-c", "import yaml"]) {
        return true;
    }
    let msg = "kubernetes-validate and python3 with PyYAML must be installed for this test \
               (`python3 -m pip install kubernetes-validate==1.37.0`; `bash .ci/test` installs it)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED {test}: {msg}");
    false
}

/// Validates every document of `yaml` strictly (unknown fields are errors) against each of
/// [`KUBERNETES_VERSIONS`]; `Err` carries the validator's report.
pub fn strict(yaml: &str) -> Result<(), String> {
    for version in KUBERNETES_VERSIONS {
        let out = output_with_stdin(
            Command::new("kubernetes-validate").args([
                "--strict",
                "--kubernetes-version",
                version,
                "-",
            ]),
            yaml,
        );
        let report = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || !report.contains("passed") {
            return Err(format!("against Kubernetes {version}:\n{report}"));
        }
    }
    Ok(())
}

/// Panics with the validator's report unless `yaml` validates strictly.
pub fn assert_strict(yaml: &str) {
    if let Err(report) = strict(yaml) {
        panic!("{report}\n--- the manifests:\n{yaml}");
    }
}

/// The documents of `yaml` as a YAML 1.1 reader sees them (PyYAML, which kubernetes-validate
/// brings; Kubernetes reads manifests as YAML 1.1 too: `yes` is a boolean there), as JSON.
/// Values JSON has no type for (dates) come back as `{"unreadable": "<python type>"}`.
pub fn read_as_yaml_1_1(yaml: &str) -> Vec<serde_json::Value> {
    let script = "import sys, json, yaml\n\
                  docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]\n\
                  print(json.dumps(docs, default=lambda o: {'unreadable': type(o).__name__}))";
    let out = output_with_stdin(Command::new("python3").args(["-c", script]), yaml);
    assert!(
        out.status.success(),
        "PyYAML cannot read it: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from python3")
}

/// Runs `cmd` with `stdin` as its standard input and collects its output.
pub fn output_with_stdin(cmd: &mut Command, stdin: &str) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin.as_bytes())
        .unwrap_or_else(|e| panic!("writing to {cmd:?}: {e}"));
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {cmd:?}: {e}"))
}
