//! Loading the BPF programs and attaching them to the target's allocator.

use std::num::NonZeroU32;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{UProbe, uprobe::UProbeScope},
};
use leaktrace_common::{MAX_FP_RANGES, stat};

use crate::target::Target;

/// Which program runs at which entry point. `alloc_return` runs at the return of every
/// allocating one.
const ENTRY_PROGRAMS: [(&str, &str); 9] = [
    ("malloc", "malloc_entry"),
    ("valloc", "malloc_entry"),
    ("pvalloc", "malloc_entry"),
    ("calloc", "calloc_entry"),
    ("realloc", "realloc_entry"),
    ("reallocarray", "reallocarray_entry"),
    ("posix_memalign", "posix_memalign_entry"),
    ("aligned_alloc", "aligned_alloc_entry"),
    ("memalign", "aligned_alloc_entry"),
];

/// Programs attached to one process. Dropping it detaches every probe.
pub struct Probes {
    attached: usize,
    _ebpf: Ebpf,
}

impl Probes {
    pub fn attached(&self) -> usize {
        self.attached
    }
}

/// The maps that outlive the probes, so that events still in flight can be drained after
/// detaching.
pub struct Maps {
    pub events: RingBuf<MapData>,
    pub stats: Stats,
    pub fp_code: FramePointerCode,
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
            self.map.set(0, count, 0)?;
        }
        for (i, &(start, end)) in ranges.iter().enumerate() {
            self.map.set(1 + 2 * i as u32, start, 0)?;
            self.map.set(2 + 2 * i as u32, end, 0)?;
        }
        self.map.set(0, count, 0)?;
        self.current = ranges;
        Ok(())
    }
}

/// The per-CPU counters that the BPF programs keep.
pub struct Stats(PerCpuArray<MapData, u64>);

impl Stats {
    /// Events lost since load (summed over CPUs).
    pub fn lost_events(&self) -> u64 {
        self.sum(stat::RINGBUF_FULL) + self.sum(stat::PENDING_FULL)
    }

    fn sum(&self, index: u32) -> u64 {
        self.0
            .get(&index, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }
}

/// How the BPF side captures stacks.
#[derive(Clone, Copy, Debug)]
pub struct StackCapture {
    /// One of `leaktrace_common::unwind`'s constants.
    pub mode: u32,
    /// One of `leaktrace_common::STACK_COPY_SIZES`.
    pub stack_copy_bytes: u32,
}

pub fn load(ringbuf_bytes: u32, capture: StackCapture) -> anyhow::Result<(Ebpf, Maps)> {
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
        .override_global("UNWIND_MODE", &capture.mode, true)
        .override_global("STACK_COPY_BYTES", &capture.stack_copy_bytes, true)
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
    let fp_code = ebpf
        .take_map("FP_CODE")
        .context("no FP_CODE map in the BPF object")?;
    let maps = Maps {
        events: RingBuf::try_from(events).context("EVENTS is not a ring buffer")?,
        stats: Stats(PerCpuArray::try_from(stats).context("STATS is not a per-CPU array")?),
        fp_code: FramePointerCode {
            map: Array::try_from(fp_code).context("FP_CODE is not an array")?,
            current: Vec::new(),
        },
    };
    Ok((ebpf, maps))
}

/// Attaches to the target's allocator, frees first: a free seen without its allocation is
/// counted as unmatched, while an allocation seen without its free would look like a leak.
pub fn attach(mut ebpf: Ebpf, target: &Target) -> anyhow::Result<Probes> {
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
    let free = offset_of("free").context("no free")?;
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
    attach_one(&mut ebpf, "free_entry", "free", free)?;
    for &(symbol, _, offset) in &entries {
        attach_one(&mut ebpf, "alloc_return", symbol, offset)?;
    }
    for &(symbol, program, offset) in &entries {
        attach_one(&mut ebpf, program, symbol, offset)?;
    }
    Ok(Probes {
        attached,
        _ebpf: ebpf,
    })
}
