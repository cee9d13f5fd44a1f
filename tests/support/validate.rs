//! Strict validation of Kubernetes manifests against the official schemas with PyPI
//! `kubernetes-validate` (offline; `.ci/test` installs it). Without it a test skips with a
//! notice, unless `CI=true`, where it fails.

use std::{
    io::Write,
    process::{Command, Stdio},
};

/// The Kubernetes versions manifests are checked against: the oldest with native sidecars
/// (`restartPolicy` on init containers) and the newest the pinned kubernetes-validate knows.
pub const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

/// `kubernetes-validate` can run here; `false` (with a notice naming `test`) when it cannot and
/// this is not CI.
pub fn available(test: &str) -> bool {
    let works = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if works {
        return true;
    }
    let msg = "kubernetes-validate must be installed for this test \
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
        let mut child = Command::new("kubernetes-validate")
            .args(["--strict", "--kubernetes-version", version, "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubernetes-validate on PATH");
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(yaml.as_bytes())
            .expect("writing to kubernetes-validate");
        let out = child.wait_with_output().expect("kubernetes-validate runs");
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
