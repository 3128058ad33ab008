//! `--max-overhead PERCENT`: leaktrace watches what its probes cost the target and, above the
//! budget, stops tracing (with a final report, like any other end).
//!
//! Every second it estimates the CPU time that the probes took from the traced processes
//! (`estimate`: the kernel's run-time statistics of each BPF program, plus a measured cost per
//! trap of each probe's kind) and divides it by the CPU time the processes used meanwhile
//! (their process CPU-time clocks, which include the probes' own time: uprobes run in the
//! target's context). One second above the budget ends the trace.
//!
//! Data flows one way: the event loop hands the guard the probes' statistics and the traced
//! pids each second; the guard answers whether to stop, and why.

pub mod estimate;

use std::{collections::BTreeMap, time::Duration};

use leaktrace_common::names::program;

use self::estimate::{Probe, ProbeTime, ProgramRuns, ProgramTraps, overhead_percent, probe_time};
use crate::{attach::probes::AttachSummary, proc::process};

/// How often the guard judges: the window of each estimate.
pub const PERIOD: Duration = Duration::from_secs(1);

/// What `--sample-bytes` the guard suggests: the rate of jemalloc's heap profiler, the bench's.
const SUGGESTED_SAMPLE_BYTES: &str = "512K";

/// Watches the probes' cost against a budget.
pub struct Guard {
    budget_percent: f64,
    traps: ProgramTraps,
    /// The counters at the last check: per program, and each traced process's CPU time.
    last_runs: BTreeMap<String, ProgramRuns>,
    last_cpu_ns: BTreeMap<u32, u64>,
    /// Over the whole trace: the probes' estimated time and the processes' CPU time (ns), and
    /// the highest overhead of a judged window.
    total_probe_ns: f64,
    total_cpu_ns: u64,
    highest_percent: Option<f64>,
}

/// Why the guard stopped the trace, and what to try instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverBudget {
    pub why: String,
    pub advice: String,
}

/// The line that says the guard stopped the trace of `pids`, why, and what to try instead.
pub fn over_budget_line(over: &OverBudget, pids: &str, exit_status: u8) -> String {
    format!(
        "leaktrace: over the overhead budget: {}: stopped tracing, detached from pid {pids} (exit status {exit_status}); the final report covers the trace until then. {}",
        over.why, over.advice
    )
}

/// What to try, given where the probes' time went.
fn advice(time: &ProbeTime) -> String {
    if time.single_steps_ns * 2.0 > time.total_ns() {
        // Sampling skips the programs' work, not the traps: every call still traps.
        "Most of it is the kernel single-stepping probed instructions (see how many probes are single-stepped when leaktrace attaches), which every allocator call pays whatever is traced: --sample-bytes cannot avoid it; trace a less busy instance, or for a shorter time".to_owned()
    } else {
        format!(
            "To trace at a lower cost, try --sample-bytes {SUGGESTED_SAMPLE_BYTES} (a sample of the blocks, reported as estimates)"
        )
    }
}

impl Guard {
    /// A guard for `budget_percent` (of the traced processes' CPU time), for probes whose
    /// programs and kinds `traps` knows.
    pub fn new(budget_percent: f64, traps: ProgramTraps) -> Self {
        Self {
            budget_percent,
            traps,
            last_runs: BTreeMap::new(),
            last_cpu_ns: BTreeMap::new(),
            total_probe_ns: 0.0,
            total_cpu_ns: 0,
            highest_percent: None,
        }
    }

    /// Takes the counters as they are when tracing starts (the probes just attached).
    pub fn start(&mut self, counters: Counters<'_>, pids: impl Iterator<Item = u32>) {
        self.last_runs = runs_of(counters);
        self.last_cpu_ns = cpu_of(pids);
    }

    /// Judges the window since the last check: `pids` are the processes traced now. `Some`
    /// when the probes took more than the budget.
    pub fn check(
        &mut self,
        counters: Counters<'_>,
        pids: impl Iterator<Item = u32>,
    ) -> Option<OverBudget> {
        let (time, cpu_ns) = self.window(counters, pids);
        let percent = overhead_percent(time.total_ns(), cpu_ns)?;
        self.highest_percent = Some(self.highest_percent.map_or(percent, |h| h.max(percent)));
        (percent > self.budget_percent).then(|| OverBudget {
            why: format!(
                "the probes took an estimated {percent:.1}% of the traced CPU time over the last second ({:.1} of {:.1} ms: {:.1} ms in traps, {:.1} of them single-stepping, {:.1} ms in BPF programs), more than --max-overhead {}%",
                time.total_ns() / 1e6,
                cpu_ns as f64 / 1e6,
                time.traps_ns / 1e6,
                time.single_steps_ns / 1e6,
                time.programs_ns / 1e6,
                self.budget_percent
            ),
            advice: advice(&time),
        })
    }

    /// Adds the time since the last check to the trace's totals without judging it (the end of
    /// the trace: a window shorter than the others).
    pub fn finish(&mut self, counters: Counters<'_>, pids: impl Iterator<Item = u32>) {
        self.window(counters, pids);
    }

    /// The probes' estimated time and the processes' CPU time since the last check (ns).
    fn window(
        &mut self,
        counters: Counters<'_>,
        pids: impl Iterator<Item = u32>,
    ) -> (ProbeTime, u64) {
        let runs = runs_of(counters);
        let cpu = cpu_of(pids);
        let window = runs.iter().map(|(program, now)| {
            let before = self.last_runs.get(program).copied().unwrap_or_default();
            (program.as_str(), now.since(before))
        });
        let time = probe_time(&self.traps, window);
        // Only processes seen at both ends: one attached meanwhile (a followed child) counts
        // from its next window, one that exited is gone with its time.
        let cpu_ns: u64 = cpu
            .iter()
            .filter_map(|(pid, &now)| Some(now.saturating_sub(*self.last_cpu_ns.get(pid)?)))
            .sum();
        self.last_runs = runs;
        self.last_cpu_ns = cpu;
        self.total_probe_ns += time.total_ns();
        self.total_cpu_ns += cpu_ns;
        (time, cpu_ns)
    }

    /// What the probes cost over the whole trace, for stderr at the end:
    /// `leaktrace: overhead: ... highest X% in a second (budget Y%)`.
    pub fn summary(&self) -> String {
        let overall = if self.total_cpu_ns > 0 {
            format!(
                "{:.1}%",
                100.0 * self.total_probe_ns / self.total_cpu_ns as f64
            )
        } else {
            "-".to_owned()
        };
        let highest = self
            .highest_percent
            .map_or_else(|| "none judged".to_owned(), |h| format!("{h:.1}%"));
        format!(
            "leaktrace: overhead: the probes took an estimated {:.1} ms of the traced processes' {:.1} ms of CPU time ({overall}); highest in a second {highest} (budget --max-overhead {}%)",
            self.total_probe_ns / 1e6,
            self.total_cpu_ns as f64 / 1e6,
            self.budget_percent
        )
    }
}

/// The counters the guard reads each second.
#[derive(Clone, Copy, Debug)]
pub struct Counters<'a> {
    /// As `Probes::program_stats` gives them: name, runs, run time in ns.
    pub programs: &'a [(String, u64, u64)],
    /// Runs of the session program at returns (`Stats::session_returns`).
    pub session_returns: u64,
}

fn runs_of(counters: Counters<'_>) -> BTreeMap<String, ProgramRuns> {
    counters
        .programs
        .iter()
        .map(|(name, runs, run_time_ns)| {
            let returns = if name == program::ALLOC_SESSION {
                counters.session_returns
            } else {
                0
            };
            (
                name.clone(),
                ProgramRuns {
                    runs: *runs,
                    run_time_ns: *run_time_ns,
                    returns,
                },
            )
        })
        .collect()
}

fn cpu_of(pids: impl Iterator<Item = u32>) -> BTreeMap<u32, u64> {
    pids.filter_map(|pid| Some((pid, process::cpu_time_ns(pid)?)))
        .collect()
}

/// The probes of an attach as the estimate sees them: each program with the kind of its trap,
/// and whether it sits on a function that allocating code calls all the time.
pub fn probes_of(attached: &AttachSummary) -> impl Iterator<Item = Probe<'static>> + '_ {
    attached.probes.iter().map(|probe| Probe {
        program: probe.program,
        kind: probe.kind,
        hot: probe.is_hot(),
    })
}

#[cfg(test)]
mod tests {
    use super::{
        estimate::{ProbeKind, TrapCosts},
        *,
    };

    const COSTS: TrapCosts = TrapCosts {
        entry_emulated_ns: 1000.0,
        entry_single_stepped_ns: 4000.0,
        return_ns: 1500.0,
    };

    fn guard(budget: f64) -> Guard {
        let free = Probe {
            program: "free_entry",
            kind: ProbeKind::SingleStepped,
            hot: true,
        };
        Guard::new(budget, ProgramTraps::new(COSTS, [free]))
    }

    #[test]
    fn a_program_is_charged_the_trap_of_its_hot_probes() {
        use crate::attach::probes::AttachedProbe;
        let probe = |symbol: &str, program, kind| AttachedProbe {
            pid: 1,
            symbol: symbol.to_owned(),
            module: "libc.so.6".to_owned(),
            program,
            kind,
        };
        // Debian's glibc: malloc emulated, valloc (same program, rarely called) single-stepped.
        let attached = AttachSummary {
            probes: vec![
                probe("malloc", program::MALLOC_ENTRY, ProbeKind::Emulated),
                probe("malloc", program::ALLOC_RETURN, ProbeKind::Return),
                probe("valloc", program::MALLOC_ENTRY, ProbeKind::SingleStepped),
                probe("valloc", program::ALLOC_RETURN, ProbeKind::Return),
                probe("munmap", program::MUNMAP_ENTRY, ProbeKind::SingleStepped),
            ],
        };
        let traps = ProgramTraps::new(COSTS, probes_of(&attached));
        assert_eq!(
            traps.per_run_ns(program::MALLOC_ENTRY),
            COSTS.entry_emulated_ns
        );
        assert_eq!(traps.per_run_ns(program::ALLOC_RETURN), COSTS.return_ns);
        assert_eq!(
            traps.per_run_ns(program::MUNMAP_ENTRY),
            COSTS.entry_single_stepped_ns
        );
    }

    fn stats(runs: u64, run_time_ns: u64) -> Vec<(String, u64, u64)> {
        vec![("free_entry".to_owned(), runs, run_time_ns)]
    }

    fn counters(programs: &[(String, u64, u64)]) -> Counters<'_> {
        Counters {
            programs,
            session_returns: 0,
        }
    }

    #[test]
    fn this_process_s_cpu_is_the_denominator() {
        let me = std::process::id();
        let mut g = guard(1.0);
        g.start(counters(&stats(0, 0)), [me].into_iter());
        // Work for 20 ms of CPU time; no probe ran: 0%, within budget.
        let start = process::cpu_time_ns(me).unwrap();
        while process::cpu_time_ns(me).unwrap() < start + 20_000_000 {}
        assert_eq!(g.check(counters(&stats(0, 0)), [me].into_iter()), None);
        assert_eq!(g.highest_percent, Some(0.0));
        // Then, as if free_entry had run 100,000 times (0.4 s of traps) in the next window of
        // at least 10 ms: far over 1%.
        let start = process::cpu_time_ns(me).unwrap();
        while process::cpu_time_ns(me).unwrap() < start + 20_000_000 {}
        let trip = g
            .check(counters(&stats(100_000, 1_000_000)), [me].into_iter())
            .expect("over budget");
        assert!(
            trip.why.ends_with("more than --max-overhead 1%"),
            "{}",
            trip.why
        );
        assert!(
            trip.why.contains("401.0 of ")
                && trip.why.contains(
                    " ms: 400.0 ms in traps, 400.0 of them single-stepping, 1.0 ms in BPF programs)"
                ),
            "{}",
            trip.why
        );
        // Single steps were nearly all of it: sampling would not help.
        assert!(
            trip.advice.contains("--sample-bytes cannot avoid it"),
            "{}",
            trip.advice
        );
        let line = over_budget_line(&trip, "42", 4);
        assert!(
            line.starts_with("leaktrace: over the overhead budget: the probes took an estimated "),
            "{line}"
        );
        assert!(
            line.contains(
                "more than --max-overhead 1%: stopped tracing, detached from pid 42 (exit status 4)"
            ),
            "{line}"
        );
        assert!(!line.contains('\n'));
        assert_eq!(g.total_probe_ns, 1_000_000.0 + 100_000.0 * 4000.0);
        assert!(
            g.summary()
                .starts_with("leaktrace: overhead: the probes took an estimated 401.0 ms"),
            "{}",
            g.summary()
        );
    }

    #[test]
    fn the_advice_follows_where_the_time_went() {
        let time = |traps_ns, single_steps_ns, programs_ns| ProbeTime {
            programs_ns,
            traps_ns,
            single_steps_ns,
        };
        let sample = "try --sample-bytes 512K";
        assert!(advice(&time(3e6, 0.0, 2e6)).contains(sample));
        assert!(
            advice(&time(3e6, 2.5e6, 2e6)).contains(sample),
            "half or less"
        );
        assert!(advice(&time(9e6, 8e6, 1e6)).contains("--sample-bytes cannot avoid it"));
        assert!(advice(&ProbeTime::default()).contains(sample));
    }

    #[test]
    fn a_process_seen_at_one_end_only_is_not_judged() {
        let me = std::process::id();
        let mut g = guard(1.0);
        g.start(counters(&stats(0, 0)), std::iter::empty());
        // A window with this process at its end only: nothing to divide by.
        assert_eq!(g.check(counters(&stats(10, 10)), [me].into_iter()), None);
        assert_eq!(g.highest_percent, None);
        assert!(
            g.summary()
                .ends_with("highest in a second none judged (budget --max-overhead 1%)"),
            "{}",
            g.summary()
        );
        // A pid that does not exist contributes nothing.
        assert_eq!(
            g.check(counters(&stats(20, 20)), [0x7fff_fff0].into_iter()),
            None
        );
    }
}
