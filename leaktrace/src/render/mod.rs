//! Renderers: a symbolized report to text or JSON Lines. They know nothing of BPF.

pub mod json;
pub mod text;

use crate::{report::Snapshot, symbolize::Frame};

/// What the user is told about the traced process, once, at attach.
#[derive(Clone, Debug, Default)]
pub struct Target {
    pub pid: u32,
    pub command: String,
    /// The allocator traced: "glibc", "jemalloc", "tcmalloc", "mimalloc", "jemalloc (_rjem_)".
    pub allocator: String,
    /// The module that holds it, as the target names it.
    pub allocator_module: String,
}

/// A snapshot with its stacks symbolized: `frames[i]` belongs to `snapshot.stacks[i]`.
pub struct Report<'a> {
    pub target: &'a Target,
    pub snapshot: &'a Snapshot,
    pub frames: &'a [Vec<Frame>],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// For people: a header and the top stacks.
    Text,
    /// One JSON object per report, one per line (the contract in DESIGN.md).
    Json,
}

impl Format {
    pub fn render(self, report: &Report<'_>, out: &mut String) {
        match self {
            Self::Text => text::render(report, out),
            Self::Json => json::render(report, out),
        }
    }
}
