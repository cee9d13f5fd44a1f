//! `detour demo`, shortened: the client must see no error while the sidecar absorbs a killed
//! pod, a pod answering 502 and a hanging pod, and the same client calling the pods directly at
//! the same time must see the errors those faults cause without detour.

use std::{process::Command, sync::Mutex};

use detour::demo::{run_with, Args};

/// Two demos at once on two cores would measure the machine, not the sidecar.
static ONE_DEMO_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn a_short_demo_absorbs_every_fault() {
    let _one = ONE_DEMO_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let args = Args {
        duration: detour::config::Duration::from_secs(6),
        // The shared test machine can stall a process for seconds; a sidecar that fails to
        // absorb a fault still shows as a 502/503/504 the client counts.
        client_timeout: detour::config::Duration::from_secs(5),
        ..Args::default()
    };
    let mut out = Vec::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let res = rt.block_on(run_with(&args, &mut out));
    let text = String::from_utf8_lossy(&out).into_owned();
    let s = res.unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(s.with_detour.errors, 0, "{text}");
    assert!(s.with_detour.requests >= 100, "{text}");
    // Without detour: the same faults reach the client. A killed pod refuses connections, a 502
    // pod answers 502, a hanging pod leaves requests unanswered.
    let without = &s.without_detour;
    assert!(without.requests >= 50, "{text}");
    for kind in [
        detour::demo::traffic::CONNECTION_FAILED,
        detour::demo::traffic::GATEWAY_ANSWER,
        detour::demo::traffic::NO_ANSWER,
    ] {
        assert!(
            without.errors_by_kind.get(kind).copied().unwrap_or(0) >= 1,
            "without detour, no {kind:?}:\n{text}"
        );
    }
    assert_eq!(
        without.errors,
        without.errors_by_kind.values().sum::<u64>(),
        "{text}"
    );
    for cause in [
        "connection_refused",
        "upstream_status",
        "http_response_timeout",
    ] {
        assert!(
            s.failed_attempts.get(cause).copied().unwrap_or(0) >= 1,
            "no {cause} absorbed:\n{text}"
        );
    }
    let failed: u64 = s.failed_attempts.values().sum();
    assert!(s.rescued >= 1 && s.rescued <= failed, "{text}");
    assert!(s.retries >= s.rescued, "{text}");
    assert!(s.ejections >= 1, "{text}");
    assert_eq!(s.gateway_errors, 0, "{text}");
    assert!(s.metrics_url.starts_with("http://127.0.0.1:"), "{text}");
    // The display: a progress line per second, each timeline event, and the summary.
    assert!(
        text.lines()
            .filter(|l| l.contains("client errors 0"))
            .count()
            >= 4,
        "{text}"
    );
    for want in [
        "killed",
        "502",
        "hangs",
        "Summary",
        "client-visible errors",
        &s.metrics_url,
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    // The two columns side by side: without detour, then with it.
    let header = text
        .lines()
        .find(|l| l.contains("what the clients saw"))
        .unwrap_or_else(|| panic!("no side-by-side table in\n{text}"));
    assert!(
        header.find("without detour") < header.find("with detour"),
        "{header}"
    );
    let errors_row: Vec<&str> = text
        .lines()
        .find(|l| l.trim_start().starts_with("client-visible errors"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        errors_row[errors_row.len() - 2..],
        [without.errors.to_string(), "0".to_string()],
        "{text}"
    );
}

/// `detour demo` for 5 s with two connections and a patient client.
fn short_demo_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_detour"));
    cmd.args([
        "demo",
        "--duration",
        "5s",
        "--connections",
        "2",
        "--client-timeout",
        "5s",
    ]);
    cmd
}

#[test]
fn the_demo_command_exits_0_and_prints_the_summary() {
    let _one = ONE_DEMO_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = short_demo_command().output().expect("run detour demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("client-visible errors"), "{stdout}");
    assert!(stdout.contains("without detour"), "{stdout}");
    assert!(stdout.contains("/metrics"), "{stdout}");
}

#[test]
fn the_demo_command_refuses_a_bad_duration() {
    let out = Command::new(env!("CARGO_BIN_EXE_detour"))
        .args(["demo", "--duration", "1s"])
        .output()
        .expect("run detour demo");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--duration"), "{stderr}");
}

#[test]
fn keep_running_serves_metrics_until_interrupted() {
    use std::io::{BufRead, BufReader, Read, Write};
    let _one = ONE_DEMO_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = short_demo_command()
        .arg("--keep-running")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run detour demo");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut url = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(at) = line.find("metrics: http://") {
            url = Some(line[at + "metrics: http://".len()..].trim().to_string());
        }
        if line.contains("Ctrl-C") {
            break;
        }
    }
    let url = url.expect("the summary names the metrics URL");
    let addr = url.trim_end_matches("/metrics");
    // The demo is over, but the sidecar still answers on its admin port.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("detour_requests_total{"), "{text}");

    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not stop on SIGINT");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    assert!(status.success(), "{status}\n{err}");
}
