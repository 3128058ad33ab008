//! What a report says, before symbolization: totals, and the top stacks with their trend.

use std::sync::Arc;

use super::trends::{Kind, Trends};
use crate::model::{
    heap::{Allocated, Counters, HeapModel, StackUsage},
    location::Location,
    stack_table::{Origin, StackId},
};

/// The order of stacks in a report (`--sort`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    /// Outstanding bytes, biggest first.
    #[default]
    Bytes,
    /// Outstanding allocations, most first.
    Count,
    /// Growth in bytes/s over the last reports, fastest first.
    Growth,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    pub outstanding_bytes: u64,
    pub outstanding_allocations: u64,
    pub allocations: u64,
    pub frees: u64,
    pub lost_events: u64,
    pub unmatched_frees: u64,
    /// Of `outstanding_bytes`, the part in anonymous mappings (mmap/mremap).
    pub mapped_bytes: u64,
    /// Mappings of files: outstanding, but not heap memory, so not in `outstanding_bytes`.
    pub file_mapped_bytes: u64,
    pub file_mappings: u64,
    /// pymalloc's arenas mapped since attach: not in `outstanding_bytes`, which counts the
    /// objects carved from them one by one.
    pub pymalloc_arena_bytes: u64,
    pub pymalloc_arenas: u64,
    /// Allocator returns seen without their entry (calls in flight at attach): not counted.
    pub unpaired_returns: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StackSummary {
    pub outstanding_bytes: u64,
    pub outstanding_allocations: u64,
    pub growth_bytes_per_s: f64,
    pub oldest_age_s: f64,
    pub kind: Kind,
    /// Everything this stack allocated since attach, freed or not.
    pub allocated: Allocated,
    /// Return addresses, innermost first, located.
    pub frames: Arc<[Location]>,
    pub truncated: bool,
    pub origin: Origin,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub pid: u32,
    pub timestamp_ms: u64,
    pub elapsed_s: f64,
    pub totals: Totals,
    /// How many stacks hold memory; `stacks` is the top of them.
    pub stack_count: usize,
    pub stacks: Vec<StackSummary>,
    /// The target's resident set (VmRSS) now, when it could be read.
    pub rss_bytes: Option<u64>,
    /// How fast the resident set changed over the trend window (least squares).
    pub rss_growth_bytes_per_s: Option<f64>,
    /// The top `--metrics-top` stacks holding memory, in the order of `stacks` (empty without
    /// `--metrics`).
    pub watched: Vec<StackSummary>,
    /// Stacks classified `leak`, listed in `stacks` or not (`--top`).
    pub leak_stacks: usize,
    /// The last report of the trace.
    pub last: bool,
    /// `--sample-bytes`: the numbers about the malloc family's blocks are estimates from a
    /// sample of them (see `heap::Sampling`).
    pub sample_bytes: Option<u64>,
    /// What the report does not see besides lost events, each said in a sentence (a child
    /// followed after its fork, children that could not be followed): the report is then
    /// incomplete.
    pub gaps: Vec<String>,
}

impl Snapshot {
    /// Any stack is a leak, shown or beyond `--top` (`--fail-on-leak`).
    pub fn has_leak(&self) -> bool {
        self.leak_stacks > 0
    }
}

/// Which stacks a report lists, and in what order: fixed for a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// Only allocations at least this old count (`--min-age`).
    pub min_age_ns: u64,
    /// Only blocks of these sizes count (`--min-size`, `--max-size`).
    pub sizes: std::ops::RangeInclusive<u64>,
    pub top: usize,
    /// Stacks exported to Prometheus (`--metrics-top`; 0 without `--metrics`).
    pub watch_top: usize,
    pub sort: SortKey,
    /// Also list, after the top stacks, the stacks that allocated since attach but hold
    /// nothing now (pprof's alloc_space and alloc_objects).
    pub with_freed: bool,
    /// List stacks holding file mappings (`--file-mappings`); they are always totalled apart.
    pub file_mappings: bool,
    /// List stacks holding pymalloc's arenas (`--pymalloc-arenas`); they are always totalled
    /// apart.
    pub pymalloc_arenas: bool,
}

impl Selection {
    /// Whether stacks of `origin` are listed: memory totalled apart only on request.
    fn lists(&self, origin: Origin) -> bool {
        match origin {
            Origin::Malloc | Origin::Mmap => true,
            Origin::MmapFile => self.file_mappings,
            Origin::PymallocArena => self.pymalloc_arenas,
        }
    }
}

/// What is true when a snapshot is taken, besides the heap model.
pub struct Moment {
    pub pid: u32,
    pub timestamp_ms: u64,
    pub elapsed_s: f64,
    pub now_ns: u64,
    pub lost_events: u64,
    pub unpaired_returns: u64,
    /// The target's VmRSS now.
    pub rss_bytes: Option<u64>,
    /// The last report of the trace.
    pub last: bool,
    /// See [`Snapshot::gaps`].
    pub gaps: Vec<String>,
}

pub fn snapshot(
    heap: &HeapModel,
    trends: &mut Trends,
    selection: &Selection,
    now: &Moment,
) -> Snapshot {
    let mut usage = heap.usage_of_sizes(
        now.now_ns.saturating_sub(selection.min_age_ns),
        selection.sizes.clone(),
    );
    trends.observe(now.elapsed_s, &usage);
    let rss_growth_bytes_per_s = now
        .rss_bytes
        .and_then(|rss| trends.observe_rss(now.elapsed_s, rss));
    let Counters {
        allocations,
        frees,
        unmatched_frees,
        unmatched_unmaps: _,
    } = heap.counters();
    let origin = |u: &StackUsage| heap.stacks().get(u.stack).origin;
    let sum = |wanted: &[Origin], field: fn(&StackUsage) -> u64| -> u64 {
        usage
            .iter()
            .filter(|u| wanted.contains(&origin(u)))
            .map(field)
            .fold(0u64, u64::saturating_add)
    };
    let in_memory = [Origin::Malloc, Origin::Mmap];
    let totals = Totals {
        outstanding_bytes: sum(&in_memory, |u| u.outstanding_bytes),
        outstanding_allocations: sum(&in_memory, |u| u.outstanding_allocations),
        allocations,
        frees,
        lost_events: now.lost_events,
        unpaired_returns: now.unpaired_returns,
        unmatched_frees,
        mapped_bytes: sum(&[Origin::Mmap], |u| u.outstanding_bytes),
        file_mapped_bytes: sum(&[Origin::MmapFile], |u| u.outstanding_bytes),
        file_mappings: sum(&[Origin::MmapFile], |u| u.outstanding_allocations),
        pymalloc_arena_bytes: sum(&[Origin::PymallocArena], |u| u.outstanding_bytes),
        pymalloc_arenas: sum(&[Origin::PymallocArena], |u| u.outstanding_allocations),
    };
    usage.retain(|u| selection.lists(origin(u)));
    let stack_count = usage.len();
    // Every stack is classified before sorting: `--sort growth` needs the growth of all.
    let mut stacks: Vec<(StackId, StackSummary)> = usage
        .iter()
        .map(|u| {
            let oldest_age_s = now.now_ns.saturating_sub(u.oldest_ts_ns) as f64 / 1e9;
            let (growth_bytes_per_s, kind) = trends.classify(u.stack, oldest_age_s);
            let stack = heap.stacks().get(u.stack);
            let summary = StackSummary {
                outstanding_bytes: u.outstanding_bytes,
                outstanding_allocations: u.outstanding_allocations,
                growth_bytes_per_s,
                oldest_age_s,
                kind,
                allocated: heap.allocated(u.stack),
                frames: stack.frames.clone(),
                truncated: stack.truncated,
                origin: stack.origin,
            };
            (u.stack, summary)
        })
        .collect();
    // Biggest first by the chosen key, then by bytes; ties broken by stack id so that output
    // is stable.
    stacks.sort_unstable_by(|(ida, a), (idb, b)| {
        let by_key = match selection.sort {
            SortKey::Bytes => std::cmp::Ordering::Equal,
            SortKey::Count => b.outstanding_allocations.cmp(&a.outstanding_allocations),
            SortKey::Growth => b.growth_bytes_per_s.total_cmp(&a.growth_bytes_per_s),
        };
        by_key
            .then(b.outstanding_bytes.cmp(&a.outstanding_bytes))
            .then(ida.cmp(idb))
    });
    let leak_stacks = stacks.iter().filter(|(_, s)| s.kind == Kind::Leak).count();
    let watched = stacks
        .iter()
        .take(selection.watch_top)
        .map(|(_, s)| s.clone())
        .collect();
    stacks.truncate(selection.top);
    if selection.with_freed {
        let holding: std::collections::HashSet<StackId> = usage.iter().map(|u| u.stack).collect();
        for (id, allocated) in heap.allocated_stacks() {
            if holding.contains(&id) {
                continue;
            }
            let stack = heap.stacks().get(id);
            if !selection.lists(stack.origin) {
                continue;
            }
            let (growth_bytes_per_s, kind) = trends.classify(id, 0.0);
            stacks.push((
                id,
                StackSummary {
                    outstanding_bytes: 0,
                    outstanding_allocations: 0,
                    growth_bytes_per_s,
                    oldest_age_s: 0.0,
                    kind,
                    allocated,
                    frames: stack.frames.clone(),
                    truncated: stack.truncated,
                    origin: stack.origin,
                },
            ));
        }
    }
    Snapshot {
        pid: now.pid,
        timestamp_ms: now.timestamp_ms,
        elapsed_s: now.elapsed_s,
        totals,
        stack_count,
        stacks: stacks.into_iter().map(|(_, s)| s).collect(),
        rss_bytes: now.rss_bytes,
        rss_growth_bytes_per_s,
        watched,
        leak_stacks,
        last: now.last,
        gaps: now.gaps.clone(),
        sample_bytes: heap.sampling().map(|s| s.sample_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{event::Event, location::NoModules};

    /// The default selection, and a moment `elapsed_s` after attach.
    fn input(elapsed_s: f64) -> (Selection, Moment) {
        (
            Selection {
                min_age_ns: 0,
                sizes: 0..=u64::MAX,
                top: 10,
                watch_top: 0,
                sort: SortKey::Bytes,
                with_freed: false,
                file_mappings: false,
                pymalloc_arenas: false,
            },
            Moment {
                pid: 1,
                timestamp_ms: 0,
                elapsed_s,
                now_ns: (elapsed_s * 1e9) as u64,
                lost_events: 0,
                unpaired_returns: 0,
                rss_bytes: None,
                last: false,
                gaps: Vec::new(),
            },
        )
    }

    fn take(heap: &HeapModel, trends: &mut Trends, input: &(Selection, Moment)) -> Snapshot {
        snapshot(heap, trends, &input.0, &input.1)
    }

    fn alloc(heap: &mut HeapModel, addr: u64, ts_s: f64, frames: &'static [u64]) {
        let ts_ns = (ts_s * 1e9) as u64;
        heap.apply(
            &Event::Alloc {
                ts_ns,
                addr,
                size_bytes: 100,
                old_addr: 0,
                entry_ts_ns: 0,
                frames,
                truncated: false,
            },
            &mut NoModules,
        );
    }

    #[test]
    fn file_mappings_and_arenas_are_totalled_apart_and_listed_only_on_request() {
        use crate::model::event::{Backing, MapSource};
        let mut heap = HeapModel::default();
        alloc(&mut heap, 0x1000, 0.5, &[1]);
        for (addr, backing, frames) in [
            (0x10_000, Backing::Anonymous, &[2u64] as &'static [u64]),
            (0x20_000, Backing::File, &[3]),
            (0x30_000, Backing::PymallocArena, &[4]),
            (0x40_000, Backing::PymallocArena, &[4]),
        ] {
            heap.apply(
                &Event::Map {
                    ts_ns: 1,
                    addr,
                    size_bytes: 8192,
                    source: MapSource::Mmap(backing),
                    frames,
                    truncated: false,
                },
                &mut NoModules,
            );
        }
        let mut trends = Trends::new(10, 0.0);
        let snap = take(&heap, &mut trends, &input(1.0));
        assert_eq!(
            (
                snap.totals.outstanding_bytes,
                snap.totals.outstanding_allocations,
                snap.totals.mapped_bytes,
                snap.totals.file_mapped_bytes,
                snap.totals.file_mappings,
                snap.totals.pymalloc_arena_bytes,
                snap.totals.pymalloc_arenas,
            ),
            (8192 + 100, 2, 8192, 8192, 1, 16384, 2)
        );
        let origins: Vec<Origin> = snap.stacks.iter().map(|s| s.origin).collect();
        assert_eq!(origins, [Origin::Mmap, Origin::Malloc]);
        assert_eq!(snap.stack_count, 2);

        let mut inp = input(2.0);
        inp.0.file_mappings = true;
        let listed = take(&heap, &mut trends, &inp);
        assert_eq!(listed.totals, snap.totals);
        assert_eq!(listed.stack_count, 3);
        assert!(listed.stacks.iter().any(|s| s.origin == Origin::MmapFile));

        let mut inp = input(3.0);
        inp.0.pymalloc_arenas = true;
        let listed = take(&heap, &mut trends, &inp);
        assert_eq!(listed.totals, snap.totals);
        assert_eq!(listed.stack_count, 3);
        let arenas: Vec<_> = listed
            .stacks
            .iter()
            .filter(|s| s.origin == Origin::PymallocArena)
            .map(|s| (s.outstanding_bytes, s.outstanding_allocations))
            .collect();
        assert_eq!(arenas, [(16384, 2)]);
    }

    #[test]
    fn steady_growth_is_a_leak_a_plateau_is_stable_and_a_freed_burst_shrinks() {
        let mut heap = HeapModel::default();
        let mut trends = Trends::new(10, 0.0);
        let mut last = None;
        for second in 1..=6u64 {
            let t = second as f64;
            // Leak: 2 blocks a second, never freed.
            alloc(&mut heap, 0x10_000 + second * 2, t - 0.5, &[1]);
            alloc(&mut heap, 0x10_001 + second * 2, t - 0.5, &[1]);
            // Cache: fills in the first two seconds, then holds.
            if second <= 2 {
                alloc(&mut heap, 0x20_000 + second, t - 0.5, &[2]);
            }
            // Burst: allocated in second 1, freed in second 4.
            if second == 1 {
                alloc(&mut heap, 0x30_000, 0.5, &[3]);
            }
            if second == 4 {
                heap.apply(&Event::Free { addr: 0x30_000 }, &mut NoModules);
            }
            last = Some(take(&heap, &mut trends, &input(t)));
        }
        let snap = last.unwrap();
        assert!(snap.has_leak());
        assert_eq!(snap.leak_stacks, 1);
        assert_eq!(snap.totals.outstanding_bytes, 12 * 100 + 2 * 100);
        assert_eq!(snap.stack_count, 2);
        let leak = &snap.stacks[0];
        assert_eq!(*leak.frames, [Location::unknown(1)]);
        assert_eq!(leak.kind, Kind::Leak);
        assert!(
            (leak.growth_bytes_per_s - 200.0).abs() < 1e-6,
            "{}",
            leak.growth_bytes_per_s
        );
        assert!((leak.oldest_age_s - 5.5).abs() < 1e-6);
        let cache = &snap.stacks[1];
        assert_eq!(cache.kind, Kind::Stable);
        assert_eq!(cache.growth_bytes_per_s, 0.0);
    }

    /// The kind of a stack whose outstanding bytes were `series`, one sample a second, that
    /// still holds a block from its first second.
    fn kind_of(series: &[u64]) -> Kind {
        let samples: Vec<(f64, u64)> = (1..).map(f64::from).zip(series.iter().copied()).collect();
        kind_at(&samples, series.len() as f64)
    }

    /// The kind of a stack whose outstanding bytes were `samples` (seconds since attach,
    /// bytes), whose oldest block is `oldest_age_s` old at the last of them.
    fn kind_at(samples: &[(f64, u64)], oldest_age_s: f64) -> Kind {
        let mut trends = Trends::new(10, 0.0);
        for &(elapsed_s, bytes) in samples {
            let usage = [StackUsage {
                stack: StackId(0),
                outstanding_bytes: bytes,
                outstanding_allocations: 1,
                oldest_ts_ns: 0,
            }];
            trends.observe(elapsed_s, if bytes == 0 { &[] } else { &usage });
        }
        trends.classify(StackId(0), oldest_age_s).1
    }

    #[test]
    fn the_demos_churning_cache_is_stable_and_its_leak_a_leak() {
        // `cargo xtask demo`: a report every 2 s and the final one at 7 s. The session cache
        // (256 blocks of 1024 bytes, one replaced per request) is full 0.3 s after attach;
        // under --min-age 0.01 the requests of the last 10 ms are left out, 5 to 9 of them, so
        // its level jitters by 1.6% around a plateau whose first sample was its only earlier
        // peak. Its oldest block is 0.3 s old: everything it held 3 s ago has been freed.
        let at_reports = |bytes: &[u64], oldest_age_s: f64| {
            let samples: Vec<(f64, u64)> = [2.0, 4.0, 6.0, 7.0]
                .into_iter()
                .zip(bytes.iter().copied())
                .collect();
            kind_at(&samples, oldest_age_s)
        };
        let cache = [252_928, 257_024, 252_928, 252_928];
        assert_eq!(at_reports(&cache, 0.3), Kind::Stable);
        let cache = [248_832, 252_928, 250_880, 257_024];
        assert_eq!(at_reports(&cache, 0.4), Kind::Stable);
        // The same levels kept by blocks that are never freed: above the earlier peak by
        // more than 1%, that is growth.
        assert_eq!(at_reports(&cache, 7.0), Kind::Growing);
        // A stack whose blocks all come and go but that grows by more than 5% (a backlog):
        // growing, not stable.
        let backlog = [240_000, 250_000, 260_000, 265_000];
        assert_eq!(at_reports(&backlog, 0.3), Kind::Growing);
        // Before its third report the cache has gone from nothing to full: too early to say.
        assert_eq!(at_reports(&cache[..2], 0.3), Kind::Growing);
        // The audit list: 512 bytes a request, never freed.
        let leak = [820_736, 1_648_128, 2_465_792, 2_881_536];
        assert_eq!(at_reports(&leak, 7.0), Kind::Leak);
    }

    #[test]
    fn a_full_cache_that_jitters_below_its_peak_is_stable_a_leak_is_not() {
        // Filled to 250, then an entry or three missing at times.
        assert_eq!(kind_of(&[100, 250, 248, 247, 247, 250]), Kind::Stable);
        assert_eq!(kind_of(&[100, 250, 240, 245, 250, 238]), Kind::Stable);
        // Above its old peak by more than 1%: growing again.
        assert_eq!(kind_of(&[100, 250, 248, 250, 255, 255]), Kind::Growing);
        // A leak that paused for a sample makes a new high: not stable.
        assert_eq!(kind_of(&[100, 110, 120, 130, 130, 133]), Kind::Growing);
        // Strictly rising with old blocks kept: a leak.
        assert_eq!(kind_of(&[100, 110, 120, 130, 140]), Kind::Leak);
        // Jitter wider than 5%: not called stable.
        assert_eq!(kind_of(&[100, 250, 250, 200, 250, 230]), Kind::Growing);
    }

    #[test]
    fn a_leak_beyond_top_still_counts_for_fail_on_leak() {
        let mut heap = HeapModel::default();
        let mut trends = Trends::new(10, 0.0);
        let mut snap = None;
        for second in 1..=5u64 {
            alloc(&mut heap, second, second as f64 - 0.5, &[1]);
            let mut inp = input(second as f64);
            inp.0.top = 0;
            snap = Some(take(&heap, &mut trends, &inp));
        }
        let snap = snap.unwrap();
        assert!(snap.stacks.is_empty());
        assert_eq!(snap.stack_count, 1);
        assert!(snap.has_leak());
    }

    #[test]
    fn a_new_stack_is_growing_not_yet_a_leak() {
        let mut heap = HeapModel::default();
        let mut trends = Trends::new(10, 0.0);
        alloc(&mut heap, 1, 0.5, &[1]);
        let snap = take(&heap, &mut trends, &input(1.0));
        assert_eq!(snap.stacks[0].kind, Kind::Growing);
    }

    #[test]
    fn shrinking_after_a_peak() {
        let mut heap = HeapModel::default();
        let mut trends = Trends::new(10, 0.0);
        alloc(&mut heap, 1, 0.5, &[1]);
        alloc(&mut heap, 2, 0.5, &[1]);
        take(&heap, &mut trends, &input(1.0));
        take(&heap, &mut trends, &input(2.0));
        heap.apply(&Event::Free { addr: 1 }, &mut NoModules);
        // The window starts at attach (0 bytes), so over it the stack still grew.
        let snap = take(&heap, &mut trends, &input(3.0));
        assert_eq!(snap.stacks[0].kind, Kind::Growing);
        // A window that holds only the peak and after sees it shrink.
        let mut heap2 = HeapModel::default();
        let mut trends2 = Trends::new(2, 0.0);
        alloc(&mut heap2, 1, 0.5, &[1]);
        alloc(&mut heap2, 2, 0.5, &[1]);
        take(&heap2, &mut trends2, &input(1.0));
        take(&heap2, &mut trends2, &input(2.0));
        heap2.apply(&Event::Free { addr: 1 }, &mut NoModules);
        let snap = take(&heap2, &mut trends2, &input(3.0));
        assert_eq!(snap.stacks[0].kind, Kind::Shrinking);
        assert!(snap.stacks[0].growth_bytes_per_s < 0.0);
    }

    #[test]
    fn top_limits_and_orders_stacks() {
        let mut heap = HeapModel::default();
        let mut trends = Trends::new(10, 0.0);
        for i in 0..5u64 {
            for j in 0..=i {
                heap.apply(
                    &Event::Alloc {
                        ts_ns: 0,
                        addr: i * 100 + j + 1,
                        size_bytes: 10,
                        old_addr: 0,
                        entry_ts_ns: 0,
                        frames: Box::leak(vec![i].into_boxed_slice()),
                        truncated: false,
                    },
                    &mut NoModules,
                );
            }
        }
        let mut inp = input(1.0);
        inp.0.top = 2;
        let snap = take(&heap, &mut trends, &inp);
        assert_eq!(snap.stack_count, 5);
        let bytes: Vec<u64> = snap.stacks.iter().map(|s| s.outstanding_bytes).collect();
        assert_eq!(bytes, [50, 40]);
    }

    #[test]
    fn sort_keys_order_by_count_and_growth_and_sizes_filter() {
        let mut heap = HeapModel::default();
        let mut trends = Trends::new(10, 0.0);
        let add = |heap: &mut HeapModel, addr: u64, size_bytes: u64, frame: u64| {
            heap.apply(
                &Event::Alloc {
                    ts_ns: 0,
                    addr,
                    size_bytes,
                    old_addr: 0,
                    entry_ts_ns: 0,
                    frames: Box::leak(vec![frame].into_boxed_slice()),
                    truncated: false,
                },
                &mut NoModules,
            );
        };
        // Stack 1: one big block, allocated once. Stack 2: many small ones, still coming.
        add(&mut heap, 1, 1000, 1);
        for i in 0..5 {
            add(&mut heap, 100 + i, 10, 2);
        }
        take(&heap, &mut trends, &input(1.0));
        take(&heap, &mut trends, &input(2.0));
        for i in 0..5 {
            add(&mut heap, 200 + i, 10, 2);
        }
        let order = |sort: SortKey, sizes: std::ops::RangeInclusive<u64>, trends: &mut Trends| {
            let mut inp = input(3.0);
            inp.0.sort = sort;
            inp.0.sizes = sizes;
            take(&heap, trends, &inp)
                .stacks
                .iter()
                .map(|s| (s.frames[0].address, s.outstanding_bytes))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            order(SortKey::Bytes, 0..=u64::MAX, &mut Trends::new(10, 0.0)),
            [(1, 1000), (2, 100)]
        );
        assert_eq!(
            order(SortKey::Count, 0..=u64::MAX, &mut Trends::new(10, 0.0)),
            [(2, 100), (1, 1000)]
        );
        assert_eq!(
            order(SortKey::Growth, 0..=u64::MAX, &mut trends),
            [(2, 100), (1, 1000)]
        );
        assert_eq!(
            order(SortKey::Bytes, 0..=999, &mut Trends::new(10, 0.0)),
            [(2, 100)]
        );
        assert_eq!(
            order(SortKey::Bytes, 11..=1000, &mut Trends::new(10, 0.0)),
            [(1, 1000)]
        );
        // Stacks that hold nothing now come after, for their totals since attach.
        heap.apply(&Event::Free { addr: 1 }, &mut NoModules);
        let mut inp = input(4.0);
        inp.0.with_freed = true;
        let snap = take(&heap, &mut Trends::new(10, 0.0), &inp);
        assert_eq!(snap.stack_count, 1);
        let got: Vec<_> = snap
            .stacks
            .iter()
            .map(|s| {
                (
                    s.frames[0].address,
                    s.outstanding_bytes,
                    s.allocated.bytes,
                    s.allocated.count,
                )
            })
            .collect();
        assert_eq!(got, [(2, 100, 100, 10), (1, 0, 1000, 1)]);
    }

    #[test]
    fn rss_growth_is_the_slope_over_the_window() {
        let heap = HeapModel::default();
        let mut trends = Trends::new(3, 0.0);
        let mut at = |t: f64, rss: u64| {
            let mut inp = input(t);
            inp.1.rss_bytes = Some(rss);
            take(&heap, &mut trends, &inp).rss_growth_bytes_per_s
        };
        assert_eq!(at(1.0, 1000), None);
        assert_eq!(at(2.0, 3000), Some(2000.0));
        assert_eq!(at(3.0, 5000), Some(2000.0));
        // The window holds 3 samples: 3000, 5000, 5000.
        assert_eq!(at(4.0, 5000), Some(1000.0));
    }

    #[test]
    fn watched_stacks_are_the_top_of_the_same_order_whatever_top_lists() {
        let mut heap = HeapModel::default();
        for (frame, blocks) in [(1u64, 3u64), (2, 1), (3, 2)] {
            for i in 0..blocks {
                alloc(
                    &mut heap,
                    frame * 100 + i,
                    0.5,
                    Box::leak(Box::new([frame])),
                );
            }
        }
        let mut inp = input(1.0);
        inp.0.top = 1;
        inp.0.watch_top = 2;
        let snap = take(&heap, &mut Trends::new(10, 0.0), &inp);
        let firsts = |stacks: &[StackSummary]| {
            stacks
                .iter()
                .map(|s| s.frames[0].address)
                .collect::<Vec<_>>()
        };
        assert_eq!(firsts(&snap.stacks), [1]);
        assert_eq!(firsts(&snap.watched), [1, 3]);
        assert_eq!(snap.watched[0], snap.stacks[0]);
        inp.0.top = 3;
        inp.0.watch_top = 0;
        let snap = take(&heap, &mut Trends::new(10, 0.0), &inp);
        assert_eq!(firsts(&snap.stacks), [1, 3, 2]);
        assert!(snap.watched.is_empty());
    }
}
