//! What a user of the image meets in a container: `kubectl logs` shows stderr as written, so text
//! logs carry no colour codes when stderr is not a terminal and JSON logs are one object a line;
//! a user error is one message and exit code 1, never a Rust backtrace (even with
//! `RUST_BACKTRACE=1`), in every subcommand.
use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

/// A scratch directory of this test binary's own.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("detour-image-running-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn write(name: &str, text: &str) -> PathBuf {
    let path = scratch(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn detour(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_detour"));
    cmd.args(args)
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .env_remove("RUST_LOG")
        .env_remove("DETOUR_LOG_FORMAT");
    cmd
}

/// The run failed as a user error: exit code 1, `error: ...` on stderr, no backtrace.
fn assert_user_error(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for trace in [
        "stack backtrace",
        "Stack backtrace",
        "Backtrace",
        "panicked",
    ] {
        assert!(!stderr.contains(trace), "{trace:?} in\n{stderr}");
    }
    stderr
}

const GOOD: &str = "apiVersion: detour.dev/v1alpha1\nkind: SidecarConfig\nupstreams: []\n";

#[test]
fn a_bad_config_is_one_message_with_each_path_once() {
    let example = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/sidecar.yaml"),
    )
    .unwrap();
    let bad = example.replacen("protocol: http ", "protocol: htp  ", 1);
    assert_ne!(bad, example, "the example changed: update this test");
    let path = write("bad.yaml", &bad);
    let out = detour(&["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = assert_user_error(&out);
    let field = "upstreams[0].policy.healthCheck.protocol";
    assert_eq!(stderr.matches(field).count(), 1, "{stderr}");
    assert!(stderr.contains("unknown variant `htp`"), "{stderr}");

    // Rule violations: every one listed, each with its path once.
    let invalid = write(
        "invalid.yaml",
        "apiVersion: detour.dev/v2\nkind: SidecarConfig\nupstreams:\n- name: a\n  listen: 127.0.0.1:1\n  endpoints: [{address: nope}]\n",
    );
    let out = detour(&["check", "--config", invalid.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = assert_user_error(&out);
    for field in ["apiVersion: ", "upstreams[0].endpoints[0].address: "] {
        assert_eq!(stderr.matches(field).count(), 1, "{field} in\n{stderr}");
    }
}

#[test]
fn user_errors_in_every_subcommand_are_a_message_and_exit_code_1() {
    let missing = scratch("missing.yaml");
    let missing = missing.to_str().unwrap();
    let out = detour(&["check", "--config", missing]).output().unwrap();
    let stderr = assert_user_error(&out);
    // The I/O error is quoted once, not repeated as its own cause.
    assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");

    let out = detour(&["inject", "-f", missing]).output().unwrap();
    assert_user_error(&out);

    // The operator without any cluster to talk to.
    let home = scratch("home");
    std::fs::create_dir_all(&home).unwrap();
    let out = detour(&["operator"])
        .env("HOME", &home)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap();
    let stderr = assert_user_error(&out);
    assert!(stderr.contains("Kubernetes"), "{stderr}");
}

/// Runs the sidecar (no upstreams, admin on 127.0.0.1:0) with stderr piped and returns its log
/// lines up to "config applied".
fn sidecar_logs(format: &str) -> Vec<String> {
    let config = write(&format!("good-{format}.yaml"), GOOD);
    let mut child = detour(&[
        "sidecar",
        "--config",
        config.to_str().unwrap(),
        "--admin",
        "127.0.0.1:0",
        "--log-format",
        format,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
        let done = line.contains("config applied");
        lines.push(line);
        if done {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        lines.last().is_some_and(|l| l.contains("config applied")),
        "{lines:?}"
    );
    lines
}

#[test]
fn text_logs_have_no_colour_codes_when_stderr_is_not_a_terminal() {
    let lines = sidecar_logs("text");
    assert!(lines.iter().any(|l| l.contains("INFO")), "{lines:?}");
    for line in &lines {
        assert!(!line.contains('\x1b'), "escape sequence in {line:?}");
    }
}

#[test]
fn json_logs_are_one_object_a_line() {
    for line in sidecar_logs("json") {
        assert!(!line.contains('\x1b'), "escape sequence in {line:?}");
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v.is_object(), "{line}");
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }
}
