//! Ring buffer records as the BPF side writes them, for user space's tests and benchmarks of
//! what decodes them (the `user` feature).

extern crate alloc;

use alloc::vec::Vec;
use core::mem::size_of;

use crate::{ALLOC_EVENT_HEADER_BYTES, AllocEvent, AllocStackEvent, FreeEvent, UnmapEvent};

/// The bytes of `value`: a type of this crate, plain integers without padding.
fn bytes_of<T: Copy>(value: &T, len: usize) -> Vec<u8> {
    assert!(len <= size_of::<T>());
    // SAFETY: `value` is `len` initialized bytes or more (the layout test of this crate says
    // that no type here has padding).
    unsafe { core::slice::from_raw_parts(core::ptr::from_ref(value).cast::<u8>(), len) }.to_vec()
}

impl AllocEvent {
    /// Sets the frame-pointer stack (at most 127 frames) and `stack_bytes`.
    pub fn set_frames(&mut self, frames: &[u64]) {
        self.frames[..frames.len()].copy_from_slice(frames);
        self.stack_bytes = u32::try_from(8 * frames.len()).expect("at most 127 frames");
    }

    /// The record: the event cut after its `stack_bytes` of frames.
    pub fn record(&self) -> Vec<u8> {
        bytes_of(self, ALLOC_EVENT_HEADER_BYTES + self.stack_bytes as usize)
    }
}

impl<const N: usize> AllocStackEvent<N> {
    /// The record: the whole event, whatever part of `stack` was copied.
    pub fn record(&self) -> Vec<u8> {
        bytes_of(self, size_of::<Self>())
    }
}

impl FreeEvent {
    pub fn record(&self) -> Vec<u8> {
        bytes_of(self, size_of::<Self>())
    }
}

impl UnmapEvent {
    pub fn record(&self) -> Vec<u8> {
        bytes_of(self, size_of::<Self>())
    }
}
