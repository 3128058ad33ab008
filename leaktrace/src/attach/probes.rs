//! Loading the BPF programs and attaching them to the target's allocator.

use std::{
    collections::{BTreeMap, HashMap},
    num::NonZeroU32,
    os::fd::AsFd as _,
    path::Path,
    sync::Arc,
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
    unwind_rows::{MAX_UNWIND_PAGES, MAX_UNWIND_ROWS, PageRows, UnwindRow, header},
};

use super::{
    allocator::{Allocator, EntryPoint},
    bpf_syscall::update_batch,
    kernel_btf,
    multi::{self, LinkKind, MultiLink, MultiPrograms},
    probe_point::Trap,
};
use crate::proc::process;
use crate::status;
use crate::target::{
    address_space::{Pages, RowSource, RowTable},
    modules::Module,
};

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
    /// The kernel's ids of every map of the object (`Maps::ids`).
    map_ids: Vec<u32>,
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
    /// Attach no return probe (with `noop_programs`): the cheapest a sampling tracer can be at
    /// these probe points, one entry trap per call, as when every call is left undrawn.
    pub entries_only: bool,
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

    /// Nothing attached yet, with the programs of `ebpf`, whose maps have the ids `map_ids`
    /// (`Maps::ids`).
    pub fn new(ebpf: Ebpf, map_ids: Vec<u32>, options: AttachOptions) -> anyhow::Result<Self> {
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
            map_ids,
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
            let wants_sessions = self.options.sessions && !self.options.noop_programs;
            let (loaded, sessions) = if self.options.one_at_a_time {
                (Err(anyhow!("--probes-one-at-a-time")), None)
            } else {
                match shared_with_aya(&mut self.ebpf, &self.map_ids) {
                    // The verifier checks one program at a time on one CPU: the session
                    // program alongside the others.
                    Ok(shared) => std::thread::scope(|scope| {
                        let sessions = wants_sessions.then(|| {
                            std::thread::Builder::new()
                                .name("load".into())
                                .spawn_scoped(scope, || load_sessions(&shared))
                        });
                        let loaded = load_multi(&shared, self.options);
                        let sessions = sessions.map(|spawned| match spawned {
                            Ok(thread) => thread
                                .join()
                                .unwrap_or_else(|_| Err(anyhow!("the loading thread panicked"))),
                            Err(err) => load_sessions(&shared)
                                .with_context(|| format!("no thread to load in ({err})")),
                        });
                        (loaded, sessions)
                    }),
                    Err(err) => (Err(err), None),
                }
            };
            self.multi = Some(match loaded {
                Ok(mut multi) => {
                    if let Some(sessions) = sessions {
                        match sessions {
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
        self.count_python_processes()
    }

    /// Writes how many processes have a Python layout into `PY_PROCESSES`, which the BPF side
    /// reads before it looks for the layout of the allocating process: after the layouts
    /// change, so that a count it reads is never ahead of them.
    fn count_python_processes(&mut self) -> anyhow::Result<()> {
        let layouts = self
            .ebpf
            .map(map::PY_LAYOUTS)
            .context("no PY_LAYOUTS map in the BPF object")?;
        let layouts: aya::maps::HashMap<_, u32, [u64; PY_LAYOUT_WORDS]> =
            aya::maps::HashMap::try_from(layouts).context("PY_LAYOUTS is not a hash map")?;
        let count = u32::try_from(layouts.keys().count()).unwrap_or(u32::MAX);
        let map = self
            .ebpf
            .map_mut(map::PY_PROCESSES)
            .context("no PY_PROCESSES map in the BPF object")?;
        let mut processes: aya::maps::Array<_, u32> =
            aya::maps::Array::try_from(map).context("PY_PROCESSES is not an array")?;
        processes
            .set(0, count, 0)
            .context("writing the count of Python processes")
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
        let _ = self.count_python_processes();
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
    /// The kernel's ids of every map of the object, those above included: what programs
    /// loaded apart from aya's (`multi`) are relocated to.
    pub ids: Vec<u32>,
}

/// The rows from which the BPF side unwinds code without frame pointers (`--unwind auto`), for
/// every traced process.
pub struct UnwindRows {
    map: Array<MapData, MapRow>,
    pages: aya::maps::HashMap<MapData, u64, MapPage>,
    /// What the map holds: the rows written (`written` of them) and the pages.
    table: RowTable,
    written: usize,
    current_pages: Pages,
    /// Changes at every write, which makes the BPF side's hints stale (`unwind_rows::header`).
    generation: u32,
    /// Whether to write in `BPF_MAP_UPDATE_BATCH` commands (until the kernel refuses one).
    batches: bool,
    /// Say how long each write took (`--print-row-writes`).
    print: bool,
}

/// A [`PageRows`] as aya reads and writes map values.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct MapPage(PageRows);

// SAFETY: PageRows is #[repr(C)], two u32 and a u64, without padding (leaktrace-common tests
// its layout), valid for any bytes.
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

    /// Makes the rows and pages cover the executable mappings of `processes` (pid,
    /// `AddressSpace::row_sources`): the rows of modules new to the map are written past those
    /// in it, which stay; when they do not fit and some module in the map is no longer mapped,
    /// the rows are written anew.
    pub fn update(&mut self, processes: &[(u32, Vec<RowSource>)]) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let max_pages = MAX_UNWIND_PAGES as usize;
        let mut rebuilt = false;
        let (mut pages, mut left_out) = self.table.pages(processes, Self::MAX, max_pages);
        if left_out > 0 && self.table.unused_segments(processes) > 0 {
            self.table = RowTable::new();
            self.written = 0;
            rebuilt = true;
            (pages, left_out) = self.table.pages(processes, Self::MAX, max_pages);
        }
        let built = started.elapsed();
        let wrote = self.set(&pages, rebuilt)?;
        if self.print && wrote {
            status!(
                "leaktrace: wrote {} unwinding rows and {} pages for {} processes in {:.1} ms (built in {:.1} ms; {left_out} mappings left to stack copies)",
                self.written,
                self.current_pages.len(),
                processes.len(),
                (started.elapsed() - built).as_secs_f64() * 1e3,
                built.as_secs_f64() * 1e3
            );
        }
        Ok(())
    }

    /// Writes the rows of `modules` before any process maps them (spawn mode: the command's
    /// program and libraries, before its `exec`), so that only their pages are left to write
    /// once it runs. Until its rows and pages are in the maps, every allocation through code
    /// without frame pointers comes with a stack copy: python3's rows took 0.1-0.5 s to
    /// build and write after the exec, and a start-up that allocates at once overflowed
    /// the ring buffer with copies meanwhile.
    pub fn prepare(&mut self, modules: &[Arc<Module>]) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        self.table.add_segments(modules, Self::MAX);
        let pages = self.current_pages.clone();
        if self.set(&pages, false)? && self.print {
            status!(
                "leaktrace: wrote {} unwinding rows of {} modules before they were mapped in {:.1} ms",
                self.written,
                modules.len(),
                started.elapsed().as_secs_f64() * 1e3
            );
        }
        Ok(())
    }

    /// Writes the table's rows past those written (all of them when `rebuilt`) and `pages`;
    /// false when the map held them already.
    fn set(&mut self, pages: &Pages, rebuilt: bool) -> anyhow::Result<bool> {
        let rows = self.table.rows();
        if rows.len() == self.written && *pages == self.current_pages {
            return Ok(false);
        }
        self.generation = self.generation.wrapping_add(1);
        if rebuilt {
            // No rows while they are rewritten: a stack unwound meanwhile is copied instead of
            // mixing the old rows with the new.
            self.map.set(0, MapRow(header(0, self.generation)), 0)?;
        }
        // New rows go past the count in the header: the BPF side reads none of them until the
        // header says so, and the pages that point at them come after them.
        let indices: Vec<u32> = (self.written as u32 + 1..=rows.len() as u32).collect();
        let values: Vec<MapRow> = rows[self.written..].iter().copied().map(MapRow).collect();
        if self.batches
            && let Err(err) = update_batch(self.map.map().fd().as_fd(), &indices, &values)
        {
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(err).context("writing the unwinding rows");
            }
            // A kernel without batches (before 5.6): an element at a time, from now on.
            self.batches = false;
        }
        if !self.batches {
            for (&i, row) in indices.iter().zip(&values) {
                self.map.set(i, row, 0)?;
            }
        }
        for page in self.current_pages.keys().filter(|k| !pages.contains_key(k)) {
            self.pages.remove(page)?;
        }
        let (page_keys, page_values): (Vec<u64>, Vec<MapPage>) = pages
            .iter()
            .filter(|&(key, entry)| self.current_pages.get(key) != Some(entry))
            .map(|(&key, &entry)| (key, MapPage(entry)))
            .unzip();
        let batched = self.batches
            && update_batch(self.pages.map().fd().as_fd(), &page_keys, &page_values).is_ok();
        if !batched {
            for (page, entry) in page_keys.iter().zip(&page_values) {
                self.pages.insert(page, entry, 0)?;
            }
        }
        self.map
            .set(0, MapRow(header(rows.len() as u32, self.generation)), 0)?;
        self.written = rows.len();
        self.current_pages = pages.clone();
        Ok(true)
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

    /// Runs of the session program at the returns of drawn calls since load.
    pub fn session_returns(&self) -> u64 {
        self.sum(stat::SESSION_RETURNS)
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
    let trampoline_offsets = std::fs::read(KERNEL_BTF)
        .map_err(|e| e.to_string())
        .and_then(|btf| kernel_btf::trampoline_offsets(&btf).map_err(|e| e.to_string()))
        .unwrap_or_else(|why| {
            if sample_bytes != 0 {
                status!(
                "leaktrace: note: the kernel's BTF does not say where its uretprobe trampoline is ({why}): under --sample-bytes, a page-aligned return address is taken for it"
                );
            }
            [0; 3]
        });

    let mut ebpf = EbpfLoader::new()
        // aya 0.14 has no type for task storage (the THREADS map, which only the BPF side
        // uses), and refuses to create maps it has no type for unless told.
        .allow_unsupported_maps()
        .map_max_entries(map::EVENTS, ringbuf_bytes)
        .override_global(global::STACK_DEPTH, &capture.max_depth, true)
        .override_global(global::UNWIND_MODE, &capture.mode.bpf_mode(), true)
        .override_global(global::STACK_COPY_BYTES, &capture.stack_copy_bytes, true)
        .override_global(global::SAMPLE_BYTES, &sample_bytes, true)
        .override_global(global::TRAMPOLINE_OFFSETS, &trampoline_offsets, true)
        .load(BPF_OBJECT)
        .context("loading the BPF programs (is this kernel built with BPF and uprobes?)")?;
    let ids = map_ids_of(&ebpf)?;
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
            table: RowTable::new(),
            written: 0,
            current_pages: Pages::new(),
            generation: 0,
            batches: rows.batched,
            print: rows.print,
        },
        ids,
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
    /// their aliases (`operator new`, `sdallocx`, ...), and CPython's allocators, which every
    /// Python object's creation and release goes through.
    pub fn is_hot(&self) -> bool {
        self.kind != ProbeKind::Return
            && (matches!(
                self.program,
                program::MALLOC_ENTRY
                    | program::ALLOC_SESSION
                    | program::FREE_ENTRY
                    | program::PY_FREE_ENTRY
            ) || super::python::is_object_allocator(&self.symbol))
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

/// Loads the programs for uprobe_multi links (see `multi`), on the maps aya created.
fn load_multi(shared: &Shared, options: AttachOptions) -> anyhow::Result<MultiPrograms> {
    let names: Vec<&str> = if options.noop_programs {
        vec![program::NOOP_ENTRY, program::NOOP_RETURN]
    } else {
        real_programs().collect()
    };
    MultiPrograms::load(
        BPF_OBJECT,
        &names,
        LinkKind::Entry,
        &shared.map_ids,
        shared.btf_id,
    )
}

/// Loads the session programs (Linux 6.13+) for session links, on the same maps.
fn load_sessions(shared: &Shared) -> anyhow::Result<MultiPrograms> {
    MultiPrograms::load(
        BPF_OBJECT,
        &[program::ALLOC_SESSION],
        LinkKind::Session,
        &shared.map_ids,
        shared.btf_id,
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

/// What the programs loaded for links share with aya's: the ids of every map of the object
/// (all of them: aya-obj relocates every function of the object, and without the maps of the
/// others the no-op programs of the floor, which use none, failed to load for links), and of
/// the BTF aya loaded.
struct Shared {
    map_ids: Vec<u32>,
    btf_id: Option<u32>,
}

/// The kernel's id of each map aya created, as `load` found them (before it took some).
fn map_ids_of(ebpf: &Ebpf) -> anyhow::Result<Vec<u32>> {
    use aya::maps::Map;
    let mut ids = Vec::new();
    for (name, map) in ebpf.maps() {
        let (Map::Array(data)
        | Map::ArrayOfMaps(data)
        | Map::BloomFilter(data)
        | Map::CgroupArray(data)
        | Map::CgroupStorage(data)
        | Map::CgrpStorage(data)
        | Map::CpuMap(data)
        | Map::DevMap(data)
        | Map::DevMapHash(data)
        | Map::HashMap(data)
        | Map::HashOfMaps(data)
        | Map::InodeStorage(data)
        | Map::LpmTrie(data)
        | Map::LruHashMap(data)
        | Map::PerCpuArray(data)
        | Map::PerCpuCgroupStorage(data)
        | Map::PerCpuHashMap(data)
        | Map::PerCpuLruHashMap(data)
        | Map::PerfEventArray(data)
        | Map::ProgramArray(data)
        | Map::Queue(data)
        | Map::ReusePortSockArray(data)
        | Map::RingBuf(data)
        | Map::SockHash(data)
        | Map::SockMap(data)
        | Map::SkStorage(data)
        | Map::Stack(data)
        | Map::StackTraceMap(data)
        | Map::Unsupported(data)
        | Map::XskMap(data)) = map;
        ids.push(data.info().with_context(|| format!("map {name}"))?.id());
    }
    Ok(ids)
}

/// The maps and BTF for programs loaded apart (`Shared`), with the BTF's id from the one
/// program aya loads for it, the smallest: loading the others through aya too would make the
/// verifier check each twice (alloc_return's check is most of the time attaching takes).
fn shared_with_aya(ebpf: &mut Ebpf, map_ids: &[u32]) -> anyhow::Result<Shared> {
    let name = program::FREE_ENTRY;
    let probe: &mut UProbe = ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name} in the BPF object"))?
        .try_into()?;
    if probe.fd().is_err() {
        probe
            .load()
            .with_context(|| format!("loading BPF program {name}"))?;
    }
    Ok(Shared {
        map_ids: map_ids.to_vec(),
        btf_id: probe.info()?.btf_id(),
    })
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
        if group.is_empty() || (options.entries_only && kind == LinkKind::Return) {
            return Ok(());
        }
        // A return program reads no argument; 0 is "where the ABI puts them".
        let cookie = |e: &EntryPoint| {
            // `allocate_from_new_pool` is where an inlined pymalloc maps its arenas.
            let pymalloc = if super::python::is_object_allocator(&e.symbol)
                || e.program == program::PY_NEW_POOL_ENTRY
            {
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
    fn cpython_s_allocators_are_hot_and_warn_when_single_stepped() {
        let probe = |symbol: &str, program: &'static str, kind: ProbeKind| AttachedProbe {
            pid: 1,
            symbol: symbol.to_owned(),
            module: "libpython3.12.so.1.0".to_owned(),
            program,
            kind,
        };
        let single = ProbeKind::SingleStepped;
        let summary = AttachSummary {
            probes: vec![
                probe("PyObject_Free", program::PY_FREE_ENTRY, single),
                probe("_PyObject_Free", program::PY_FREE_ENTRY, single),
                probe("PyObject_Realloc", program::REALLOC_ENTRY, single),
                probe("PyMem_Calloc", program::CALLOC_ENTRY, single),
                probe("PyMem_Free", program::PY_FREE_ENTRY, ProbeKind::Emulated),
                probe("PyObject_Malloc", program::MALLOC_ENTRY, ProbeKind::Return),
                probe("munmap", program::MUNMAP_ENTRY, single),
                probe("valloc", program::MALLOC_ENTRY, single),
            ],
        };
        let warnings = summary.warnings();
        let warned: Vec<&str> = warnings
            .iter()
            .filter_map(|w| w.strip_prefix("leaktrace: warning: ")?.split(' ').next())
            .collect();
        assert_eq!(
            warned,
            [
                "PyObject_Free",
                "_PyObject_Free",
                "PyObject_Realloc",
                "PyMem_Calloc"
            ]
        );
        assert!(warnings[0].contains("~5-30 us per call"), "{warnings:?}");
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
