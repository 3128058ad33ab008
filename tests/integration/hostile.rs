//! Hostile and failing environments: a target that controls the paths leaktrace opens, a full
//! disk, closed standard streams, a reader that goes away, children that live 50 ms. In each,
//! leaktrace must neither read what it should not, nor block, nor trace on with nowhere to
//! report, nor call a partial trace complete; and the target runs on unharmed.

use std::{
    io::Read as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::support::{
    Fixture, LEAKTRACE, Leaktrace, compile, malloc_bytes_in, require_root, run_leaktrace, stack_of,
};

/// Longer than any of these traces takes when leaktrace stops as it should (attaching and
/// detaching take seconds each on a loaded machine: the kernel detaches one probe at a time,
/// machine-wide), far shorter than `--duration 300` (which would end a trace that did not stop
/// by itself).
const STOPS_WITHIN: Duration = Duration::from_secs(90);

/// A root for `chroot`: the fixture and the libraries it loads, at their paths.
fn chroot_of(binary: &Path) -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let exe = root.path().join("fixture");
    std::fs::copy(binary, &exe).unwrap();
    let ldd = Command::new("ldd").arg(binary).output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line
            .split("=>")
            .last()
            .and_then(|p| p.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(path) = path {
            let to = root.path().join(path.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(path, &to).unwrap();
        }
    }
    (root, exe)
}

fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn a_chrooted_target_cannot_point_leaktrace_at_host_files_or_make_it_block() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    let (root, _) = chroot_of(&binary.path);
    let mut fixture = Fixture::start_command(
        Command::new("chroot")
            .arg(root.path())
            .args(["/fixture", "100", "4096", "1000"]),
    );
    let pid = fixture.pid();
    // /proc/PID/maps of a chrooted process shows its files by their host paths, which under
    // the target's root name files that the target controls. It plants a FIFO where its libc
    // would be found that way, and a symlink to a host file where its dynamic loader would.
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mapped = |name: &str| {
        maps.lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| p.contains(name))
            .unwrap_or_else(|| panic!("{name} not mapped: {maps}"))
            .to_owned()
    };
    let (libc, loader) = (mapped("libc.so"), mapped("ld-linux"));
    let host_secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        host_secret.path(),
        "root:$6$secret-hash:19000:0:99999:7:::\n",
    )
    .unwrap();
    for (planted, what) in [(&libc, "fifo"), (&loader, "symlink")] {
        let at = root.path().join(planted.trim_start_matches('/'));
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        match what {
            "fifo" => mkfifo(&at),
            _ => std::os::unix::fs::symlink(host_secret.path(), &at).unwrap(),
        }
    }

    let outcome = Leaktrace::one_round(&mut fixture, &[]);
    let report = outcome.last();
    assert_eq!(report["allocator"], "glibc", "{report}");
    assert_eq!(report["allocator_module"], libc.as_str());
    assert_eq!(report["totals"]["outstanding_bytes"], 100 * 4096);
    assert_eq!(report["totals"]["allocations"], 1100);
    let leak = stack_of(report, "leak_site").expect("symbolized from the mapped file");
    assert_eq!(leak["outstanding_allocations"], 100);
    fixture.finish();
}

/// The target's `malloc` is back to its own first bytes. Under a loaded full run they were twice
/// still the breakpoint (0xcc) at the instant leaktrace's exit was reaped, and restored a moment
/// later: waited for, up to 5 s, and said when it was not at once.
fn assert_probes_gone(pid: u32, original: [u8; 4]) {
    let start = Instant::now();
    while malloc_bytes_in(pid) != original && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(malloc_bytes_in(pid), original, "probes detached");
    if start.elapsed() > Duration::from_millis(20) {
        eprintln!(
            "malloc restored {:?} after leaktrace exited",
            start.elapsed()
        );
    }
}

/// The leaky fixture started with `args`, and the first bytes of its `malloc` before any probe:
/// after leaktrace has gone, they must be the same.
fn leaky_fixture(args: &[&str]) -> (crate::support::Binary, Fixture, [u8; 4]) {
    let binary = compile("leaky", &[]);
    let fixture = Fixture::start(&binary, args);
    let original = malloc_bytes_in(fixture.pid());
    (binary, fixture, original)
}

/// Runs `script` with `sh` in a mount namespace of its own (so that a tmpfs mounted there
/// vanishes with it), with `$LT` leaktrace and `$D` an empty directory; returns its stdout
/// and stderr.
fn in_mount_namespace(script: &str, env: &[(&str, &str)]) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-euc", script])
        .env("LT", LEAKTRACE)
        .env("D", dir.path())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("unshare runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    (stdout, stderr)
}

#[test]
fn a_full_disk_stops_the_trace_at_its_first_report_and_keeps_the_old_files_whole() {
    if !require_root() {
        return;
    }
    let (_binary, fixture, original) = leaky_fixture(&["100", "4096", "1000"]);
    let pid = fixture.pid().to_string();
    // A 64 KiB tmpfs that holds yesterday's profile and a JSON Lines file whose last page has
    // room for a part of a report but not all of it, then is filled up.
    let script = r#"
        mount -t tmpfs -o size=64k tmpfs "$D"
        printf yesterday > "$D/heap.pb.gz"
        head -c 3999 /dev/zero | tr '\0' x > "$D/r.json"; echo >> "$D/r.json"
        dd if=/dev/zero of="$D/fill" bs=1k 2>/dev/null || true
        for format in pprof json; do
            case $format in pprof) file=heap.pb.gz;; json) file=r.json;; esac
            start=$(date +%s%N)
            status=0
            "$LT" -p "$PID" -i 0.2 --duration 300 -f $format -o "$D/$file" 2>"$D/../$format.err" || status=$?
            echo "$format status $status after $(( ($(date +%s%N) - start) / 1000000 )) ms"
        done
        ls -A "$D"
        cat "$D/heap.pb.gz"; echo
        wc -c < "$D/r.json"
        tail -c 5 "$D/r.json" | od -An -c
    "#;
    let dir = tempfile::tempdir().unwrap();
    let (stdout, _) = in_mount_namespace(
        &script.replace("$D/../", &format!("{}/", dir.path().display())),
        &[("PID", &pid)],
    );
    let lines: Vec<&str> = stdout.lines().collect();
    for (i, format, file) in [(0, "pprof", "heap.pb.gz"), (1, "json", "r.json")] {
        let (head, ms) = lines[i].split_once(" after ").unwrap();
        assert_eq!(head, format!("{format} status 1"), "{stdout}");
        let ms: u64 = ms.trim_end_matches(" ms").parse().unwrap();
        assert!(
            Duration::from_millis(ms) < STOPS_WITHIN,
            "{format}: traced on for {ms} ms with nowhere to write"
        );
        let stderr = std::fs::read_to_string(dir.path().join(format!("{format}.err"))).unwrap();
        let error = stderr
            .lines()
            .find(|l| l.starts_with("leaktrace: error:"))
            .unwrap_or_else(|| panic!("{stderr}"));
        assert!(
            error.contains("writing the report to ") && error.contains(file),
            "names the file: {error}"
        );
        assert!(error.contains("No space left on device"), "{error}");
        assert!(error.ends_with(&format!("stopped tracing, detached from pid {pid}")));
    }
    // Nothing but the files that were there: no temporary file left behind.
    assert_eq!(lines[2..5], ["fill", "heap.pb.gz", "r.json"], "{stdout}");
    assert_eq!(lines[5], "yesterday", "the old profile is whole");
    // The JSON Lines file is as it was: the part of a report that fitted was cut back.
    assert_eq!(lines[6].trim(), "4000", "{stdout}");
    assert_eq!(
        lines[7].split_whitespace().collect::<Vec<_>>(),
        ["x", "x", "x", "x", "\\n"]
    );
    assert_probes_gone(fixture.pid(), original);
    fixture.finish();
}

/// Runs leaktrace with `args` and some of its standard descriptors closed (0, 1, 2); returns
/// its exit status and stderr (when not closed).
fn run_with_closed(args: &[&str], close: &[i32]) -> (Option<i32>, String) {
    let close = close.to_vec();
    let mut command = Command::new(LEAKTRACE);
    command
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: close is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            for &fd in &close {
                libc::close(fd);
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    (child.wait().unwrap().code(), stderr)
}

#[test]
fn closed_or_broken_stdout_and_stderr_harm_neither_the_trace_nor_the_target() {
    if !require_root() {
        return;
    }
    let (_binary, fixture, original) = leaky_fixture(&["1", "1", "1"]);
    let pid = fixture.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.json");
    let file = file.to_str().unwrap();
    let args = [
        "-p",
        &pid,
        "-f",
        "json",
        "-o",
        file,
        "-i",
        "0.2",
        "--duration",
        "1",
    ];
    // stderr closed, then stdout and stderr closed: the trace runs to its end.
    for close in [&[2][..], &[1, 2]] {
        let (status, _) = run_with_closed(&args, close);
        assert_eq!(status, Some(0), "closed {close:?}");
        let reports = std::fs::read_to_string(file).unwrap();
        assert!(reports.lines().count() >= 2, "{reports}");
        let last: Value = serde_json::from_str(reports.lines().last().unwrap()).unwrap();
        assert_eq!(last["last"], true);
        std::fs::remove_file(file).unwrap();
    }
    // stderr a pipe whose reader went away: every message fails with EPIPE.
    let mut child = Command::new(LEAKTRACE)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert!(std::fs::read_to_string(file).unwrap().lines().count() >= 2);
    // Reports to a stdout that was closed: Rust's runtime gave it /dev/null before main, so
    // they go nowhere, and the trace ends as asked.
    let (status, stderr) = run_with_closed(&["-p", &pid, "--duration", "1"], &[1]);
    assert_eq!(status, Some(0), "{stderr}");
    assert_probes_gone(fixture.pid(), original);
    fixture.finish();
}

#[test]
fn a_reader_that_goes_away_ends_the_trace_at_once() {
    if !require_root() {
        return;
    }
    let (_binary, fixture, original) = leaky_fixture(&["1", "1", "1"]);
    let pid = fixture.pid().to_string();
    // `leaktrace -f json | head -1`: the reader takes one report and leaves. `-f folded`
    // writes only its final report to stdout: the reader leaves before any write.
    for (format, read_first) in [("json", true), ("folded", false)] {
        let mut child = Command::new(LEAKTRACE)
            .args(["-p", &pid, "-f", format, "-i", "0.2", "--duration", "300"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let mut seen = String::new();
        // Attached once it says so.
        let mut byte = [0u8];
        while !seen.contains("leaktrace: tracing pid") {
            assert_eq!(stderr.read(&mut byte).unwrap(), 1, "{seen}");
            seen.push(byte[0] as char);
        }
        if read_first {
            let mut line = Vec::new();
            while stdout.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            let report: Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(report["pid"], fixture.pid());
        }
        let gone = Instant::now();
        drop(stdout);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                gone.elapsed() < STOPS_WITHIN,
                "{format}: still tracing with no reader"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        stderr.read_to_string(&mut seen).unwrap();
        assert_eq!(status.code(), Some(0), "{format}: {seen}");
        assert!(
            seen.contains(&format!(
                "leaktrace: the reader of stdout went away: stopped tracing, detached from pid {pid}"
            )),
            "{format}: {seen}"
        );
        assert_probes_gone(fixture.pid(), original);
    }
    fixture.finish();
}

#[test]
fn children_that_live_50_ms_are_followed_or_counted_never_reported_complete() {
    if !require_root() {
        return;
    }
    let binary = compile("short_children", &[]);
    // 20 children, each leaking 100 x 64 bytes at once and exiting 50 ms later.
    let mut fixture = Fixture::start(&binary, &["20", "100"]);
    let parent = fixture.pid();
    let trace = Leaktrace::attach(parent, &["--follow-forks"]);
    assert_eq!(fixture.round(), ["children 20"]);
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    fixture.finish();

    let mut followed = std::collections::BTreeSet::new();
    for report in &outcome.reports {
        let pid = report["pid"].as_u64().unwrap() as u32;
        if pid == parent {
            continue;
        }
        followed.insert(pid);
        // Its first allocations came before the attach: never a complete report.
        assert_eq!(report["complete"], false, "{report}");
        let reasons = report["incomplete_reasons"].as_array().unwrap();
        assert!(
            reasons[0].as_str().unwrap().starts_with(
                "a child followed after its fork (--follow-forks): what it allocated in the "
            ),
            "{report}"
        );
    }
    let parent_report = outcome
        .reports
        .iter()
        .rev()
        .find(|r| r["pid"] == parent)
        .unwrap();
    assert_eq!(parent_report["last"], true);
    let missed = 20 - followed.len();
    eprintln!(
        "children of 50 ms: {} followed, {missed} exited before the attach",
        followed.len()
    );
    if missed == 0 {
        assert_eq!(parent_report["complete"], true, "{parent_report}");
    } else {
        assert_eq!(parent_report["complete"], false, "{parent_report}");
        assert_eq!(
            parent_report["incomplete_reasons"],
            serde_json::json!([format!(
                "{missed} of its 20 children (--follow-forks) were not followed (they exited, could not be attached, or the trace ended first): what they allocated is not seen"
            )])
        );
    }
}

#[test]
fn argument_errors_are_one_line_with_status_1() {
    // No root needed: arguments are checked before anything else.
    for (args, want) in [
        (
            &["-p", "x"][..],
            "leaktrace: error: invalid value 'x' for '--pid <PID>': invalid digit found in string (see `leaktrace --help`)\n",
        ),
        (
            &["-p", "1", "-i", "1e-9"],
            "leaktrace: error: invalid value '1e-9' for '--interval <SECS>': `1e-9` is shorter than the shortest interval, 0.1 s (see `leaktrace --help`)\n",
        ),
        (
            &["-p", "1", "--top", "0"],
            "leaktrace: error: invalid value '0' for '--top <N>': `0` is not a number of at least 1 (see `leaktrace --help`)\n",
        ),
    ] {
        let out = run_leaktrace(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), want);
    }
    let help = run_leaktrace(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("1 on an error"));
}
