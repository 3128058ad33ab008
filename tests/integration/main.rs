//! Integration tests: leaktrace attached to real processes with known ground truth.
//! They load BPF and attach uprobes, so they run as root (`cargo xtask test`).

mod allocators;
mod processes;
mod service;
mod stacks;
mod support;

use support::{
    Fixture, Leaktrace, all_symbols, compile, expected_sites, malloc_bytes_in, reported_sites,
    require_root, run_leaktrace, stack_of,
};

/// The line of `tests/fixtures/<file>` that contains `text`.
fn line_of(file: &str, text: &str) -> u64 {
    let source = std::fs::read_to_string(format!(
        "{}/../tests/fixtures/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    1 + source
        .lines()
        .position(|line| line.contains(text))
        .expect("text in fixture") as u64
}

#[test]
fn a_leak_of_100_pages_is_reported_exactly_and_churn_is_absent() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    // 100 leaks of 4096 bytes and 1000 temporary 128-byte blocks.
    let mut fixture = Fixture::start(&binary, &["100", "4096", "1000"]);
    let trace = Leaktrace::attach(fixture.pid(), &[]);
    fixture.round();
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
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
    let leak = stack_of(report, "leak_site")
        .unwrap_or_else(|| panic!("leak named after the target exited: {report}"));
    assert_eq!(leak["outstanding_bytes"], 6000);
    assert_eq!(leak["outstanding_allocations"], 6);
    assert!(
        outcome.stderr.iter().any(|l| l.contains("exited")),
        "{:?}",
        outcome.stderr
    );
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

#[test]
fn every_site_of_the_allocator_family_is_exact_with_4_threads() {
    if !require_root() {
        return;
    }
    let binary = compile("family", &[]);
    let mut fixture = Fixture::start(&binary, &[]);
    let trace = Leaktrace::attach(fixture.pid(), &["--top", "100"]);
    fixture.round();
    let expected = fixture.round();
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    let report = outcome.last();

    // As the fixture counted it, and nothing else.
    let want = expected_sites(&expected);
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
    fixture.finish();
}

#[test]
fn mappings_are_exact_with_partial_unmaps_remaps_and_4_threads() {
    if !require_root() {
        return;
    }
    let binary = compile("mappings", &[]);
    let mut fixture = Fixture::start(&binary, &[]);
    let trace = Leaktrace::attach(fixture.pid(), &["--top", "100", "--file-mappings"]);
    fixture.round();
    let expected = fixture.round();
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    let report = outcome.last();

    // As the fixture counted it. Nothing else: glibc's own mmaps of large blocks are not
    // counted a second time, and the churn of the threads is gone.
    let want = expected_sites(&expected);
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
    fixture.finish();
}

#[test]
fn a_ring_buffer_too_small_loses_events_and_every_report_says_so() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    // 10 leaks and 20000 temporary blocks: 40010 events in a tight loop, into a ring buffer
    // that holds three allocation records.
    let mut fixture = Fixture::start(&binary, &["10", "64", "20000"]);
    let trace = Leaktrace::attach(fixture.pid(), &["--ringbuf-bytes", "4096"]);
    fixture.round();
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
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

/// The probes of `leaktrace` and of the bench's floor (`--noop-programs`), from the announcement
/// "... (N probes); ...".
fn probes_announced(stderr: &[String]) -> u64 {
    stderr
        .iter()
        .find_map(|line| {
            let (head, _) = line.split_once(" probes)")?;
            head.rsplit_once('(')?.1.parse().ok()
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
