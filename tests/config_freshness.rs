//! Freshness benchmark of config delivery through the API: the in-memory API server over HTTP
//! on 127.0.0.1, the operator in this process, and DETOUR_BENCH_SIDECARS (10) `detour sidecar
//! --config-source kubernetes` processes (release build) watching `detour-config`. Each sample
//! changes one endpoint of an EndpointSlice and times until *every* sidecar's `/endpoints` shows
//! the change. A last sidecar runs the same config from a file, for the memory comparison. Run it
//! with `bench/config-freshness/run.sh`; it prints one JSON line of results.

mod support;

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use detour::operator::{Operator, Options};
use serde_json::{json, Value};
use support::{bench::*, *};

const NS: &str = "bench";

/// The Service's one slice: `n` endpoints, `terminating` one of them terminating.
fn slice_with(n: usize, terminating: Option<usize>) -> Value {
    let eps: Vec<(String, bool, bool, bool)> = (0..n)
        .map(|e| {
            let t = terminating == Some(e);
            (format!("10.1.0.{}", e + 1), !t, true, t)
        })
        .collect();
    slice(NS, "pay-1", "pay", "http", 8080, &eps)
}

struct Proc {
    child: Child,
    admin: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sidecar(dir: &Path, i: usize, source: &[&str], kubeconfig: &Path) -> Proc {
    let labels = dir.join(format!("labels-{i}"));
    std::fs::write(&labels, format!("app=\"web-{i}\"\n")).unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_detour"))
        .arg("sidecar")
        .args(source)
        .args(["--admin", &admin.to_string(), "--pod-labels"])
        .arg(&labels)
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAMESPACE", NS)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start detour sidecar");
    Proc { child, admin }
}

/// Whether the sidecar reports `address` in `state` (`/endpoints`).
async fn shows(p: &Proc, address: &str, state: &str) -> bool {
    let (code, body) = http_get(p.admin, "/endpoints").await;
    code == 200
        && serde_json::from_str::<Value>(&body).is_ok_and(|r| {
            r["upstreams"]
                .as_object()
                .into_iter()
                .flat_map(|u| u.values())
                .flat_map(|eps| eps.as_array().into_iter().flatten())
                .any(|e| e["address"] == address && e["state"] == state)
        })
}

async fn ready(p: &Proc) -> bool {
    // Not listening yet is "not ready yet".
    tokio::net::TcpStream::connect(p.admin).await.is_ok()
        && http_get(p.admin, "/ready").await.0 == 200
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run bench/config-freshness/run.sh"]
async fn config_freshness() {
    let n_sidecars = env_or("DETOUR_BENCH_SIDECARS", 10);
    let samples = env_or("DETOUR_BENCH_SAMPLES", 200);
    let n_eps = env_or("DETOUR_BENCH_ENDPOINTS", 20);

    let server = ApiServer::new();
    server.set_logging(false);
    server.put(service(NS, "pay", &[("http", 80)]));
    server.put(slice_with(n_eps, None));
    // One client workload per sidecar, each with its own policy and listener: every slice
    // change changes every sidecar's upstream.
    for i in 0..n_sidecars {
        let mut p = policy(NS, &format!("pay-{i}"), "pay", json!("http"), free_port());
        p["spec"]["workloadSelector"] = json!({"matchLabels": {"app": format!("web-{i}")}});
        p["spec"]["healthCheck"] = json!({"protocol": "none"});
        server.put(p);
    }
    let addr = server.serve_http("127.0.0.1:0".parse().unwrap()).await;
    let dir = std::env::temp_dir().join(format!("detour-freshness-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = write_kubeconfig(&dir, addr, NS);
    let operator = Operator::start(
        server.client(),
        Options {
            debounce: Duration::from_millis(100),
            ..Options::default()
        },
    )
    .await
    .expect("operator");

    let procs: Vec<Proc> = (0..n_sidecars)
        .map(|i| sidecar(&dir, i, &["--config-source", "kubernetes"], &kubeconfig))
        .collect();
    let started = Instant::now();
    for p in &procs {
        // Ready alone is not enough: a sidecar is ready, serving nothing, before the operator
        // has written detour-config.
        while !(ready(p).await && shows(p, "10.1.0.1:8080", "healthy").await) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "sidecar not running the rendered config in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The same config from a file, for the memory comparison (pod labels of sidecar 0).
    let cm = server.get(CONFIG_MAPS, NS, "detour-config").unwrap();
    let file = dir.join("config.yaml");
    // Its own listener port: the kubernetes-mode sidecar 0 holds the rendered one.
    let mut doc: Value =
        support::yaml::from_str(cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    for u in doc["upstreams"].as_array_mut().unwrap() {
        u["listen"] = json!(format!("127.0.0.1:{}", free_port()));
    }
    std::fs::write(&file, support::yaml::to_string(&doc)).unwrap();
    let file_mode = sidecar(
        &dir,
        0,
        &[
            "--config-source",
            "file",
            "--config",
            file.to_str().unwrap(),
        ],
        &kubeconfig,
    );
    while !ready(&file_mode).await {
        assert!(started.elapsed() < Duration::from_secs(90));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_kubernetes = proc_status_kib(procs[0].child.id(), "VmRSS:");
    let rss_file = proc_status_kib(file_mode.child.id(), "VmRSS:");

    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let e = i % n_eps;
        let address = format!("10.1.0.{}:8080", e + 1);
        let t0 = Instant::now();
        server.put(slice_with(n_eps, Some(e)));
        let mut pending: Vec<&Proc> = procs.iter().collect();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for p in pending {
                if !shows(p, &address, "terminating").await {
                    still.push(p);
                }
            }
            pending = still;
            if !pending.is_empty() {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "change {i} did not reach every sidecar in 30 s"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        latencies.push(t0.elapsed().as_secs_f64());
        // Back to all ready, and wait for it so that each sample starts from the same state.
        server.put(slice_with(n_eps, None));
        for p in &procs {
            while !shows(p, &address, "healthy").await {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    let peak_kubernetes = proc_status_kib(procs[0].child.id(), "VmHWM:");
    let peak_file = proc_status_kib(file_mode.child.id(), "VmHWM:");
    let rss_kubernetes_end = proc_status_kib(procs[0].child.id(), "VmRSS:");
    let rss_file_end = proc_status_kib(file_mode.child.id(), "VmRSS:");
    drop(procs);
    drop(file_mode);
    operator.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    let mib = |k: u64| k as f64 / 1024.0;
    let result = json!({
        "sidecars": n_sidecars,
        "endpoints": n_eps,
        "samples": latencies.len(),
        "p50_seconds": percentile(&latencies, 0.5),
        "p99_seconds": percentile(&latencies, 0.99),
        "max_seconds": latencies.last().copied().unwrap_or(f64::NAN),
        "rss_kubernetes_mib": mib(rss_kubernetes),
        "rss_file_mib": mib(rss_file),
        "rss_kubernetes_end_mib": mib(rss_kubernetes_end),
        "rss_file_end_mib": mib(rss_file_end),
        "peak_kubernetes_mib": mib(peak_kubernetes),
        "peak_file_mib": mib(peak_file),
    });
    println!("DETOUR_BENCH_RESULT {result}");
    assert!(rss_kubernetes > 0 && rss_file > 0, "could not read memory");
}
