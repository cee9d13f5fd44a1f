//! detour: a Kubernetes operator and sidecar that makes HTTP 502 Bad Gateway rare and explains
//! it when it happens. See `docs/architecture.md` for the map of modules.
#![forbid(unsafe_code)]

mod admin_server;
pub mod api;
pub mod config;
pub mod demo;
pub mod operator;
pub mod report;
pub mod sidecar;
pub mod telemetry;
