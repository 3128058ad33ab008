//! The Python part of `cargo xtask bench`: Debian's python3 or another (`--python`), with its
//! default allocator, pymalloc, running an allocation-heavy handler loop (`tests/fixtures/python_bench.py`),
//! untraced, under leaktrace (Python frames on every allocation, `PyObject_*` probed), under
//! `--sample-bytes` and with no-op programs (the cost of the traps alone); then the same handler
//! called 40 Python frames deep, as a web framework calls it, where the walk of the Python
//! frames is most of an allocation's cost. Interleaved by round; with `--baseline`, an earlier
//! build's leaktrace runs beside this one's.
//!
//! Besides the wall-clock time per call, the python process's own CPU time per call (which a
//! loaded machine stretches less: the traps and the BPF programs run on its time) and, from
//! the kernel's run-time statistics of the BPF programs, the program runs (one per trap) and
//! their run time per call.

use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, bail};

use super::{
    Args, Fixture, bench_dir, expect, rotated,
    stats::Summary,
    tracer::{Tracing, cpu_seconds},
};
use crate::{fixture, release_leaktrace, step};

/// Python frames the handler runs under in the deep rows.
const DEEP: u32 = 40;

/// One configuration.
#[derive(Clone, Copy)]
struct Row {
    name: &'static str,
    /// Python frames the handler runs under, besides the loop's own.
    depth: u32,
    /// leaktrace's arguments; `None` runs untraced.
    args: Option<&'static [&'static str]>,
    /// Runs the `--baseline` binary.
    baseline: bool,
}

const fn row(name: &'static str, depth: u32, args: Option<&'static [&'static str]>) -> Row {
    Row {
        name,
        depth,
        args,
        baseline: false,
    }
}

const UNTRACED: Row = row("untraced", 0, None);
const ROWS: [Row; 7] = [
    UNTRACED,
    row("floor (no-op programs)", 0, Some(&["--noop-programs"])),
    row("leaktrace", 0, Some(&[])),
    row("--sample-bytes 512K", 0, Some(&["--sample-bytes", "512K"])),
    row("untraced", DEEP, None),
    row("leaktrace", DEEP, Some(&[])),
    row("--max-depth 16", DEEP, Some(&["--max-depth", "16"])),
];
/// The rows that run again with the `--baseline` binary.
const BASELINE_ROWS: [Row; 3] = [
    row("before: leaktrace", 0, Some(&[])),
    row(
        "before: --sample-bytes 512K",
        0,
        Some(&["--sample-bytes", "512K"]),
    ),
    row("before: leaktrace", DEEP, Some(&[])),
];

/// What one run measured, per handler call.
#[derive(Clone, Copy)]
struct Measure {
    wall_ns: f64,
    /// The python process's CPU time (user + system).
    cpu_ns: f64,
    /// BPF program runs: one per trap.
    runs: Option<f64>,
    bpf_ns: Option<f64>,
}

/// `[round][(depth, name)] -> per call`
pub struct Python {
    /// The interpreter's file name.
    python: String,
    rows: Vec<Row>,
    rounds: Vec<BTreeMap<(u32, &'static str), Measure>>,
}

pub fn python(args: &Args) -> anyhow::Result<Python> {
    let script = fixture("python_bench.py");
    let mut rows = ROWS.to_vec();
    if args.baseline.is_some() {
        rows.extend(BASELINE_ROWS.iter().map(|r| Row {
            baseline: true,
            ..*r
        }));
    }
    let current = release_leaktrace();
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let mut results = BTreeMap::new();
        for row in rotated(&rows, round) {
            step(&format!(
                "python round {}/{}: {}, {} frames deep",
                round + 1,
                args.rounds,
                row.name,
                row.depth
            ));
            let binary = match &args.baseline {
                Some(path) if row.baseline => path.as_path(),
                _ => current.as_path(),
            };
            let measure = run_one(&args.python, &script, binary, row, args.seconds * 4.0)?;
            results.insert((row.depth, row.name), measure);
        }
        rounds.push(results);
    }
    let python = args.python.file_name().map_or_else(
        || args.python.display().to_string(),
        |name| name.to_string_lossy().into_owned(),
    );
    Ok(Python {
        python,
        rows,
        rounds,
    })
}

fn run_one(
    python: &Path,
    script: &Path,
    binary: &Path,
    row: Row,
    seconds: f64,
) -> anyhow::Result<Measure> {
    let mut fixture = Fixture::start_command(Command::new(python).arg(script))?;
    expect(&fixture.line(Duration::from_secs(10))?, "ready")?;
    let tracing = match row.args {
        None => None,
        Some(extra) => {
            let mut extra = extra.to_vec();
            extra.push("--print-program-times");
            Some(Tracing::start_leaktrace(
                binary,
                &extra,
                fixture.pid(),
                &bench_dir(),
            )?)
        }
    };
    let cpu_before = cpu_seconds(fixture.pid());
    fixture.send(&format!("run {seconds} {}", row.depth))?;
    let line = fixture.line(Duration::from_secs_f64(seconds * 50.0 + 30.0))?;
    let cpu_s = cpu_seconds(fixture.pid()) - cpu_before;
    let parsed = line.strip_prefix("python_objects ").and_then(|rest| {
        let (ns, calls) = rest.split_once(' ')?;
        Some((ns.parse::<f64>().ok()?, calls.parse::<f64>().ok()?))
    });
    let Some((wall_ns, calls)) = parsed else {
        bail!("unexpected output of python_bench.py: `{line}`");
    };
    expect(&fixture.line(Duration::from_secs(10))?, "done")?;
    let mut measure = Measure {
        wall_ns,
        cpu_ns: cpu_s * 1e9 / calls,
        runs: None,
        bpf_ns: None,
    };
    if let Some(tracing) = tracing {
        let outcome = tracing.stop()?.context("leaktrace wrote no report")?;
        if outcome.allocations == 0 && !row.args.is_some_and(|a| a.contains(&"--noop-programs")) {
            bail!("leaktrace saw no allocation of python3");
        }
        // The programs also ran while leaktrace attached and detached, a few calls' worth.
        let runs: u64 = outcome.programs.iter().map(|p| p.1).sum();
        let ns: u64 = outcome.programs.iter().map(|p| p.2).sum();
        measure.runs = Some(runs as f64 / calls);
        measure.bpf_ns = Some(ns as f64 / calls);
    }
    fixture.send("quit")?;
    Ok(measure)
}

impl Python {
    fn summary(
        &self,
        f: impl Fn(&BTreeMap<(u32, &'static str), Measure>) -> Option<f64>,
    ) -> Summary {
        Summary::of(self.rounds.iter().filter_map(f))
    }

    pub fn print(&self) {
        println!();
        println!(
            "{} handler loop (tests/fixtures/python_bench.py, pymalloc): per handler call, median [min..max] over rounds",
            self.python
        );
        println!(
            "  {:<5} {:<28} {:>24} {:>26} {:>24} {:>8} {:>8}",
            "depth", "configuration", "wall us", "x untraced", "CPU us", "traps", "BPF us"
        );
        for row in &self.rows {
            let key = (row.depth, row.name);
            let untraced = (row.depth, UNTRACED.name);
            let get = |r: &BTreeMap<_, Measure>, k| r.get(&k).copied();
            let wall = self.summary(|r| Some(get(r, key)?.wall_ns / 1000.0));
            let slowdown = self.summary(|r| Some(get(r, key)?.wall_ns / get(r, untraced)?.wall_ns));
            let cpu = self.summary(|r| Some(get(r, key)?.cpu_ns / 1000.0));
            let runs = self.summary(|r| get(r, key)?.runs);
            let bpf = self.summary(|r| Some(get(r, key)?.bpf_ns? / 1000.0));
            println!(
                "  {:<5} {:<28} {:>24} {:>26} {:>24} {:>8} {:>8}",
                row.depth,
                row.name,
                wall.show(2),
                format!("x{}", slowdown.show(2)),
                cpu.show(2),
                runs.median().map_or("-".into(), |v| format!("{v:.1}")),
                bpf.median().map_or("-".into(), |v| format!("{v:.2}")),
            );
        }
    }
}
