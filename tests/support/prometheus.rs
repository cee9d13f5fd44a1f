//! A real `prometheus` server (Debian's package) for the tests: started on 127.0.0.1 in a
//! temporary folder, scraping given targets every second, queried over its HTTP API, killed on
//! drop. Included with `#[path]` by the tests that need it (`prometheus_scrape`,
//! `observability_prometheus`), next to `mod support`.
//!
//! Needs `prometheus` and `promtool` on PATH (`apt-get install -y prometheus`; `.ci/test` installs
//! them). Without them a test fails when `CI=true` and skips with a notice otherwise.
#![allow(dead_code)]

use std::{
    fs,
    net::{SocketAddr, TcpListener as StdTcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::support::http_client::{get, try_http_get, IO_TIMEOUT};

/// Prometheus starts in about a second and scrapes every second; a loaded 2-core machine gets a
/// large margin on top.
pub const PROMETHEUS_PATIENCE: Duration = Duration::from_secs(90);

// === impl Tools ===

pub struct Tools {
    pub prometheus: PathBuf,
    pub promtool: PathBuf,
}

impl Tools {
    /// Both binaries, or `None` (skip) outside CI; in CI a missing binary is a failed test.
    pub fn find() -> Option<Tools> {
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
                eprintln!("SKIPPED: {msg}");
                None
            }
        }
    }
}

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

// === impl Prometheus ===

/// A `prometheus` server in a temporary folder, killed on drop.
pub struct Prometheus {
    child: Child,
    pub api: SocketAddr,
    log: PathBuf,
}

/// One sample of an instant query.
#[derive(Debug)]
pub struct Series {
    pub labels: serde_json::Map<String, serde_json::Value>,
    pub value: f64,
}

impl Series {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).and_then(|v| v.as_str())
    }
}

impl Prometheus {
    /// Scrapes `target` as job `detour` every second.
    pub async fn start(tools: &Tools, tmp: &TempDir, target: SocketAddr) -> Prometheus {
        Prometheus::start_with(tools, tmp, &scrape_config(target, &[], &[])).await
    }

    /// Runs with the given `prometheus.yml` text.
    pub async fn start_with(tools: &Tools, tmp: &TempDir, config_text: &str) -> Prometheus {
        let config = tmp.path().join("prometheus.yml");
        fs::write(&config, config_text).expect("write prometheus.yml");
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
    pub async fn wait_for(&self, query: &str, want: impl Fn(&Series) -> bool) -> Series {
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

    /// An instant query's samples; panics with Prometheus's answer when it is not a vector.
    pub async fn query(&self, query: &str) -> Vec<Series> {
        self.query_at(query, None).await
    }

    /// An instant query evaluated at `time` (Unix seconds), or now.
    pub async fn query_at(&self, query: &str, time: Option<f64>) -> Vec<Series> {
        let mut args = format!("query={}", url_encode(query));
        if let Some(t) = time {
            args.push_str(&format!("&time={t:.3}"));
        }
        let body = self.api_get("query", &args).await;
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON answer");
        assert_eq!(json["status"], "success", "{query}: {body}");
        parse_vector(&body)
    }

    /// A range query's answer (`data.result` of a matrix), as JSON.
    pub async fn query_range(
        &self,
        query: &str,
        start: f64,
        end: f64,
        step: f64,
    ) -> serde_json::Value {
        let args = format!(
            "query={}&start={start:.3}&end={end:.3}&step={step}",
            url_encode(query)
        );
        let body = self.api_get("query_range", &args).await;
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON answer");
        assert_eq!(json["status"], "success", "{query}: {body}");
        json["data"]["result"].clone()
    }

    async fn api_get(&self, endpoint: &str, args: &str) -> String {
        let path = format!("/api/v1/{endpoint}?{args}");
        match tokio::time::timeout(IO_TIMEOUT, get(self.api, &path)).await {
            Ok(Ok((_, body))) => body,
            Ok(Err(e)) => panic!("GET {path}: {e}\n{}", self.log_tail()),
            Err(_) => panic!("GET {path}: no answer in {IO_TIMEOUT:?}"),
        }
    }

    pub fn log_tail(&self) -> String {
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
pub fn parse_vector(body: &str) -> Vec<Series> {
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

pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn free_port() -> SocketAddr {
    StdTcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
}

// === impl TempDir ===

/// A fresh folder under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
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

/// A `prometheus.yml` scraping `target` (job `detour`) every second with extra target `labels`
/// (what a PodMonitor attaches: `namespace`, `pod`) and `rule_files` evaluated every second.
pub fn scrape_config(target: SocketAddr, labels: &[(&str, &str)], rule_files: &[&Path]) -> String {
    let mut text = String::from("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n");
    if !rule_files.is_empty() {
        text.push_str("rule_files:\n");
        for f in rule_files {
            text.push_str(&format!("- '{}'\n", f.display()));
        }
    }
    text.push_str(&format!(
        "scrape_configs:\n\
         - job_name: detour\n  \
           scrape_interval: 1s\n  \
           scrape_timeout: 1s\n  \
           static_configs:\n  \
           - targets: ['{target}']\n"
    ));
    if !labels.is_empty() {
        text.push_str("    labels:\n");
        for (k, v) in labels {
            text.push_str(&format!("      {k}: '{v}'\n"));
        }
    }
    text
}
