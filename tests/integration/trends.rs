//! What reports make of a trace over time, on the `patterns` fixture (a leak, a cache that
//! fills and holds, a burst that is freed): leak, stable and shrinking stacks, --fail-on-leak on
//! a plateau, and the stacks a report selects (--count, --min-size, --max-size, --sort); and on
//! the demo's service, traced as `cargo xtask demo` traces it.

use std::process::{Command, Stdio};

use crate::support::{self, Fixture, Leaktrace, Service, compile, require_root, stack_of};

include!("../fixtures/leaky_service_trace.rs");

/// Starts `patterns` (see tests/fixtures/patterns.c) and traces it: for `secs` while it runs
/// (then its cache goes quiet and leaktrace is stopped while the leak goes on), or, with `None`,
/// until leaktrace ends by itself.
fn trace_patterns(leak_bytes: &str, extra: &[&str], secs: Option<f64>) -> support::Outcome {
    let binary = compile("patterns", &[]);
    let mut fixture = Fixture::start(&binary, &[leak_bytes]);
    let mut args = vec!["--interval", "0.25"];
    args.extend_from_slice(extra);
    let trace = Leaktrace::attach(fixture.pid(), &args);
    fixture.send("go");
    let outcome = match secs {
        Some(secs) => {
            std::thread::sleep(std::time::Duration::from_secs_f64(secs));
            fixture.send("quiet");
            fixture.expect_line("quiet");
            trace.stop()
        }
        None => trace.wait(),
    };
    assert!(fixture.finish().success());
    outcome
}

#[test]
fn a_leak_is_a_leak_a_full_cache_is_stable_and_a_freed_burst_is_gone() {
    if !require_root() {
        return;
    }
    let outcome = trace_patterns("1024", &["--fail-on-leak"], Some(3.0));
    assert_eq!(outcome.status.code(), Some(3), "{:?}", outcome.stderr);
    assert!(
        outcome
            .stderr
            .iter()
            .any(|l| l.contains("the final report holds a leak")),
        "{:?}",
        outcome.stderr
    );
    let report = outcome.last();
    assert_eq!(report["complete"], true);
    let leak = stack_of(report, "leak_site").expect("the leak is reported");
    assert_eq!(leak["kind"], "leak", "{leak}");
    // Every leaked block is outstanding: as many as were allocated, 1024 bytes each.
    let count = leak["outstanding_allocations"].as_u64().unwrap();
    assert!(count > 100, "{leak}");
    assert_eq!(leak["outstanding_bytes"], count * 1024);
    assert_eq!(leak["allocations"], count);
    assert_eq!(leak["allocated_bytes"], count * 1024);
    assert!(leak["growth_bytes_per_s"].as_f64().unwrap() > 0.0, "{leak}");

    let cache = stack_of(report, "cache_put").expect("the cache is reported");
    assert_eq!(cache["kind"], "stable", "{cache}");
    assert_eq!(cache["outstanding_bytes"], 200 * 128);
    assert_eq!(cache["outstanding_allocations"], 200);
    // It allocated 20 blocks a tick, freed all but the last 200.
    assert_eq!(cache["allocations"].as_u64().unwrap() % 20, 0, "{cache}");
    assert!(cache["allocations"].as_u64().unwrap() > 200, "{cache}");

    assert!(
        stack_of(report, "burst_site").is_none(),
        "the freed burst is gone: {report}"
    );
    assert!(report["rss_bytes"].as_u64().unwrap() > 0, "{report}");
}

#[test]
fn fail_on_leak_passes_a_plateau() {
    if !require_root() {
        return;
    }
    let outcome = trace_patterns("0", &["--fail-on-leak"], Some(2.0));
    assert_eq!(outcome.status.code(), Some(0), "{:?}", outcome.stderr);
    let report = outcome.last();
    assert!(stack_of(report, "leak_site").is_none());
    assert_eq!(stack_of(report, "cache_put").unwrap()["kind"], "stable");
    assert!(
        report["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["kind"] != "leak")
    );
}

#[test]
fn count_and_size_filters() {
    if !require_root() {
        return;
    }
    // Only blocks of 1000 to 2000 bytes: the leak's, not the cache's 128-byte ones; 3 reports.
    let outcome = trace_patterns(
        "1024",
        &["--count", "3", "--min-size", "1000", "--max-size", "2K"],
        None,
    );
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    assert_eq!(outcome.reports.len(), 3, "{:?}", outcome.reports);
    let report = outcome.last();
    assert!(stack_of(report, "cache_put").is_none(), "{report}");
    let leak = stack_of(report, "leak_site").unwrap();
    assert_eq!(
        report["totals"]["outstanding_bytes"],
        leak["outstanding_bytes"]
    );
    // Now the other way round.
    let outcome = trace_patterns("1024", &["--count", "2", "--max-size", "128"], None);
    assert_eq!(outcome.reports.len(), 2);
    let report = outcome.last();
    assert!(stack_of(report, "leak_site").is_none(), "{report}");
    assert!(stack_of(report, "cache_put").is_some(), "{report}");
}

#[test]
fn sort_by_count_puts_the_many_small_cache_entries_first() {
    if !require_root() {
        return;
    }
    // After 0.75 s: the leak holds at most 150 blocks of 1024 bytes (one per 5 ms tick), more
    // bytes than the full cache's 200 blocks of 128 bytes once 25 ticks ran.
    let order = |sort: &str| {
        let outcome = trace_patterns("1024", &["--count", "3", "--sort", sort], None);
        assert!(outcome.status.success(), "{:?}", outcome.stderr);
        let report = outcome.last().clone();
        let firsts: Vec<String> = report["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["frames"][0]["symbol"].as_str().unwrap_or("?").to_owned())
            .collect();
        (firsts, report)
    };
    let (by_count, report) = order("count");
    assert_eq!(by_count[0], "cache_put", "{report}");
    assert_eq!(by_count[1], "leak_site", "{report}");
    let (by_bytes, report) = order("bytes");
    assert_eq!(by_bytes[0], "leak_site", "{report}");
    assert_eq!(by_bytes[1], "cache_put", "{report}");
}

#[test]
fn the_demo_shows_its_leak_as_a_leak_its_cache_as_stable_and_no_churn() {
    if !require_root() {
        return;
    }
    // What `cargo xtask demo` does: the service runs for a moment, so its session cache is full
    // of blocks from before attach, then is traced with the demo's flags.
    let binary = compile("leaky_service", &[]);
    let service = Service(
        Command::new(&binary.path)
            .stdin(Stdio::null())
            .spawn()
            .expect("the demo service starts"),
    );
    std::thread::sleep(std::time::Duration::from_millis(DEMO_HEAD_START_MS));
    let pid = service.0.id().to_string();
    let mut args = vec!["-p", &pid, "--format", "json"];
    args.extend(DEMO_FLAGS);
    let outcome = Leaktrace::start(&args).wait();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    let report = outcome.last();
    assert_eq!(report["complete"], true, "{report}");
    // The scratch buffer of each request is freed at once: no stack but these two.
    assert_eq!(report["stack_count"], 2, "{report}");
    assert!(stack_of(report, "parse_request").is_none(), "{report}");

    // A request takes at least the 1 ms it sleeps: at most 11 of them in the last 10 ms.
    let in_flight = 11;
    let leak = stack_of(report, "remember_request").expect("the leak is reported");
    assert_eq!(leak["kind"], "leak", "{leak}");
    let count = leak["outstanding_allocations"].as_u64().unwrap();
    let allocations = leak["allocations"].as_u64().unwrap();
    assert_eq!(leak["outstanding_bytes"], count * 512, "{leak}");
    assert_eq!(leak["allocated_bytes"], allocations * 512, "{leak}");
    assert!(
        count + in_flight >= allocations && count > 1000,
        "every record since attach is held: {leak}"
    );

    // 256 blocks of 1024 bytes, each replaced every 256 requests: all of them younger than
    // a report interval, the newest few left out.
    let cache = stack_of(report, "session_cache_put").expect("the cache is reported");
    assert_eq!(cache["kind"], "stable", "{cache}");
    let count = cache["outstanding_allocations"].as_u64().unwrap();
    assert!((256 - in_flight..=256).contains(&count), "{cache}");
    assert_eq!(cache["outstanding_bytes"], count * 1024, "{cache}");
    // A put (calloc) and a record (malloc) a request. calloc's and malloc's probes are
    // attached through separate links, one after the other, a request every ~1 ms meanwhile:
    // the first requests may be seen on one stack only (fresh-clone CI: off by more than 1),
    // so the two counts agree within 50 requests (50 ms of attaching), out of thousands.
    let puts = cache["allocations"].as_u64().unwrap();
    assert!(
        puts.abs_diff(allocations) <= 50,
        "{allocations} records: {cache}"
    );
    assert!(cache["oldest_age_s"].as_f64().unwrap() < 2.0, "{cache}");
}
