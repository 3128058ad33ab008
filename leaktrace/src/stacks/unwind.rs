//! Unwinding copied user stacks with call-frame information (`.eh_frame`, `.debug_frame`), the
//! way `perf record --call-graph dwarf` does: the BPF side sends the allocator's caller's
//! registers and a window of its stack; this walks that window frame by frame, with the CFI of
//! the module that holds each pc, and follows the frame pointer where a pc has no CFI.
//!
//! Modules and their unwind tables come from the target's address space (`target`), which
//! parses them lazily and reads the memory map again when a pc falls outside every known
//! module, so libraries loaded after attach (dlopen) are covered. The rule for each pc is
//! cached: a leak site unwinds with a few hash lookups per frame.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use gimli::UnwindContext;
use leaktrace_common::MAX_STACK_DEPTH;

use crate::{
    model::location::Locate as _,
    target::{address_space::AddressSpace, cfi::Step},
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
    /// Time spent in [`Unwinder::unwind`].
    pub busy: Duration,
}

pub struct Unwinder {
    /// Frames kept per stack (`--max-depth`).
    max_depth: usize,
    /// The rule for each return address seen, until code is unmapped (an address may then
    /// hold other code).
    steps: HashMap<u64, Step>,
    /// `Locate::code_unmapped` of the address space when `steps` was last emptied.
    code_unmapped: u64,
    ctx: Box<UnwindContext<usize>>,
    stats: UnwindStats,
}

impl Unwinder {
    /// Keeps `max_depth` frames per stack (1..=[`MAX_STACK_DEPTH`]), as the BPF side does.
    pub fn new(max_depth: u32) -> Self {
        Self {
            max_depth: (max_depth as usize).clamp(1, MAX_STACK_DEPTH),
            steps: HashMap::new(),
            code_unmapped: 0,
            ctx: Box::new(UnwindContext::new()),
            stats: UnwindStats::default(),
        }
    }

    pub fn stats(&self) -> UnwindStats {
        self.stats
    }

    /// Forgets the rules of addresses when code was unmapped since they were found.
    fn forget_stale_steps(&mut self, space: &AddressSpace) {
        if space.code_unmapped() != self.code_unmapped {
            self.code_unmapped = space.code_unmapped();
            self.steps.clear();
        }
    }

    /// The rule for a return address `pc` (the call is at `pc - 1`), in an event at `at_ns`.
    fn step_for(&mut self, space: &mut AddressSpace, pc: u64, at_ns: u64) -> Step {
        self.forget_stale_steps(space);
        if let Some(&step) = self.steps.get(&pc) {
            return step;
        }
        // Not cached when outside every module: it may show up in the next read of the map.
        let Some((module, file_offset)) = space.module_at(pc, at_ns) else {
            return Step::FramePointer;
        };
        let step = module
            .cfi()
            .and_then(|cfi| {
                let vaddr = cfi.vaddr_of(file_offset)?;
                Some(cfi.step_at(vaddr.wrapping_sub(1), &mut self.ctx))
            })
            .unwrap_or(Step::FramePointer);
        // Locating may have read a map in which code was unmapped.
        self.forget_stale_steps(space);
        self.steps.insert(pc, step);
        step
    }

    /// Unwinds one copied stack into `out` (return addresses, innermost first, starting with
    /// `user.ip`), with the call-frame information of the modules of `space`. `fp_frames` is
    /// the frame-pointer stack of the same event (cut short when `fp_truncated`): when the
    /// window ends before the outermost frame, its frames beyond the last pc found both ways
    /// are appended. Keeps at most `max_depth` frames; returns whether outer frames are
    /// missing (the stack is truncated).
    pub fn unwind(
        &mut self,
        space: &mut AddressSpace,
        user: &UserStack<'_>,
        fp_frames: &[u64],
        fp_truncated: bool,
        out: &mut Vec<u64>,
    ) -> bool {
        let started = Instant::now();
        let truncated = self.unwind_inner(space, user, fp_frames, fp_truncated, out);
        self.stats.busy += started.elapsed();
        truncated
    }

    fn unwind_inner(
        &mut self,
        space: &mut AddressSpace,
        user: &UserStack<'_>,
        fp_frames: &[u64],
        fp_truncated: bool,
        out: &mut Vec<u64>,
    ) -> bool {
        self.stats.stacks += 1;
        out.clear();
        // One frame more than kept, as the BPF side walks: a stack of exactly `max_depth`
        // frames is whole. At the kernel's limit nothing tells, and the stack counts as cut.
        let capture = (self.max_depth + 1).min(MAX_STACK_DEPTH);
        let read = |addr: u64| -> Option<u64> {
            let at = usize::try_from(addr.checked_sub(user.sp)?).ok()?;
            let bytes = user.stack.get(at..at.checked_add(8)?)?;
            Some(u64::from_ne_bytes(bytes.try_into().ok()?))
        };
        let (mut pc, mut sp, mut bp) = (user.ip, user.sp, user.bp);
        out.push(pc);
        let mut window_ended = false;
        while out.len() < capture {
            let next = match self.step_for(space, pc, user.ts_ns) {
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
        let mut missing = false;
        if window_ended {
            self.stats.window_ended += 1;
            // The frame-pointer walk reads the live stack, not the window: where it agrees
            // with the CFI walk on a pc, its outer frames are the same ones.
            match fp_frames.iter().position(|&f| f == pc) {
                Some(at) => {
                    let outer = &fp_frames[at + 1..];
                    let room = capture - out.len();
                    out.extend(outer.iter().take(room));
                    missing = fp_truncated && outer.len() <= room;
                }
                None => missing = true,
            }
        }
        let cut = out.len() > self.max_depth || out.len() == MAX_STACK_DEPTH;
        out.truncate(self.max_depth);
        missing || cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        proc::maps::ProcMaps, stacks::symbolize::StackSymbolizer, target::modules::Modules,
    };

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
        let mut space = AddressSpace::new(pid, ProcMaps::read(pid).unwrap(), Modules::new());
        let mut unwinder = Unwinder::new(MAX_STACK_DEPTH as u32);
        let user = UserStack {
            ts_ns: 0,
            ip,
            sp,
            bp,
            stack: &stack,
        };
        let mut pcs = Vec::new();
        unwinder.unwind(&mut space, &user, &[], false, &mut pcs);
        let stats = unwinder.stats();
        assert!(stats.cfi_frames >= 3, "{stats:?}");
        let located: Vec<_> = pcs.iter().map(|&pc| space.locate(pc, 0)).collect();
        let names: Vec<String> = StackSymbolizer::new(space.modules().clone(), Default::default())
            .symbolize(&located)
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

    /// The address space of no process: no module anywhere.
    fn no_process() -> AddressSpace {
        AddressSpace::new(u32::MAX, ProcMaps::default(), Modules::new())
    }

    fn stack_of(words: &[u64]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    #[test]
    fn follows_frame_pointers_where_there_is_no_cfi_and_stops_at_the_window() {
        // No module is mapped at these addresses: every step follows the frame pointer.
        let mut space = no_process();
        let mut unwinder = Unwinder::new(MAX_STACK_DEPTH as u32);
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
        let truncated = unwinder.unwind(&mut space, &user, &[], false, &mut out);
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
        let fp_frames = [0x1111, 0x2222, 0x4444, 0x5555];
        assert!(!unwinder.unwind(&mut space, &user, &fp_frames, false, &mut out));
        assert_eq!(out, [0x1111, 0x2222, 0x4444, 0x5555]);
        // When the frame-pointer stack was cut, so is the stack completed from it.
        assert!(unwinder.unwind(&mut space, &user, &fp_frames, true, &mut out));
        assert_eq!(out, [0x1111, 0x2222, 0x4444, 0x5555]);
        assert!(unwinder.unwind(&mut space, &user, &[0x9999], false, &mut out));
        assert_eq!(out, [0x1111, 0x2222]);
        assert_eq!(unwinder.stats().window_ended, 3);
    }

    #[test]
    fn max_depth_keeps_that_many_frames_and_marks_deeper_stacks_truncated() {
        let mut space = no_process();
        let sp = 0x7000_0000;
        // Three frames by their frame pointers: 0x1111, 0x2222, 0x3333.
        let stack = stack_of(&[sp + 16, 0x2222, 0, 0x3333]);
        let user = UserStack {
            ts_ns: 0,
            ip: 0x1111,
            sp,
            bp: sp,
            stack: &stack,
        };
        let mut out = Vec::new();
        for (max_depth, kept, truncated) in [
            (1, &[0x1111][..], true),
            (2, &[0x1111, 0x2222], true),
            (3, &[0x1111, 0x2222, 0x3333], false),
            (127, &[0x1111, 0x2222, 0x3333], false),
        ] {
            let mut unwinder = Unwinder::new(max_depth);
            assert_eq!(
                unwinder.unwind(&mut space, &user, &[], false, &mut out),
                truncated,
                "--max-depth {max_depth}"
            );
            assert_eq!(out, kept, "--max-depth {max_depth}");
        }
        // Completed from the frame-pointer stack, the depth still holds.
        let user = UserStack {
            stack: &stack[..16],
            ..user
        };
        let mut unwinder = Unwinder::new(2);
        assert!(unwinder.unwind(
            &mut space,
            &user,
            &[0x1111, 0x2222, 0x3333],
            false,
            &mut out
        ));
        assert_eq!(out, [0x1111, 0x2222]);
    }

    #[test]
    fn garbage_that_points_down_the_stack_ends_the_walk() {
        let mut space = no_process();
        let mut unwinder = Unwinder::new(MAX_STACK_DEPTH as u32);
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
        assert!(!unwinder.unwind(&mut space, &user, &[], false, &mut out));
        assert_eq!(out, [0x1111, 0x2222]);
        // An empty window: just the caller.
        let user = UserStack { stack: &[], ..user };
        assert!(unwinder.unwind(&mut space, &user, &[], false, &mut out));
        assert_eq!(out, [0x1111]);
    }
}
