//! Several processes at once: `--pid` given more than once, and `--follow-forks`. Each
//! process is reported separately, by pid.

use std::io::Write as _;

use serde_json::Value;

use crate::support::{Fixture, Leaktrace, Outcome, compile, last_of, require_root, stack_of};

#[test]
fn two_pids_are_traced_at_once_and_reported_separately() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    let mut first = Fixture::start(&binary, &["100", "4096", "1000"]);
    let mut second = Fixture::start(&binary, &["30", "1000", "200"]);
    let (a, b) = (first.pid().to_string(), second.pid().to_string());
    let mut trace = Leaktrace::attach(first.pid(), &["--pid", &b]);
    first.round();
    second.round();
    second.round();
    // One exits: its final report comes, and the other is still traced.
    let second_pid = second.pid();
    assert!(second.finish().success());
    trace.wait_for_stderr(&format!("leaktrace: process {second_pid} exited"));
    first.round();
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    assert!(
        outcome
            .stderr
            .iter()
            .any(|l| l.starts_with(&format!("leaktrace: tracing pid {b} "))),
        "{:?}",
        outcome.stderr
    );
    for (pid, bytes, count) in [(&a, 2 * 100 * 4096, 200), (&b, 2 * 30 * 1000, 60)] {
        let report = last_of(&outcome.reports, pid.parse().unwrap());
        let leak =
            stack_of(report, "leak_site").unwrap_or_else(|| panic!("leak_site named: {report}"));
        assert_eq!(leak["outstanding_bytes"], bytes, "pid {pid}");
        assert_eq!(leak["outstanding_allocations"], count, "pid {pid}");
        assert_eq!(report["totals"]["outstanding_bytes"], bytes, "pid {pid}");
        assert_eq!(report["totals"]["unmatched_frees"], 0, "pid {pid}");
    }
    first.finish();
}

#[test]
fn a_forked_child_is_followed_and_reported_by_its_own_pid() {
    if !require_root() {
        return;
    }
    let child_report = followed_fork(&[]);
    assert_eq!(child_report["totals"]["unmatched_frees"], 0);
}

#[test]
fn a_forked_child_drawn_blocks_are_its_own_under_sampling() {
    if !require_root() {
        return;
    }
    // Every block drawn: after the fork, parent and child get blocks at the same addresses
    // (their heaps are copies) and churn them at the same time; each release must go to the
    // process that made it.
    let child_report = followed_fork(&["--sample-bytes", "1"]);
    assert_eq!(child_report["sample_bytes"], 1);
}

/// Traces `forking` (tests/fixtures/forking.c) and its child with `--follow-forks` and
/// `extra`; checks both processes' exact numbers and returns the child's final report.
fn followed_fork(extra: &[&str]) -> Value {
    let binary = compile("forking", &[]);
    let mut fixture = Fixture::start(&binary, &[]);
    let parent = fixture.pid();
    let mut args = vec!["--follow-forks"];
    args.extend_from_slice(extra);
    let mut trace = Leaktrace::attach(parent, &args);
    let printed = fixture.round();
    let child: u32 = printed[0]
        .strip_prefix("child ")
        .expect("the fixture names its child")
        .parse()
        .unwrap();
    trace.wait_for_stderr(&format!(
        "leaktrace: following a fork: tracing pid {child} "
    ));
    fixture.round();
    fixture.round();
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    fixture.finish();
    followed_exactly(&outcome, parent, child)
}

/// `--follow-forks` in spawn mode: the command runs leaktrace's own program until its exec,
/// and its children were compared with that one, so none was ever followed, and its reports
/// said nothing of them.
#[test]
fn spawn_mode_follows_the_forks_of_its_command() {
    if !require_root() {
        return;
    }
    let binary = compile("forking", &[]);
    let (mut trace, mut stdin) = Leaktrace::spawn_with_input(&[
        "--follow-forks",
        "--format",
        "json",
        "--interval",
        "0.5",
        "--",
        binary.path.to_str().unwrap(),
    ]);
    let parent = trace.pid_of_command();
    stdin.write_all(b"1\n").unwrap();
    let child: u32 = trace
        .wait_for_stdout("child ")
        .strip_prefix("child ")
        .unwrap()
        .parse()
        .unwrap();
    trace.wait_for_stdout("done");
    trace.wait_for_stderr(&format!(
        "leaktrace: following a fork: tracing pid {child} "
    ));
    stdin.write_all(b"2\n3\n").unwrap();
    trace.wait_for_stdout("done");
    trace.wait_for_stdout("done");
    // Both exit when their input closes, and the trace with the command.
    drop(stdin);
    let outcome = trace.wait();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    followed_exactly(&outcome, parent, child);
}

/// Checks the exact numbers of `forking`'s parent and child after two rounds of leaks, the
/// child followed from before them; returns the child's final report.
fn followed_exactly(outcome: &Outcome, parent: u32, child: u32) -> Value {
    let parent_report = last_of(&outcome.reports, parent);
    let leak = stack_of(parent_report, "parent_leak_site").expect("parent's leak named");
    assert_eq!(leak["outstanding_bytes"], 2 * 100 * 4096);
    assert_eq!(leak["outstanding_allocations"], 200);
    assert!(
        stack_of(parent_report, "child_leak_site").is_none(),
        "the child's blocks are not the parent's"
    );
    assert_eq!(parent_report["totals"]["outstanding_bytes"], 2 * 100 * 4096);

    let child_report = last_of(&outcome.reports, child);
    let leak = stack_of(child_report, "child_leak_site").expect("child's leak named");
    assert_eq!(leak["outstanding_bytes"], 2 * 50 * 2048);
    assert_eq!(leak["outstanding_allocations"], 100);
    assert_eq!(child_report["totals"]["outstanding_bytes"], 2 * 50 * 2048);
    // The child was attached after its fork: the report cannot know what happened before.
    assert_eq!(child_report["complete"], false, "{child_report}");
    assert!(
        child_report["incomplete_reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("a child followed after its fork"),
        "{child_report}"
    );
    // Its one child followed, nothing lost: the parent's report is complete.
    assert_eq!(parent_report["complete"], true, "{parent_report}");
    child_report.clone()
}
