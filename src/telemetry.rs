//! Logging set-up shared by every subcommand.

use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global subscriber: `RUST_LOG` filters (default `info`, or `warn` for quiet
/// commands such as the demo whose screen is its output); `json` gives one JSON object a line.
pub fn init(format: &str, quiet: bool) {
    let default = if quiet { "warn" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let res = if format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    // A second init (tests) keeps the first subscriber.
    let _ = res;
}
