//! `detour operator`: reconciles UpstreamPolicy resources into sidecar config.

/// Flags of `detour operator`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the operator is not built yet")]
    NotBuilt,
}

pub async fn run(_args: Args) -> Result<(), Error> {
    Err(Error::NotBuilt)
}
