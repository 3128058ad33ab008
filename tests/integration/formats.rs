//! Report formats and destinations: pprof, folded stacks, an SVG flame graph, a directory of
//! timestamped reports, and `leaktrace diff` of two of them.

use super::line_of;
use crate::support::{self, Fixture, Leaktrace, compile, require_root, run_leaktrace};

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
    use crate::protobuf::Message;
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
