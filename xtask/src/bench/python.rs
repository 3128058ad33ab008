//! The Python part of `cargo xtask bench`: Debian's python3 running an allocation-heavy
//! handler loop (`tests/fixtures/python_bench.py`), untraced, under leaktrace (Python frames
//! on every allocation, `PyObject_*` probed) and under `--sample-bytes`, interleaved by round.

use std::{collections::BTreeMap, process::Command, time::Duration};

use anyhow::{Context as _, bail};

use super::{
    Args, Config, Fixture, LEAKTRACE, SAMPLED, UNTRACED, bench_dir, expect, rotated,
    stats::Summary, tracer::Tracing,
};
use crate::{fixture, step};

const PYTHON: &str = "/usr/bin/python3.11";
const CONFIGS: [Config; 3] = [UNTRACED, LEAKTRACE, SAMPLED];

/// `[round][config] -> ns per handler call`
pub struct Python {
    rounds: Vec<BTreeMap<&'static str, f64>>,
}

pub fn python(args: &Args) -> anyhow::Result<Python> {
    let script = fixture("python_bench.py");
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let mut results = BTreeMap::new();
        for config in rotated(&CONFIGS, round) {
            step(&format!(
                "python round {}/{}: {}",
                round + 1,
                args.rounds,
                config.name
            ));
            let mut fixture = Fixture::start_command(Command::new(PYTHON).arg(&script))?;
            expect(&fixture.line(Duration::from_secs(10))?, "ready")?;
            let tracing = Tracing::start(config.tracer, fixture.pid(), &bench_dir())?;
            fixture.send(&format!("run {}", args.seconds * 4.0))?;
            let line = fixture.line(Duration::from_secs_f64(args.seconds * 200.0 + 30.0))?;
            let Some(ns) = line.strip_prefix("python_objects ") else {
                bail!("unexpected output of python_bench.py: `{line}`");
            };
            results.insert(config.name, ns.parse::<f64>()?);
            expect(&fixture.line(Duration::from_secs(10))?, "done")?;
            let outcome = tracing.stop()?;
            if config.name == LEAKTRACE.name {
                let outcome = outcome.context("leaktrace wrote no report")?;
                if outcome.allocations == 0 {
                    bail!("leaktrace saw no allocation of python3");
                }
            }
            fixture.send("quit")?;
        }
        rounds.push(results);
    }
    Ok(Python { rounds })
}

impl Python {
    fn summary(&self, f: impl Fn(&BTreeMap<&'static str, f64>) -> Option<f64>) -> Summary {
        Summary::of(self.rounds.iter().filter_map(f))
    }

    pub fn print(&self) {
        println!();
        println!(
            "python3.11 handler loop (tests/fixtures/python_bench.py): us per call, median [min..max] over rounds"
        );
        for config in CONFIGS {
            let us = self.summary(|r| r.get(config.name).map(|ns| ns / 1000.0));
            let slowdown = self.summary(|r| Some(r.get(config.name)? / r.get(UNTRACED.name)?));
            println!(
                "  {:<12} {:>24} us   x{} untraced",
                config.name,
                us.show(2),
                slowdown.show(2)
            );
        }
    }
}
