//! The overhead guard (`--max-overhead`): over its budget it stops the trace with a final
//! report, one line that says why and what to try, and exit status 4, leaving the target
//! running without probes; within its budget it lets the trace run and says what the probes
//! cost.

use crate::support::{
    Fixture, Leaktrace, compile, malloc_bytes_in, now_ms, require_root, stack_of,
};

/// The status leaktrace exits with when the guard stopped it (README's table).
const EXIT_OVER_BUDGET: i32 = 4;

/// Whether process `pid` holds the fd that keeps the kernel's BPF run-time statistics on
/// (`BPF_ENABLE_STATS`).
fn holds_stats_switch(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(Result::ok)
        .any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy() == "anon_inode:bpf-stats")
        })
}

/// The leak the fixture's `leak` command makes, as the final report must show it.
fn assert_leak_of_10_pages(report: &serde_json::Value) {
    let leak = stack_of(report, "leak_site")
        .unwrap_or_else(|| panic!("leak_site in the final report: {report}"));
    assert_eq!(leak["outstanding_bytes"], 40960);
    assert_eq!(leak["outstanding_allocations"], 10);
}

#[test]
fn over_a_tiny_budget_the_guard_detaches_with_a_final_report() {
    if !require_root() {
        return;
    }
    let binary = compile("overhead", &[]);
    let mut fixture = Fixture::start(&binary, &[]);
    let pid = fixture.pid();
    let original = malloc_bytes_in(pid);
    // Reports only at the end: the final report is the guard's doing.
    let trace = Leaktrace::attach(pid, &["--max-overhead", "0.5", "--interval", "3600"]);
    assert!(
        holds_stats_switch(trace.pid()),
        "the guard turned the statistics on"
    );
    fixture.send("leak");
    fixture.expect_line("done");
    // malloc+free pairs as fast as they go: the probes take nearly all of the thread's CPU.
    fixture.send("hot");
    fixture.expect_line("done");
    let outcome = trace.wait();
    assert_eq!(
        outcome.status.code(),
        Some(EXIT_OVER_BUDGET),
        "{:?}",
        outcome.stderr
    );
    assert_eq!(outcome.reports.len(), 1, "one report, the final one");
    assert_leak_of_10_pages(outcome.last());
    let why: Vec<&String> = outcome
        .stderr
        .iter()
        .filter(|l| {
            l.starts_with("leaktrace: over the overhead budget: the probes took an estimated ")
        })
        .collect();
    assert_eq!(why.len(), 1, "one line says why: {:?}", outcome.stderr);
    assert!(
        why[0].contains(&format!(
            "more than --max-overhead 0.5%: stopped tracing, detached from pid {pid} (exit status 4)"
        )) && why[0].contains("try --sample-bytes 512K"),
        "{}",
        why[0]
    );
    // The target runs on, hot loop and all, without probes.
    assert_eq!(malloc_bytes_in(pid), original, "malloc's code is restored");
    fixture.send("stop");
    let pairs = fixture_pairs(&mut fixture);
    assert!(pairs > 0);
    fixture.send("leak");
    fixture.expect_line("done");
    assert!(fixture.finish().success());
}

#[test]
fn within_a_generous_budget_the_guard_lets_the_trace_run() {
    if !require_root() {
        return;
    }
    let binary = compile("overhead", &[]);
    let mut fixture = Fixture::start(&binary, &[]);
    let pid = fixture.pid();
    let mut trace = Leaktrace::attach(pid, &["--max-overhead", "50"]);
    assert!(
        holds_stats_switch(trace.pid()),
        "the guard turned the statistics on"
    );
    fixture.send("leak");
    fixture.expect_line("done");
    // A malloc+free pair per millisecond of computation: the probes take well under 1%.
    fixture.send("paced");
    fixture.expect_line("done");
    // Reports come every 0.5 s: one taken 3 s from now comes after at least two of the
    // guard's windows.
    trace.wait_for_report(now_ms() + 3000);
    fixture.send("stop");
    let pairs = fixture_pairs(&mut fixture);
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    assert_leak_of_10_pages(outcome.last());
    assert!(
        !outcome
            .stderr
            .iter()
            .any(|l| l.contains("over the overhead budget")),
        "{:?}",
        outcome.stderr
    );
    // What the guard saw: probes that cost something, and never near the budget.
    let summary = outcome
        .stderr
        .iter()
        .find_map(|l| l.strip_prefix("leaktrace: overhead: the probes took an estimated "))
        .unwrap_or_else(|| panic!("the guard's summary: {:?}", outcome.stderr));
    let highest: f64 = summary
        .split_once("highest in a second ")
        .and_then(|(_, rest)| rest.split_once('%'))
        .and_then(|(percent, _)| percent.parse().ok())
        .unwrap_or_else(|| panic!("a judged second in {summary}"));
    assert!(highest > 0.0 && highest < 50.0, "{pairs} pairs; {summary}");
    assert!(
        summary.ends_with("(budget --max-overhead 50%)"),
        "{summary}"
    );
    assert!(fixture.finish().success());
}

/// `pairs N` and `done`, after `stop`.
fn fixture_pairs(fixture: &mut Fixture) -> u64 {
    let lines = fixture.lines_until_done();
    lines
        .iter()
        .find_map(|l| l.strip_prefix("pairs ")?.parse().ok())
        .unwrap_or_else(|| panic!("pairs in {lines:?}"))
}
