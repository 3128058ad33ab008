//! The Python call stack of the allocating thread, for processes that run CPython: the thread's
//! `PyThreadState`, then its chain of `_PyInterpreterFrame`s from the current one outward,
//! copied (code object, instruction pointer, flags) into a [`PyStackEvent`] sent right before
//! the allocation's record. Only pointers are copied here; user space names the code objects.
//!
//! Where things are in the interpreter's memory comes from user space, per process
//! ([`PyLayout`] in `PY_LAYOUTS`): the version decides, and nothing here knows of versions.

use aya_ebpf::{
    helpers::{bpf_probe_read_user, generated::bpf_probe_read_user as read_user},
    macros::map,
    maps::{Array, HashMap},
};
use leaktrace_common::{
    EVENT_PY_STACK,
    python::{
        MAX_PY_FRAMES, MAX_PY_THREADS, NO_CFRAME, PY_FRAME_READ_BYTES, PY_LAYOUT_WORDS,
        PY_STACK_HEADER_BYTES, PyFrame, PyLayout, PyStackEvent,
    },
    stat,
};

use crate::count;

/// Traced Python processes at once, at most.
const MAX_PY_PROCESSES: u32 = 1024;

#[map]
static PY_LAYOUTS: HashMap<u32, [u64; PY_LAYOUT_WORDS]> =
    HashMap::with_max_entries(MAX_PY_PROCESSES, 0);

/// How many processes have a layout in `PY_LAYOUTS`, which user space writes after each
/// change to it. Read first, so that the allocations of a trace without CPython skip the hash
/// lookup (a hash of the key, a bucket's walk): the verifier inlines an array's lookup into a
/// few instructions.
#[map]
static PY_PROCESSES: Array<u32> = Array::with_max_entries(1, 0);

const PAGE: u64 = 4096;

/// Bytes of the window the walk reads frames from.
const PY_WINDOW_BYTES: u64 = 2048;
pub const PY_WINDOW_WORDS: usize = PY_WINDOW_BYTES as usize / 8;

/// Reads `_PyInterpreterFrame`s through a window of the target's memory. A thread's frames lie
/// one after the other in its data stack (`_PyStackChunk`), each caller below its callee, so
/// one read of the 2 KiB that end with a frame brings its callers there too (ten or so frames
/// of ordinary functions): each read of the target's memory costs a fixed ~50 ns (checks on
/// both ends), more than copying 2 KiB. The window never begins below the frame's page, so the
/// read touches no page but the frame's own. A frame outside the window (a generator's, held
/// in its object) is read the same way, with whatever lies before it.
struct FrameReader<'a> {
    window: &'a mut [u64; PY_WINDOW_WORDS],
    /// The address of `window[0]`, and the bytes read there.
    base: u64,
    filled: u64,
}

impl FrameReader<'_> {
    /// The index in the window of the first word of the frame at `frame`, read first if the
    /// window does not hold it whole. `None` when it cannot be read.
    #[inline(always)]
    fn locate(&mut self, frame: u64) -> Option<usize> {
        let read = PY_FRAME_READ_BYTES as u64;
        if frame % 8 != 0 {
            return None;
        }
        let offset = frame.wrapping_sub(self.base);
        if self.filled >= read && offset <= self.filled - read {
            return Some((offset / 8) as usize);
        }
        let start = (frame & !(PAGE - 1)).max((frame + read).saturating_sub(PY_WINDOW_BYTES));
        let len = frame - start + read;
        // Never true; it bounds the length for the verifier.
        if len > PY_WINDOW_BYTES {
            return None;
        }
        // SAFETY: `window` has room for `len` bytes; the helper faults safely.
        if unsafe {
            read_user(
                self.window.as_mut_ptr().cast(),
                len as u32,
                start as *const _,
            )
        } != 0
        {
            return None;
        }
        self.base = start;
        self.filled = len;
        Some(((frame - start) / 8) as usize)
    }
}

#[inline(always)]
fn read_u64(addr: u64) -> Result<u64, ()> {
    // SAFETY: a user pointer, read through the helper that faults safely.
    unsafe { bpf_probe_read_user(addr as *const u64) }.map_err(|_| ())
}

/// Sends the Python frames of the calling thread (`pid_tgid`) for the allocation it is about to
/// report at `ts_ns`, when its process runs CPython and the thread runs Python code. The
/// allocation is reported whatever happens here. `tstate` is the thread's `PyThreadState` as
/// last found (0 for none yet), kept in the thread's own storage.
#[inline(always)]
pub fn send_stack(
    event: &mut PyStackEvent,
    tstate: &mut u64,
    window: &mut [u64; PY_WINDOW_WORDS],
    pid_tgid: u64,
    ts_ns: u64,
) {
    if PY_PROCESSES.get(0).is_none_or(|&n| n == 0) {
        return;
    }
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: a map value, read-only here.
    let Some(words) = (unsafe { PY_LAYOUTS.get(&tgid) }) else {
        return;
    };
    // SAFETY: PyLayout is repr(C), all u64, PY_LAYOUT_WORDS of them.
    let layout = unsafe { &*core::ptr::from_ref(words).cast::<PyLayout>() };
    match walk(layout, tstate, window, pid_tgid, event) {
        Ok(true) => {
            event.kind = EVENT_PY_STACK;
            event.pid_tgid = pid_tgid;
            event.ts_ns = ts_ns;
            event._pad = 0;
            // Read back: after the loop the verifier would follow each frame count apart.
            // SAFETY: a read of an initialized field.
            let n = unsafe { core::ptr::read_volatile(&raw const event.frame_count) } as usize;
            let len = PY_STACK_HEADER_BYTES + n * core::mem::size_of::<PyFrame>();
            // Never true; it bounds the length for the verifier.
            if len > core::mem::size_of::<PyStackEvent>() {
                return;
            }
            // SAFETY: `len` bytes at the start of the event are initialized.
            let bytes = unsafe {
                core::slice::from_raw_parts(core::ptr::from_ref(event).cast::<u8>(), len)
            };
            let _ = crate::send(bytes);
        }
        Ok(false) => {}
        Err(()) => count(stat::PYTHON_STACK_FAILED),
    }
}

/// The thread state of the calling thread: `cached` if it is still the thread's (a thread
/// state is freed and its memory reused when its thread ends), else the one in the first
/// interpreter's list whose `native_thread_id` is the thread's id, then kept in `cached`. 0
/// for a thread that has none (a thread that never ran Python code).
///
/// Kept in the thread's task storage, which the allocation's programs hold already, rather than
/// in a hash map by `pid_tgid`: a lookup less per allocation.
#[inline(always)]
fn thread_state(layout: &PyLayout, cached: &mut u64, pid_tgid: u64) -> Result<u64, ()> {
    let tid = u64::from(pid_tgid as u32);
    if *cached != 0 && read_u64(cached.wrapping_add(layout.tstate_native_thread_id)) == Ok(tid) {
        return Ok(*cached);
    }
    let interp = read_u64(
        layout
            .runtime_addr
            .wrapping_add(layout.runtime_interpreters_head),
    )?;
    if interp == 0 {
        return Ok(0);
    }
    let mut tstate = read_u64(interp.wrapping_add(layout.interp_threads_head))?;
    for _ in 0..MAX_PY_THREADS {
        if tstate == 0 {
            break;
        }
        if read_u64(tstate.wrapping_add(layout.tstate_native_thread_id))? == tid {
            *cached = tstate;
            return Ok(tstate);
        }
        tstate = read_u64(tstate.wrapping_add(layout.tstate_next))?;
    }
    Ok(0)
}

/// Fills `event.frames` and `frame_count`; false when the thread runs no Python code. At most
/// `--max-depth` frames (`STACK_DEPTH`), innermost first: each frame costs a read of its code
/// object's line table, and a deep Python stack (a web framework's) is most of an
/// allocation's cost, which `--max-depth` bounds.
#[inline(always)]
fn walk(
    layout: &PyLayout,
    cached_tstate: &mut u64,
    window: &mut [u64; PY_WINDOW_WORDS],
    pid_tgid: u64,
    event: &mut PyStackEvent,
) -> Result<bool, ()> {
    let tstate = thread_state(layout, cached_tstate, pid_tgid)?;
    if tstate == 0 {
        return Ok(false);
    }
    let mut frame = read_u64(tstate.wrapping_add(layout.tstate_frame))?;
    if layout.cframe_current_frame != NO_CFRAME && frame != 0 {
        frame = read_u64(frame.wrapping_add(layout.cframe_current_frame))?;
    }
    if frame == 0 {
        return Ok(false);
    }
    let code_at = (layout.frame_code / 8) as usize;
    let instr_at = (layout.frame_instr / 8) as usize;
    let previous_at = (layout.frame_previous / 8) as usize;
    let flags_at = (layout.frame_flags / 8) as usize;
    let flags_shift = (layout.frame_flags % 8) * 8;
    // SAFETY: a plain read of a global that user space sets before load.
    let depth = unsafe { core::ptr::read_volatile(&raw const crate::STACK_DEPTH) } as usize;
    let mut reader = FrameReader {
        window,
        base: 0,
        filled: 0,
    };
    let mut n = 0;
    let (mut last_code, mut last_linetable) = (0, 0);
    for i in 0..MAX_PY_FRAMES {
        if frame == 0 || i >= depth {
            break;
        }
        let Some(at) = reader.locate(frame) else {
            break;
        };
        let word = |k: usize| reader.window.get(at + k).copied().ok_or(());
        let (code, instr, previous, flags) = (
            word(code_at)?,
            word(instr_at)?,
            word(previous_at)?,
            word(flags_at)?,
        );
        // A recursive call runs the code object of the frame just read, which both frames
        // hold alive: its line table is the one read there.
        if code != last_code {
            last_linetable = read_u64(code.wrapping_add(layout.code_linetable)).unwrap_or(0);
            last_code = code;
        }
        event.frames[i] = PyFrame {
            code_addr: code,
            instr_addr: instr,
            flags: (flags >> flags_shift) as u32,
            _pad: 0,
            linetable_addr: last_linetable,
        };
        n = i + 1;
        frame = previous;
    }
    event.frame_count = n as u32;
    event.truncated = u32::from(frame != 0 && n >= depth.min(MAX_PY_FRAMES));
    Ok(n > 0)
}
