//! Stack capture at the allocator's return: the frame-pointer walk (`--unwind fp`); for
//! `--unwind auto` a walk that follows frame pointers where code keeps them and rows built
//! from `.eh_frame` elsewhere (`leaktrace_common::unwind_rows`); and for `--unwind dwarf`, or
//! a frame that `auto` finds no rule for (a library loaded since the tables were written, JIT
//! code), a copy of the caller's registers and of the user stack above its stack pointer,
//! which user space unwinds with the modules' call-frame information, as `perf record
//! --call-graph dwarf` does.
//!
//! Why tables rather than copies, where they can: measured on malloc/free pairs 8 calls deep
//! in code without frame pointers, an 8 KiB copy costs the target ~3.4 us per allocation (two
//! page reads and a large ring buffer record that user space must unwind), the tables' walk a
//! fraction of that (docs/BENCHMARKS.md).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_RB_NO_WAKEUP, pt_regs},
    cty::c_void,
    helpers::{
        bpf_probe_read_user,
        generated::{
            bpf_loop, bpf_probe_read_kernel as read_kernel, bpf_probe_read_user as read_user,
        },
    },
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
    programs::RetProbeContext,
};
use leaktrace_common::{
    AllocEvent, AllocStackEvent, DEFAULT_STACK_COPY_BYTES, EVENT_ALLOC_STACK, MAX_STACK_DEPTH,
    UserRegs, stat, unwind,
    unwind_rows::{
        self, MAX_UNWIND_PAGES, MAX_UNWIND_ROWS, PAGE_SHIFT, PageRows, ROW_HINT_SLOTS, Regs,
        RowHint, SEARCH_STEPS, Search, Step, UnwindRow, hint_slot, page_key, read_header,
    },
};

use crate::{EVENTS, count, thread::WINDOW_WORDS, wakeup_flags};

/// One of `unwind`'s constants; user space sets it at load (`--unwind`).
#[unsafe(no_mangle)]
static UNWIND_MODE: u32 = unwind::FP;

/// One of `STACK_COPY_SIZES`; user space sets it at load (`--stack-copy-bytes`).
#[unsafe(no_mangle)]
static STACK_COPY_BYTES: u32 = DEFAULT_STACK_COPY_BYTES;

/// Unwinding rows (layout in leaktrace-common's `unwind_rows`): a `FRAME_POINTER` row for code
/// that keeps frame pointers, rows built from `.eh_frame` for the rest, one segment per module.
/// User space adds to them when a traced process maps new code (exec, dlopen); code without
/// rows yet (a library just loaded, JIT code) is left to the stack copy.
#[map]
static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(MAX_UNWIND_ROWS, 0);

/// The rows that cover each page of code of each traced process (`page_key`), written with
/// `UNWIND_ROWS`.
#[map]
static UNWIND_PAGES: HashMap<u64, PageRows> = HashMap::with_max_entries(MAX_UNWIND_PAGES, 0);

/// The row found last for the pcs of each slot (leaktrace-common's `hint_slot`), checked at
/// each use (`RowHint::row_for`). Per CPU: a hint is 32 bytes, which another CPU's write could
/// tear.
#[map]
static ROW_HINTS: PerCpuArray<RowHint> = PerCpuArray::with_max_entries(ROW_HINT_SLOTS, 0);

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

/// The user stack's words that the walk reads, a window of up to 1 KiB at a time (never past
/// the page of the word asked for): the frames of a call chain mostly lie in the window of
/// the frame below, and one helper call then serves several frames.
struct StackReader<'a> {
    window: &'a mut [u64; WINDOW_WORDS + 1],
    /// The user addresses `window` holds: [base, base + filled).
    base: u64,
    filled: u64,
}

impl StackReader<'_> {
    /// The word at `at` into `word`; false when it cannot be read.
    #[inline(always)]
    fn read(&mut self, at: u64, word: &mut u64) -> bool {
        let offset = at.wrapping_sub(self.base);
        if self.filled >= 8 && offset <= self.filled - 8 && offset % 8 == 0 {
            let index = (offset / 8) as usize;
            // Never true (offset <= filled - 8); it bounds the index for the verifier.
            if index >= WINDOW_WORDS {
                return false;
            }
            *word = self.window[index];
            return true;
        }
        let to_page_end = PAGE as u64 - (at & (PAGE as u64 - 1));
        let len = to_page_end.min(WINDOW_BYTES);
        if len < 8 || at % 8 != 0 {
            // SAFETY: a user pointer, read through the helper that faults safely, into a word.
            return unsafe { read_user(core::ptr::from_mut(word).cast(), 8, at as *const _) } == 0;
        }
        // SAFETY: len <= WINDOW_BYTES, the size of `window` less one word; the helper faults
        // safely.
        if unsafe { read_user(self.window.as_mut_ptr().cast(), len as u32, at as *const _) } != 0 {
            return false;
        }
        self.base = at;
        self.filled = len;
        *word = self.window[0];
        true
    }
}

/// The state of `walk_tables` between frames, for `bpf_loop`'s callback.
struct Walk<'a> {
    event: *mut AllocEvent,
    reader: StackReader<'a>,
    /// The registers of the frame whose caller comes next.
    at: Regs,
    /// Frames in `event.frames`.
    frames: usize,
    /// Frames to capture at most.
    capture: usize,
    /// Rows in `UNWIND_ROWS`, and their generation (`unwind_rows::header`).
    rows: u32,
    generation: u32,
    /// The traced process, whose pages of code `UNWIND_PAGES` knows.
    tgid: u32,
    /// Set when a step failed: the stack needs a copy.
    failed: bool,
}

/// For `--unwind auto`: unwinds into `event.frames` (innermost first, as
/// `walk_frame_pointers`) by the rows of `UNWIND_ROWS` (frame pointers in code that keeps
/// them, its `.eh_frame` rules elsewhere), and sets `stack_bytes` and `stack_truncated`. Returns
/// false when a frame had no rule or a step failed: the stack needs a copy then.
///
/// One frame per call of a `bpf_loop` callback: the verifier checks the callback once, where
/// a bounded loop of 127 frames, each with a binary search of 19 steps, is checked frame by
/// frame, path by path, past its limit of a million instructions.
#[inline(always)]
pub fn walk_tables(
    ctx: &RetProbeContext,
    event: &mut AllocEvent,
    window: &mut [u64; WINDOW_WORDS + 1],
) -> bool {
    // SAFETY: a plain read of a global that user space sets before load.
    let depth = unsafe { core::ptr::read_volatile(&raw const crate::STACK_DEPTH) }
        .clamp(1, MAX_STACK_DEPTH as u32) as usize;
    let regs = ctx.as_ptr().cast::<pt_regs>();
    // SAFETY: the context of a return probe is the user's pt_regs.
    let at = unsafe {
        Regs {
            pc: (*regs).rip,
            sp: (*regs).rsp,
            bp: (*regs).rbp,
        }
    };
    event.frames[0] = at.pc;
    let (rows, generation) = UNWIND_ROWS.get(0).map_or((0, 0), read_header);
    let mut walk = Walk {
        event: core::ptr::from_mut(event),
        reader: StackReader {
            window,
            // Any base does while nothing is filled; not 0, since two words of zeros are
            // merged into a call to `memset`, a loop of byte stores on BPF.
            base: u64::MAX,
            filled: 0,
        },
        at,
        frames: 1,
        // One frame more than kept tells a stack of exactly `depth` frames from a longer one.
        capture: (depth + 1).min(MAX_STACK_DEPTH),
        rows,
        generation,
        tgid: (event.pid_tgid >> 32) as u32,
        failed: false,
    };
    // SAFETY: `walk_frame` has the callback's signature and `walk` outlives the call.
    unsafe {
        bpf_loop(
            MAX_STACK_DEPTH as u32 - 1,
            walk_frame as *mut c_void,
            core::ptr::from_mut(&mut walk).cast(),
            0,
        );
    }
    let frames = walk.frames;
    let failed = walk.failed;
    let got = frames.min(depth);
    event.stack_bytes = (got * 8) as u32;
    // At the full depth nothing tells whether more frames existed: "truncated" then means
    // "may be".
    event.stack_truncated = u32::from(frames > depth || (frames == depth && depth == walk.capture));
    !failed
}

/// Row `i` of `UNWIND_ROWS`, for `Search`. A row that cannot be read (past the map's end)
/// starts past every pc (and has no rule). Never `None`: the payload of a `None` is undefined,
/// and LLVM compares it all the same before it tests for `None`, which the verifier rejects (a
/// register read before any write).
#[inline(always)]
fn unwind_row(i: u32) -> Option<UnwindRow> {
    Some(UNWIND_ROWS.get(i).map_or(
        UnwindRow {
            pc: u64::MAX,
            ..UnwindRow::default()
        },
        |&row| row,
    ))
}

/// The row of `pc` in process `tgid`: a binary search among the rows of its page
/// (`UNWIND_PAGES`), at the module's addresses. The page index was measured worth it: a search
/// of the whole table (~60k rows for libc and libstdc++, 16 halvings) cost ~300 ns per frame,
/// most of the walk. The halvings run in a bounded loop inside the frame's callback, which the
/// verifier accepts: a `bpf_loop` callback per halving cost far more (measured,
/// docs/BENCHMARKS.md). Before it, the hint of the pc's slot (`ROW_HINTS`): the outer frames
/// of a thread return to the same pcs at every allocation, and a hint that holds spares the
/// page's hash lookup and the halvings (measured: ~2/3 of the BPF time of an allocation in
/// code with frame pointers went to the walk, most of it to the C runtime's outer frames).
#[inline(always)]
fn find_row(pc: u64, walk: &Walk<'_>) -> Option<UnwindRow> {
    let (tgid, generation, rows) = (walk.tgid, walk.generation, walk.rows);
    let slot = hint_slot(tgid, pc);
    if let Some(hint) = ROW_HINTS.get(slot)
        && let Some(row) = hint.row_for(tgid, generation, pc)
    {
        return Some(row);
    }
    // SAFETY: the value is plain data that user space writes whole.
    let page = *unsafe { UNWIND_PAGES.get(&page_key(tgid, pc)) }?;
    let at = pc.wrapping_sub(page.load_bias);
    let mut search = Search::within(page, rows);
    for _ in 0..SEARCH_STEPS {
        if !search.halve(at, unwind_row) {
            break;
        }
    }
    let row = search.found(at, unwind_row)?;
    let next_pc = unwind_row(search.found_index() + 1).map_or(u64::MAX, |next| next.pc);
    if let Some(hint) = ROW_HINTS.get_ptr_mut(slot) {
        let page_start = pc & !((1 << PAGE_SHIFT) - 1);
        // SAFETY: this CPU's slot; no other program of this CPU runs meanwhile.
        unsafe { *hint = RowHint::new(&row, next_pc, &page, page_start, tgid, generation) };
    }
    Some(row)
}

/// `bpf_loop`'s callback: the caller of frame `index` into frame `index + 1`. Returns 1 to
/// stop.
#[inline(never)]
extern "C" fn walk_frame(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Walk` that `walk_tables` handed to bpf_loop.
    let walk = unsafe { &mut *ctx.cast::<Walk<'_>>() };
    let i = index as usize + 1;
    if i >= walk.capture || i >= MAX_STACK_DEPTH {
        return 1;
    }
    // Every pc here is a return address, which may be the first byte after its function (a
    // call that does not return): the call is the byte before.
    let pc = walk.at.pc.wrapping_sub(1);
    let row = find_row(pc, walk);
    let reader = &mut walk.reader;
    let read = |at: u64, word: &mut u64| reader.read(at, word);
    let step = match row {
        Some(row) => unwind_rows::step(&row, walk.at, read),
        None => Step::Failed,
    };
    match step {
        Step::Caller(caller) => {
            // SAFETY: the event that `walk_tables` was handed, i < MAX_STACK_DEPTH.
            unsafe { (*walk.event).frames[i] = caller.pc };
            walk.frames = i + 1;
            walk.at = caller;
            0
        }
        Step::End => 1,
        Step::Failed => {
            walk.failed = true;
            1
        }
    }
}
