//! Loading the BPF programs and attaching them to the target's allocator.

use std::{
    collections::{BTreeMap, HashMap},
    num::NonZeroU32,
    os::fd::AsFd as _,
    path::Path,
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, IterableMap as _, MapData, PerCpuArray, RingBuf},
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope},
    },
};
use leaktrace_common::{
    args,
    names::{global, map, program},
    python::{PY_LAYOUT_WORDS, PyLayout},
    stat,
    unwind_rows::{MAX_UNWIND_PAGES, MAX_UNWIND_ROWS, PageRows, UnwindRow},
};

use super::{
    allocator::{Allocator, EntryPoint},
    bpf_syscall::update_batch,
    multi::{self, LinkKind, MultiLink, MultiPrograms},
    probe_point::Trap,
};
use crate::proc::process;
use crate::status;
use crate::target::address_space::{RowSource, unwind_rows};

/// Programs attached to the traced processes. Dropping it detaches every probe.
pub struct Probes {
    attached: usize,
    /// Each process's probes, so that those of a process that exits can be detached without
    /// waiting for the end of the trace (a forking server's children come and go).
    links: HashMap<u32, Vec<Link>>,
    /// Probes per process (a uprobe_multi link holds many).
    probe_counts: HashMap<u32, usize>,
    /// The programs loaded for uprobe_multi links: None until the first attach, then Err (with
    /// why) on a kernel without them, where probes are attached one at a time.
    multi: Option<Result<MultiPrograms, String>>,
    /// What is attached, per process.
    summaries: HashMap<u32, AttachSummary>,
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
    /// Probe every function at its entry rather than at a later instruction that the kernel
    /// emulates (see `probe_point`), to measure what the choice saves.
    pub at_entry: bool,
    /// Attach one perf-event uprobe per probe even where uprobe_multi links work, to measure
    /// what they save.
    pub one_at_a_time: bool,
    /// Turn on the kernel's run-time statistics of BPF programs (two clock reads per program
    /// run, so only for benchmarks).
    pub program_stats: bool,
    /// Attach the malloc family through uprobe session programs where the kernel has them
    /// (`--sample-bytes`): a call whose block is not drawn skips its return probe.
    pub sessions: bool,
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
            probe_counts: HashMap::new(),
            multi: None,
            summaries: HashMap::new(),
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
        // A program attached through uprobe_multi links runs as its second copy (`multi`):
        // the runs of both copies add up.
        let mut stats: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let aya = self.ebpf.programs().filter_map(|(name, program)| {
            let info = program.info().ok()?;
            Some((name, info.run_count(), info.run_time().as_nanos() as u64))
        });
        let multi = self
            .multi
            .iter()
            .flatten()
            .flat_map(|multi| multi.run_stats());
        for (name, runs, run_time_ns) in aya.chain(multi) {
            let sum = stats.entry(name.to_owned()).or_default();
            sum.0 += runs;
            sum.1 += run_time_ns;
        }
        stats
            .into_iter()
            .filter(|(_, (runs, _))| *runs > 0)
            .map(|(name, (runs, run_time_ns))| (name, runs, run_time_ns))
            .collect()
    }

    /// Attaches to one more process's allocator (another `--pid`, a followed child); returns
    /// what that attached.
    pub fn attach(&mut self, pid: u32, allocator: &Allocator) -> anyhow::Result<AttachSummary> {
        if self.multi.is_none() {
            let loaded = if self.options.one_at_a_time {
                Err(anyhow!("--probes-one-at-a-time"))
            } else {
                load_multi(&mut self.ebpf, self.options)
            };
            let wants_sessions = self.options.sessions && !self.options.noop_programs;
            self.multi = Some(match loaded {
                Ok(mut multi) => {
                    if wants_sessions {
                        match load_sessions(&mut self.ebpf) {
                            Ok(sessions) => multi.extend(sessions),
                            Err(err) => {
                                status!("{}", sessions_unavailable(&format!("{err:#}")));
                                self.options.sessions = false;
                            }
                        }
                    }
                    Ok(multi)
                }
                Err(err) => {
                    let why = format!("{err:#}");
                    status!(
                        "leaktrace: attaching one probe at a time ({why}; uprobe_multi links need Linux 6.6+): detaching will take ~85 ms per probe"
                    );
                    if wants_sessions {
                        status!("{}", sessions_unavailable("no uprobe_multi links"));
                        self.options.sessions = false;
                    }
                    Err(why)
                }
            });
        }
        let multi = self.multi.as_ref().and_then(|m| m.as_ref().ok());
        let links = self.links.entry(pid).or_default();
        let mut added = AttachSummary::default();
        let result = attach_to(
            &mut self.ebpf,
            multi,
            pid,
            allocator,
            links,
            &mut added,
            self.options,
        );
        // A refused session link turns sessions off for the rest of the trace.
        let result = result.map(|refused| self.options.sessions &= !refused);
        self.attached += added.probes.len();
        *self.probe_counts.entry(pid).or_default() += added.probes.len();
        self.summaries
            .entry(pid)
            .or_default()
            .probes
            .extend(added.probes.iter().cloned());
        result.map(|()| added)
    }

    /// Tells the BPF side where the CPython interpreter of process `pid` keeps its frames.
    pub fn set_python(&mut self, pid: u32, layout: &PyLayout) -> anyhow::Result<()> {
        let map = self
            .ebpf
            .map_mut(map::PY_LAYOUTS)
            .context("no PY_LAYOUTS map in the BPF object")?;
        let mut layouts: aya::maps::HashMap<_, u32, [u64; PY_LAYOUT_WORDS]> =
            aya::maps::HashMap::try_from(map).context("PY_LAYOUTS is not a hash map")?;
        layouts
            .insert(pid, layout.to_words(), 0)
            .context("writing the Python layout of the process")?;
        Ok(())
    }

    /// Every probe attached now, over all processes.
    pub fn summary(&self) -> AttachSummary {
        AttachSummary {
            probes: self
                .summaries
                .values()
                .flat_map(|s| s.probes.iter().cloned())
                .collect(),
        }
    }

    /// Detaches the probes of a process that exited, on a thread of their own: the kernel
    /// takes ~85 ms per probe, which the event loop must not wait for.
    pub fn detach(&mut self, pid: u32) {
        if let Some(map) = self.ebpf.map_mut(map::PY_LAYOUTS)
            && let Ok(mut layouts) =
                aya::maps::HashMap::<_, u32, [u64; PY_LAYOUT_WORDS]>::try_from(map)
        {
            let _ = layouts.remove(&pid);
        }
        self.summaries.remove(&pid);
        self.attached -= self.probe_counts.remove(&pid).unwrap_or(0);
        if let Some(links) = self.links.remove(&pid) {
            self.detaching.retain(|thread| !thread.is_finished());
            // Without a thread, the closure (and so the links) is dropped here: detached
            // at once, the event loop waiting.
            if let Ok(thread) = std::thread::Builder::new()
                .name("detach".into())
                .spawn(move || detach_all(links))
            {
                self.detaching.push(thread);
            }
        }
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        // Detach the rest here, then wait for the threads detaching the others.
        detach_all(self.links.drain().flat_map(|(_, links)| links).collect());
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
    pub unwind_rows: UnwindRows,
}

/// The rows from which the BPF side unwinds code without frame pointers (`--unwind auto`).
pub struct UnwindRows {
    map: Array<MapData, MapRow>,
    pages: aya::maps::HashMap<MapData, u64, MapPage>,
    current: Vec<UnwindRow>,
    current_pages: Vec<u64>,
    /// Whether to write in `BPF_MAP_UPDATE_BATCH` commands (until the kernel refuses one).
    batches: bool,
    /// Say how long each write took (`--print-row-writes`).
    print: bool,
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

    /// Replaces the rows with those of the mappings `sources` (`AddressSpace::row_sources`).
    pub fn update(&mut self, sources: &[RowSource]) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let rows = unwind_rows(sources, Self::MAX);
        let built = started.elapsed();
        let pages = self.set(&rows)?;
        if self.print
            && let Some(pages) = pages
        {
            status!(
                "leaktrace: wrote {} unwinding rows and {pages} pages in {:.1} ms (built in {:.1} ms)",
                rows.len(),
                (started.elapsed() - built).as_secs_f64() * 1e3,
                built.as_secs_f64() * 1e3
            );
        }
        Ok(())
    }

    /// Replaces the rows (sorted by pc, at most [`Self::MAX`]); the count of pages written,
    /// or `None` when the rows were those in the map already.
    fn set(&mut self, rows: &[UnwindRow]) -> anyhow::Result<Option<usize>> {
        let rows = &rows[..rows.len().min(Self::MAX)];
        if rows == self.current {
            return Ok(None);
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
        let indices: Vec<u32> = (1..=rows.len() as u32).collect();
        let values: Vec<MapRow> = rows.iter().copied().map(MapRow).collect();
        if self.batches {
            // Written whole or not at all as far as the BPF side knows: the header says 0
            // until the end.
            if let Err(err) = update_batch(self.map.map().fd().as_fd(), &indices, &values) {
                if err.raw_os_error() != Some(libc::EINVAL) {
                    return Err(err).context("writing the unwinding rows");
                }
                // A kernel without batches (before 5.6): an element at a time, from now on.
                self.batches = false;
            }
        }
        if !self.batches {
            for (&i, row) in indices.iter().zip(&values) {
                self.map.set(i, row, 0)?;
            }
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
        let (page_keys, page_values): (Vec<u64>, Vec<MapPage>) = pages
            .iter()
            .map(|&(page, entry)| (page, MapPage(entry)))
            .unzip();
        let batched = self.batches
            && update_batch(self.pages.map().fd().as_fd(), &page_keys, &page_values).is_ok();
        if !batched {
            for (page, entry) in page_keys.iter().zip(&page_values) {
                self.pages.insert(page, entry, 0)?;
            }
        }
        self.map.set(0, header(rows.len()), 0)?;
        self.current = rows.to_vec();
        self.current_pages = page_keys;
        Ok(Some(self.current_pages.len()))
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
    pub rows: RowWrites,
}

/// How the unwinding rows are written (benchmarks).
#[derive(Clone, Copy, Debug)]
pub struct RowWrites {
    /// In `BPF_MAP_UPDATE_BATCH` commands where the kernel takes them.
    pub batched: bool,
    /// Say how long each write took, on stderr.
    pub print: bool,
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
        rows,
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
    let unwind_rows = take_map(map::UNWIND_ROWS)?;
    let unwind_pages = take_map(map::UNWIND_PAGES)?;
    let maps = Maps {
        events: RingBuf::try_from(events).context("EVENTS is not a ring buffer")?,
        stats: Stats(PerCpuArray::try_from(stats).context("STATS is not a per-CPU array")?),
        unwind_rows: UnwindRows {
            map: Array::try_from(unwind_rows).context("UNWIND_ROWS is not an array")?,
            pages: aya::maps::HashMap::try_from(unwind_pages)
                .context("UNWIND_PAGES is not a hash map")?,
            current: Vec::new(),
            current_pages: Vec::new(),
            batches: rows.batched,
            print: rows.print,
        },
    };
    Ok((ebpf, maps))
}

/// What kind of trap a probe costs the target on every hit: what `--max-overhead` needs to
/// estimate the time leaktrace takes from it (the programs' own run time comes from the
/// kernel's statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// An entry probe on an instruction the kernel emulates: one trap per call (~1 us here).
    Emulated,
    /// An entry probe on an instruction the kernel single-steps out of line: two traps per
    /// call (~5 us on glibc, ~30 us measured on jemalloc under redis).
    SingleStepped,
    /// A return probe: a trap at the return, through the kernel's uretprobe trampoline.
    Return,
}

/// One probe attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedProbe {
    pub pid: u32,
    /// The function probed ("malloc", "_ZdlPv", ...), and its module as the target names it.
    pub symbol: String,
    pub module: String,
    /// The BPF program that runs there (`leaktrace_common::names::program`).
    pub program: &'static str,
    pub kind: ProbeKind,
}

impl AttachedProbe {
    /// Whether it is on a path that allocating code takes all the time: malloc, free and
    /// their aliases (`operator new`, `sdallocx`, ...).
    pub fn is_hot(&self) -> bool {
        self.kind != ProbeKind::Return
            && matches!(
                self.program,
                program::MALLOC_ENTRY | program::ALLOC_SESSION | program::FREE_ENTRY
            )
            && !matches!(self.symbol.as_str(), "valloc" | "pvalloc")
    }
}

/// The probes of one attach, or of all (`Probes::summary`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttachSummary {
    pub probes: Vec<AttachedProbe>,
}

impl AttachSummary {
    pub fn count(&self, kind: ProbeKind) -> usize {
        self.probes.iter().filter(|p| p.kind == kind).count()
    }

    /// "23 probes: 19 entries emulated, 2 single-stepped (munmap, mremap), 2 on returns".
    pub fn describe(&self) -> String {
        let single: Vec<&str> = self
            .probes
            .iter()
            .filter(|p| p.kind == ProbeKind::SingleStepped)
            .map(|p| p.symbol.as_str())
            .collect();
        let list = if single.is_empty() {
            String::new()
        } else {
            format!(" ({})", single.join(", "))
        };
        let in_sessions = self
            .probes
            .iter()
            .filter(|p| p.kind == ProbeKind::Return && p.program == program::ALLOC_SESSION)
            .count();
        let sessions = if in_sessions == 0 {
            String::new()
        } else {
            format!(" ({in_sessions} hit only by drawn calls: uprobe sessions)")
        };
        format!(
            "{} probes: {} entries emulated, {} single-stepped{list}, {} on returns{sessions}",
            self.probes.len(),
            self.count(ProbeKind::Emulated),
            single.len(),
            self.count(ProbeKind::Return)
        )
    }

    /// One line per hot entry point that must be single-stepped, saying what it costs.
    pub fn warnings(&self) -> Vec<String> {
        self.probes
            .iter()
            .filter(|p| p.is_hot() && p.kind == ProbeKind::SingleStepped)
            .map(|p| {
                format!(
                    "leaktrace: warning: {} in {} begins with no instruction the kernel can emulate: \
                     its probe is single-stepped, ~5-30 us per call (under 1 us emulated); \
                     a service calling it often slows down",
                    p.symbol, p.module
                )
            })
            .collect()
    }
}

/// A link that holds probes: one perf-event uprobe, or a uprobe_multi link of many.
enum Link {
    One(#[expect(dead_code, reason = "held for its drop")] UProbeLink),
    Multi(#[expect(dead_code, reason = "held for its drop")] MultiLink),
}

/// Detaches `links`, all at once: a uprobe_multi link waits for the kernel's grace periods on
/// release, and links released together share them. Returns when every probe is gone, so that
/// no breakpoint outlives leaktrace.
fn detach_all(mut links: Vec<Link>) {
    let multi: Vec<Link> = links
        .extract_if(.., |l| matches!(l, Link::Multi(_)))
        .collect();
    std::thread::scope(|scope| {
        for link in multi {
            // Without a thread, the link is dropped here, one after another.
            let _ = std::thread::Builder::new()
                .name("detach".into())
                .spawn_scoped(scope, move || drop(link));
        }
        // Perf-event uprobes detach one at a time under a kernel mutex whatever we do.
        drop(links);
    });
}

/// Loads the programs a second time for uprobe_multi links, sharing the maps of those aya
/// loaded (see `multi`).
fn load_multi(ebpf: &mut Ebpf, options: AttachOptions) -> anyhow::Result<MultiPrograms> {
    let names: Vec<&str> = if options.noop_programs {
        vec![program::NOOP_ENTRY, program::NOOP_RETURN]
    } else {
        real_programs().collect()
    };
    let (map_ids, btf_id) = maps_of_loaded(ebpf, &names)?;
    MultiPrograms::load(BPF_OBJECT, &names, LinkKind::Entry, &map_ids, btf_id)
}

/// Loads the session programs (Linux 6.13+) for session links, on the same maps.
fn load_sessions(ebpf: &mut Ebpf) -> anyhow::Result<MultiPrograms> {
    let (map_ids, btf_id) = maps_of_loaded(ebpf, &[])?;
    MultiPrograms::load(
        BPF_OBJECT,
        &[program::ALLOC_SESSION],
        LinkKind::Session,
        &map_ids,
        btf_id,
    )
}

/// The programs that trace, attached apart at entries and returns.
fn real_programs() -> impl Iterator<Item = &'static str> {
    program::ALL.into_iter().filter(|p| {
        !matches!(
            *p,
            program::NOOP_ENTRY | program::NOOP_RETURN | program::ALLOC_SESSION
        )
    })
}

/// The ids of the maps of every tracing program and `also`, and of their BTF, loading them
/// through aya first where needed. Every program's maps, whichever are loaded again: aya-obj
/// relocates every function of the object, and without the maps of the others the no-op
/// programs of the floor (which use none) failed to load for links, so that the floor went one
/// probe at a time and took seconds to detach.
fn maps_of_loaded(ebpf: &mut Ebpf, also: &[&str]) -> anyhow::Result<(Vec<u32>, Option<u32>)> {
    let mut map_ids = Vec::new();
    let mut btf_id = None;
    let mut names: Vec<&str> = real_programs().collect();
    names.extend(
        also.iter()
            .filter(|name| !names.contains(name))
            .collect::<Vec<_>>(),
    );
    for name in names {
        let probe: &mut UProbe = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name} in the BPF object"))?
            .try_into()?;
        if probe.fd().is_err() {
            probe
                .load()
                .with_context(|| format!("loading BPF program {name}"))?;
        }
        let info = probe.info()?;
        map_ids.extend(info.map_ids()?.unwrap_or_default());
        btf_id = btf_id.or(info.btf_id());
    }
    map_ids.sort_unstable();
    map_ids.dedup();
    Ok((map_ids, btf_id))
}

/// `entries` grouped by the program that runs there, in order of first appearance, each group in
/// `entries`' order.
fn by_program<'a>(
    entries: impl Iterator<Item = &'a EntryPoint>,
    options: AttachOptions,
) -> Vec<(&'static str, Vec<&'a EntryPoint>)> {
    let mut groups: Vec<(&'static str, Vec<&'a EntryPoint>)> = Vec::new();
    for entry in entries {
        let program = match (options.noop_programs, entry.program) {
            (false, program) => program,
            (true, _) => program::NOOP_ENTRY,
        };
        match groups.iter_mut().find(|(p, _)| *p == program) {
            Some((_, group)) => group.push(entry),
            None => groups.push((program, vec![entry])),
        }
    }
    groups
}

/// Attaches to the target's allocator, frees first, then the returns, then the other entries
/// in `allocator`'s order (munmap, mremap and realloc before the calls that only allocate): a
/// release seen without its allocation is counted as unmatched, while an allocation seen
/// without its release would look like a leak.
/// Which program runs at which entry point is `allocator::discover`'s choice; `alloc_return`
/// runs at the return of every one but the free-like ones.
///
/// Each entry point is probed where `probe_point` chose, the first instruction the kernel
/// emulates when a straight-line prefix leads to one, its return probe at the same place
/// (`%rsp` is unchanged there, so the return address is still at `[%rsp]`). With `multi`, the
/// probes of one program in one module are one uprobe_multi link; with `options.sessions`, the
/// malloc family's are session links where the kernel takes them. Returns whether it refused
/// one (its entry points then have an entry and a return probe).
fn attach_to(
    ebpf: &mut Ebpf,
    multi: Option<&MultiPrograms>,
    pid: u32,
    allocator: &Allocator,
    links: &mut Vec<Link>,
    summary: &mut AttachSummary,
    options: AttachOptions,
) -> anyhow::Result<bool> {
    let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).context("pid 0")?);
    let program_for = |program: &'static str| match (options.noop_programs, program) {
        (false, _) => program,
        (true, program::ALLOC_RETURN) => program::NOOP_RETURN,
        (true, _) => program::NOOP_ENTRY,
    };
    let point_of = |entry: &EntryPoint| {
        if options.at_entry {
            entry.entry
        } else {
            entry.probe
        }
    };
    let failed = |err: anyhow::Error, program: &str, entry: &EntryPoint| {
        if process::is_alive(pid) {
            err.context(format!(
                "attaching {program} to {} in {}",
                entry.symbol, entry.module
            ))
        } else {
            anyhow!("process {pid} exited while leaktrace was attaching")
        }
    };
    // One step of the order above: entries that share a program, attached together.
    let mut attach_group = |ebpf: &mut Ebpf,
                            program: &'static str,
                            group: &[&EntryPoint],
                            kind: LinkKind|
     -> anyhow::Result<()> {
        if group.is_empty() {
            return Ok(());
        }
        // A return program reads no argument; 0 is "where the ABI puts them".
        let cookie = |e: &EntryPoint| {
            let pymalloc = if super::python::is_object_allocator(&e.symbol) {
                args::PYMALLOC
            } else {
                0
            };
            match kind {
                LinkKind::Return => 0,
                LinkKind::Entry => point_of(e).cookie | pymalloc,
                LinkKind::Session => {
                    let call = program::session_call(e.program).unwrap_or_default();
                    point_of(e).cookie | pymalloc | u64::from(call) << args::CALL_SHIFT
                }
            }
        };
        if let Some(fd) = multi.and_then(|m| m.get(program)) {
            // One link per module (the group's entries may alternate between modules).
            let mut modules: Vec<&Path> = Vec::new();
            for entry in group {
                if !modules.contains(&entry.path.as_path()) {
                    modules.push(&entry.path);
                }
            }
            for path in modules {
                let entries: Vec<&EntryPoint> =
                    group.iter().copied().filter(|e| e.path == path).collect();
                let offsets: Vec<u64> = entries.iter().map(|e| point_of(e).file_offset).collect();
                let cookies: Vec<u64> = entries.iter().map(|e| cookie(e)).collect();
                let link = multi::attach(fd, path, &offsets, &cookies, pid, kind)
                    .map_err(|err| failed(err, program, entries[0]))?;
                links.push(Link::Multi(link));
            }
        } else {
            for &entry in group {
                let probe: &mut UProbe = ebpf
                    .program_mut(program)
                    .with_context(|| format!("no program {program} in the BPF object"))?
                    .try_into()?;
                if probe.fd().is_err() {
                    probe
                        .load()
                        .with_context(|| format!("loading BPF program {program}"))?;
                }
                let point = point_of(entry);
                let at = UProbeAttachPoint {
                    location: UProbeAttachLocation::AbsoluteOffset(point.file_offset),
                    cookie: Some(cookie(entry)),
                };
                let link = probe
                    .attach(at, &entry.path, scope)
                    .map_err(|err| failed(anyhow!(err), program, entry))?;
                links.push(Link::One(probe.take_link(link)?));
            }
        }
        for &entry in group {
            let trap = match point_of(entry).trap {
                Trap::Emulated => ProbeKind::Emulated,
                Trap::SingleStepped => ProbeKind::SingleStepped,
            };
            let kinds: &[ProbeKind] = match kind {
                LinkKind::Entry => &[trap],
                LinkKind::Return => &[ProbeKind::Return],
                // A session is an entry probe and a return probe (which only drawn calls hit).
                LinkKind::Session => &[trap, ProbeKind::Return],
            };
            for &kind in kinds {
                summary.probes.push(AttachedProbe {
                    pid,
                    symbol: entry.symbol.clone(),
                    module: entry.module.clone(),
                    program,
                    kind,
                });
            }
        }
        Ok(())
    };
    let entries = &allocator.entry_points;
    for (program, group) in by_program(entries.iter().filter(|e| !e.allocates()), options) {
        attach_group(ebpf, program, &group, LinkKind::Entry)?;
    }
    // The malloc family's entry points, through sessions where they can be.
    let sessions = options.sessions
        && !options.noop_programs
        && multi.is_some_and(|m| m.get(program::ALLOC_SESSION).is_some());
    let (in_sessions, apart): (Vec<&EntryPoint>, Vec<&EntryPoint>) = entries
        .iter()
        .filter(|e| e.allocates())
        .partition(|e| sessions && program::session_call(e.program).is_some());
    attach_group(
        ebpf,
        program_for(program::ALLOC_RETURN),
        &apart,
        LinkKind::Return,
    )?;
    for (program, group) in by_program(apart.into_iter(), options) {
        attach_group(ebpf, program, &group, LinkKind::Entry)?;
    }
    // A session link per module, so that one the kernel refuses falls back to entry and return
    // probes without attaching anything twice.
    let mut modules: Vec<(&Path, Vec<&EntryPoint>)> = Vec::new();
    for entry in in_sessions {
        match modules.iter_mut().find(|(path, _)| *path == entry.path) {
            Some((_, group)) => group.push(entry),
            None => modules.push((&entry.path, vec![entry])),
        }
    }
    let mut refused = false;
    for (_, group) in modules {
        if !refused {
            match attach_group(ebpf, program::ALLOC_SESSION, &group, LinkKind::Session) {
                Ok(()) => continue,
                Err(err) if process::is_alive(pid) => {
                    status!("{}", sessions_unavailable(&format!("{err:#}")));
                    refused = true;
                }
                Err(err) => return Err(err),
            }
        }
        attach_group(ebpf, program::ALLOC_RETURN, &group, LinkKind::Return)?;
        for (program, group) in by_program(group.into_iter(), options) {
            attach_group(ebpf, program, &group, LinkKind::Entry)?;
        }
    }
    Ok(refused)
}

/// The line that says why a sampled trace cannot skip the return probes of undrawn calls.
fn sessions_unavailable(why: &str) -> String {
    format!(
        "leaktrace: every sampled call still traps at its return, drawn or not ({why}; uprobe session programs need Linux 6.13+)"
    )
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
