//! `--format folded`: collapsed stacks, one line per distinct stack, outermost frame first,
//! frames joined by `;`, then a space and the outstanding bytes. flamegraph.pl, inferno and
//! speedscope read it.

use std::{collections::BTreeMap, fmt::Write as _};

use super::Report;
use crate::stacks::symbolize::Frame;

/// The folded lines of a report, merged (stacks that symbolize alike add up) and sorted.
pub fn lines(report: &Report<'_>) -> Vec<String> {
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for (stack, frames) in report.snapshot.stacks.iter().zip(report.frames.iter()) {
        if stack.outstanding_bytes == 0 || frames.is_empty() {
            continue;
        }
        let mut key = String::new();
        for (i, frame) in frames.iter().rev().enumerate() {
            if i > 0 {
                key.push(';');
            }
            key.push_str(&name(frame));
        }
        *merged.entry(key).or_default() += stack.outstanding_bytes;
    }
    // Each key becomes its line in place: a report of 100,000 deep stacks has tens of MB of
    // them, better not held twice.
    merged
        .into_iter()
        .map(|(mut line, bytes)| {
            let _ = write!(line, " {bytes}");
            line
        })
        .collect()
}

pub fn render(report: &Report<'_>, out: &mut String) {
    for line in lines(report) {
        out.push_str(&line);
        out.push('\n');
    }
}

/// A frame's name in a folded line: the function, else `module+0xoffset`, else the address.
/// `;` separates frames and a line ends at a newline, so neither may appear in a name.
pub fn name(frame: &Frame) -> String {
    let name = match (&frame.symbol, &frame.module) {
        (Some(symbol), _) => symbol.clone(),
        (None, Some(module)) => format!(
            "{}+{:#x}",
            module.rsplit('/').next().unwrap_or(module),
            frame.module_offset
        ),
        (None, None) => format!("{:#x}", frame.address),
    };
    name.replace([';', '\n', '\r'], ":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::render::tests::{frame, report_of};
    use crate::stacks::symbolize::SymbolizedStacks;

    #[test]
    fn outermost_first_merged_and_without_separators_in_names() {
        let frames = vec![
            vec![
                frame(1, Some("leak"), "/bin/app"),
                frame(2, Some("main"), "/bin/app"),
            ],
            vec![
                frame(3, Some("leak"), "/bin/app"),
                frame(2, Some("main"), "/bin/app"),
            ],
            vec![
                frame(4, None, "/lib/libx.so"),
                frame(5, Some("a;b\nc"), "/bin/app"),
            ],
        ];
        let (header, snapshot) = report_of(&[100, 20, 7]);
        let report = Report {
            header: &header,
            snapshot: &snapshot,
            frames: &SymbolizedStacks::from(frames.clone()),
            style: Default::default(),
        };
        assert_eq!(lines(&report), ["a:b:c;libx.so+0x4 7", "main;leak 120"]);
        let mut out = String::new();
        render(&report, &mut out);
        assert_eq!(out, "a:b:c;libx.so+0x4 7\nmain;leak 120\n");
    }
}
