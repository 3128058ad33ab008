//! Integration tests: leaktrace attached to real processes with known ground truth.
//! They load BPF and attach uprobes, so they run as root (`cargo xtask test`).

mod support;
mod unwind;

use support::{
    Fixture, Leaktrace, all_symbols, compile, malloc_bytes_in, require_root, run_leaktrace,
    stack_of,
};

/// The line of `tests/fixtures/<file>` that contains `text`.
pub(crate) fn line_of(file: &str, text: &str) -> u64 {
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

    // A static binary maps no libc.
    let binary = compile("leaky", &["-static"]);
    let fixture = Fixture::start(&binary, &["1", "1", "1"]);
    let pid = fixture.pid().to_string();
    let no_libc = run_leaktrace(&["-p", &pid]);
    assert_eq!(no_libc.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&no_libc.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("leaktrace: error: process {pid} (")),
        "{stderr}"
    );
    assert!(stderr.contains("maps no glibc"), "{stderr}");

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

    // "expect SITE BYTES COUNT", as the fixture counted it.
    let mut want: Vec<(String, u64, u64)> = expected
        .iter()
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!((f.len(), f[0]), (4, "expect"), "{line}");
            (
                f[1].to_owned(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
            )
        })
        .collect();
    want.sort();
    // Per site, the function that called the allocator: an unrolled loop calls from several
    // places, which are distinct stacks of the same site.
    let mut got = std::collections::BTreeMap::<String, (u64, u64)>::new();
    for stack in report["stacks"].as_array().unwrap() {
        let site = stack["frames"][0]["symbol"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        let entry = got.entry(site).or_default();
        entry.0 += stack["outstanding_bytes"].as_u64().unwrap();
        entry.1 += stack["outstanding_allocations"].as_u64().unwrap();
    }
    let got: Vec<(String, u64, u64)> = got.into_iter().map(|(site, (b, n))| (site, b, n)).collect();
    assert_eq!(got, want);
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
    assert_eq!(totals["unmatched_frees"], 0);
    fixture.finish();
}
