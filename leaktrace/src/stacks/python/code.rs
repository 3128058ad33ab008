//! Code objects named from the target's memory: qualified name, file, and the line of an
//! instruction, read as CPython lays them out (offsets in `layout`). Everything read is
//! untrusted: lengths are bounded, a string that is not what it should be gives no name.

use super::{
    layout::{BYTES_DATA, OB_SIZE, OB_TYPE, Offsets, UNICODE_LENGTH, UNICODE_STATE},
    linetable,
};

/// Reads the target's memory.
pub trait Memory {
    /// Fills `buf` from `addr`; false when any of it cannot be read.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;

    fn u64_at(&self, addr: u64) -> Option<u64> {
        let mut b = [0; 8];
        self.read(addr, &mut b).then(|| u64::from_ne_bytes(b))
    }

    fn i32_at(&self, addr: u64) -> Option<i32> {
        let mut b = [0; 4];
        self.read(addr, &mut b).then(|| i32::from_ne_bytes(b))
    }
}

/// `/proc/PID/mem`.
impl Memory for std::fs::File {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, addr).is_ok()
    }
}

/// Longest name or file name read, in characters.
const MAX_NAME_CHARS: u64 = 4096;
/// Longest line table read.
const MAX_LINETABLE_BYTES: u64 = 1 << 20;

/// What a frame needs of its code object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Code {
    pub qualname: Option<String>,
    pub filename: Option<String>,
    first_line: i32,
    linetable: Vec<u8>,
    /// The address of the first code unit (`co_code_adaptive`).
    code_start: u64,
    /// Code units before the first that a traceback shows (`_co_firsttraceable`).
    first_traceable: u64,
}

impl Code {
    /// The code object at `addr`; `None` when it cannot be read or is not a code object
    /// (`code_type`, the address of `PyCode_Type`, when known).
    pub fn read(
        mem: &impl Memory,
        offsets: &Offsets,
        addr: u64,
        code_type: Option<u64>,
    ) -> Option<Self> {
        if let Some(code_type) = code_type
            && mem.u64_at(addr.checked_add(OB_TYPE)?)? != code_type
        {
            return None;
        }
        let at = |offset: u64| addr.checked_add(offset);
        let o = &offsets.code;
        let linetable = bytes(mem, mem.u64_at(at(o.linetable)?)?).unwrap_or_default();
        Some(Self {
            qualname: mem
                .u64_at(at(o.qualname)?)
                .and_then(|s| string(mem, offsets, s)),
            filename: mem
                .u64_at(at(o.filename)?)
                .and_then(|s| string(mem, offsets, s)),
            first_line: mem.i32_at(at(o.firstlineno)?)?,
            linetable,
            code_start: at(o.code_adaptive)?,
            first_traceable: u64::try_from(mem.i32_at(at(o.firsttraceable)?)?).ok()?,
        })
    }

    /// The index of the code unit that `instr` (a frame's instruction pointer) designates;
    /// `None` for a frame that has not started running its code (CPython's "incomplete"
    /// frames, which tracebacks skip too).
    /// 3.11 and 3.12 point at the code unit before the next instruction (`prev_instr`), 3.13 at
    /// the instruction running (`instr_ptr`): either way CPython's own `lasti` is the index of
    /// the unit pointed at (`_PyInterpreterFrame_LASTI`), and its line is the line shown.
    pub fn lasti(&self, instr: u64) -> Option<u64> {
        if instr < self.code_start {
            return None;
        }
        let lasti = (instr - self.code_start) / 2;
        (lasti >= self.first_traceable).then_some(lasti)
    }

    /// The line of the code unit `lasti`.
    pub fn line(&self, lasti: u64) -> Option<u32> {
        linetable::line_at(&self.linetable, self.first_line, lasti.checked_mul(2)?)
    }
}

/// A bytes object's contents.
fn bytes(mem: &impl Memory, addr: u64) -> Option<Vec<u8>> {
    let len = mem.u64_at(addr.checked_add(OB_SIZE)?)?;
    if len > MAX_LINETABLE_BYTES {
        return None;
    }
    let mut buf = vec![0; usize::try_from(len).ok()?];
    mem.read(addr.checked_add(BYTES_DATA)?, &mut buf)
        .then_some(buf)
}

/// A compact str object's text (every identifier and file name is compact).
fn string(mem: &impl Memory, offsets: &Offsets, addr: u64) -> Option<String> {
    let len = mem.u64_at(addr.checked_add(UNICODE_LENGTH)?)?;
    let state = mem.i32_at(addr.checked_add(UNICODE_STATE)?)? as u32;
    let kind = (state >> 2) & 7;
    let compact = (state >> 5) & 1 == 1;
    let ascii = (state >> 6) & 1 == 1;
    if !compact || len > MAX_NAME_CHARS || !matches!(kind, 1 | 2 | 4) {
        return None;
    }
    let data = addr.checked_add(if ascii {
        offsets.ascii_bytes
    } else {
        offsets.compact_unicode_bytes
    })?;
    let mut buf = vec![0; usize::try_from(len * u64::from(kind)).ok()?];
    if !mem.read(data, &mut buf) {
        return None;
    }
    match kind {
        1 if ascii => String::from_utf8(buf).ok(),
        1 => Some(buf.iter().map(|&b| char::from(b)).collect()),
        2 => char::decode_utf16(
            buf.chunks_exact(2)
                .map(|c| u16::from_ne_bytes([c[0], c[1]])),
        )
        .collect::<Result<_, _>>()
        .ok(),
        _ => buf
            .chunks_exact(4)
            .map(|c| char::from_u32(u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::stacks::python::layout::Version;

    /// Memory made of a few regions.
    #[derive(Default)]
    pub(crate) struct FakeMemory(pub BTreeMap<u64, Vec<u8>>);

    impl FakeMemory {
        pub(crate) fn put(&mut self, addr: u64, bytes: &[u8]) {
            self.0.insert(addr, bytes.to_vec());
        }

        pub(crate) fn put_u64(&mut self, addr: u64, v: u64) {
            self.put(addr, &v.to_ne_bytes());
        }

        pub(crate) fn put_i32(&mut self, addr: u64, v: i32) {
            self.put(addr, &v.to_ne_bytes());
        }

        /// A compact ASCII str at `addr`.
        pub(crate) fn put_ascii(&mut self, offsets: &Offsets, addr: u64, text: &str) {
            self.put_u64(addr + UNICODE_LENGTH, text.len() as u64);
            // interned 0, kind 1, compact, ascii.
            self.put_i32(addr + UNICODE_STATE, (1 << 2) | (1 << 5) | (1 << 6));
            self.put(addr + offsets.ascii_bytes, text.as_bytes());
        }

        /// A code object at `addr`, its strings and line table after it.
        pub(crate) fn put_code(
            &mut self,
            offsets: &Offsets,
            addr: u64,
            (qualname, filename, first_line, table): (&str, &str, i32, &[u8]),
        ) {
            let o = offsets.code;
            self.put_u64(addr + OB_TYPE, 0xc0de);
            self.put_u64(addr + o.qualname, addr + 0x1000);
            self.put_ascii(offsets, addr + 0x1000, qualname);
            self.put_u64(addr + o.filename, addr + 0x2000);
            self.put_ascii(offsets, addr + 0x2000, filename);
            self.put_u64(addr + o.linetable, addr + 0x3000);
            self.put_u64(addr + 0x3000 + OB_SIZE, table.len() as u64);
            self.put(addr + 0x3000 + BYTES_DATA, table);
            self.put_i32(addr + o.firstlineno, first_line);
            self.put_i32(addr + o.firsttraceable, 1);
        }
    }

    impl Memory for FakeMemory {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            // Each read must lie inside one region.
            let Some((&start, bytes)) = self.0.range(..=addr).next_back() else {
                return false;
            };
            let from = (addr - start) as usize;
            let Some(src) = bytes.get(from..from + buf.len()) else {
                return false;
            };
            buf.copy_from_slice(src);
            true
        }
    }

    const TABLE: &[u8] = b"\x80\x00\xd8\x08\t\x80A\xd8\x0b\x0c\x80H";

    #[test]
    fn a_code_object_names_its_function_file_and_lines() {
        let offsets = Version::V3_11.header_tables(0).unwrap();
        let mut mem = FakeMemory::default();
        mem.put_code(&offsets, 0x10_0000, ("Cache.put", "/srv/app.py", 2, TABLE));
        let code = Code::read(&mem, &offsets, 0x10_0000, Some(0xc0de)).unwrap();
        assert_eq!(code.qualname.as_deref(), Some("Cache.put"));
        assert_eq!(code.filename.as_deref(), Some("/srv/app.py"));
        let start = 0x10_0000 + offsets.code.code_adaptive;
        // prev_instr at the second code unit (LOAD_CONST on line 3).
        let lasti = code.lasti(start + 2).unwrap();
        assert_eq!(code.line(lasti), Some(3));
        // Before the first traceable unit: an incomplete frame.
        assert_eq!(code.lasti(start), None);
        assert_eq!(code.lasti(start - 2), None);
        // Another type: not a code object.
        assert_eq!(Code::read(&mem, &offsets, 0x10_0000, Some(0xbad)), None);
    }

    #[test]
    fn damaged_code_objects_are_not_named_and_never_panic() {
        let offsets = Version::V3_12.header_tables(0).unwrap();
        let mut mem = FakeMemory::default();
        // Nothing there.
        assert_eq!(Code::read(&mem, &offsets, 0x5000, None), None);
        assert_eq!(Code::read(&mem, &offsets, u64::MAX - 4, None), None);
        // Names that are not compact strings, a huge length, a line table too long.
        mem.put_code(&offsets, 0x10_0000, ("f", "x.py", 1, TABLE));
        mem.put_i32(0x10_1000 + UNICODE_STATE, 0);
        mem.put_u64(0x10_2000 + UNICODE_LENGTH, u64::MAX);
        mem.put_u64(0x10_3000 + OB_SIZE, u64::MAX);
        let code = Code::read(&mem, &offsets, 0x10_0000, None).unwrap();
        assert_eq!(code.qualname, None);
        assert_eq!(code.filename, None);
        assert_eq!(code.line(1), None);
        // Non-ASCII names: latin-1 and UCS-4 kinds.
        let mut mem = FakeMemory::default();
        mem.put_u64(0x100 + UNICODE_LENGTH, 2);
        mem.put_i32(0x100 + UNICODE_STATE, (1 << 2) | (1 << 5));
        mem.put(0x100 + offsets.compact_unicode_bytes, &[0xe9, b'x']);
        assert_eq!(string(&mem, &offsets, 0x100).as_deref(), Some("éx"));
        mem.put_u64(0x900 + UNICODE_LENGTH, 1);
        mem.put_i32(0x900 + UNICODE_STATE, (4 << 2) | (1 << 5));
        mem.put(
            0x900 + offsets.compact_unicode_bytes,
            &0x1f40d_u32.to_ne_bytes(),
        );
        assert_eq!(string(&mem, &offsets, 0x900).as_deref(), Some("🐍"));
        // A surrogate in UCS-4: no name.
        mem.put(
            0x900 + offsets.compact_unicode_bytes,
            &0xd800_u32.to_ne_bytes(),
        );
        assert_eq!(string(&mem, &offsets, 0x900), None);
    }
}
