//! `leaktrace diff OLD.json NEW.json`: which stacks grew between two JSON reports, and by how
//! much. Stacks are matched by their symbolized frames (function names, or module+offset for a
//! frame without a symbol), so two traces of the same program compare even when its addresses
//! moved (ASLR, another run) or the fix shifted line numbers.

use std::{borrow::Cow, collections::HashMap, fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::render::{
    json::{JsonFrame, JsonReport, JsonStack, SCHEMA},
    text::bytes,
};

/// The format of `leaktrace diff` (`--format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffFormat {
    Text,
    Json,
}

/// One report: the last one of a JSON Lines file.
#[derive(Debug)]
pub struct Side {
    pub path: String,
    pub report: JsonReport<'static>,
}

impl Side {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// The last report of `text`, the contents of the file `path`. A report whose counts are
    /// negative, or whose frames are not a list of frames, is refused in one line.
    pub fn parse(path: &str, text: &str) -> anyhow::Result<Self> {
        let line = text
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .with_context(|| {
                format!("{path} is empty: give a report of `leaktrace --format json`")
            })?;
        let report: JsonReport<'static> = serde_json::from_str(line)
            .with_context(|| format!("{path} is not a report of `leaktrace --format json`"))?;
        if report.schema != SCHEMA {
            bail!("{path} is not a report of `leaktrace --format json` (schema {SCHEMA})");
        }
        Ok(Self {
            path: path.to_owned(),
            report,
        })
    }

    fn summary(&self) -> SideSummary<'_> {
        let r = &self.report;
        SideSummary {
            path: &self.path,
            pid: u64::from(r.pid),
            timestamp_ms: r.timestamp_ms,
            elapsed_s: r.elapsed_s,
            outstanding_bytes: r.totals.outstanding_bytes,
            outstanding_allocations: r.totals.outstanding_allocations,
        }
    }

    /// Outstanding bytes and allocations per stack key, with the biggest stack of each key.
    fn stacks(&self) -> HashMap<Vec<String>, (u64, u64, &JsonStack<'static>)> {
        let mut out: HashMap<Vec<String>, (u64, u64, &JsonStack<'static>)> = HashMap::new();
        for stack in &self.report.stacks {
            // The same code path can hold heap blocks and mappings: apart.
            let mut key = stack_key(&stack.frames);
            if !stack.origin.is_empty() && stack.origin != "malloc" {
                key.push(format!("[{}]", stack.origin));
            }
            let entry = out.entry(key).or_insert((0, 0, stack));
            // Numbers read from a file: saturate rather than overflow.
            entry.0 = entry.0.saturating_add(stack.outstanding_bytes);
            entry.1 = entry.1.saturating_add(stack.outstanding_allocations);
        }
        out
    }

    /// Listed fewer stacks than held memory (`--top`).
    fn partial(&self) -> bool {
        self.report.stack_count > self.report.stacks.len()
    }
}

/// A frame's identity across reports: its function's name, or module+offset.
fn frame_key(frame: &JsonFrame<'_>) -> String {
    match &frame.symbol {
        // A Python function's lines are its call sites: no offset tells them apart.
        Some(symbol) if frame.runtime.is_some() => format!("{symbol}:{}", frame.line.unwrap_or(0)),
        Some(symbol) => symbol.to_string(),
        None => format!(
            "{}+{}",
            frame
                .module
                .as_deref()
                .map_or("?", |m| m.rsplit('/').next().unwrap_or(m)),
            frame.module_offset.as_deref().unwrap_or("?")
        ),
    }
}

/// A stack's identity across reports: its frames' keys.
fn stack_key(frames: &[JsonFrame<'_>]) -> Vec<String> {
    frames.iter().map(frame_key).collect()
}

#[derive(Serialize)]
struct SideSummary<'a> {
    path: &'a str,
    pid: u64,
    timestamp_ms: u64,
    elapsed_s: f64,
    outstanding_bytes: u64,
    outstanding_allocations: u64,
}

#[derive(Serialize)]
struct Grown<'a> {
    delta_bytes: i64,
    delta_allocations: i64,
    old_bytes: u64,
    new_bytes: u64,
    old_allocations: u64,
    new_allocations: u64,
    /// The kind in the newer report.
    kind: Cow<'a, str>,
    frames: &'a [JsonFrame<'static>],
}

#[derive(Serialize)]
struct Diff<'a> {
    schema: u32,
    old: SideSummary<'a>,
    new: SideSummary<'a>,
    /// Stacks that grew, most first.
    stacks: Vec<Grown<'a>>,
    /// Stacks that shrank or were freed.
    shrunk_stacks: usize,
    /// A report listed only its top stacks: a stack missing from it is not known to be 0.
    partial: bool,
}

fn diff<'a>(old: &'a Side, new: &'a Side) -> Diff<'a> {
    let before = old.stacks();
    let after = new.stacks();
    let mut stacks = Vec::new();
    let mut shrunk_stacks = 0;
    for (key, &(new_bytes, new_allocations, stack)) in &after {
        let (old_bytes, old_allocations) = before.get(key).map_or((0, 0), |s| (s.0, s.1));
        let delta_bytes = new_bytes as i64 - old_bytes as i64;
        if delta_bytes > 0 {
            stacks.push(Grown {
                delta_bytes,
                delta_allocations: new_allocations as i64 - old_allocations as i64,
                old_bytes,
                new_bytes,
                old_allocations,
                new_allocations,
                kind: Cow::Borrowed(&stack.kind),
                frames: &stack.frames,
            });
        } else if delta_bytes < 0 {
            shrunk_stacks += 1;
        }
    }
    shrunk_stacks += before.keys().filter(|k| !after.contains_key(*k)).count();
    stacks.sort_by(|a, b| {
        b.delta_bytes
            .cmp(&a.delta_bytes)
            .then_with(|| stack_key(a.frames).cmp(&stack_key(b.frames)))
    });
    Diff {
        schema: SCHEMA,
        old: old.summary(),
        new: new.summary(),
        stacks,
        shrunk_stacks,
        partial: old.partial() || new.partial(),
    }
}

/// The diff of two reports, rendered.
pub fn render(old: &Side, new: &Side, format: DiffFormat, top: usize) -> String {
    let mut d = diff(old, new);
    d.stacks.truncate(top);
    match format {
        DiffFormat::Json => {
            let mut out = serde_json::to_string(&d).expect("a diff always serializes");
            out.push('\n');
            out
        }
        DiffFormat::Text => text(&d),
    }
}

fn signed(delta: i64) -> String {
    let sign = if delta < 0 { "-" } else { "+" };
    format!("{sign}{}", bytes(delta.unsigned_abs()))
}

fn text(d: &Diff<'_>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "── leaktrace diff · {} (pid {}, {:.1}s) → {} (pid {}, {:.1}s) ──",
        d.old.path, d.old.pid, d.old.elapsed_s, d.new.path, d.new.pid, d.new.elapsed_s
    );
    let _ = writeln!(
        out,
        "outstanding {} → {} ({}) · {} → {} allocations",
        bytes(d.old.outstanding_bytes),
        bytes(d.new.outstanding_bytes),
        signed(d.new.outstanding_bytes as i64 - d.old.outstanding_bytes as i64),
        d.old.outstanding_allocations,
        d.new.outstanding_allocations,
    );
    if d.stacks.is_empty() {
        let _ = writeln!(out, "no stack grew");
    }
    for (rank, s) in d.stacks.iter().enumerate() {
        let _ = writeln!(
            out,
            "#{:<3} {:>12} ({:+} allocs)  {} → {}  {}",
            rank + 1,
            signed(s.delta_bytes),
            s.delta_allocations,
            bytes(s.old_bytes),
            bytes(s.new_bytes),
            s.kind
        );
        for f in s.frames.iter().take(12) {
            let name = frame_key(f);
            match (f.file.as_deref(), f.line) {
                (Some(file), Some(line)) => {
                    let _ = writeln!(out, "       {name} ({file}:{line})");
                }
                _ => {
                    let _ = writeln!(out, "       {name}");
                }
            }
        }
    }
    if d.shrunk_stacks > 0 {
        let _ = writeln!(
            out,
            "{} {} shrank or {} freed",
            d.shrunk_stacks,
            if d.shrunk_stacks == 1 {
                "stack"
            } else {
                "stacks"
            },
            if d.shrunk_stacks == 1 { "was" } else { "were" }
        );
    }
    if d.partial {
        let _ = writeln!(
            out,
            "note: a report lists only its top stacks; trace with a larger --top to compare all"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn side(path: &str, stacks: Value) -> Side {
        Side {
            path: path.into(),
            report: serde_json::from_value(
                serde_json::json!({"schema": 1, "pid": 5, "timestamp_ms": 0, "elapsed_s": 1.0,
                "totals": {"outstanding_bytes": 0, "outstanding_allocations": 0},
                "stack_count": stacks.as_array().unwrap().len(), "stacks": stacks}),
            )
            .unwrap(),
        }
    }

    fn stack(bytes: u64, n: u64, symbols: &[&str], address: &str) -> Value {
        let frames: Vec<Value> = symbols
            .iter()
            .map(|s| {
                serde_json::json!({"address": address, "symbol": s, "module": "/bin/app",
                                        "module_offset": "0x10", "file": "a.c", "line": 3})
            })
            .collect();
        serde_json::json!({"outstanding_bytes": bytes, "outstanding_allocations": n,
                           "kind": "leak", "frames": frames})
    }

    #[test]
    fn matches_stacks_by_their_functions_and_sorts_by_growth() {
        let old = side(
            "a",
            serde_json::json!([
                stack(100, 1, &["leak", "main"], "0x1"),
                stack(500, 5, &["cache", "main"], "0x2"),
                stack(70, 7, &["gone", "main"], "0x3"),
            ]),
        );
        // New addresses (another run), a new stack, a leak that grew, a cache that shrank.
        let new = side(
            "b",
            serde_json::json!([
                stack(1100, 11, &["leak", "main"], "0x91"),
                stack(50, 1, &["fresh", "main"], "0x92"),
                stack(400, 4, &["cache", "main"], "0x93"),
            ]),
        );
        let v: Value = serde_json::from_str(&render(&old, &new, DiffFormat::Json, 10)).unwrap();
        let grown: Vec<(String, i64, i64)> = v["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["frames"][0]["symbol"].as_str().unwrap().to_owned(),
                    s["delta_bytes"].as_i64().unwrap(),
                    s["delta_allocations"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(grown, [("leak".into(), 1000, 10), ("fresh".into(), 50, 1)]);
        assert_eq!(v["shrunk_stacks"], 2);
        assert_eq!(v["partial"], false);
        let text = render(&old, &new, DiffFormat::Text, 1);
        assert!(
            text.contains("#1        +1000 B (+10 allocs)  100 B → 1.1 KiB  leak"),
            "{text}"
        );
        assert!(text.contains("leak (a.c:3)"), "{text}");
        assert!(!text.contains("fresh"), "--top 1: {text}");
        assert!(text.contains("2 stacks shrank or were freed"), "{text}");

        // The same frames holding an anonymous mapping are another stack.
        let mut mapped = stack(4096, 1, &["leak", "main"], "0x91");
        mapped["origin"] = "mmap".into();
        let newer = side(
            "c",
            serde_json::json!([stack(1100, 11, &["leak", "main"], "0x91"), mapped]),
        );
        let v: Value = serde_json::from_str(&render(&new, &newer, DiffFormat::Json, 10)).unwrap();
        let grown: Vec<i64> = v["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["delta_bytes"].as_i64().unwrap())
            .collect();
        assert_eq!(grown, [4096]);
    }

    #[test]
    fn uses_the_last_report_and_rejects_what_is_not_one() {
        let dir = tempfile::tempdir().unwrap();
        let lines = dir.path().join("r.json");
        fs::write(
            &lines,
            "{\"schema\":1,\"pid\":1,\"stacks\":[]}\n{\"schema\":1,\"pid\":2,\"stacks\":[]}\n\n",
        )
        .unwrap();
        assert_eq!(Side::load(&lines).unwrap().report.pid, 2);
        for (name, contents) in [
            ("empty", ""),
            ("text", "── leaktrace report"),
            ("other", "{\"schema\":2,\"stacks\":[]}"),
            ("no stacks", "{\"schema\":1,\"pid\":2}"),
            ("not numbers", "{\"schema\":1,\"pid\":\"x\",\"stacks\":[]}"),
        ] {
            let path = dir.path().join(name);
            fs::write(&path, contents).unwrap();
            let err = Side::load(&path).unwrap_err().to_string();
            assert!(err.contains("leaktrace --format json"), "{err}");
        }
        assert!(Side::load(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_report_with_impossible_values_is_refused_in_one_line() {
        let good = r#"{"schema":1,"pid":1,"totals":{"outstanding_bytes":1,"outstanding_allocations":1},"stacks":[{"outstanding_bytes":1,"outstanding_allocations":1,"kind":"leak","frames":[{"symbol":"f"}]}]}"#;
        assert!(Side::parse("good.json", good).is_ok());
        for (valid, invalid) in [
            (r#""frames":[{"symbol":"f"}]"#, r#""frames":"f""#),
            (
                r#""outstanding_bytes":1,"outstanding_allocations":1,"kind""#,
                r#""outstanding_bytes":-5,"outstanding_allocations":1,"kind""#,
            ),
            (
                r#""totals":{"outstanding_bytes":1"#,
                r#""totals":{"outstanding_bytes":-1"#,
            ),
            (r#""symbol":"f""#, r#""symbol":7"#),
            (r#""frames":[{"symbol":"f"}]"#, r#""frames":[3]"#),
        ] {
            let text = good.replace(valid, invalid);
            assert_ne!(text, good);
            let err = format!("{:#}", Side::parse("bad.json", &text).unwrap_err());
            assert!(
                err.starts_with("bad.json is not a report of `leaktrace --format json`: "),
                "{invalid}: {err}"
            );
            assert!(!err.contains('\n'), "{err}");
        }
    }
}
