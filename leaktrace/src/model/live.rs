//! The blocks outstanding now, by address: the model's only table that grows with the
//! target's heap (millions of entries), so its entry is kept small and its growth smooth.

use super::{HashMap, stack_table::StackId};

/// A block allocated since attach and not freed yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveBlock {
    pub size_bytes: u64,
    pub ts_ns: u64,
    pub stack: StackId,
}

/// A [`LiveBlock`] as stored: 16 bytes, 24 with its address. Sizes of 4 GiB and more are
/// rare and kept apart, so that the common block does not pay for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    ts_ns: u64,
    /// The size, or [`LARGE`]: the size is in [`LiveBlocks::large`].
    size_bytes: u32,
    stack: StackId,
}

const LARGE: u32 = u32::MAX;

/// Tables the blocks are spread over, by a hash of the address. A hash table grows by
/// allocating a table twice its size and moving every entry: one table of millions of
/// entries would hold both copies at once (the peak RSS), many small ones grow one at a time.
const SHARDS: usize = 64;

#[derive(Debug)]
pub struct LiveBlocks {
    shards: Box<[HashMap<u64, Entry>]>,
    /// Sizes that do not fit an [`Entry`], by address.
    large: HashMap<u64, u64>,
}

impl Default for LiveBlocks {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| HashMap::default()).collect(),
            large: HashMap::default(),
        }
    }
}

/// The shard of an address: its high bits after a multiplication by an odd constant
/// (Fibonacci hashing), so that aligned addresses spread over every shard.
fn shard_of(addr: u64) -> usize {
    (addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SHARDS.trailing_zeros())) as usize
}

impl LiveBlocks {
    /// Adds the block at `addr`; returns the block it replaces (whose release was not seen).
    pub fn insert(&mut self, addr: u64, block: LiveBlock) -> Option<LiveBlock> {
        let size_bytes = match u32::try_from(block.size_bytes) {
            Ok(size) if size != LARGE => size,
            _ => LARGE,
        };
        let entry = Entry {
            ts_ns: block.ts_ns,
            size_bytes,
            stack: block.stack,
        };
        let old = self.shards[shard_of(addr)].insert(addr, entry);
        // The old block's size first: the new one may replace it in `large`.
        let old = old.map(|old| self.take(addr, old));
        if size_bytes == LARGE {
            self.large.insert(addr, block.size_bytes);
        }
        old
    }

    /// Removes and returns the block at `addr` if `born_before` accepts its birth time; one
    /// lookup in the common case.
    pub fn remove_if(
        &mut self,
        addr: u64,
        born_before: impl FnOnce(u64) -> bool,
    ) -> Option<LiveBlock> {
        use std::collections::hash_map::Entry::Occupied;
        match self.shards[shard_of(addr)].entry(addr) {
            Occupied(entry) if born_before(entry.get().ts_ns) => {
                let entry = entry.remove();
                Some(self.take(addr, entry))
            }
            _ => None,
        }
    }

    /// The block of `entry`, which has left its table at `addr`: its large size leaves too.
    fn take(&mut self, addr: u64, entry: Entry) -> LiveBlock {
        let size_bytes = match entry.size_bytes {
            LARGE => self.large.remove(&addr).unwrap_or(u64::from(LARGE)),
            size => u64::from(size),
        };
        LiveBlock {
            size_bytes,
            ts_ns: entry.ts_ns,
            stack: entry.stack,
        }
    }

    /// The block of `entry`, at `addr` in its table.
    fn block(&self, addr: u64, entry: Entry) -> LiveBlock {
        let size_bytes = match entry.size_bytes {
            LARGE => self.large.get(&addr).copied().unwrap_or(u64::from(LARGE)),
            size => u64::from(size),
        };
        LiveBlock {
            size_bytes,
            ts_ns: entry.ts_ns,
            stack: entry.stack,
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(HashMap::is_empty)
    }

    /// Every block, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = LiveBlock> + '_ {
        self.shards
            .iter()
            .flatten()
            .map(|(&addr, &entry)| self.block(addr, entry))
    }

    /// The block at `addr`.
    pub fn get(&self, addr: u64) -> Option<LiveBlock> {
        let entry = *self.shards[shard_of(addr)].get(&addr)?;
        Some(self.block(addr, entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(size_bytes: u64, ts_ns: u64, stack: u32) -> LiveBlock {
        LiveBlock {
            size_bytes,
            ts_ns,
            stack: StackId(stack),
        }
    }

    #[test]
    fn an_entry_is_16_bytes_and_24_with_its_address() {
        assert_eq!(size_of::<Entry>(), 16);
        assert_eq!(size_of::<(u64, Entry)>(), 24);
    }

    #[test]
    fn sizes_of_4_gib_and_more_are_kept_whole() {
        let mut live = LiveBlocks::default();
        let sizes = [
            0,
            1,
            u64::from(u32::MAX) - 1,
            u64::from(u32::MAX),
            1 << 32,
            u64::MAX,
        ];
        for (i, &size) in sizes.iter().enumerate() {
            assert_eq!(
                live.insert(0x1000 * (i as u64 + 1), block(size, 7, 1)),
                None
            );
        }
        assert_eq!(live.len(), sizes.len());
        assert_eq!(live.large.len(), 3);
        let mut seen: Vec<u64> = live.iter().map(|b| b.size_bytes).collect();
        seen.sort_unstable();
        assert_eq!(seen, sizes);
        for (i, &size) in sizes.iter().enumerate() {
            let addr = 0x1000 * (i as u64 + 1);
            assert_eq!(live.get(addr), Some(block(size, 7, 1)));
            assert_eq!(live.remove_if(addr, |_| true), Some(block(size, 7, 1)));
        }
        assert!(live.is_empty());
        assert!(live.large.is_empty(), "no size left behind");
    }

    #[test]
    fn an_address_reused_returns_the_replaced_block_large_or_not() {
        let mut live = LiveBlocks::default();
        let large = 5 << 32;
        assert_eq!(live.insert(0x10, block(large, 1, 1)), None);
        // Large replaced by small: the large size leaves with the old block.
        assert_eq!(live.insert(0x10, block(8, 2, 2)), Some(block(large, 1, 1)));
        assert!(live.large.is_empty());
        // Small replaced by large, then large by another large.
        assert_eq!(live.insert(0x10, block(large, 3, 3)), Some(block(8, 2, 2)));
        assert_eq!(
            live.insert(0x10, block(large + 1, 4, 4)),
            Some(block(large, 3, 3))
        );
        assert_eq!(live.get(0x10), Some(block(large + 1, 4, 4)));
        assert_eq!(live.len(), 1);
        assert_eq!(live.large.len(), 1);
    }

    #[test]
    fn a_release_older_than_the_block_leaves_it() {
        let mut live = LiveBlocks::default();
        live.insert(0x10, block(8, 30, 1));
        // A release that began at 20 cannot release a block born at 30.
        assert_eq!(live.remove_if(0x10, |born| born <= 20), None);
        assert_eq!(live.get(0x10), Some(block(8, 30, 1)));
        assert_eq!(
            live.remove_if(0x10, |born| born <= 30),
            Some(block(8, 30, 1))
        );
        assert_eq!(live.remove_if(0x10, |_| true), None);
        assert_eq!(live.remove_if(0x20, |_| true), None);
    }

    #[test]
    fn aligned_addresses_spread_over_every_shard() {
        let mut live = LiveBlocks::default();
        for i in 0..SHARDS as u64 * 64 {
            live.insert(0x7f00_0000_0000 + i * 4096, block(4096, i, 0));
        }
        assert!(live.shards.iter().all(|s| !s.is_empty()));
        assert_eq!(live.len(), SHARDS * 64);
    }
}
