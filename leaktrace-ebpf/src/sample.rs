//! `--sample-bytes N`: only some blocks of the malloc family are traced, for a fraction of the
//! cost. A block of `size` bytes is drawn with probability `min(1, max(size, 1) / N)`,
//! independently of every other, so user space weighs it by the inverse (a block of at least
//! N bytes always, a smaller one as N / size blocks of N bytes): unbiased estimates with no
//! per-thread state and no aliasing with a program's allocation pattern. The release of a
//! block that was not drawn is not reported either, which needs the drawn ones remembered.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::{bpf_get_current_pid_tgid, bpf_get_prandom_u32},
    macros::map,
    maps::HashMap,
};
use leaktrace_common::{MAX_SAMPLED_BLOCKS, sample::is_drawn, stat};

use crate::count;

/// 0 traces every block; user space sets it at load. At most `MAX_SAMPLE_BYTES` (2^30).
#[unsafe(no_mangle)]
static SAMPLE_BYTES: u64 = 0;

/// A drawn block: its process, since two traced processes (`-p` twice, a followed fork) may
/// have blocks at the same address, and its address.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Block {
    tgid: u64,
    addr: u64,
}

impl Block {
    #[inline(always)]
    fn of_this_process(addr: u64) -> Self {
        Self {
            tgid: bpf_get_current_pid_tgid() >> 32,
            addr,
        }
    }
}

/// The drawn blocks that are live. Allocated as it fills: most runs never sample.
#[map]
static SAMPLED: HashMap<Block, u8> =
    HashMap::with_max_entries(MAX_SAMPLED_BLOCKS, BPF_F_NO_PREALLOC);

/// N, or 0 when every block is traced.
#[inline(always)]
pub fn sample_bytes() -> u64 {
    // SAFETY: a plain read of a global that user space sets before load; volatile so that the
    // compiler does not fold the default in.
    unsafe { core::ptr::read_volatile(&raw const SAMPLE_BYTES) }
}

/// Draws a block of `size` bytes (`sample::is_drawn`), at the entry of the call that will
/// return it: a block not drawn needs no return. A drawn block is remembered at the return
/// (`remember`), once its address is known.
#[inline(always)]
pub fn draws(size: u64, sample_bytes: u64) -> bool {
    // SAFETY: no preconditions.
    let random = unsafe { bpf_get_prandom_u32() };
    is_drawn(size, sample_bytes, random)
}

/// Whether the block at `addr` was drawn; forgets it. Called before the block is released
/// (at free's and realloc's entry), so that another thread's new block at the same address
/// is never forgotten in its place.
#[inline(always)]
pub fn forget(addr: u64) -> bool {
    let block = Block::of_this_process(addr);
    // A lookup first: most blocks were not drawn, and a failed delete takes the bucket's lock.
    if SAMPLED.get_ptr(block).is_none() {
        return false;
    }
    SAMPLED.remove(block).is_ok()
}

/// Remembers the drawn block at `addr`: a new one, or the block a failed realloc left as it
/// was. False when the map is full (counted as lost): such a block is not reported, as its
/// release would go unseen.
#[inline(always)]
pub fn remember(addr: u64) -> bool {
    if SAMPLED.insert(Block::of_this_process(addr), 0, 0).is_err() {
        count(stat::SAMPLED_FULL);
        return false;
    }
    true
}
