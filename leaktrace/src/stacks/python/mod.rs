//! Python frames among the native ones, for processes that run CPython.
//!
//! The BPF side sends, before each allocation of a Python thread, the chain of its
//! `_PyInterpreterFrame`s (code object, instruction pointer, flags). Here the code objects are
//! named by reading the target's memory (`code`), once per code object and instruction, and
//! each frame becomes an address in a range no user code can have ([`FRAME_TAG`]), which
//! stands for its (qualified name, file, line) in the trace's [`PyNames`]. Those addresses take
//! the place of the native frames of `_PyEval_EvalFrameDefault` that ran them, so the rest of
//! leaktrace (stack identity, the heap model) sees one stack, and the symbolizer names them.
//!
//! Where: one C call of the evaluation loop runs several Python frames (3.11+ calls Python
//! functions without a C call). Walking from the current frame outward, the frames of the
//! innermost C call end at a marker (`layout::Marker`): they replace the innermost
//! `_PyEval_EvalFrameDefault` frame, the next group the next one, and so on. Groups left over
//! when the native stack ended first (a stack copy too short) are appended outermost.

pub mod code;
pub mod layout;
pub mod linetable;

use std::{
    collections::HashMap,
    mem::{offset_of, size_of},
    sync::{Arc, RwLock},
};

use leaktrace_common::{
    EVENT_PY_STACK,
    python::{MAX_PY_FRAMES, PY_STACK_HEADER_BYTES, PyFrame, PyStackEvent},
};

use crate::model::location::{FRAME_TAG, TAG_MASK, is_python_frame};

use self::{
    code::{Code, Memory},
    layout::{Marker, OWNED_BY_CSTACK, Offsets, Version},
};

/// A Python frame as reports show it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PyFrameName {
    /// `co_qualname`: `Cache.put`, `handle.<locals>.inner`.
    pub qualname: Option<String>,
    /// `co_filename`, as the interpreter has it.
    pub filename: Option<String>,
    pub line: Option<u32>,
}

/// The Python frames of a trace, each named once, shared by the event loop (which adds them)
/// and the reporters (which name them). The same function and line in two processes, or at
/// two instructions, is one frame.
#[derive(Debug, Default)]
pub struct PyNames {
    inner: RwLock<(Vec<PyFrameName>, HashMap<PyFrameName, u64>)>,
}

impl PyNames {
    /// The address that stands for `name`.
    pub fn intern(&self, name: PyFrameName) -> u64 {
        let mut table = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(&address) = table.1.get(&name) {
            return address;
        }
        let address = FRAME_TAG | table.0.len() as u64;
        table.0.push(name.clone());
        table.1.insert(name, address);
        address
    }

    /// The frame `address` stands for.
    pub fn get(&self, address: u64) -> Option<PyFrameName> {
        if !is_python_frame(address) {
            return None;
        }
        let table = self.inner.read().unwrap_or_else(|e| e.into_inner());
        table.0.get((address & !TAG_MASK) as usize).cloned()
    }
}

/// What leaktrace found of the interpreter in a process.
#[derive(Clone, Debug)]
pub struct Interpreter {
    pub version: Version,
    pub offsets: Offsets,
    /// Where `_PyEval_EvalFrameDefault`'s code is in the target.
    pub eval_ranges: Vec<(u64, u64)>,
    /// Where the interpreter module's code is mapped in the target, when it was found.
    pub code_ranges: Vec<(u64, u64)>,
    /// The address of `PyCode_Type`, when exported: a frame's code object must have it.
    pub code_type: Option<u64>,
    /// The module that holds the interpreter, as the target names it.
    pub module: String,
    /// When the exported `PyObject_Malloc` tests the object allocator table's `malloc`
    /// against one function before calling it (`attach::python::speculated_allocator`): the
    /// table slot's address and that function's, in the target.
    pub speculated_malloc: Option<(u64, u64)>,
    /// With `speculated_malloc`: the copies of pymalloc's fast paths in its callers, and how
    /// many of them the probes see (`attach::pymalloc_inline`).
    pub pymalloc_sites: Option<crate::attach::pymalloc_inline::Sites>,
    /// What the probes miss of this interpreter's allocations, when they miss something:
    /// one sentence for the reports' `incomplete_reasons`.
    pub unseen: Option<String>,
}

/// Python frames of an allocation that has not been seen yet.
struct Pending {
    ts_ns: u64,
    frames: Vec<PyFrame>,
}

/// A traced Python process.
pub struct PyProcess<M = std::fs::File> {
    interp: Interpreter,
    memory: M,
    names: Arc<PyNames>,
    /// The latest Python frames per thread (`pid_tgid`), until its allocation comes.
    pending: HashMap<u64, Pending>,
    /// By address and `co_linetable` pointer: another code object made where one was freed
    /// has another line table.
    codes: HashMap<(u64, u64), Option<Code>>,
    /// The address standing for each (code object, line table, instruction) seen; `None` for
    /// an incomplete frame (not shown).
    frames: HashMap<(u64, u64, u64), Option<u64>>,
    groups: Vec<Vec<u64>>,
}

/// A malformed Python frames record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed Python frames record of {0} bytes")]
pub struct BadRecord(pub usize);

impl<M: Memory> PyProcess<M> {
    pub fn new(interp: Interpreter, memory: M, names: Arc<PyNames>) -> Self {
        Self {
            interp,
            memory,
            names,
            pending: HashMap::new(),
            codes: HashMap::new(),
            frames: HashMap::new(),
            groups: Vec::new(),
        }
    }

    pub fn interpreter(&self) -> &Interpreter {
        &self.interp
    }

    /// Whether a mapping made inside a call of the object allocator, by code at return address
    /// `caller`, is one of pymalloc's arenas: made by the interpreter's own code. A `malloc`
    /// the call makes for a large object maps its block from the allocator's code instead (its
    /// return probe skipped under uprobe sessions, the BPF side cannot tell it ended).
    pub fn maps_arena(&self, caller: u64) -> bool {
        self.interp
            .code_ranges
            .iter()
            .any(|&(start, end)| start < caller && caller <= end)
    }

    /// Keeps the frames of an `EVENT_PY_STACK` record for the allocation that follows; false
    /// for a record of another kind.
    pub fn take(&mut self, record: &[u8]) -> Result<bool, BadRecord> {
        let u32_at = |at: usize| {
            record
                .get(at..at + 4)
                .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
        };
        let u64_at = |at: usize| {
            record
                .get(at..at + 8)
                .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
        };
        if u32_at(0) != Some(EVENT_PY_STACK) {
            return Ok(false);
        }
        let bad = || BadRecord(record.len());
        let count = u32_at(offset_of!(PyStackEvent, frame_count)).ok_or_else(bad)? as usize;
        if count > MAX_PY_FRAMES
            || PY_STACK_HEADER_BYTES + count * size_of::<PyFrame>() > record.len()
        {
            return Err(bad());
        }
        let pid_tgid = u64_at(offset_of!(PyStackEvent, pid_tgid)).ok_or_else(bad)?;
        let ts_ns = u64_at(offset_of!(PyStackEvent, ts_ns)).ok_or_else(bad)?;
        let frames = (0..count)
            .map(|i| {
                let at = PY_STACK_HEADER_BYTES + i * size_of::<PyFrame>();
                PyFrame {
                    code_addr: u64_at(at).unwrap_or(0),
                    instr_addr: u64_at(at + 8).unwrap_or(0),
                    flags: u32_at(at + 16).unwrap_or(0),
                    _pad: 0,
                    linetable_addr: u64_at(at + 24).unwrap_or(0),
                }
            })
            .collect();
        self.pending.insert(pid_tgid, Pending { ts_ns, frames });
        Ok(true)
    }

    /// The native stack `native` of the allocation by `pid_tgid` at `ts_ns`, with the Python
    /// frames sent for it in place of the evaluation loop's frames, into `out`; false (and `out`
    /// untouched) when no Python frames came for it.
    pub fn mix(&mut self, pid_tgid: u64, ts_ns: u64, native: &[u64], out: &mut Vec<u64>) -> bool {
        let Some(pending) = self.pending.remove(&pid_tgid) else {
            return false;
        };
        if pending.ts_ns != ts_ns {
            // The frames of an allocation whose record was lost.
            return false;
        }
        self.group(&pending.frames);
        out.clear();
        let mut groups = self.groups.iter();
        for &pc in native {
            let in_eval = self
                .interp
                .eval_ranges
                .iter()
                .any(|&(start, end)| start < pc && pc <= end);
            match (in_eval, in_eval.then(|| groups.next()).flatten()) {
                (true, Some(group)) if !group.is_empty() => out.extend_from_slice(group),
                _ => out.push(pc),
            }
        }
        out.extend(groups.flatten());
        true
    }

    /// Splits `frames` (innermost first) into the groups that each C call of the evaluation
    /// loop runs, each frame as the address that stands for it.
    fn group(&mut self, frames: &[PyFrame]) {
        let mut groups = std::mem::take(&mut self.groups);
        groups.iter_mut().for_each(Vec::clear);
        let mut n = 1;
        if groups.is_empty() {
            groups.push(Vec::new());
        }
        let byte = |flags: u32, i: u8| (flags >> (8 * u32::from(i))) as u8;
        for frame in frames {
            if self.interp.offsets.marker == Marker::CStackOwner
                && byte(frame.flags, self.interp.offsets.owner_byte) == OWNED_BY_CSTACK
            {
                next_group(&mut groups, &mut n);
                continue;
            }
            if let Some(address) = self.frame(frame) {
                groups[n - 1].push(address);
            }
            if let Marker::IsEntry { byte: at } = self.interp.offsets.marker
                && byte(frame.flags, at) != 0
            {
                next_group(&mut groups, &mut n);
            }
        }
        groups.truncate(n);
        self.groups = groups;
    }

    /// The address that stands for the frame running `instr` of the code object at `code`;
    /// `None` for a frame that has not started (not shown).
    fn frame(&mut self, frame: &PyFrame) -> Option<u64> {
        let (code, instr, linetable) = (frame.code_addr, frame.instr_addr, frame.linetable_addr);
        if let Some(&known) = self.frames.get(&(code, linetable, instr)) {
            return known;
        }
        let (memory, offsets, code_type) =
            (&self.memory, &self.interp.offsets, self.interp.code_type);
        let parsed = self
            .codes
            .entry((code, linetable))
            .or_insert_with(|| Code::read(memory, offsets, code, code_type));
        let address = match parsed {
            Some(parsed) => parsed.lasti(instr).map(|lasti| {
                self.names.intern(PyFrameName {
                    qualname: parsed.qualname.clone(),
                    filename: parsed.filename.clone(),
                    line: parsed.line(lasti),
                })
            }),
            // Unreadable, or not a code object: shown, without a name.
            None => Some(self.names.intern(PyFrameName {
                qualname: None,
                filename: None,
                line: None,
            })),
        };
        self.frames.insert((code, linetable, instr), address);
        address
    }
}

fn next_group(groups: &mut Vec<Vec<u64>>, n: &mut usize) {
    *n += 1;
    if groups.len() < *n {
        groups.push(Vec::new());
    }
}

#[cfg(test)]
mod tests {
    use super::{code::tests::FakeMemory, *};

    const TABLE: &[u8] = b"\x80\x00\xd8\x08\t\x80A\xd8\x0b\x0c\x80H";
    const EVAL: (u64, u64) = (0x40_0000, 0x40_8000);

    fn process(version: Version) -> (PyProcess<FakeMemory>, Arc<PyNames>) {
        let offsets = version.header_tables(0).unwrap();
        let mut mem = FakeMemory::default();
        mem.put_code(&offsets, 0x10_0000, ("leak", "/app/x.py", 2, TABLE));
        mem.put_code(&offsets, 0x20_0000, ("main", "/app/x.py", 2, TABLE));
        mem.put_code(&offsets, 0x30_0000, ("<module>", "/app/x.py", 2, TABLE));
        let names = Arc::new(PyNames::default());
        let interp = Interpreter {
            version,
            offsets,
            eval_ranges: vec![EVAL],
            code_ranges: Vec::new(),
            code_type: Some(0xc0de),
            module: "/usr/bin/python3.11".into(),
            speculated_malloc: None,
            pymalloc_sites: None,
            unseen: None,
        };
        (PyProcess::new(interp, mem, names.clone()), names)
    }

    fn record(pid_tgid: u64, ts_ns: u64, frames: &[PyFrame]) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend(EVENT_PY_STACK.to_ne_bytes());
        r.extend((frames.len() as u32).to_ne_bytes());
        r.extend(pid_tgid.to_ne_bytes());
        r.extend(ts_ns.to_ne_bytes());
        r.extend([0; 8]);
        for f in frames {
            r.extend(f.code_addr.to_ne_bytes());
            r.extend(f.instr_addr.to_ne_bytes());
            r.extend(f.flags.to_ne_bytes());
            r.extend([0; 4]);
            r.extend(f.linetable_addr.to_ne_bytes());
        }
        r
    }

    fn at_line_3(code: u64, offsets: &Offsets, flags: u32) -> PyFrame {
        PyFrame {
            code_addr: code,
            instr_addr: code + offsets.code.code_adaptive + 2,
            flags,
            _pad: 0,
            linetable_addr: code + 0x3000,
        }
    }

    fn named(names: &PyNames, stack: &[u64]) -> Vec<String> {
        stack
            .iter()
            .map(|&a| match names.get(a) {
                Some(n) => format!("{}:{}", n.qualname.unwrap(), n.line.unwrap()),
                None => format!("{a:#x}"),
            })
            .collect()
    }

    #[test]
    fn python_frames_take_the_place_of_the_evaluation_loop_that_ran_them_3_11() {
        let (mut py, names) = process(Version::V3_11);
        let o = py.interpreter().offsets;
        // `leak` called by `main` in one C call (main's frame is its entry), `<module>` in
        // the outer one.
        let frames = [
            at_line_3(0x10_0000, &o, 0),
            at_line_3(0x20_0000, &o, 1),
            at_line_3(0x30_0000, &o, 1),
        ];
        assert_eq!(py.take(&record(7, 100, &frames)), Ok(true));
        let native = [0x1111, EVAL.0 + 0x10, 0x2222, EVAL.0 + 0x20, 0x3333];
        let mut out = Vec::new();
        assert!(py.mix(7, 100, &native, &mut out));
        assert_eq!(
            named(&names, &out),
            [
                "0x1111",
                "leak:3",
                "main:3",
                "0x2222",
                "<module>:3",
                "0x3333"
            ]
        );
        // Consumed: the next allocation of the thread has none.
        assert!(!py.mix(7, 100, &native, &mut out));
    }

    #[test]
    fn shim_frames_separate_the_groups_from_3_12_on() {
        let (mut py, names) = process(Version::V3_12);
        let o = py.interpreter().offsets;
        let shim = PyFrame {
            code_addr: 0x99,
            instr_addr: 0,
            flags: u32::from(OWNED_BY_CSTACK) << 16,
            _pad: 0,
            linetable_addr: 0,
        };
        let frames = [
            at_line_3(0x10_0000, &o, 0),
            at_line_3(0x20_0000, &o, 0),
            shim,
            at_line_3(0x30_0000, &o, 0),
            shim,
        ];
        py.take(&record(7, 5, &frames)).unwrap();
        // The native stack ended after the first evaluation loop: the rest goes outermost.
        let mut out = Vec::new();
        assert!(py.mix(7, 5, &[0x1111, EVAL.0 + 1], &mut out));
        assert_eq!(
            named(&names, &out),
            ["0x1111", "leak:3", "main:3", "<module>:3"]
        );
    }

    #[test]
    fn frames_of_another_allocation_or_thread_are_not_used() {
        let (mut py, _) = process(Version::V3_11);
        let o = py.interpreter().offsets;
        py.take(&record(7, 100, &[at_line_3(0x10_0000, &o, 1)]))
            .unwrap();
        let mut out = vec![42];
        assert!(!py.mix(8, 100, &[1], &mut out));
        assert!(!py.mix(7, 101, &[1], &mut out));
        assert_eq!(out, [42]);
    }

    #[test]
    fn incomplete_and_unreadable_frames() {
        let (mut py, names) = process(Version::V3_11);
        let o = py.interpreter().offsets;
        let incomplete = PyFrame {
            code_addr: 0x10_0000,
            instr_addr: 0x10_0000 + o.code.code_adaptive - 2,
            flags: 0,
            _pad: 0,
            linetable_addr: 0x10_3000,
        };
        let garbage = PyFrame {
            code_addr: 0xdead_0000,
            instr_addr: 1,
            flags: 1,
            _pad: 0,
            linetable_addr: 0,
        };
        py.take(&record(1, 1, &[incomplete, garbage])).unwrap();
        let mut out = Vec::new();
        assert!(py.mix(1, 1, &[EVAL.0 + 1], &mut out));
        assert_eq!(out.len(), 1);
        assert_eq!(
            names.get(out[0]),
            Some(PyFrameName {
                qualname: None,
                filename: None,
                line: None
            })
        );
    }

    #[test]
    fn code_made_where_other_code_was_freed_is_named_for_what_it_is() {
        let (mut py, names) = process(Version::V3_11);
        let o = py.interpreter().offsets;
        let frame = at_line_3(0x10_0000, &o, 1);
        py.take(&record(1, 1, &[frame])).unwrap();
        let mut out = Vec::new();
        py.mix(1, 1, &[EVAL.0 + 1], &mut out);
        assert_eq!(named(&names, &out), ["leak:3"]);
        // `leak`'s code object freed; `other`'s made at its address, with its own line table.
        py.memory
            .put_code(&o, 0x10_0000, ("other", "/app/y.py", 2, TABLE));
        py.memory.put_u64(0x10_0000 + o.code.linetable, 0x10_5000);
        py.memory
            .put_u64(0x10_5000 + layout::OB_SIZE, TABLE.len() as u64);
        py.memory.put(0x10_5000 + layout::BYTES_DATA, TABLE);
        let moved = PyFrame {
            linetable_addr: 0x10_5000,
            ..frame
        };
        py.take(&record(1, 2, &[moved])).unwrap();
        py.mix(1, 2, &[EVAL.0 + 1], &mut out);
        assert_eq!(named(&names, &out), ["other:3"]);
    }

    #[test]
    fn malformed_records_are_refused() {
        let (mut py, _) = process(Version::V3_11);
        assert_eq!(py.take(&[1, 0, 0, 0]), Ok(false));
        let mut r = record(1, 1, &[PyFrame::default(); 2]);
        r.truncate(r.len() - 1);
        assert_eq!(py.take(&r), Err(BadRecord(r.len())));
        let mut r = record(1, 1, &[]);
        r[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(py.take(&r).is_err());
        assert!(py.take(&EVENT_PY_STACK.to_ne_bytes()).is_err());
    }
}
