//! `--format json`: one object per report, one per line. Field names and meanings are a
//! contract (DESIGN.md): add fields, never change one.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::Report;
use crate::stacks::symbolize::Frame;

pub const SCHEMA: u32 = 1;

/// One report. `leaktrace diff` reads reports through these same types: every field but
/// `schema` and `stacks` may then be missing (a report of an older leaktrace), and fields it
/// does not know are ignored (a newer one's).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct JsonReport<'a> {
    pub schema: u32,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub timestamp_ms: u64,
    #[serde(default)]
    pub elapsed_s: f64,
    /// False when events were lost or the trace did not see everything the process did
    /// (`incomplete_reasons` says what): the numbers are then a lower bound.
    #[serde(default)]
    pub complete: bool,
    /// Why the report is incomplete, one sentence each; empty when complete.
    #[serde(default)]
    pub incomplete_reasons: Vec<String>,
    /// The last report of the trace.
    #[serde(default)]
    pub last: bool,
    /// `--sample-bytes`, when the numbers about the malloc family are estimates from a sample
    /// of its blocks; null when every block was traced.
    #[serde(default)]
    pub sample_bytes: Option<u64>,
    #[serde(default)]
    pub allocator: Cow<'a, str>,
    #[serde(default)]
    pub allocator_module: Cow<'a, str>,
    /// The target's resident set (VmRSS) and its growth over the trend window.
    #[serde(default)]
    pub rss_bytes: Option<u64>,
    #[serde(default)]
    pub rss_growth_bytes_per_s: Option<f64>,
    #[serde(default)]
    pub totals: JsonTotals,
    /// Stacks that hold memory; `stacks` lists the top of them.
    #[serde(default)]
    pub stack_count: usize,
    pub stacks: Vec<JsonStack<'a>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct JsonTotals {
    pub outstanding_bytes: u64,
    pub outstanding_allocations: u64,
    pub allocations: u64,
    pub frees: u64,
    pub lost_events: u64,
    /// Null under sampling, which cannot tell a block older than the trace from one that was
    /// not drawn.
    pub unmatched_frees: Option<u64>,
    /// Of `outstanding_bytes`, the part in anonymous mappings.
    pub mapped_bytes: u64,
    /// Mappings of files: outstanding, but not in `outstanding_bytes`.
    pub file_mapped_bytes: u64,
    pub file_mappings: u64,
    /// pymalloc's arenas mapped since attach: not in `outstanding_bytes`, which counts the
    /// objects in them.
    pub pymalloc_arena_bytes: u64,
    pub pymalloc_arenas: u64,
    /// Allocator returns seen without their entry: calls in flight at attach (or entries the
    /// BPF side could not record). Such calls are in no other number.
    pub unpaired_returns: u64,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct JsonStack<'a> {
    pub outstanding_bytes: u64,
    pub outstanding_allocations: u64,
    pub growth_bytes_per_s: f64,
    pub oldest_age_s: f64,
    /// `leak`, `growing`, `stable` or `shrinking`.
    pub kind: Cow<'a, str>,
    /// Everything this stack allocated since attach, freed or not.
    pub allocated_bytes: u64,
    pub allocations: u64,
    /// `malloc` (the malloc family), `mmap` (anonymous mappings), `mmap_file` or
    /// `pymalloc_arena`; read as `malloc` when missing.
    pub origin: Cow<'a, str>,
    pub truncated: bool,
    pub frames: Vec<JsonFrame<'a>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct JsonFrame<'a> {
    /// `0x...`.
    pub address: Cow<'a, str>,
    pub symbol: Option<Cow<'a, str>>,
    pub offset: u64,
    pub module: Option<Cow<'a, str>>,
    /// `0x...`, the offset of `address` in `module`'s file.
    pub module_offset: Option<Cow<'a, str>>,
    pub file: Option<Cow<'a, str>>,
    pub line: Option<u32>,
    pub inlined: bool,
    /// `"python"` for a frame of CPython code (`symbol` its qualified name, `file`, `line`);
    /// absent for native frames.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Cow<'a, str>>,
}

impl<'a> From<&'a Frame> for JsonFrame<'a> {
    fn from(frame: &'a Frame) -> Self {
        Self {
            address: format!("{:#x}", frame.address).into(),
            symbol: frame.symbol.as_deref().map(Cow::Borrowed),
            offset: frame.offset,
            module: frame.module.as_deref().map(Cow::Borrowed),
            module_offset: frame
                .runtime
                .is_none()
                .then(|| format!("{:#x}", frame.module_offset).into()),
            file: frame.file.as_deref().map(Cow::Borrowed),
            line: frame.line,
            inlined: frame.inlined,
            runtime: frame.runtime.map(Cow::Borrowed),
        }
    }
}

/// Writes one line (with its newline) to `out`, a stack at a time: a report of 100,000 stacks
/// lists millions of frames, hundreds of MB that need not be held at once.
pub fn write(report: &Report<'_>, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let snapshot = report.snapshot;
    let t = &snapshot.totals;
    let json = JsonReport {
        schema: SCHEMA,
        pid: snapshot.pid,
        timestamp_ms: snapshot.timestamp_ms,
        elapsed_s: round3(snapshot.elapsed_s),
        complete: t.lost_events == 0 && snapshot.gaps.is_empty(),
        incomplete_reasons: (t.lost_events > 0)
            .then(|| format!("{} events lost (ring buffer full)", t.lost_events))
            .into_iter()
            .chain(snapshot.gaps.iter().cloned())
            .collect(),
        last: snapshot.last,
        sample_bytes: snapshot.sample_bytes,
        allocator: report.header.allocator.as_str().into(),
        allocator_module: report.header.allocator_module.as_str().into(),
        rss_bytes: snapshot.rss_bytes,
        rss_growth_bytes_per_s: snapshot.rss_growth_bytes_per_s.map(round3),
        totals: JsonTotals {
            outstanding_bytes: t.outstanding_bytes,
            outstanding_allocations: t.outstanding_allocations,
            allocations: t.allocations,
            frees: t.frees,
            lost_events: t.lost_events,
            unmatched_frees: snapshot.sample_bytes.is_none().then_some(t.unmatched_frees),
            mapped_bytes: t.mapped_bytes,
            file_mapped_bytes: t.file_mapped_bytes,
            file_mappings: t.file_mappings,
            pymalloc_arena_bytes: t.pymalloc_arena_bytes,
            pymalloc_arenas: t.pymalloc_arenas,
            unpaired_returns: t.unpaired_returns,
        },
        stack_count: snapshot.stack_count,
        stacks: Vec::new(),
    };
    // The stacks go out one at a time, after the rest, never as one tree of values: `stacks`
    // is the report's last field, so the line is the same.
    let head = serde_json::to_string(&json).expect("a report always serializes");
    let head = head
        .strip_suffix("[]}")
        .expect("`stacks` is the report's last field");
    out.write_all(head.as_bytes())?;
    out.write_all(b"[")?;
    for (i, (stack, frames)) in snapshot.stacks.iter().zip(report.frames.iter()).enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        let stack = JsonStack {
            outstanding_bytes: stack.outstanding_bytes,
            outstanding_allocations: stack.outstanding_allocations,
            growth_bytes_per_s: round3(stack.growth_bytes_per_s),
            oldest_age_s: round3(stack.oldest_age_s),
            kind: stack.kind.as_str().into(),
            allocated_bytes: stack.allocated.bytes,
            allocations: stack.allocated.count,
            origin: stack.origin.as_str().into(),
            truncated: stack.truncated,
            frames: frames.iter().map(JsonFrame::from).collect(),
        };
        serde_json::to_writer(&mut *out, &stack)?;
    }
    out.write_all(b"]}\n")
}

/// Millisecond precision keeps lines short and stable.
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stacks::symbolize::SymbolizedStacks;
    use crate::{
        model::{heap::Allocated, location::Location, stack_table::Origin},
        report::{
            render::Header,
            snapshot::{Snapshot, StackSummary, Totals},
            trends::Kind,
        },
    };

    fn snapshot() -> Snapshot {
        Snapshot {
            pid: 42,
            timestamp_ms: 1_764_000_000_000,
            elapsed_s: 10.0004,
            totals: Totals {
                outstanding_bytes: 4096,
                outstanding_allocations: 1,
                allocations: 3,
                frees: 2,
                lost_events: 5,
                unmatched_frees: 1,
                mapped_bytes: 0,
                file_mapped_bytes: 8192,
                file_mappings: 1,
                pymalloc_arena_bytes: 1 << 20,
                pymalloc_arenas: 1,
                unpaired_returns: 2,
            },
            stack_count: 1,
            stacks: vec![StackSummary {
                outstanding_bytes: 4096,
                outstanding_allocations: 1,
                growth_bytes_per_s: 409.6,
                oldest_age_s: 9.5,
                kind: Kind::Leak,
                allocated: Allocated {
                    bytes: 8192,
                    count: 2,
                },
                frames: [Location::unknown(0x401136)].into(),
                truncated: false,
                origin: Origin::Malloc,
            }],
            rss_bytes: Some(1 << 20),
            rss_growth_bytes_per_s: Some(1024.0004),
            watched: Vec::new(),
            leak_stacks: 0,
            last: true,
            sample_bytes: None,
            gaps: Vec::new(),
        }
    }

    fn rendered(snapshot: &Snapshot) -> String {
        let frames = vec![vec![Frame {
            address: 0x401136,
            symbol: Some("cache_insert".into()),
            offset: 42,
            module: Some("/usr/bin/app".into()),
            module_offset: 0x1136,
            file: Some("src/cache.c".into()),
            line: Some(17),
            inlined: false,
            runtime: None,
        }]];
        let header = Header {
            pid: 42,
            command: "app".into(),
            allocator: "glibc".into(),
            allocator_module: "/lib/libc.so.6".into(),
        };
        let mut out = Vec::new();
        write(
            &Report {
                header: &header,
                snapshot,
                frames: &SymbolizedStacks::from(frames.clone()),
                style: Default::default(),
            },
            &mut out,
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn follows_the_contract() {
        let out = rendered(&snapshot());
        assert!(out.ends_with('\n'));
        assert_eq!(out.matches('\n').count(), 1);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["schema"], 1);
        assert_eq!(v["pid"], 42);
        assert_eq!(v["timestamp_ms"], 1_764_000_000_000u64);
        assert_eq!(v["elapsed_s"], 10.0);
        assert_eq!(v["complete"], false);
        assert_eq!(v["allocator"], "glibc");
        assert_eq!(v["allocator_module"], "/lib/libc.so.6");
        assert_eq!(
            v["totals"],
            serde_json::json!({"outstanding_bytes": 4096, "outstanding_allocations": 1, "allocations": 3,
                               "frees": 2, "lost_events": 5, "unmatched_frees": 1, "mapped_bytes": 0,
                               "file_mapped_bytes": 8192, "file_mappings": 1,
                               "pymalloc_arena_bytes": 1 << 20, "pymalloc_arenas": 1,
                               "unpaired_returns": 2})
        );
        let stack = &v["stacks"][0];
        assert_eq!(stack["outstanding_bytes"], 4096);
        assert_eq!(stack["outstanding_allocations"], 1);
        assert_eq!(stack["growth_bytes_per_s"], 409.6);
        assert_eq!(stack["oldest_age_s"], 9.5);
        assert_eq!(stack["kind"], "leak");
        // Added fields.
        assert_eq!(stack["allocated_bytes"], 8192);
        assert_eq!(stack["allocations"], 2);
        assert_eq!(v["rss_bytes"], 1 << 20);
        assert_eq!(v["rss_growth_bytes_per_s"], 1024.0);
        assert_eq!(stack["origin"], "malloc");
        assert_eq!(v["sample_bytes"], serde_json::Value::Null);
        assert_eq!(
            stack["frames"][0],
            serde_json::json!({"address": "0x401136", "symbol": "cache_insert", "offset": 42,
                               "module": "/usr/bin/app", "module_offset": "0x1136",
                               "file": "src/cache.c", "line": 17, "inlined": false})
        );
    }

    #[test]
    fn a_report_reads_back_through_the_types_that_wrote_it() {
        let out = rendered(&snapshot());
        let read: JsonReport<'static> = serde_json::from_str(&out).unwrap();
        assert_eq!(serde_json::to_string(&read).unwrap() + "\n", out);
        assert_eq!(
            read.stacks[0].frames[0].symbol.as_deref(),
            Some("cache_insert")
        );
        // Of an older report, only `schema` and `stacks` must be there.
        let old: JsonReport<'static> =
            serde_json::from_str(r#"{"schema": 1, "stacks": [{"frames": [{}]}], "new": 1}"#)
                .unwrap();
        assert_eq!((old.pid, old.stacks[0].frames[0].line), (0, None));
        assert!(serde_json::from_str::<JsonReport<'static>>(r#"{"schema": 1}"#).is_err());
    }

    #[test]
    fn a_sampled_report_says_so_and_leaves_unmatched_frees_unknown() {
        let snapshot = Snapshot {
            sample_bytes: Some(512 << 10),
            ..snapshot()
        };
        let v: serde_json::Value = serde_json::from_str(&rendered(&snapshot)).unwrap();
        assert_eq!(v["sample_bytes"], 512 << 10);
        assert_eq!(v["totals"]["unmatched_frees"], serde_json::Value::Null);
        assert_eq!(v["totals"]["outstanding_bytes"], 4096);
    }

    #[test]
    fn a_report_that_misses_something_says_what_and_is_not_complete() {
        let mut snapshot = snapshot();
        snapshot.totals.lost_events = 0;
        let v: serde_json::Value = serde_json::from_str(&rendered(&snapshot)).unwrap();
        assert_eq!(v["complete"], true);
        assert_eq!(v["incomplete_reasons"], serde_json::json!([]));
        snapshot.gaps = vec!["2 of its 3 forked children were not followed".into()];
        let v: serde_json::Value = serde_json::from_str(&rendered(&snapshot)).unwrap();
        assert_eq!(v["complete"], false);
        assert_eq!(
            v["incomplete_reasons"],
            serde_json::json!(["2 of its 3 forked children were not followed"])
        );
        snapshot.totals.lost_events = 5;
        let v: serde_json::Value = serde_json::from_str(&rendered(&snapshot)).unwrap();
        assert_eq!(
            v["incomplete_reasons"],
            serde_json::json!([
                "5 events lost (ring buffer full)",
                "2 of its 3 forked children were not followed"
            ])
        );
    }
}
