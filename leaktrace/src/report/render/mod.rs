//! Renderers: a symbolized report to text, JSON Lines, folded stacks, pprof or an SVG flame
//! graph. They know nothing of BPF.

pub mod folded;
pub mod json;
pub mod pprof;
pub mod svg;
pub mod text;

use super::snapshot::Snapshot;
use crate::stacks::symbolize::SymbolizedStacks;

/// What every report says about the traced process: its header.
#[derive(Clone, Debug, Default)]
pub struct Header {
    pub pid: u32,
    pub command: String,
    /// The allocator traced: "glibc", "jemalloc", "tcmalloc", "mimalloc", "jemalloc (_rjem_)".
    pub allocator: String,
    /// The module that holds it, as the target names it.
    pub allocator_module: String,
}

/// How text is laid out for where it goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Style {
    /// ANSI colours (a terminal, and no `NO_COLOR`).
    pub color: bool,
    /// Lines are cut to this many columns (a terminal's width).
    pub width: Option<usize>,
}

/// A snapshot with its stacks symbolized: `frames.stack(i)` belongs to `snapshot.stacks[i]`.
pub struct Report<'a> {
    pub header: &'a Header,
    pub snapshot: &'a Snapshot,
    pub frames: &'a SymbolizedStacks,
    pub style: Style,
}

/// A report format (`--format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// For people: a header and the top stacks.
    Text,
    /// One JSON object per report, one per line (the contract in DESIGN.md).
    Json,
    /// Collapsed stacks (outermost frame first, `;`-joined, then outstanding bytes), for
    /// flamegraph.pl, inferno and speedscope.
    Folded,
    /// A gzipped pprof profile.proto (inuse_space/objects, alloc_space/objects).
    Pprof,
    /// An SVG flame graph of outstanding bytes.
    Svg,
}

impl Format {
    /// Appends the rendered report to `out`.
    pub fn render(self, report: &Report<'_>, out: &mut Vec<u8>) -> std::io::Result<()> {
        let render_text: fn(&Report<'_>, &mut String) = match self {
            Self::Text => text::render,
            Self::Folded => folded::render,
            Self::Json => return json::write(report, out),
            Self::Pprof => return pprof::render(report, out),
            Self::Svg => return svg::render(report, out),
        };
        // Text is rendered in `out`'s own buffer: a report can take hundreds of MB, and a copy
        // would double them.
        match String::from_utf8(std::mem::take(out)) {
            Ok(mut text) => {
                render_text(report, &mut text);
                *out = text.into_bytes();
            }
            // Bytes that are not text (a gzipped profile): the text goes after them.
            Err(err) => {
                *out = err.into_bytes();
                let mut text = String::new();
                render_text(report, &mut text);
                out.extend_from_slice(text.as_bytes());
            }
        }
        Ok(())
    }

    /// A report is a whole file (not one of a stream of reports): a file holds only the
    /// latest report, and stdout gets only the final one.
    pub fn is_whole_file(self) -> bool {
        matches!(self, Self::Folded | Self::Pprof | Self::Svg)
    }

    /// The file name extension of a report in this format.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Text => "txt",
            Self::Json => "json",
            Self::Folded => "folded",
            Self::Pprof => "pb.gz",
            Self::Svg => "svg",
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{
        model::{heap::Allocated, stack_table::Origin},
        report::{
            snapshot::{StackSummary, Totals},
            trends::Kind,
        },
        stacks::symbolize::Frame,
    };

    /// A frame of `module` at `address` (which is also its offset in the module).
    pub fn frame(address: u64, symbol: Option<&str>, module: &str) -> Frame {
        Frame {
            address,
            symbol: symbol.map(str::to_owned),
            offset: 1,
            module: Some(module.to_owned()),
            module_offset: address,
            file: symbol.map(|_| "app.c".to_owned()),
            line: symbol.map(|_| 10),
            inlined: false,
            runtime: None,
        }
    }

    /// A report with one stack per entry of `bytes`, each of one block allocated once.
    pub fn report_of(bytes: &[u64]) -> (Header, Snapshot) {
        let header = Header {
            pid: 9,
            command: "app".into(),
            allocator: "glibc".into(),
            allocator_module: "/lib/libc.so.6".into(),
        };
        let snapshot = Snapshot {
            pid: 9,
            timestamp_ms: 1000,
            elapsed_s: 2.0,
            totals: Totals::default(),
            stack_count: bytes.len(),
            stacks: bytes
                .iter()
                .map(|&b| StackSummary {
                    outstanding_bytes: b,
                    outstanding_allocations: 1,
                    growth_bytes_per_s: 0.0,
                    oldest_age_s: 1.0,
                    kind: Kind::Stable,
                    allocated: Allocated { bytes: b, count: 1 },
                    frames: [].into(),
                    truncated: false,
                    origin: Origin::Malloc,
                })
                .collect(),
            rss_bytes: None,
            rss_growth_bytes_per_s: None,
            watched: Vec::new(),
            leak_stacks: 0,
            last: true,
            sample_bytes: None,
            gaps: Vec::new(),
        };
        (header, snapshot)
    }
}
