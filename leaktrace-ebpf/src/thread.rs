//! Per-thread state in task-local storage: the allocator call in flight, and room to build its
//! record.
//!
//! Task storage rather than a hash map keyed by `pid_tgid`: the kernel finds a thread's element
//! through its `task_struct` (a cached pointer, no hashing, no lock on the common path), which
//! costs a fraction of an LRU hash map's lookup, insert and delete on every call. It also
//! belongs to one thread only, so the record can be built in it even though uprobe programs
//! may be preempted (a per-CPU buffer could be overwritten by another thread's program), and it
//! goes away with the thread.
//!
//! aya-ebpf 0.2 has no task storage type, so the BTF map definition is written out here, the
//! way its `btf_map_def!` writes those it has (`CgrpStorage`).

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE, bpf_map_type},
    helpers::generated::{bpf_get_current_task_btf, bpf_task_storage_get},
    macros::btf_map,
};
use leaktrace_common::{AllocEvent, Pending, python::PyStackEvent};

/// Words of user stack that the frame-pointer walk reads at once (see `stack::walk_frame_pointers`).
pub const WINDOW_WORDS: usize = 128;

/// A thread's state.
#[repr(C)]
pub struct ThreadState {
    /// The outermost allocator call in flight; `depth` 0 when there is none.
    pub pending: Pending,
    /// The call of CPython's object allocator that waits while the mapping call it makes
    /// itself (an arena's `mmap` or `munmap`) is `pending`; `depth` 0 when there is none.
    pub outer: Pending,
    /// The allocation record of the call returning now. It is sent cut after its frames.
    pub event: AllocEvent,
    /// A window of the user stack that the frame-pointer walk reads frames from; one word
    /// more than it fills, so that reading the word after any filled one stays in bounds.
    pub window: [u64; WINDOW_WORDS + 1],
    /// The Python frames of the allocation returning now (CPython processes only).
    pub py_stack: PyStackEvent,
    /// The thread's `PyThreadState` as last found (`python::thread_state`), 0 before.
    pub py_tstate: u64,
    /// A window of the thread's Python frames that the walk reads them from.
    pub py_window: [u64; crate::python::PY_WINDOW_WORDS],
    /// The block that `PyObject_Free`/`PyMem_Free` is releasing, and the stack pointer at its
    /// entry: the `free` it calls for the same block, deeper in the stack (or at the same
    /// depth, reached by tail calls), is not reported again.
    pub py_free_addr: u64,
    pub py_free_sp: u64,
    /// The last call whose return probe its entry cancelled (not drawn under
    /// `--sample-bytes`), while it may still run: the allocator calls it makes are hidden.
    pub skipped: Skipped,
}

/// A call that returns unseen: no return tells when it is over, so a later entry is taken for
/// one of its nested calls only while its frame is live: deeper in the stack, with the call's
/// return address still in its slot (once it returned, the next call its caller makes writes
/// its own return address there).
#[repr(C)]
pub struct Skipped {
    /// The stack pointer at its entry (where its return address is); 0 when there is none.
    pub sp: u64,
    /// Its return address.
    pub ret: u64,
    /// The probed address of the function called (`bpf_get_func_ip`).
    pub ip: u64,
}

/// A BTF task storage map (`BPF_MAP_TYPE_TASK_STORAGE`): the fields are placeholders whose
/// types encode the definition, as libbpf and aya read it from BTF.
#[repr(C)]
pub struct TaskStorage<T> {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: the fields are never dereferenced; the kernel owns the map (as aya-ebpf's BTF maps).
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }

    /// The current thread's element, created (zeroed) first when `create` and there is none.
    /// `None` when there is none, or the kernel could not make one.
    #[inline(always)]
    fn current(&self, create: bool) -> Option<*mut T> {
        let flags = if create {
            u64::from(BPF_LOCAL_STORAGE_GET_F_CREATE)
        } else {
            0
        };
        // SAFETY: the map pointer is this map's definition (relocated by the loader), the task
        // is the current one, and a null initial value asks for a zeroed element.
        let value = unsafe {
            bpf_task_storage_get(
                core::ptr::from_ref(self).cast_mut().cast(),
                bpf_get_current_task_btf(),
                core::ptr::null_mut(),
                flags,
            )
        };
        (!value.is_null()).then_some(value.cast())
    }
}

#[btf_map]
static THREADS: TaskStorage<ThreadState> = TaskStorage::new();

/// The current thread's state, created at its first allocator entry.
#[inline(always)]
pub fn get_or_create() -> Option<*mut ThreadState> {
    THREADS.current(true)
}

/// The current thread's state, if it ever entered the allocator since attach.
#[inline(always)]
pub fn get() -> Option<*mut ThreadState> {
    THREADS.current(false)
}
