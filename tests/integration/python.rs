//! CPython services (issue 14): Python frames (function, file, line) among the native ones,
//! checked against the ground truth a script prints from `sys.getsizeof`
//! (`tests/fixtures/python_leaks.py`). Debian's python3 (3.11, without frame pointers) is
//! installed by `cargo xtask setup`: its tests never skip.

use std::process::Command;

use serde_json::Value;

use crate::support::{Fixture, Leaktrace, require_root, run_leaktrace};

const DEBIAN_PYTHON: &str = "/usr/bin/python3.11";
const OBJECTS: &str = "2000";

fn script() -> String {
    format!(
        "{}/../tests/fixtures/python_leaks.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// The Python frames of a stack, innermost first, as (function, line).
fn python_frames(stack: &Value) -> Vec<(String, u64)> {
    stack["frames"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["runtime"] == "python")
        .map(|f| {
            (
                f["symbol"].as_str().unwrap_or("?").to_owned(),
                f["line"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Runs the script under `python` with `env`, traced from before its allocations; returns its
/// ground truth, leaktrace's final report and its stderr.
fn trace(python: &str, env: &[(&str, &str)]) -> (Value, Value, Vec<String>) {
    let mut fixture = Fixture::start_command(
        Command::new(python)
            .arg(script())
            .arg(OBJECTS)
            .envs(env.iter().copied()),
    );
    let trace = Leaktrace::attach(fixture.pid(), &["--top", "1000"]);
    let lines = fixture.round();
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    let truth: Value = serde_json::from_str(&lines[0]).unwrap();
    (truth, outcome.last().clone(), outcome.stderr)
}

/// Each leak site of the truth: the stacks that allocate at its line, called from its caller's
/// line, and hold exactly its count of objects (one stack per allocation an object takes: a
/// bytes object is one block, a bytearray two), hold exactly its bytes.
fn assert_sites(truth: &Value, report: &Value, sites: &[&str]) {
    let file = truth["file"].as_str().unwrap();
    for site in truth["sites"].as_array().unwrap() {
        let function = site["function"].as_str().unwrap();
        if !sites.contains(&function) {
            continue;
        }
        let want = vec![
            (function.to_owned(), site["line"].as_u64().unwrap()),
            (
                site["caller"].as_str().unwrap().to_owned(),
                site["caller_line"].as_u64().unwrap(),
            ),
        ];
        let count = site["count"].as_u64().unwrap();
        let at_site: Vec<&Value> = report["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| python_frames(s).starts_with(&want))
            .collect();
        let objects: Vec<&&Value> = at_site
            .iter()
            .filter(|s| s["outstanding_allocations"] == count)
            .collect();
        let bytes: u64 = objects
            .iter()
            .map(|s| s["outstanding_bytes"].as_u64().unwrap())
            .sum();
        assert!(
            !objects.is_empty() && bytes == site["bytes"].as_u64().unwrap(),
            "{function}: want {count} objects of {} bytes in all at {want:?}; stacks there: {}",
            site["bytes"],
            serde_json::to_string_pretty(&at_site).unwrap()
        );
        for stack in &objects {
            let frame = stack["frames"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["runtime"] == "python")
                .unwrap();
            assert_eq!(frame["file"], file);
        }
    }
    // The churn is freed at once, its small blocks by pymalloc and its large one by `free`
    // (inside `PyObject_Free`): nothing of it is outstanding. (A list comprehension of another
    // file, such as one the interpreter's start-up imports, may keep its objects.)
    for stack in report["stacks"].as_array().unwrap() {
        let innermost = stack["frames"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["runtime"] == "python");
        assert!(
            innermost
                .is_none_or(|f| f["file"] != file
                    || (f["symbol"] != "churn" && f["symbol"] != "<listcomp>")),
            "churn reported: {stack}"
        );
    }
}

/// Every Python frame of the report is named (function and file).
fn assert_named(report: &Value) {
    for stack in report["stacks"].as_array().unwrap() {
        for frame in stack["frames"].as_array().unwrap() {
            if frame["runtime"] == "python" {
                assert!(
                    frame["symbol"].is_string() && frame["file"].is_string(),
                    "an unnamed Python frame: {stack}"
                );
            }
        }
    }
}

#[test]
fn debian_python3_with_malloc_names_every_leak_at_its_line_exactly() {
    if !require_root() {
        return;
    }
    let (truth, report, _) = trace(DEBIAN_PYTHON, &[("PYTHONMALLOC", "malloc")]);
    assert_eq!(truth["python"], "3.11");
    assert_sites(&truth, &report, &["remember", "record"]);
    assert_released_once(&report);
    assert_named(&report);
    assert_eq!(
        pymalloc_reasons(&report),
        0,
        "{}",
        report["incomplete_reasons"]
    );
}

/// The reasons a report gives for being incomplete that say pymalloc hides objects.
fn pymalloc_reasons(report: &Value) -> usize {
    report["incomplete_reasons"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r.as_str()
                .unwrap()
                .contains("has pymalloc compiled into its callers")
        })
        .count()
}

/// A leak site of small objects served by pymalloc: the stacks that allocate at its line,
/// called from its caller's line, blocks of at most 512 bytes, hold exactly `blocks` per
/// object of its count, and its bytes rounded up by pymalloc's size classes (16 bytes): at
/// least the truth, at most 15 bytes more per block.
fn assert_small_objects(truth: &Value, report: &Value, function: &str, blocks: u64) {
    let site = truth["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["function"] == function)
        .unwrap();
    let want = vec![
        (function.to_owned(), site["line"].as_u64().unwrap()),
        (
            site["caller"].as_str().unwrap().to_owned(),
            site["caller_line"].as_u64().unwrap(),
        ),
    ];
    // Container growth at the same line (the list the objects go in) is one larger block.
    let small: Vec<&Value> = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| python_frames(s).starts_with(&want))
        .filter(|s| {
            let n = s["outstanding_allocations"].as_u64().unwrap();
            n > 0 && s["outstanding_bytes"].as_u64().unwrap() <= 512 * n
        })
        .collect();
    let count: u64 = small
        .iter()
        .map(|s| s["outstanding_allocations"].as_u64().unwrap())
        .sum();
    let bytes: u64 = small
        .iter()
        .map(|s| s["outstanding_bytes"].as_u64().unwrap())
        .sum();
    let (want_count, want_bytes) = (
        blocks * site["count"].as_u64().unwrap(),
        site["bytes"].as_u64().unwrap(),
    );
    assert!(
        count == want_count && want_bytes <= bytes && bytes <= want_bytes + 15 * want_count,
        "{function}: want {want_count} blocks of {want_bytes} bytes (+ up to 15 per block) at {want:?}, got {count} of {bytes}; stacks there: {}",
        serde_json::to_string_pretty(&small).unwrap()
    );
}

#[test]
fn debian_python3_with_pymalloc_names_every_leak_at_its_line_exactly() {
    if !require_root() {
        return;
    }
    // bytes(1000) is above pymalloc's 512 bytes: PyObject_Malloc hands it to malloc.
    let (truth, report, _) = trace(DEBIAN_PYTHON, &[]);
    assert_sites(&truth, &report, &["remember"]);
    assert_released_once(&report);
    // Debian's build inlines pymalloc into its callers, whose copies are probed: the
    // history's bytearrays (an object and its buffer, two blocks) are seen one by one.
    assert_small_objects(&truth, &report, "record", 2);
    assert_named(&report);
    assert_eq!(
        pymalloc_reasons(&report),
        0,
        "{}",
        report["incomplete_reasons"]
    );
}

/// pyenv's builds, where the machine has them (CI's fresh machine may not): each test says so
/// and passes when its interpreter is absent.
fn pyenv(version: &str) -> Option<String> {
    let minor = version.rsplit_once('.').map_or(version, |(m, _)| m);
    let path = format!("/root/.pyenv/versions/{version}/bin/python{minor}");
    if std::path::Path::new(&path).exists() {
        Some(path)
    } else {
        eprintln!("skipped: {path} is not installed");
        None
    }
}

fn pyenv_python_with_malloc(version: &str, minor: &str) {
    if !require_root() {
        return;
    }
    let Some(python) = pyenv(version) else {
        return;
    };
    let (truth, report, stderr) = trace(&python, &[("PYTHONMALLOC", "malloc")]);
    assert_released_once(&report);
    assert_eq!(truth["python"], minor);
    assert_sites(&truth, &report, &["remember", "record"]);
    assert_named(&report);
    // The tables lead to malloc's free: `PyObject_Free` and `PyMem_Free` keep their probes,
    // and leaktrace says why they are single-stepped.
    let library = format!("/root/.pyenv/versions/{version}/lib/libpython{minor}.so.1.0");
    let why = format!(
        "leaktrace: note: PyObject_Free and PyMem_Free of {library} stay probed at their entries, single-stepped, rather than at pymalloc's _PyObject_Free (emulated): their allocator table holds _PyMem_RawFree (PYTHONMALLOC=malloc)"
    );
    assert!(stderr.contains(&why), "{stderr:#?}");
    for symbol in ["PyObject_Free", "PyMem_Free"] {
        let warning = format!(
            "leaktrace: warning: {symbol} in {library} begins with no instruction the kernel can emulate"
        );
        assert!(
            stderr.iter().any(|l| l.starts_with(&warning)),
            "{symbol}: {stderr:#?}"
        );
    }
}

/// No release is reported twice: a second report of a block is a free of a block not seen
/// allocated, and the script's churn would make one per call of its (`OBJECTS`); the few
/// there are free objects made before the trace.
fn assert_released_once(report: &Value) {
    let unmatched = report["totals"]["unmatched_frees"].as_u64().unwrap();
    assert!(
        unmatched < OBJECTS.parse().unwrap(),
        "{unmatched} frees of blocks not seen allocated: {}",
        report["totals"]
    );
}

/// The single-stepped entry points the attach announcement lists.
fn single_stepped(stderr: &[String]) -> Vec<String> {
    let line = stderr
        .iter()
        .find(|l| l.starts_with("leaktrace: tracing pid"))
        .expect("the announcement");
    line.split_once("single-stepped (")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map_or_else(Vec::new, |(list, _)| {
            list.split(", ").map(str::to_owned).collect()
        })
}

/// Built without link-time optimization, pyenv's CPython calls `PyObject_Malloc` and
/// `PyObject_Free` as functions: with pymalloc, its small objects are seen one by one.
fn pyenv_python_with_pymalloc(version: &str) {
    if !require_root() {
        return;
    }
    let Some(python) = pyenv(version) else {
        return;
    };
    let (truth, report, stderr) = trace(&python, &[]);
    assert_sites(&truth, &report, &["remember", "record"]);
    assert_released_once(&report);
    assert_named(&report);
    assert_eq!(
        pymalloc_reasons(&report),
        0,
        "{}",
        report["incomplete_reasons"]
    );
    // Their tables lead to pymalloc's `_PyObject_Free`, probed in their place on a branch
    // the kernel emulates.
    let single = single_stepped(&stderr);
    assert!(
        !single
            .iter()
            .any(|s| s.contains("PyObject") || s.contains("PyMem")),
        "{stderr:#?}"
    );
    assert!(
        !stderr
            .iter()
            .any(|l| l.starts_with("leaktrace: warning:") || l.starts_with("leaktrace: note:")),
        "{stderr:#?}"
    );
}

#[test]
fn pyenv_python_3_11_with_pymalloc_names_small_objects_exactly() {
    pyenv_python_with_pymalloc("3.11.7");
}

#[test]
fn pyenv_python_3_12_with_pymalloc_names_small_objects_exactly() {
    pyenv_python_with_pymalloc("3.12.1");
}

#[test]
fn pyenv_python_3_13_with_pymalloc_names_small_objects_exactly() {
    pyenv_python_with_pymalloc("3.13.0");
}

#[test]
fn pyenv_python_3_11_in_libpython_names_every_leak_exactly() {
    pyenv_python_with_malloc("3.11.7", "3.11");
}

#[test]
fn pyenv_python_3_12_names_every_leak_exactly() {
    pyenv_python_with_malloc("3.12.1", "3.12");
}

#[test]
fn pyenv_python_3_13_names_every_leak_exactly() {
    pyenv_python_with_malloc("3.13.0", "3.13");
}

/// In spawn mode leaktrace attaches before the interpreter sets up its allocator tables
/// (`PYTHONMALLOC`, `-X dev`): pyenv's `PyObject_Free` and `PyMem_Free` keep their probes, and
/// leaktrace says why they are single-stepped.
#[test]
fn pyenv_python_in_spawn_mode_keeps_its_free_probes_and_says_why() {
    if !require_root() {
        return;
    }
    let Some(python) = pyenv("3.12.1") else {
        return;
    };
    let output = run_leaktrace(&["--duration", "2", "--", &python, "-c", "pass"]);
    let stderr: Vec<String> = String::from_utf8_lossy(&output.stderr)
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(output.status.success(), "{stderr:#?}");
    assert_eq!(
        single_stepped(&stderr)
            .iter()
            .filter(|s| s.starts_with("Py"))
            .collect::<Vec<_>>(),
        ["PyObject_Free", "PyMem_Free"],
        "{stderr:#?}"
    );
    let note = "leaktrace: note: PyObject_Free and PyMem_Free of /root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0 stay probed at their entries, single-stepped, rather than at pymalloc's _PyObject_Free (emulated): leaktrace starts the program before CPython sets up its allocator table";
    assert_eq!(
        stderr.iter().filter(|l| l.starts_with(note)).count(),
        1,
        "{stderr:#?}"
    );
}

#[test]
fn python_3_10_is_traced_with_native_frames_and_one_warning() {
    if !require_root() {
        return;
    }
    let Some(python) = pyenv("3.10.13") else {
        return;
    };
    let mut fixture = Fixture::start_command(
        Command::new(python)
            .arg(script())
            .arg(OBJECTS)
            .env("PYTHONMALLOC", "malloc"),
    );
    let trace = Leaktrace::attach(fixture.pid(), &[]);
    fixture.round();
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    let warnings: Vec<&String> = outcome
        .stderr
        .iter()
        .filter(|l| l.contains("CPython 3.10"))
        .collect();
    assert_eq!(warnings.len(), 1, "{:?}", outcome.stderr);
    assert!(warnings[0].starts_with("leaktrace: warning: "));
    let report = outcome.last();
    assert!(
        report["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| python_frames(s).is_empty())
    );
    assert!(report["totals"]["outstanding_bytes"].as_u64().unwrap() > 2_000_000);
}

/// Runs `leaktrace <args> -- python3 <script> <script_args>` to its end, JSON reports every
/// 0.5 s: the script's ground truth (the line of its stdout that has sites) and leaktrace's
/// last report (a duration that leaves a loaded machine time to run the script to its truth).
/// The command shares leaktrace's stdout, so the reports go to a file: a line the
/// script prints could land inside one of them.
fn spawned(args: &[&str], script_args: &[&str]) -> (Value, Value) {
    let script = script();
    let dir = tempfile::tempdir().unwrap();
    let reports = dir.path().join("reports.json");
    let mut all = vec![
        "--output",
        reports.to_str().unwrap(),
        "--format",
        "json",
        "--interval",
        "0.5",
    ];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--", DEBIAN_PYTHON, &script]);
    all.extend_from_slice(script_args);
    let outcome = Leaktrace::start(&all).wait();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    let truth = outcome
        .reports
        .iter()
        .find(|r| r.get("sites").is_some())
        .expect("the script printed its truth")
        .clone();
    let written = std::fs::read_to_string(&reports).unwrap();
    let last: Value = serde_json::from_str(written.lines().last().expect("a report")).unwrap();
    assert_eq!(last["last"], true);
    (truth, last)
}

#[test]
fn spawn_mode_finds_the_interpreter_after_exec_and_names_every_leak() {
    if !require_root() {
        return;
    }
    let (truth, last) = spawned(&["--duration", "10", "--top", "1000"], &[OBJECTS, "hold"]);
    // Startup imports free module code objects whose addresses later code reuses: every
    // frame must still be named as what runs there now.
    assert_sites(&truth, &last, &["remember"]);
}

#[test]
fn spawn_mode_loses_nothing_of_a_start_up_that_allocates_at_once() {
    if !require_root() {
        return;
    }
    // Allocations made between the exec and the moment the unwinding rows of the new
    // executable are in the BPF maps come with 8 KiB stack copies: written one map update at a
    // time (~1 s for python3's rows), they filled the ring buffer while the event loop was
    // busy writing, and events were lost; later, on a loaded machine, while the loop searched
    // python3's file for the interpreter (0.1-0.2 s, more under load) before starting the rows.
    // The script's 507k allocations took 6.6 s traced next to a build (0.24 s untraced); it
    // exits once its truth is out, so the duration only bounds a hang.
    let (truth, last) = spawned(&["--duration", "120"], &["20000", "busy"]);
    let report = &last;
    assert_eq!(report["totals"]["lost_events"], 0, "{}", report["totals"]);
    // Complete: nothing lost, every stack whole, and Debian's python3's inlined pymalloc
    // probed from the exec on.
    assert_eq!(report["complete"], true, "{}", report["incomplete_reasons"]);
    // Its loop ran traced: the registry's bytes (1000 bytes and more: pymalloc hands them to
    // libc's malloc) and the history's bytearrays (pymalloc's blocks) are seen.
    let kept: u64 = truth["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|site| site["count"].as_u64().unwrap())
        .sum();
    assert_eq!(kept, 40_000);
    assert!(
        report["totals"]["outstanding_allocations"]
            .as_u64()
            .unwrap()
            >= kept / 2,
        "{}",
        report["totals"]
    );
}

/// pymalloc maps arenas of 1 MiB (3.10+, where it tracks them in a radix tree).
const ARENA_BYTES: u64 = 1 << 20;

/// Runs `tests/fixtures/python_arenas.py` (50,000 small objects kept at one line) under
/// `python` with `env`, traced from before its allocations with every stack listed, the
/// arenas' too; returns its ground truth and leaktrace's final report.
fn trace_small_objects(python: &str, env: &[(&str, &str)]) -> (Value, Value) {
    let script = format!(
        "{}/../tests/fixtures/python_arenas.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut fixture = Fixture::start_command(
        Command::new(python)
            .arg(script)
            .arg("50000")
            .envs(env.iter().copied()),
    );
    let trace = Leaktrace::attach(fixture.pid(), &["--top", "100000", "--pymalloc-arenas"]);
    let lines = fixture.round();
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    let truth: Value = serde_json::from_str(&lines[0]).unwrap();
    let report = outcome.last().clone();
    assert_eq!(report["totals"]["lost_events"], 0, "{}", report["totals"]);
    // pymalloc gave no arena back meanwhile: the arenas it made are all still mapped.
    assert_eq!(truth["arenas_reclaimed"], 0, "{truth}");
    assert_eq!(
        report["stack_count"].as_u64().unwrap(),
        report["stacks"].as_array().unwrap().len() as u64,
        "every stack listed"
    );
    (truth, report)
}

/// The three large objects (malloc'd, each in its own mmap of glibc's, nested in the
/// `PyObject_Malloc` call) are blocks at their line, exact, and neither arenas nor mappings.
fn assert_large_objects(truth: &Value, report: &Value) {
    let large = &truth["large"];
    let want = (
        large["count"].as_u64().unwrap(),
        large["bytes"].as_u64().unwrap(),
    );
    assert_eq!(at_kept_line(large, report, "malloc"), want);
    assert_eq!(at_kept_line(large, report, "pymalloc_arena"), (0, 0));
    assert_eq!(at_kept_line(large, report, "mmap"), (0, 0));
}

/// Allocations and bytes of the stacks of `origin` whose innermost Python frame is the
/// truth's line.
fn at_kept_line(truth: &Value, report: &Value, origin: &str) -> (u64, u64) {
    let line = (
        truth["function"].as_str().unwrap().to_owned(),
        truth["line"].as_u64().unwrap(),
    );
    report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["origin"] == origin && python_frames(s).first() == Some(&line))
        .fold((0, 0), |(n, b), s| {
            (
                n + s["outstanding_allocations"].as_u64().unwrap(),
                b + s["outstanding_bytes"].as_u64().unwrap(),
            )
        })
}

/// What the listed stacks of these origins hold.
fn held_by(report: &Value, origins: &[&str]) -> u64 {
    report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| origins.iter().any(|&o| s["origin"] == o))
        .map(|s| s["outstanding_bytes"].as_u64().unwrap())
        .sum()
}

/// Built without link-time optimization, pyenv's CPython calls `PyObject_Malloc`: each small
/// object is counted, and the arenas they are carved from are listed apart, outside the totals.
fn pyenv_python_shows_arenas_apart(version: &str) {
    if !require_root() {
        return;
    }
    let Some(python) = pyenv(version) else {
        return;
    };
    let (truth, report) = trace_small_objects(&python, &[]);
    assert_eq!(
        at_kept_line(&truth, &report, "malloc"),
        (
            truth["count"].as_u64().unwrap(),
            truth["bytes"].as_u64().unwrap()
        ),
        "the objects, one by one"
    );
    assert_arenas_apart(&truth, &report);
}

/// The arenas made for the kept objects are listed apart at their line, exact; arenas made
/// elsewhere since attach (the interpreter's own objects) are listed apart too, none of them
/// in the totals; the large objects are blocks.
fn assert_arenas_apart(truth: &Value, report: &Value) {
    let totals = &report["totals"];
    let made = truth["arenas_made"].as_u64().unwrap();
    assert!(made >= 7, "8 MB of small objects need arenas: {truth}");
    assert_eq!(
        at_kept_line(truth, report, "pymalloc_arena"),
        (made, made * ARENA_BYTES),
        "the arenas made for them: {totals}"
    );
    assert_eq!(at_kept_line(truth, report, "mmap"), (0, 0));
    let arenas = totals["pymalloc_arenas"].as_u64().unwrap();
    assert!(arenas >= made, "{totals}");
    assert_eq!(totals["pymalloc_arena_bytes"], arenas * ARENA_BYTES);
    assert_eq!(held_by(report, &["pymalloc_arena"]), arenas * ARENA_BYTES);
    assert_eq!(
        totals["outstanding_bytes"].as_u64().unwrap(),
        held_by(report, &["malloc", "mmap"]),
        "{totals}"
    );
    assert!(
        totals["mapped_bytes"].as_u64().unwrap() < ARENA_BYTES,
        "{totals}"
    );
    assert_large_objects(truth, report);
}

#[test]
fn pyenv_python_3_11_shows_pymalloc_arenas_apart_and_objects_exactly() {
    pyenv_python_shows_arenas_apart("3.11.7");
}

#[test]
fn pyenv_python_3_12_shows_pymalloc_arenas_apart_and_objects_exactly() {
    pyenv_python_shows_arenas_apart("3.12.1");
}

#[test]
fn pyenv_python_3_13_shows_pymalloc_arenas_apart_and_objects_exactly() {
    pyenv_python_shows_arenas_apart("3.13.0");
}

#[test]
fn debian_python3_with_inlined_pymalloc_shows_arenas_apart_and_objects_exactly() {
    if !require_root() {
        return;
    }
    // Debian's build compiles pymalloc into its callers: the objects are seen through the
    // probes on those copies, each a block of its size class (rounded up to 16 bytes), and
    // the arenas, mapped inside `allocate_from_new_pool`, apart.
    let (truth, report) = trace_small_objects(DEBIAN_PYTHON, &[]);
    let (count, bytes) = (
        truth["count"].as_u64().unwrap(),
        truth["bytes"].as_u64().unwrap(),
    );
    let (seen, seen_bytes) = at_kept_line(&truth, &report, "malloc");
    assert!(
        seen == count && bytes <= seen_bytes && seen_bytes <= bytes + 15 * count,
        "want {count} objects of {bytes} bytes (+ up to 15 per block), got {seen} of {seen_bytes}"
    );
    assert_arenas_apart(&truth, &report);
    assert_eq!(pymalloc_reasons(&report), 0);
}

#[test]
fn debian_python3_with_malloc_has_no_arenas_and_every_small_object() {
    if !require_root() {
        return;
    }
    let (truth, report) = trace_small_objects(DEBIAN_PYTHON, &[("PYTHONMALLOC", "malloc")]);
    assert_eq!(truth["arenas_made"], 0);
    assert_eq!(
        at_kept_line(&truth, &report, "malloc"),
        (
            truth["count"].as_u64().unwrap(),
            truth["bytes"].as_u64().unwrap()
        )
    );
    assert_eq!(report["totals"]["pymalloc_arenas"], 0);
    assert_eq!(at_kept_line(&truth, &report, "mmap"), (0, 0));
    assert_large_objects(&truth, &report);
}
