//! The `detour` binary: one entry point, one subcommand per role.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "detour",
    version,
    about = "Makes HTTP 502 Bad Gateway rare, and explains it when it happens"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "DETOUR_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the reverse-proxy sidecar from a config file (standalone or fed by the operator).
    Sidecar(detour::sidecar::Args),
    /// Validate a sidecar config file and print every problem with its field path.
    Check {
        /// The config file to check.
        #[arg(long, short)]
        config: std::path::PathBuf,
    },
    /// Run the Kubernetes operator (watches UpstreamPolicy resources).
    Operator(Box<detour::operator::Args>),
    /// Print the UpstreamPolicy CustomResourceDefinition as YAML.
    Crd,
    /// Print Kubernetes manifests with the detour sidecar added to every pod template, exactly
    /// as the operator's admission webhook adds it (for GitOps and clusters without the webhook).
    Inject(detour::operator::inject::Args),
    /// Run the self-contained demo: three simulated pods, the sidecar, traffic and faults.
    Demo(detour::demo::Args),
}

/// A user error is one message and exit code 1: returning `Err` from `main` would print anyhow's
/// `Debug` form, with a stack backtrace whenever `RUST_BACKTRACE` is set.
fn main() {
    if let Err(err) = run(Cli::parse()) {
        eprintln!("{}", error_report(&err));
        std::process::exit(1);
    }
}

/// `error: <what failed>` then each cause on its own line; a cause whose text the line before
/// already quotes (`reading x: <io error>`) is not repeated.
fn error_report(err: &anyhow::Error) -> String {
    let mut out = format!("error: {err}");
    let mut previous = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !previous.contains(&text) {
            out.push_str("\n  caused by: ");
            out.push_str(&text.replace('\n', "\n    "));
        }
        previous = text;
    }
    out
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // The demo's screen is its output: the sidecar's own warnings (ejections...) are what the
    // demo narrates, so only errors are logged there.
    let default_level = match cli.command {
        Command::Demo(_) => "error",
        Command::Crd | Command::Check { .. } | Command::Inject(_) => "warn",
        _ => "info",
    };
    detour::telemetry::init(&cli.log_format, default_level);
    match cli.command {
        Command::Check { config } => {
            let cfg = detour::config::Config::load(&config)
                .with_context(|| format!("{} is not a valid detour config", config.display()))?;
            println!(
                "{}: ok ({} upstreams, hash {})",
                config.display(),
                cfg.upstreams.len(),
                cfg.hash()
            );
            Ok(())
        }
        Command::Crd => {
            print!("{}", detour::api::crd_yaml());
            Ok(())
        }
        Command::Inject(args) => {
            use std::io::Read;
            let stdin = args.filename.as_os_str() == "-";
            let name = if stdin {
                "standard input".to_owned()
            } else {
                args.filename.display().to_string()
            };
            let mut input = String::new();
            if stdin {
                std::io::stdin().read_to_string(&mut input)
            } else {
                std::fs::File::open(&args.filename).and_then(|mut f| f.read_to_string(&mut input))
            }
            .with_context(|| format!("reading {name}"))?;
            let (out, reports) =
                detour::operator::inject::inject_manifests_with_report(&input, &args.settings)
                    .with_context(|| format!("cannot inject {name}"))?;
            for r in &reports {
                eprintln!("{r}");
            }
            print!("{out}");
            Ok(())
        }
        Command::Sidecar(args) => runtime()?
            .block_on(detour::sidecar::run(args))
            .map_err(Into::into),
        Command::Operator(args) => runtime()?
            .block_on(detour::operator::run(*args))
            .map_err(Into::into),
        Command::Demo(args) => runtime()?
            .block_on(detour::demo::run(args))
            .map_err(Into::into),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_below_one_are_refused_naming_the_flag() {
        let parse =
            |threads: &str| Cli::try_parse_from(["detour", "sidecar", "--threads", threads]);
        let err = parse("0")
            .err()
            .expect("--threads 0 is refused")
            .to_string();
        assert!(err.contains("--threads"), "{err}");
        assert!(err.contains("at least 1"), "{err}");
        match parse("3").expect("--threads 3 is fine").command {
            Command::Sidecar(args) => assert_eq!(args.threads, Some(3)),
            _ => panic!("not the sidecar"),
        }
    }
}
