//! Stack capture at the allocator's return: the frame-pointer walk, and for
//! `--unwind dwarf|auto` a copy of the caller's registers and of the user stack above its stack
//! pointer, which user space unwinds with the call-frame information of each module
//! (`.eh_frame`/`.debug_frame`), as `perf record --call-graph dwarf` does.
//!
//! Why a copy rather than unwinding here: the copy costs one helper call per page, and every
//! instruction of the unwinding (table lookups, CFA rules) runs in user space, off the
//! target's path, where tables are parsed lazily for whichever module shows up, dlopen'd or not.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_RB_NO_WAKEUP, pt_regs},
    helpers::{
        bpf_probe_read_user,
        generated::{bpf_probe_read_kernel as read_kernel, bpf_probe_read_user as read_user},
    },
    macros::map,
    maps::Array,
    programs::RetProbeContext,
};
use leaktrace_common::{
    AllocEvent, AllocStackEvent, DEFAULT_STACK_COPY_BYTES, EVENT_ALLOC_STACK, MAX_FP_RANGES,
    MAX_STACK_DEPTH, UserRegs, fp_code, stat, unwind,
};

use crate::{EVENTS, count, thread::WINDOW_WORDS, wakeup_flags};

/// One of `unwind`'s constants; user space sets it at load (`--unwind`).
#[unsafe(no_mangle)]
static UNWIND_MODE: u32 = unwind::FP;

/// One of `STACK_COPY_SIZES`; user space sets it at load (`--stack-copy-bytes`).
#[unsafe(no_mangle)]
static STACK_COPY_BYTES: u32 = DEFAULT_STACK_COPY_BYTES;

/// Code known to keep frame pointers, as sorted address ranges (layout in leaktrace-common's
/// `fp_code`). User space rewrites it when the target maps new code (dlopen); code not
/// in it yet (a library just loaded, JIT code) counts as code without frame pointers.
#[map]
static FP_CODE: Array<u64> = Array::with_max_entries(1 + 2 * MAX_FP_RANGES, 0);

const PAGE: usize = 4096;
const WINDOW_BYTES: u64 = (WINDOW_WORDS * 8) as u64;

#[inline(always)]
pub fn mode() -> u32 {
    // SAFETY: a plain read of a global that user space may have rewritten before load; the
    // volatile read keeps the compiler from folding the default value in.
    unsafe { core::ptr::read_volatile(&UNWIND_MODE) }
}

/// Walks the frame-pointer chain into `event.frames` (innermost first: frame 0 is the
/// allocator's caller, since the registers at a return are the caller's) and sets
/// `stack_bytes` and `stack_truncated`.
///
/// It yields what `bpf_get_stack(BPF_F_USER_STACK)` does (the instruction pointer, then the
/// return address of each frame record `[saved rbp, return address]` from `rbp` on, until a
/// record cannot be read or the depth is reached) at a fraction of its cost, measured here:
/// the kernel's walk reads each word with its own user access (~0.2 us per frame on this
/// VM) and zeroes the unused rest of the buffer, while this one reads the stack a window at a
/// time (up to 1 KiB, never past the page, one helper call), and most frames of a call chain
/// lie in the window of the frame below.
#[inline(always)]
pub fn walk_frame_pointers(
    ctx: &RetProbeContext,
    event: &mut AllocEvent,
    window: &mut [u64; WINDOW_WORDS + 1],
) {
    // One frame more than kept, when the buffer has room for it, tells a stack of exactly
    // `depth` frames (`--max-depth`) from a longer one.
    // SAFETY: a plain read of a global that user space sets before load.
    let depth = unsafe { core::ptr::read_volatile(&raw const crate::STACK_DEPTH) }
        .clamp(1, MAX_STACK_DEPTH as u32) as usize;
    let capture = (depth + 1).min(MAX_STACK_DEPTH);
    let regs = ctx.as_ptr().cast::<pt_regs>();
    // SAFETY: the context of a return probe is the user's pt_regs.
    let (ip, mut fp) = unsafe { ((*regs).rip, (*regs).rbp) };
    event.frames[0] = ip;
    let mut frames = 1;
    // The user addresses `window` holds: [base, base + filled).
    let mut base = 0u64;
    let mut filled = 0u64;
    for i in 1..MAX_STACK_DEPTH {
        if i >= capture || fp == 0 {
            break;
        }
        let offset = fp.wrapping_sub(base);
        let (next, ret) = if filled >= 16 && offset <= filled - 16 && offset % 8 == 0 {
            let at = (offset / 8) as usize;
            // Never true (offset <= filled - 16); it bounds the index for the verifier.
            if at >= WINDOW_WORDS {
                break;
            }
            (window[at], window[at + 1])
        } else {
            let to_page_end = PAGE as u64 - (fp & (PAGE as u64 - 1));
            let len = to_page_end.min(WINDOW_BYTES);
            if len < 16 || fp % 8 != 0 {
                // A record across a page boundary, or misaligned: read just it.
                // SAFETY: a user pointer, read through the helper that faults safely.
                let Ok([next, ret]) = (unsafe { bpf_probe_read_user(fp as *const [u64; 2]) })
                else {
                    break;
                };
                (next, ret)
            } else {
                // SAFETY: len <= WINDOW_BYTES, the size of `window` less one word; the helper
                // faults safely (and the window ends at fp's page, so a mapped record is never
                // lost to an unmapped page after it).
                if unsafe { read_user(window.as_mut_ptr().cast(), len as u32, fp as *const _) } != 0
                {
                    break;
                }
                base = fp;
                filled = len;
                (window[0], window[1])
            }
        };
        event.frames[i] = ret;
        frames = i + 1;
        fp = next;
    }
    let got = frames.min(depth);
    event.stack_bytes = (got * 8) as u32;
    // At the full depth nothing tells whether more frames existed: "truncated" then means
    // "may be".
    event.stack_truncated = u32::from(frames > depth || (frames == depth && depth == capture));
}

/// `event.stack_bytes`, read back from memory. After the walk the verifier knows the frame
/// count exactly on each of its up to 127 ways out of the loop, and would verify all that
/// follows once per count (past its limit of a million instructions); read from the map
/// value, it is one unknown number.
#[inline(always)]
pub fn stack_bytes(event: &AllocEvent) -> u32 {
    // SAFETY: a read of an initialized field.
    unsafe { core::ptr::read_volatile(&raw const event.stack_bytes) }
}

/// For `--unwind dwarf`, and for `--unwind auto` when the frame-pointer walk went through code
/// without frame pointers: sends `alloc` in a record with the caller's registers and a copy of
/// its stack. Most stacks need no copy, and they cost no more than `--unwind fp` that way.
/// Returns false when the larger record found no room.
#[inline(always)]
pub fn submit_copy_of(ctx: &RetProbeContext, alloc: &AllocEvent) -> bool {
    // SAFETY: a plain read of a global, as in `mode`.
    let copy_bytes = unsafe { core::ptr::read_volatile(&STACK_COPY_BYTES) };
    match copy_bytes {
        4096 => copy_of::<4096>(ctx, alloc),
        8192 => copy_of::<8192>(ctx, alloc),
        16384 => copy_of::<16384>(ctx, alloc),
        _ => copy_of::<32768>(ctx, alloc),
    }
}

#[inline(always)]
fn copy_of<const N: usize>(ctx: &RetProbeContext, alloc: &AllocEvent) -> bool {
    let Some(mut entry) = EVENTS.reserve::<AllocStackEvent<N>>(0) else {
        return false;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` is a reservation of size_of::<AllocStackEvent<N>>() bytes that only
    // this program writes until it is submitted or discarded; `alloc` is kernel memory (the
    // thread's state).
    unsafe {
        let dst = &raw mut (*record).alloc;
        if read_kernel(
            dst.cast(),
            core::mem::size_of::<AllocEvent>() as u32,
            core::ptr::from_ref(alloc).cast(),
        ) != 0
        {
            entry.discard(BPF_RB_NO_WAKEUP as u64);
            return false;
        }
        add_stack_copy(ctx, record);
    }
    entry.submit(wakeup_flags(core::mem::size_of::<AllocStackEvent<N>>()));
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
#[inline(always)]
pub fn walk_left_frame_pointer_code(event: &AllocEvent) -> bool {
    let depth = stack_bytes(event) as usize / 8;
    if depth == 0 {
        return true;
    }
    let ranges = match FP_CODE.get(fp_code::COUNT) {
        Some(&n) if n > 0 => n.min(u64::from(MAX_FP_RANGES)) as u32,
        _ => return true,
    };
    // Frames of one call chain mostly lie in one module: the range of the previous frame is
    // tried before searching.
    let mut last = (0u64, 0u64);
    for i in 0..MAX_STACK_DEPTH {
        if i >= depth || (i > 0 && i + 1 == depth) {
            break;
        }
        let pc = event.frames[i];
        if last.0 <= pc && pc < last.1 {
            continue;
        }
        match fp_code::find(pc, ranges, |i| FP_CODE.get(i).copied()) {
            Some(range) => last = range,
            None => return true,
        }
    }
    false
}
