//! The heap model: every allocation outstanding since attach, and the stacks that made them.
//! It knows nothing of BPF, symbols or terminals.

use crate::event::Event;

/// Keys are addresses and stacks from the target: foldhash (seeded per process) hashes them
/// several times faster than SipHash, which took half of the per-event time.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Index of a distinct call stack in [`Stacks`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackId(pub u32);

/// A distinct call stack: return addresses, innermost first.
#[derive(Debug, PartialEq, Eq)]
pub struct Stack {
    pub frames: Box<[u64]>,
    /// The capture hit its depth limit: outer frames are missing.
    pub truncated: bool,
}

/// Interns stacks, comparing every frame: two different stacks never share an id.
#[derive(Debug, Default)]
pub struct Stacks {
    ids: HashMap<Box<[u64]>, StackId>,
    stacks: Vec<Stack>,
}

impl Stacks {
    /// Truncation is not part of the identity: a stack is truncated exactly when its capture
    /// filled the whole buffer, so equal frames have equal truncation.
    pub fn intern(&mut self, frames: &[u64], truncated: bool) -> StackId {
        if let Some(&id) = self.ids.get(frames) {
            return id;
        }
        let id =
            StackId(u32::try_from(self.stacks.len()).expect("fewer than 2^32 distinct stacks"));
        self.stacks.push(Stack {
            frames: frames.into(),
            truncated,
        });
        self.ids.insert(frames.into(), id);
        id
    }

    pub fn get(&self, id: StackId) -> &Stack {
        &self.stacks[id.0 as usize]
    }
}

/// A block allocated since attach and not freed yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Live {
    size_bytes: u64,
    ts_ns: u64,
    stack: StackId,
}

/// Counters since attach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Calls that returned a block.
    pub allocations: u64,
    /// Blocks released (free, and realloc's old block).
    pub frees: u64,
    /// Releases of blocks that were allocated before attach (or whose allocation was lost).
    pub unmatched_frees: u64,
}

/// Outstanding memory of one stack at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackUsage {
    pub stack: StackId,
    pub outstanding_bytes: u64,
    pub outstanding_allocations: u64,
    pub oldest_ts_ns: u64,
}

#[derive(Debug, Default)]
pub struct HeapModel {
    live: HashMap<u64, Live>,
    stacks: Stacks,
    counters: Counters,
}

impl HeapModel {
    pub fn apply(&mut self, event: &Event<'_>) {
        match *event {
            Event::Alloc {
                ts_ns,
                addr,
                size_bytes,
                old_addr,
                frames,
                truncated,
            } => {
                if old_addr != 0 {
                    self.release(old_addr);
                }
                if addr != 0 {
                    let stack = self.stacks.intern(frames, truncated);
                    self.counters.allocations += 1;
                    // An address still live means its free was lost; the new block replaces it.
                    self.live.insert(
                        addr,
                        Live {
                            size_bytes,
                            ts_ns,
                            stack,
                        },
                    );
                }
            }
            Event::Free { addr, .. } => self.release(addr),
        }
    }

    fn release(&mut self, addr: u64) {
        self.counters.frees += 1;
        if self.live.remove(&addr).is_none() {
            self.counters.unmatched_frees += 1;
        }
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn stacks(&self) -> &Stacks {
        &self.stacks
    }

    /// Outstanding bytes and allocations per stack, in no particular order, of the blocks
    /// allocated at or before `born_by_ns`.
    pub fn usage(&self, born_by_ns: u64) -> Vec<StackUsage> {
        let mut by_stack: HashMap<StackId, StackUsage> = HashMap::default();
        for live in self.live.values().filter(|live| live.ts_ns <= born_by_ns) {
            let usage = by_stack.entry(live.stack).or_insert(StackUsage {
                stack: live.stack,
                outstanding_bytes: 0,
                outstanding_allocations: 0,
                oldest_ts_ns: u64::MAX,
            });
            usage.outstanding_bytes += live.size_bytes;
            usage.outstanding_allocations += 1;
            usage.oldest_ts_ns = usage.oldest_ts_ns.min(live.ts_ns);
        }
        by_stack.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(addr: u64, size_bytes: u64, frames: &'static [u64]) -> Event<'static> {
        Event::Alloc {
            ts_ns: addr,
            addr,
            size_bytes,
            old_addr: 0,
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
            ts_ns: 99,
            addr,
            size_bytes,
            old_addr,
            frames,
            truncated: false,
        }
    }

    fn usage_of(heap: &HeapModel, frames: &[u64]) -> Option<(u64, u64)> {
        heap.usage(u64::MAX)
            .into_iter()
            .find(|u| &*heap.stacks().get(u.stack).frames == frames)
            .map(|u| (u.outstanding_bytes, u.outstanding_allocations))
    }

    #[test]
    fn a_leak_stays_and_churn_goes() {
        let mut heap = HeapModel::default();
        for i in 0..10 {
            heap.apply(&alloc(0x1000 + i * 0x100, 64, &[1, 2]));
            heap.apply(&alloc(0x9000, 32, &[3, 2]));
            heap.apply(&Event::Free {
                ts_ns: 0,
                addr: 0x9000,
            });
        }
        assert_eq!(usage_of(&heap, &[1, 2]), Some((640, 10)));
        assert_eq!(usage_of(&heap, &[3, 2]), None);
        assert_eq!(
            heap.counters(),
            Counters {
                allocations: 20,
                frees: 10,
                unmatched_frees: 0
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
    fn usage_can_leave_out_young_blocks() {
        let mut heap = HeapModel::default();
        heap.apply(&alloc(0x1000, 10, &[1]));
        heap.apply(&alloc(0x2000, 20, &[1]));
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
        heap.apply(&alloc(0x1000, 10, &[1]));
        // Moved: the old block is released, the new one belongs to the realloc's stack.
        heap.apply(&realloc(0x1000, 0x2000, 20, &[2]));
        assert_eq!(usage_of(&heap, &[1]), None);
        assert_eq!(usage_of(&heap, &[2]), Some((20, 1)));
        // In place.
        heap.apply(&realloc(0x2000, 0x2000, 30, &[2]));
        assert_eq!(usage_of(&heap, &[2]), Some((30, 1)));
        // realloc(p, 0): released, nothing returned.
        heap.apply(&realloc(0x2000, 0, 0, &[2]));
        assert!(heap.usage(u64::MAX).is_empty());
        assert_eq!(
            heap.counters(),
            Counters {
                allocations: 3,
                frees: 3,
                unmatched_frees: 0
            }
        );
    }

    #[test]
    fn frees_of_unknown_blocks_are_counted_not_errors() {
        let mut heap = HeapModel::default();
        heap.apply(&Event::Free {
            ts_ns: 0,
            addr: 0x5000,
        });
        heap.apply(&realloc(0x6000, 0x7000, 8, &[1]));
        assert_eq!(
            heap.counters(),
            Counters {
                allocations: 1,
                frees: 2,
                unmatched_frees: 2
            }
        );
        assert_eq!(usage_of(&heap, &[1]), Some((8, 1)));
    }

    #[test]
    fn stacks_differing_in_one_frame_stay_apart() {
        let mut stacks = Stacks::default();
        let a = stacks.intern(&[1, 2, 3], false);
        assert_eq!(stacks.intern(&[1, 2, 3], false), a);
        let b = stacks.intern(&[1, 2, 4], false);
        let c = stacks.intern(&[1, 2], false);
        let d = stacks.intern(&[4, 2, 3], true);
        assert_eq!(
            [a, b, c, d]
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            4
        );
        assert!(stacks.get(d).truncated);
        assert_eq!(&*stacks.get(b).frames, &[1, 2, 4]);
    }
}
