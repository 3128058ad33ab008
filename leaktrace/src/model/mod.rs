//! The heap model: the events it applies, the distinct call stacks, the blocks and mapped
//! ranges outstanding since attach. It knows nothing of BPF, symbols or terminals.

pub mod event;
pub mod heap;
pub mod live;
pub mod location;
pub mod mapped;
pub mod stack_table;

/// Keys are addresses and stacks from the target: foldhash (seeded per process) hashes them
/// several times faster than SipHash, which took half of the per-event time.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
