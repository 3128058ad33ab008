//! `--sample-bytes`: a block of s bytes is traced with probability min(1, s/N) and stands for
//! 1/p blocks. Where that probability is 1 the numbers must be exact; where it is not, the
//! estimate must be a sampled one (a multiple of N) and within six standard deviations of the
//! truth (a false failure about once in 500 million runs).

use std::path::{Path, PathBuf};

use crate::support::{
    Fixture, Leaktrace, PlainUprobe, Site, compile, expected_sites, file_offset_of, reported_sites,
    require_root, stack_of, trace_two_rounds,
};

#[test]
fn with_one_byte_samples_every_block_goes_through_sampling_and_the_family_stays_exact() {
    if !require_root() {
        return;
    }
    // Every block is drawn (p = 1), so what is tested is the bookkeeping of drawn blocks:
    // realloc chains, failed reallocs, realloc(p, 0), frees from other threads.
    let (outcome, want) = trace_two_rounds("family", &["--top", "100", "--sample-bytes", "1"]);
    let report = outcome.last();
    assert_eq!(reported_sites(report), want);
    let totals = &report["totals"];
    assert_eq!(
        totals["outstanding_bytes"],
        want.iter().map(|w| w.1).sum::<u64>()
    );
    assert_eq!(totals["lost_events"], 0);
    assert_eq!(report["sample_bytes"], 1);
    // The block allocated before attach was never drawn: its free cannot be told from the
    // free of a block that was not drawn, so the count is unknown rather than 0.
    assert_eq!(totals["unmatched_frees"], serde_json::Value::Null);
}

#[test]
fn blocks_of_at_least_the_sample_size_are_always_traced_and_churn_stays_absent() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    // 100 leaks of 4096 bytes (p = 1) and 1000 temporary 128-byte blocks (p = 1/32).
    let mut fixture = Fixture::start(&binary, &["100", "4096", "1000"]);
    let outcome = Leaktrace::one_round(&mut fixture, &["--sample-bytes", "4K"]);
    let report = outcome.last();
    assert_eq!(report["sample_bytes"], 4096);
    assert_eq!(report["complete"], true);
    let totals = &report["totals"];
    assert_eq!(totals["outstanding_bytes"], 100 * 4096);
    assert_eq!(totals["outstanding_allocations"], 100);
    let stacks = report["stacks"].as_array().unwrap();
    assert_eq!(stacks.len(), 1, "only the leak is outstanding: {stacks:?}");
    let leak = stack_of(report, "leak_site").expect("the leaking function is named");
    assert_eq!(leak["outstanding_bytes"], 100 * 4096);
    assert_eq!(leak["kind"], "growing");
    fixture.finish();
}

#[test]
fn small_blocks_are_estimated_without_bias_from_a_sample() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    // 200000 leaks of 48 bytes, each drawn with p = 48/4096, and as many temporary blocks.
    let (leaks, size, n) = (200_000u64, 48u64, 4096u64);
    let mut fixture = Fixture::start(
        &binary,
        &[&leaks.to_string(), &size.to_string(), &leaks.to_string()],
    );
    let outcome = Leaktrace::one_round(&mut fixture, &["--sample-bytes", &n.to_string()]);
    let report = outcome.last();
    assert_eq!(report["complete"], true);
    let leak = stack_of(report, "leak_site").expect("the leaking function is named");
    let estimate = leak["outstanding_bytes"].as_u64().unwrap();
    let truth = leaks * size;
    // Each drawn 48-byte block stands for 4096 bytes: a whole multiple, which 9.6 MB is not,
    // so a trace that saw every block cannot pass.
    assert_eq!(estimate % n, 0, "{estimate}");
    let drawn = estimate / n;
    let p = size as f64 / n as f64;
    let mean = leaks as f64 * p;
    let sd = (leaks as f64 * p * (1.0 - p)).sqrt();
    assert!(
        (drawn as f64 - mean).abs() < 6.0 * sd,
        "{drawn} blocks drawn, {mean:.0} +- {sd:.0} expected: estimate {estimate}, truth {truth}"
    );
    // The count stands for the same blocks.
    let count = leak["outstanding_allocations"].as_u64().unwrap();
    assert_eq!(
        count,
        (drawn as f64 * n as f64 / size as f64).round() as u64
    );
    // The temporary blocks that were drawn were freed, and their frees seen.
    assert!(stack_of(report, "temp_site").is_none(), "{report}");
    assert_eq!(report["stacks"].as_array().unwrap().len(), 1);
    fixture.finish();
}

#[test]
fn mappings_stay_exact_under_sampling() {
    if !require_root() {
        return;
    }
    let (outcome, expected) = trace_two_rounds(
        "mappings",
        &["--top", "100", "--file-mappings", "--sample-bytes", "1G"],
    );
    let report = outcome.last();
    let mappings = |sites: Vec<Site>| {
        sites
            .into_iter()
            .filter(|site| site.3 != "malloc")
            .collect::<Vec<_>>()
    };
    let want = mappings(expected);
    assert!(!want.is_empty());
    assert_eq!(mappings(reported_sites(report)), want);
    assert_eq!(report["totals"]["file_mappings"], 6);
    assert_eq!(report["totals"]["lost_events"], 0);
}

/// `leaktrace: bpf program NAME runs=N ...` of `--print-program-times`: N, or 0 when the
/// program never ran.
fn program_runs(stderr: &[String], program: &str) -> u64 {
    let prefix = format!("leaktrace: bpf program {program} runs=");
    stderr
        .iter()
        .find_map(|line| line.strip_prefix(&prefix)?.split(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_call_whose_block_is_not_drawn_skips_its_return_probe() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    // 200 leaks of 64 KiB (p = 1) and 2000 temporary 128-byte blocks (p = 1/512).
    let (leaks, n, churn) = (200u64, 64u64 << 10, 2000u64);
    let mut fixture = Fixture::start(&binary, &["200", "65536", "2000"]);
    let args = ["--sample-bytes", "64K", "--print-program-times"];
    let outcome = Leaktrace::one_round(&mut fixture, &args);
    let report = outcome.last();
    assert!(
        outcome
            .stderr
            .iter()
            .any(|line| line.contains("hit only by drawn calls: uprobe sessions")),
        "{:?}",
        outcome.stderr
    );
    let totals = &report["totals"];
    assert_eq!(totals["outstanding_bytes"], leaks * n);
    assert_eq!(totals["lost_events"], 0);
    assert_eq!(totals["unpaired_returns"], 0);
    // Each drawn temporary block stands for 512 calls: what is not a leak is drawn temps.
    let allocations = totals["allocations"].as_u64().unwrap();
    assert_eq!((allocations - leaks) % 512, 0, "{allocations}");
    let drawn = leaks + (allocations - leaks) / 512;
    // One run at every entry, and one at the return of each drawn call only.
    assert_eq!(
        program_runs(&outcome.stderr, "alloc_session"),
        leaks + churn + drawn,
        "{:?}",
        outcome.stderr
    );
    assert_eq!(program_runs(&outcome.stderr, "malloc_entry"), 0);
    assert!(drawn < leaks + churn / 10, "{drawn}");

    // Without sessions (as on a kernel before 6.13), every call traps at its return, and the
    // numbers are as exact.
    let args = [
        "--sample-bytes",
        "64K",
        "--print-program-times",
        "--probes-without-sessions",
    ];
    let outcome = Leaktrace::one_round(&mut fixture, &args);
    let totals = &outcome.last()["totals"];
    assert_eq!(totals["outstanding_bytes"], leaks * n);
    assert_eq!(program_runs(&outcome.stderr, "malloc_entry"), leaks + churn);
    assert_eq!(
        program_runs(&outcome.stderr, "alloc_return"),
        leaks + churn,
        "{:?}",
        outcome.stderr
    );
    assert_eq!(program_runs(&outcome.stderr, "alloc_session"), 0);
    fixture.finish();
}

#[test]
fn an_undrawn_malloc_still_hides_its_nested_mmap_and_direct_mmaps_stay_exact() {
    if !require_root() {
        return;
    }
    // 50 mallocs of 256 KiB per round, each mapped by a nested mmap, drawn with p = 1/4096;
    // between them, 50 direct mmaps of 3 pages. Drawn or not, no malloc shows as a mapping.
    let (outcome, expected) =
        trace_two_rounds("undrawn", &["--top", "100", "--sample-bytes", "1G"]);
    let report = outcome.last();
    let mappings: Vec<Site> = reported_sites(report)
        .into_iter()
        .filter(|site| site.3 != "malloc")
        .collect();
    assert_eq!(mappings, expected);
    let totals = &report["totals"];
    assert_eq!(totals["mapped_bytes"], 2 * 50 * 3 * 4096);
    assert_eq!(totals["lost_events"], 0);
    assert_eq!(totals["unpaired_returns"], 0);
}

/// The file offset in `module` (as `pid` maps it) of the first byte of the function at
/// `function_offset` that differs from the file: the breakpoint of leaktrace's probe there.
fn probed_offset(pid: u32, module: &Path, function_offset: u64) -> u64 {
    let file = std::fs::read(module).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let (start, map_offset) = maps
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 6 || !fields[1].contains('x') || Path::new(fields[5]) != module {
                return None;
            }
            let (start, end) = fields[0].split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            let offset = u64::from_str_radix(fields[2], 16).ok()?;
            (function_offset >= offset && function_offset < offset + (end - start))
                .then_some((start, offset))
        })
        .expect("the function's code is mapped");
    let mut code = [0u8; 64];
    std::os::unix::fs::FileExt::read_exact_at(
        &mem,
        &mut code,
        start + function_offset - map_offset,
    )
    .unwrap();
    let at = function_offset as usize;
    let patched = code
        .iter()
        .zip(&file[at..at + code.len()])
        .position(|(a, b)| a != b)
        .expect("a breakpoint in the function's first 64 bytes");
    function_offset + patched as u64
}

/// glibc as `pid` maps it.
fn libc_of(pid: u32) -> PathBuf {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .find_map(|l| {
            let path = l.split_whitespace().nth(5)?;
            path.contains("/libc.so").then(|| PathBuf::from(path))
        })
        .expect("the fixture maps glibc")
}

#[test]
fn under_another_tracer_s_return_probe_an_undrawn_malloc_still_hides_its_nested_mmap() {
    if !require_root() {
        return;
    }
    // As `an_undrawn_malloc_still_hides_...`, with a plain kernel return probe (another
    // tracer's) on malloc, at the very instruction leaktrace probes: the kernel runs both
    // entries, then puts its trampoline's address in the return slot of every malloc, where
    // leaktrace's entry saw the caller's.
    let binary = compile("undrawn", &[]);
    let mut fixture = Fixture::start(&binary, &[]);
    let pid = fixture.pid();
    let trace = Leaktrace::attach(pid, &["--top", "100", "--sample-bytes", "1G"]);
    let libc = libc_of(pid);
    let malloc = file_offset_of(&std::fs::read(&libc).unwrap(), "malloc");
    let mut other = PlainUprobe::attach_return(&libc, probed_offset(pid, &libc, malloc), pid);
    fixture.round();
    let expected = fixture.round();
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    // Its trampoline was there: it saw every big malloc return.
    assert!(other.hits() >= 2 * 50, "{}", other.hits());
    drop(other);
    fixture.finish();
    let report = outcome.last();
    let mappings: Vec<Site> = reported_sites(report)
        .into_iter()
        .filter(|site| site.3 != "malloc")
        .collect();
    assert_eq!(mappings, expected_sites(&expected));
    let totals = &report["totals"];
    assert_eq!(totals["mapped_bytes"], 2 * 50 * 3 * 4096);
    assert_eq!(totals["lost_events"], 0);
    assert_eq!(totals["unpaired_returns"], 0);
}

#[test]
fn a_page_aligned_return_address_is_not_taken_for_the_uretprobe_trampoline() {
    if !require_root() {
        return;
    }
    // 50 undrawn mallocs of 256 KiB per round, each followed from the same frame by a call
    // whose return address, written to the malloc's return slot, is page-aligned; that call
    // maps 3 pages directly. The kernel's own trampoline address tells them apart, where a
    // test of page alignment took the direct mmaps for nested ones and hid them.
    let (outcome, expected) =
        trace_two_rounds("page_return", &["--top", "100", "--sample-bytes", "1G"]);
    let report = outcome.last();
    let mappings: Vec<Site> = reported_sites(report)
        .into_iter()
        .filter(|site| site.3 != "malloc")
        .collect();
    assert_eq!(mappings, expected);
    assert_eq!(report["totals"]["mapped_bytes"], 2 * 50 * 3 * 4096);
    assert_eq!(report["totals"]["lost_events"], 0);
}
