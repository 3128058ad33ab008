//! Unwinding copied user stacks with call-frame information (`.eh_frame`, `.debug_frame`), the
//! way `perf record --call-graph dwarf` does: the BPF side sends the allocator's caller's
//! registers and a window of its stack; this walks that window frame by frame, with the CFI of
//! the module that holds each pc, and follows the frame pointer where a pc has no CFI.
//!
//! Unwind tables are parsed lazily, the first time a module shows up (in a stack, or in the
//! target's memory map), so libraries loaded after attach (dlopen) are covered; the memory map
//! is re-read when a pc falls outside every known module. The rule for each pc is cached: a
//! leak site unwinds with a few hash lookups per frame.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, DebugFrameOffset, EhFrame, EhFrameOffset,
    EndianSlice, LittleEndian, RegisterRule, UnwindContext, UnwindSection, X86_64,
};
use leaktrace_common::MAX_STACK_DEPTH;
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

use crate::proc::{
    clock::monotonic_ns,
    maps::{Mapping, ProcMaps, candidate_paths},
};

/// The caller's registers and the copy of its stack that come with an `EVENT_ALLOC_STACK`
/// record, for unwinding with call-frame information.
#[derive(Debug, PartialEq, Eq)]
pub struct UserStack<'a> {
    /// When the allocation returned (`CLOCK_MONOTONIC`): the code on the stack was mapped by
    /// then.
    pub ts_ns: u64,
    /// The return address into the allocator's caller.
    pub ip: u64,
    /// The caller's stack pointer: `stack[0]` is the byte at this address.
    pub sp: u64,
    pub bp: u64,
    pub stack: &'a [u8],
}

/// How to find the caller's frame from a frame whose pc is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// From the CFI: the canonical frame address (the caller's stack pointer) is `sp` (or
    /// `bp`) plus `cfa_offset`; the return address is saved at `CFA + ra_offset`, and the
    /// caller's `rbp` at `CFA + bp_offset` (unchanged when `None`).
    Cfi {
        cfa_from_bp: bool,
        cfa_offset: i64,
        ra_offset: i64,
        bp_offset: Option<i64>,
    },
    /// The CFI marks the return address undefined: the outermost frame (`_start`, `clone3`).
    Outermost,
    /// No usable CFI for this pc (none at all, or a rule this unwinder does not evaluate, such
    /// as a DWARF expression): the saved frame pointer and return address sit at `bp`.
    FramePointer,
}

/// Counters of what the unwinder did, for the bench and for tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindStats {
    pub stacks: u64,
    /// Frames recovered with CFI and with the frame pointer.
    pub cfi_frames: u64,
    pub fp_frames: u64,
    /// Stacks whose copied window ended before their outermost frame: the rest came from the
    /// frame-pointer stack where it matched, or is missing (the stack is marked truncated).
    pub window_ended: u64,
    pub modules_loaded: u64,
    /// Time spent in [`Unwinder::unwind`].
    pub busy: Duration,
}

/// The call-frame information of one ELF file, indexed by address.
pub struct ModuleCfi {
    eh_frame: Option<Section>,
    debug_frame: Option<Section>,
    text_address: u64,
    /// Every FDE, sorted by start address.
    fdes: Vec<Fde>,
    /// `PT_LOAD` segments: (file offset, file size, virtual address).
    segments: Vec<(u64, u64, u64)>,
    /// Most of its functions set up a frame pointer (their CFA moves to `rbp`), or it has no
    /// CFI at all, so frame pointers are all one can use.
    pub keeps_frame_pointers: bool,
}

struct Section {
    data: Vec<u8>,
    address: u64,
}

#[derive(Clone, Copy, Debug)]
struct Fde {
    start: u64,
    end: u64,
    in_eh_frame: bool,
    offset: usize,
}

/// A module is taken to keep frame pointers when at least this share of its functions (by
/// FDE count) moves its CFA to `rbp`. Built with `-fno-omit-frame-pointer`, nearly all do
/// (only hand-written start-up code does not); built without, only the few functions that
/// use `alloca` or realign their stack.
const FRAME_POINTER_SHARE: f64 = 0.5;

impl ModuleCfi {
    /// Parses an ELF file's CFI sections and indexes their FDEs. `data` may be a whole file
    /// in memory or an `object::ReadCache` over an open file, which reads only the headers
    /// and the sections used (a binary with debug information can be very large).
    pub fn parse<'data, R: object::ReadRef<'data>>(data: R) -> Result<Self, String> {
        let file = object::File::parse(data).map_err(|e| e.to_string())?;
        let section = |name: &str| {
            let section = file.section_by_name(name)?;
            let bytes = section.uncompressed_data().ok()?;
            Some(Section {
                data: bytes.into_owned(),
                address: section.address(),
            })
        };
        let text_address = file.section_by_name(".text").map_or(0, |s| s.address());
        let segments = file
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                (offset, size, s.address())
            })
            .collect();
        let mut module = Self {
            eh_frame: section(".eh_frame"),
            debug_frame: section(".debug_frame"),
            text_address,
            fdes: Vec::new(),
            segments,
            keeps_frame_pointers: true,
        };
        let (mut with_fp, mut total) = (0u64, 0u64);
        if let Some(eh) = &module.eh_frame {
            let section = EhFrame::new(&eh.data, LittleEndian);
            let bases = module.bases(eh);
            index(
                &section,
                &bases,
                true,
                &mut module.fdes,
                &mut with_fp,
                &mut total,
            );
        }
        if let Some(debug) = &module.debug_frame {
            let section = DebugFrame::new(&debug.data, LittleEndian);
            let bases = BaseAddresses::default();
            index(
                &section,
                &bases,
                false,
                &mut module.fdes,
                &mut with_fp,
                &mut total,
            );
        }
        module.fdes.sort_by_key(|f| f.start);
        // The same function may be described in both sections; either description will do.
        module.fdes.dedup_by_key(|f| f.start);
        if total > 0 {
            module.keeps_frame_pointers = with_fp as f64 / total as f64 >= FRAME_POINTER_SHARE;
        }
        Ok(module)
    }

    fn bases(&self, eh: &Section) -> BaseAddresses {
        BaseAddresses::default()
            .set_eh_frame(eh.address)
            .set_text(self.text_address)
    }

    /// The ELF virtual address of a file offset.
    fn vaddr_of(&self, file_offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|&&(offset, size, _)| offset <= file_offset && file_offset < offset + size)
            .map(|&(offset, _, vaddr)| file_offset - offset + vaddr)
    }

    /// The unwinding rule at virtual address `vaddr`.
    fn step_at(&self, vaddr: u64, ctx: &mut UnwindContext<usize>) -> Step {
        let index = self.fdes.partition_point(|f| f.start <= vaddr);
        let Some(fde) = index
            .checked_sub(1)
            .map(|i| self.fdes[i])
            .filter(|f| vaddr < f.end)
        else {
            return Step::FramePointer;
        };
        let row = if fde.in_eh_frame {
            let Some(eh) = &self.eh_frame else {
                return Step::FramePointer;
            };
            let section = EhFrame::new(&eh.data, LittleEndian);
            let bases = self.bases(eh);
            section
                .fde_from_offset(&bases, EhFrameOffset(fde.offset), EhFrame::cie_from_offset)
                .and_then(|f| f.unwind_info_for_address(&section, &bases, ctx, vaddr))
                .map(|row| {
                    step_of(
                        row.cfa(),
                        row.register(X86_64::RA),
                        row.register(X86_64::RBP),
                    )
                })
        } else {
            let Some(debug) = &self.debug_frame else {
                return Step::FramePointer;
            };
            let section = DebugFrame::new(&debug.data, LittleEndian);
            let bases = BaseAddresses::default();
            section
                .fde_from_offset(
                    &bases,
                    DebugFrameOffset(fde.offset),
                    DebugFrame::cie_from_offset,
                )
                .and_then(|f| f.unwind_info_for_address(&section, &bases, ctx, vaddr))
                .map(|row| {
                    step_of(
                        row.cfa(),
                        row.register(X86_64::RA),
                        row.register(X86_64::RBP),
                    )
                })
        };
        row.unwrap_or(Step::FramePointer)
    }
}

/// Adds the FDEs of one section to `fdes`, and counts those that move the CFA to `rbp`.
fn index<'a, S: UnwindSection<EndianSlice<'a, LittleEndian>>>(
    section: &S,
    bases: &BaseAddresses,
    in_eh_frame: bool,
    fdes: &mut Vec<Fde>,
    with_fp: &mut u64,
    total: &mut u64,
) {
    let mut entries = section.entries(bases);
    // A malformed entry ends the section: what came before it is still good.
    while let Ok(Some(entry)) = entries.next() {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let Ok(fde) = partial.parse(S::cie_from_offset) else {
            continue;
        };
        if fde.len() == 0 {
            continue;
        }
        *total += 1;
        let mut instructions = fde.instructions(section, bases);
        while let Ok(Some(instruction)) = instructions.next() {
            use gimli::CallFrameInstruction::{DefCfa, DefCfaRegister};
            if let DefCfa { register, .. } | DefCfaRegister { register } = instruction
                && register == X86_64::RBP
            {
                *with_fp += 1;
                break;
            }
        }
        fdes.push(Fde {
            start: fde.initial_address(),
            end: fde.initial_address() + fde.len(),
            in_eh_frame,
            offset: fde.offset(),
        });
    }
}

fn step_of<T: gimli::ReaderOffset>(
    cfa: &CfaRule<T>,
    ra: Option<RegisterRule<T>>,
    bp: Option<RegisterRule<T>>,
) -> Step {
    let (cfa_from_bp, cfa_offset) = match *cfa {
        CfaRule::RegisterAndOffset { register, offset } if register == X86_64::RSP => {
            (false, offset)
        }
        CfaRule::RegisterAndOffset { register, offset } if register == X86_64::RBP => {
            (true, offset)
        }
        _ => return Step::FramePointer,
    };
    let ra_offset = match ra {
        Some(RegisterRule::Offset(offset)) => offset,
        Some(RegisterRule::Undefined) => return Step::Outermost,
        _ => return Step::FramePointer,
    };
    let bp_offset = match bp {
        Some(RegisterRule::Offset(offset)) => Some(offset),
        _ => None,
    };
    Step::Cfi {
        cfa_from_bp,
        cfa_offset,
        ra_offset,
        bp_offset,
    }
}

/// Files are identified by path and inode: a library replaced on disk is a new module.
type ModuleKey = (String, u64);

pub struct Unwinder {
    pid: u32,
    maps: ProcMaps,
    /// When `maps` was read (`CLOCK_MONOTONIC`). A pc outside every module re-reads it only
    /// when the event is younger: code mapped before the allocation (a library dlopen'd just
    /// before) is then found, and a JIT's or a garbage pc costs one read per batch of events,
    /// not one per event.
    refreshed_ns: u64,
    /// The time of the event being unwound.
    event_ns: u64,
    /// How many times `maps` changed since it was read at attach.
    maps_changes: u64,
    modules: HashMap<ModuleKey, Option<ModuleCfi>>,
    steps: HashMap<u64, Step>,
    ctx: Box<UnwindContext<usize>>,
    stats: UnwindStats,
}

impl Unwinder {
    /// `maps` is the target's memory map as read at attach.
    pub fn new(pid: u32, maps: ProcMaps) -> Self {
        Self {
            pid,
            maps,
            refreshed_ns: 0,
            event_ns: 0,
            maps_changes: 0,
            modules: HashMap::new(),
            steps: HashMap::new(),
            ctx: Box::new(UnwindContext::new()),
            stats: UnwindStats::default(),
        }
    }

    pub fn stats(&self) -> UnwindStats {
        self.stats
    }

    /// Re-reads the target's memory map (kept as is when the target is gone).
    pub fn refresh_maps(&mut self) {
        self.refreshed_ns = monotonic_ns();
        if let Ok(maps) = ProcMaps::read(self.pid)
            && !maps.mappings.is_empty()
            && maps.mappings != self.maps.mappings
        {
            self.maps = maps;
            self.maps_changes += 1;
            // An address may now belong to another module (dlclose, then dlopen).
            self.steps.clear();
        }
    }

    /// How many times the memory map changed since attach, as this unwinder saw it: when it
    /// did, the code known to keep frame pointers may have changed too.
    pub fn maps_changes(&self) -> u64 {
        self.maps_changes
    }

    /// The executable ranges of modules that keep frame pointers, sorted, adjacent ones
    /// merged: where `--unwind auto` trusts the frame-pointer walk. Parses every module's CFI.
    pub fn code_with_frame_pointers(&mut self) -> Vec<(u64, u64)> {
        let mappings: Vec<Mapping> = self
            .maps
            .mappings
            .iter()
            .filter(|m| m.is_executable() && m.is_file())
            .cloned()
            .collect();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for mapping in &mappings {
            let keeps = self
                .module(mapping)
                .is_none_or(|module| module.keeps_frame_pointers);
            if !keeps {
                continue;
            }
            match ranges.last_mut() {
                Some(last) if last.1 == mapping.start => last.1 = mapping.end,
                _ => ranges.push((mapping.start, mapping.end)),
            }
        }
        ranges
    }

    fn module(&mut self, mapping: &Mapping) -> Option<&ModuleCfi> {
        let key = (mapping.path.clone(), mapping.inode);
        let pid = self.pid;
        let stats = &mut self.stats;
        self.modules
            .entry(key)
            .or_insert_with(|| {
                stats.modules_loaded += 1;
                // The target's own view of the file first (also for deleted files and other
                // mount namespaces).
                candidate_paths(pid, mapping)
                    .iter()
                    .find_map(|path| std::fs::File::open(path).ok())
                    .and_then(|file| ModuleCfi::parse(&object::ReadCache::new(file)).ok())
            })
            .as_ref()
    }

    /// The rule for a return address `pc` (the call is at `pc - 1`).
    fn step_for(&mut self, pc: u64) -> Step {
        if let Some(&step) = self.steps.get(&pc) {
            return step;
        }
        if self.maps.find(pc).is_none() && self.refreshed_ns < self.event_ns {
            self.refresh_maps();
        }
        let step = match self.maps.find(pc).cloned() {
            Some(mapping) => {
                let file_offset = pc - mapping.start + mapping.file_offset;
                // Detach the context from `self` while the module is borrowed.
                let mut ctx = std::mem::take(&mut self.ctx);
                let step = self
                    .module(&mapping)
                    .and_then(|module| {
                        let vaddr = module.vaddr_of(file_offset)?;
                        Some(module.step_at(vaddr.wrapping_sub(1), &mut ctx))
                    })
                    .unwrap_or(Step::FramePointer);
                self.ctx = ctx;
                step
            }
            // Not cached: the module may show up in the next read of the memory map.
            None => return Step::FramePointer,
        };
        self.steps.insert(pc, step);
        step
    }

    /// Unwinds one copied stack into `out` (return addresses, innermost first, starting with
    /// `user.ip`). `fp_frames` is the frame-pointer stack of the same event: when the window
    /// ends before the outermost frame, its frames beyond the last pc found both ways are
    /// appended. Returns whether outer frames are missing (the stack is truncated).
    pub fn unwind(&mut self, user: &UserStack<'_>, fp_frames: &[u64], out: &mut Vec<u64>) -> bool {
        self.event_ns = user.ts_ns;
        let started = Instant::now();
        let truncated = self.unwind_inner(user, fp_frames, out);
        self.stats.busy += started.elapsed();
        truncated
    }

    fn unwind_inner(
        &mut self,
        user: &UserStack<'_>,
        fp_frames: &[u64],
        out: &mut Vec<u64>,
    ) -> bool {
        self.stats.stacks += 1;
        out.clear();
        let read = |addr: u64| -> Option<u64> {
            let at = usize::try_from(addr.checked_sub(user.sp)?).ok()?;
            let bytes = user.stack.get(at..at.checked_add(8)?)?;
            Some(u64::from_ne_bytes(bytes.try_into().ok()?))
        };
        let (mut pc, mut sp, mut bp) = (user.ip, user.sp, user.bp);
        out.push(pc);
        let mut window_ended = false;
        while out.len() < MAX_STACK_DEPTH {
            let next = match self.step_for(pc) {
                Step::Outermost => break,
                Step::Cfi {
                    cfa_from_bp,
                    cfa_offset,
                    ra_offset,
                    bp_offset,
                } => {
                    let cfa = (if cfa_from_bp { bp } else { sp }).wrapping_add_signed(cfa_offset);
                    let ra = read(cfa.wrapping_add_signed(ra_offset));
                    let caller_bp = match bp_offset {
                        Some(offset) => read(cfa.wrapping_add_signed(offset)),
                        None => Some(bp),
                    };
                    self.stats.cfi_frames += 1;
                    ra.zip(caller_bp)
                        .map(|(ra, caller_bp)| (ra, cfa, caller_bp))
                }
                Step::FramePointer => {
                    if bp == 0 {
                        break;
                    }
                    self.stats.fp_frames += 1;
                    read(bp.wrapping_add(8))
                        .zip(read(bp))
                        .map(|(ra, caller_bp)| (ra, bp.wrapping_add(16), caller_bp))
                }
            };
            let Some((ra, caller_sp, caller_bp)) = next else {
                window_ended = true;
                break;
            };
            // The end of the chain, or garbage: a caller's frame lies above its callee's.
            if ra == 0 || caller_sp <= sp {
                break;
            }
            out.push(ra);
            (pc, sp, bp) = (ra, caller_sp, caller_bp);
        }
        if !window_ended {
            return out.len() >= MAX_STACK_DEPTH;
        }
        self.stats.window_ended += 1;
        // The frame-pointer walk reads the live stack, not the window: where it agrees with
        // the CFI walk on a pc, its outer frames are the same ones.
        if let Some(at) = fp_frames.iter().position(|&f| f == pc) {
            let room = MAX_STACK_DEPTH - out.len();
            out.extend(fp_frames[at + 1..].iter().take(room));
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use gimli::Register;

    use super::*;

    /// This test binary's own CFI: Rust on x86_64 keeps no frame pointers by default.
    fn own_module() -> ModuleCfi {
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        ModuleCfi::parse(&object::ReadCache::new(file)).unwrap()
    }

    #[test]
    fn indexes_the_fdes_of_a_real_binary() {
        let module = own_module();
        assert!(module.fdes.len() > 100, "{} FDEs", module.fdes.len());
        assert!(module.fdes.windows(2).all(|w| w[0].start < w[1].start));
        let mut ctx = UnwindContext::new();
        // Inside a function, past its prologue or not, the return address sits just below
        // the CFA: the x86_64 call pushes it there.
        let fde = module.fdes[module.fdes.len() / 2];
        match module.step_at(fde.start, &mut ctx) {
            Step::Cfi {
                cfa_from_bp: false,
                cfa_offset: 8,
                ra_offset: -8,
                bp_offset: None,
            } => {}
            other => panic!("at a function's first instruction: {other:?}"),
        }
        // Outside every FDE there is no CFI.
        assert_eq!(module.step_at(0, &mut ctx), Step::FramePointer);
    }

    /// This thread's registers and a copy of its stack above `rsp`, up to the end of the
    /// stack mapping: what the BPF side sends.
    #[inline(never)]
    fn capture_own_stack() -> (u64, u64, u64, Vec<u8>) {
        let (ip, sp, bp): (u64, u64, u64);
        // SAFETY: reads three registers; `lea` gives the address right after it, so that
        // `ip - 1` (where the unwinder looks) is inside this function, with this `rsp`.
        unsafe {
            std::arch::asm!(
                "lea {ip}, [rip]",
                "mov {sp}, rsp",
                "mov {bp}, rbp",
                ip = out(reg) ip,
                sp = out(reg) sp,
                bp = out(reg) bp,
            );
        }
        let maps = ProcMaps::read(std::process::id()).unwrap();
        let index = maps.mappings.partition_point(|m| m.end <= sp);
        let end = maps.mappings[index].end;
        let len = (end - sp).min(64 << 10) as usize;
        // SAFETY: [sp, sp + len) is this thread's own, mapped stack; the frames above `sp` do
        // not change while this function runs.
        let stack = unsafe { std::slice::from_raw_parts(sp as *const u8, len) }.to_vec();
        (ip, sp, bp, stack)
    }

    #[inline(never)]
    fn middle() -> (u64, u64, u64, Vec<u8>) {
        let captured = capture_own_stack();
        std::hint::black_box(captured)
    }

    #[inline(never)]
    fn outer() -> (u64, u64, u64, Vec<u8>) {
        let captured = middle();
        std::hint::black_box(captured)
    }

    #[test]
    fn unwinds_its_own_stack_with_cfi() {
        let (ip, sp, bp, stack) = outer();
        let pid = std::process::id();
        let maps = ProcMaps::read(pid).unwrap();
        let mut unwinder = Unwinder::new(pid, maps.clone());
        let user = UserStack {
            ts_ns: 0,
            ip,
            sp,
            bp,
            stack: &stack,
        };
        let mut pcs = Vec::new();
        unwinder.unwind(&user, &[], &mut pcs);
        let stats = unwinder.stats();
        assert!(stats.cfi_frames >= 3, "{stats:?}");
        let names: Vec<String> = crate::stacks::symbolize::StackSymbolizer::new(pid, maps)
            .symbolize(&pcs)
            .into_iter()
            .filter_map(|f| f.symbol)
            .collect();
        let at = |name: &str| {
            names
                .iter()
                .position(|n| n.ends_with(name))
                .unwrap_or_else(|| panic!("{name} in {names:?}"))
        };
        let (capture, middle, outer, test) = (
            at("tests::capture_own_stack"),
            at("tests::middle"),
            at("tests::outer"),
            at("tests::unwinds_its_own_stack_with_cfi"),
        );
        assert!(
            capture < middle && middle < outer && outer < test,
            "{names:?}"
        );
    }

    #[test]
    fn rejects_what_is_not_elf() {
        assert!(ModuleCfi::parse(&b"not an ELF file"[..]).is_err());
        assert!(ModuleCfi::parse(&[][..]).is_err());
    }

    fn stack_of(words: &[u64]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    #[test]
    fn follows_frame_pointers_where_there_is_no_cfi_and_stops_at_the_window() {
        // No module is mapped at these addresses: every step follows the frame pointer.
        let mut unwinder = Unwinder::new(u32::MAX, ProcMaps::default());
        let sp = 0x7000_0000;
        // [sp] junk, [sp+8] bp0 -> saved bp (sp+24), return 0x2222; [sp+24] -> 0, 0x3333.
        let stack = stack_of(&[0xdead, sp + 24, 0x2222, 0, 0x3333]);
        let user = UserStack {
            ts_ns: 0,
            ip: 0x1111,
            sp,
            bp: sp + 8,
            stack: &stack,
        };
        let mut out = Vec::new();
        let truncated = unwinder.unwind(&user, &[], &mut out);
        assert_eq!(out, [0x1111, 0x2222, 0x3333]);
        assert!(!truncated, "a zero frame pointer ends the chain");

        // A chain that leaves the window takes the frame-pointer stack's outer frames past
        // the last pc both walks found, or is truncated when they share none.
        let short = &stack[..24];
        let user = UserStack {
            ts_ns: 0,
            stack: short,
            ..user
        };
        assert!(!unwinder.unwind(&user, &[0x1111, 0x2222, 0x4444, 0x5555], &mut out));
        assert_eq!(out, [0x1111, 0x2222, 0x4444, 0x5555]);
        assert!(unwinder.unwind(&user, &[0x9999], &mut out));
        assert_eq!(out, [0x1111, 0x2222]);
        assert_eq!(unwinder.stats().window_ended, 2);
    }

    #[test]
    fn garbage_that_points_down_the_stack_ends_the_walk() {
        let mut unwinder = Unwinder::new(u32::MAX, ProcMaps::default());
        let sp = 0x7000_0000;
        // The saved frame pointer points at itself: a loop, not a caller.
        let stack = stack_of(&[sp, 0x2222]);
        let user = UserStack {
            ts_ns: 0,
            ip: 0x1111,
            sp,
            bp: sp,
            stack: &stack,
        };
        let mut out = Vec::new();
        assert!(!unwinder.unwind(&user, &[], &mut out));
        assert_eq!(out, [0x1111, 0x2222]);
        // An empty window: just the caller.
        let user = UserStack { stack: &[], ..user };
        assert!(unwinder.unwind(&user, &[], &mut out));
        assert_eq!(out, [0x1111]);
    }

    #[test]
    fn step_rules_from_cfi_rows() {
        type R = CfaRule<usize>;
        let sp16: R = CfaRule::RegisterAndOffset {
            register: X86_64::RSP,
            offset: 16,
        };
        assert_eq!(
            step_of(
                &sp16,
                Some(RegisterRule::Offset(-8)),
                Some(RegisterRule::Offset(-16))
            ),
            Step::Cfi {
                cfa_from_bp: false,
                cfa_offset: 16,
                ra_offset: -8,
                bp_offset: Some(-16)
            }
        );
        assert_eq!(
            step_of(&sp16, Some(RegisterRule::Undefined), None),
            Step::Outermost
        );
        assert_eq!(step_of(&sp16, None, None), Step::FramePointer);
        let other: R = CfaRule::RegisterAndOffset {
            register: Register(3),
            offset: 8,
        };
        assert_eq!(
            step_of(&other, Some(RegisterRule::Offset(-8)), None),
            Step::FramePointer
        );
    }
}
