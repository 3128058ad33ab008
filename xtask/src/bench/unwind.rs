//! The unwinding part of `cargo xtask bench`: BPF time per allocation (the kernel's run-time
//! statistics of `alloc_return`, `--print-program-times`) when the stack is walked by frame
//! pointers, and when `--unwind auto` unwinds code without them from `.eh_frame` rows, on the
//! same fixture (`tests/fixtures/malloc_free_loop.c`, malloc/free pairs 8 calls deep) built
//! with and without frame pointers. Issue 13's target: no frame pointers under `auto` at most
//! 1.5x the frame-pointer walk.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Context as _, bail};

use super::{
    Args, Fixture, bench_dir, compile_with, expect, rotated,
    stats::Summary,
    tracer::{Tracer, Tracing},
};
use crate::step;

/// Pairs per line the fixture is sent; two lines per run.
const PAIRS: &str = "200000";
const LINES: usize = 2;

#[derive(Clone, Copy)]
struct Config {
    name: &'static str,
    /// Built with frame pointers?
    frame_pointers: bool,
    tracer: Tracer,
}

const FP: Config = Config {
    name: "fp fixture, --unwind fp",
    frame_pointers: true,
    tracer: Tracer::Leaktrace(&["--unwind", "fp", "--print-program-times"]),
};
const FP_AUTO: Config = Config {
    name: "fp fixture, --unwind auto",
    frame_pointers: true,
    tracer: Tracer::Leaktrace(&["--unwind", "auto", "--print-program-times"]),
};
const NOFP_AUTO: Config = Config {
    name: "no-fp fixture, --unwind auto",
    frame_pointers: false,
    tracer: Tracer::Leaktrace(&["--unwind", "auto", "--print-program-times"]),
};
const NOFP_DWARF: Config = Config {
    name: "no-fp fixture, --unwind dwarf",
    frame_pointers: false,
    tracer: Tracer::Leaktrace(&["--unwind", "dwarf", "--print-program-times"]),
};
const CONFIGS: [Config; 4] = [FP, FP_AUTO, NOFP_AUTO, NOFP_DWARF];

/// One configuration's run.
struct Run {
    ns_per_allocation: f64,
    allocations: u64,
    copies: u64,
}

/// `[round][config] -> run`
pub struct Unwind {
    rounds: Vec<BTreeMap<&'static str, Run>>,
    /// Per round, python3's rows written at attach: (how, rows, ms to write, ms to build).
    row_writes: Vec<Vec<(&'static str, u64, f64, f64)>>,
}

/// How the rows are written, compared on python3 (the largest table of the tests).
const ROW_WRITES: [(&str, &[&str]); 2] = [
    ("batched", &["--unwind", "auto", "--print-row-writes"]),
    (
        "one update per element",
        &[
            "--unwind",
            "auto",
            "--print-row-writes",
            "--rows-one-at-a-time",
        ],
    ),
];
const PYTHON: &str = "/usr/bin/python3.11";

pub fn unwind(args: &Args) -> anyhow::Result<Unwind> {
    let dir = bench_dir();
    let fp = compile_with(
        &dir,
        "malloc_free_loop",
        "malloc_free_loop_fp",
        "-fno-omit-frame-pointer",
    )?;
    let nofp = compile_with(
        &dir,
        "malloc_free_loop",
        "malloc_free_loop_nofp",
        "-fomit-frame-pointer",
    )?;
    let mut rounds = Vec::new();
    let mut row_writes = Vec::new();
    for round in 0..args.rounds {
        let mut writes = Vec::new();
        for (how, extra) in rotated(&ROW_WRITES, round) {
            step(&format!(
                "unwinding round {}/{}: python3's rows, {how}",
                round + 1,
                args.rounds
            ));
            let (rows, write_ms, build_ms) = python_rows(extra, &dir)?;
            writes.push((how, rows, write_ms, build_ms));
        }
        row_writes.push(writes);
        let mut results = BTreeMap::new();
        for config in rotated(&CONFIGS, round) {
            step(&format!(
                "unwinding round {}/{}: {}",
                round + 1,
                args.rounds,
                config.name
            ));
            let binary = if config.frame_pointers { &fp } else { &nofp };
            results.insert(config.name, measure(config, binary, &dir)?);
        }
        rounds.push(results);
    }
    Ok(Unwind { rounds, row_writes })
}

/// Attaches to python3 (`tests/fixtures/python_bench.py`, idle) and returns what leaktrace
/// said of its first write of the rows: rows, ms to write them, ms to build them.
fn python_rows(extra: &'static [&'static str], dir: &Path) -> anyhow::Result<(u64, f64, f64)> {
    let mut fixture = Fixture::start_command(
        std::process::Command::new(PYTHON).arg(crate::fixture("python_bench.py")),
    )?;
    expect(&fixture.line(Duration::from_secs(10))?, "ready")?;
    let tracing = Tracing::start(Tracer::Leaktrace(extra), fixture.pid(), dir)?;
    let outcome = tracing.stop()?.context("leaktrace wrote no report")?;
    fixture.send("quit")?;
    // `leaktrace: wrote N unwinding rows and P pages in T ms (built in B ms)`
    let parsed = outcome.stderr.iter().find_map(|line| {
        let rest = line.strip_prefix("leaktrace: wrote ")?;
        let mut words = rest.split_whitespace();
        let rows = words.next()?.parse().ok()?;
        let write_ms = rest.split(" in ").nth(1)?.split(' ').next()?.parse().ok()?;
        let build_ms = rest
            .split("(built in ")
            .nth(1)?
            .split(' ')
            .next()?
            .parse()
            .ok()?;
        Some((rows, write_ms, build_ms))
    });
    parsed.context("leaktrace did not say how long writing python3's rows took")
}

fn measure(config: Config, binary: &Path, dir: &Path) -> anyhow::Result<Run> {
    let mut fixture = Fixture::start_command(std::process::Command::new(binary).arg(PAIRS))?;
    expect(&fixture.line(Duration::from_secs(10))?, "ready")?;
    let tracing = Tracing::start(config.tracer, fixture.pid(), dir)?;
    for _ in 0..LINES {
        fixture.send("go")?;
        let line = fixture.line(Duration::from_secs(300))?;
        if !line.starts_with("ns_per_pair ") {
            bail!("unexpected output of malloc_free_loop: `{line}`");
        }
        expect(&fixture.line(Duration::from_secs(10))?, "done")?;
    }
    let outcome = tracing.stop()?.context("leaktrace wrote no report")?;
    drop(fixture);
    let Some(&(_, runs, run_time_ns)) = outcome
        .programs
        .iter()
        .find(|(name, _, _)| name == "alloc_return")
    else {
        bail!("leaktrace printed no run time of alloc_return");
    };
    if runs == 0 || outcome.allocations == 0 {
        bail!("leaktrace saw no allocation: it did not trace the fixture");
    }
    Ok(Run {
        ns_per_allocation: run_time_ns as f64 / runs as f64,
        allocations: outcome.allocations,
        copies: outcome.stack_copies.unwrap_or(0),
    })
}

impl Unwind {
    fn summary(&self, f: impl Fn(&BTreeMap<&'static str, Run>) -> Option<f64>) -> Summary {
        Summary::of(self.rounds.iter().filter_map(f))
    }

    pub fn print(&self) {
        println!();
        println!(
            "unwinding: BPF ns per run of alloc_return (kernel run-time statistics), malloc/free pairs 8 calls deep, {LINES} x {PAIRS} pairs per run, median [min..max] over rounds"
        );
        for config in CONFIGS {
            let ns = self.summary(|r| Some(r.get(config.name)?.ns_per_allocation));
            let copies = self.summary(|r| {
                let run = r.get(config.name)?;
                Some(run.copies as f64 / run.allocations as f64 * 100.0)
            });
            println!(
                "  {:<32} {:>22} ns   stack copies {:>18} % of allocations",
                config.name,
                ns.show(0),
                copies.show(1)
            );
        }
        let ratio = |a: Config, b: Config| {
            self.summary(|r| {
                Some(r.get(a.name)?.ns_per_allocation / r.get(b.name)?.ns_per_allocation)
            })
        };
        println!(
            "  ratios within each round: no-fp auto / fp {} (target <= 1.5), fp auto / fp {}, no-fp dwarf / fp {}",
            ratio(NOFP_AUTO, FP).show(2),
            ratio(FP_AUTO, FP).show(2),
            ratio(NOFP_DWARF, FP).show(2)
        );
        println!("python3's unwinding rows written at attach, ms, median [min..max] over rounds:");
        for (how, _) in ROW_WRITES {
            let of = |f: fn(&(&str, u64, f64, f64)) -> f64| {
                Summary::of(
                    self.row_writes
                        .iter()
                        .flatten()
                        .filter(|w| w.0 == how)
                        .map(f),
                )
            };
            println!(
                "  {how:<24} {} rows: written in {:>22} ms, built in {} ms",
                of(|w| w.1 as f64).show(0),
                of(|w| w.2).show(1),
                of(|w| w.3).show(1)
            );
        }
    }
}
