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

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use leaktrace_common::names::program;

use self::estimate::{
    Probe, ProbeKind, ProbeTime, ProgramRuns, ProgramTraps, overhead_percent, probe_time,
};
use crate::{
    attach::{allocator::Allocator, probe_point, probes::AttachOptions},
    proc::process,
};

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
    pub fn start(&mut self, program_stats: &[(String, u64, u64)], pids: impl Iterator<Item = u32>) {
        self.last_runs = runs_of(program_stats);
        self.last_cpu_ns = cpu_of(pids);
    }

    /// Judges the window since the last check: `program_stats` as `Probes::program_stats` gives
    /// them, `pids` the processes traced now. `Some` when the probes took more than the budget.
    pub fn check(
        &mut self,
        program_stats: &[(String, u64, u64)],
        pids: impl Iterator<Item = u32>,
    ) -> Option<OverBudget> {
        let (time, cpu_ns) = self.window(program_stats, pids);
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
    pub fn finish(
        &mut self,
        program_stats: &[(String, u64, u64)],
        pids: impl Iterator<Item = u32>,
    ) {
        self.window(program_stats, pids);
    }

    /// The probes' estimated time and the processes' CPU time since the last check (ns).
    fn window(
        &mut self,
        program_stats: &[(String, u64, u64)],
        pids: impl Iterator<Item = u32>,
    ) -> (ProbeTime, u64) {
        let runs = runs_of(program_stats);
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

fn runs_of(program_stats: &[(String, u64, u64)]) -> BTreeMap<String, ProgramRuns> {
    program_stats
        .iter()
        .map(|(name, runs, run_time_ns)| {
            (
                name.clone(),
                ProgramRuns {
                    runs: *runs,
                    run_time_ns: *run_time_ns,
                },
            )
        })
        .collect()
}

fn cpu_of(pids: impl Iterator<Item = u32>) -> BTreeMap<u32, u64> {
    pids.filter_map(|pid| Some((pid, process::cpu_time_ns(pid)?)))
        .collect()
}

/// The functions that programs call all the time, by the names allocators export them under
/// (`_rjem_` stripped): their probes set what a program's runs are charged (see `estimate`).
const HOT: &[&str] = &[
    "malloc",
    "free",
    "calloc",
    "realloc",
    // jemalloc
    "mallocx",
    "rallocx",
    "sdallocx",
    "dallocx",
    // tcmalloc
    "tc_malloc",
    "tc_free",
    "tc_calloc",
    "tc_realloc",
    "tc_new",
    "tc_newarray",
    "tc_delete",
    "tc_deletearray",
    "tc_delete_sized",
    "tc_deletearray_sized",
    // mimalloc
    "mi_malloc",
    "mi_malloc_small",
    "mi_zalloc_small",
    "mi_calloc",
    "mi_realloc",
    "mi_new",
    "mi_free",
    "mi_free_size",
    // C++: new, new[], delete, delete[], sized delete
    "_Znwm",
    "_Znam",
    "_ZdlPv",
    "_ZdaPv",
    "_ZdlPvm",
    "_ZdaPvm",
];

fn is_hot(symbol: &str) -> bool {
    HOT.contains(&symbol.strip_prefix("_rjem_").unwrap_or(symbol))
}

/// Each probe that `probes::attach` puts on `allocator`, as the program that runs there and the
/// kind of its trap: the same points as `attach_to` (free-like entries at their probe point,
/// the others at their entry with `alloc_return` at their return), each decoded to tell an
/// emulated instruction from one that is single-stepped.
pub fn probe_kinds(allocator: &Allocator, options: AttachOptions) -> Vec<Probe<'static>> {
    let program_for = |name: &'static str| match (options.noop_programs, name) {
        (false, _) => name,
        (true, program::ALLOC_RETURN) => program::NOOP_RETURN,
        (true, _) => program::NOOP_ENTRY,
    };
    // Each module's bytes once (libc holds a dozen entry points).
    let mut code: Vec<(Arc<crate::proc::files::Opened>, Option<Vec<u8>>)> = Vec::new();
    let mut kinds = Vec::new();
    for entry in &allocator.entry_points {
        let offset = if entry.allocates() || options.free_at_entry {
            entry.file_offset
        } else {
            entry.probe_offset
        };
        let index = match code
            .iter()
            .position(|(file, _)| Arc::ptr_eq(file, &entry.file))
        {
            Some(index) => index,
            None => {
                code.push((entry.file.clone(), entry.file.read_all().ok()));
                code.len() - 1
            }
        };
        // A module that cannot be read again counts as single-stepped: the dearer guess.
        let emulated = code[index]
            .1
            .as_deref()
            .is_some_and(|data| probe_point::is_emulated_in_elf(data, offset));
        let kind = if emulated {
            ProbeKind::EntryEmulated
        } else {
            ProbeKind::EntrySingleStepped
        };
        let hot = is_hot(&entry.symbol);
        kinds.push(Probe {
            program: program_for(entry.program),
            kind,
            hot,
        });
        if entry.allocates() {
            kinds.push(Probe {
                program: program_for(program::ALLOC_RETURN),
                kind: ProbeKind::Return,
                hot,
            });
        }
    }
    kinds
}

#[cfg(test)]
mod tests {
    use super::{estimate::TrapCosts, *};

    const COSTS: TrapCosts = TrapCosts {
        entry_emulated_ns: 1000.0,
        entry_single_stepped_ns: 4000.0,
        return_ns: 1500.0,
    };

    fn guard(budget: f64) -> Guard {
        let free = Probe {
            program: "free_entry",
            kind: ProbeKind::EntrySingleStepped,
            hot: true,
        };
        Guard::new(budget, ProgramTraps::new(COSTS, [free]))
    }

    #[test]
    fn hot_entry_points_by_every_allocator_s_names() {
        for hot in [
            "malloc",
            "free",
            "_rjem_malloc",
            "_rjem_sdallocx",
            "tc_new",
            "_ZdlPvm",
        ] {
            assert!(is_hot(hot), "{hot}");
        }
        for rare in [
            "valloc",
            "pvalloc",
            "cfree",
            "memalign",
            "_rjem_valloc",
            "mmap",
            "rjem_malloc",
        ] {
            assert!(!is_hot(rare), "{rare}");
        }
    }

    #[test]
    fn glibc_s_malloc_and_free_here_are_emulated_and_hot() {
        let pid = std::process::id();
        let maps = crate::proc::maps::ProcMaps::read(pid).unwrap();
        let allocator = crate::attach::allocator::discover(pid, &maps).unwrap();
        let probes = probe_kinds(&allocator, AttachOptions::default());
        // Every allocating entry point has its return probe.
        let allocating = allocator
            .entry_points
            .iter()
            .filter(|e| e.allocates())
            .count();
        assert_eq!(probes.len(), allocator.entry_points.len() + allocating);
        assert!(
            probes
                .iter()
                .any(|p| p.program == program::ALLOC_RETURN && p.kind == ProbeKind::Return)
        );
        // Debian's glibc: malloc begins with `push %r12`, free is probed at its `je`.
        let traps = ProgramTraps::new(estimate::MEASURED, probes.iter().copied());
        assert_eq!(
            traps.per_run_ns(program::MALLOC_ENTRY),
            estimate::MEASURED.entry_emulated_ns
        );
        assert_eq!(
            traps.per_run_ns(program::FREE_ENTRY),
            estimate::MEASURED.entry_emulated_ns
        );
        // With free probed at its entry, free's runs are single-stepped.
        let at_entry = AttachOptions {
            free_at_entry: true,
            ..AttachOptions::default()
        };
        let traps = ProgramTraps::new(estimate::MEASURED, probe_kinds(&allocator, at_entry));
        assert_eq!(
            traps.per_run_ns(program::FREE_ENTRY),
            estimate::MEASURED.entry_single_stepped_ns
        );
        // The floor's programs are charged the same traps.
        let noop = AttachOptions {
            noop_programs: true,
            ..AttachOptions::default()
        };
        let traps = ProgramTraps::new(estimate::MEASURED, probe_kinds(&allocator, noop));
        assert_eq!(
            traps.per_run_ns(program::NOOP_RETURN),
            estimate::MEASURED.return_ns
        );
    }

    fn stats(runs: u64, run_time_ns: u64) -> Vec<(String, u64, u64)> {
        vec![("free_entry".to_owned(), runs, run_time_ns)]
    }

    #[test]
    fn this_process_s_cpu_is_the_denominator() {
        let me = std::process::id();
        let mut g = guard(1.0);
        g.start(&stats(0, 0), [me].into_iter());
        // Work for 20 ms of CPU time; no probe ran: 0%, within budget.
        let start = process::cpu_time_ns(me).unwrap();
        while process::cpu_time_ns(me).unwrap() < start + 20_000_000 {}
        assert_eq!(g.check(&stats(0, 0), [me].into_iter()), None);
        assert_eq!(g.highest_percent, Some(0.0));
        // Then, as if free_entry had run 100,000 times (0.4 s of traps) in the next window of
        // at least 10 ms: far over 1%.
        let start = process::cpu_time_ns(me).unwrap();
        while process::cpu_time_ns(me).unwrap() < start + 20_000_000 {}
        let trip = g
            .check(&stats(100_000, 1_000_000), [me].into_iter())
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
        g.start(&stats(0, 0), std::iter::empty());
        // A window with this process at its end only: nothing to divide by.
        assert_eq!(g.check(&stats(10, 10), [me].into_iter()), None);
        assert_eq!(g.highest_percent, None);
        assert!(
            g.summary()
                .ends_with("highest in a second none judged (budget --max-overhead 1%)"),
            "{}",
            g.summary()
        );
        // A pid that does not exist contributes nothing.
        assert_eq!(g.check(&stats(20, 20), [0x7fff_fff0].into_iter()), None);
    }
}
