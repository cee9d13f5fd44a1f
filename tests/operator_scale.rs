//! Scale benchmark: the `detour operator` binary, as its own process, against the in-memory API
//! server over HTTP on 127.0.0.1. Run it with `bench/operator/run.sh` (release mode); it prints
//! one JSON line of results.
//!
//! Sizes come from env: DETOUR_BENCH_NAMESPACES (100), DETOUR_BENCH_POLICIES_PER_NS (10),
//! DETOUR_BENCH_ENDPOINTS (50), DETOUR_BENCH_SAMPLES (100).

mod support;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use support::{bench::*, *};

fn endpoints(
    n: usize,
    ns: usize,
    svc: usize,
    terminating: Option<usize>,
) -> Vec<(String, bool, bool, bool)> {
    (0..n)
        .map(|e| {
            let ip = format!("10.{}.{}.{}", ns % 250, svc, e + 1);
            let t = terminating == Some(e);
            (ip, !t, true, t)
        })
        .collect()
}

fn slice_of(ns: &str, svc: &str, eps: &[(String, bool, bool, bool)]) -> Value {
    slice(ns, &format!("{svc}-1"), svc, "http", 8080, eps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run bench/operator/run.sh"]
async fn scale() {
    let namespaces = env_or("DETOUR_BENCH_NAMESPACES", 100);
    let per_ns = env_or("DETOUR_BENCH_POLICIES_PER_NS", 10);
    let n_eps = env_or("DETOUR_BENCH_ENDPOINTS", 50);
    let samples = env_or("DETOUR_BENCH_SAMPLES", 100);
    let total = namespaces * per_ns;

    let server = ApiServer::new();
    server.set_logging(std::env::var_os("DETOUR_BENCH_LOG").is_some());
    for n in 0..namespaces {
        let ns = format!("ns-{n}");
        for s in 0..per_ns {
            let svc = format!("svc-{s}");
            server.put(service(&ns, &svc, &[("http", 80)]));
            server.put(slice_of(&ns, &svc, &endpoints(n_eps, n, s, None)));
            server.put(policy(
                &ns,
                &format!("p-{s}"),
                &svc,
                json!("http"),
                20000 + s as u16,
            ));
        }
    }
    let addr = server.serve_http("127.0.0.1:0".parse().unwrap()).await;
    let dir = std::env::temp_dir().join(format!("detour-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = write_kubeconfig(&dir, addr, "default");

    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_detour"))
        .args([
            "operator",
            "--leader-election=false",
            "--admin",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env(
            "RUST_LOG",
            std::env::var("DETOUR_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start detour operator");
    let pid = child.id();

    // --- first full convergence: every policy Ready with all endpoints, every namespace rendered ---
    let want_eps = json!(n_eps);
    let converged = loop {
        let ready = server.count(POLICIES, |p| {
            p["status"]["endpoints"]["ready"] == want_eps
                && condition(p, "Ready").is_some_and(|(s, _)| s == "True")
        });
        let cms = server.count(CONFIG_MAPS, |c| {
            c["data"]["config.yaml"]
                .as_str()
                .is_some_and(|t| t.matches("\n- name: ").count() == per_ns)
        });
        if ready == total && cms == namespaces {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(env_or("DETOUR_BENCH_TIMEOUT", 300) as u64) {
            let _ = child.kill();
            for r in server.requests().iter().rev().take(10) {
                eprintln!("{} {}?{} changed={}", r.method, r.path, r.query, r.changed);
            }
            eprintln!("requests: {}", server.requests().len());
            panic!("no convergence after 300s: {ready}/{total} policies, {cms}/{namespaces} ConfigMaps");
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("operator exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let rss_converged = proc_status_kib(pid, "VmRSS:");

    // --- propagation: one endpoint starts terminating; time until its ConfigMap says so ---
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let n = (i * 37) % namespaces;
        let s = (i * 13) % per_ns;
        let e = i % n_eps;
        let (ns, svc) = (format!("ns-{n}"), format!("svc-{s}"));
        let eps = endpoints(n_eps, n, s, Some(e));
        let needle = format!(
            "address: {}:8080\n    pod: {svc}-{e}\n    state: terminating",
            eps[e].0
        );
        server.put(slice_of(&ns, &svc, &eps));
        let t0 = Instant::now();
        loop {
            let seen = server.inspect(CONFIG_MAPS, &ns, "detour-config", |cm| {
                cm.and_then(|c| c["data"]["config.yaml"].as_str())
                    .is_some_and(|t| t.contains(&needle))
            });
            if seen {
                latencies.push(t0.elapsed().as_secs_f64());
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("change {i} did not reach ns-{n}/detour-config in 30s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Put it back so each sample changes exactly one endpoint.
        server.put(slice_of(&ns, &svc, &endpoints(n_eps, n, s, None)));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if std::env::var_os("DETOUR_BENCH_VERBOSE").is_some() {
        let ms: Vec<u64> = latencies.iter().map(|s| (s * 1000.0) as u64).collect();
        eprintln!("propagation in order (ms): {ms:?}");
        if let Ok(m) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let _ = m;
        }
    }
    latencies.sort_by(f64::total_cmp);
    let peak = proc_status_kib(pid, "VmHWM:");
    let rss_end = proc_status_kib(pid, "VmRSS:");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let result = json!({
        "namespaces": namespaces,
        "policies": total,
        "endpoints_per_service": n_eps,
        "convergence_seconds": converged.as_secs_f64(),
        "propagation_samples": latencies.len(),
        "propagation_p50_seconds": percentile(&latencies, 0.5),
        "propagation_p99_seconds": percentile(&latencies, 0.99),
        "propagation_max_seconds": latencies.last().copied().unwrap_or(f64::NAN),
        "rss_after_convergence_mib": rss_converged as f64 / 1024.0,
        "rss_end_mib": rss_end as f64 / 1024.0,
        "peak_rss_mib": peak as f64 / 1024.0,
    });
    println!("DETOUR_BENCH_RESULT {result}");
    assert!(peak > 0, "could not read the operator's memory");
}
