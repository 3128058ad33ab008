//! Loading the BPF programs and attaching them to the target's allocator.

use std::num::NonZeroU32;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{UProbe, uprobe::UProbeScope},
};
use leaktrace_common::stat;

use crate::target::Target;

/// Which program runs at which entry point. `alloc_return` runs at the return of every one.
/// Attached in this order: calls that release memory before those that only allocate, so that
/// a call made while attaching can leave a release unmatched, never a block falsely outstanding.
const ENTRY_PROGRAMS: [(&str, &str); 12] = [
    ("munmap", "munmap_entry"),
    ("mremap", "mremap_entry"),
    ("realloc", "realloc_entry"),
    ("reallocarray", "reallocarray_entry"),
    ("malloc", "malloc_entry"),
    ("valloc", "malloc_entry"),
    ("pvalloc", "malloc_entry"),
    ("calloc", "calloc_entry"),
    ("posix_memalign", "posix_memalign_entry"),
    ("aligned_alloc", "aligned_alloc_entry"),
    ("memalign", "aligned_alloc_entry"),
    ("mmap", "mmap_entry"),
];

/// Programs attached to one process. Dropping it detaches every probe.
pub struct Probes {
    attached: usize,
    ebpf: Ebpf,
    /// Keeps the kernel's run-time statistics of BPF programs on while held (`--print-bpf-stats`).
    run_time_stats: Option<std::os::fd::OwnedFd>,
}

impl Probes {
    pub fn attached(&self) -> usize {
        self.attached
    }

    /// Per program that ran: its name, how often it ran, and its total run time in ns, when
    /// `AttachOptions::program_stats` turned the kernel's statistics on.
    pub fn program_stats(&self) -> Vec<(String, u64, u64)> {
        if self.run_time_stats.is_none() {
            return Vec::new();
        }
        self.ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                let runs = info.run_count();
                (runs > 0).then(|| (name.to_owned(), runs, info.run_time().as_nanos() as u64))
            })
            .collect()
    }
}

/// The maps that outlive the probes, so that events still in flight can be drained after
/// detaching.
pub struct Maps {
    pub events: RingBuf<MapData>,
    pub stats: Stats,
}

/// The per-CPU counters that the BPF programs keep.
pub struct Stats(PerCpuArray<MapData, u64>);

impl Stats {
    /// Events lost since load (summed over CPUs).
    pub fn lost_events(&self) -> u64 {
        self.sum(stat::RINGBUF_FULL) + self.sum(stat::PENDING_FULL)
    }

    /// Every counter, named, for `--print-bpf-stats`.
    pub fn all(&self) -> Vec<(&'static str, u64)> {
        [
            ("ringbuf_full", stat::RINGBUF_FULL),
            ("pending_full", stat::PENDING_FULL),
            ("return_without_entry", stat::RETURN_WITHOUT_ENTRY),
            ("stale_entry", stat::STALE_ENTRY),
            ("stack_failed", stat::STACK_FAILED),
            ("read_failed", stat::READ_FAILED),
        ]
        .into_iter()
        .map(|(name, index)| (name, self.sum(index)))
        .collect()
    }

    fn sum(&self, index: u32) -> u64 {
        self.0
            .get(&index, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }
}

/// Loads the BPF programs with a ring buffer of `ringbuf_bytes` that keep at most `max_depth`
/// frames per stack (1..=[`leaktrace_common::MAX_STACK_DEPTH`]).
pub fn load(ringbuf_bytes: u32, max_depth: u32) -> anyhow::Result<(Ebpf, Maps)> {
    // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones to the memory cgroup.
    // Raising it may be refused (no CAP_SYS_RESOURCE), which only matters on old kernels.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a plain syscall on a valid struct.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };

    let mut ebpf = EbpfLoader::new()
        .map_max_entries("EVENTS", ringbuf_bytes)
        .override_global("STACK_DEPTH", &max_depth, true)
        .load(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/leaktrace"
        )))
        .context("loading the BPF programs (is this kernel built with BPF and uprobes?)")?;
    let events = ebpf
        .take_map("EVENTS")
        .context("no EVENTS map in the BPF object")?;
    let stats = ebpf
        .take_map("STATS")
        .context("no STATS map in the BPF object")?;
    let maps = Maps {
        events: RingBuf::try_from(events).context("EVENTS is not a ring buffer")?,
        stats: Stats(PerCpuArray::try_from(stats).context("STATS is not a per-CPU array")?),
    };
    Ok((ebpf, maps))
}

/// How to attach; the defaults are what users get, the rest serves benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttachOptions {
    /// Attach the programs that do nothing (`noop_entry`, `noop_return`) instead of the real
    /// ones, at exactly the same points: the cost of the traps alone.
    pub noop_programs: bool,
    /// Probe `free` at its entry rather than at `Allocator::free_probe_offset`.
    pub free_at_entry: bool,
    /// Turn on the kernel's run-time statistics of BPF programs (it costs two clock reads per
    /// program run, so only for benchmarks).
    pub program_stats: bool,
}

/// Attaches to the target's allocator, frees first: a free seen without its allocation is
/// counted as unmatched, while an allocation seen without its free would look like a leak.
pub fn attach(mut ebpf: Ebpf, target: &Target, options: AttachOptions) -> anyhow::Result<Probes> {
    let pid = NonZeroU32::new(target.pid).context("pid 0")?;
    let scope = UProbeScope::OneProcess(pid);
    let allocator = &target.allocator;
    let offset_of = |name: &str| {
        allocator
            .entry_points
            .iter()
            .find(|&&(n, _)| n == name)
            .map(|&(_, o)| o)
    };
    // Aliases (glibc's aligned_alloc and memalign) share one address: probe it once.
    let mut seen = Vec::new();
    let mut entries = Vec::new();
    for (symbol, program) in ENTRY_PROGRAMS {
        if let Some(offset) = offset_of(symbol).filter(|o| !seen.contains(o)) {
            seen.push(offset);
            entries.push((symbol, program, offset));
        }
    }
    let free_entry = offset_of("free").context("no free")?;
    let free = if options.free_at_entry {
        free_entry
    } else {
        allocator.free_probe_offset
    };
    let program_for = |program: &'static str| match (options.noop_programs, program) {
        (false, _) => program,
        (true, "alloc_return") => "noop_return",
        (true, _) => "noop_entry",
    };
    let mut attached = 0;
    let mut attach_one =
        |ebpf: &mut Ebpf, program: &str, symbol: &str, offset: u64| -> anyhow::Result<()> {
            let probe: &mut UProbe = ebpf
                .program_mut(program)
                .with_context(|| format!("no program {program} in the BPF object"))?
                .try_into()?;
            if probe.fd().is_err() {
                probe
                    .load()
                    .with_context(|| format!("loading BPF program {program}"))?;
            }
            probe
                .attach(offset, &allocator.path, scope)
                .map_err(|err| {
                    if crate::target::is_alive(target.pid) {
                        anyhow!(err).context(format!(
                            "attaching {program} to {symbol} in {}",
                            allocator.module
                        ))
                    } else {
                        anyhow!(
                            "process {} exited while leaktrace was attaching",
                            target.pid
                        )
                    }
                })?;
            attached += 1;
            Ok(())
        };
    attach_one(&mut ebpf, program_for("free_entry"), "free", free)?;
    for &(symbol, _, offset) in &entries {
        attach_one(&mut ebpf, program_for("alloc_return"), symbol, offset)?;
    }
    for &(symbol, program, offset) in &entries {
        attach_one(&mut ebpf, program_for(program), symbol, offset)?;
    }
    let run_time_stats = if options.program_stats {
        Some(
            aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .context("turning on BPF run-time statistics")?,
        )
    } else {
        None
    };
    Ok(Probes {
        attached,
        ebpf,
        run_time_stats,
    })
}
