//! What the benchmarks that run as ignored tests share (`operator_scale`, `config_freshness`):
//! sizes from the environment, a process's memory, percentiles, and a kubeconfig for the
//! in-memory API server served over HTTP.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// `name` from the environment as a number, or `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A `/proc/<pid>/status` figure in KiB (`field`: `"VmRSS:"`, `"VmHWM:"`); 0 when unreadable.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The `p` quantile (0..=1, nearest rank) of sorted samples; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Writes `dir/kubeconfig` for a client of the API server at `addr` (plain HTTP, no user),
/// defaulting to `namespace`; returns its path.
pub fn write_kubeconfig(dir: &Path, addr: SocketAddr, namespace: &str) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: mem\n  cluster:\n    server: http://{addr}\nusers:\n- name: mem\n  user: {{}}\ncontexts:\n- name: mem\n  context:\n    cluster: mem\n    user: mem\n    namespace: {namespace}\ncurrent-context: mem\n"
        ),
    )
    .expect("write the kubeconfig");
    path
}
