//! CPython's pymalloc where a build with link-time optimization compiled it into its callers
//! (Debian's python3.11): no call to probe, so the probes sit on the inlined code itself
//! (found by leaktrace's `attach::pymalloc_inline`), on an instruction the kernel emulates.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::uprobe,
    programs::{ProbeContext, RetProbeContext},
};
use leaktrace_common::{call, pymalloc, stat};

use crate::{Reported, arg, count, enter, py_released, report, sample, stack_pointer, thread};

/// The branch after `pymalloc_alloc`'s pop of a pool's free list: the block in argument 0's
/// register, its pool in argument 1's (the cookie says which registers). The block's bytes
/// are its size class's, read from the pool's header: the size asked for is gone by then.
#[uprobe]
pub fn py_inline_alloc(ctx: ProbeContext) -> u32 {
    match try_py_inline_alloc(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_py_inline_alloc(ctx: &ProbeContext) -> Result<u32, u32> {
    let addr = arg(ctx, 0);
    let pool = arg(ctx, 1);
    // SAFETY: a user pointer, read through the helper that faults safely.
    let szidx = match unsafe {
        bpf_probe_read_user((pool.wrapping_add(pymalloc::SZIDX_OFFSET)) as *const u32)
    } {
        Ok(szidx) => szidx,
        Err(_) => {
            count(stat::PYMALLOC_MISMATCH);
            return Err(0);
        }
    };
    if !pymalloc::is_pool_of(pool, addr, szidx) {
        count(stat::PYMALLOC_MISMATCH);
        return Err(0);
    }
    let Some(state) = thread::get_or_create() else {
        count(stat::PENDING_FULL);
        return Err(0);
    };
    // SAFETY: the element belongs to this thread (see `enter`).
    let state = unsafe { &mut *state };
    // Inside a probed allocator call (`PyObject_Malloc`, `PyObject_Realloc`, ...), whose
    // return reports the block.
    if state.pending.depth > 0 && stack_pointer(ctx) <= state.pending.entry_sp {
        return Ok(0);
    }
    let size_bytes = pymalloc::block_bytes(szidx);
    let sample_bytes = sample::sample_bytes();
    if sample_bytes != 0 && !(sample::draws(size_bytes, sample_bytes) && sample::remember(addr)) {
        return Ok(0);
    }
    report(
        &RetProbeContext::new(ctx.as_ptr()),
        state,
        Reported {
            call: call::MALLOC,
            pid_tgid: bpf_get_current_pid_tgid(),
            addr,
            size_bytes,
            released: 0,
            old_size_bytes: 0,
            entry_ts_ns: 0,
            copy_stack: false,
        },
    )
}

/// `allocate_from_new_pool(size_class)`: the block of a size class's first pool, reported at
/// the return by `alloc_return` with the size class's bytes.
#[uprobe]
pub fn py_new_pool_entry(ctx: ProbeContext) -> u32 {
    // An `unsigned int`: the upper half of the register is not the caller's to set.
    let szidx = arg(&ctx, 0) as u32;
    if szidx >= pymalloc::SIZE_CLASSES {
        count(stat::PYMALLOC_MISMATCH);
        return 0;
    }
    enter(
        &ctx,
        call::MALLOC,
        pymalloc::block_bytes(szidx),
        (0, 0),
        0,
        false,
    )
}

/// The branch after `pymalloc_free`'s push onto a pool's free list: the pool in argument 1's
/// register, and the block released at its head (`pool->freeblock`), where the push put it:
/// the block's own register may be reused by then.
#[uprobe]
pub fn py_inline_free(ctx: ProbeContext) -> u32 {
    match try_py_inline_free(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_py_inline_free(ctx: &ProbeContext) -> Result<u32, u32> {
    let pool = arg(ctx, 1);
    // SAFETY: a user pointer, read through the helper that faults safely.
    let Ok(addr) = (unsafe { bpf_probe_read_user((pool.wrapping_add(8)) as *const u64) }) else {
        count(stat::PYMALLOC_MISMATCH);
        return Err(0);
    };
    if !pymalloc::is_pool_of(pool, addr, 0) {
        count(stat::PYMALLOC_MISMATCH);
        return Err(0);
    }
    py_released(ctx, addr)
}
