//! Where each CPython version keeps what leaktrace reads: the offsets the BPF frame walk needs
//! ([`PyLayout`]) and those user space needs to name a code object.
//!
//! 3.13 describes itself: `_PyRuntime` begins with `_Py_DebugOffsets` (cookie `xdebugpy`, the
//! version, then sections of offsets, written by the interpreter's own build for out-of-process
//! debuggers), read by [`Offsets::from_debug_offsets`]. 3.11 and 3.12 do not: for them the
//! tables of [`Version::header_tables`] are the fallback.
//!
//! Source of every number in those tables: `offsetof`/`sizeof` compiled against each version's own
//! headers with `Py_BUILD_CORE` (`Include/internal/pycore_runtime.h`, `pycore_interp.h`,
//! `pycore_frame.h`, `Include/cpython/code.h`, `cpython/pystate.h`, `cpython/unicodeobject.h`,
//! `cpython/bytesobject.h`): `tests/fixtures/python_offsets.c`, which a test of this module
//! compiles against the headers found on the machine (Debian's 3.11 in
//! `/usr/include/python3.11`, always; pyenv's 3.11, 3.12 and 3.13 where installed) and
//! compares with these tables, and with what 3.13 says of itself. Within a minor version the layouts do not change (CPython keeps them for its own
//! out-of-process tools); across minor versions they do, so an unknown version gets no
//! Python frames rather than wrong ones.

use leaktrace_common::python::{NO_CFRAME, PyLayout};

/// A CPython minor version leaktrace knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V3_11,
    V3_12,
    V3_13,
}

impl Version {
    /// From `Py_Version` (`PY_VERSION_HEX`: 0x030b02f0 is 3.11.2 final).
    pub fn from_hex(hex: u64) -> Option<Self> {
        match (hex >> 24, (hex >> 16) & 0xff) {
            (3, 11) => Some(Self::V3_11),
            (3, 12) => Some(Self::V3_12),
            (3, 13) => Some(Self::V3_13),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::V3_11 => "3.11",
            Self::V3_12 => "3.12",
            Self::V3_13 => "3.13",
        }
    }

    /// Whether the interpreter describes its own layout in `_Py_DebugOffsets`.
    pub fn has_debug_offsets(self) -> bool {
        self == Self::V3_13
    }

    /// The offsets of this version from the tables compiled against its headers, with
    /// `_PyRuntime` at `runtime_addr`; `None` for a version that describes itself (3.13: see
    /// [`Offsets::from_debug_offsets`]).
    pub fn header_tables(self, runtime_addr: u64) -> Option<Offsets> {
        Some(match self {
            Self::V3_11 => Offsets {
                walk: PyLayout {
                    runtime_addr,
                    runtime_interpreters_head: 40,
                    interp_threads_head: 16,
                    tstate_next: 8,
                    tstate_native_thread_id: 160,
                    tstate_frame: 56,
                    cframe_current_frame: 8,
                    frame_previous: 48,
                    frame_code: 32,
                    frame_instr: 56,
                    // is_entry at 68, owner at 69.
                    frame_flags: 68,
                    code_linetable: 136,
                },
                marker: Marker::IsEntry { byte: 0 },
                owner_byte: 1,
                code: CodeOffsets {
                    filename: 112,
                    qualname: 128,
                    linetable: 136,
                    firstlineno: 72,
                    firsttraceable: 168,
                    code_adaptive: 184,
                },
                ascii_bytes: 48,
                compact_unicode_bytes: 72,
            },
            Self::V3_12 => Offsets {
                walk: PyLayout {
                    runtime_addr,
                    runtime_interpreters_head: 40,
                    interp_threads_head: 72,
                    tstate_next: 8,
                    tstate_native_thread_id: 144,
                    tstate_frame: 56,
                    cframe_current_frame: 0,
                    frame_previous: 8,
                    frame_code: 0,
                    frame_instr: 56,
                    // owner at 70.
                    frame_flags: 68,
                    code_linetable: 136,
                },
                marker: Marker::CStackOwner,
                owner_byte: 2,
                code: CodeOffsets {
                    filename: 112,
                    qualname: 128,
                    linetable: 136,
                    firstlineno: 68,
                    firsttraceable: 176,
                    code_adaptive: 192,
                },
                ascii_bytes: 40,
                compact_unicode_bytes: 56,
            },
            Self::V3_13 => return None,
        })
    }
}

/// The bytes of 3.13's `_Py_DebugOffsets` (`Include/internal/pycore_runtime.h`): the cookie, then
/// 72 `uint64_t`s. Its layout changes between minor versions (3.14 added sections), so it is
/// read only for the version whose layout this is.
pub const DEBUG_OFFSETS_BYTES: usize = 8 + 72 * 8;
/// `_Py_Debug_Cookie`.
pub const DEBUG_COOKIE: &[u8; 8] = b"xdebugpy";

/// Why `_Py_DebugOffsets` cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DebugOffsetsError {
    #[error("its _Py_DebugOffsets is missing or cut short")]
    Short,
    #[error("its _PyRuntime does not begin with the cookie \"xdebugpy\"")]
    Cookie,
    #[error("its _Py_DebugOffsets is of version {found:#x}, not Py_Version {want:#x}")]
    Version { found: u64, want: u64 },
    #[error("it is a free-threaded build, whose frames leaktrace cannot walk")]
    FreeThreaded,
    #[error("its _Py_DebugOffsets gives offsets beyond what the frame walk reads")]
    Unfit,
}

impl Offsets {
    /// The offsets a 3.13 interpreter gives of itself in `bytes`, the start of its `_PyRuntime`
    /// (`_Py_DebugOffsets`), with `_PyRuntime` at `runtime_addr`; `py_version` is its
    /// `Py_Version`, which the offsets must be of.
    pub fn from_debug_offsets(
        bytes: &[u8],
        py_version: u64,
        runtime_addr: u64,
    ) -> Result<Self, DebugOffsetsError> {
        let bytes = bytes
            .get(..DEBUG_OFFSETS_BYTES)
            .ok_or(DebugOffsetsError::Short)?;
        if &bytes[..8] != DEBUG_COOKIE {
            return Err(DebugOffsetsError::Cookie);
        }
        // Field `i` of the struct after the cookie.
        let field = |i: usize| {
            let at = 8 + i * 8;
            u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default())
        };
        let version = field(0);
        // The release level and serial (the low 16 bits) may differ: the layout is the
        // minor version's.
        if version >> 16 != py_version >> 16 {
            return Err(DebugOffsetsError::Version {
                found: version,
                want: py_version,
            });
        }
        if field(1) != 0 {
            return Err(DebugOffsetsError::FreeThreaded);
        }
        // Indices of the fields used, in the order of the header's sections: runtime_state
        // (size, finalizing, interpreters_head), interpreter_state (size, id, next,
        // threads_head, ...), thread_state (size, prev, next, interp, current_frame,
        // thread_id, native_thread_id, ...), interpreter_frame (size, previous, executable,
        // instr_ptr, localsplus, owner), code_object (size, filename, name, qualname,
        // linetable, firstlineno, argcount, localsplusnames, localspluskinds,
        // co_code_adaptive), ..., unicode_object (size, state, length, asciiobject_size).
        let owner = field(32);
        let code_adaptive = field(42);
        let ascii_bytes = field(69);
        let offsets = Self {
            walk: PyLayout {
                runtime_addr,
                runtime_interpreters_head: field(4),
                interp_threads_head: field(8),
                tstate_next: field(20),
                tstate_native_thread_id: field(24),
                tstate_frame: field(22),
                cframe_current_frame: NO_CFRAME,
                frame_previous: field(28),
                frame_code: field(29),
                frame_instr: field(30),
                // The 4-byte word that holds `owner`, which the BPF walk reads whole.
                frame_flags: owner & !3,
                code_linetable: field(37),
            },
            marker: Marker::CStackOwner,
            owner_byte: (owner & 3) as u8,
            code: CodeOffsets {
                filename: field(34),
                qualname: field(36),
                linetable: field(37),
                firstlineno: field(38),
                // Not described: in 3.13's `PyCodeObject`, `int _co_firsttraceable` and
                // `void *co_extra` come right before `co_code_adaptive`.
                firsttraceable: code_adaptive.wrapping_sub(16),
                code_adaptive,
            },
            ascii_bytes,
            // Not described: `PyCompactUnicodeObject` is `PyASCIIObject`, `utf8_length`
            // and `utf8`.
            compact_unicode_bytes: ascii_bytes.wrapping_add(16),
        };
        // Anything a code object or a string is read at stays within a page of its start.
        let sane = |v: u64| v < 4096;
        let named = [
            offsets.code.filename,
            offsets.code.qualname,
            offsets.code.linetable,
            offsets.code.firstlineno,
            offsets.code.firsttraceable,
            offsets.code.code_adaptive,
            offsets.ascii_bytes,
            offsets.compact_unicode_bytes,
        ];
        if !offsets.walk.frame_offsets_fit() || !named.into_iter().all(sane) {
            return Err(DebugOffsetsError::Unfit);
        }
        Ok(offsets)
    }
}

/// `FRAME_OWNED_BY_GENERATOR` in every version here (`enum _frameowner`).
pub const OWNED_BY_GENERATOR: u8 = 1;
/// `FRAME_OWNED_BY_CSTACK` (3.12+): the shim frame each C call of the evaluation loop links
/// into the chain below the frames it runs.
pub const OWNED_BY_CSTACK: u8 = 3;

/// How the frames that one C call of `_PyEval_EvalFrameDefault` runs are told from the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marker {
    /// 3.11: the outermost frame of each C call has `is_entry` set (this byte of the flags).
    IsEntry { byte: u8 },
    /// 3.12+: each C call's frames are followed by a shim frame owned by the C stack.
    CStackOwner,
}

/// Offsets into `PyCodeObject`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeOffsets {
    pub filename: u64,
    pub qualname: u64,
    pub linetable: u64,
    pub firstlineno: u64,
    pub firsttraceable: u64,
    pub code_adaptive: u64,
}

/// Everything version-specific.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    pub walk: PyLayout,
    pub marker: Marker,
    /// The byte of the flags that holds `owner`.
    pub owner_byte: u8,
    pub code: CodeOffsets,
    /// `sizeof(PyASCIIObject)`: where a compact ASCII string's characters start.
    pub ascii_bytes: u64,
    /// `sizeof(PyCompactUnicodeObject)`: where a compact non-ASCII string's start.
    pub compact_unicode_bytes: u64,
}

/// `ob_type` in every object.
pub const OB_TYPE: u64 = 8;
/// `PyVarObject.ob_size`: a bytes object's length.
pub const OB_SIZE: u64 = 16;
/// `PyBytesObject.ob_sval`.
pub const BYTES_DATA: u64 = 32;
/// `PyASCIIObject.length` and `.state` (the same in 3.11 to 3.13).
pub const UNICODE_LENGTH: u64 = 16;
pub const UNICODE_STATE: u64 = 32;

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn versions_come_from_py_version() {
        assert_eq!(Version::from_hex(0x030b_02f0), Some(Version::V3_11));
        assert_eq!(Version::from_hex(0x030c_01f0), Some(Version::V3_12));
        assert_eq!(Version::from_hex(0x030d_00f0), Some(Version::V3_13));
        assert_eq!(Version::from_hex(0x030e_00f0), None);
        assert_eq!(Version::from_hex(0x030a_0df0), None);
        assert_eq!(Version::from_hex(0), None);
    }

    #[test]
    fn every_table_fits_the_bpf_walk() {
        for v in [Version::V3_11, Version::V3_12] {
            assert!(
                v.header_tables(0).unwrap().walk.frame_offsets_fit(),
                "{v:?}"
            );
            assert!(!v.has_debug_offsets());
        }
        assert!(Version::V3_13.header_tables(0).is_none());
        assert!(Version::V3_13.has_debug_offsets());
    }

    /// `_Py_DebugOffsets` as pyenv's 3.13.0 (`libpython3.13.so.1.0`) has it at `_PyRuntime`.
    const PY_3_13_0: [u64; 72] = [
        0x030d_00f0,
        0,
        283_320,
        608,
        632,
        194_968,
        7272,
        7264,
        7344,
        7400,
        7656,
        7640,
        7648,
        16,
        7752,
        0,
        7768,
        7760,
        304,
        0,
        8,
        16,
        72,
        152,
        160,
        232,
        32,
        80,
        8,
        0,
        56,
        72,
        70,
        208,
        112,
        120,
        128,
        136,
        68,
        52,
        96,
        104,
        200,
        16,
        8,
        416,
        24,
        88,
        168,
        32,
        24,
        16,
        40,
        24,
        16,
        48,
        32,
        40,
        24,
        16,
        32,
        16,
        24,
        40,
        16,
        32,
        64,
        32,
        16,
        40,
        240,
        200,
    ];

    fn debug_offsets(fields: &[u64; 72]) -> Vec<u8> {
        let mut bytes = DEBUG_COOKIE.to_vec();
        bytes.extend(fields.iter().flat_map(|f| f.to_le_bytes()));
        bytes
    }

    #[test]
    fn python_3_13_describes_the_layout_its_headers_give() {
        let bytes = debug_offsets(&PY_3_13_0);
        let offsets = Offsets::from_debug_offsets(&bytes, 0x030d_00f0, 0x1234).unwrap();
        // What `offsetof`/`sizeof` against pyenv's 3.13.0 headers gave
        // (tests/fixtures/python_offsets.c).
        let headers = Offsets {
            walk: PyLayout {
                runtime_addr: 0x1234,
                runtime_interpreters_head: 632,
                interp_threads_head: 7344,
                tstate_next: 8,
                tstate_native_thread_id: 160,
                tstate_frame: 72,
                cframe_current_frame: NO_CFRAME,
                frame_previous: 8,
                frame_code: 0,
                frame_instr: 56,
                frame_flags: 68,
                code_linetable: 136,
            },
            marker: Marker::CStackOwner,
            owner_byte: 2,
            code: CodeOffsets {
                filename: 112,
                qualname: 128,
                linetable: 136,
                firstlineno: 68,
                firsttraceable: 184,
                code_adaptive: 200,
            },
            ascii_bytes: 40,
            compact_unicode_bytes: 56,
        };
        assert_eq!(offsets, headers);
        // A later patch release of the same minor version has the same layout.
        assert!(Offsets::from_debug_offsets(&bytes, 0x030d_05f0, 0).is_ok());
    }

    #[test]
    fn damaged_or_foreign_debug_offsets_are_refused() {
        let good = debug_offsets(&PY_3_13_0);
        let refused = |bytes: &[u8]| Offsets::from_debug_offsets(bytes, 0x030d_00f0, 0);
        assert_eq!(refused(&[]), Err(DebugOffsetsError::Short));
        assert_eq!(
            refused(&good[..good.len() - 1]),
            Err(DebugOffsetsError::Short)
        );
        let mut cookie = good.clone();
        cookie[0] = b'y';
        assert_eq!(refused(&cookie), Err(DebugOffsetsError::Cookie));
        let mut fields = PY_3_13_0;
        fields[0] = 0x030e_00f0;
        assert!(matches!(
            refused(&debug_offsets(&fields)),
            Err(DebugOffsetsError::Version { .. })
        ));
        let mut fields = PY_3_13_0;
        fields[1] = 1;
        assert_eq!(
            refused(&debug_offsets(&fields)),
            Err(DebugOffsetsError::FreeThreaded)
        );
        // An owner byte beyond the part of a frame the BPF walk reads, an instruction
        // pointer that is not a word, a code object field far outside the object.
        for (i, bad) in [(32, 4094), (30, 57), (34, u64::MAX), (42, 3)] {
            let mut fields = PY_3_13_0;
            fields[i] = bad;
            assert_eq!(
                refused(&debug_offsets(&fields)),
                Err(DebugOffsetsError::Unfit),
                "field {i} = {bad}"
            );
        }
        // Longer is fine: `_PyRuntime` goes on after it.
        let mut longer = good;
        longer.extend([0xff; 64]);
        assert!(refused(&longer).is_ok());
    }

    /// `tests/fixtures/python_offsets.c` compiled against the headers in `include` and run:
    /// each `struct.field offset` line, and the two sizes.
    fn offsets_from_headers(include: &str) -> HashMap<String, u64> {
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/python_offsets.c"
        );
        let exe = std::env::temp_dir().join(format!(
            "leaktrace-python-offsets-{}-{}",
            std::process::id(),
            include.replace('/', "_")
        ));
        let built = std::process::Command::new("gcc")
            .arg(format!("-I{include}"))
            .arg("-o")
            .arg(&exe)
            .arg(fixture)
            .output()
            .unwrap();
        assert!(built.status.success(), "{built:?}");
        let out = std::process::Command::new(&exe).output().unwrap();
        let _ = std::fs::remove_file(&exe);
        let mut found = HashMap::new();
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["sizeof", ascii, a, compact, c] => {
                    found.insert((*ascii).to_owned(), a.parse().unwrap());
                    found.insert((*compact).to_owned(), c.parse().unwrap());
                }
                [field, offset] => {
                    found.insert((*field).to_owned(), offset.parse().unwrap());
                }
                _ => panic!("unexpected line {line:?}"),
            }
        }
        found
    }

    /// What the headers say, as the offsets leaktrace uses.
    fn assert_headers_give(include: &str, version: Version, offsets: &Offsets) {
        let h = offsets_from_headers(include);
        let at = |name: &str| *h.get(name).unwrap_or_else(|| panic!("{name} in {h:?}"));
        let o = offsets;
        let w = &o.walk;
        assert_eq!(
            w.runtime_interpreters_head,
            at("_PyRuntimeState.interpreters.head")
        );
        assert_eq!(w.interp_threads_head, at("PyInterpreterState.threads.head"));
        assert_eq!(w.tstate_next, at("PyThreadState.next"));
        assert_eq!(
            w.tstate_native_thread_id,
            at("PyThreadState.native_thread_id")
        );
        assert_eq!(w.frame_previous, at("_PyInterpreterFrame.previous"));
        let owner = at("_PyInterpreterFrame.owner");
        assert_eq!(w.frame_flags + u64::from(o.owner_byte), owner);
        if version == Version::V3_13 {
            assert_eq!(w.tstate_frame, at("PyThreadState.current_frame"));
            assert_eq!(w.cframe_current_frame, NO_CFRAME);
            assert_eq!(w.frame_code, at("_PyInterpreterFrame.f_executable"));
            assert_eq!(w.frame_instr, at("_PyInterpreterFrame.instr_ptr"));
        } else {
            assert_eq!(w.tstate_frame, at("PyThreadState.cframe"));
            assert_eq!(w.cframe_current_frame, at("_PyCFrame.current_frame"));
            assert_eq!(w.frame_code, at("_PyInterpreterFrame.f_code"));
            assert_eq!(w.frame_instr, at("_PyInterpreterFrame.prev_instr"));
        }
        if version == Version::V3_11 {
            let Marker::IsEntry { byte } = o.marker else {
                panic!("3.11 marks entry frames: {:?}", o.marker);
            };
            assert_eq!(
                w.frame_flags + u64::from(byte),
                at("_PyInterpreterFrame.is_entry")
            );
        } else {
            assert_eq!(o.marker, Marker::CStackOwner);
        }
        assert_eq!(w.code_linetable, at("PyCodeObject.co_linetable"));
        assert_eq!(o.code.linetable, at("PyCodeObject.co_linetable"));
        assert_eq!(o.code.filename, at("PyCodeObject.co_filename"));
        assert_eq!(o.code.qualname, at("PyCodeObject.co_qualname"));
        assert_eq!(o.code.firstlineno, at("PyCodeObject.co_firstlineno"));
        assert_eq!(o.code.firsttraceable, at("PyCodeObject._co_firsttraceable"));
        assert_eq!(o.code.code_adaptive, at("PyCodeObject.co_code_adaptive"));
        assert_eq!(o.ascii_bytes, at("PyASCIIObject"));
        assert_eq!(o.compact_unicode_bytes, at("PyCompactUnicodeObject"));
        assert_eq!(OB_TYPE, at("PyObject.ob_type"));
        assert_eq!(OB_SIZE, at("PyVarObject.ob_size"));
        assert_eq!(BYTES_DATA, at("PyBytesObject.ob_sval"));
        assert_eq!(UNICODE_LENGTH, at("PyASCIIObject.length"));
        assert_eq!(UNICODE_STATE, at("PyASCIIObject.state"));
    }

    #[test]
    fn the_tables_and_3_13_s_own_description_are_what_the_headers_say() {
        let debian = "/usr/include/python3.11";
        if std::path::Path::new(debian).join("Python.h").exists() {
            let tables = Version::V3_11.header_tables(0).unwrap();
            assert_headers_give(debian, Version::V3_11, &tables);
        } else {
            assert!(
                std::env::var_os("CI").is_none(),
                "{debian} is missing: `cargo xtask setup` installs libpython3.11-dev"
            );
        }
        let pyenv = |version: &str, minor: &str| {
            let include = format!("/root/.pyenv/versions/{version}/include/python{minor}");
            let found = std::path::Path::new(&include).join("Python.h").exists();
            if !found {
                eprintln!("skipped: {include} is not installed");
            }
            found.then_some(include)
        };
        for (version, minor, v) in [
            ("3.11.7", "3.11", Version::V3_11),
            ("3.12.1", "3.12", Version::V3_12),
        ] {
            if let Some(include) = pyenv(version, minor) {
                assert_headers_give(&include, v, &v.header_tables(0).unwrap());
            }
        }
        if let Some(include) = pyenv("3.13.0", "3.13") {
            let described =
                Offsets::from_debug_offsets(&debug_offsets(&PY_3_13_0), 0x030d_00f0, 0).unwrap();
            assert_headers_give(&include, Version::V3_13, &described);
        }
    }
}
