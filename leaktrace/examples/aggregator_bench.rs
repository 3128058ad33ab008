//! The aggregator alone, for `cargo xtask bench`: a synthetic stream of ring-buffer records,
//! decoded and applied to the heap model on one core, as the intake task does; and the
//! user-space memory per live allocation, counted by a global allocator that tracks the bytes
//! in use (requested sizes: malloc's own headers are left out; they are ~0.1% here, as nearly
//! all of it is two hash tables).
//!
//! Prints `key value` lines that xtask parses:
//!     events_per_s CPU WALL     (one line per run: per second of CPU time, of wall time)
//!     bare_map_events_per_s N   (one line per run: the same addresses into a bare hash map)
//!     apply_only_events_per_s N (one line per run: the model without decoding records)
//!     bytes_per_live L N        (one line per live-set size L)

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    mem::{offset_of, size_of},
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use leaktrace::{
    intake::decode::decode,
    model::{event::Event, heap::HeapModel, location::NoModules},
};
use leaktrace_common::{AllocEvent, EVENT_ALLOC, EVENT_FREE, FreeEvent, MAX_STACK_DEPTH, call};

struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        IN_USE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract, unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract, unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        IN_USE.fetch_add(new_size, Ordering::Relaxed);
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract, unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Distinct stacks in the stream, and their depths: a service's allocation sites.
const STACKS: usize = 1000;
const MIN_DEPTH: usize = 8;
const MAX_DEPTH: usize = 32;
/// Outstanding allocations while events/s are measured.
const LIVE: usize = 1_000_000;
/// Events per timed run.
const EVENTS: usize = 4_000_000;
const RUNS: usize = 5;

/// xorshift64*: deterministic, and cheap next to what is measured.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One allocation record per stack, as BPF writes them; `addr` and `ts_ns` are patched per event.
fn alloc_records(rng: &mut Rng) -> Vec<Vec<u8>> {
    (0..STACKS)
        .map(|_| {
            let depth = MIN_DEPTH + rng.below(MAX_DEPTH - MIN_DEPTH + 1);
            let mut event = AllocEvent {
                kind: EVENT_ALLOC,
                call: call::MALLOC,
                pid_tgid: 7 << 32 | 7,
                ts_ns: 0,
                addr: 0,
                size_bytes: 16 + rng.below(4096) as u64,
                old_addr: 0,
                old_size_bytes: 0,
                entry_ts_ns: 0,
                stack_bytes: 0,
                stack_truncated: 0,
                frames: [0; MAX_STACK_DEPTH],
            };
            let frames: Vec<u64> = (0..depth)
                .map(|_| 0x5555_0000_0000 + rng.below(1 << 24) as u64)
                .collect();
            event.set_frames(&frames);
            event.record()
        })
        .collect()
}

/// The events of a steady state: each allocation at a new address, each free of the oldest live
/// block, so the live set stays at its size.
struct Stream {
    rng: Rng,
    records: Vec<Vec<u8>>,
    free: Vec<u8>,
    live: std::collections::VecDeque<u64>,
    next_addr: u64,
    ts_ns: u64,
    scratch: Vec<u64>,
}

impl Stream {
    fn new() -> Self {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let records = alloc_records(&mut rng);
        let free = FreeEvent {
            kind: EVENT_FREE,
            _pad: 0,
            pid_tgid: 7 << 32 | 7,
            addr: 0,
        }
        .record();
        Self {
            rng,
            records,
            free,
            live: std::collections::VecDeque::new(),
            next_addr: 0x5600_0000_0000,
            ts_ns: 1,
            scratch: Vec::with_capacity(MAX_STACK_DEPTH),
        }
    }

    fn alloc(&mut self, heap: &mut HeapModel) {
        let stack = self.rng.below(STACKS);
        let record = &mut self.records[stack];
        self.next_addr += 16 * (1 + (self.ts_ns & 7));
        self.ts_ns += 1;
        let addr_at = offset_of!(AllocEvent, addr);
        let ts_at = offset_of!(AllocEvent, ts_ns);
        record[addr_at..addr_at + 8].copy_from_slice(&self.next_addr.to_ne_bytes());
        record[ts_at..ts_at + 8].copy_from_slice(&self.ts_ns.to_ne_bytes());
        let event = decode(record, &mut self.scratch).expect("a well-formed record");
        heap.apply(&event, &mut NoModules);
        self.live.push_back(self.next_addr);
    }

    fn free_oldest(&mut self, heap: &mut HeapModel) {
        let Some(addr) = self.live.pop_front() else {
            return;
        };
        let addr_at = offset_of!(FreeEvent, addr);
        self.free[addr_at..addr_at + 8].copy_from_slice(&addr.to_ne_bytes());
        let event = decode(&self.free, &mut self.scratch).expect("a well-formed record");
        heap.apply(&event, &mut NoModules);
    }
}

/// This thread's CPU time: the machine is shared, and time spent preempted is not the
/// aggregator's cost.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Events per second of CPU time, and per second of wall time.
fn events_per_s(live: usize) -> (f64, f64) {
    let mut stream = Stream::new();
    let mut heap = HeapModel::default();
    for _ in 0..live {
        stream.alloc(&mut heap);
    }
    let wall = Instant::now();
    let cpu = thread_cpu_s();
    for _ in 0..EVENTS / 2 {
        stream.alloc(&mut heap);
        stream.free_oldest(&mut heap);
    }
    let cpu = thread_cpu_s() - cpu;
    let wall = wall.elapsed().as_secs_f64();
    black_box(heap.counters());
    (EVENTS as f64 / cpu, EVENTS as f64 / wall)
}

/// The heap model without decoding: the same stream as `events_per_s`, applied as events built
/// from stacks held in memory, which splits the cost between reading records and the model.
fn apply_only_events_per_s(live: usize) -> f64 {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let stacks: Vec<Vec<u64>> = (0..STACKS)
        .map(|_| {
            let depth = MIN_DEPTH + rng.below(MAX_DEPTH - MIN_DEPTH + 1);
            (0..depth)
                .map(|_| 0x5555_0000_0000 + rng.below(1 << 24) as u64)
                .collect()
        })
        .collect();
    let mut heap = HeapModel::default();
    let mut queue = std::collections::VecDeque::new();
    let mut next_addr = 0x5600_0000_0000u64;
    let mut ts_ns = 1u64;
    let mut alloc = |heap: &mut HeapModel, queue: &mut std::collections::VecDeque<u64>| {
        next_addr += 16 * (1 + (ts_ns & 7));
        ts_ns += 1;
        heap.apply(
            &Event::Alloc {
                ts_ns,
                addr: next_addr,
                size_bytes: 64,
                old_addr: 0,
                entry_ts_ns: ts_ns,
                frames: &stacks[rng.below(STACKS)],
                truncated: false,
            },
            &mut NoModules,
        );
        queue.push_back(next_addr);
    };
    for _ in 0..live {
        alloc(&mut heap, &mut queue);
    }
    let cpu = thread_cpu_s();
    for _ in 0..EVENTS / 2 {
        alloc(&mut heap, &mut queue);
        let addr = queue.pop_front().expect("a live block");
        heap.apply(&Event::Free { addr }, &mut NoModules);
    }
    EVENTS as f64 / (thread_cpu_s() - cpu)
}

/// The floor under `events_per_s`: the same stream of addresses into a bare hash map of the same
/// entry size (no decoding, no stacks). With a live set far larger than the caches, each event
/// costs a random access to a table in DRAM, model or not.
fn bare_map_events_per_s(live: usize) -> f64 {
    let mut map: std::collections::HashMap<u64, (u64, u64, u32), foldhash::fast::RandomState> =
        std::collections::HashMap::default();
    let mut queue = std::collections::VecDeque::new();
    let mut next_addr = 0x5600_0000_0000u64;
    let mut ts = 1u64;
    let mut alloc = |map: &mut std::collections::HashMap<_, _, _>,
                     queue: &mut std::collections::VecDeque<u64>| {
        next_addr += 16 * (1 + (ts & 7));
        ts += 1;
        map.insert(next_addr, (64u64, ts, (ts % 1000) as u32));
        queue.push_back(next_addr);
    };
    for _ in 0..live {
        alloc(&mut map, &mut queue);
    }
    let cpu = thread_cpu_s();
    for _ in 0..EVENTS / 2 {
        alloc(&mut map, &mut queue);
        let oldest = queue.pop_front().expect("a live block");
        black_box(map.remove(&oldest));
    }
    EVENTS as f64 / (thread_cpu_s() - cpu)
}

/// Bytes the heap model holds per live allocation once `live` are outstanding, stacks included.
fn bytes_per_live(live: usize) -> f64 {
    let mut stream = Stream::new();
    let before = IN_USE.load(Ordering::Relaxed);
    let mut heap = HeapModel::default();
    for _ in 0..live {
        stream.alloc(&mut heap);
    }
    let after = IN_USE.load(Ordering::Relaxed);
    // The stream's own queue of live addresses is bench bookkeeping, not the model's.
    let bookkeeping = stream.live.capacity() * size_of::<u64>();
    black_box(&heap);
    (after - before - bookkeeping) as f64 / live as f64
}

fn main() {
    // 917_505 is one past a hash table's growth point (7/8 of 2^20): the emptiest table, so
    // the most bytes per entry; 1_000_000 is a round figure.
    for live in [917_505, 1_000_000] {
        println!("bytes_per_live {live} {:.1}", bytes_per_live(live));
    }
    let live = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(LIVE);
    for _ in 0..RUNS {
        let (cpu, wall) = events_per_s(live);
        println!("events_per_s {cpu:.0} {wall:.0}");
        println!("bare_map_events_per_s {:.0}", bare_map_events_per_s(live));
        println!(
            "apply_only_events_per_s {:.0}",
            apply_only_events_per_s(live)
        );
    }
}
