//! The arithmetic of the overhead guard: what the probes cost the target, from the kernel's
//! run-time statistics of each BPF program and a measured cost per trap.
//!
//! A probe hit costs the target two things: the trap (the breakpoint exception, the kernel's
//! uprobe handling, and for an instruction the kernel does not emulate a second trap to
//! single-step it out of line; for a return probe, the trampoline's own trap), which no counter
//! reports, and the BPF program's run, which the kernel times when its run-time statistics are
//! on (`bpf_prog_info.run_time_ns`, `run_cnt`). Both run in the target's context, on its CPU
//! time. So, over a window:
//!
//! ```text
//! probe time = sum over programs of (run_time_ns + run_cnt x trap cost of its probes)
//!            (a session program's runs at returns, which the BPF side counts, at a return's)
//! overhead   = probe time / the target's CPU time (all its threads)
//! ```
//!
//! The kernel counts runs per program, not per probe, and one program runs at several entry
//! points (`malloc_entry` at malloc, valloc and pvalloc). A program is charged, for every run,
//! the dearest kind among its probes on the functions programs call all the time (`hot`:
//! malloc, free, calloc, realloc, operator new and delete, each allocator's own names for
//! them), or among all its probes when none of them is hot: glibc's valloc is single-stepped
//! and its malloc emulated, and charging every malloc a single step would overstate the cost
//! ten times. A program that calls a rare entry point all the time is understated.

use std::collections::BTreeMap;

/// The kinds of probe hit, each with its own trap cost: what attaching found
/// (`attach::probes::AttachSummary`).
pub use crate::attach::probes::ProbeKind;

/// What one hit of each kind costs the target beyond its BPF program, in ns.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrapCosts {
    pub entry_emulated_ns: f64,
    pub entry_single_stepped_ns: f64,
    pub return_ns: f64,
}

/// Measured on the development VM (Firecracker, 2 vCPUs, kernel 6.18, glibc 2.36) on 2026-12-02
/// with `cargo xtask bench --only traps --rounds 7` (medians; in the target thread's CPU time;
/// docs/BENCHMARKS.md): 696 ns [652..800], 12800 ns [10386..14050], 911 ns [670..1198].
/// Another machine's traps cost more or less: the budget is held against an estimate, not a
/// measurement of the target.
pub const MEASURED: TrapCosts = TrapCosts {
    entry_emulated_ns: 700.0,
    entry_single_stepped_ns: 12800.0,
    return_ns: 900.0,
};

impl TrapCosts {
    pub fn of(&self, kind: ProbeKind) -> f64 {
        match kind {
            ProbeKind::Emulated => self.entry_emulated_ns,
            ProbeKind::SingleStepped => self.entry_single_stepped_ns,
            ProbeKind::Return => self.return_ns,
        }
    }

    /// The dearer of two kinds.
    fn dearer(&self, a: ProbeKind, b: ProbeKind) -> ProbeKind {
        if self.of(b) > self.of(a) { b } else { a }
    }

    /// The dearest kind: what a program whose probes are unknown is charged.
    fn dearest(&self) -> ProbeKind {
        [ProbeKind::SingleStepped, ProbeKind::Return]
            .into_iter()
            .fold(ProbeKind::Emulated, |a, b| self.dearer(a, b))
    }
}

/// One attached probe, as the estimate sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe<'a> {
    /// The BPF program that runs there.
    pub program: &'a str,
    pub kind: ProbeKind,
    /// On a function that programs call all the time (malloc, free, ...).
    pub hot: bool,
}

/// The trap cost charged per run of each BPF program: that of the dearest kind among its hot
/// probes, or among all its probes when none is hot.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgramTraps {
    costs: TrapCosts,
    charged: BTreeMap<String, ProbeKind>,
}

impl ProgramTraps {
    pub fn new<'a>(costs: TrapCosts, probes: impl IntoIterator<Item = Probe<'a>>) -> Self {
        // Per program: (dearest hot, dearest of all).
        let mut dearest = BTreeMap::<String, (Option<ProbeKind>, ProbeKind)>::new();
        for probe in probes {
            let (hot, all) = dearest
                .entry(probe.program.to_owned())
                .or_insert((None, probe.kind));
            *all = costs.dearer(*all, probe.kind);
            if probe.hot {
                *hot = Some(hot.map_or(probe.kind, |h| costs.dearer(h, probe.kind)));
            }
        }
        let charged = dearest
            .into_iter()
            .map(|(program, (hot, all))| (program, hot.unwrap_or(all)))
            .collect();
        Self { costs, charged }
    }

    /// The kind charged for each run of `program`: the dearest of all for a program attached
    /// at no probe it knows of.
    pub fn kind(&self, program: &str) -> ProbeKind {
        self.charged
            .get(program)
            .copied()
            .unwrap_or_else(|| self.costs.dearest())
    }

    /// The trap cost charged per run of `program` at an entry.
    pub fn per_run_ns(&self, program: &str) -> f64 {
        self.costs.of(self.kind(program))
    }

    /// The trap cost charged per run of a session program at a return.
    pub fn per_return_ns(&self) -> f64 {
        self.costs.return_ns
    }

    /// Each program it was told of, with the trap cost charged per run.
    pub fn programs(&self) -> impl Iterator<Item = (&str, f64)> {
        self.charged
            .iter()
            .map(|(p, &kind)| (p.as_str(), self.costs.of(kind)))
    }
}

/// The kernel's statistics of one BPF program: runs and total run time since load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramRuns {
    pub runs: u64,
    pub run_time_ns: u64,
    /// Of `runs`, those at a return: a session program runs at the entry of every call and
    /// at the return of a drawn one (the BPF side counts those, `stat::SESSION_RETURNS`).
    pub returns: u64,
}

impl ProgramRuns {
    /// What happened between `earlier` and `self` (counters only grow; one that went back,
    /// which the kernel never does, counts as nothing).
    pub fn since(self, earlier: Self) -> Self {
        Self {
            runs: self.runs.saturating_sub(earlier.runs),
            run_time_ns: self.run_time_ns.saturating_sub(earlier.run_time_ns),
            returns: self.returns.saturating_sub(earlier.returns),
        }
    }
}

/// The target's CPU time that the probes took over a window, in ns.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProbeTime {
    /// Inside the BPF programs (the kernel's statistics).
    pub programs_ns: f64,
    /// In the traps (runs x the trap cost charged; a return trap for a session's return).
    pub traps_ns: f64,
    /// Of `traps_ns`, in traps charged as single steps.
    pub single_steps_ns: f64,
}

impl ProbeTime {
    pub fn total_ns(&self) -> f64 {
        self.programs_ns + self.traps_ns
    }
}

/// The probes' time over a window in which each program ran as `runs` says.
pub fn probe_time<'a>(
    traps: &ProgramTraps,
    runs: impl IntoIterator<Item = (&'a str, ProgramRuns)>,
) -> ProbeTime {
    let mut time = ProbeTime::default();
    for (program, r) in runs {
        // Never more returns than runs, whatever the counters' timing between two reads.
        let returns = r.returns.min(r.runs);
        let entry_trap_ns = (r.runs - returns) as f64 * traps.per_run_ns(program);
        time.programs_ns += r.run_time_ns as f64;
        time.traps_ns += entry_trap_ns + returns as f64 * traps.per_return_ns();
        if traps.kind(program) == ProbeKind::SingleStepped {
            time.single_steps_ns += entry_trap_ns;
        }
    }
    time
}

/// Below this much CPU time in a window (1% of a CPU over a second), a target is not judged:
/// its share would be noise, and the probes cost it next to nothing.
pub const MIN_JUDGED_CPU_NS: u64 = 10_000_000;

/// The overhead in percent: the share of the target's CPU time (`target_cpu_ns`, which includes
/// the probes' own) that the probes took. None when the target ran too little to judge.
pub fn overhead_percent(probe_ns: f64, target_cpu_ns: u64) -> Option<f64> {
    (target_cpu_ns >= MIN_JUDGED_CPU_NS).then(|| 100.0 * probe_ns / target_cpu_ns as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COSTS: TrapCosts = TrapCosts {
        entry_emulated_ns: 1000.0,
        entry_single_stepped_ns: 4000.0,
        return_ns: 1500.0,
    };

    fn probe(program: &str, kind: ProbeKind, hot: bool) -> Probe<'_> {
        Probe { program, kind, hot }
    }

    /// glibc as it is on Debian 12: malloc emulated, valloc single-stepped, both
    /// `malloc_entry`; free and cfree at the same emulated point.
    fn traps() -> ProgramTraps {
        ProgramTraps::new(
            COSTS,
            [
                probe("malloc_entry", ProbeKind::Emulated, true),
                probe("alloc_return", ProbeKind::Return, true),
                probe("malloc_entry", ProbeKind::SingleStepped, false),
                probe("alloc_return", ProbeKind::Return, false),
                probe("free_entry", ProbeKind::Emulated, true),
                probe("free_entry", ProbeKind::Emulated, false),
                // jemalloc's malloc+0 (`cmp`), and its sdallocx moved to a branch.
                probe("jemalloc_entry", ProbeKind::SingleStepped, true),
                probe("jemalloc_entry", ProbeKind::Emulated, true),
                // Only rare entry points: the dearest of them.
                probe("aligned_alloc_entry", ProbeKind::Emulated, false),
                probe("aligned_alloc_entry", ProbeKind::SingleStepped, false),
            ],
        )
    }

    #[test]
    fn a_program_is_charged_the_dearest_trap_among_its_hot_probes() {
        let traps = traps();
        assert_eq!(traps.per_run_ns("malloc_entry"), 1000.0, "valloc is rare");
        assert_eq!(traps.per_run_ns("alloc_return"), 1500.0);
        assert_eq!(traps.per_run_ns("free_entry"), 1000.0);
        assert_eq!(
            traps.per_run_ns("jemalloc_entry"),
            4000.0,
            "the dearer hot one"
        );
        assert_eq!(traps.per_run_ns("aligned_alloc_entry"), 4000.0);
        assert_eq!(traps.kind("malloc_entry"), ProbeKind::Emulated);
        assert_eq!(traps.kind("jemalloc_entry"), ProbeKind::SingleStepped);
        // Attached nowhere it was told of: the dearest of all.
        assert_eq!(traps.per_run_ns("mystery"), 4000.0);
        assert_eq!(traps.kind("mystery"), ProbeKind::SingleStepped);
        assert_eq!(traps.programs().count(), 5);
    }

    #[test]
    fn probe_time_is_run_time_plus_a_trap_per_run() {
        let runs = |runs, run_time_ns| ProgramRuns {
            runs,
            run_time_ns,
            returns: 0,
        };
        // 1000 malloc+free pairs: entries, returns and frees.
        let time = probe_time(
            &traps(),
            [
                ("malloc_entry", runs(1000, 200_000)),
                ("alloc_return", runs(1000, 1_000_000)),
                ("free_entry", runs(1000, 400_000)),
                ("jemalloc_entry", runs(10, 5000)),
            ],
        );
        assert_eq!(
            time,
            ProbeTime {
                programs_ns: 1_605_000.0,
                traps_ns: 1000.0 * (1000.0 + 1500.0 + 1000.0) + 10.0 * 4000.0,
                single_steps_ns: 10.0 * 4000.0,
            }
        );
        assert_eq!(time.total_ns(), 1_605_000.0 + 3_540_000.0);
        assert_eq!(probe_time(&traps(), []), ProbeTime::default());
    }

    #[test]
    fn a_session_s_runs_at_returns_are_charged_a_return_trap() {
        // alloc_session at malloc (emulated, hot) and its return; another at valloc,
        // single-stepped but rare.
        let traps = ProgramTraps::new(
            COSTS,
            [
                probe("alloc_session", ProbeKind::Emulated, true),
                probe("alloc_session", ProbeKind::Return, false),
                probe("alloc_session", ProbeKind::SingleStepped, false),
            ],
        );
        // 1000 calls, 10 of them drawn: 1010 runs, 10 at returns.
        let session = ProgramRuns {
            runs: 1010,
            run_time_ns: 300_000,
            returns: 10,
        };
        let time = probe_time(&traps, [("alloc_session", session)]);
        assert_eq!(
            time,
            ProbeTime {
                programs_ns: 300_000.0,
                traps_ns: 1000.0 * 1000.0 + 10.0 * 1500.0,
                single_steps_ns: 0.0,
            }
        );
        // Every call drawn: an entry and a return trap each.
        let all = ProgramRuns {
            runs: 2000,
            run_time_ns: 0,
            returns: 1000,
        };
        assert_eq!(
            probe_time(&traps, [("alloc_session", all)]).traps_ns,
            1000.0 * (1000.0 + 1500.0)
        );
        // A single-stepped session entry: its returns are no single steps.
        let stepped = ProgramTraps::new(COSTS, [probe("s", ProbeKind::SingleStepped, true)]);
        let time = probe_time(&stepped, [("s", all)]);
        assert_eq!(time.traps_ns, 1000.0 * (4000.0 + 1500.0));
        assert_eq!(time.single_steps_ns, 1000.0 * 4000.0);
        // More returns than runs (counters read apart): at most every run is a return.
        let odd = ProgramRuns {
            runs: 5,
            run_time_ns: 0,
            returns: 7,
        };
        assert_eq!(
            probe_time(&traps, [("alloc_session", odd)]).traps_ns,
            5.0 * 1500.0
        );
    }

    #[test]
    fn counters_are_taken_over_the_window() {
        let before = ProgramRuns {
            runs: 10,
            run_time_ns: 5000,
            returns: 2,
        };
        let after = ProgramRuns {
            runs: 25,
            run_time_ns: 8000,
            returns: 5,
        };
        assert_eq!(
            after.since(before),
            ProgramRuns {
                runs: 15,
                run_time_ns: 3000,
                returns: 3,
            }
        );
        // A counter that went back (a program loaded anew) counts as nothing, never as a wrap.
        assert_eq!(before.since(after), ProgramRuns::default());
    }

    #[test]
    fn overhead_is_the_share_of_the_target_s_cpu_time() {
        assert_eq!(overhead_percent(5_000_000.0, 100_000_000), Some(5.0));
        assert_eq!(overhead_percent(0.0, 100_000_000), Some(0.0));
        // Probes that took all of it (a hot malloc loop) are 100%; an estimate above the
        // measured CPU time (traps cheaper here than where they were measured) says so.
        assert_eq!(overhead_percent(1e9, 1_000_000_000), Some(100.0));
        assert_eq!(overhead_percent(2e9, 1_000_000_000), Some(200.0));
        // An idle target is not judged: a few traps in a few microseconds of CPU are noise.
        assert_eq!(overhead_percent(9_000.0, 10_000), None);
        assert_eq!(overhead_percent(0.0, 0), None);
        assert_eq!(overhead_percent(1.0, MIN_JUDGED_CPU_NS), Some(1e-5));
    }

    #[test]
    fn each_kind_has_its_cost() {
        assert_eq!(COSTS.of(ProbeKind::Emulated), 1000.0);
        assert_eq!(COSTS.of(ProbeKind::SingleStepped), 4000.0);
        assert_eq!(COSTS.of(ProbeKind::Return), 1500.0);
        const { assert!(MEASURED.entry_single_stepped_ns > MEASURED.entry_emulated_ns) };
    }
}
