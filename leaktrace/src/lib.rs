//! leaktrace's logic as a library: the `leaktrace` binary is a thin CLI over it, and benches
//! (`cargo xtask bench`) drive the heap model, decoding and rendering directly.
//!
//! One module per stage of the data flow, in its order:
//!
//! - [`config`]: the command line.
//! - [`target`]: one owner per traced process: its memory map and the modules it maps.
//! - [`attach`]: the target's allocator, the probe points, the BPF programs; spawn mode.
//! - [`intake`]: ring buffer records decoded and applied, in the event loop.
//! - [`guard`]: what the probes cost the target, against `--max-overhead`.
//! - [`stacks`]: copied stacks unwound, return addresses symbolized.
//! - [`model`]: the heap model (outstanding blocks and mapped ranges, by stack).
//! - [`report`]: snapshots and trends, rendered and written; `leaktrace diff`.
//! - [`metrics`]: the reports' numbers served to Prometheus (`--metrics`).
//! - [`proc`]: what the kernel says about a process (`/proc/PID/...`), and its clock.

pub mod attach;
pub mod config;
#[cfg(test)]
mod fuzz;
pub mod guard;
pub mod intake;
pub mod metrics;
pub mod model;
pub mod proc;
pub mod report;
pub mod stacks;
pub mod stdio;
pub mod target;
