//! The sidecar's metrics as a real Prometheus sees them: `promtool check metrics` on the
//! `/metrics` output, then a real `prometheus` server (Debian's package) scraping the admin port,
//! queried over its HTTP API until `detour_requests_total` shows up with the right labels.
//!
//! Needs `prometheus` and `promtool` on PATH (`apt-get install -y prometheus`; `.ci/test` installs
//! them). Without them the test fails when `CI=true` and skips with a notice otherwise.
#![forbid(unsafe_code)]

use std::{
    fs,
    io::Write,
    net::{SocketAddr, TcpListener as StdTcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{body::Incoming, server::conn::http1 as server_http1, service::service_fn};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use detour::config::Config;
use detour::sidecar::{Options, Sidecar};

const UPSTREAM: &str = "prom-scrape";
const REQUESTS: usize = 25;
/// Prometheus starts in about a second and scrapes every second; a loaded 2-core machine gets a
/// large margin on top.
const PROMETHEUS_PATIENCE: Duration = Duration::from_secs(90);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_scrapes_the_admin_port() {
    let Some(tools) = Tools::find() else {
        return;
    };
    let tmp = TempDir::new("detour-prometheus-scrape");

    // An upstream and the sidecar in front of it, on 127.0.0.1 only.
    let upstream = start_upstream().await;
    let cfg = Config::from_str_validated(&format!(
        "apiVersion: detour.dev/v1alpha1\n\
         kind: SidecarConfig\n\
         upstreams:\n\
         - name: {UPSTREAM}\n  \
           listen: 127.0.0.1:0\n  \
           endpoints:\n  \
           - address: {upstream}\n    \
             pod: scrape-0\n  \
           policy:\n    \
             healthCheck: {{ interval: 1s, timeout: 500ms }}\n"
    ))
    .expect("test config is valid");
    let hash = cfg.hash();
    let sidecar = Sidecar::start(cfg, Options::default())
        .await
        .expect("sidecar starts");
    let listener = sidecar
        .listener_addr(UPSTREAM)
        .expect("the sidecar listens for the upstream");
    let admin = sidecar.admin_addr();

    for i in 0..REQUESTS {
        let (status, body) = http_get(listener, &format!("/item/{i}")).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "request {i} through the sidecar: {body}"
        );
        assert_eq!(body, "hello from upstream");
    }
    // One upstream 502 (passed through): a per-endpoint failure series for promtool to check.
    let (status, _) = http_get(listener, "/fail").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);

    // 1. The exposition format is what Prometheus's own linter accepts.
    let (status, metrics) = http_get(admin, "/metrics").await;
    assert_eq!(status, StatusCode::OK, "GET /metrics: {metrics}");
    assert!(
        metrics.contains("detour_requests_total{"),
        "/metrics has no detour_requests_total series:\n{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            r#"detour_endpoint_attempt_failures_total{{cause="upstream_status",upstream="{UPSTREAM}",upstream_address="{upstream}",upstream_pod="scrape-0"}}"#
        )),
        "/metrics has no per-endpoint failure series:\n{metrics}"
    );
    let metrics_file = tmp.path().join("metrics.txt");
    fs::write(&metrics_file, &metrics).expect("write metrics");
    let promtool = tools.promtool.clone();
    let check = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run promtool");
        child
            .stdin
            .take()
            .expect("promtool stdin")
            .write_all(metrics.as_bytes())
            .expect("feed promtool");
        child.wait_with_output().expect("promtool finishes")
    })
    .await
    .expect("promtool task");
    assert!(
        check.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n(metrics saved in {})",
        check.status,
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr),
        metrics_file.display()
    );

    // 2. A real Prometheus scrapes the admin port every second.
    let prometheus = Prometheus::start(&tools, &tmp, admin).await;
    let series = prometheus
        .wait_for(
            &format!("detour_requests_total{{upstream=\"{UPSTREAM}\"}}"),
            |s| {
                s.label("status") == Some("200")
                    && s.label("job") == Some("detour")
                    && s.label("instance") == Some(admin.to_string().as_str())
                    && s.value >= REQUESTS as f64
            },
        )
        .await;
    assert_eq!(series.label("upstream"), Some(UPSTREAM));

    // The running config's hash is published the same way (`detour_config_info{hash}`).
    prometheus
        .wait_for("detour_config_info", |s| {
            s.label("hash") == Some(hash.as_str())
        })
        .await;

    drop(prometheus);
    sidecar.shutdown(Duration::from_secs(1)).await;
}

// === impl Tools ===

struct Tools {
    prometheus: PathBuf,
    promtool: PathBuf,
}

impl Tools {
    /// Both binaries, or `None` (skip) outside CI; in CI a missing binary is a failed test.
    fn find() -> Option<Tools> {
        let prometheus = which("prometheus");
        let promtool = which("promtool");
        match (prometheus, promtool) {
            (Some(prometheus), Some(promtool)) => Some(Tools {
                prometheus,
                promtool,
            }),
            _ => {
                let msg = "prometheus and promtool must be on PATH for this test \
                           (Debian: apt-get install -y prometheus; `bash .ci/test` installs it)";
                if std::env::var("CI").as_deref() == Ok("true") {
                    panic!("{msg}");
                }
                eprintln!("SKIPPED prometheus_scrape: {msg}");
                None
            }
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

// === impl Prometheus ===

/// A `prometheus` server in a temporary folder, killed on drop.
struct Prometheus {
    child: Child,
    api: SocketAddr,
    log: PathBuf,
}

/// One sample of an instant query.
#[derive(Debug)]
struct Series {
    labels: serde_json::Map<String, serde_json::Value>,
    value: f64,
}

impl Series {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).and_then(|v| v.as_str())
    }
}

impl Prometheus {
    async fn start(tools: &Tools, tmp: &TempDir, target: SocketAddr) -> Prometheus {
        let config = tmp.path().join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n\
                 - job_name: detour\n  \
                   scrape_interval: 1s\n  \
                   scrape_timeout: 1s\n  \
                   static_configs:\n  \
                   - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let log = tmp.path().join("prometheus.log");
        // The free port is found by binding 127.0.0.1:0 and letting go; another process may take
        // it in between, so a Prometheus that exits at once is started again on a new port.
        for attempt in 1..=3 {
            let api = free_port();
            let data = tmp.path().join(format!("data-{attempt}"));
            let child = Command::new(&tools.prometheus)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--web.listen-address={api}"))
                .arg(format!("--storage.tsdb.path={}", data.display()))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log).expect("create prometheus.log"))
                .spawn()
                .expect("start prometheus");
            let mut prom = Prometheus {
                child,
                api,
                log: log.clone(),
            };
            tokio::time::sleep(Duration::from_millis(500)).await;
            match prom.child.try_wait() {
                Ok(None) => return prom,
                Ok(Some(status)) => eprintln!(
                    "prometheus exited at start ({status}), attempt {attempt}:\n{}",
                    prom.log_tail()
                ),
                Err(e) => panic!("waiting for prometheus: {e}"),
            }
        }
        panic!(
            "prometheus did not stay up on 3 ports; see {}",
            log.display()
        );
    }

    /// Polls an instant query until one series satisfies `want`; panics with what Prometheus
    /// said (query result, target state, its log) after `PROMETHEUS_PATIENCE`.
    async fn wait_for(&self, query: &str, want: impl Fn(&Series) -> bool) -> Series {
        let path = format!("/api/v1/query?query={}", url_encode(query));
        let deadline = Instant::now() + PROMETHEUS_PATIENCE;
        let mut last = String::from("(no answer yet)");
        while Instant::now() < deadline {
            if let Some(body) = try_http_get(self.api, &path).await {
                if let Some(found) = parse_vector(&body).into_iter().find(|s| want(s)) {
                    return found;
                }
                last = body;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let targets = try_http_get(self.api, "/api/v1/targets")
            .await
            .unwrap_or_else(|| "(no answer)".into());
        panic!(
            "no matching series for {query} after {PROMETHEUS_PATIENCE:?}\n\
             last query answer: {last}\ntargets: {targets}\nprometheus log:\n{}",
            self.log_tail()
        );
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The samples of a `{"status":"success","data":{"resultType":"vector","result":[...]}}` answer.
fn parse_vector(body: &str) -> Vec<Series> {
    let Ok(json) = serde_json::from_str::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let Some(result) = json["data"]["result"].as_array() else {
        return Vec::new();
    };
    result
        .iter()
        .filter_map(|r| {
            Some(Series {
                labels: r["metric"].as_object()?.clone(),
                value: r["value"][1].as_str()?.parse().ok()?,
            })
        })
        .collect()
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn free_port() -> SocketAddr {
    StdTcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
}

// === impl TempDir ===

/// A fresh folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Kept when the test failed, for the saved metrics and Prometheus's log.
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

// === HTTP on 127.0.0.1 ===

/// An upstream that answers every request (health checks included) with 200.
async fn start_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                // `/fail...` answers 502, so the scrape also holds per-endpoint failure series.
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let mut r =
                        Response::new(Full::new(Bytes::from_static(b"hello from upstream")));
                    if req.uri().path().starts_with("/fail") {
                        *r.status_mut() = StatusCode::BAD_GATEWAY;
                    }
                    Ok::<_, std::convert::Infallible>(r)
                });
                let _ = server_http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// GET on a fresh connection; panics on any transport error or after `IO_TIMEOUT`.
async fn http_get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    tokio::time::timeout(IO_TIMEOUT, get(addr, path))
        .await
        .unwrap_or_else(|_| panic!("GET http://{addr}{path}: no answer in {IO_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// GET that reports any failure as `None` (Prometheus still starting).
async fn try_http_get(addr: SocketAddr, path: &str) -> Option<String> {
    match tokio::time::timeout(IO_TIMEOUT, get(addr, path)).await {
        Ok(Ok((StatusCode::OK, body))) => Some(body),
        _ => None,
    }
}

async fn get(
    addr: SocketAddr,
    path: &str,
) -> Result<(StatusCode, String), Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
