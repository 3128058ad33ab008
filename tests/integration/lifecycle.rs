//! A trace from attach to detach: probes gone after detach with the target running on, the
//! final report when the target exits or --duration ends, one clear line for bad input, and the
//! bench's floor attached at the same points.

use serde_json::Value;

use crate::support::{
    self, Fixture, Leaktrace, compile, malloc_bytes_in, require_root, run_leaktrace, stack_of,
};

#[test]
fn probes_are_gone_after_detach_and_the_target_runs_on() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    let mut fixture = Fixture::start(&binary, &["10", "64", "10"]);
    let pid = fixture.pid();
    let original = malloc_bytes_in(pid);
    let trace = Leaktrace::attach(pid, &[]);
    // A uprobe is a breakpoint (int3, 0xcc) written over the probed instruction.
    assert_eq!(
        malloc_bytes_in(pid)[0],
        0xcc,
        "malloc is probed while attached"
    );
    fixture.round();
    let outcome = trace.stop();
    assert!(outcome.status.success());
    assert_eq!(outcome.last()["totals"]["outstanding_bytes"], 640);
    assert_eq!(
        malloc_bytes_in(pid),
        original,
        "malloc's code is restored after detach"
    );
    // The target keeps working and exits normally.
    fixture.round();
    assert!(fixture.finish().success());
}

#[test]
fn the_trace_ends_with_a_final_report_when_the_target_exits() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    let mut fixture = Fixture::start(&binary, &["3", "1000", "5"]);
    let trace = Leaktrace::attach(fixture.pid(), &[]);
    fixture.round();
    fixture.round();
    assert!(fixture.finish().success());
    let outcome = trace.wait();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    // Two rounds of 3 leaks each; the second round overwrote the first's pointers, but the
    // blocks stay allocated: 6 blocks. The symbols resolve after the target is gone.
    let report = outcome.last();
    let leak = leak_named_after_exit(report);
    assert_eq!(leak["outstanding_bytes"], 6000);
    assert_eq!(leak["outstanding_allocations"], 6);
    assert!(
        outcome.stderr.iter().any(|l| l.contains("exited")),
        "{:?}",
        outcome.stderr
    );
}

#[test]
fn a_target_that_exits_before_its_stacks_are_read_gets_them_named() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    let mut fixture = Fixture::start(&binary, &["20", "1000", "0"]);
    // Frame pointers only: no module is opened at attach for the unwinding rows, so none is
    // open before a stack goes through it, unless the map that shows it opened it.
    let trace = Leaktrace::attach(fixture.pid(), &["--unwind", "fp"]);
    // Its only round and its exit back to back, without waiting for "done": its records, the
    // first of its leak's stack among them, are read once it is gone, when no file can be
    // opened through it any more (a report without any name before).
    fixture.send("go");
    assert!(fixture.finish().success());
    let outcome = trace.wait();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    let report = outcome.last();
    let leak = leak_named_after_exit(report);
    assert_eq!(leak["outstanding_bytes"], 20 * 1000);
    assert_eq!(leak["outstanding_allocations"], 20);
    assert_eq!(report["totals"]["outstanding_bytes"], 20 * 1000);
    assert_eq!(report["last"], true);
}

/// The stack of `leaky`'s leak in a final report taken after it exited: symbolized from the
/// files it mapped, which can no longer be opened through it.
fn leak_named_after_exit(report: &Value) -> &Value {
    stack_of(report, "leak_site")
        .unwrap_or_else(|| panic!("leak named after the target exited: {report}"))
}

#[test]
fn duration_ends_the_trace_and_reports_every_interval() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    let fixture = Fixture::start(&binary, &["1", "1", "1"]);
    let trace = Leaktrace::attach(fixture.pid(), &["--duration", "1.6"]);
    let outcome = trace.wait();
    assert!(outcome.status.success());
    // Reports at 0.5, 1.0 and 1.5 s, then the final one.
    assert_eq!(outcome.reports.len(), 4, "{:?}", outcome.reports);
    assert!(outcome.reports[..3].iter().all(|r| r["last"] == false));
    assert_eq!(outcome.last()["totals"]["allocations"], 0);
}

#[test]
fn bad_input_gets_one_clear_line_and_a_failure_status() {
    if !require_root() {
        return;
    }
    let no_such = run_leaktrace(&["-p", "4000000"]);
    assert_eq!(no_such.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&no_such.stderr),
        "leaktrace: error: no process with pid 4000000: check the pid (`ps -p 4000000`)\n"
    );

    // A running process to be refused to (a static binary's allocator is traced).
    let binary = compile("leaky", &["-static"]);
    let fixture = Fixture::start(&binary, &["1", "1", "1"]);
    let pid = fixture.pid().to_string();

    // Without privileges: the same binary run as nobody, from a copy that nobody may run
    // (the build tree may sit under a directory only root can enter).
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("leaktrace");
    std::fs::copy(support::LEAKTRACE, &copy).unwrap();
    for path in [dir.path(), &copy] {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    let unprivileged = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&copy)
        .args(["-p", &pid])
        .output()
        .expect("setpriv runs");
    assert_eq!(unprivileged.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&unprivileged.stderr),
        "leaktrace: error: leaktrace needs root (CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN): run it with sudo\n"
    );
}

/// The probes of `leaktrace` and of the bench's floor (`--noop-programs`), from the announcement
/// "... (N probes: E entries emulated, S single-stepped, R on returns); ...".
fn probes_announced(stderr: &[String]) -> String {
    stderr
        .iter()
        .find_map(|line| {
            let count = line.find(" probes: ")?;
            let start = line[..count].rfind('(')? + 1;
            let end = line.find("); a report")?;
            Some(line.get(start..end)?.to_owned())
        })
        .unwrap_or_else(|| panic!("no probe count in {stderr:?}"))
}

#[test]
fn the_bench_floor_traps_at_the_same_points_and_records_nothing() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    // 10 leaks of 4096 bytes and 100 temporary blocks per round.
    let mut fixture = Fixture::start(&binary, &["10", "4096", "100"]);
    let real = Leaktrace::attach(fixture.pid(), &[]).stop();
    assert!(real.status.success(), "{:?}", real.stderr);

    let floor = Leaktrace::attach(fixture.pid(), &["--noop-programs"]);
    fixture.round();
    let outcome = floor.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    assert_eq!(
        probes_announced(&outcome.stderr),
        probes_announced(&real.stderr)
    );
    let totals = &outcome.last()["totals"];
    assert_eq!(totals["allocations"], 0);
    assert_eq!(totals["frees"], 0);
    assert_eq!(totals["lost_events"], 0);
    fixture.finish();
}
