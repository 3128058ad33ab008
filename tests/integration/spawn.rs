//! Spawn mode, `leaktrace -- CMD`: a command traced from its first allocation, its status and
//! errors reported clearly, and --fail-on-leak gating a scripted load test.

use std::io::Write as _;

use crate::support::{self, Leaktrace, compile, require_root, run_leaktrace, stack_of};

/// Runs `leaktrace ARGS` to completion with `stdin` as its (and so the command's) input.
fn run_leaktrace_with_input(args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = std::process::Command::new(support::LEAKTRACE)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("leaktrace runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn spawn_mode_traces_a_command_from_its_first_allocation() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("report.json");
    // One round, then the fixture's stdin closes and it exits.
    let out = run_leaktrace_with_input(
        &[
            "--format",
            "json",
            "-o",
            file.to_str().unwrap(),
            "--",
            binary.path.to_str().unwrap(),
            "100",
            "4096",
            "1000",
        ],
        "go\n",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("exited with status 0"), "{stderr}");
    // The command's own output is untouched.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ready\ndone\n");
    let text = std::fs::read_to_string(&file).unwrap();
    let report: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(report["last"], true);
    assert_eq!(report["complete"], true);
    // Everything since the first allocation: main's calloc(100, 8) before "ready" too.
    let totals = &report["totals"];
    assert_eq!(totals["outstanding_bytes"], 100 * 4096 + 800, "{report}");
    assert_eq!(totals["outstanding_allocations"], 101);
    assert_eq!(totals["allocations"], 1101);
    assert_eq!(totals["frees"], 1000);
    assert_eq!(totals["unmatched_frees"], 0);
    let leak = stack_of(&report, "leak_site").expect("symbolized after the command exited");
    assert_eq!(leak["outstanding_bytes"], 409_600);
    let kept = stack_of(&report, "main").expect("main's calloc");
    assert_eq!(kept["outstanding_bytes"], 800);
}

#[test]
fn spawn_mode_reports_the_command_s_status_and_errors_clearly() {
    if !require_root() {
        return;
    }
    let out = run_leaktrace_with_input(&["-f", "json", "--", "sh", "-c", "exit 7"], "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "leaktrace's own status: {stderr}"
    );
    assert!(
        stderr.contains("`sh -c exit 7` exited with status 7"),
        "{stderr}"
    );
    // The trace ends first: the command is stopped (SIGTERM: 128 + 15).
    let out = run_leaktrace_with_input(&["--duration", "0.5", "--", "sleep", "30"], "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("`sleep 30` exited with status 143"),
        "{stderr}"
    );
    let missing = run_leaktrace(&["--", "no-such-command-here"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        "leaktrace: error: no command `no-such-command-here` in PATH\n"
    );
}

/// `leaktrace --fail-on-leak -- patterns LEAK_BYTES`, fed "go" and closed after `secs`: a
/// scripted load test.
fn load_test(leak_bytes: &str, secs: f64) -> (std::process::ExitStatus, serde_json::Value) {
    use std::io::Write as _;
    let binary = compile("patterns", &[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("report.json");
    let mut child = std::process::Command::new(support::LEAKTRACE)
        .args(["--interval", "0.25", "--fail-on-leak", "-f", "json", "-o"])
        .arg(&file)
        .arg("--")
        .arg(&binary.path)
        .arg(leak_bytes)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The load starts once the probes are attached (which takes seconds on a busy machine).
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen
        .lines()
        .any(|l| l.starts_with("leaktrace: tracing pid"))
    {
        let n = std::io::BufRead::read_line(&mut stderr, &mut seen).unwrap();
        assert!(n > 0, "leaktrace did not attach: {seen}");
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    std::thread::sleep(std::time::Duration::from_secs_f64(secs));
    drop(stdin);
    let status = child.wait().unwrap();
    std::io::Read::read_to_string(&mut stderr, &mut seen).unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    let report = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(seen.contains("exited with status 0"), "{seen}");
    (status, report)
}

#[test]
fn fail_on_leak_gates_a_spawned_load_test() {
    if !require_root() {
        return;
    }
    let (status, report) = load_test("1024", 2.5);
    assert_eq!(status.code(), Some(3), "{report}");
    assert_eq!(stack_of(&report, "leak_site").unwrap()["kind"], "leak");
    // The fixed build: the cache plateaus, nothing leaks.
    let (status, report) = load_test("0", 2.5);
    assert_eq!(status.code(), Some(0), "{report}");
    let cache = stack_of(&report, "cache_put").unwrap();
    assert_eq!(cache["kind"], "stable", "{cache}");
    assert_eq!(cache["outstanding_bytes"], 25_600);
}

/// A command that execs another program (`env`, `nice`, a launcher) keeps the probes placed
/// for itself: the program it becomes is traced only where it calls the same functions of the
/// same libraries, without its own allocator's probes or interpreter. That is said, on stderr
/// and in every report after, never hidden in a report marked complete.
#[test]
fn spawn_mode_says_when_the_command_execs_another_program() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    let leaky = std::fs::canonicalize(&binary.path).unwrap();
    let leaky = leaky.to_str().unwrap();
    let (mut trace, mut stdin) = Leaktrace::spawn_with_input(&[
        "--format",
        "json",
        "--interval",
        "0.5",
        "--",
        "/usr/bin/env",
        leaky,
        "10",
        "1000",
        "0",
    ]);
    let pid = trace.pid_of_command();
    stdin.write_all(b"go\n").unwrap();
    trace.wait_for_stdout("done");
    trace.wait_for_stderr(&format!(
        "leaktrace: pid {pid} exec'd {leaky} after leaktrace attached: the probes stay on the allocator of the program before"
    ));
    drop(stdin);
    let outcome = trace.wait();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    let report = outcome.last();
    assert_eq!(report["complete"], false, "{report}");
    assert_eq!(
        report["incomplete_reasons"],
        serde_json::json!([format!(
            "it exec'd {leaky} after leaktrace attached: traced only through the probes placed for the program before"
        )]),
        "{report}"
    );
}
