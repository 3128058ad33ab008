//! The names by which user space finds the BPF side's objects: those of the statics (maps,
//! globals set at load) and functions (programs) of leaktrace-ebpf, which are named the same.
//! A test of the leaktrace crate finds each of them in the compiled BPF object.

/// Maps.
pub mod map {
    /// The ring buffer of records ([`AllocEvent`](crate::AllocEvent) and the others).
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU counters, indexed by [`stat`](crate::stat).
    pub const STATS: &str = "STATS";
    /// Unwinding rows built from `.eh_frame` ([`unwind_rows`](crate::unwind_rows)).
    pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
    /// The rows that cover each page of code, for `UNWIND_ROWS`'s search.
    pub const UNWIND_PAGES: &str = "UNWIND_PAGES";
    /// The drawn blocks that are live (`--sample-bytes`).
    pub const SAMPLED: &str = "SAMPLED";
    /// Per-thread state (task storage).
    pub const THREADS: &str = "THREADS";
    /// Each traced Python process's [`PyLayout`](crate::python::PyLayout), by tgid.
    pub const PY_LAYOUTS: &str = "PY_LAYOUTS";
    /// One element: how many processes have a layout in `PY_LAYOUTS`.
    pub const PY_PROCESSES: &str = "PY_PROCESSES";

    pub const ALL: [&str; 8] = [
        EVENTS,
        STATS,
        UNWIND_ROWS,
        UNWIND_PAGES,
        SAMPLED,
        THREADS,
        PY_LAYOUTS,
        PY_PROCESSES,
    ];
}

/// Globals that user space sets before loading.
pub mod global {
    /// Frames kept per stack (`--max-depth`).
    pub const STACK_DEPTH: &str = "STACK_DEPTH";
    /// One of [`unwind`](crate::unwind)'s constants (`--unwind`).
    pub const UNWIND_MODE: &str = "UNWIND_MODE";
    /// One of [`STACK_COPY_SIZES`](crate::STACK_COPY_SIZES) (`--stack-copy-bytes`).
    pub const STACK_COPY_BYTES: &str = "STACK_COPY_BYTES";
    /// `--sample-bytes`, or 0.
    pub const SAMPLE_BYTES: &str = "SAMPLE_BYTES";

    /// The byte offsets that lead from the current task to its uretprobe trampoline address
    /// (`task_struct.mm`, `mm_struct.uprobes_state.xol_area`, `xol_area.vaddr`), from the
    /// kernel's BTF; all 0 when it does not give them.
    pub const TRAMPOLINE_OFFSETS: &str = "TRAMPOLINE_OFFSETS";

    pub const ALL: [&str; 5] = [
        STACK_DEPTH,
        UNWIND_MODE,
        STACK_COPY_BYTES,
        SAMPLE_BYTES,
        TRAMPOLINE_OFFSETS,
    ];
}

/// Programs: a uprobe per kind of allocator entry, a uretprobe on their returns.
pub mod program {
    /// `malloc(size)` and the calls that take the same argument (`valloc`, `operator new`, ...).
    pub const MALLOC_ENTRY: &str = "malloc_entry";
    pub const CALLOC_ENTRY: &str = "calloc_entry";
    pub const REALLOC_ENTRY: &str = "realloc_entry";
    pub const REALLOCARRAY_ENTRY: &str = "reallocarray_entry";
    pub const POSIX_MEMALIGN_ENTRY: &str = "posix_memalign_entry";
    /// `aligned_alloc(alignment, size)` and `memalign`.
    pub const ALIGNED_ALLOC_ENTRY: &str = "aligned_alloc_entry";
    pub const MMAP_ENTRY: &str = "mmap_entry";
    pub const MREMAP_ENTRY: &str = "mremap_entry";
    pub const MUNMAP_ENTRY: &str = "munmap_entry";
    pub const XALLOCX_ENTRY: &str = "xallocx_entry";
    /// `free(ptr)` and every call that only releases: it has no return program.
    pub const FREE_ENTRY: &str = "free_entry";
    /// CPython's `PyObject_Free(ptr)` and `PyMem_Free(ptr)`: as `free_entry`, and the `free`
    /// they may call for the same block is not reported again.
    pub const PY_FREE_ENTRY: &str = "py_free_entry";
    /// CPython's `pymalloc_alloc` where it is compiled into its callers: at the branch after
    /// the pop of a pool's free list, the block in argument 0's register and its pool in
    /// argument 1's (`args::location`); reported there, with no return probe.
    pub const PY_INLINE_ALLOC: &str = "py_inline_alloc";
    /// CPython's `pymalloc_free` where it is compiled into its callers: at the branch after
    /// the push onto a pool's free list, the pool in argument 1's register.
    pub const PY_INLINE_FREE: &str = "py_inline_free";
    /// CPython's `allocate_from_new_pool(size_class)`: pymalloc's path when no pool of the
    /// size class has a free block; reported at its return, as `malloc`.
    pub const PY_NEW_POOL_ENTRY: &str = "py_new_pool_entry";
    /// The return of every entry but the free-like ones.
    pub const ALLOC_RETURN: &str = "alloc_return";
    /// Programs that do nothing, attached instead of the others by benchmarks
    /// (`--noop-programs`).
    pub const NOOP_ENTRY: &str = "noop_entry";
    pub const NOOP_RETURN: &str = "noop_return";

    /// The uprobe session program (Linux 6.13+, `--sample-bytes`): it runs at the entry of a
    /// call of the malloc family, as the entry program of its kind would (the kind is in the
    /// probe's cookie, see [`session_call`]), and, only when the entry drew its block (or it
    /// releases a drawn one), at its return, as `alloc_return`. One program for every kind:
    /// each copy of the return path costs the verifier seconds on a busy machine.
    pub const ALLOC_SESSION: &str = "alloc_session";

    /// The call (one of [`call`](crate::call)'s constants) that `alloc_session` traces at an
    /// entry point where the entry program `entry` would run: the malloc family's.
    pub fn session_call(entry: &str) -> Option<u32> {
        use crate::call;
        Some(match entry {
            MALLOC_ENTRY => call::MALLOC,
            CALLOC_ENTRY => call::CALLOC,
            REALLOC_ENTRY => call::REALLOC,
            REALLOCARRAY_ENTRY => call::REALLOCARRAY,
            POSIX_MEMALIGN_ENTRY => call::POSIX_MEMALIGN,
            ALIGNED_ALLOC_ENTRY => call::ALIGNED_ALLOC,
            XALLOCX_ENTRY => call::XALLOCX,
            _ => return None,
        })
    }

    pub const ALL: [&str; 19] = [
        PY_FREE_ENTRY,
        PY_INLINE_FREE,
        PY_INLINE_ALLOC,
        PY_NEW_POOL_ENTRY,
        MALLOC_ENTRY,
        CALLOC_ENTRY,
        REALLOC_ENTRY,
        REALLOCARRAY_ENTRY,
        POSIX_MEMALIGN_ENTRY,
        ALIGNED_ALLOC_ENTRY,
        MMAP_ENTRY,
        MREMAP_ENTRY,
        MUNMAP_ENTRY,
        XALLOCX_ENTRY,
        FREE_ENTRY,
        ALLOC_RETURN,
        NOOP_ENTRY,
        NOOP_RETURN,
        ALLOC_SESSION,
    ];
}
