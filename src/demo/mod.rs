//! `detour demo`: three simulated pods, the sidecar, a traffic generator and injected faults.

pub mod pod;
pub mod prom;

/// Flags of `detour demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the demo is not built yet")]
    NotBuilt,
}

pub async fn run(_args: Args) -> Result<(), Error> {
    Err(Error::NotBuilt)
}
