//! What the heap model applies: allocator events, decoded from the ring buffer's records.

/// What backs a mapping. File mappings and pymalloc's arenas are kept apart from heap numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Backing {
    Anonymous,
    File,
    /// Anonymous memory that CPython's object allocator mapped for itself and carves objects
    /// from, which are counted one by one: counted, the arena would count them twice.
    PymallocArena,
}

/// One allocator event, borrowed from the ring buffer record.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A call that returned a block (`addr != 0`), released one (`old_addr != 0`), or both.
    Alloc {
        ts_ns: u64,
        addr: u64,
        size_bytes: u64,
        old_addr: u64,
        /// When the call began: its release of `old_addr` happened after this, so a block at
        /// that address younger than this is another one (see `AllocEvent::entry_ts_ns`).
        entry_ts_ns: u64,
        /// Return addresses, innermost (the allocator's caller) first.
        frames: &'a [u64],
        truncated: bool,
    },
    /// The release of the block at `addr`, whichever it is when the event is applied (see
    /// `FreeEvent`: the ring buffer's order is the order that matters).
    Free { addr: u64 },
    /// mmap or mremap mapped `addr..addr + size_bytes`.
    Map {
        ts_ns: u64,
        addr: u64,
        size_bytes: u64,
        source: MapSource,
        frames: &'a [u64],
        truncated: bool,
    },
    /// munmap released whatever was mapped in `addr..addr + size_bytes` (whole pages).
    Unmap {
        ts_ns: u64,
        addr: u64,
        size_bytes: u64,
    },
}

impl<'a> Event<'a> {
    /// The call stack of an allocation or a mapping: its frames and whether they were cut short.
    pub fn stack(&self) -> Option<(&'a [u64], bool)> {
        match *self {
            Self::Alloc {
                frames, truncated, ..
            }
            | Self::Map {
                frames, truncated, ..
            } => Some((frames, truncated)),
            Self::Free { .. } | Self::Unmap { .. } => None,
        }
    }

    /// Gives an allocation or a mapping another call stack (one unwound from a stack copy, or
    /// with the interpreter's frames mixed in); an event without a stack stays as it is.
    pub fn set_stack(&mut self, stack: &'a [u64], cut_short: bool) {
        match self {
            Self::Alloc {
                frames, truncated, ..
            }
            | Self::Map {
                frames, truncated, ..
            } => (*frames, *truncated) = (stack, cut_short),
            Self::Free { .. } | Self::Unmap { .. } => {}
        }
    }
}

/// Where a mapped range comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapSource {
    Mmap(Backing),
    /// mremap of `old_addr..old_addr + old_size_bytes`, which is unmapped unless `old_kept`
    /// (`MREMAP_DONTUNMAP`). The new range keeps the old mapping's backing.
    Remap {
        old_addr: u64,
        old_size_bytes: u64,
        old_kept: bool,
        /// When the mremap began (see `AllocEvent::entry_ts_ns`).
        entry_ts_ns: u64,
    },
}
