//! leaktrace's BPF programs: uprobes on the allocator's entry points (the malloc family, mmap,
//! munmap and mremap), a uretprobe on their returns, and a uprobe on `free`. Each completed
//! call becomes one ring buffer record.
//!
//! The stack is taken at the return, not at the entry: there the user registers are those of
//! the caller right after the call (the kernel has put the original return address back in
//! the instruction pointer), so frame 0 is the allocator's immediate caller and the frame
//! pointer chain continues from the caller's own frame. At the entry, the caller's return
//! address is still on top of the stack, outside any frame, and a frame-pointer walk skips it.
#![no_std]
#![no_main]

mod pymalloc;
mod python;
mod sample;
mod stack;
mod thread;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user,
        generated::{bpf_get_current_task, bpf_get_func_ip},
    },
    macros::{map, uprobe, uretprobe},
    maps::{PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext},
};
use leaktrace_common::{
    ALLOC_EVENT_HEADER_BYTES, AllocEvent, DEFAULT_RINGBUF_BYTES, EVENT_ALLOC, EVENT_FREE,
    EVENT_UNMAP, FreeEvent, MAX_STACK_DEPTH, Pending, UnmapEvent, call, is_heap_call, stat, unwind,
};

/// User space resizes it from `--ringbuf-bytes` before loading.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RINGBUF_BYTES, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Frames kept per stack (`--max-depth`), 1..=[`MAX_STACK_DEPTH`]; user space sets it before
/// loading. Read through `read_volatile`: otherwise the compiler folds in this initial value.
#[unsafe(no_mangle)]
pub(crate) static STACK_DEPTH: u32 = MAX_STACK_DEPTH as u32;

/// Unread bytes in the ring buffer at each multiple of which a submit wakes user space up.
/// Between them, user space drains on its own short timer: a wakeup per event would cost more
/// than the event.
const WAKEUP_BYTES: u64 = 256 << 10;

/// The flags for submitting a record of `len` bytes: a wakeup when the unread data crosses a
/// multiple of [`WAKEUP_BYTES`], none otherwise. Once, not at every submit past the mark: a
/// wakeup is an interrupt the kernel sends itself (irq_work), ~4 us on this VM, and every event
/// until user space got to draining would pay it. Two programs racing past a mark may both
/// wake, or neither: the timer drains then.
#[inline(always)]
pub(crate) fn wakeup_flags(len: usize) -> u64 {
    let unread = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    if unread / WAKEUP_BYTES != (unread + len as u64) / WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
pub(crate) fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; BPF programs do not nest on one CPU for uprobes.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub(crate) fn stack_pointer(ctx: &impl aya_ebpf::EbpfContext) -> u64 {
    let regs = ctx.as_ptr().cast::<aya_ebpf::bindings::pt_regs>();
    // SAFETY: the context of a (ret)probe program is the user's pt_regs.
    unsafe { (*regs).rsp }
}

/// What an entry returns to cancel the return probe of its call: the kernel runs the return
/// of a uprobe session program only for entries that returned 0.
const SKIP_RETURN: u32 = 1;

/// Reads a word of the thread's stack.
#[inline(always)]
fn user_word(addr: u64) -> Option<u64> {
    // SAFETY: a user pointer, read through the helper that faults safely.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// Whether an entry at `sp` runs inside the skipped call (see `Skipped`): deeper in the
/// stack with the skipped call's frame live, or (a tail call) at the same stack pointer into
/// another function. The same function entered again at the same place is a loop calling it
/// again, not a nested call. `ip` is 0 when the probe does not know its function.
#[inline(always)]
fn inside_skipped(skipped: &thread::Skipped, sp: u64, ip: u64) -> bool {
    let deeper = sp < skipped.sp || (sp == skipped.sp && ip != 0 && ip != skipped.ip);
    deeper
        && user_word(skipped.sp)
            .is_some_and(|word| word == skipped.ret || is_uprobe_trampoline(word))
}

/// The byte offsets of `task_struct.mm`, `mm_struct.uprobes_state.xol_area` and
/// `xol_area.vaddr`, which user space reads from the kernel's BTF and sets before loading; all
/// 0 when it could not. Read through `read_volatile`, like every global set at load.
#[unsafe(no_mangle)]
static TRAMPOLINE_OFFSETS: [u32; 3] = [0; 3];

/// Whether a return address on the stack is the kernel's uretprobe trampoline: a return probe
/// that another tracer attached to the same function (for another process: the kernel runs
/// every consumer of a probed instruction) replaces the return address of a call with it,
/// after the entry programs ran. The trampoline is the first slot of the process's
/// `[uprobes]` area (`uprobe_get_trampoline_vaddr`: `current->mm->uprobes_state.xol_area->
/// vaddr`), read here where the kernel keeps it; the area exists by then, since the kernel
/// creates it before it writes the trampoline's address. Only where the kernel's BTF did not
/// give the way there is any page-aligned word taken for it, which a return address almost
/// never is.
#[inline(always)]
fn is_uprobe_trampoline(word: u64) -> bool {
    // SAFETY: plain reads of a global that user space sets before load.
    let offset = |i: usize| unsafe {
        u64::from(core::ptr::read_volatile(
            (&raw const TRAMPOLINE_OFFSETS).cast::<u32>().add(i),
        ))
    };
    let (task_mm, mm_area, area_vaddr) = (offset(0), offset(1), offset(2));
    if task_mm == 0 {
        return word != 0 && word & 0xfff == 0;
    }
    // SAFETY: kernel reads through the helper that faults safely, from the current task.
    let read = |addr: u64| unsafe { bpf_probe_read_kernel(addr as *const u64) }.ok();
    // SAFETY: no preconditions.
    let task = unsafe { bpf_get_current_task() };
    let vaddr = read(task + task_mm)
        .and_then(|mm| read(mm + mm_area))
        .filter(|&area| area != 0)
        .and_then(|area| read(area + area_vaddr));
    vaddr.is_some_and(|vaddr| vaddr == word)
}

/// Records an allocator entry, unless it is nested inside another allocator call of the same
/// thread (glibc's `realloc(NULL, n)` calls `malloc`, a large `malloc` calls `mmap`): those are
/// counted once, as the outer call. A session program (`session`) returns [`SKIP_RETURN`]
/// when its return has nothing to report: a nested call, or under sampling a block not drawn
/// (decided here, from the size) that releases no drawn block.
#[inline(always)]
pub(crate) fn enter(
    ctx: &ProbeContext,
    call: u32,
    size_bytes: u64,
    old: (u64, u64),
    out_ptr: u64,
    session: bool,
) -> u32 {
    let Some(state) = thread::get_or_create() else {
        count(stat::PENDING_FULL);
        return 0;
    };
    // SAFETY: the element belongs to this thread, which runs this program to its end before
    // it can enter the allocator again.
    let state = unsafe { &mut *state };
    let pending = &mut state.pending;
    let sp = stack_pointer(ctx);
    let mut call = call;
    if pending.depth > 0 {
        // A nested call runs deeper in the stack (lower or, for a tail call, equal address).
        if sp <= pending.entry_sp {
            if session {
                return SKIP_RETURN;
            }
            // pymalloc mapping or releasing an arena, inside the call it serves: reported
            // (apart: see `args::PYMALLOC`), while that call waits in `outer`.
            let own_mapping = call == call::MMAP || call == call::MUNMAP;
            if !(own_mapping && pending.arenas != 0 && pending.depth == pending.arenas)
                || state.outer.depth != 0
            {
                // pymalloc's own function inside the call it serves (Debian's python3.11
                // calls `allocate_from_new_pool`, probed, from `PyObject_Malloc`): the arena
                // it maps is still that call's own.
                if pending.arenas != 0 && pending.depth == pending.arenas && is_pymalloc_probe(ctx)
                {
                    pending.arenas += 1;
                }
                pending.depth += 1;
                return 0;
            }
            state.outer = *pending;
            if call == call::MMAP {
                call = call::ARENA_MMAP;
            }
        } else {
            count(stat::STALE_ENTRY);
            pending.depth = 0;
            state.outer.depth = 0;
        }
    }
    let pending = &mut state.pending;
    // Only session programs ask: bpf_get_func_ip needs Linux 5.15, and sessions 6.13.
    let ip = if session {
        // SAFETY: the helper reads the probe's own address.
        unsafe { bpf_get_func_ip(ctx.as_ptr()) }
    } else {
        0
    };
    if state.skipped.sp != 0 {
        if inside_skipped(&state.skipped, sp, ip) {
            if session {
                return SKIP_RETURN;
            }
            // Its return will come, and must report nothing.
            set_pending(
                pending,
                Pending {
                    call: call::HIDDEN,
                    depth: 1,
                    entry_sp: sp,
                    size_bytes: 0,
                    old_addr: 0,
                    old_size_bytes: 0,
                    out_ptr: 0,
                    entry_ts_ns: 0,
                    old_sampled: 0,
                    drawn: 0,
                    arenas: 0,
                    _pad: 0,
                },
            );
            return 0;
        }
        // The skipped call is over.
        state.skipped.sp = 0;
    }
    // Under sampling, a block the call may release is forgotten now, before it is released:
    // another thread may get its address before this call returns.
    let sample_bytes = sample::sample_bytes();
    let sampled_call = is_heap_call(call) && sample_bytes != 0;
    let old_sampled = old.0 != 0 && sampled_call && sample::forget(old.0);
    let drawn = !sampled_call || sample::draws(size_bytes, sample_bytes);
    if session
        && !drawn
        && !old_sampled
        && let Some(ret) = user_word(sp)
    {
        state.skipped = thread::Skipped { sp, ret, ip };
        return SKIP_RETURN;
    }
    // Only a release that will be reported needs the time (see `AllocEvent::entry_ts_ns`):
    // the clock is not free.
    let releases = old.0 != 0 && (!sampled_call || old_sampled);
    set_pending(
        pending,
        Pending {
            call,
            depth: 1,
            entry_sp: sp,
            size_bytes,
            old_addr: old.0,
            old_size_bytes: old.1,
            out_ptr,
            // SAFETY: no preconditions.
            entry_ts_ns: if releases {
                unsafe { bpf_ktime_get_ns() }
            } else {
                0
            },
            old_sampled: u32::from(old_sampled),
            drawn: u32::from(drawn),
            arenas: u32::from(is_pymalloc_probe(ctx)),
            _pad: 0,
        },
    );
    0
}

/// Writes `value` into `slot` a field at a time. Written whole, the zeros of an entry that
/// has no old block and no out-parameter (malloc's) are merged into a call to `memset`, which
/// the BPF target links as a loop of byte stores: ~180 instructions run for `Pending`'s 36
/// bytes of zeros. Volatile stores are never merged.
#[inline(always)]
fn set_pending(slot: &mut Pending, value: Pending) {
    macro_rules! store {
        ($($field:ident),*) => {
            // SAFETY: each pointer is a field of `slot`, a valid &mut.
            $(unsafe { core::ptr::write_volatile(&raw mut slot.$field, value.$field) };)*
        };
    }
    store!(
        call,
        depth,
        entry_sp,
        size_bytes,
        old_addr,
        old_size_bytes,
        out_ptr,
        entry_ts_ns,
        old_sampled,
        drawn,
        arenas,
        _pad
    );
}

/// Whether the probe is on CPython's object allocator (`args::PYMALLOC` in its cookie).
#[inline(always)]
fn is_pymalloc_probe(ctx: &ProbeContext) -> bool {
    // SAFETY: the helper only reads the probe's own attach cookie.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    cookie & leaktrace_common::args::PYMALLOC != 0
}

/// Argument `n` of the traced call, from the register that holds it at the probe point: the
/// attach cookie says which when the probe was moved past instructions that moved it
/// (`leaktrace_common::args`).
#[inline(always)]
pub(crate) fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    use aya_ebpf::EbpfContext as _;
    use leaktrace_common::args::{location, reg};
    // SAFETY: the helper only reads the probe's own attach cookie (0 when it has none).
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let regs = ctx.as_ptr().cast::<aya_ebpf::bindings::pt_regs>();
    // Every register is read at its constant offset, then one is picked: a load through an
    // offset chosen at run time would dereference a modified context pointer, which the
    // verifier refuses (and the compiler merges per-register loads into such a load).
    // SAFETY: the context of a probe program is the user's pt_regs; volatile keeps each load.
    let read = |field: *const u64| unsafe { core::ptr::read_volatile(field) };
    // SAFETY: fields of the context, as above.
    let values = unsafe {
        [
            read(&raw const (*regs).rdi),
            read(&raw const (*regs).rsi),
            read(&raw const (*regs).rdx),
            read(&raw const (*regs).rcx),
            read(&raw const (*regs).r8),
            read(&raw const (*regs).r9),
            read(&raw const (*regs).rax),
            read(&raw const (*regs).rbx),
            read(&raw const (*regs).rbp),
            read(&raw const (*regs).r10),
            read(&raw const (*regs).r11),
            read(&raw const (*regs).r12),
            read(&raw const (*regs).r13),
            read(&raw const (*regs).r14),
            read(&raw const (*regs).r15),
        ]
    };
    let at = location(cookie, n);
    let mut value = 0;
    for (number, &v) in (reg::RDI..).zip(&values) {
        if number == at {
            value = v;
        }
    }
    value
}

/// Whether a session program runs at the return of its call: there the kernel has put the
/// caller's return address in the instruction pointer (`handle_trampoline`, before the
/// handlers run), while `bpf_get_func_ip` still gives the probed address, which is the
/// instruction pointer at the entry (`handle_swbp` rewinds it to the breakpoint). No kfunc
/// (`bpf_session_is_return`) needed.
#[inline(always)]
fn is_return(ctx: &ProbeContext) -> bool {
    let regs = ctx.as_ptr().cast::<aya_ebpf::bindings::pt_regs>();
    // SAFETY: the context of a probe program is the user's pt_regs; the helper reads the
    // probe's own address.
    unsafe { (*regs).rip != bpf_get_func_ip(ctx.as_ptr()) }
}

/// The uprobe session program (Linux 6.13+, loaded as such by user space) of the malloc
/// family: at the entry of a call, what the entry program of its kind does (the kind is in the
/// probe's cookie, above the arguments' locations: `args::CALL_SHIFT`), and `alloc_return` at
/// its return, which the kernel runs only when the entry returned 0. Written out, not
/// `#[uprobe]`: that macro returns 0 whatever the body returns.
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe")]
pub fn alloc_session(ctx: *mut core::ffi::c_void) -> u32 {
    let ctx = ProbeContext::new(ctx);
    if is_return(&ctx) {
        count(stat::SESSION_RETURNS);
        return match try_alloc_return(&RetProbeContext::new(ctx.as_ptr())) {
            Ok(v) | Err(v) => v,
        };
    }
    // SAFETY: the helper only reads the probe's own attach cookie.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    match (cookie >> leaktrace_common::args::CALL_SHIFT) as u32 {
        call::MALLOC => malloc_enter(&ctx, true),
        call::CALLOC => calloc_enter(&ctx, true),
        call::REALLOC => realloc_enter(&ctx, true),
        call::REALLOCARRAY => reallocarray_enter(&ctx, true),
        call::POSIX_MEMALIGN => posix_memalign_enter(&ctx, true),
        call::ALIGNED_ALLOC => aligned_alloc_enter(&ctx, true),
        call::XALLOCX => xallocx_enter(&ctx, true),
        _ => 0,
    }
}

/// `malloc(size)`, and `valloc(size)` and `pvalloc(size)`, which take the same argument.
#[inline(always)]
fn malloc_enter(ctx: &ProbeContext, session: bool) -> u32 {
    enter(ctx, call::MALLOC, arg(ctx, 0), (0, 0), 0, session)
}

#[uprobe]
pub fn malloc_entry(ctx: ProbeContext) -> u32 {
    malloc_enter(&ctx, false)
}

/// `calloc(n, size)`. An overflowing product fails in the allocator (it returns NULL), so the
/// saturated size is never reported.
#[inline(always)]
fn calloc_enter(ctx: &ProbeContext, session: bool) -> u32 {
    let size = call::array_bytes(arg(ctx, 0), arg(ctx, 1));
    enter(ctx, call::CALLOC, size, (0, 0), 0, session)
}

#[uprobe]
pub fn calloc_entry(ctx: ProbeContext) -> u32 {
    calloc_enter(&ctx, false)
}

/// `realloc(ptr, size)`.
#[inline(always)]
fn realloc_enter(ctx: &ProbeContext, session: bool) -> u32 {
    enter(
        ctx,
        call::REALLOC,
        arg(ctx, 1),
        (arg(ctx, 0), 0),
        0,
        session,
    )
}

#[uprobe]
pub fn realloc_entry(ctx: ProbeContext) -> u32 {
    realloc_enter(&ctx, false)
}

/// `reallocarray(ptr, n, size)`.
#[inline(always)]
fn reallocarray_enter(ctx: &ProbeContext, session: bool) -> u32 {
    let size = call::array_bytes(arg(ctx, 1), arg(ctx, 2));
    enter(ctx, call::REALLOCARRAY, size, (arg(ctx, 0), 0), 0, session)
}

#[uprobe]
pub fn reallocarray_entry(ctx: ProbeContext) -> u32 {
    reallocarray_enter(&ctx, false)
}

/// `posix_memalign(&out, alignment, size)`: the block comes back through `out`.
#[inline(always)]
fn posix_memalign_enter(ctx: &ProbeContext, session: bool) -> u32 {
    enter(
        ctx,
        call::POSIX_MEMALIGN,
        arg(ctx, 2),
        (0, 0),
        arg(ctx, 0),
        session,
    )
}

#[uprobe]
pub fn posix_memalign_entry(ctx: ProbeContext) -> u32 {
    posix_memalign_enter(&ctx, false)
}

/// `aligned_alloc(alignment, size)` and `memalign(alignment, size)`.
#[inline(always)]
fn aligned_alloc_enter(ctx: &ProbeContext, session: bool) -> u32 {
    enter(ctx, call::ALIGNED_ALLOC, arg(ctx, 1), (0, 0), 0, session)
}

#[uprobe]
pub fn aligned_alloc_entry(ctx: ProbeContext) -> u32 {
    aligned_alloc_enter(&ctx, false)
}

const MAP_ANONYMOUS: u64 = 0x20;
const MREMAP_DONTUNMAP: u64 = 4;
/// What mmap and mremap return on failure.
const MAP_FAILED: u64 = u64::MAX;

/// `mmap(addr, length, prot, flags, fd, offset)`.
#[uprobe]
pub fn mmap_entry(ctx: ProbeContext) -> u32 {
    let call = if arg(&ctx, 3) & MAP_ANONYMOUS != 0 {
        call::MMAP
    } else {
        call::MMAP_FILE
    };
    enter(&ctx, call, arg(&ctx, 1), (0, 0), 0, false)
}

/// `mremap(old_addr, old_size, new_size, flags, ...)`.
#[uprobe]
pub fn mremap_entry(ctx: ProbeContext) -> u32 {
    let call = if arg(&ctx, 3) & MREMAP_DONTUNMAP != 0 {
        call::MREMAP_KEEP
    } else {
        call::MREMAP
    };
    enter(
        &ctx,
        call,
        arg(&ctx, 2),
        (arg(&ctx, 0), arg(&ctx, 1)),
        0,
        false,
    )
}

/// `munmap(addr, length)`: reported at its return, and only when it succeeded.
#[uprobe]
pub fn munmap_entry(ctx: ProbeContext) -> u32 {
    enter(
        &ctx,
        call::MUNMAP,
        0,
        (arg(&ctx, 0), arg(&ctx, 1)),
        0,
        false,
    )
}

/// The return of every allocating entry point above.
#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    match try_alloc_return(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_alloc_return(ctx: &RetProbeContext) -> Result<u32, u32> {
    let Some(state) = thread::get() else {
        count(stat::RETURN_WITHOUT_ENTRY);
        return Err(0);
    };
    // SAFETY: as in `enter`.
    let state = unsafe { &mut *state };
    let pending = &mut state.pending;
    match pending.depth {
        0 => {
            count(stat::RETURN_WITHOUT_ENTRY);
            return Err(0);
        }
        1 => pending.depth = 0,
        _ => {
            pending.depth -= 1;
            // Back in the pymalloc call that a deeper pymalloc function served.
            pending.arenas = pending.arenas.min(pending.depth);
            return Ok(0);
        }
    }
    let Pending {
        call,
        size_bytes,
        old_addr,
        old_size_bytes,
        entry_ts_ns,
        out_ptr,
        old_sampled,
        drawn,
        ..
    } = *pending;
    // The return of pymalloc's own mapping call: the call it serves is pending again.
    if state.outer.depth != 0 {
        state.pending = state.outer;
        state.outer.depth = 0;
    }
    if call == call::HIDDEN {
        return Ok(0);
    }
    let key = bpf_get_current_pid_tgid();

    let ret: u64 = ctx.ret();
    let (addr, released) = match call {
        call::MUNMAP => {
            // 0 on success, -1 on failure (nothing was unmapped).
            if ret != 0 {
                return Ok(0);
            }
            return unmapped(key, entry_ts_ns, old_addr, old_size_bytes);
        }
        call::MMAP | call::MMAP_FILE | call::ARENA_MMAP => {
            if ret == MAP_FAILED {
                return Ok(0);
            }
            (ret, 0)
        }
        call::MREMAP | call::MREMAP_KEEP => {
            // On failure the old mapping is untouched.
            if ret == MAP_FAILED {
                return Ok(0);
            }
            (ret, old_addr)
        }
        call::POSIX_MEMALIGN => {
            // It returns 0 on success and leaves `out` alone on failure.
            if ret as u32 != 0 {
                return Ok(0);
            }
            // SAFETY: a user pointer, read through the helper that faults safely.
            match unsafe { bpf_probe_read_user(out_ptr as *const u64) } {
                Ok(addr) => (addr, 0),
                Err(_) => {
                    count(stat::READ_FAILED);
                    return Err(0);
                }
            }
        }
        call::REALLOC | call::REALLOCARRAY => match (ret, old_addr) {
            // realloc(NULL, n) is malloc(n).
            (_, 0) => (ret, 0),
            // A moved or resized block: the old one is gone.
            (addr, old) if addr != 0 => (addr, old),
            // realloc(p, 0) frees p and returns NULL (glibc).
            (_, old) if size_bytes == 0 => (0, old),
            // Failure: the old block stays allocated, nothing changed.
            _ => return unchanged(old_sampled, key, old_addr),
        },
        // `ret` is the new usable size: below the size asked for, nothing was resized.
        call::XALLOCX if ret < size_bytes => return unchanged(old_sampled, key, old_addr),
        call::XALLOCX => (old_addr, old_addr),
        _ => (ret, 0),
    };
    // Under sampling, the new block was drawn at the entry, and the old one was reported only
    // if drawn.
    let (addr, released) = if sample::sample_bytes() != 0 && is_heap_call(call) {
        (
            if addr != 0 && drawn != 0 && sample::remember(addr) {
                addr
            } else {
                0
            },
            if old_sampled != 0 { released } else { 0 },
        )
    } else {
        (addr, released)
    };
    if addr == 0 && released == 0 {
        return Ok(0);
    }
    report(
        ctx,
        state,
        Reported {
            call,
            pid_tgid: key,
            addr,
            size_bytes,
            released,
            old_size_bytes,
            entry_ts_ns,
            copy_stack: true,
        },
    )
}

/// What `report` sends.
pub(crate) struct Reported {
    pub call: u32,
    pub pid_tgid: u64,
    pub addr: u64,
    pub size_bytes: u64,
    pub released: u64,
    pub old_size_bytes: u64,
    pub entry_ts_ns: u64,
    /// Whether a stack the tables cannot unwind goes with a copy of the stack, for user space
    /// to unwind; without, it is sent with the frames walked. CPython's inlined pymalloc
    /// makes objects by the hundred thousand at start-up, before the rows of the executable
    /// are written: copies of 8 KiB each would fill the ring buffer.
    pub copy_stack: bool,
}

/// Sends an allocation record, with the stack of the user registers in `ctx` (and the Python
/// frames before it): at a return, frame 0 is the caller of the allocator; at a probe inside a
/// function (CPython's inlined pymalloc), that function.
#[inline(always)]
pub(crate) fn report(
    ctx: &RetProbeContext,
    state: &mut thread::ThreadState,
    r: Reported,
) -> Result<u32, u32> {
    let Reported {
        call,
        pid_tgid: key,
        addr,
        size_bytes,
        released,
        old_size_bytes,
        entry_ts_ns,
        copy_stack,
    } = r;
    let event = &mut state.event;
    event.kind = EVENT_ALLOC;
    event.call = call;
    event.pid_tgid = key;
    // SAFETY: no preconditions.
    event.ts_ns = unsafe { bpf_ktime_get_ns() };
    event.addr = addr;
    event.size_bytes = if addr == 0 { 0 } else { size_bytes };
    event.old_addr = released;
    event.old_size_bytes = old_size_bytes;
    event.entry_ts_ns = entry_ts_ns;
    if addr != 0 {
        python::send_stack(
            &mut state.py_stack,
            &mut state.py_tstate,
            &mut state.py_window,
            key,
            event.ts_ns,
        );
    }
    let mode = stack::mode();
    if mode == unwind::AUTO {
        if stack::walk_tables(ctx, event, &mut state.window) || !copy_stack {
            return submit(event);
        }
        if stack::submit_copy_of(ctx, event) {
            return Ok(0);
        }
        // Sent without the copy, with the frames walked so far.
        count(stat::STACK_COPY_FAILED);
        return submit(event);
    }
    stack::walk_frame_pointers(ctx, event, &mut state.window);
    if mode == unwind::DWARF {
        if stack::submit_copy_of(ctx, event) {
            return Ok(0);
        }
        count(stat::RINGBUF_FULL);
        return Err(0);
    }
    submit(event)
}

/// A realloc (or xallocx) that failed: its block stays as it was. Under sampling it was
/// forgotten at the entry, and is remembered again; if it cannot be, it is reported released,
/// as a block whose release could no longer be seen.
#[inline(always)]
fn unchanged(old_sampled: u32, pid_tgid: u64, addr: u64) -> Result<u32, u32> {
    if old_sampled == 0 || sample::remember(addr) {
        return Ok(0);
    }
    freed(pid_tgid, addr)
}

/// Sends a record; one that finds no room in the ring buffer is counted as lost.
#[inline(always)]
pub(crate) fn send<T: ?Sized>(record: &T) -> Result<u32, u32> {
    if EVENTS
        .output::<T>(record, wakeup_flags(size_of_val(record)))
        .is_err()
    {
        count(stat::RINGBUF_FULL);
        return Err(0);
    }
    Ok(0)
}

#[inline(always)]
fn freed(pid_tgid: u64, addr: u64) -> Result<u32, u32> {
    send(&FreeEvent {
        kind: EVENT_FREE,
        _pad: 0,
        pid_tgid,
        addr,
    })
}

/// Sends `event` cut after its frames.
#[inline(always)]
fn submit(event: &AllocEvent) -> Result<u32, u32> {
    let len = ALLOC_EVENT_HEADER_BYTES + stack::stack_bytes(event) as usize;
    // Never true (the walk fills at most MAX_STACK_DEPTH frames); it bounds the length for
    // the verifier.
    if len > core::mem::size_of::<AllocEvent>() {
        return Err(0);
    }
    // SAFETY: `len` bytes at the start of the event are initialized (header, then frames).
    let bytes =
        unsafe { core::slice::from_raw_parts(core::ptr::from_ref(event).cast::<u8>(), len) };
    send(bytes)
}

fn unmapped(pid_tgid: u64, entry_ts_ns: u64, addr: u64, size_bytes: u64) -> Result<u32, u32> {
    send(&UnmapEvent {
        kind: EVENT_UNMAP,
        _pad: 0,
        pid_tgid,
        ts_ns: entry_ts_ns,
        addr,
        size_bytes,
    })
}

/// `free(ptr)`.
#[uprobe]
pub fn free_entry(ctx: ProbeContext) -> u32 {
    match try_free_entry(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_free_entry(ctx: &ProbeContext) -> Result<u32, u32> {
    let addr = arg(ctx, 0);
    if addr == 0 {
        return Ok(0);
    }
    if let Some(state) = thread::get() {
        // SAFETY: as in `enter`.
        let state = unsafe { &mut *state };
        let pending = &state.pending;
        let sp = stack_pointer(ctx);
        // Inside realloc: its own return reports what it released.
        if pending.depth > 0 && sp <= pending.entry_sp {
            return Ok(0);
        }
        // Inside PyObject_Free of the same block, which reported it: called, or reached by
        // tail calls at the same stack pointer (pyenv's `PyObject_Free` jumps to
        // `_PyMem_RawFree`, which jumps to `free`, under PYTHONMALLOC=malloc).
        if state.py_free_addr == addr && sp <= state.py_free_sp {
            state.py_free_addr = 0;
            return Ok(0);
        }
    }
    // Under sampling, only the release of a drawn block is reported.
    if sample::sample_bytes() != 0 && !sample::forget(addr) {
        return Ok(0);
    }
    freed(bpf_get_current_pid_tgid(), addr)
}

/// CPython's `PyObject_Free(ptr)` and `PyMem_Free(ptr)`. They release pymalloc's small blocks
/// themselves and hand larger ones to `free`, whose probe must then stay silent.
#[uprobe]
pub fn py_free_entry(ctx: ProbeContext) -> u32 {
    match try_py_free_entry(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_py_free_entry(ctx: &ProbeContext) -> Result<u32, u32> {
    py_released(ctx, arg(ctx, 0))
}

/// Reports the release of `addr` by CPython's allocator, unless a probed call around it
/// reports it.
#[inline(always)]
pub(crate) fn py_released(ctx: &ProbeContext, addr: u64) -> Result<u32, u32> {
    if addr == 0 {
        return Ok(0);
    }
    if let Some(state) = thread::get_or_create() {
        // SAFETY: as in `enter`.
        let state = unsafe { &mut *state };
        // Inside realloc (PyObject_Realloc of a block that moves): its return reports it.
        if state.pending.depth > 0 && stack_pointer(ctx) <= state.pending.entry_sp {
            return Ok(0);
        }
        state.py_free_addr = addr;
        state.py_free_sp = stack_pointer(ctx);
    }
    if sample::sample_bytes() != 0 && !sample::forget(addr) {
        return Ok(0);
    }
    freed(bpf_get_current_pid_tgid(), addr)
}

/// jemalloc's `xallocx(ptr, size, extra, flags)`: the block stays at `ptr`; its return (in
/// `alloc_return`) reports it resized to `size` when that succeeded.
#[inline(always)]
fn xallocx_enter(ctx: &ProbeContext, session: bool) -> u32 {
    enter(
        ctx,
        call::XALLOCX,
        arg(ctx, 1),
        (arg(ctx, 0), 0),
        0,
        session,
    )
}

#[uprobe]
pub fn xallocx_entry(ctx: ProbeContext) -> u32 {
    xallocx_enter(&ctx, false)
}

/// Does nothing. `--noop-programs` attaches it where the entry programs and `free_entry` go,
/// so that a benchmark measures the cost of the uprobe traps alone: the floor under which no
/// program can go.
#[uprobe]
pub fn noop_entry(_ctx: ProbeContext) -> u32 {
    0
}

/// Does nothing, where `alloc_return` goes (see `noop_entry`).
#[uretprobe]
pub fn noop_return(_ctx: RetProbeContext) -> u32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Never reached: BPF programs cannot unwind, and the verifier rejects unbounded loops.
    loop {}
}

// bpf_probe_read_user and bpf_get_current_task_btf are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
