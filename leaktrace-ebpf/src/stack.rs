//! Stack capture at the allocator's return: the frame-pointer walk (`bpf_get_stack`), and for
//! `--unwind dwarf|auto` a copy of the caller's registers and of the user stack above its stack
//! pointer, which user space unwinds with the call-frame information of each module
//! (`.eh_frame`/`.debug_frame`), as `perf record --call-graph dwarf` does.
//!
//! Why a copy rather than unwinding here: the copy costs one helper call per page, and every
//! instruction of the unwinding (table lookups, CFA rules) runs in user space, off the
//! target's path, where tables are parsed lazily for whichever module shows up, dlopen'd or not.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_USER_STACK, BPF_RB_NO_WAKEUP, pt_regs},
    helpers::{
        bpf_get_stack,
        generated::{bpf_probe_read_kernel as read_kernel, bpf_probe_read_user as read_user},
    },
    macros::map,
    maps::Array,
    programs::RetProbeContext,
};
use leaktrace_common::{
    AllocEvent, AllocStackEvent, DEFAULT_STACK_COPY_BYTES, EVENT_ALLOC_STACK, MAX_FP_RANGES,
    MAX_STACK_DEPTH, UserRegs, stat, unwind,
};

use crate::{EVENTS, count, wakeup_flags};

/// One of `unwind`'s constants; user space sets it at load (`--unwind`).
#[unsafe(no_mangle)]
static UNWIND_MODE: u32 = unwind::FP;

/// One of `STACK_COPY_SIZES`; user space sets it at load (`--stack-copy-bytes`).
#[unsafe(no_mangle)]
static STACK_COPY_BYTES: u32 = DEFAULT_STACK_COPY_BYTES;

/// Code known to keep frame pointers, as sorted address ranges (layout in leaktrace-common's
/// `MAX_FP_RANGES`). User space rewrites it when the target maps new code (dlopen); code not
/// in it yet (a library just loaded, JIT code) counts as code without frame pointers.
#[map]
static FP_CODE: Array<u64> = Array::with_max_entries(1 + 2 * MAX_FP_RANGES, 0);

const PAGE: usize = 4096;

#[inline(always)]
pub fn mode() -> u32 {
    // SAFETY: a plain read of a global that user space may have rewritten before load; the
    // volatile read keeps the compiler from folding the default value in.
    unsafe { core::ptr::read_volatile(&UNWIND_MODE) }
}

/// Takes the frame-pointer stack into `event.frames` (innermost first: frame 0 is the
/// allocator's caller, since the registers at a return are the caller's).
///
/// # Safety
/// `event` must point at an `AllocEvent` that this program may write.
#[inline(always)]
pub unsafe fn fill_frame_pointer_stack(ctx: &RetProbeContext, event: *mut AllocEvent) {
    // One frame more than kept, when the buffer has room for it, tells a stack of exactly
    // `depth` frames (`--max-depth`) from a longer one. The bounds keep the size provably
    // within the buffer for the verifier.
    // SAFETY: a plain read of a global that user space sets before load.
    let depth = unsafe { core::ptr::read_volatile(&raw const crate::STACK_DEPTH) }
        .clamp(1, MAX_STACK_DEPTH as u32);
    let keep_bytes = depth * 8;
    let capture_bytes = (depth + 1).min(MAX_STACK_DEPTH as u32) * 8;
    // SAFETY: `frames` is MAX_STACK_DEPTH u64s of memory this program owns (caller's promise).
    unsafe {
        let got = bpf_get_stack(
            ctx.as_ptr(),
            (*event).frames.as_mut_ptr().cast(),
            capture_bytes,
            BPF_F_USER_STACK as u64,
        );
        if got < 0 {
            count(stat::STACK_FAILED);
            (*event).stack_bytes = 0;
            (*event).stack_truncated = 0;
        } else {
            // At the full depth nothing tells whether more frames existed: "truncated" then
            // means "may be".
            let got = got as u32;
            (*event).stack_bytes = got.min(keep_bytes);
            (*event).stack_truncated =
                u32::from(got > keep_bytes || (got == keep_bytes && keep_bytes == capture_bytes));
        }
    }
}

/// For `--unwind dwarf`: reserves a record with room for the stack copy, builds the allocation
/// in it with `fill` (which takes the frame-pointer stack), and submits it with a copy of the
/// user stack.
///
/// The record is built in the reservation rather than in a per-CPU scratch slot: uprobe
/// programs run with migration disabled but may be preempted, so another thread on the same
/// CPU could overwrite a shared slot halfway through.
#[inline(always)]
pub fn submit_with_stack_copy(
    ctx: &RetProbeContext,
    fill: impl FnOnce(*mut AllocEvent),
) -> Result<u32, u32> {
    // SAFETY: a plain read of a global, as in `mode`.
    let copy_bytes = unsafe { core::ptr::read_volatile(&STACK_COPY_BYTES) };
    match copy_bytes {
        4096 => submit::<4096>(ctx, fill),
        8192 => submit::<8192>(ctx, fill),
        16384 => submit::<16384>(ctx, fill),
        _ => submit::<32768>(ctx, fill),
    }
}

#[inline(always)]
fn submit<const N: usize>(
    ctx: &RetProbeContext,
    fill: impl FnOnce(*mut AllocEvent),
) -> Result<u32, u32> {
    let Some(mut entry) = EVENTS.reserve::<AllocStackEvent<N>>(0) else {
        count(stat::RINGBUF_FULL);
        return Err(0);
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` is a reservation of size_of::<AllocStackEvent<N>>() bytes that only this
    // program writes until it is submitted or discarded.
    let alloc = unsafe { &raw mut (*record).alloc };
    fill(alloc);
    // SAFETY: as above.
    unsafe { add_stack_copy(ctx, record) };
    entry.submit(wakeup_flags());
    Ok(0)
}

/// For `--unwind auto`, once the allocation is built in a plain record (`alloc`, which the
/// caller then discards) and its frame-pointer walk went through code without frame pointers:
/// submits it again in a record with the caller's registers and a copy of its stack. Most
/// stacks need no copy, and they cost no more than `--unwind fp` that way. Returns false when
/// the larger record found no room (the caller then sends the plain one).
///
/// # Safety
/// `alloc` must point at a filled `AllocEvent`.
#[inline(always)]
pub unsafe fn submit_copy_of(ctx: &RetProbeContext, alloc: *const AllocEvent) -> bool {
    // SAFETY: a plain read of a global, as in `mode`.
    let copy_bytes = unsafe { core::ptr::read_volatile(&STACK_COPY_BYTES) };
    // SAFETY: caller's promise.
    unsafe {
        match copy_bytes {
            4096 => copy_of::<4096>(ctx, alloc),
            8192 => copy_of::<8192>(ctx, alloc),
            16384 => copy_of::<16384>(ctx, alloc),
            _ => copy_of::<32768>(ctx, alloc),
        }
    }
}

#[inline(always)]
unsafe fn copy_of<const N: usize>(ctx: &RetProbeContext, alloc: *const AllocEvent) -> bool {
    let Some(mut entry) = EVENTS.reserve::<AllocStackEvent<N>>(0) else {
        count(stat::STACK_COPY_FAILED);
        return false;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` is a reservation of size_of::<AllocStackEvent<N>>() bytes that only
    // this program writes until it is submitted or discarded; `alloc` is a filled AllocEvent
    // (caller's promise) in kernel memory (a ring buffer record).
    unsafe {
        let dst = &raw mut (*record).alloc;
        if read_kernel(
            dst.cast(),
            core::mem::size_of::<AllocEvent>() as u32,
            alloc.cast(),
        ) != 0
        {
            entry.discard(BPF_RB_NO_WAKEUP as u64);
            return false;
        }
        add_stack_copy(ctx, record);
    }
    entry.submit(wakeup_flags());
    true
}

/// Turns the allocation at the start of `record` into a record with a stack copy: the caller's
/// registers (the context of a return probe is the user's pt_regs, which at a return are the
/// caller's) and its stack from the stack pointer up.
///
/// # Safety
/// `record` must point at an `AllocStackEvent<N>` that this program may write.
#[inline(always)]
unsafe fn add_stack_copy<const N: usize>(ctx: &RetProbeContext, record: *mut AllocStackEvent<N>) {
    let regs = ctx.as_ptr().cast::<pt_regs>();
    // SAFETY: caller's promise, and a return probe's context is a pt_regs.
    unsafe {
        (*record).alloc.kind = EVENT_ALLOC_STACK;
        let sp = (*regs).rsp;
        (*record).regs = UserRegs {
            ip: (*regs).rip,
            sp,
            bp: (*regs).rbp,
        };
        (*record)._pad = 0;
        (*record).stack_copy_bytes = copy_user_stack::<N>((*record).stack.as_mut_ptr(), sp);
    }
}

/// Copies the user stack from `sp` upward into `dst` (N bytes): up to the next page boundary,
/// then whole pages until N or the first page that cannot be read, which is where the stack
/// mapping ends (a failed read of a range that crosses it would lose the whole range).
/// Returns the bytes copied.
///
/// # Safety
/// `dst` must point at N writable bytes.
#[inline(always)]
unsafe fn copy_user_stack<const N: usize>(dst: *mut u8, sp: u64) -> u32 {
    let first = PAGE - (sp as usize & (PAGE - 1));
    // SAFETY: first <= PAGE <= N bytes at the start of dst; the helper reads user memory
    // safely and fails on an unmapped page.
    if unsafe { read_user(dst.cast(), first as u32, sp as *const _) } != 0 {
        count(stat::STACK_COPY_FAILED);
        return 0;
    }
    let mut copied = first;
    for _ in 1..N / PAGE {
        if copied > N - PAGE {
            break;
        }
        // SAFETY: copied + PAGE <= N, checked above.
        let failed = unsafe {
            read_user(
                dst.add(copied).cast(),
                PAGE as u32,
                (sp + copied as u64) as *const _,
            )
        } != 0;
        if failed {
            break;
        }
        copied += PAGE;
    }
    copied as u32
}

/// For `--unwind auto`: whether the frame-pointer walk went through code not known to keep
/// frame pointers, so that it may have skipped or invented frames. Frame 0 (the allocator's
/// caller) always counts; the walk's outermost frame does not when there are others: a walk
/// ends where it meets a frame pointer it cannot follow, which on glibc is the stack's root
/// (`__libc_start_call_main`, `start_thread`), built without frame pointers. A walk that got
/// no frames at all gets a copy too.
///
/// # Safety
/// `event` must point at a filled `AllocEvent`.
#[inline(always)]
pub unsafe fn walk_left_frame_pointer_code(event: *const AllocEvent) -> bool {
    // SAFETY: caller's promise.
    let depth = unsafe { (*event).stack_bytes } as usize / 8;
    if depth == 0 {
        return true;
    }
    let ranges = match FP_CODE.get(0) {
        Some(&n) if n > 0 => n.min(u64::from(MAX_FP_RANGES)) as u32,
        _ => return true,
    };
    for i in 0..MAX_STACK_DEPTH {
        if i >= depth || (i > 0 && i + 1 == depth) {
            break;
        }
        // SAFETY: i < MAX_STACK_DEPTH.
        let pc = unsafe { (*event).frames[i] };
        if !in_ranges(pc, ranges) {
            return true;
        }
    }
    false
}

/// Whether `pc` lies in one of the first `ranges` ranges of FP_CODE (binary search).
#[inline(always)]
fn in_ranges(pc: u64, ranges: u32) -> bool {
    let (mut lo, mut hi) = (0u32, ranges);
    // log2(MAX_FP_RANGES) + 1 halvings find the last range that starts at or below pc.
    for _ in 0..6 {
        if lo >= hi {
            break;
        }
        let mid = (lo + hi) / 2;
        match FP_CODE.get(1 + 2 * mid) {
            Some(&start) if start <= pc => lo = mid + 1,
            _ => hi = mid,
        }
    }
    lo > 0 && FP_CODE.get(2 * lo).is_some_and(|&end| pc < end)
}
