//! Integration tests: leaktrace attached to real processes with known ground truth.
//! They load BPF and attach uprobes, so they run as root (`cargo xtask test`).

mod allocators;
mod http;
mod metrics;
mod processes;
mod prometheus;
mod protobuf;
mod sampling;
mod service;
mod stacks;
mod support;
mod unwind;

use support::{
    Fixture, Leaktrace, all_symbols, compile, malloc_bytes_in, reported_sites, require_root,
    run_leaktrace, stack_of, trace_two_rounds,
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

/// Traces `leaky` (100 leaks of 4096 bytes and 1000 temporary 128-byte blocks) with
/// `--format FORMAT -o FILE`, and returns the file's bytes once leaktrace has stopped.
fn trace_leaky_to_file(format: &str) -> (Vec<u8>, support::Binary) {
    let binary = compile("leaky", &[]);
    let mut fixture = Fixture::start(&binary, &["100", "4096", "1000"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("report");
    let pid = fixture.pid().to_string();
    let trace = Leaktrace::start(&[
        "-p",
        &pid,
        "--interval",
        "0.5",
        "--format",
        format,
        "-o",
        file.to_str().unwrap(),
    ]);
    fixture.round();
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    fixture.finish();
    (std::fs::read(&file).unwrap(), binary)
}

#[test]
fn pprof_has_inuse_and_alloc_samples_functions_lines_and_mappings() {
    use protobuf::Message;
    if !require_root() {
        return;
    }
    let (gzipped, binary) = trace_leaky_to_file("pprof");
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gzipped[..]), &mut raw)
        .expect("gzipped");
    // profile.proto: 1 sample_type, 2 sample, 3 mapping, 4 location, 5 function, 6 strings.
    let profile = Message::parse(&raw);
    let strings: Vec<String> = profile
        .bytes(6)
        .iter()
        .map(|s| String::from_utf8(s.to_vec()).unwrap())
        .collect();
    assert_eq!(strings[0], "");
    let s = |i: u64| strings[i as usize].as_str();
    let types: Vec<(&str, &str)> = profile
        .messages(1)
        .iter()
        .map(|t| (s(t.uint(1)), s(t.uint(2))))
        .collect();
    assert_eq!(
        types,
        [
            ("inuse_space", "bytes"),
            ("inuse_objects", "count"),
            ("alloc_space", "bytes"),
            ("alloc_objects", "count")
        ]
    );
    assert_eq!(s(profile.uint(14)), "inuse_space", "default sample type");
    let functions: std::collections::HashMap<u64, Message> = profile
        .messages(5)
        .into_iter()
        .map(|f| (f.uint(1), f))
        .collect();
    let locations: std::collections::HashMap<u64, Message> = profile
        .messages(4)
        .into_iter()
        .map(|l| (l.uint(1), l))
        .collect();
    let mappings: std::collections::HashMap<u64, Message> = profile
        .messages(3)
        .into_iter()
        .map(|m| (m.uint(1), m))
        .collect();
    // Each sample by the function of its leaf location (the allocator's caller).
    let mut by_leaf = std::collections::BTreeMap::new();
    for sample in profile.messages(2) {
        let leaf = &locations[&sample.uints(1)[0]];
        let line = leaf.messages(4).pop().expect("the leaf has a line");
        let function = &functions[&line.uint(1)];
        let name = s(function.uint(2)).to_owned();
        if name == "leak_site" {
            assert_eq!(line.uint(2), line_of("leaky.c", "void *p = malloc(bytes);"));
            assert!(s(function.uint(4)).ends_with("leaky.c"));
            let mapping = &mappings[&leaf.uint(2)];
            assert_eq!(s(mapping.uint(5)), binary.path.to_str().unwrap());
            assert!(mapping.uint(2) <= leaf.uint(3) && leaf.uint(3) < mapping.uint(3));
            // The caller's location is main.
            let caller = &locations[&sample.uints(1)[1]];
            let caller_line = caller.messages(4).pop().unwrap();
            assert_eq!(s(functions[&caller_line.uint(1)].uint(2)), "main");
        }
        // main calls temp_site from two places: two stacks, summed here.
        let sum: &mut Vec<u64> = by_leaf.entry(name).or_insert_with(|| vec![0; 4]);
        for (total, v) in sum.iter_mut().zip(sample.uints(2)) {
            *total += v;
        }
    }
    // leak_site: all outstanding; temp_site: all freed, yet counted since attach.
    assert_eq!(by_leaf["leak_site"], [409_600, 100, 409_600, 100]);
    assert_eq!(by_leaf["temp_site"], [0, 0, 128_000, 1000]);
    assert_eq!(by_leaf.len(), 2, "{by_leaf:?}");
}

#[test]
fn folded_stacks_are_outermost_first_with_outstanding_bytes() {
    if !require_root() {
        return;
    }
    let (folded, _binary) = trace_leaky_to_file("folded");
    let folded = String::from_utf8(folded).unwrap();
    let lines: Vec<(Vec<&str>, u64)> = folded
        .lines()
        .map(|line| {
            let (stack, bytes) = line.rsplit_once(' ').expect("STACK BYTES");
            (stack.split(';').collect(), bytes.parse().expect("a number"))
        })
        .collect();
    // Only the leak is outstanding; the churn is gone.
    assert_eq!(lines.len(), 1, "{folded}");
    let (frames, bytes) = &lines[0];
    assert_eq!(*bytes, 409_600);
    assert_eq!(frames[frames.len() - 1], "leak_site");
    assert_eq!(frames[frames.len() - 2], "main");
}

#[test]
fn svg_flame_graph_names_the_leaking_function() {
    if !require_root() {
        return;
    }
    let (svg, _binary) = trace_leaky_to_file("svg");
    let svg = String::from_utf8(svg).unwrap();
    assert!(svg.starts_with("<?xml"), "{}", &svg[..100.min(svg.len())]);
    assert!(svg.contains("<svg"));
    assert!(
        svg.contains("leak_site"),
        "the leaking function is in the graph"
    );
    assert!(svg.contains("409,600 bytes"), "with its outstanding bytes");
    assert!(!svg.contains("temp_site"));
}

/// The report files in `dir`, oldest first (their names sort by time).
fn report_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

#[test]
fn a_directory_gets_a_report_per_interval_and_diff_shows_what_grew() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    let mut fixture = Fixture::start(&binary, &["100", "4096", "1000"]);
    let dir = tempfile::tempdir().unwrap();
    let reports = dir.path().join("reports/");
    let pid = fixture.pid().to_string();
    let trace = Leaktrace::start(&[
        "-p",
        &pid,
        "--interval",
        "0.2",
        "--format",
        "json",
        "-o",
        reports.to_str().unwrap(),
        "--keep",
        "2",
    ]);
    fixture.round();
    // The second report written after round 1 (the first may have been taken as the round
    // ended): 100 leaks.
    let before_round_2 = report_files(&reports);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let first = loop {
        let now = report_files(&reports);
        if let Some(new) = now.iter().filter(|p| !before_round_2.contains(p)).nth(1) {
            let copy = dir.path().join("first.json");
            std::fs::copy(new, &copy).unwrap();
            break copy;
        }
        assert!(std::time::Instant::now() < deadline, "no report file");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    fixture.round();
    // Let several more intervals pass: --keep 2 must prune them.
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    let kept = report_files(&reports);
    assert_eq!(kept.len(), 2, "{kept:?}");
    for file in &kept {
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(&format!("leaktrace-{pid}-2")), "{name}");
        // One report per file.
        assert_eq!(std::fs::read_to_string(file).unwrap().lines().count(), 1);
    }
    let last = kept.last().unwrap();
    let final_report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(last).unwrap()).unwrap();
    assert_eq!(final_report["last"], true);

    let diff = run_leaktrace(&[
        "diff",
        first.to_str().unwrap(),
        last.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert!(
        diff.status.success(),
        "{}",
        String::from_utf8_lossy(&diff.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&diff.stdout).unwrap();
    assert_eq!(v["old"]["outstanding_bytes"], 409_600);
    assert_eq!(v["new"]["outstanding_bytes"], 819_200);
    let grown = v["stacks"].as_array().unwrap();
    assert_eq!(grown.len(), 1, "{v}");
    assert_eq!(grown[0]["frames"][0]["symbol"], "leak_site");
    assert_eq!(grown[0]["delta_bytes"], 409_600);
    assert_eq!(grown[0]["delta_allocations"], 100);
    assert_eq!(grown[0]["old_bytes"], 409_600);
    assert_eq!(grown[0]["new_bytes"], 819_200);

    let text = run_leaktrace(&["diff", first.to_str().unwrap(), last.to_str().unwrap()]);
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("+400.0 KiB (+100 allocs)  400.0 KiB → 800.0 KiB"),
        "{text}"
    );
    assert!(
        text.contains("leak_site (") && text.contains("leaky.c:"),
        "{text}"
    );
    fixture.finish();
}

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
