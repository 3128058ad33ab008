//! Exact accounting against ground truth: a leak of known size beside churn, every entry point
//! of the allocator family with threads, mappings split, moved and replaced, and events lost to
//! a ring buffer too small, counted in every report.

use super::line_of;
use crate::support::{
    Fixture, Leaktrace, all_symbols, compile, reported_sites, require_root, stack_of,
    trace_two_rounds,
};

#[test]
fn a_leak_of_100_pages_is_reported_exactly_and_churn_is_absent() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    // 100 leaks of 4096 bytes and 1000 temporary 128-byte blocks.
    let mut fixture = Fixture::start(&binary, &["100", "4096", "1000"]);
    let outcome = Leaktrace::one_round(&mut fixture, &[]);
    let report = outcome.last();

    assert_eq!(report["schema"], 1);
    assert_eq!(report["pid"], fixture.pid());
    assert_eq!(report["complete"], true);
    let totals = &report["totals"];
    assert_eq!(totals["outstanding_bytes"], 100 * 4096);
    assert_eq!(totals["outstanding_allocations"], 100);
    assert_eq!(totals["allocations"], 1100);
    assert_eq!(totals["frees"], 1000);
    assert_eq!(totals["lost_events"], 0);
    assert_eq!(totals["unmatched_frees"], 0);
    // The fixture waits in `read` while leaktrace attaches: no allocator call is in flight.
    assert_eq!(totals["unpaired_returns"], 0);

    assert_eq!(
        report["stacks"].as_array().unwrap().len(),
        1,
        "only the leak is outstanding"
    );
    let leak = stack_of(report, "leak_site").expect("the leaking function is named");
    assert_eq!(leak["outstanding_bytes"], 100 * 4096);
    assert_eq!(leak["outstanding_allocations"], 100);
    // The allocator's immediate caller first, with its file and line, then its caller.
    let frames = leak["frames"].as_array().unwrap();
    assert_eq!(frames[0]["symbol"], "leak_site");
    assert!(
        frames[0]["file"].as_str().unwrap().ends_with("leaky.c"),
        "{}",
        frames[0]
    );
    assert_eq!(
        frames[0]["line"],
        line_of("leaky.c", "void *p = malloc(bytes);")
    );
    assert_eq!(frames[0]["module"], binary.path.to_str().unwrap());
    assert_eq!(frames[1]["symbol"], "main");
    assert!(
        !all_symbols(report).iter().any(|s| s == "temp_site"),
        "temporary churn is not reported"
    );
    fixture.finish();
}

#[test]
fn every_site_of_the_allocator_family_is_exact_with_4_threads() {
    if !require_root() {
        return;
    }
    let (outcome, want) = trace_two_rounds("family", &["--top", "100"]);
    let report = outcome.last();

    // As the fixture counted it, and nothing else.
    assert_eq!(reported_sites(report), want);
    // --top 100 showed every stack that holds memory.
    assert_eq!(
        report["stack_count"],
        report["stacks"].as_array().unwrap().len()
    );
    let totals = &report["totals"];
    assert_eq!(
        totals["outstanding_bytes"],
        want.iter().map(|w| w.1).sum::<u64>()
    );
    assert_eq!(totals["lost_events"], 0);
    // The block allocated before attach and freed after it, and nothing else.
    assert_eq!(totals["unmatched_frees"], 1);
}

#[test]
fn a_thread_arena_that_glibc_maps_inside_free_is_not_a_mapping_of_the_program() {
    if !require_root() {
        return;
    }
    // Each thread's first allocator call is a `free`, inside which glibc maps the thread's
    // arena (64 MiB): with no return probe on `free`, nothing nests the `mmap` in it.
    let (outcome, want) = trace_two_rounds("thread_arenas", &["--top", "100"]);
    let report = outcome.last();
    assert_eq!(reported_sites(report), want);
    let totals = &report["totals"];
    assert_eq!(totals["mapped_bytes"], 0, "{totals}");
    assert_eq!(
        totals["outstanding_bytes"],
        want.iter().map(|w| w.1).sum::<u64>()
    );
    assert_eq!(totals["lost_events"], 0);
    assert_eq!(totals["unmatched_frees"], 0);
}

#[test]
fn mappings_are_exact_with_partial_unmaps_remaps_and_4_threads() {
    if !require_root() {
        return;
    }
    let (outcome, want) = trace_two_rounds("mappings", &["--top", "100", "--file-mappings"]);
    let report = outcome.last();

    // As the fixture counted it. Nothing else: glibc's own mmaps of large blocks are not
    // counted a second time, and the churn of the threads is gone.
    assert_eq!(reported_sites(report), want);

    let sum = |origins: &[&str]| -> u64 {
        want.iter()
            .filter(|w| origins.contains(&w.3.as_str()))
            .map(|w| w.1)
            .sum()
    };
    let totals = &report["totals"];
    // File mappings are listed (--file-mappings) but never added to the heap numbers.
    assert_eq!(totals["outstanding_bytes"], sum(&["malloc", "mmap"]));
    assert_eq!(totals["mapped_bytes"], sum(&["mmap"]));
    assert_eq!(totals["file_mapped_bytes"], sum(&["mmap_file"]));
    assert_eq!(totals["file_mappings"], 6);
    assert_eq!(totals["lost_events"], 0);
    assert_eq!(totals["unmatched_frees"], 0);
}

#[test]
fn a_ring_buffer_too_small_loses_events_and_every_report_says_so() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    // 10 leaks and 20000 temporary blocks: 40010 events in a tight loop, into a ring buffer
    // that holds a few dozen records.
    let mut fixture = Fixture::start(&binary, &["10", "64", "20000"]);
    let outcome = Leaktrace::one_round(&mut fixture, &["--ringbuf-bytes", "4096"]);
    let report = outcome.last();
    let totals = &report["totals"];
    let lost = totals["lost_events"].as_u64().unwrap();
    assert!(lost > 0, "{totals}");
    assert_eq!(report["complete"], false);
    // Every event was either received or counted as lost, exactly once.
    let received = totals["allocations"].as_u64().unwrap() + totals["frees"].as_u64().unwrap();
    assert_eq!(received + lost, 10 + 2 * 20000, "{totals}");
    fixture.finish();
}
