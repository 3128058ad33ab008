//! Keeping watch (`--metrics ADDR`): the numbers of each report, served at `GET /metrics` for
//! Prometheus. Each reporter thread hands its symbolized report to the [`Exporter`], which
//! encodes every process's latest series once per report; the [`server`] answers scrapes
//! from those bytes on the tokio runtime that drains the ring buffer, never waiting on a
//! scraper.

pub mod address;
pub mod exporter;
pub mod server;
pub mod stack_identity;

pub use address::ListenAddr;
pub use exporter::{Exporter, ProcessSeries};

/// Stacks exported per process unless `--metrics-top` says otherwise: enough to see the
/// leak among the caches, few enough to keep Prometheus's series bounded.
pub const DEFAULT_TOP: usize = 20;
