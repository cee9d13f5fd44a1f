//! `detour sidecar`: the reverse proxy data plane.

/// Flags of `detour sidecar`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the sidecar is not built yet")]
    NotBuilt,
}

pub async fn run(_args: Args) -> Result<(), Error> {
    Err(Error::NotBuilt)
}
