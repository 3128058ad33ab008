//! `--format svg`: a flame graph of outstanding bytes (inferno, from the folded lines).

use std::io;

use super::{Report, folded};

pub fn render(report: &Report<'_>, out: &mut Vec<u8>) -> io::Result<()> {
    let lines = folded::lines(report);
    let mut options = inferno::flamegraph::Options::default();
    options.title = format!(
        "leaktrace: outstanding bytes · pid {} ({}) · {:.1}s",
        report.header.pid, report.header.command, report.snapshot.elapsed_s
    );
    options.count_name = "bytes".into();
    if lines.is_empty() {
        // inferno refuses an empty graph; an empty trace is still a valid report.
        out.extend_from_slice(
            format!(
                "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg version=\"1.1\" width=\"1200\" height=\"60\" \
                 xmlns=\"http://www.w3.org/2000/svg\"><text x=\"600\" y=\"30\" text-anchor=\"middle\">{}: \
                 no outstanding allocations</text></svg>\n",
                xml_escape(&options.title)
            )
            .as_bytes(),
        );
        return Ok(());
    }
    inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), out)
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::render::tests::{frame, report_of};
    use crate::stacks::symbolize::SymbolizedStacks;

    #[test]
    fn names_the_functions_and_survives_an_empty_report() {
        let frames = vec![vec![
            frame(1, Some("leak_here"), "/bin/app"),
            frame(2, Some("main"), "/bin/app"),
        ]];
        let (header, snapshot) = report_of(&[4096]);
        let mut out = Vec::new();
        render(
            &Report {
                header: &header,
                snapshot: &snapshot,
                frames: &SymbolizedStacks::from(frames.clone()),
                style: Default::default(),
            },
            &mut out,
        )
        .unwrap();
        let svg = String::from_utf8(out).unwrap();
        assert!(svg.contains("<svg"), "{svg}");
        assert!(svg.contains("leak_here"), "{svg}");

        let (header, snapshot) = report_of(&[]);
        let mut out = Vec::new();
        render(
            &Report {
                header: &header,
                snapshot: &snapshot,
                frames: &SymbolizedStacks::default(),
                style: Default::default(),
            },
            &mut out,
        )
        .unwrap();
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("no outstanding allocations")
        );
    }
}
