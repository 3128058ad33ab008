//! What one probe hit costs the target, by kind: the constants of leaktrace's overhead guard
//! (`leaktrace/src/guard/estimate.rs`) come from here.
//!
//! Under the floor (BPF programs that do nothing), `free(NULL)` costs one entry trap and
//! nothing else: at glibc's `free+3` (a `je`, which the kernel emulates), or with
//! `--free-at-entry` at `free+0` (`test %rdi,%rdi`, single-stepped out of line). A malloc+free
//! pair costs malloc's entry (`push %r12`, emulated), its return, and free's entry: the return
//! is what remains once the two emulated entries are taken off. The fixture times its calls in
//! its thread's CPU time (the traps run in its context), which is also what the guard divides
//! by, and which leaves out the time a busy machine keeps it waiting for a CPU.

use std::path::Path;

use super::{
    Args, Config, FLOOR, FLOOR_FREE_AT_ENTRY, LEAKTRACE, Rounds, UNTRACED, fixture_rounds,
    stats::Summary,
};

/// leaktrace too: its pairs on one and two threads in CPU time, next to the floor's, say
/// what two threads contend for apart from the CPUs of a busy machine.
const CONFIGS: [Config; 4] = [UNTRACED, FLOOR, FLOOR_FREE_AT_ENTRY, LEAKTRACE];

/// What each configuration's runs of the fixture measured, round by round.
pub struct Traps {
    rounds: Rounds,
}

pub fn traps(args: &Args, binary: &Path) -> anyhow::Result<Traps> {
    let rounds = fixture_rounds(
        args,
        binary,
        "trap costs",
        &CONFIGS,
        &format!("traps {}", args.seconds),
        |_, _| Ok(()),
    )?;
    Ok(Traps { rounds })
}

impl Traps {
    fn value(&self, round: usize, config: &str, workload: &str) -> Option<f64> {
        self.rounds[round].get(config)?.get(workload).copied()
    }

    /// `f(round)` summarized over rounds.
    fn over_rounds(&self, f: impl Fn(usize) -> Option<f64>) -> Summary {
        Summary::of((0..self.rounds.len()).filter_map(f))
    }

    /// What `config` adds to a `free(NULL)` call, within each round.
    fn entry(&self, round: usize, config: &str) -> Option<f64> {
        Some(
            self.value(round, config, "free_null")?
                - self.value(round, UNTRACED.name, "free_null")?,
        )
    }

    /// What `config` adds to a pair of `workload`, within `round`.
    fn added(&self, round: usize, config: &str, workload: &str) -> Option<f64> {
        Some(self.value(round, config, workload)? - self.value(round, UNTRACED.name, workload)?)
    }

    fn ret(&self, round: usize) -> Option<f64> {
        let pair = self.value(round, FLOOR.name, "pairs_1t")?
            - self.value(round, UNTRACED.name, "pairs_1t")?;
        Some(pair - 2.0 * self.entry(round, FLOOR.name)?)
    }

    pub fn print(&self) {
        println!();
        println!(
            "trap costs: ns of the target thread's CPU time per probe hit beyond the BPF program (floor: programs that do nothing), median [min..max] over rounds"
        );
        let rows: [(&str, Summary); 3] = [
            (
                "entry, emulated (free(NULL) probed at its je)",
                self.over_rounds(|r| self.entry(r, FLOOR.name)),
            ),
            (
                "entry, single-stepped (free(NULL) at free+0)",
                self.over_rounds(|r| self.entry(r, FLOOR_FREE_AT_ENTRY.name)),
            ),
            (
                "return (a pair less two emulated entries)",
                self.over_rounds(|r| self.ret(r)),
            ),
        ];
        for (what, summary) in rows {
            println!("  {what:<48} {:>22}", summary.show(0));
        }
        println!(
            "  untraced: free(NULL) {} ns, a malloc+free pair {} ns (CPU time)",
            self.over_rounds(|r| self.value(r, UNTRACED.name, "free_null"))
                .show(1),
            self.over_rounds(|r| self.value(r, UNTRACED.name, "pairs_1t"))
                .show(1)
        );
        println!(
            "  malloc+free pairs in a thread's CPU time, ns added per pair (floor / leaktrace, leaktrace/floor):"
        );
        for workload in ["pairs_1t", "pairs_2t"] {
            println!(
                "    {workload}: {} / {}, {}",
                self.over_rounds(|r| self.added(r, FLOOR.name, workload))
                    .show(0),
                self.over_rounds(|r| self.added(r, LEAKTRACE.name, workload))
                    .show(0),
                self.over_rounds(|r| Some(
                    self.added(r, LEAKTRACE.name, workload)?
                        / self.added(r, FLOOR.name, workload)?
                ))
                .show(2)
            );
        }
    }
}
