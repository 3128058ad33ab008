//! Where each CPython version keeps what leaktrace reads: the offsets the BPF frame walk needs
//! ([`PyLayout`]) and those user space needs to name a code object.
//!
//! Source of every number below: `offsetof`/`sizeof` compiled against each version's own
//! headers with `Py_BUILD_CORE` (`Include/internal/pycore_runtime.h`, `pycore_interp.h`,
//! `pycore_frame.h`, `Include/cpython/code.h`, `cpython/pystate.h`, `cpython/unicodeobject.h`,
//! `cpython/bytesobject.h`): `tests/fixtures/python_offsets.c`, which the integration tests
//! compile against the headers found on the machine (Debian's 3.11.2 in
//! `/usr/include/python3.11`, pyenv's 3.11.7, 3.12.1 and 3.13.0) and compare with these
//! tables. Within a minor version the layouts do not change (CPython keeps them for its own
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

    /// The offsets of this version, with `_PyRuntime` at `runtime_addr`.
    pub fn offsets(self, runtime_addr: u64) -> Offsets {
        match self {
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
            Self::V3_13 => Offsets {
                walk: PyLayout {
                    runtime_addr,
                    runtime_interpreters_head: 632,
                    interp_threads_head: 7344,
                    tstate_next: 8,
                    tstate_native_thread_id: 160,
                    tstate_frame: 72,
                    cframe_current_frame: NO_CFRAME,
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
                    firsttraceable: 184,
                    code_adaptive: 200,
                },
                ascii_bytes: 40,
                compact_unicode_bytes: 56,
            },
        }
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
        for v in [Version::V3_11, Version::V3_12, Version::V3_13] {
            assert!(v.offsets(0).walk.frame_offsets_fit(), "{v:?}");
        }
    }
}
