//! Decoding of the ring buffer records that `leaktrace-ebpf` writes.

use std::mem::{offset_of, size_of};

use leaktrace_common::{
    ALLOC_EVENT_HEADER_BYTES, AllocEvent, AllocStackEvent, EVENT_ALLOC, EVENT_ALLOC_STACK,
    EVENT_FREE, EVENT_UNMAP, FreeEvent, MAX_STACK_DEPTH, UnmapEvent, UserRegs, call, is_heap_call,
};

use crate::{
    model::event::{Backing, Event, MapSource},
    stacks::unwind::UserStack,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is too short")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("stack of {0} bytes does not fit the record")]
    BadStack(u32),
    #[error("unknown allocator call {0}")]
    UnknownCall(u32),
    #[error("stack copy of {0} bytes does not fit the record")]
    BadStackCopy(u32),
}

/// Where an `AllocStackEvent`'s fields sit (the same for every size: the stack comes last).
const REGS_AT: usize = offset_of!(AllocStackEvent<0>, regs);
const COPY_BYTES_AT: usize = offset_of!(AllocStackEvent<0>, stack_copy_bytes);
const STACK_AT: usize = offset_of!(AllocStackEvent<0>, stack);

/// The registers and stack copy of an `EVENT_ALLOC_STACK` record; `None` for every other
/// kind. The rest of the record decodes with [`decode`].
pub fn user_stack(bytes: &[u8]) -> Result<Option<UserStack<'_>>, DecodeError> {
    if bytes.len() < 4 || u32_at(bytes, 0) != EVENT_ALLOC_STACK {
        return Ok(None);
    }
    if bytes.len() < STACK_AT {
        return Err(DecodeError::Short(bytes.len()));
    }
    let copied = u32_at(bytes, COPY_BYTES_AT);
    let stack = usize::try_from(copied)
        .ok()
        .and_then(|n| bytes.get(STACK_AT..STACK_AT.checked_add(n)?))
        .ok_or(DecodeError::BadStackCopy(copied))?;
    Ok(Some(UserStack {
        ts_ns: u64_at(bytes, offset_of!(AllocEvent, ts_ns)),
        ip: u64_at(bytes, REGS_AT + offset_of!(UserRegs, ip)),
        sp: u64_at(bytes, REGS_AT + offset_of!(UserRegs, sp)),
        bp: u64_at(bytes, REGS_AT + offset_of!(UserRegs, bp)),
        stack,
    }))
}

/// `bytes` as return addresses: borrowed when aligned, else copied into `scratch`.
fn frames_of<'a>(bytes: &'a [u8], scratch: &'a mut Vec<u64>) -> &'a [u64] {
    // SAFETY: every bit pattern is a valid u64; align_to only reinterprets the aligned middle.
    let (head, words, tail) = unsafe { bytes.align_to::<u64>() };
    if head.is_empty() && tail.is_empty() {
        return words;
    }
    scratch.clear();
    scratch.extend(
        bytes
            .chunks_exact(8)
            .map(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes"))),
    );
    scratch
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_ne_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes"))
}

/// The process (tgid) a record came from: every record has the `pid_tgid` of the thread that
/// made the call at the same offset.
pub fn tgid_of(bytes: &[u8]) -> Option<u32> {
    const AT: usize = offset_of!(FreeEvent, pid_tgid);
    const _: () = assert!(AT == offset_of!(AllocEvent, pid_tgid));
    (bytes.len() >= AT + 8).then(|| (u64_at(bytes, AT) >> 32) as u32)
}

/// The thread (`pid_tgid`) whose call a record reports.
pub fn pid_tgid_of(bytes: &[u8]) -> Option<u64> {
    const AT: usize = offset_of!(FreeEvent, pid_tgid);
    (bytes.len() >= AT + 8).then(|| u64_at(bytes, AT))
}

/// Decodes one record. The frames are borrowed from it when they are aligned for `u64`, as in
/// the ring buffer (its records start 8-byte aligned); copied into `scratch` otherwise.
pub fn decode<'a>(bytes: &'a [u8], scratch: &'a mut Vec<u64>) -> Result<Event<'a>, DecodeError> {
    if bytes.len() < 4 {
        return Err(DecodeError::Short(bytes.len()));
    }
    match u32_at(bytes, 0) {
        EVENT_FREE => {
            if bytes.len() < size_of::<FreeEvent>() {
                return Err(DecodeError::Short(bytes.len()));
            }
            Ok(Event::Free {
                addr: u64_at(bytes, offset_of!(FreeEvent, addr)),
            })
        }
        EVENT_UNMAP => {
            if bytes.len() < size_of::<UnmapEvent>() {
                return Err(DecodeError::Short(bytes.len()));
            }
            Ok(Event::Unmap {
                ts_ns: u64_at(bytes, offset_of!(UnmapEvent, ts_ns)),
                addr: u64_at(bytes, offset_of!(UnmapEvent, addr)),
                size_bytes: u64_at(bytes, offset_of!(UnmapEvent, size_bytes)),
            })
        }
        // An allocation is cut after its frames; a record with a stack copy starts with a
        // whole AllocEvent.
        kind @ (EVENT_ALLOC | EVENT_ALLOC_STACK) => {
            let least = if kind == EVENT_ALLOC {
                ALLOC_EVENT_HEADER_BYTES
            } else {
                size_of::<AllocEvent>()
            };
            if bytes.len() < least {
                return Err(DecodeError::Short(bytes.len()));
            }
            let stack_bytes = u32_at(bytes, offset_of!(AllocEvent, stack_bytes));
            let depth = stack_bytes as usize / 8;
            if !stack_bytes.is_multiple_of(8)
                || depth > MAX_STACK_DEPTH
                || ALLOC_EVENT_HEADER_BYTES + stack_bytes as usize > bytes.len()
            {
                return Err(DecodeError::BadStack(stack_bytes));
            }
            let frames_at = offset_of!(AllocEvent, frames);
            let ts_ns = u64_at(bytes, offset_of!(AllocEvent, ts_ns));
            let addr = u64_at(bytes, offset_of!(AllocEvent, addr));
            let size_bytes = u64_at(bytes, offset_of!(AllocEvent, size_bytes));
            let old_addr = u64_at(bytes, offset_of!(AllocEvent, old_addr));
            let entry_ts_ns = u64_at(bytes, offset_of!(AllocEvent, entry_ts_ns));
            let truncated = u32_at(bytes, offset_of!(AllocEvent, stack_truncated)) != 0;
            let remap = |old_kept| MapSource::Remap {
                old_addr,
                old_size_bytes: u64_at(bytes, offset_of!(AllocEvent, old_size_bytes)),
                old_kept,
                entry_ts_ns,
            };
            let source = match u32_at(bytes, offset_of!(AllocEvent, call)) {
                heap if is_heap_call(heap) => None,
                call::MMAP => Some(MapSource::Mmap(Backing::Anonymous)),
                call::MMAP_FILE => Some(MapSource::Mmap(Backing::File)),
                call::ARENA_MMAP => Some(MapSource::Mmap(Backing::PymallocArena)),
                call::MREMAP => Some(remap(false)),
                call::MREMAP_KEEP => Some(remap(true)),
                other => return Err(DecodeError::UnknownCall(other)),
            };
            let frames = frames_of(&bytes[frames_at..frames_at + 8 * depth], scratch);
            Ok(match source {
                None => Event::Alloc {
                    ts_ns,
                    addr,
                    size_bytes,
                    old_addr,
                    entry_ts_ns,
                    frames,
                    truncated,
                },
                Some(source) => Event::Map {
                    ts_ns,
                    addr,
                    size_bytes,
                    source,
                    frames,
                    truncated,
                },
            })
        }
        kind => Err(DecodeError::UnknownKind(kind)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The bytes BPF writes for an allocation.
    pub(crate) fn alloc_record(
        addr: u64,
        size_bytes: u64,
        old_addr: u64,
        frames: &[u64],
    ) -> Vec<u8> {
        call_record(call::MALLOC, addr, size_bytes, (old_addr, 0), frames)
    }

    /// The bytes BPF writes for any call that returns memory.
    pub(crate) fn call_record(
        call: u32,
        addr: u64,
        size_bytes: u64,
        (old_addr, old_size_bytes): (u64, u64),
        frames: &[u64],
    ) -> Vec<u8> {
        let mut event = AllocEvent {
            kind: EVENT_ALLOC,
            call,
            pid_tgid: 7 << 32 | 8,
            ts_ns: 1000,
            addr,
            size_bytes,
            old_addr,
            old_size_bytes,
            entry_ts_ns: 900,
            stack_bytes: 0,
            stack_truncated: 0,
            frames: [0; MAX_STACK_DEPTH],
        };
        event.set_frames(frames);
        event.record()
    }

    pub(crate) fn free_record(addr: u64) -> Vec<u8> {
        FreeEvent {
            kind: EVENT_FREE,
            _pad: 0,
            pid_tgid: 7 << 32 | 8,
            addr,
        }
        .record()
    }

    pub(crate) fn unmap_record(addr: u64, size_bytes: u64) -> Vec<u8> {
        UnmapEvent {
            kind: EVENT_UNMAP,
            _pad: 0,
            pid_tgid: 7 << 32 | 8,
            ts_ns: 3000,
            addr,
            size_bytes,
        }
        .record()
    }

    /// The bytes BPF writes for an allocation with a stack copy of `stack` (at most 4096 bytes).
    pub(crate) fn alloc_stack_record(
        addr: u64,
        fp_frames: &[u64],
        regs: UserRegs,
        stack: &[u8],
    ) -> Vec<u8> {
        let mut record = AllocStackEvent::<4096> {
            alloc: AllocEvent {
                kind: EVENT_ALLOC_STACK,
                call: leaktrace_common::call::MALLOC,
                pid_tgid: 7 << 32 | 8,
                ts_ns: 1000,
                addr,
                size_bytes: 16,
                old_addr: 0,
                old_size_bytes: 0,
                entry_ts_ns: 900,
                stack_bytes: 0,
                stack_truncated: 0,
                frames: [0; MAX_STACK_DEPTH],
            },
            regs,
            stack_copy_bytes: u32::try_from(stack.len()).unwrap(),
            _pad: 0,
            stack: [0; 4096],
        };
        record.alloc.set_frames(fp_frames);
        record.stack[..stack.len()].copy_from_slice(stack);
        record.record()
    }

    #[test]
    fn decodes_mappings_by_call() {
        let mut scratch = Vec::new();
        let record = call_record(call::MMAP_FILE, 0x7000, 8192, (0, 0), &[0x401000]);
        assert_eq!(
            decode(&record, &mut scratch).unwrap(),
            Event::Map {
                ts_ns: 1000,
                addr: 0x7000,
                size_bytes: 8192,
                source: MapSource::Mmap(Backing::File),
                frames: &[0x401000],
                truncated: false
            }
        );
        // An arena that CPython's object allocator mapped inside one of its calls.
        let record = call_record(call::ARENA_MMAP, 0x7000, 1 << 20, (0, 0), &[0x401000]);
        assert!(matches!(
            decode(&record, &mut scratch).unwrap(),
            Event::Map {
                addr: 0x7000,
                size_bytes: 0x10_0000,
                source: MapSource::Mmap(Backing::PymallocArena),
                ..
            }
        ));
        let record = call_record(call::MREMAP_KEEP, 0x9000, 4096, (0x7000, 8192), &[]);
        assert_eq!(
            decode(&record, &mut scratch).unwrap(),
            Event::Map {
                ts_ns: 1000,
                addr: 0x9000,
                size_bytes: 4096,
                source: MapSource::Remap {
                    old_addr: 0x7000,
                    old_size_bytes: 8192,
                    old_kept: true,
                    entry_ts_ns: 900
                },
                frames: &[],
                truncated: false
            }
        );
        assert_eq!(
            decode(&unmap_record(0x7000, 100), &mut scratch).unwrap(),
            Event::Unmap {
                ts_ns: 3000,
                addr: 0x7000,
                size_bytes: 100
            }
        );
        assert_eq!(
            decode(&unmap_record(1, 1)[..39], &mut scratch),
            Err(DecodeError::Short(39))
        );
        // munmap never produces an allocation record; nor does a call this build lacks.
        for bad in [call::MUNMAP, 0, 99] {
            assert_eq!(
                decode(&call_record(bad, 1, 1, (0, 0), &[]), &mut scratch),
                Err(DecodeError::UnknownCall(bad))
            );
        }
    }

    #[test]
    fn decodes_a_stack_copy() {
        let regs = UserRegs {
            ip: 0x401000,
            sp: 0x7ff000,
            bp: 0x7ff010,
        };
        let record = alloc_stack_record(0x1000, &[0x401000, 0x1], regs, &[1, 2, 3, 4]);
        assert_eq!(
            user_stack(&record).unwrap(),
            Some(UserStack {
                ts_ns: 1000,
                ip: 0x401000,
                sp: 0x7ff000,
                bp: 0x7ff010,
                stack: &[1, 2, 3, 4],
            })
        );
        // The rest of the record is an ordinary allocation, with its frame-pointer stack.
        let mut scratch = Vec::new();
        match decode(&record, &mut scratch).unwrap() {
            Event::Alloc { addr, frames, .. } => {
                assert_eq!((addr, frames), (0x1000, &[0x401000, 0x1][..]));
            }
            other => panic!("{other:?}"),
        }
        // Other kinds have no stack copy.
        assert_eq!(user_stack(&alloc_record(1, 1, 0, &[])).unwrap(), None);
        assert_eq!(user_stack(&free_record(1)).unwrap(), None);
        assert_eq!(user_stack(&[]).unwrap(), None);
    }

    #[test]
    fn rejects_malformed_stack_copies() {
        let regs = UserRegs {
            ip: 1,
            sp: 2,
            bp: 3,
        };
        let record = alloc_stack_record(0x1000, &[], regs, &[]);
        assert_eq!(
            user_stack(&record[..STACK_AT - 1]),
            Err(DecodeError::Short(STACK_AT - 1))
        );
        for bad in [4097u32, u32::MAX] {
            let mut record = record.clone();
            record[COPY_BYTES_AT..COPY_BYTES_AT + 4].copy_from_slice(&bad.to_ne_bytes());
            assert_eq!(user_stack(&record), Err(DecodeError::BadStackCopy(bad)));
        }
        // A copy that claims the whole record is fine; one byte more is not.
        let mut record = record;
        record[COPY_BYTES_AT..COPY_BYTES_AT + 4].copy_from_slice(&4096u32.to_ne_bytes());
        assert_eq!(user_stack(&record).unwrap().unwrap().stack.len(), 4096);
        record.pop();
        assert_eq!(user_stack(&record), Err(DecodeError::BadStackCopy(4096)));
    }

    #[test]
    fn decodes_alloc_and_free() {
        let mut scratch = Vec::new();
        let record = alloc_record(0x1000, 64, 0, &[0x401000, 0x402000]);
        assert_eq!(
            decode(&record, &mut scratch).unwrap(),
            Event::Alloc {
                ts_ns: 1000,
                addr: 0x1000,
                size_bytes: 64,
                old_addr: 0,
                entry_ts_ns: 900,
                frames: &[0x401000, 0x402000],
                truncated: false
            }
        );
        assert_eq!(
            decode(&free_record(0x1000), &mut scratch).unwrap(),
            Event::Free { addr: 0x1000 }
        );
        // Frames are borrowed from an aligned record, copied from a misaligned one, alike.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&record);
        let aligned: Vec<u64> = record
            .chunks_exact(8)
            .map(|w| u64::from_ne_bytes(w.try_into().unwrap()))
            .collect();
        // SAFETY: the bytes of a Vec<u64>, 8-byte aligned.
        let aligned_bytes =
            unsafe { std::slice::from_raw_parts(aligned.as_ptr().cast::<u8>(), record.len()) };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let from_aligned = decode(aligned_bytes, &mut a).unwrap();
        let from_shifted = decode(&shifted[1..], &mut b).unwrap();
        assert_eq!(from_aligned, from_shifted);
        assert!(a.is_empty(), "borrowed, not copied");
        assert_eq!(b, [0x401000, 0x402000], "copied");
    }

    #[test]
    fn rejects_malformed_records() {
        let mut scratch = Vec::new();
        assert_eq!(decode(&[], &mut scratch), Err(DecodeError::Short(0)));
        assert_eq!(decode(&[1, 0], &mut scratch), Err(DecodeError::Short(2)));
        assert_eq!(
            decode(&free_record(1)[..23], &mut scratch),
            Err(DecodeError::Short(23))
        );
        let alloc = alloc_record(1, 1, 0, &[]);
        assert_eq!(alloc.len(), ALLOC_EVENT_HEADER_BYTES);
        assert_eq!(
            decode(&alloc[..ALLOC_EVENT_HEADER_BYTES - 1], &mut scratch),
            Err(DecodeError::Short(ALLOC_EVENT_HEADER_BYTES - 1))
        );
        // A record that ends before the frames it claims.
        let alloc = alloc_record(1, 1, 0, &[0x401000, 0x402000]);
        assert_eq!(
            decode(&alloc[..alloc.len() - 1], &mut scratch),
            Err(DecodeError::BadStack(16))
        );
        // Trailing bytes past the frames (a full-size record) are not an error.
        let mut padded = alloc.clone();
        padded.resize(size_of::<AllocEvent>(), 0);
        assert_eq!(
            decode(&padded, &mut scratch),
            decode(&alloc, &mut Vec::new())
        );
        assert_eq!(
            decode(&[9, 0, 0, 0, 0, 0, 0, 0], &mut scratch),
            Err(DecodeError::UnknownKind(9))
        );

        let stack_at = offset_of!(AllocEvent, stack_bytes);
        for bad in [7u32, (MAX_STACK_DEPTH as u32 + 1) * 8, u32::MAX] {
            let mut record = alloc_record(1, 1, 0, &[]);
            record[stack_at..stack_at + 4].copy_from_slice(&bad.to_ne_bytes());
            assert_eq!(
                decode(&record, &mut scratch),
                Err(DecodeError::BadStack(bad))
            );
        }
    }
}
