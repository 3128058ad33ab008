//! `--format text`: a header, then the top stacks, each with its frames.

use std::fmt::Write as _;

use super::{Report, Style};
use crate::{model::stack_table::Origin, report::trends::Kind, stacks::symbolize::Frame};

/// Frames shown per stack; the rest are counted.
const MAX_FRAMES: usize = 12;

pub fn render(report: &Report<'_>, out: &mut String) {
    let s = report.snapshot;
    let t = &s.totals;
    let style = report.style;
    let paint = Paint(style.color);
    let fit = |line: String| cut(&line, style.width);
    let when = if s.last { "final report" } else { "report" };
    // The target's RSS and its trend next to the heap's numbers, in the header line.
    let rss = match (s.rss_bytes, s.rss_growth_bytes_per_s) {
        (Some(rss), Some(rate)) => format!(" · RSS {} ({}/s)", bytes(rss), signed_bytes(rate)),
        (Some(rss), None) => format!(" · RSS {}", bytes(rss)),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "{}",
        paint.bold(&fit(format!(
            "── leaktrace {when} · pid {} ({}) · {:.1}s{rss} ──",
            s.pid, report.header.command, s.elapsed_s
        )))
    );
    let header = report.header;
    if !header.allocator.is_empty() {
        let _ = writeln!(
            out,
            "allocator {} in {}",
            header.allocator, header.allocator_module
        );
    }
    let totals = format!(
        "outstanding {} in {} allocations · {} allocations, {} frees since attach",
        bytes(t.outstanding_bytes),
        t.outstanding_allocations,
        t.allocations,
        t.frees,
    );
    let _ = match s.sample_bytes {
        None => writeln!(
            out,
            "{}",
            fit(format!(
                "{totals} · {} frees of older blocks",
                t.unmatched_frees
            ))
        ),
        Some(sample_bytes) => {
            let _ = writeln!(out, "{}", fit(format!("~{totals}")));
            writeln!(
                out,
                "{}",
                fit(format!(
                    "ESTIMATES from a sample of blocks, one per {} allocated (--sample-bytes): mmap'd memory is exact",
                    bytes(sample_bytes)
                ))
            )
        }
    };
    if t.mapped_bytes > 0 {
        let _ = writeln!(
            out,
            "{}",
            fit(format!(
                "of which {} in mmap'd memory",
                bytes(t.mapped_bytes)
            ))
        );
    }
    if t.file_mapped_bytes > 0 {
        let _ = writeln!(
            out,
            "{}",
            fit(format!(
                "not counted above: {} in {} mappings of files (--file-mappings lists them)",
                bytes(t.file_mapped_bytes),
                t.file_mappings
            ))
        );
    }
    if t.pymalloc_arena_bytes > 0 {
        let _ = writeln!(
            out,
            "{}",
            fit(format!(
                "not counted above: {} in {} pymalloc arenas, whose objects are counted one by one (--pymalloc-arenas lists them)",
                bytes(t.pymalloc_arena_bytes),
                t.pymalloc_arenas
            ))
        );
    }
    if t.lost_events > 0 {
        let _ = writeln!(
            out,
            "{}",
            paint.red(&fit(format!(
                "WARNING: {} events lost (ring buffer full): this report is incomplete; raise --ringbuf-bytes",
                t.lost_events
            )))
        );
    }
    for gap in &s.gaps {
        let _ = writeln!(
            out,
            "{}",
            paint.red(&fit(format!("WARNING: this report is incomplete: {gap}")))
        );
    }
    if s.stacks.is_empty() {
        let _ = writeln!(out, "no outstanding allocations since attach");
    }
    for (rank, (stack, frames)) in s.stacks.iter().zip(report.frames.iter()).enumerate() {
        // Listed for pprof's totals only: holds nothing now.
        if stack.outstanding_bytes == 0 && stack.outstanding_allocations == 0 {
            continue;
        }
        let head = format!(
            "#{:<3} {:>10} in {:>7} allocs  {:>12}/s  oldest {:>6.1}s  ",
            rank + 1,
            bytes(stack.outstanding_bytes),
            stack.outstanding_allocations,
            signed_bytes(stack.growth_bytes_per_s),
            stack.oldest_age_s,
        );
        let kind = format!(
            "{}{}",
            stack.kind.as_str(),
            match stack.origin {
                Origin::Malloc => "",
                Origin::Mmap => "  [mmap]",
                Origin::MmapFile => "  [file mmap]",
                Origin::PymallocArena => "  [pymalloc arena]",
            },
        );
        let line = fit(format!("{head}{kind}"));
        let _ = match line.strip_prefix(&head) {
            Some(kind) => writeln!(out, "{head}{}", paint.kind(stack.kind, kind)),
            None => writeln!(out, "{line}"),
        };
        for frame in frames.iter().take(MAX_FRAMES) {
            let (name, location) = frame_parts(frame);
            let _ = writeln!(out, "{}", compact("       ", &name, &location, style));
        }
        if frames.len() > MAX_FRAMES {
            let _ = writeln!(out, "       ... {} more frames", frames.len() - MAX_FRAMES);
        }
        if stack.truncated {
            // Counted in return addresses, the unit of --max-depth (inlined frames add lines).
            let _ = writeln!(
                out,
                "{}",
                fit(format!(
                    "       … (truncated at {} frame{}: outer callers not captured, see --max-depth)",
                    stack.frames.len(),
                    if stack.frames.len() == 1 { "" } else { "s" }
                ))
            );
        }
    }
    if s.stack_count > s.stacks.len() {
        let _ = writeln!(
            out,
            "... and {} more stacks (--top)",
            s.stack_count - s.stacks.len()
        );
    }
}

/// A frame line that fits the width: the location (file:line) is shortened first, to its file
/// name, then cut; the function name last.
fn compact(indent: &str, name: &str, location: &str, style: Style) -> String {
    let paint = Paint(style.color);
    let full = format!("{indent}{name}{location}");
    let Some(width) = style.width else {
        return format!("{indent}{name}{}", paint.dim(location));
    };
    if full.chars().count() <= width {
        return format!("{indent}{name}{}", paint.dim(location));
    }
    // "/long/path/to/file.c:12)" -> "file.c:12)"
    let short = match location.rsplit_once('/') {
        Some((head, tail)) if head.contains('(') => format!(" ({tail}"),
        _ => location.to_owned(),
    };
    let head = cut(&format!("{indent}{name}"), Some(width));
    let room = width.saturating_sub(head.chars().count());
    format!("{head}{}", paint.dim(&cut(&short, Some(room))))
}

/// `line` cut to `width` characters, with an ellipsis when it was longer.
fn cut(line: &str, width: Option<usize>) -> String {
    match width {
        Some(width) if line.chars().count() > width => {
            let mut cut: String = line.chars().take(width.saturating_sub(1)).collect();
            if width > 0 {
                cut.push('…');
            }
            cut
        }
        _ => line.to_owned(),
    }
}

/// ANSI colours, or nothing.
#[derive(Clone, Copy)]
struct Paint(bool);

impl Paint {
    fn wrap(self, code: &str, text: &str) -> String {
        if self.0 && !text.is_empty() {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn bold(self, text: &str) -> String {
        self.wrap("1", text)
    }

    fn dim(self, text: &str) -> String {
        self.wrap("2", text)
    }

    fn red(self, text: &str) -> String {
        self.wrap("1;31", text)
    }

    fn kind(self, kind: Kind, text: &str) -> String {
        let code = match kind {
            Kind::Leak => "1;31",
            Kind::Growing => "33",
            Kind::Stable => "32",
            Kind::Shrinking => "36",
        };
        self.wrap(code, text)
    }
}

/// A frame as its name (`function+0x1a`, or `module+0xoffset`) and its location
/// (` (file:line)`, or ` (module)`).
fn frame_parts(frame: &Frame) -> (String, String) {
    let module = frame
        .module
        .as_deref()
        .map(|m| m.rsplit('/').next().unwrap_or(m));
    let mut name = match (&frame.symbol, module) {
        // Inlined code has no call of its own, so no offset into it; nor has Python code.
        (Some(symbol), _) if frame.inlined || frame.runtime.is_some() => symbol.clone(),
        (Some(symbol), _) => format!("{symbol}+{:#x}", frame.offset),
        (None, Some(module)) => format!("{module}+{:#x}", frame.module_offset),
        (None, None) => format!("{:#x}", frame.address),
    };
    if frame.inlined {
        name.push_str(" [inlined]");
    }
    let location = match (&frame.file, frame.line) {
        (Some(file), Some(n)) => format!(" ({file}:{n})"),
        (Some(file), None) => format!(" ({file})"),
        _ if frame.symbol.is_some() => module.map_or(String::new(), |m| format!(" ({m})")),
        _ => String::new(),
    };
    (name, location)
}

/// Bytes in binary units, 1 decimal.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn signed_bytes(rate: f64) -> String {
    let sign = if rate < 0.0 { "-" } else { "+" };
    format!("{sign}{}", bytes(rate.abs().round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stacks::symbolize::SymbolizedStacks;
    use crate::{
        model::{heap::Allocated, location::Location},
        report::{
            render::Header,
            snapshot::{Snapshot, StackSummary, Totals},
        },
    };

    #[test]
    fn units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(bytes(409_600), "400.0 KiB");
        assert_eq!(bytes(u64::MAX), "16777216.0 TiB");
        assert_eq!(signed_bytes(-2048.0), "-2.0 KiB");
    }

    #[test]
    fn shows_stacks_frames_and_loss() {
        let snapshot = Snapshot {
            pid: 7,
            timestamp_ms: 0,
            elapsed_s: 3.0,
            totals: Totals {
                outstanding_bytes: 409_600,
                outstanding_allocations: 100,
                lost_events: 2,
                pymalloc_arena_bytes: 3 << 20,
                pymalloc_arenas: 3,
                ..Totals::default()
            },
            stack_count: 3,
            stacks: vec![StackSummary {
                outstanding_bytes: 409_600,
                outstanding_allocations: 100,
                growth_bytes_per_s: 4096.0,
                oldest_age_s: 2.5,
                kind: Kind::Leak,
                allocated: Allocated::default(),
                frames: [1, 2].map(Location::unknown).into(),
                truncated: true,
                origin: Origin::Malloc,
            }],
            rss_bytes: None,
            rss_growth_bytes_per_s: None,
            watched: Vec::new(),
            leak_stacks: 0,
            last: false,
            sample_bytes: None,
            gaps: Vec::new(),
        };
        let frames = vec![vec![
            Frame {
                address: 1,
                symbol: Some("inlined_helper".into()),
                offset: 0,
                module: Some("/tmp/leaky".into()),
                module_offset: 0x1150,
                file: Some("leaky.c".into()),
                line: Some(11),
                inlined: true,
                runtime: None,
            },
            Frame {
                address: 1,
                symbol: Some("leak_site".into()),
                offset: 0x1a,
                module: Some("/tmp/leaky".into()),
                module_offset: 0x1150,
                file: Some("leaky.c".into()),
                line: Some(12),
                inlined: false,
                runtime: None,
            },
            Frame {
                address: 2,
                symbol: None,
                offset: 0,
                module: Some("/lib/libfoo.so".into()),
                module_offset: 0x99,
                file: None,
                line: None,
                inlined: false,
                runtime: None,
            },
        ]];
        let header = Header {
            pid: 7,
            command: "./leaky".into(),
            allocator: "jemalloc".into(),
            allocator_module: "/lib/libjemalloc.so.2".into(),
        };
        let mut out = String::new();
        render(
            &Report {
                header: &header,
                snapshot: &snapshot,
                frames: &SymbolizedStacks::from(frames.clone()),
                style: Default::default(),
            },
            &mut out,
        );
        assert!(out.contains("pid 7 (./leaky)"), "{out}");
        assert!(
            out.contains("\nallocator jemalloc in /lib/libjemalloc.so.2\n"),
            "{out}"
        );
        assert!(out.contains("WARNING: 2 events lost"), "{out}");
        assert!(
            out.contains("\nnot counted above: 3.0 MiB in 3 pymalloc arenas, whose objects"),
            "{out}"
        );
        assert!(out.contains("400.0 KiB in     100 allocs"), "{out}");
        assert!(
            out.contains(
                "libfoo.so+0x99\n       … (truncated at 2 frames: outer callers not captured, see --max-depth)\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "       inlined_helper [inlined] (leaky.c:11)\n       leak_site+0x1a (leaky.c:12)\n"
            ),
            "{out}"
        );
        assert!(out.contains("libfoo.so+0x99"), "{out}");
        assert!(out.contains("... and 2 more stacks"), "{out}");
        assert!(!out.contains('\x1b'), "plain without a terminal");
        assert!(!out.contains("RSS"), "no RSS line when it is unknown");
        assert!(out.contains(" · 0 frees of older blocks\n"), "{out}");
        assert!(!out.contains("ESTIMATES"), "{out}");

        // Under sampling the numbers say they are estimates, and older blocks are unknown.
        let sampled = Snapshot {
            sample_bytes: Some(512 << 10),
            ..snapshot.clone()
        };
        let mut out = String::new();
        render(
            &Report {
                header: &header,
                snapshot: &sampled,
                frames: &SymbolizedStacks::from(frames.clone()),
                style: Default::default(),
            },
            &mut out,
        );
        assert!(
            out.contains(
                "\n~outstanding 400.0 KiB in 100 allocations · 0 allocations, 0 frees since attach\nESTIMATES from a sample of blocks, one per 512.0 KiB allocated (--sample-bytes): mmap'd memory is exact\n"
            ),
            "{out}"
        );
        assert!(!out.contains("older blocks"), "{out}");

        // On a 100-column terminal: colour, the RSS and its trend, every line fits.
        let mut snapshot = snapshot;
        snapshot.rss_bytes = Some(3 << 20);
        snapshot.rss_growth_bytes_per_s = Some(-2048.0);
        let mut frames = frames;
        frames[0][0].file = Some(format!("/very/long/{}/leaky.c", "dir/".repeat(30)));
        let mut out = String::new();
        render(
            &Report {
                header: &header,
                snapshot: &snapshot,
                frames: &SymbolizedStacks::from(frames.clone()),
                style: Style {
                    color: true,
                    width: Some(100),
                },
            },
            &mut out,
        );
        assert!(
            out.contains(
                "── leaktrace report · pid 7 (./leaky) · 3.0s · RSS 3.0 MiB (-2.0 KiB/s) ──"
            ),
            "{out}"
        );
        assert!(out.contains("\x1b[1;31mleak\x1b[0m\n"), "{out}");
        assert!(
            out.contains("leak_site+0x1a\x1b[2m (leaky.c:12)\x1b[0m"),
            "{out}"
        );
        for line in out.lines() {
            let visible = line
                .replace("\x1b[0m", "")
                .replace("\x1b[1m", "")
                .replace("\x1b[2m", "")
                .replace("\x1b[1;31m", "");
            assert!(visible.chars().count() <= 100, "{visible:?}");
        }
    }

    #[test]
    fn cuts_to_the_width() {
        assert_eq!(cut("abcdef", Some(4)), "abc…");
        assert_eq!(cut("abcd", Some(4)), "abcd");
        assert_eq!(cut("abcd", None), "abcd");
        assert_eq!(cut("abcd", Some(0)), "");
        let narrow = Style {
            color: false,
            width: Some(12),
        };
        assert_eq!(
            compact("  ", "function_name+0x1", " (a.c:1)", narrow),
            "  function_…"
        );
        assert_eq!(
            compact("  ", "f+0x1", " (/x/y/a.c:1)", narrow),
            "  f+0x1 (a.…"
        );
    }
}
