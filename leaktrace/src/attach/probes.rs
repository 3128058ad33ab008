//! Loading the BPF programs and attaching them to the target's allocator.

use std::{collections::HashMap, num::NonZeroU32, path::Path};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{
        UProbe,
        uprobe::{UProbeLink, UProbeScope},
    },
};
use leaktrace_common::{
    MAX_FP_RANGES, fp_code,
    names::{global, map, program},
    stat,
    unwind_rows::{MAX_UNWIND_PAGES, MAX_UNWIND_ROWS, PageRows, UnwindRow},
};

use super::allocator::{Allocator, EntryPoint};
use crate::proc::process;

/// Programs attached to the traced processes. Dropping it detaches every probe.
pub struct Probes {
    attached: usize,
    /// Each process's probes, so that those of a process that exits can be detached without
    /// waiting for the end of the trace (a forking server's children come and go).
    links: HashMap<u32, Vec<UProbeLink>>,
    /// Threads detaching the probes of processes that exited. They must finish before
    /// leaktrace exits: a thread killed by the exit in the middle of an unregister makes the
    /// kernel give up on it ("failed to unregister, leaking uprobe"), leaving breakpoints.
    detaching: Vec<std::thread::JoinHandle<()>>,
    ebpf: Ebpf,
    options: AttachOptions,
    /// Keeps the kernel's run-time statistics of BPF programs on while held
    /// (`AttachOptions::program_stats`).
    run_time_stats: Option<std::os::fd::OwnedFd>,
}

/// How to attach; the defaults are what users get, the rest serves benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttachOptions {
    /// Attach the programs that do nothing (`noop_entry`, `noop_return`) instead of the real
    /// ones, at exactly the same points: the cost of the traps alone.
    pub noop_programs: bool,
    /// Probe free-like functions at their entry rather than at a later instruction that the
    /// kernel emulates (see `probe_point`).
    pub free_at_entry: bool,
    /// Turn on the kernel's run-time statistics of BPF programs (two clock reads per program
    /// run, so only for benchmarks).
    pub program_stats: bool,
}

impl Probes {
    /// Probes attached so far, over all processes.
    pub fn attached(&self) -> usize {
        self.attached
    }

    /// Nothing attached yet.
    pub fn new(ebpf: Ebpf, options: AttachOptions) -> anyhow::Result<Self> {
        let run_time_stats = if options.program_stats {
            Some(
                aya::sys::enable_stats(aya::sys::Stats::RunTime)
                    .context("turning on BPF run-time statistics")?,
            )
        } else {
            None
        };
        Ok(Self {
            attached: 0,
            links: HashMap::new(),
            detaching: Vec::new(),
            ebpf,
            options,
            run_time_stats,
        })
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

    /// Attaches to one more process's allocator (another `--pid`, a followed child); returns
    /// how many probes that took.
    pub fn attach(&mut self, pid: u32, allocator: &Allocator) -> anyhow::Result<usize> {
        let links = self.links.entry(pid).or_default();
        let before = links.len();
        let result = attach_to(&mut self.ebpf, pid, allocator, links, self.options);
        let added = links.len() - before;
        self.attached += added;
        result.map(|()| added)
    }

    /// Detaches the probes of a process that exited, on a thread of their own: the kernel
    /// takes ~85 ms per probe, which the event loop must not wait for.
    pub fn detach(&mut self, pid: u32) {
        if let Some(links) = self.links.remove(&pid) {
            self.attached -= links.len();
            self.detaching.retain(|thread| !thread.is_finished());
            // Without a thread, the closure (and so the links) is dropped here: detached
            // at once, the event loop waiting.
            if let Ok(thread) = std::thread::Builder::new()
                .name("detach".into())
                .spawn(move || drop(links))
            {
                self.detaching.push(thread);
            }
        }
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        // Detach the rest here, then wait for the threads detaching the others.
        self.links.clear();
        for thread in self.detaching.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The maps that outlive the probes, so that events still in flight can be drained after
/// detaching.
pub struct Maps {
    pub events: RingBuf<MapData>,
    pub stats: Stats,
    pub fp_code: FramePointerCode,
    pub unwind_rows: UnwindRows,
}

/// The ranges of code that keeps frame pointers, where `--unwind auto` trusts the
/// frame-pointer walk (and copies the stack for everything else).
pub struct FramePointerCode {
    map: Array<MapData, u64>,
    current: Vec<(u64, u64)>,
}

impl FramePointerCode {
    /// Replaces the ranges (sorted by start, disjoint). Past `MAX_FP_RANGES`, the smallest
    /// ones are left out: code left out costs stack copies, never a wrong stack.
    pub fn set(&mut self, ranges: &[(u64, u64)]) -> anyhow::Result<()> {
        let mut ranges = ranges.to_vec();
        if ranges.len() > MAX_FP_RANGES as usize {
            ranges.sort_by_key(|&(start, end)| std::cmp::Reverse(end - start));
            ranges.truncate(MAX_FP_RANGES as usize);
            ranges.sort_unstable();
        }
        if ranges == self.current {
            return Ok(());
        }
        // The count goes last when ranges are added and first when removed, so that the BPF
        // side never reads a range that is not written yet.
        let count = ranges.len() as u64;
        if count < self.current.len() as u64 {
            self.map.set(fp_code::COUNT, count, 0)?;
        }
        for (i, &(start, end)) in (0..).zip(&ranges) {
            self.map.set(fp_code::start(i), start, 0)?;
            self.map.set(fp_code::end(i), end, 0)?;
        }
        self.map.set(fp_code::COUNT, count, 0)?;
        self.current = ranges;
        Ok(())
    }
}

/// The rows from which the BPF side unwinds code without frame pointers (`--unwind auto`).
pub struct UnwindRows {
    map: Array<MapData, MapRow>,
    pages: aya::maps::HashMap<MapData, u64, MapPage>,
    current: Vec<UnwindRow>,
    current_pages: Vec<u64>,
}

/// A [`PageRows`] as aya reads and writes map values.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct MapPage(PageRows);

// SAFETY: PageRows is #[repr(C)], two u32, valid for any bytes.
unsafe impl aya::Pod for MapPage {}

/// An [`UnwindRow`] as aya reads and writes map values.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct MapRow(UnwindRow);

// SAFETY: UnwindRow is #[repr(C)] plain data without padding (leaktrace-common tests its
// layout), valid for any bytes.
unsafe impl aya::Pod for MapRow {}

impl UnwindRows {
    /// Rows the map holds at most.
    pub const MAX: usize = MAX_UNWIND_ROWS as usize - 1;

    /// Replaces the rows (sorted by pc, at most [`Self::MAX`]).
    pub fn set(&mut self, rows: &[UnwindRow]) -> anyhow::Result<()> {
        let rows = &rows[..rows.len().min(Self::MAX)];
        if rows == self.current {
            return Ok(());
        }
        let header = |count: usize| {
            MapRow(UnwindRow {
                pc: count as u64,
                ..UnwindRow::default()
            })
        };
        // No rows while they are rewritten: a stack unwound meanwhile is copied instead of
        // mixing the old rows with the new.
        self.map.set(0, header(0), 0)?;
        for (i, row) in (1..).zip(rows) {
            self.map.set(i, MapRow(*row), 0)?;
        }
        let pages = crate::target::address_space::page_index(rows, MAX_UNWIND_PAGES as usize);
        let keep: std::collections::HashSet<u64> = pages.iter().map(|&(page, _)| page).collect();
        for page in self
            .current_pages
            .iter()
            .filter(|page| !keep.contains(page))
        {
            self.pages.remove(page)?;
        }
        for &(page, entry) in &pages {
            self.pages.insert(page, MapPage(entry), 0)?;
        }
        self.map.set(0, header(rows.len()), 0)?;
        self.current = rows.to_vec();
        self.current_pages = pages.into_iter().map(|(page, _)| page).collect();
        Ok(())
    }
}

/// The per-CPU counters that the BPF programs keep.
pub struct Stats(PerCpuArray<MapData, u64>);

impl Stats {
    /// Events lost since load (summed over CPUs).
    pub fn lost_events(&self) -> u64 {
        self.sum(stat::RINGBUF_FULL) + self.sum(stat::PENDING_FULL) + self.sum(stat::SAMPLED_FULL)
    }

    /// Allocator returns seen without their entry: calls in flight at attach, or entries the
    /// BPF side could not record. Such calls are in no number of the report.
    pub fn unpaired_returns(&self) -> u64 {
        self.sum(stat::RETURN_WITHOUT_ENTRY)
    }

    /// Every counter, named, for `--print-bpf-stats`.
    pub fn all(&self) -> Vec<(&'static str, u64)> {
        (0..)
            .zip(stat::NAMES)
            .map(|(index, name)| (name, self.sum(index)))
            .collect()
    }

    fn sum(&self, index: u32) -> u64 {
        self.0
            .get(&index, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }
}

/// How stacks are unwound (`--unwind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unwind {
    /// Copy the stack, and unwind it with call-frame information, only where the frame-pointer
    /// walk went through code without frame pointers.
    Auto,
    /// Follow frame pointers only.
    Fp,
    /// Copy every stack and unwind it with call-frame information.
    Dwarf,
}

impl Unwind {
    /// The BPF side's `UNWIND_MODE`.
    fn bpf_mode(self) -> u32 {
        use leaktrace_common::unwind;
        match self {
            Self::Auto => unwind::AUTO,
            Self::Fp => unwind::FP,
            Self::Dwarf => unwind::DWARF,
        }
    }
}

/// How the BPF side captures stacks.
#[derive(Clone, Copy, Debug)]
pub struct StackCapture {
    pub mode: Unwind,
    /// One of `leaktrace_common::STACK_COPY_SIZES`.
    pub stack_copy_bytes: u32,
    /// Frames kept per frame-pointer stack, 1..=[`leaktrace_common::MAX_STACK_DEPTH`].
    pub max_depth: u32,
}

/// What the BPF programs are loaded with.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub ringbuf_bytes: u32,
    pub capture: StackCapture,
    /// `--sample-bytes`, or 0 to trace every block.
    pub sample_bytes: u64,
}

/// The BPF programs, built by build.rs from leaktrace-ebpf.
const BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leaktrace"));

/// Where the kernel publishes its own BTF.
const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The programs keep per-thread state in task storage, which the verifier only allows with the
/// kernel's BTF (the type of `task_struct`): without it, loading fails with a page of verifier
/// log, so say what is missing instead.
fn require_kernel_btf(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    Err(anyhow!(
        "this kernel has no BTF ({} is missing): leaktrace needs Linux 5.11 or later built with CONFIG_DEBUG_INFO_BTF=y",
        path.display()
    ))
}

/// Loads the BPF programs.
pub fn load(options: LoadOptions) -> anyhow::Result<(Ebpf, Maps)> {
    let LoadOptions {
        ringbuf_bytes,
        capture,
        sample_bytes,
    } = options;
    require_kernel_btf(Path::new(KERNEL_BTF))?;
    // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones to the memory cgroup.
    // Raising it may be refused (no CAP_SYS_RESOURCE), which only matters on old kernels.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a plain syscall on a valid struct.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };

    let mut ebpf = EbpfLoader::new()
        // aya 0.14 has no type for task storage (the THREADS map, which only the BPF side
        // uses), and refuses to create maps it has no type for unless told.
        .allow_unsupported_maps()
        .map_max_entries(map::EVENTS, ringbuf_bytes)
        .override_global(global::STACK_DEPTH, &capture.max_depth, true)
        .override_global(global::UNWIND_MODE, &capture.mode.bpf_mode(), true)
        .override_global(global::STACK_COPY_BYTES, &capture.stack_copy_bytes, true)
        .override_global(global::SAMPLE_BYTES, &sample_bytes, true)
        .load(BPF_OBJECT)
        .context("loading the BPF programs (is this kernel built with BPF and uprobes?)")?;
    let mut take_map = |name: &str| {
        ebpf.take_map(name)
            .with_context(|| format!("no {name} map in the BPF object"))
    };
    let events = take_map(map::EVENTS)?;
    let stats = take_map(map::STATS)?;
    let fp_code = take_map(map::FP_CODE)?;
    let unwind_rows = take_map(map::UNWIND_ROWS)?;
    let unwind_pages = take_map(map::UNWIND_PAGES)?;
    let maps = Maps {
        events: RingBuf::try_from(events).context("EVENTS is not a ring buffer")?,
        stats: Stats(PerCpuArray::try_from(stats).context("STATS is not a per-CPU array")?),
        fp_code: FramePointerCode {
            map: Array::try_from(fp_code).context("FP_CODE is not an array")?,
            current: Vec::new(),
        },
        unwind_rows: UnwindRows {
            map: Array::try_from(unwind_rows).context("UNWIND_ROWS is not an array")?,
            pages: aya::maps::HashMap::try_from(unwind_pages)
                .context("UNWIND_PAGES is not a hash map")?,
            current: Vec::new(),
            current_pages: Vec::new(),
        },
    };
    Ok((ebpf, maps))
}

/// Attaches to the target's allocator, frees first, then the returns, then the other entries
/// in `allocator`'s order (munmap, mremap and realloc before the calls that only allocate): a
/// release seen without its allocation is counted as unmatched, while an allocation seen
/// without its release would look like a leak.
/// Which program runs at which entry point is `allocator::discover`'s choice; `alloc_return`
/// runs at the return of every one but the free-like ones.
///
/// A free-like entry (no uretprobe) is probed at the first instruction the kernel emulates
/// when a straight-line prefix leads to one (`probe_point`); the others must stay on the entry,
/// where their uretprobe already traps.
fn attach_to(
    ebpf: &mut Ebpf,
    pid: u32,
    allocator: &Allocator,
    links: &mut Vec<UProbeLink>,
    options: AttachOptions,
) -> anyhow::Result<()> {
    let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).context("pid 0")?);
    let program_for = |program: &'static str| match (options.noop_programs, program) {
        (false, _) => program,
        (true, program::ALLOC_RETURN) => program::NOOP_RETURN,
        (true, _) => program::NOOP_ENTRY,
    };
    let mut attach_one =
        |ebpf: &mut Ebpf, program: &str, entry: &EntryPoint, offset: u64| -> anyhow::Result<()> {
            let probe: &mut UProbe = ebpf
                .program_mut(program)
                .with_context(|| format!("no program {program} in the BPF object"))?
                .try_into()?;
            if probe.fd().is_err() {
                probe
                    .load()
                    .with_context(|| format!("loading BPF program {program}"))?;
            }
            let link = probe.attach(offset, &entry.path, scope).map_err(|err| {
                if process::is_alive(pid) {
                    anyhow!(err).context(format!(
                        "attaching {program} to {} in {}",
                        entry.symbol, entry.module
                    ))
                } else {
                    anyhow!("process {pid} exited while leaktrace was attaching")
                }
            })?;
            links.push(probe.take_link(link)?);
            Ok(())
        };
    let entries = &allocator.entry_points;
    for entry in entries.iter().filter(|e| !e.allocates()) {
        let offset = if options.free_at_entry {
            entry.file_offset
        } else {
            entry.probe_offset
        };
        attach_one(ebpf, program_for(entry.program), entry, offset)?;
    }
    for entry in entries.iter().filter(|e| e.allocates()) {
        attach_one(
            ebpf,
            program_for(program::ALLOC_RETURN),
            entry,
            entry.file_offset,
        )?;
    }
    for entry in entries.iter().filter(|e| e.allocates()) {
        attach_one(ebpf, program_for(entry.program), entry, entry.file_offset)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of the contract (`leaktrace_common::names`) are those of the BPF object's
    /// maps, programs and globals.
    #[test]
    fn every_name_of_the_contract_is_in_the_bpf_object() {
        use object::{Object as _, ObjectSymbol as _};
        let bpf = object::File::parse(BPF_OBJECT).unwrap();
        let symbols: Vec<&str> = bpf.symbols().filter_map(|s| s.name().ok()).collect();
        for name in map::ALL.iter().chain(&global::ALL).chain(&program::ALL) {
            assert!(symbols.contains(name), "{name} in {symbols:?}");
        }
    }

    #[test]
    fn a_kernel_without_btf_is_one_line_that_says_what_is_needed() {
        let err = require_kernel_btf(Path::new("/nonexistent/btf/vmlinux")).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "this kernel has no BTF (/nonexistent/btf/vmlinux is missing): leaktrace needs Linux 5.11 or later built with CONFIG_DEBUG_INFO_BTF=y"
        );
    }
}
