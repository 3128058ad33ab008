//! `--format text`: a header, then the top stacks, each with its frames.

use std::fmt::Write as _;

use super::Report;
use crate::heap::Origin;
use crate::symbolize::Frame;

/// Frames shown per stack; the rest are counted.
const MAX_FRAMES: usize = 12;

pub fn render(report: &Report<'_>, out: &mut String) {
    let s = report.snapshot;
    let t = &s.totals;
    let when = if s.last { "final report" } else { "report" };
    let _ = writeln!(
        out,
        "── leaktrace {when} · pid {} ({}) · {:.1}s ──",
        s.pid, report.target.command, s.elapsed_s
    );
    let target = report.target;
    if !target.allocator.is_empty() {
        let _ = writeln!(
            out,
            "allocator {} in {}",
            target.allocator, target.allocator_module
        );
    }
    let _ = writeln!(
        out,
        "outstanding {} in {} allocations · {} allocations, {} frees since attach · {} frees of older blocks",
        bytes(t.outstanding_bytes),
        t.outstanding_allocations,
        t.allocations,
        t.frees,
        t.unmatched_frees,
    );
    if t.mapped_bytes > 0 {
        let _ = writeln!(out, "of which {} in mmap'd memory", bytes(t.mapped_bytes));
    }
    if t.file_mapped_bytes > 0 {
        let _ = writeln!(
            out,
            "not counted above: {} in {} mappings of files (--file-mappings lists them)",
            bytes(t.file_mapped_bytes),
            t.file_mappings
        );
    }
    if t.lost_events > 0 {
        let _ = writeln!(
            out,
            "WARNING: {} events lost (ring buffer full): this report is incomplete; raise --ringbuf-bytes",
            t.lost_events
        );
    }
    if s.stacks.is_empty() {
        let _ = writeln!(out, "no outstanding allocations since attach");
    }
    for (rank, (stack, frames)) in s.stacks.iter().zip(report.frames).enumerate() {
        let _ = writeln!(
            out,
            "#{:<3} {:>10} in {:>7} allocs  {:>12}/s  oldest {:>6.1}s  {}{}",
            rank + 1,
            bytes(stack.outstanding_bytes),
            stack.outstanding_allocations,
            signed_bytes(stack.growth_bytes_per_s),
            stack.oldest_age_s,
            stack.kind.as_str(),
            match stack.origin {
                Origin::Heap => "",
                Origin::Mapping => "  [mmap]",
                Origin::FileMapping => "  [file mmap]",
            },
        );
        for frame in frames.iter().take(MAX_FRAMES) {
            let _ = writeln!(out, "       {}", frame_line(frame));
        }
        if frames.len() > MAX_FRAMES {
            let _ = writeln!(out, "       ... {} more frames", frames.len() - MAX_FRAMES);
        }
        if stack.truncated {
            // Counted in return addresses, the unit of --max-depth (inlined frames add lines).
            let _ = writeln!(
                out,
                "       … (truncated at {} frame{}: outer callers not captured, see --max-depth)",
                stack.addresses.len(),
                if stack.addresses.len() == 1 { "" } else { "s" }
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

fn frame_line(frame: &Frame) -> String {
    let module = frame
        .module
        .as_deref()
        .map(|m| m.rsplit('/').next().unwrap_or(m));
    let mut line = match (&frame.symbol, module) {
        // Inlined code has no call of its own, so no offset into it.
        (Some(symbol), _) if frame.inlined => symbol.clone(),
        (Some(symbol), _) => format!("{symbol}+{:#x}", frame.offset),
        (None, Some(module)) => format!("{module}+{:#x}", frame.module_offset),
        (None, None) => format!("{:#x}", frame.address),
    };
    if frame.inlined {
        line.push_str(" [inlined]");
    }
    match (&frame.file, frame.line) {
        (Some(file), Some(n)) => {
            let _ = write!(line, " ({file}:{n})");
        }
        (Some(file), None) => {
            let _ = write!(line, " ({file})");
        }
        _ if frame.symbol.is_some() => {
            if let Some(module) = module {
                let _ = write!(line, " ({module})");
            }
        }
        _ => {}
    }
    line
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
    use crate::{
        heap::Origin,
        render::Target,
        report::{Kind, Snapshot, StackSummary, Totals},
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
                ..Totals::default()
            },
            stack_count: 3,
            stacks: vec![StackSummary {
                outstanding_bytes: 409_600,
                outstanding_allocations: 100,
                growth_bytes_per_s: 4096.0,
                oldest_age_s: 2.5,
                kind: Kind::Leak,
                addresses: Box::new([1, 2]),
                truncated: true,
                origin: Origin::Heap,
            }],
            last: false,
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
            },
        ]];
        let target = Target {
            pid: 7,
            command: "./leaky".into(),
            allocator: "jemalloc".into(),
            allocator_module: "/lib/libjemalloc.so.2".into(),
        };
        let mut out = String::new();
        render(
            &Report {
                target: &target,
                snapshot: &snapshot,
                frames: &frames,
            },
            &mut out,
        );
        assert!(out.contains("pid 7 (./leaky)"), "{out}");
        assert!(
            out.contains("\nallocator jemalloc in /lib/libjemalloc.so.2\n"),
            "{out}"
        );
        assert!(out.contains("WARNING: 2 events lost"), "{out}");
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
    }
}
