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
    maps::{Array, HashMap, LruHashMap},
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

/// The `PyThreadState` of each thread (by `pid_tgid`) found by searching the interpreter's
/// list of threads. Checked at each use (its `native_thread_id` must still be the thread's),
/// since a thread state is freed and its memory reused when its thread ends.
#[map]
static PY_TSTATES: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16384, 0);

const FRAME_WORDS: usize = PY_FRAME_READ_BYTES / 8;

#[inline(always)]
fn read_u64(addr: u64) -> Result<u64, ()> {
    // SAFETY: a user pointer, read through the helper that faults safely.
    unsafe { bpf_probe_read_user(addr as *const u64) }.map_err(|_| ())
}

/// Sends the Python frames of the calling thread (`pid_tgid`) for the allocation it is about to
/// report at `ts_ns`, when its process runs CPython and the thread runs Python code. The
/// allocation is reported whatever happens here.
#[inline(always)]
pub fn send_stack(event: &mut PyStackEvent, pid_tgid: u64, ts_ns: u64) {
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
    match walk(layout, pid_tgid, event) {
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

/// The thread state of the calling thread: the cached one if it is still the thread's, else
/// the one in the first interpreter's list whose `native_thread_id` is the thread's id. 0 for
/// a thread that has none (a thread that never ran Python code).
#[inline(always)]
fn thread_state(layout: &PyLayout, pid_tgid: u64) -> Result<u64, ()> {
    let tid = u64::from(pid_tgid as u32);
    // SAFETY: a map value, copied out.
    if let Some(&cached) = unsafe { PY_TSTATES.get(&pid_tgid) } {
        if read_u64(cached.wrapping_add(layout.tstate_native_thread_id)) == Ok(tid) {
            return Ok(cached);
        }
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
            let _ = PY_TSTATES.insert(&pid_tgid, &tstate, 0);
            return Ok(tstate);
        }
        tstate = read_u64(tstate.wrapping_add(layout.tstate_next))?;
    }
    Ok(0)
}

/// Fills `event.frames` and `frame_count`; false when the thread runs no Python code.
#[inline(always)]
fn walk(layout: &PyLayout, pid_tgid: u64, event: &mut PyStackEvent) -> Result<bool, ()> {
    let tstate = thread_state(layout, pid_tgid)?;
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
    let mut words = [0u64; FRAME_WORDS];
    let mut n = 0;
    for i in 0..MAX_PY_FRAMES {
        if frame == 0 {
            break;
        }
        // SAFETY: `words` has PY_FRAME_READ_BYTES bytes; the helper faults safely.
        if unsafe {
            read_user(
                words.as_mut_ptr().cast(),
                PY_FRAME_READ_BYTES as u32,
                frame as *const _,
            )
        } != 0
        {
            break;
        }
        let (Some(&code), Some(&instr), Some(&previous), Some(&flags)) = (
            words.get(code_at),
            words.get(instr_at),
            words.get(previous_at),
            words.get(flags_at),
        ) else {
            return Err(());
        };
        event.frames[i] = PyFrame {
            code_addr: code,
            instr_addr: instr,
            flags: (flags >> flags_shift) as u32,
            _pad: 0,
            linetable_addr: read_u64(code.wrapping_add(layout.code_linetable)).unwrap_or(0),
        };
        n = i + 1;
        frame = previous;
    }
    event.frame_count = n as u32;
    event.truncated = u32::from(frame != 0 && n == MAX_PY_FRAMES);
    Ok(n > 0)
}
