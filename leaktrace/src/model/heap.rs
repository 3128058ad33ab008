//! The heap model: every allocation outstanding since attach, and the stacks that made them.
//! It knows nothing of BPF, symbols or terminals.

use std::collections::HashSet;

use super::{
    HashMap,
    event::{Backing, Event, MapSource},
    live::{LiveBlock, LiveBlocks},
    location::Locate,
    mapped::MappedRanges,
    stack_table::{Origin, StackId, Stacks},
};

/// Counters since attach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Calls that returned a block.
    pub allocations: u64,
    /// Blocks released (free, and realloc's old block).
    pub frees: u64,
    /// Releases of blocks that were allocated before attach (or whose allocation was lost).
    pub unmatched_frees: u64,
    /// munmaps that released nothing leaktrace saw being mapped: mappings older than the
    /// attach, and glibc's own unmapping of large blocks that `free` released.
    pub unmatched_unmaps: u64,
}

/// Outstanding memory of one stack at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackUsage {
    pub stack: StackId,
    pub outstanding_bytes: u64,
    pub outstanding_allocations: u64,
    pub oldest_ts_ns: u64,
}

/// Everything one stack allocated since attach, freed or not (pprof's alloc_space and
/// alloc_objects).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allocated {
    pub bytes: u64,
    pub count: u64,
}

/// `--sample-bytes N`: the BPF side traced each block of the malloc family of `size` bytes with
/// probability `p = min(1, max(size, 1) / N)`, independently. A traced block stands for `1 / p`
/// blocks (Horvitz-Thompson), which makes every sum of blocks an unbiased estimate: a block of
/// at least N bytes for itself, a smaller one for N bytes in `N / size` blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sampling {
    sample_bytes: u64,
}

impl Sampling {
    pub fn new(sample_bytes: u64) -> Self {
        Self {
            sample_bytes: sample_bytes.max(1),
        }
    }

    pub fn sample_bytes(self) -> u64 {
        self.sample_bytes
    }

    /// The blocks a traced block of `size_bytes` stands for.
    fn weight(self, size_bytes: u64) -> f64 {
        let size = size_bytes.max(1);
        if size >= self.sample_bytes {
            1.0
        } else {
            self.sample_bytes as f64 / size as f64
        }
    }

    /// The bytes a traced block of `size_bytes` stands for.
    fn bytes(self, size_bytes: u64) -> u64 {
        if size_bytes == 0 {
            0
        } else {
            size_bytes.max(self.sample_bytes)
        }
    }
}

#[derive(Debug, Default)]
pub struct HeapModel {
    live: LiveBlocks,
    /// Blocks that a younger block at the same address replaced before their release was seen,
    /// by address: the birth time and size of the replaced one. A call that releases a block
    /// (realloc) reports it at its return, and another thread may get the address in between.
    replaced: HashMap<u64, (u64, u64)>,
    mappings: MappedRanges,
    stacks: Stacks,
    /// Allocation events as traced and the unmatched releases; the reported `allocations` and
    /// `frees` come from `weighed` (`frees` is not kept here).
    counters: Counters,
    /// Allocations and frees, each weighed by the blocks it stands for (1 unless sampled).
    weighed: Weighed,
    /// Indexed by stack id: bytes, and allocations weighed as in `weighed`.
    allocated: Vec<StackTotals>,
    sampling: Option<Sampling>,
}

/// What one stack allocated since attach.
#[derive(Clone, Copy, Debug, Default)]
struct StackTotals {
    bytes: u64,
    /// Allocations weighed as in `weighed`; 0 for an id that no stack holds.
    blocks: f64,
    /// When it last allocated.
    last_ns: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Weighed {
    allocations: f64,
    frees: f64,
}

impl HeapModel {
    /// A model of a trace that saw every block (`None`) or a sample of the malloc family's.
    pub fn new(sampling: Option<Sampling>) -> Self {
        Self {
            sampling,
            ..Self::default()
        }
    }

    pub fn sampling(&self) -> Option<Sampling> {
        self.sampling
    }

    /// The bytes and blocks that a traced block of `origin` stands for.
    fn weigh(&self, origin: Origin, size_bytes: u64) -> (u64, f64) {
        match self.sampling {
            Some(sampling) if origin == Origin::Malloc => {
                (sampling.bytes(size_bytes), sampling.weight(size_bytes))
            }
            _ => (size_bytes, 1.0),
        }
    }

    /// Applies one event; `code` locates the frames of stacks not seen before.
    pub fn apply(&mut self, event: &Event<'_>, code: &mut impl Locate) {
        match *event {
            Event::Alloc {
                ts_ns,
                addr,
                size_bytes,
                old_addr,
                entry_ts_ns,
                frames,
                truncated,
            } => {
                if old_addr != 0 {
                    self.release(old_addr, entry_ts_ns);
                }
                if addr != 0 {
                    let stack = self
                        .stacks
                        .intern(frames, truncated, Origin::Malloc, ts_ns, code);
                    self.count_allocated(stack, Origin::Malloc, size_bytes, ts_ns);
                    // An address still live: its release is still on its way (or was lost).
                    let new = LiveBlock {
                        size_bytes,
                        ts_ns,
                        stack,
                    };
                    if let Some(old) = self.live.insert(addr, new) {
                        self.replaced.insert(addr, (old.ts_ns, old.size_bytes));
                    }
                }
            }
            Event::Free { addr } => self.release(addr, u64::MAX),
            Event::Map {
                ts_ns,
                addr,
                size_bytes,
                source,
                frames,
                truncated,
            } => {
                let backing = match source {
                    MapSource::Mmap(backing) => backing,
                    MapSource::Remap {
                        old_addr,
                        old_size_bytes,
                        old_kept,
                        entry_ts_ns,
                    } => {
                        // A mapping made before attach is taken for anonymous memory: its
                        // backing is unknown, and hiding it would hide memory.
                        let backing = self
                            .mappings
                            .backing_at(old_addr)
                            .unwrap_or(Backing::Anonymous);
                        if !old_kept {
                            let unmapped =
                                self.mappings.unmap(old_addr, old_size_bytes, entry_ts_ns);
                            self.weighed.frees += unmapped.released as f64;
                        }
                        backing
                    }
                };
                let stack = self
                    .stacks
                    .intern(frames, truncated, backing.into(), ts_ns, code);
                self.count_allocated(stack, backing.into(), size_bytes, ts_ns);
                // MAP_FIXED over tracked memory replaces it.
                let replaced = self.mappings.map(addr, size_bytes, stack, ts_ns, backing);
                self.weighed.frees += replaced.released as f64;
            }
            Event::Unmap {
                ts_ns,
                addr,
                size_bytes,
            } => {
                let unmapped = self.mappings.unmap(addr, size_bytes, ts_ns);
                self.weighed.frees += unmapped.released as f64;
                if unmapped.bytes == 0 {
                    self.counters.unmatched_unmaps += 1;
                }
            }
        }
    }

    fn count_allocated(&mut self, stack: StackId, origin: Origin, size_bytes: u64, ts_ns: u64) {
        let (bytes, blocks) = self.weigh(origin, size_bytes);
        self.counters.allocations += 1;
        self.weighed.allocations += blocks;
        let index = stack.0 as usize;
        if index >= self.allocated.len() {
            self.allocated.resize(index + 1, StackTotals::default());
        }
        let totals = &mut self.allocated[index];
        // Sizes come from records: saturate rather than overflow on a corrupt one.
        totals.bytes = totals.bytes.saturating_add(bytes);
        totals.blocks += blocks;
        totals.last_ns = ts_ns;
    }

    /// Forgets the stacks that hold nothing, allocated nothing since `idle_since_ns`, and that
    /// `keep` does not ask for (a trend still watched): a long trace of a program that makes
    /// ever new stacks (recursion, generated code, libraries loaded again) keeps a bounded
    /// table. Their totals since attach go with them (pprof's alloc_space); the counters do
    /// not change. Returns how many were forgotten.
    pub fn forget_idle_stacks(
        &mut self,
        idle_since_ns: u64,
        keep: impl Fn(StackId) -> bool,
    ) -> usize {
        let mut held = vec![false; self.allocated.len()];
        let stacks = self
            .live
            .iter()
            .map(|live| live.stack)
            .chain(self.mappings.pieces().map(|piece| piece.stack));
        for stack in stacks {
            if let Some(held) = held.get_mut(stack.0 as usize) {
                *held = true;
            }
        }
        let mut forgotten = 0;
        for (index, totals) in self.allocated.iter_mut().enumerate() {
            let id = StackId(index as u32);
            if totals.blocks > 0.0 && !held[index] && totals.last_ns < idle_since_ns && !keep(id) {
                self.stacks.forget(id);
                *totals = StackTotals::default();
                forgotten += 1;
            }
        }
        // A block replaced at its address waits for a release that comes within moments;
        // one that never came was lost (and counted).
        self.replaced
            .retain(|_, &mut (born_ns, _)| born_ns >= idle_since_ns);
        forgotten
    }

    /// Releases the block at `addr` that was born before `released_ns`, when the release began.
    fn release(&mut self, addr: u64, released_ns: u64) {
        // One lookup: the table is the model's only memory that does not fit in caches.
        let released_size = match self.live.remove_if(addr, |born| born <= released_ns) {
            Some(live) => Some(live.size_bytes),
            // The address was given out again before this release was seen: the block it
            // releases is the one that the younger block replaced.
            None => match self.replaced.remove(&addr) {
                Some((born, size)) if born <= released_ns => Some(size),
                _ => None,
            },
        };
        match released_size {
            Some(size) => self.weighed.frees += self.weigh(Origin::Malloc, size).1,
            None => {
                self.weighed.frees += 1.0;
                self.counters.unmatched_frees += 1;
            }
        }
    }

    /// Allocation events applied: under sampling, the blocks drawn.
    pub fn traced_allocations(&self) -> u64 {
        self.counters.allocations
    }

    /// Allocations and frees are estimates under sampling, rounded.
    pub fn counters(&self) -> Counters {
        Counters {
            allocations: self.weighed.allocations.round() as u64,
            frees: self.weighed.frees.round() as u64,
            ..self.counters
        }
    }

    pub fn stacks(&self) -> &Stacks {
        &self.stacks
    }

    /// What `stack` allocated since attach, freed or not.
    pub fn allocated(&self, stack: StackId) -> Allocated {
        self.allocated
            .get(stack.0 as usize)
            .map(allocated)
            .unwrap_or_default()
    }

    /// Every stack that allocated since attach, with what it allocated.
    pub fn allocated_stacks(&self) -> impl Iterator<Item = (StackId, Allocated)> + '_ {
        self.allocated
            .iter()
            .enumerate()
            .filter(|(_, a)| a.blocks > 0.0)
            .map(|(i, a)| (StackId(i as u32), allocated(a)))
    }

    /// Outstanding bytes and allocations per stack, in no particular order, of the blocks
    /// allocated at or before `born_by_ns`.
    pub fn usage(&self, born_by_ns: u64) -> Vec<StackUsage> {
        self.usage_of_sizes(born_by_ns, 0..=u64::MAX)
    }

    /// As [`Self::usage`], counting only blocks whose size is in `sizes` (`--min-size`,
    /// `--max-size`).
    pub fn usage_of_sizes(
        &self,
        born_by_ns: u64,
        sizes: std::ops::RangeInclusive<u64>,
    ) -> Vec<StackUsage> {
        // Bytes, weighed allocations, oldest birth.
        let mut by_stack: HashMap<StackId, (u64, f64, u64)> = HashMap::default();
        let mut add = |stack: StackId, (bytes, blocks): (u64, f64), ts_ns: u64| {
            let usage = by_stack.entry(stack).or_insert((0, 0.0, u64::MAX));
            usage.0 = usage.0.saturating_add(bytes);
            usage.1 += blocks;
            usage.2 = usage.2.min(ts_ns);
        };
        for live in self
            .live
            .iter()
            .filter(|live| live.ts_ns <= born_by_ns && sizes.contains(&live.size_bytes))
        {
            let weighed = self.weigh(Origin::Malloc, live.size_bytes);
            add(live.stack, weighed, live.ts_ns);
        }
        // A mapping split by a partial munmap is still one allocation.
        let mut counted = HashSet::new();
        for piece in self
            .mappings
            .pieces()
            .filter(|p| p.ts_ns <= born_by_ns && sizes.contains(&p.size_bytes))
        {
            let first_piece = counted.insert(piece.mapping);
            add(
                piece.stack,
                (piece.size_bytes, if first_piece { 1.0 } else { 0.0 }),
                piece.ts_ns,
            );
        }
        by_stack
            .into_iter()
            .map(|(stack, (bytes, blocks, oldest_ts_ns))| StackUsage {
                stack,
                outstanding_bytes: bytes,
                outstanding_allocations: blocks.round() as u64,
                oldest_ts_ns,
            })
            .collect()
    }
}

/// Bytes and weighed allocations of a stack, as reported.
fn allocated(totals: &StackTotals) -> Allocated {
    Allocated {
        bytes: totals.bytes,
        count: totals.blocks.round() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::location::NoModules;

    fn alloc(addr: u64, size_bytes: u64, frames: &'static [u64]) -> Event<'static> {
        Event::Alloc {
            ts_ns: addr,
            addr,
            size_bytes,
            old_addr: 0,
            entry_ts_ns: 0,
            frames,
            truncated: false,
        }
    }

    fn realloc(
        old_addr: u64,
        addr: u64,
        size_bytes: u64,
        frames: &'static [u64],
    ) -> Event<'static> {
        Event::Alloc {
            ts_ns: 1 << 40,
            addr,
            size_bytes,
            old_addr,
            entry_ts_ns: 1 << 40,
            frames,
            truncated: false,
        }
    }

    fn usage_of(heap: &HeapModel, frames: &[u64]) -> Option<(u64, u64)> {
        heap.usage(u64::MAX)
            .into_iter()
            .find(|u| {
                heap.stacks()
                    .get(u.stack)
                    .addresses()
                    .eq(frames.iter().copied())
            })
            .map(|u| (u.outstanding_bytes, u.outstanding_allocations))
    }

    #[test]
    fn sampled_blocks_stand_for_the_blocks_they_were_drawn_from() {
        // One block per 1000 bytes: a 100-byte block was drawn with probability 1/10, so it
        // stands for 10 blocks of 1000 bytes in all; a 4000-byte block always, for itself.
        let mut heap = HeapModel::new(Some(Sampling::new(1000)));
        heap.apply(&alloc(0x1000, 100, &[1]), &mut NoModules);
        heap.apply(&alloc(0x2000, 100, &[1]), &mut NoModules);
        heap.apply(&alloc(0x3000, 4000, &[2]), &mut NoModules);
        heap.apply(&alloc(0x4000, 0, &[3]), &mut NoModules);
        heap.apply(
            &map(0x10_0000, 8192, MapSource::Mmap(Backing::Anonymous), &[4]),
            &mut NoModules,
        );
        assert_eq!(usage_of(&heap, &[1]), Some((2000, 20)));
        assert_eq!(usage_of(&heap, &[2]), Some((4000, 1)));
        // malloc(0) was drawn as a 1-byte block: 1000 blocks of no bytes.
        assert_eq!(usage_of(&heap, &[3]), Some((0, 1000)));
        // MappedRanges are never sampled.
        assert_eq!(usage_of(&heap, &[4]), Some((8192, 1)));
        heap.apply(&Event::Free { addr: 0x1000 }, &mut NoModules);
        assert_eq!(usage_of(&heap, &[1]), Some((1000, 10)));
        // A release of a block never seen (older than the trace) stands for itself.
        heap.apply(&Event::Free { addr: 0x9999 }, &mut NoModules);
        assert_eq!(
            heap.counters(),
            Counters {
                allocations: 10 + 10 + 1 + 1000 + 1,
                frees: 10 + 1,
                unmatched_frees: 1,
                unmatched_unmaps: 0
            }
        );
        let stack = heap
            .usage(u64::MAX)
            .into_iter()
            .find(|u| heap.stacks().get(u.stack).addresses().eq([1]))
            .unwrap()
            .stack;
        assert_eq!(
            heap.allocated(stack),
            Allocated {
                bytes: 2000,
                count: 20
            }
        );
        // The same events, traced whole.
        let mut exact = HeapModel::default();
        exact.apply(&alloc(0x1000, 100, &[1]), &mut NoModules);
        assert_eq!(usage_of(&exact, &[1]), Some((100, 1)));
    }

    #[test]
    fn a_leak_stays_and_churn_goes() {
        let mut heap = HeapModel::default();
        for i in 0..10 {
            heap.apply(&alloc(0x1000 + i * 0x100, 64, &[1, 2]), &mut NoModules);
            heap.apply(&alloc(0x9000, 32, &[3, 2]), &mut NoModules);
            heap.apply(&Event::Free { addr: 0x9000 }, &mut NoModules);
        }
        assert_eq!(usage_of(&heap, &[1, 2]), Some((640, 10)));
        assert_eq!(usage_of(&heap, &[3, 2]), None);
        assert_eq!(
            heap.counters(),
            Counters {
                allocations: 20,
                frees: 10,
                unmatched_frees: 0,
                unmatched_unmaps: 0
            }
        );
        let oldest = heap
            .usage(u64::MAX)
            .into_iter()
            .find(|u| u.outstanding_bytes == 640)
            .unwrap()
            .oldest_ts_ns;
        assert_eq!(oldest, 0x1000);
    }

    #[test]
    fn sizes_filter_usage_and_allocated_counts_every_block() {
        let mut heap = HeapModel::default();
        heap.apply(&alloc(0x1000, 10, &[1]), &mut NoModules);
        heap.apply(&alloc(0x2000, 20, &[1]), &mut NoModules);
        heap.apply(&alloc(0x3000, 30, &[1]), &mut NoModules);
        heap.apply(&Event::Free { addr: 0x3000 }, &mut NoModules);
        let mid = heap.usage_of_sizes(u64::MAX, 15..=30);
        assert_eq!(
            (mid[0].outstanding_bytes, mid[0].outstanding_allocations),
            (20, 1)
        );
        assert!(heap.usage_of_sizes(u64::MAX, 21..=29).is_empty());
        let stack = mid[0].stack;
        assert_eq!(
            heap.allocated(stack),
            Allocated {
                bytes: 60,
                count: 3
            }
        );
        assert_eq!(heap.allocated(StackId(7)), Allocated::default());
    }

    #[test]
    fn usage_can_leave_out_young_blocks() {
        let mut heap = HeapModel::default();
        heap.apply(&alloc(0x1000, 10, &[1]), &mut NoModules);
        heap.apply(&alloc(0x2000, 20, &[1]), &mut NoModules);
        let old_only = heap.usage(0x1000);
        assert_eq!(old_only.len(), 1);
        assert_eq!(
            (
                old_only[0].outstanding_bytes,
                old_only[0].outstanding_allocations
            ),
            (10, 1)
        );
        assert!(heap.usage(0xfff).is_empty());
    }

    #[test]
    fn realloc_moves_grows_and_frees() {
        let mut heap = HeapModel::default();
        heap.apply(&alloc(0x1000, 10, &[1]), &mut NoModules);
        // Moved: the old block is released, the new one belongs to the realloc's stack.
        heap.apply(&realloc(0x1000, 0x2000, 20, &[2]), &mut NoModules);
        assert_eq!(usage_of(&heap, &[1]), None);
        assert_eq!(usage_of(&heap, &[2]), Some((20, 1)));
        // In place.
        heap.apply(&realloc(0x2000, 0x2000, 30, &[2]), &mut NoModules);
        assert_eq!(usage_of(&heap, &[2]), Some((30, 1)));
        // realloc(p, 0): released, nothing returned.
        heap.apply(&realloc(0x2000, 0, 0, &[2]), &mut NoModules);
        assert!(heap.usage(u64::MAX).is_empty());
        assert_eq!(
            heap.counters(),
            Counters {
                allocations: 3,
                frees: 3,
                unmatched_frees: 0,
                unmatched_unmaps: 0
            }
        );
    }

    #[test]
    fn a_realloc_chain_across_4_gib_keeps_exact_sizes() {
        let mut heap = HeapModel::default();
        let big = 6 << 30;
        heap.apply(&alloc(0x1000, 100, &[1]), &mut NoModules);
        // Grows past what a block's compact size holds, moving; then in place; then back
        // under it, moving again; then freed.
        heap.apply(
            &realloc(0x1000, 0x7f00_0000_0000, big, &[2]),
            &mut NoModules,
        );
        assert_eq!(usage_of(&heap, &[2]), Some((big, 1)));
        heap.apply(
            &realloc(0x7f00_0000_0000, 0x7f00_0000_0000, big + 1, &[2]),
            &mut NoModules,
        );
        assert_eq!(usage_of(&heap, &[2]), Some((big + 1, 1)));
        heap.apply(&realloc(0x7f00_0000_0000, 0x2000, 50, &[3]), &mut NoModules);
        assert_eq!(usage_of(&heap, &[2]), None);
        assert_eq!(usage_of(&heap, &[3]), Some((50, 1)));
        // The large size went with its block: the address given out again is small.
        heap.apply(&alloc(0x7f00_0000_0000, 8, &[4]), &mut NoModules);
        assert_eq!(usage_of(&heap, &[4]), Some((8, 1)));
        heap.apply(&Event::Free { addr: 0x2000 }, &mut NoModules);
        heap.apply(
            &Event::Free {
                addr: 0x7f00_0000_0000,
            },
            &mut NoModules,
        );
        assert!(heap.usage(u64::MAX).is_empty());
        assert!(heap.live.is_empty());
        assert_eq!(
            heap.counters(),
            Counters {
                allocations: 5,
                frees: 5,
                unmatched_frees: 0,
                unmatched_unmaps: 0
            }
        );
    }

    #[test]
    fn frees_of_unknown_blocks_are_counted_not_errors() {
        let mut heap = HeapModel::default();
        heap.apply(&Event::Free { addr: 0x5000 }, &mut NoModules);
        heap.apply(&realloc(0x6000, 0x7000, 8, &[1]), &mut NoModules);
        assert_eq!(
            heap.counters(),
            Counters {
                allocations: 1,
                frees: 2,
                unmatched_frees: 2,
                unmatched_unmaps: 0
            }
        );
        assert_eq!(usage_of(&heap, &[1]), Some((8, 1)));
    }

    #[test]
    fn stacks_differing_in_one_frame_stay_apart() {
        let mut stacks = Stacks::default();
        let a = stacks.intern(&[1, 2, 3], false, Origin::Malloc, 0, &mut NoModules);
        assert_eq!(
            stacks.intern(&[1, 2, 3], false, Origin::Malloc, 0, &mut NoModules),
            a
        );
        let b = stacks.intern(&[1, 2, 4], false, Origin::Malloc, 0, &mut NoModules);
        let c = stacks.intern(&[1, 2], false, Origin::Malloc, 0, &mut NoModules);
        let d = stacks.intern(&[4, 2, 3], true, Origin::Malloc, 0, &mut NoModules);
        let e = stacks.intern(&[1, 2, 3], false, Origin::MmapFile, 0, &mut NoModules);
        assert_eq!(
            stacks.intern(&[1, 2, 3], false, Origin::MmapFile, 0, &mut NoModules),
            e
        );
        assert_eq!(stacks.get(e).origin, Origin::MmapFile);
        assert_eq!(
            [a, b, c, d, e]
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            5
        );
        assert!(stacks.get(d).truncated);
        assert!(stacks.get(b).addresses().eq([1, 2, 4]));
    }

    #[test]
    fn the_same_frames_once_cut_short_show_as_truncated() {
        let mut stacks = Stacks::default();
        let a = stacks.intern(&[1, 2], false, Origin::Malloc, 0, &mut NoModules);
        assert!(!stacks.get(a).truncated);
        assert_eq!(
            stacks.intern(&[1, 2], true, Origin::Malloc, 0, &mut NoModules),
            a
        );
        assert!(stacks.get(a).truncated);
        // A later whole capture does not undo it.
        assert_eq!(
            stacks.intern(&[1, 2], false, Origin::Malloc, 0, &mut NoModules),
            a
        );
        assert!(stacks.get(a).truncated);
    }

    fn map(
        addr: u64,
        size_bytes: u64,
        source: MapSource,
        frames: &'static [u64],
    ) -> Event<'static> {
        Event::Map {
            ts_ns: addr,
            addr,
            size_bytes,
            source,
            frames,
            truncated: false,
        }
    }

    fn unmap(addr: u64, size_bytes: u64) -> Event<'static> {
        Event::Unmap {
            ts_ns: u64::MAX,
            addr,
            size_bytes,
        }
    }

    fn origin_usage(heap: &HeapModel, origin: Origin) -> Vec<(u64, u64)> {
        let mut found: Vec<_> = heap
            .usage(u64::MAX)
            .into_iter()
            .filter(|u| heap.stacks().get(u.stack).origin == origin)
            .map(|u| (u.outstanding_bytes, u.outstanding_allocations))
            .collect();
        found.sort();
        found
    }

    #[test]
    fn mappings_split_move_and_keep_their_backing() {
        let anon = MapSource::Mmap(Backing::Anonymous);
        let mut heap = HeapModel::default();
        heap.apply(&map(0x10000, 0x4000, anon, &[1]), &mut NoModules);
        heap.apply(
            &map(0x20000, 0x2000, MapSource::Mmap(Backing::File), &[2]),
            &mut NoModules,
        );
        // A hole in the middle: one allocation in two pieces.
        heap.apply(&unmap(0x11000, 0x1000), &mut NoModules);
        assert_eq!(origin_usage(&heap, Origin::Mmap), [(0x3000, 1)]);
        // mremap moves the file mapping and grows it: still a file mapping, now of the
        // mremap's stack.
        heap.apply(
            &map(
                0x30000,
                0x3000,
                MapSource::Remap {
                    old_addr: 0x20000,
                    old_size_bytes: 0x2000,
                    old_kept: false,
                    entry_ts_ns: u64::MAX,
                },
                &[3],
            ),
            &mut NoModules,
        );
        assert_eq!(origin_usage(&heap, Origin::MmapFile), [(0x3000, 1)]);
        assert_eq!(
            heap.usage(u64::MAX)
                .iter()
                .filter(|u| heap.stacks().get(u.stack).addresses().eq([2]))
                .count(),
            0
        );
        // MREMAP_DONTUNMAP keeps the old range; a remap of memory mapped before attach is
        // taken for anonymous memory.
        heap.apply(
            &map(
                0x40000,
                0x1000,
                MapSource::Remap {
                    old_addr: 0x12000,
                    old_size_bytes: 0x1000,
                    old_kept: true,
                    entry_ts_ns: u64::MAX,
                },
                &[4],
            ),
            &mut NoModules,
        );
        heap.apply(
            &map(
                0x50000,
                0x1000,
                MapSource::Remap {
                    old_addr: 0x90000,
                    old_size_bytes: 0x1000,
                    old_kept: false,
                    entry_ts_ns: u64::MAX,
                },
                &[5],
            ),
            &mut NoModules,
        );
        assert_eq!(
            origin_usage(&heap, Origin::Mmap),
            [(0x1000, 1), (0x1000, 1), (0x3000, 1)]
        );
        // The rest of the first mapping goes; an unmap of nothing tracked is counted apart.
        heap.apply(&unmap(0x10000, 0x4000), &mut NoModules);
        heap.apply(&unmap(0x70000, 0x1000), &mut NoModules);
        assert_eq!(
            heap.counters(),
            Counters {
                allocations: 5,
                frees: 2,
                unmatched_frees: 0,
                unmatched_unmaps: 1
            }
        );
        // Heap blocks and mappings never touch each other: a free of a mapped address is an
        // unmatched free, not an unmap.
        heap.apply(&Event::Free { addr: 0x40000 }, &mut NoModules);
        assert_eq!(heap.counters().unmatched_frees, 1);
        assert_eq!(
            origin_usage(&heap, Origin::Mmap),
            [(0x1000, 1), (0x1000, 1)]
        );
    }

    #[test]
    fn a_release_reported_after_its_address_was_reused_releases_the_older_block() {
        let mut heap = HeapModel::default();
        let at = |ts_ns, addr, frames| Event::Alloc {
            ts_ns,
            addr,
            size_bytes: 8,
            old_addr: 0,
            entry_ts_ns: ts_ns,
            frames,
            truncated: false,
        };
        heap.apply(&at(10, 0x1000, &[1]), &mut NoModules);
        // Thread A's realloc(0x1000) begins at 20 and frees the block inside; thread B gets
        // 0x1000 at 30 and reports it first; A's return (moved to 0x2000) comes after.
        heap.apply(&at(30, 0x1000, &[2]), &mut NoModules);
        heap.apply(
            &Event::Alloc {
                ts_ns: 40,
                addr: 0x2000,
                size_bytes: 16,
                old_addr: 0x1000,
                entry_ts_ns: 20,
                frames: &[3],
                truncated: false,
            },
            &mut NoModules,
        );
        assert_eq!(usage_of(&heap, &[1]), None);
        assert_eq!(usage_of(&heap, &[2]), Some((8, 1)), "B's block stays");
        assert_eq!(usage_of(&heap, &[3]), Some((16, 1)));
        // Same, but B frees its block before A's return is seen.
        heap.apply(&at(50, 0x3000, &[1]), &mut NoModules);
        heap.apply(&at(70, 0x3000, &[2]), &mut NoModules);
        heap.apply(&Event::Free { addr: 0x3000 }, &mut NoModules);
        heap.apply(
            &Event::Alloc {
                ts_ns: 90,
                addr: 0x4000,
                size_bytes: 16,
                old_addr: 0x3000,
                entry_ts_ns: 60,
                frames: &[3],
                truncated: false,
            },
            &mut NoModules,
        );
        assert_eq!(usage_of(&heap, &[2]), Some((8, 1)));
        assert_eq!(usage_of(&heap, &[3]), Some((32, 2)));
        assert_eq!(
            heap.counters(),
            Counters {
                allocations: 6,
                frees: 3,
                unmatched_frees: 0,
                unmatched_unmaps: 0
            }
        );
    }

    #[test]
    fn an_unmap_reported_after_its_range_was_mapped_again_leaves_the_new_mapping() {
        let anon = MapSource::Mmap(Backing::Anonymous);
        let mut heap = HeapModel::default();
        // Mapped at 0x10000 (ts 0x10000); munmap begins later, the range is mapped again by
        // another thread (ts 0x30000), and only then is the munmap's event seen.
        heap.apply(&map(0x10000, 0x2000, anon, &[1]), &mut NoModules);
        heap.apply(
            &Event::Map {
                ts_ns: 0x30000,
                addr: 0x10000,
                size_bytes: 0x1000,
                source: anon,
                frames: &[2],
                truncated: false,
            },
            &mut NoModules,
        );
        heap.apply(
            &Event::Unmap {
                ts_ns: 0x20000,
                addr: 0x10000,
                size_bytes: 0x2000,
            },
            &mut NoModules,
        );
        assert_eq!(origin_usage(&heap, Origin::Mmap), [(0x1000, 1)]);
        assert_eq!(heap.counters().frees, 1);
    }

    #[test]
    fn idle_stacks_that_hold_nothing_are_forgotten_and_their_ids_reused() {
        let mut heap = HeapModel::default();
        let code = &mut NoModules;
        // Stack [1]: a block freed at once. [2]: a block still held. [3]: a mapping still
        // mapped. [4]: freed, but its trend is still watched. [5]: freed, but allocated lately.
        heap.apply(&alloc(0x10, 8, &[1]), code);
        heap.apply(&Event::Free { addr: 0x10 }, code);
        heap.apply(&alloc(0x20, 8, &[2]), code);
        heap.apply(
            &map(0x30_000, 4096, MapSource::Mmap(Backing::Anonymous), &[3]),
            code,
        );
        heap.apply(&alloc(0x40, 8, &[4]), code);
        heap.apply(&Event::Free { addr: 0x40 }, code);
        heap.apply(&alloc(0x5000, 8, &[5]), code);
        heap.apply(&Event::Free { addr: 0x5000 }, code);
        // A block replaced at its address whose release was lost.
        heap.apply(&alloc(0x20, 16, &[2]), code);
        let id_of = |heap: &HeapModel, frame: u64| {
            heap.allocated_stacks()
                .map(|(id, _)| id)
                .find(|&id| heap.stacks().get(id).addresses().eq([frame]))
        };
        let watched = id_of(&heap, 4).unwrap();
        let counters = heap.counters();
        assert_eq!(heap.stacks().len(), 5);

        let forgotten = heap.forget_idle_stacks(0x1000, |id| id == watched);
        assert_eq!(forgotten, 1);
        assert_eq!(heap.stacks().len(), 4);
        assert_eq!(id_of(&heap, 1), None);
        for kept in [2, 3, 4, 5] {
            assert!(id_of(&heap, kept).is_some(), "{kept}");
        }
        // What was outstanding and the counters since attach are unchanged.
        assert_eq!(usage_of(&heap, &[2]), Some((16, 1)));
        assert_eq!(usage_of(&heap, &[3]), Some((4096, 1)));
        assert_eq!(heap.counters(), counters);
        // Replaced blocks born before the idle time are given up for lost.
        assert!(heap.replaced.is_empty());

        // A new stack takes the forgotten id, and the same frames come back as a new stack.
        heap.apply(&alloc(0x60, 8, &[6]), code);
        heap.apply(&alloc(0x70, 8, &[1]), code);
        assert_eq!(heap.stacks().len(), 6);
        assert_eq!(usage_of(&heap, &[6]), Some((8, 1)));
        assert_eq!(usage_of(&heap, &[1]), Some((8, 1)));
        let stack = id_of(&heap, 1).unwrap();
        assert_eq!(heap.allocated(stack), Allocated { bytes: 8, count: 1 });
        // Nothing is idle before the given time.
        assert_eq!(heap.forget_idle_stacks(0, |_| false), 0);
    }
}
