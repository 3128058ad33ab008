//! Integration tests: leaktrace attached to real processes with known ground truth.
//! They load BPF and attach uprobes, so they run as root (`cargo xtask test`).

mod accounting;
mod allocators;
mod formats;
mod hostile;
mod http;
mod lifecycle;
mod metrics;
mod overhead;
mod probes;
mod processes;
mod prometheus;
mod protobuf;
mod python;
mod sampling;
mod service;
mod spawn;
mod stacks;
mod support;
mod trends;
mod unwind;

/// The line of `tests/fixtures/<file>` that contains `text`.
pub(crate) fn line_of(file: &str, text: &str) -> u64 {
    let source = std::fs::read_to_string(format!(
        "{}/../tests/fixtures/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    1 + source
        .lines()
        .position(|line| line.contains(text))
        .expect("text in fixture") as u64
}
