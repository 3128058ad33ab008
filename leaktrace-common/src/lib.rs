//! The contract between leaktrace's BPF programs and its user space: the records and map
//! values they exchange, the names of the maps, programs and globals ([`names`]), and the pure
//! logic both sides rely on (the sampling draw, [`sample`]; unwinding from `.eh_frame` tables,
//! [`unwind_rows`]), tested on the host. With the `user` feature, [`record`] encodes records as
//! the BPF side writes them, for user space's tests and benchmarks.
//!
//! Every type here crosses the kernel boundary byte for byte: `#[repr(C)]`, no implicit padding
//! (explicit `_pad` fields), `u32` flags rather than `bool`, units in field names.
#![no_std]

pub mod args;
pub mod names;
pub mod pymalloc;
pub mod python;
#[cfg(feature = "user")]
pub mod record;
pub mod sample;
pub mod unwind_rows;

/// Frames captured per allocation at most: the kernel's default `perf_event_max_stack`, as
/// deep as the kernel's own user-stack walk goes.
pub const MAX_STACK_DEPTH: usize = 127;

/// Frames kept per stack unless `--max-depth` says otherwise: all the kernel gives. A frame
/// pointer walk costs per frame that exists, so a lower limit saves nothing on ordinary stacks,
/// while a stack cut short can hide the caller that tells two leaks apart.
pub const DEFAULT_STACK_DEPTH: u32 = MAX_STACK_DEPTH as u32;

/// The `kind` of an [`AllocEvent`].
pub const EVENT_ALLOC: u32 = 1;
/// The `kind` of a [`FreeEvent`].
pub const EVENT_FREE: u32 = 2;
/// The `kind` of an [`UnmapEvent`].
pub const EVENT_UNMAP: u32 = 3;
/// The `kind` of an [`AllocStackEvent`]: an allocation with a copy of the user stack,
/// for unwinding from call-frame information in user space.
pub const EVENT_ALLOC_STACK: u32 = 8;
/// The `kind` of a [`python::PyStackEvent`]: the Python frames of the allocation that follows.
pub const EVENT_PY_STACK: u32 = 16;

/// How the BPF side captures stacks (the `UNWIND_MODE` global, set at load).
pub mod unwind {
    /// Frame pointers only.
    pub const FP: u32 = 0;
    /// Frame pointers, and a copy of the user stack with every allocation.
    pub const DWARF: u32 = 1;
    /// Frame pointers where code keeps them (a `FRAME_POINTER` row of `UNWIND_ROWS`), tables
    /// built from `.eh_frame` elsewhere ([`unwind_rows`](crate::unwind_rows)), and a copy of the user stack for a
    /// frame that neither covers.
    pub const AUTO: u32 = 2;
}

/// The sizes `--stack-copy-bytes` may take: the BPF side reserves ring buffer records of a
/// size known when it is verified, one variant per size.
pub const STACK_COPY_SIZES: [u32; 4] = [4096, 8192, 16384, 32768];
/// Default bytes of user stack copied per allocation (chosen by measurement: see README).
pub const DEFAULT_STACK_COPY_BYTES: u32 = 8192;

/// The allocator entry point a [`Pending`] call entered; also tells user space which call
/// produced an [`AllocEvent`].
pub mod call {
    /// A call nested in one whose return probe was skipped (an undrawn call under
    /// `--sample-bytes`): it is hidden as any nested call is, and its return reports nothing.
    pub const HIDDEN: u32 = 0;
    pub const MALLOC: u32 = 1;
    pub const CALLOC: u32 = 2;
    pub const REALLOC: u32 = 3;
    pub const REALLOCARRAY: u32 = 4;
    pub const POSIX_MEMALIGN: u32 = 5;
    pub const ALIGNED_ALLOC: u32 = 6;
    /// `mmap` of anonymous memory (`MAP_ANONYMOUS`).
    pub const MMAP: u32 = 7;
    /// `mmap` of a file: reported apart from heap memory.
    pub const MMAP_FILE: u32 = 8;
    /// `mremap`: `old_addr`/`old_size_bytes` are released, `addr`/`size_bytes` mapped.
    pub const MREMAP: u32 = 9;
    /// `mremap` with `MREMAP_DONTUNMAP`: the old range stays mapped.
    pub const MREMAP_KEEP: u32 = 10;
    /// `munmap`: its return produces an [`UnmapEvent`](super::UnmapEvent).
    pub const MUNMAP: u32 = 11;
    /// jemalloc's `xallocx(ptr, size, extra, flags)`: resizes in place, returns the new usable
    /// size (less than `size` when it could not).
    pub const XALLOCX: u32 = 12;
    /// `mmap` of anonymous memory made by CPython's object allocator itself, inside a call of
    /// it (a probe whose cookie has [`args::PYMALLOC`](crate::args::PYMALLOC)): pymalloc's
    /// arenas, whose objects are counted one by one, so reported apart.
    pub const ARENA_MMAP: u32 = 13;

    /// The bytes `calloc(count, size)` and `reallocarray(p, count, size)` ask for. It may wrap:
    /// those calls fail on overflow, and a failed call reports no size. What must survive is
    /// whether the product is zero (`reallocarray(p, 0, n)` frees `p`), so a non-zero product
    /// never wraps to 0. (An exact overflow check compiles to a 128-bit multiply, `__multi3`,
    /// which BPF lacks.)
    #[inline(always)]
    pub fn array_bytes(count: u64, size: u64) -> u64 {
        if count == 0 || size == 0 {
            0
        } else {
            count.wrapping_mul(size).max(1)
        }
    }
}

/// A completed allocator call that returned memory, released memory, or both (realloc).
///
/// The ring buffer record is this struct cut right after the frames it holds: the first
/// [`ALLOC_EVENT_HEADER_BYTES`] bytes, then `stack_bytes` bytes of `frames`. Records sized to
/// the stack keep the ring buffer's working set small: a full-size record per allocation
/// touched a kilobyte of cold memory on both sides.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AllocEvent {
    /// Always [`EVENT_ALLOC`].
    pub kind: u32,
    /// One of [`call`]'s constants.
    pub call: u32,
    /// The calling thread, as `bpf_get_current_pid_tgid` returns it (tgid << 32 | tid).
    pub pid_tgid: u64,
    /// `CLOCK_MONOTONIC` at the return of the call.
    pub ts_ns: u64,
    /// The block returned, or 0 when the call returned none.
    pub addr: u64,
    /// The size requested for `addr`.
    pub size_bytes: u64,
    /// A block this call released (realloc's old pointer when it moved, shrank, grew, or was
    /// freed by `realloc(p, 0)`; mremap's old range), or 0.
    pub old_addr: u64,
    /// mremap's old length; 0 for other calls.
    pub old_size_bytes: u64,
    /// `CLOCK_MONOTONIC` at the call's entry. The call may release `old_addr` any time after
    /// it, and another thread may then get that address and report it before this call
    /// returns: a block at `old_addr` that is younger than this is not the one released.
    pub entry_ts_ns: u64,
    /// Bytes of `frames` that hold return addresses (at most 8 x the depth limit); 0 when the
    /// stack could not be read.
    pub stack_bytes: u32,
    /// Non-zero when the stack had more frames than the depth limit (`--max-depth`) kept; at
    /// the limit of [`MAX_STACK_DEPTH`] frames, when it may have had more.
    pub stack_truncated: u32,
    /// User return addresses, innermost first: `frames[0]` is in the allocator's caller.
    pub frames: [u64; MAX_STACK_DEPTH],
}

/// Bytes of an [`AllocEvent`] before `frames`: the shortest allocation record.
pub const ALLOC_EVENT_HEADER_BYTES: usize = core::mem::offset_of!(AllocEvent, frames);

/// The registers of the allocator's caller at the allocator's return: what unwinding starts
/// from.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UserRegs {
    /// The return address into the caller (`frames[0]` of the frame-pointer stack).
    pub ip: u64,
    /// The stack pointer: `AllocStackEvent::stack` starts here.
    pub sp: u64,
    pub bp: u64,
}

/// An [`AllocEvent`] followed by the caller's registers and the user stack from `regs.sp`
/// upward, `N` bytes at most (one of [`STACK_COPY_SIZES`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AllocStackEvent<const N: usize> {
    /// `alloc.kind` is [`EVENT_ALLOC_STACK`]; `alloc.frames` holds the frame-pointer stack.
    pub alloc: AllocEvent,
    pub regs: UserRegs,
    /// Bytes of `stack` copied: up to a page boundary, and then whole pages until `N` or the
    /// first page that could not be read (the top of the stack); 0 when none could.
    pub stack_copy_bytes: u32,
    pub _pad: u32,
    pub stack: [u8; N],
}

/// A `free(addr)` of a non-null pointer, outside any other allocator call.
///
/// It has no time: it is sent at free's entry, before the block is released, so the ring
/// buffer's order (the order of reservations) puts it after the allocation of the block it
/// frees and before any later allocation at the same address. Reading the clock would cost
/// more than the rest of the program.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FreeEvent {
    /// Always [`EVENT_FREE`].
    pub kind: u32,
    pub _pad: u32,
    pub pid_tgid: u64,
    pub addr: u64,
}

/// A successful `munmap(addr, size_bytes)` outside any other allocator call. The range may
/// cover parts of several mappings, or none that leaktrace saw being made.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UnmapEvent {
    /// Always [`EVENT_UNMAP`].
    pub kind: u32,
    pub _pad: u32,
    pub pid_tgid: u64,
    /// At munmap's entry, as [`AllocEvent::entry_ts_ns`]: the event is sent at its return (only
    /// a munmap that succeeded releases anything), after the range may have been mapped again.
    pub ts_ns: u64,
    pub addr: u64,
    pub size_bytes: u64,
}

/// Per-thread state between an allocator's entry and its return, keyed by the full
/// `pid_tgid`: pairing by tgid alone would mix up threads that allocate at the same time.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Pending {
    /// One of [`call`]'s constants.
    pub call: u32,
    /// Allocator entries on this thread since the outermost one (glibc's realloc calls malloc,
    /// and both are probed); only the outermost call's return is reported.
    pub depth: u32,
    /// The stack pointer at the outermost entry. An entry above it (a larger address) means
    /// the return of the pending call was never seen, so the state is stale.
    pub entry_sp: u64,
    pub size_bytes: u64,
    /// realloc's old pointer; the range munmap and mremap release.
    pub old_addr: u64,
    /// The length of the range at `old_addr` (munmap, mremap).
    pub old_size_bytes: u64,
    /// posix_memalign's out-parameter.
    pub out_ptr: u64,
    /// `CLOCK_MONOTONIC` at the outermost entry of a call that releases memory (`old_addr`
    /// is not 0) and reports it (under sampling, a drawn block): see
    /// [`AllocEvent::entry_ts_ns`]. 0 for the others, which have no use for it.
    pub entry_ts_ns: u64,
    /// With `--sample-bytes`: non-zero when the block at `old_addr` was sampled, so that its
    /// release is reported (the others were never seen).
    pub old_sampled: u32,
    /// Non-zero when the block this call returns is traced: always without `--sample-bytes`,
    /// else drawn at the entry (the size is known there, so an undrawn call can skip its
    /// return).
    pub drawn: u32,
    /// For a call of CPython's object allocator (see [`call::ARENA_MMAP`]): the `depth` at
    /// which the anonymous mappings it makes and releases itself are reported, not hidden as
    /// nested; 0 for other calls. Deeper than 1 where pymalloc's own probed function
    /// (`allocate_from_new_pool`, inlined pymalloc) runs inside the probed call it serves.
    pub arenas: u32,
    pub _pad: u32,
}

/// The calls of the malloc family, which `--sample-bytes` samples; mappings are always traced
/// whole.
pub fn is_heap_call(call: u32) -> bool {
    matches!(
        call,
        call::MALLOC
            | call::CALLOC
            | call::REALLOC
            | call::REALLOCARRAY
            | call::POSIX_MEMALIGN
            | call::ALIGNED_ALLOC
            | call::XALLOCX
    )
}

/// The largest `--sample-bytes`: the BPF side draws a block of `size` bytes with a 32-bit
/// random number `r` when `r * sample_bytes < size << 32`, which must not overflow.
pub const MAX_SAMPLE_BYTES: u64 = 1 << 30;

/// Live sampled blocks the BPF side can remember (`--sample-bytes`); one more sampled block is
/// a lost event.
pub const MAX_SAMPLED_BLOCKS: u32 = 1 << 20;

/// Indexes of the per-CPU statistics array (`STATS`).
pub mod stat {
    /// Events lost because the ring buffer was full.
    pub const RINGBUF_FULL: u32 = 0;
    /// Allocator entries not recorded because the thread's state could not be created (the
    /// kernel refused the memory, or its task storage was busy).
    pub const PENDING_FULL: u32 = 1;
    /// Returns whose entry was not recorded.
    pub const RETURN_WITHOUT_ENTRY: u32 = 2;
    /// Pending entries replaced because their return was never seen.
    pub const STALE_ENTRY: u32 = 3;
    /// posix_memalign results that could not be read from the target.
    pub const READ_FAILED: u32 = 4;
    /// Stack copies of which not even the first page could be read, or (`--unwind auto`) for
    /// which the ring buffer had no room (the event is still reported, with its frame-pointer
    /// stack).
    pub const STACK_COPY_FAILED: u32 = 5;
    /// Sampled blocks not reported because the map of live sampled blocks was full.
    pub const SAMPLED_FULL: u32 = 6;
    /// Allocations of a Python process whose Python frames could not be read (the thread
    /// state or a frame was unreadable); the allocation is still reported.
    pub const PYTHON_STACK_FAILED: u32 = 7;
    /// Runs of the session program at a return (a drawn call's), not a failure: the kernel
    /// counts a session program's runs at entries and returns together, and `--max-overhead`
    /// charges a return a return trap, not an entry's.
    pub const SESSION_RETURNS: u32 = 8;
    /// Hits of a probe on CPython's inlined pymalloc whose registers did not hold a block and
    /// its pool (`pymalloc::is_pool_of`): nothing was reported.
    pub const PYMALLOC_MISMATCH: u32 = 9;
    /// Number of statistics.
    pub const COUNT: u32 = 10;

    /// Each statistic's name, by index (`--print-bpf-stats`).
    pub const NAMES: [&str; COUNT as usize] = [
        "ringbuf_full",
        "pending_full",
        "return_without_entry",
        "stale_entry",
        "read_failed",
        "stack_copy_failed",
        "sampled_full",
        "python_stack_failed",
        "session_returns",
        "pymalloc_mismatch",
    ];
}

/// Default size of the event ring buffer. The kernel wants a power of two times the page size.
pub const DEFAULT_RINGBUF_BYTES: u32 = 32 << 20;

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    // The layouts are the contract with the BPF side: a field added without its padding
    // changes them.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(
            size_of::<AllocEvent>(),
            4 + 4 + 8 * 7 + 4 + 4 + 8 * MAX_STACK_DEPTH
        );
        assert_eq!(ALLOC_EVENT_HEADER_BYTES, 4 + 4 + 8 * 7 + 4 + 4);
        assert_eq!(size_of::<FreeEvent>(), 24);
        assert_eq!(size_of::<UserRegs>(), 24);
        assert_eq!(
            size_of::<AllocStackEvent<4096>>(),
            size_of::<AllocEvent>() + 24 + 8 + 4096
        );
        assert_eq!(size_of::<UnmapEvent>(), 40);
        assert_eq!(size_of::<Pending>(), 72);
        assert_eq!(size_of::<unwind_rows::UnwindRow>(), 16);
        assert_eq!(size_of::<unwind_rows::PageRows>(), 16);
        assert_eq!(size_of::<unwind_rows::RowHint>(), 32);
    }

    #[test]
    fn array_bytes_is_zero_only_for_zero() {
        assert_eq!(call::array_bytes(0, 8), 0);
        assert_eq!(call::array_bytes(8, 0), 0);
        assert_eq!(call::array_bytes(3, 8), 24);
        // Wraps, but never to 0: the allocator fails such a call anyway.
        assert_eq!(call::array_bytes(1 << 32, 1 << 32), 1);
        assert_ne!(call::array_bytes(u64::MAX, 3), 0);
    }
}
