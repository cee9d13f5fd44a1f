//! `detour demo`: three simulated pods, the sidecar in front of them, and a scripted timeline of
//! faults (a pod killed, a pod answering 502, a pod hanging; one at a time, each healed before
//! the next). Two identical clients run at the same time: one through the sidecar, one straight
//! to the pods (as behind a plain Service). The first should see no error while the sidecar's
//! metrics count what it absorbed; the second shows what the same faults cost without detour.
//! Everything runs in this process on 127.0.0.1.

pub mod pod;
pub mod prom;
pub mod traffic;

use std::{
    collections::BTreeMap,
    io::Write,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{sync::watch, task::JoinSet};

use self::{
    pod::{Fault, SimPod},
    prom::Metrics,
    traffic::Traffic,
};
use crate::config::{self, Config, Endpoint, HealthCheckProtocol, Policy, Upstream};
use crate::sidecar::{Options, Sidecar, SidecarHandle};

/// The demo's upstream name (the `upstream` label of every metric).
pub const UPSTREAM: &str = "demo/shop";
const PODS: [&str; 3] = ["shop-0", "shop-1", "shop-2"];
/// The timeline needs room for a fault, its detection and its healing, three times.
const MIN_DURATION: Duration = Duration::from_secs(5);

/// Flags of `detour demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// How long traffic runs; the fault timeline is spread over it (at least 5s).
    #[arg(long, default_value = "36s")]
    pub duration: config::Duration,
    /// After the summary, keep the pods and the sidecar up (serving /metrics) until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
    /// Concurrent client connections of the traffic generator (1-64).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Address of the sidecar's admin server (/metrics, /config); port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub admin: SocketAddr,
    /// How long the client waits for an answer before counting a timeout (an impatient app's
    /// 2s by default).
    #[arg(long, default_value = "2s")]
    pub client_timeout: config::Duration,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            duration: config::Duration::from_secs(36),
            keep_running: false,
            connections: 4,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            client_timeout: config::Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--duration: must be at least {}s, got {got}", MIN_DURATION.as_secs())]
    DurationTooShort { got: config::Duration },
    #[error("--connections: must be 1..=64, got {0}")]
    Connections(usize),
    #[error("--client-timeout: must be greater than 0s")]
    ClientTimeout,
    #[error(transparent)]
    Pod(#[from] pod::Error),
    #[error("starting the sidecar: {0}")]
    Sidecar(#[from] crate::sidecar::Error),
    #[error("the sidecar's metrics: {0}")]
    Metrics(#[from] prom::ParseError),
    #[error("listening for Ctrl-C: {0}")]
    Signal(#[source] std::io::Error),
    #[error("writing the demo's output: {0}")]
    Output(#[from] std::io::Error),
    #[error(
        "the client saw {errors} errors in {requests} requests; first ones:\n  {}",
        examples.join("\n  ")
    )]
    ClientErrors {
        errors: u64,
        requests: u64,
        examples: Vec<String>,
    },
}

/// What one client saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientView {
    pub requests: u64,
    pub errors: u64,
    /// Errors by kind (`traffic::GATEWAY_ANSWER`, `traffic::CONNECTION_FAILED`, ...).
    pub errors_by_kind: BTreeMap<String, u64>,
}

impl ClientView {
    fn of(t: &Traffic) -> ClientView {
        ClientView {
            requests: t.requests(),
            errors: t.errors(),
            errors_by_kind: t
                .errors_by_kind()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }
    }
}

/// What the demo measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub elapsed: Duration,
    /// The client that calls the sidecar.
    pub with_detour: ClientView,
    /// The same client calling the pods directly, at the same time.
    pub without_detour: ClientView,
    /// Failed attempts by cause, as the sidecar counted them.
    pub failed_attempts: BTreeMap<String, u64>,
    pub retries: u64,
    pub rescued: u64,
    pub budget_exhausted: u64,
    pub ejections: u64,
    /// Responses the sidecar answered itself or passed through as 502/503/504.
    pub gateway_errors: u64,
    pub metrics_url: String,
}

/// Runs the demo, printing to stdout.
pub async fn run(args: Args) -> Result<(), Error> {
    let mut out = std::io::stdout();
    run_with(&args, &mut out).await.map(|_| ())
}

/// Runs the demo, writing its display to `out`. Client-visible errors are an `Err`.
pub async fn run_with(args: &Args, out: &mut (dyn Write + Send)) -> Result<Summary, Error> {
    check_args(args)?;
    let mut pods = Vec::new();
    for name in PODS {
        pods.push(SimPod::start(name).await?);
    }
    let opts = Options {
        admin: args.admin,
        ..Options::default()
    };
    let sidecar = Sidecar::start(demo_config(&pods, args.client_timeout.get()), opts).await?;
    let listen = sidecar
        .listener_addr(UPSTREAM)
        .expect("the demo upstream has a listener");
    let metrics_url = format!("http://{}/metrics", sidecar.admin_addr());
    write_intro(out, args, &pods, listen, &metrics_url)?;

    let mut clients = Clients::start(args, listen, &pods);
    let start = Instant::now();
    let baseline = scrape(&sidecar)?;
    play_timeline(
        out,
        &pods,
        &sidecar,
        &clients,
        start,
        args.duration.get(),
        &baseline,
    )
    .await?;
    clients.stop().await;

    let m = scrape(&sidecar)?;
    let summary = summarize(
        start.elapsed(),
        &clients.through_sidecar,
        &clients.direct,
        &m,
        &baseline,
        metrics_url,
    );
    writeln!(out)?;
    write_summary(out, &summary)?;
    if args.keep_running {
        serve_until_interrupted(out, &summary.metrics_url).await?;
    }
    sidecar.shutdown(Duration::from_secs(2)).await;
    drop(pods);

    if summary.with_detour.errors > 0 {
        return Err(Error::ClientErrors {
            errors: summary.with_detour.errors,
            requests: summary.with_detour.requests,
            examples: clients.through_sidecar.first_errors(),
        });
    }
    writeln!(
        out,
        "\nWith detour the client saw 0 errors: every failure above was absorbed by the sidecar. \
         Without it, the same client saw {} errors in {} requests.",
        summary.without_detour.errors, summary.without_detour.requests
    )?;
    out.flush()?;
    Ok(summary)
}

/// Refuses flags the demo cannot run with, naming the flag.
fn check_args(args: &Args) -> Result<(), Error> {
    if args.duration.get() < MIN_DURATION {
        return Err(Error::DurationTooShort { got: args.duration });
    }
    if !(1..=64).contains(&args.connections) {
        return Err(Error::Connections(args.connections));
    }
    if args.client_timeout.is_zero() {
        return Err(Error::ClientTimeout);
    }
    Ok(())
}

/// What runs where, and what the two clients do.
fn write_intro(
    out: &mut (dyn Write + Send),
    args: &Args,
    pods: &[SimPod],
    listen: SocketAddr,
    metrics_url: &str,
) -> std::io::Result<()> {
    writeln!(
        out,
        "detour demo: 3 simulated pods, the detour sidecar in front of them, and two clients"
    )?;
    for p in pods {
        writeln!(out, "  pod {} on {}", p.name(), p.addr())?;
    }
    writeln!(
        out,
        "  sidecar listening on {listen}, metrics at {metrics_url}"
    )?;
    writeln!(
        out,
        "  each client: {} keep-alive connections, GETs and POSTs with Idempotency-Key, for {}; \
         a request unanswered after {} is an error",
        args.connections, args.duration, args.client_timeout
    )?;
    writeln!(
        out,
        "  with detour: through the sidecar; without detour: the same requests straight to the \
         pods in turn (as behind a plain Service), at the same time"
    )?;
    writeln!(out)
}

/// The two identical clients: one through the sidecar, one straight to the pods.
struct Clients {
    through_sidecar: Arc<Traffic>,
    direct: Arc<Traffic>,
    stop: watch::Sender<bool>,
    workers: JoinSet<()>,
}

impl Clients {
    fn start(args: &Args, listen: SocketAddr, pods: &[SimPod]) -> Clients {
        let through_sidecar = Arc::new(Traffic::default());
        let direct = Arc::new(Traffic::default());
        let (stop, stopped) = watch::channel(false);
        let pod_addrs: Vec<SocketAddr> = pods.iter().map(SimPod::addr).collect();
        let mut workers = JoinSet::new();
        for (targets, t) in [(vec![listen], &through_sidecar), (pod_addrs, &direct)] {
            let mut set = traffic::spawn(
                &targets,
                args.connections,
                Duration::from_millis(10),
                args.client_timeout.get(),
                t.clone(),
                stopped.clone(),
            );
            workers.spawn(async move { while set.join_next().await.is_some() {} });
        }
        Clients {
            through_sidecar,
            direct,
            stop,
            workers,
        }
    }

    /// Stops both clients and waits until their last request has ended.
    async fn stop(&mut self) {
        let _ = self.stop.send(true);
        while self.workers.join_next().await.is_some() {}
    }
}

/// Runs the fault timeline until `duration` has passed since `start`, with a progress line
/// every second.
async fn play_timeline(
    out: &mut (dyn Write + Send),
    pods: &[SimPod],
    sidecar: &SidecarHandle,
    clients: &Clients,
    start: Instant,
    duration: Duration,
    baseline: &Metrics,
) -> Result<(), Error> {
    let mut timeline = timeline(duration).into_iter().peekable();
    let mut status = String::from("all pods healthy");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        // Events due now happen before the progress line, so each line shows the current fault.
        while let Some((at, _)) = timeline.peek() {
            if start.elapsed() < *at {
                break;
            }
            let (_, step) = timeline.next().expect("peeked");
            status = step.apply(pods).await?;
            writeln!(out, "{:>5.1}s  >> {status}", start.elapsed().as_secs_f64())?;
        }
        if start.elapsed() >= duration {
            return Ok(());
        }
        let next_event = timeline.peek().map(|(at, _)| start + *at);
        let wake = tokio::time::sleep_until(
            next_event
                .unwrap_or(start + duration)
                .min(start + duration)
                .into(),
        );
        tokio::select! {
            _ = tick.tick() => {
                let m = scrape(sidecar)?;
                let line = progress_line(start.elapsed(), &clients.through_sidecar, &clients.direct, &m, baseline, &status);
                writeln!(out, "{line}")?;
            }
            _ = wake => {}
        }
    }
}

/// `--keep-running`: the pods and the sidecar stay up until SIGINT or SIGTERM.
async fn serve_until_interrupted(
    out: &mut (dyn Write + Send),
    metrics_url: &str,
) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    // Listen before saying so: a Ctrl-C right after the message must not kill the process.
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    writeln!(
        out,
        "\nStill serving {metrics_url} (and the pods); press Ctrl-C to stop."
    )?;
    out.flush()?;
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
/// A policy tuned for a short demo: quick health checks, short ejections, a per-try timeout
/// well below the client's patience, and a request deadline just inside it (so the sidecar,
/// not the client's timer, reports a request nothing could answer).
fn demo_policy(client_timeout: Duration) -> Policy {
    let mut p = Policy::default();
    p.health_check.protocol = HealthCheckProtocol::Http;
    p.health_check.interval = config::Duration::from_millis(300);
    p.health_check.timeout = config::Duration::from_millis(200);
    p.health_check.jitter = config::Duration::from_millis(50);
    p.outlier_detection.base_ejection_time = config::Duration::from_secs(2);
    p.outlier_detection.max_ejection_time = config::Duration::from_secs(10);
    // A healthy pod answers in about a millisecond; a quarter of the client's patience (500 ms
    // for the default 2 s) leaves room for a busy laptop while three tries still fit.
    let per_try = (client_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
    p.retries.per_try_timeout = config::Duration::from_millis(per_try.as_millis() as u64);
    p.retries.budget.min_per_second = 20;
    let deadline = client_timeout
        .saturating_sub(Duration::from_millis(200))
        .max(Duration::from_secs(1));
    p.timeouts.request = config::Duration::from_millis(deadline.as_millis() as u64);
    p.timeouts.connect = config::Duration::from_millis(250);
    // One pod down out of three must not trigger panic mode (33% < 50% would).
    p.panic_threshold = 30;
    p
}

fn demo_config(pods: &[SimPod], client_timeout: Duration) -> Config {
    let mut cfg = Config::empty();
    cfg.upstreams.push(Upstream {
        name: UPSTREAM.to_string(),
        listen: "127.0.0.1:0".to_string(),
        workload_selector: None,
        endpoints: pods
            .iter()
            .map(|p| Endpoint {
                address: p.addr().to_string(),
                pod: Some(p.name().to_string()),
                state: config::EndpointState::Ready,
            })
            .collect(),
        policy: demo_policy(client_timeout),
    });
    cfg
}

// === timeline ===

enum Step {
    Kill(usize),
    Revive(usize),
    Fault(usize, Fault),
    Heal(usize),
}

impl Step {
    /// Does the step and describes the pods' state after it.
    async fn apply(self, pods: &[SimPod]) -> Result<String, pod::Error> {
        Ok(match self {
            Step::Kill(i) => {
                pods[i].kill().await?;
                format!("{} killed (connections refused)", pods[i].name())
            }
            Step::Revive(i) => {
                pods[i].revive().await?;
                format!("{} back; all pods healthy", pods[i].name())
            }
            Step::Fault(i, f) => {
                let what = match &f {
                    Fault::Always502 => "answers every request with 502".to_string(),
                    Fault::Hang => "hangs (reads requests, never answers)".to_string(),
                    other => format!("{other:?}"),
                };
                pods[i].set_fault(f).await?;
                format!("{} {what}", pods[i].name())
            }
            Step::Heal(i) => {
                pods[i].set_fault(Fault::Healthy).await?;
                format!("{} healed; all pods healthy", pods[i].name())
            }
        })
    }
}

/// One fault at a time, each healed before the next, spread over `total`.
fn timeline(total: Duration) -> Vec<(Duration, Step)> {
    let at = |f: f64| total.mul_f64(f);
    vec![
        (at(0.12), Step::Kill(0)),
        (at(0.32), Step::Revive(0)),
        (at(0.42), Step::Fault(1, Fault::Always502)),
        (at(0.60), Step::Heal(1)),
        (at(0.70), Step::Fault(2, Fault::Hang)),
        (at(0.88), Step::Heal(2)),
    ]
}

// === display ===

fn scrape(sidecar: &SidecarHandle) -> Result<Metrics, prom::ParseError> {
    Metrics::parse(&sidecar.metrics_text())
}

fn counter(m: &Metrics, base: &Metrics, name: &str, labels: &[(&str, &str)]) -> u64 {
    let mut all = vec![("upstream", UPSTREAM)];
    all.extend_from_slice(labels);
    (m.sum(name, &all) - base.sum(name, &all)).max(0.0).round() as u64
}

fn failed_attempts(m: &Metrics, base: &Metrics) -> BTreeMap<String, u64> {
    let now = m.by_label(
        "detour_attempt_failures_total",
        &[("upstream", UPSTREAM)],
        "cause",
    );
    let before = base.by_label(
        "detour_attempt_failures_total",
        &[("upstream", UPSTREAM)],
        "cause",
    );
    now.into_iter()
        .map(|(cause, v)| {
            let d = v - before.get(&cause).copied().unwrap_or(0.0);
            (cause, d.max(0.0).round() as u64)
        })
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn progress_line(
    elapsed: Duration,
    traffic: &Traffic,
    direct: &Traffic,
    m: &Metrics,
    base: &Metrics,
    status: &str,
) -> String {
    let absorbed = failed_attempts(m, base);
    let absorbed = if absorbed.is_empty() {
        "none".to_string()
    } else {
        absorbed
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "{:>5.1}s  requests {:>6}  client errors {}  (without detour {})  | sidecar absorbed: {absorbed} | retries {} rescued {} ejections {}  [{status}]",
        elapsed.as_secs_f64(),
        traffic.requests(),
        traffic.errors(),
        direct.errors(),
        counter(m, base, "detour_retries_total", &[]),
        counter(m, base, "detour_requests_rescued_total", &[]),
        counter(m, base, "detour_ejections_total", &[]),
    )
}

fn summarize(
    elapsed: Duration,
    traffic: &Traffic,
    direct: &Traffic,
    m: &Metrics,
    base: &Metrics,
    metrics_url: String,
) -> Summary {
    Summary {
        elapsed,
        with_detour: ClientView::of(traffic),
        without_detour: ClientView::of(direct),
        failed_attempts: failed_attempts(m, base),
        retries: counter(m, base, "detour_retries_total", &[]),
        rescued: counter(m, base, "detour_requests_rescued_total", &[]),
        budget_exhausted: counter(m, base, "detour_retry_budget_exhausted_total", &[]),
        ejections: counter(m, base, "detour_ejections_total", &[]),
        gateway_errors: counter(m, base, "detour_gateway_errors_total", &[]),
        metrics_url,
    }
}

fn write_summary(out: &mut (dyn Write + Send), s: &Summary) -> std::io::Result<()> {
    let row =
        |out: &mut (dyn Write + Send), label: &str, v: u64| writeln!(out, "  {label:<46} {v:>8}");
    writeln!(out, "Summary ({:.1} s)", s.elapsed.as_secs_f64())?;
    write_side_by_side(out, &s.without_detour, &s.with_detour)?;
    writeln!(out, "  {:-<56}", "")?;
    writeln!(out, "  what the sidecar absorbed")?;
    let total: u64 = s.failed_attempts.values().sum();
    row(out, "  failed attempts, all causes", total)?;
    for (cause, n) in &s.failed_attempts {
        row(out, &format!("    {cause}"), *n)?;
    }
    row(out, "  retries", s.retries)?;
    row(out, "  requests rescued by a retry", s.rescued)?;
    row(
        out,
        "  retries refused by the retry budget",
        s.budget_exhausted,
    )?;
    row(out, "  endpoint ejections", s.ejections)?;
    row(out, "  502/503/504 sent to the client", s.gateway_errors)?;
    writeln!(out, "  {:-<56}", "")?;
    writeln!(out, "  metrics: {}", s.metrics_url)?;
    Ok(())
}

/// What the two clients saw, in two columns.
fn write_side_by_side(
    out: &mut (dyn Write + Send),
    without: &ClientView,
    with: &ClientView,
) -> std::io::Result<()> {
    let row = |out: &mut (dyn Write + Send), label: &str, a: String, b: String| {
        writeln!(out, "  {label:<36} {a:>14} {b:>14}")
    };
    writeln!(out, "  {:-<66}", "")?;
    row(
        out,
        "what the clients saw",
        "without detour".into(),
        "with detour".into(),
    )?;
    row(
        out,
        "  requests",
        without.requests.to_string(),
        with.requests.to_string(),
    )?;
    row(
        out,
        "  client-visible errors",
        without.errors.to_string(),
        with.errors.to_string(),
    )?;
    let kinds: std::collections::BTreeSet<&String> = without
        .errors_by_kind
        .keys()
        .chain(with.errors_by_kind.keys())
        .collect();
    for k in kinds {
        let n = |v: &ClientView| v.errors_by_kind.get(k).copied().unwrap_or(0).to_string();
        row(out, &format!("    {k}"), n(without), n(with))?;
    }
    let rate = |v: &ClientView| {
        if v.requests == 0 {
            "-".to_string()
        } else {
            format!(
                "{:.2}%",
                100.0 * (v.requests - v.errors) as f64 / v.requests as f64
            )
        }
    };
    row(out, "  success rate", rate(without), rate(with))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_runs_one_fault_at_a_time_inside_the_run() {
        let t = timeline(Duration::from_secs(36));
        assert_eq!(t.len(), 6);
        assert!(t.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(t.last().unwrap().0 < Duration::from_secs(36));
        // Every fault is healed before the next one starts.
        let mut faulty: Option<usize> = None;
        for (_, step) in &t {
            match step {
                Step::Kill(i) | Step::Fault(i, _) => {
                    assert!(faulty.is_none());
                    faulty = Some(*i);
                }
                Step::Revive(i) | Step::Heal(i) => {
                    assert_eq!(faulty.take(), Some(*i));
                }
            }
        }
        assert!(faulty.is_none());
    }

    #[test]
    fn demo_config_is_valid() {
        for secs in [1, 2, 5, 60] {
            let cfg = demo_config(&[], Duration::from_secs(secs));
            cfg.validate().unwrap();
            let p = &cfg.upstreams[0].policy;
            assert!(
                p.timeouts.request.get()
                    < Duration::from_secs(secs).max(Duration::from_millis(1001))
            );
        }
    }

    #[tokio::test]
    async fn bad_flags_name_the_flag() {
        let mut out = Vec::new();
        let args = Args {
            duration: config::Duration::from_secs(1),
            ..Args::default()
        };
        let e = run_with(&args, &mut out).await.unwrap_err().to_string();
        assert!(e.starts_with("--duration: must be at least 5s"), "{e}");
        let args = Args {
            connections: 0,
            ..Args::default()
        };
        let e = run_with(&args, &mut out).await.unwrap_err().to_string();
        assert!(e.starts_with("--connections"), "{e}");
    }

    #[test]
    fn summary_table_lists_causes() {
        let s = Summary {
            elapsed: Duration::from_secs(36),
            with_detour: ClientView {
                requests: 1234,
                errors: 0,
                errors_by_kind: BTreeMap::new(),
            },
            without_detour: ClientView {
                requests: 1200,
                errors: 30,
                errors_by_kind: BTreeMap::from([
                    (traffic::GATEWAY_ANSWER.to_string(), 20),
                    (traffic::NO_ANSWER.to_string(), 10),
                ]),
            },
            failed_attempts: BTreeMap::from([
                ("connection_refused".to_string(), 1),
                ("upstream_status".to_string(), 3),
            ]),
            retries: 4,
            rescued: 4,
            budget_exhausted: 0,
            ejections: 2,
            gateway_errors: 0,
            metrics_url: "http://127.0.0.1:1/metrics".into(),
        };
        let mut out = Vec::new();
        write_summary(&mut out, &s).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("client-visible errors"), "{text}");
        // Side by side: without detour, then with it.
        let line = |label: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(label))
                .unwrap_or_else(|| panic!("no {label} in {text}"))
                .split_whitespace()
                .rev()
                .take(2)
                .collect::<Vec<_>>()
        };
        assert_eq!(line("client-visible errors"), ["0", "30"]);
        assert_eq!(line("answered 502/503/504"), ["0", "20"]);
        assert_eq!(line("no answer in time"), ["0", "10"]);
        assert_eq!(line("success rate"), ["100.00%", "97.50%"]);
        assert!(text.contains("without detour"), "{text}");
        assert!(text.contains("    connection_refused"), "{text}");
        assert!(text.contains("failed attempts, all causes"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.contains("failed attempts") && l.ends_with(" 4")),
            "{text}"
        );
        assert!(text.contains("http://127.0.0.1:1/metrics"), "{text}");
    }
}
