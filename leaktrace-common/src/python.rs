//! The contract for CPython frames: where the BPF side finds a thread's Python call stack in an
//! interpreter's memory ([`PyLayout`], one per traced Python process in the `PY_LAYOUTS` map,
//! written by user space from the interpreter's version), and the record it sends with the
//! frames it found ([`PyStackEvent`]), just before the allocation record they belong to.
//!
//! The BPF side only copies pointers (code object, instruction, a flags word) out of each
//! `_PyInterpreterFrame`; user space names the code objects (qualified name, file, line) by
//! reading the target's memory, and decides what the flags mean for the version.

/// Python frames sent per allocation at most; a deeper Python stack is cut (innermost kept)
/// and marked `truncated`.
pub const MAX_PY_FRAMES: usize = 96;

/// Python threads searched for the calling thread's `PyThreadState` at most.
pub const MAX_PY_THREADS: u32 = 64;

/// `PyLayout::cframe_current_frame` when `PyThreadState` points at the current frame itself
/// (3.13+), not at a `_PyCFrame` that does (3.11, 3.12).
pub const NO_CFRAME: u64 = u64::MAX;

/// Where an interpreter keeps what the frame walk reads: the address of `_PyRuntime` in the
/// target, and byte offsets into CPython's structures (see leaktrace's `stacks::python::layout`
/// for the tables and where each comes from). Every field is a `u64` so that the map value is
/// an array of words on the user side.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyLayout {
    /// The address of `_PyRuntime` in the target.
    pub runtime_addr: u64,
    /// `_PyRuntimeState.interpreters.head`.
    pub runtime_interpreters_head: u64,
    /// `PyInterpreterState.threads.head`.
    pub interp_threads_head: u64,
    /// `PyThreadState.next`.
    pub tstate_next: u64,
    /// `PyThreadState.native_thread_id`: the thread's id as the kernel knows it.
    pub tstate_native_thread_id: u64,
    /// `PyThreadState.cframe` (3.11, 3.12) or `PyThreadState.current_frame` (3.13+).
    pub tstate_frame: u64,
    /// `_PyCFrame.current_frame`, or [`NO_CFRAME`].
    pub cframe_current_frame: u64,
    /// `_PyInterpreterFrame.previous`.
    pub frame_previous: u64,
    /// `_PyInterpreterFrame.f_code` (`f_executable` in 3.13).
    pub frame_code: u64,
    /// `_PyInterpreterFrame.prev_instr` (`instr_ptr` in 3.13).
    pub frame_instr: u64,
    /// A 4-aligned offset in `_PyInterpreterFrame` whose 4 bytes are sent as
    /// [`PyFrame::flags`] (`is_entry` and `owner`).
    pub frame_flags: u64,
    /// `PyCodeObject.co_linetable`: sent with each frame, so that a code object freed and
    /// another made at its address (module code after an import, `exec`, `compile`) is told
    /// apart by user space, which names code objects once.
    pub code_linetable: u64,
}

/// Words of a [`PyLayout`]: the size of a `PY_LAYOUTS` value.
pub const PY_LAYOUT_WORDS: usize = core::mem::size_of::<PyLayout>() / 8;

/// Bytes of `_PyInterpreterFrame` the walk reads per frame: every offset of a [`PyLayout`]'s
/// `frame_*` fields must lie inside it.
pub const PY_FRAME_READ_BYTES: usize = 80;

impl PyLayout {
    /// The layout as the words of a map value.
    pub fn to_words(&self) -> [u64; PY_LAYOUT_WORDS] {
        [
            self.runtime_addr,
            self.runtime_interpreters_head,
            self.interp_threads_head,
            self.tstate_next,
            self.tstate_native_thread_id,
            self.tstate_frame,
            self.cframe_current_frame,
            self.frame_previous,
            self.frame_code,
            self.frame_instr,
            self.frame_flags,
            self.code_linetable,
        ]
    }

    /// Every frame field can be read out of the [`PY_FRAME_READ_BYTES`] the walk copies.
    pub fn frame_offsets_fit(&self) -> bool {
        let word =
            |offset: u64| offset.is_multiple_of(8) && offset + 8 <= PY_FRAME_READ_BYTES as u64;
        word(self.frame_previous)
            && word(self.frame_code)
            && word(self.frame_instr)
            && self.frame_flags.is_multiple_of(4)
            && self.frame_flags + 4 <= PY_FRAME_READ_BYTES as u64
    }
}

/// One `_PyInterpreterFrame`, as the walk found it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyFrame {
    /// The code object (`f_code` / `f_executable`).
    pub code_addr: u64,
    /// The instruction pointer into the code object's `co_code_adaptive`.
    pub instr_addr: u64,
    /// The 4 bytes at `PyLayout::frame_flags`.
    pub flags: u32,
    pub _pad: u32,
    /// The code object's `co_linetable` pointer, 0 when unreadable (see
    /// `PyLayout::code_linetable`).
    pub linetable_addr: u64,
}

/// The Python frames of the thread that made the allocation sent next with the same
/// `pid_tgid` and `ts_ns`. The record is cut after its `frame_count` frames.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PyStackEvent {
    /// Always [`EVENT_PY_STACK`](crate::EVENT_PY_STACK).
    pub kind: u32,
    pub frame_count: u32,
    pub pid_tgid: u64,
    /// The `ts_ns` of the allocation record these frames belong to.
    pub ts_ns: u64,
    /// Non-zero when the Python stack had more frames than were sent: [`MAX_PY_FRAMES`], or
    /// fewer with `--max-depth`.
    pub truncated: u32,
    pub _pad: u32,
    /// Innermost first: `frames[0]` is the frame running when the allocator was called.
    pub frames: [PyFrame; MAX_PY_FRAMES],
}

/// Bytes of a [`PyStackEvent`] before `frames`.
pub const PY_STACK_HEADER_BYTES: usize = core::mem::offset_of!(PyStackEvent, frames);

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<PyLayout>(), 8 * PY_LAYOUT_WORDS);
        assert_eq!(size_of::<PyFrame>(), 32);
        assert_eq!(PY_STACK_HEADER_BYTES, 32);
        assert_eq!(size_of::<PyStackEvent>(), 32 + 32 * MAX_PY_FRAMES);
    }

    #[test]
    fn frame_offsets_must_fit_the_read() {
        let mut layout = PyLayout {
            frame_previous: 48,
            frame_code: 32,
            frame_instr: 56,
            frame_flags: 68,
            ..PyLayout::default()
        };
        assert!(layout.frame_offsets_fit());
        layout.frame_flags = 78;
        assert!(!layout.frame_offsets_fit());
        layout.frame_flags = 68;
        layout.frame_code = 80;
        assert!(!layout.frame_offsets_fit());
    }
}
