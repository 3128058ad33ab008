//! Complete stacks through code built without frame pointers: fixtures at -O2
//! -fomit-frame-pointer leak through Debian's libc (strdup, getline) and libstdc++
//! (std::string, std::vector, operator new), neither of which keeps frame pointers either.

use serde_json::Value;

use crate::{
    line_of,
    support::{Binary, Fixture, Leaktrace, compile, last_of, require_root},
};

const NO_FRAME_POINTERS: [&str; 2] = ["-O2", "-fomit-frame-pointer"];
const LEAKS: u64 = 200;
const ROUNDS: u64 = 2;

/// A function that leaks and the function that calls it, as the fixture's source marks them:
/// the leaking calls carry a `leak:` comment inside `function`, the call of `function`
/// carries `caller_marker`.
struct Site {
    function: &'static str,
    caller: &'static str,
    caller_marker: &'static str,
    /// Outstanding allocations that `function` leaks in one round.
    per_round: u64,
}

/// The lines of `file` that carry a `leak:` comment.
fn leak_lines(file: &str) -> Vec<u64> {
    let source = std::fs::read_to_string(format!(
        "{}/../tests/fixtures/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    (1..)
        .zip(source.lines())
        .filter(|(_, line)| line.contains("/* leak:") || line.contains("// leak:"))
        .map(|(n, _)| n)
        .collect()
}

fn frame_is(frame: &Value, file: &str, symbol: &str, lines: &[u64]) -> bool {
    frame["symbol"] == symbol
        && frame["file"].as_str().is_some_and(|f| f.ends_with(file))
        && frame["line"].as_u64().is_some_and(|l| lines.contains(&l))
}

/// (outstanding allocations whose stack shows `site.function` at a leaking line, those of them
/// whose stack also shows `site.caller` at the line that calls it, below the function).
fn site_counts(report: &Value, file: &str, site: &Site) -> (u64, u64) {
    let leaking = leak_lines(file);
    let calling = [line_of(file, site.caller_marker)];
    let (mut with_function, mut with_both) = (0, 0);
    for stack in report["stacks"].as_array().unwrap() {
        let frames = stack["frames"].as_array().unwrap();
        let Some(at) = frames
            .iter()
            .position(|f| frame_is(f, file, site.function, &leaking))
        else {
            continue;
        };
        let count = stack["outstanding_allocations"].as_u64().unwrap();
        with_function += count;
        if frames[at + 1..]
            .iter()
            .any(|f| frame_is(f, file, site.caller, &calling))
        {
            with_both += count;
        }
    }
    (with_function, with_both)
}

/// Runs `binary` for ROUNDS rounds under `leaktrace --unwind MODE` and returns the final report.
fn trace(binary: &Binary, args: &[&str], mode: &str) -> Value {
    let mut fixture = Fixture::start(binary, args);
    let trace = Leaktrace::attach(fixture.pid(), &["--unwind", mode, "--top", "1000"]);
    for _ in 0..ROUNDS {
        fixture.round();
    }
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    fixture.finish();
    outcome.last().clone()
}

/// Every site's allocations are all reported, and at least 99% of them (by count) show the
/// leaking function and its caller, with file:line.
fn assert_complete(report: &Value, file: &str, sites: &[Site]) {
    assert_eq!(report["totals"]["lost_events"], 0);
    assert_eq!(
        report["totals"]["outstanding_allocations"],
        sites.iter().map(|s| s.per_round).sum::<u64>() * ROUNDS,
        "nothing but the leaks is outstanding"
    );
    for site in sites {
        let (with_function, with_both) = site_counts(report, file, site);
        let expected = site.per_round * ROUNDS;
        assert_eq!(
            with_function, expected,
            "{} at a leaking line of {file}: {report}",
            site.function
        );
        assert!(
            with_both * 100 >= expected * 99,
            "{} of {expected} stacks of {} show {} too: {report}",
            with_both,
            site.function,
            site.caller
        );
    }
}

fn libc_sites() -> [Site; 2] {
    [
        Site {
            function: "remember_name",
            caller: "handle_request",
            caller_marker: "caller of the strdup leak",
            per_round: LEAKS,
        },
        Site {
            function: "read_record",
            caller: "load_records",
            caller_marker: "caller of the getline leak",
            per_round: LEAKS,
        },
    ]
}

#[test]
fn leaks_through_strdup_and_getline_show_the_leaking_function_and_its_caller() {
    if !require_root() {
        return;
    }
    let binary = compile("nofp_libc", &NO_FRAME_POINTERS);
    let leaks = LEAKS.to_string();
    for mode in ["auto", "dwarf"] {
        let report = trace(&binary, &[&leaks], mode);
        assert_complete(&report, "nofp_libc.c", &libc_sites());
    }
    // The test can fail: frame pointers alone lose the code that called strdup.
    let report = trace(&binary, &[&leaks], "fp");
    let (with_function, _) = site_counts(&report, "nofp_libc.c", &libc_sites()[0]);
    assert_eq!(with_function, 0, "{report}");
}

#[test]
fn leaks_through_std_string_vector_and_operator_new_show_the_leaking_function_and_its_caller() {
    if !require_root() {
        return;
    }
    let binary = compile("nofp_cpp", &NO_FRAME_POINTERS);
    let leaks = LEAKS.to_string();
    let report = trace(&binary, &[&leaks], "auto");
    assert_complete(&report, "nofp_cpp.cpp", &cpp_sites());
}

fn cpp_sites() -> [Site; 3] {
    [
        Site {
            function: "name_user(long)",
            caller: "register_user(long)",
            caller_marker: "caller of the std::string leak",
            per_round: LEAKS,
        },
        // The vector object and its last buffer.
        Site {
            function: "grow_history(long)",
            caller: "record_history(long)",
            caller_marker: "caller of the std::vector leaks",
            per_round: 2 * LEAKS,
        },
        Site {
            function: "make_node(long)",
            caller: "build_list(long)",
            caller_marker: "caller of the operator new leak",
            per_round: LEAKS,
        },
    ]
}

/// (stack copies, allocations) of `pid` by leaktrace's closing line about it.
fn copies_of(stderr: &[String], pid: u32) -> (u64, u64) {
    let prefix = format!("leaktrace: pid {pid}: ");
    let line = stderr
        .iter()
        .find_map(|l| l.strip_prefix(&prefix))
        .filter(|l| l.contains("allocations came with a stack copy"))
        .unwrap_or_else(|| panic!("no stack copy line for pid {pid}: {stderr:?}"));
    let mut words = line.split(' ');
    let copies = words.next().unwrap().parse().unwrap();
    assert_eq!(words.next(), Some("of"), "{line}");
    (copies, words.next().unwrap().parse().unwrap())
}

/// Two different executables without frame pointers (built with `flags` added), traced with
/// two `-p`: each is unwound in BPF from its own modules' rows, none of its stacks copied, and
/// its leak sites are complete.
fn two_executables_unwind_in_bpf(flags: &[&str]) {
    let flags: Vec<&str> = NO_FRAME_POINTERS.iter().chain(flags).copied().collect();
    let (c, cpp) = (compile("nofp_libc", &flags), compile("nofp_cpp", &flags));
    let leaks = LEAKS.to_string();
    let mut first = Fixture::start(&c, &[&leaks]);
    let mut second = Fixture::start(&cpp, &[&leaks]);
    let other = second.pid().to_string();
    let trace = Leaktrace::attach(
        first.pid(),
        &["--pid", &other, "--unwind", "auto", "--top", "1000"],
    );
    for _ in 0..ROUNDS {
        first.round();
        second.round();
    }
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    let (a, b) = (first.pid(), second.pid());
    first.finish();
    second.finish();
    let (c_report, cpp_report) = (last_of(&outcome.reports, a), last_of(&outcome.reports, b));
    assert_complete(c_report, "nofp_libc.c", &libc_sites());
    assert_complete(cpp_report, "nofp_cpp.cpp", &cpp_sites());
    for (pid, report) in [(a, c_report), (b, cpp_report)] {
        let (copies, allocations) = copies_of(&outcome.stderr, pid);
        assert_eq!(copies, 0, "pid {pid}: {:?}", outcome.stderr);
        assert_eq!(
            report["totals"]["allocations"], allocations,
            "pid {pid}: every allocation unwound, {report}"
        );
    }
    // nofp_libc: per round, LEAKS from strdup, LEAKS from getline, fmemopen's 3.
    assert_eq!(copies_of(&outcome.stderr, a).1, ROUNDS * (2 * LEAKS + 3));
}

#[test]
fn two_executables_without_frame_pointers_traced_at_once_are_both_unwound_in_bpf() {
    if !require_root() {
        return;
    }
    two_executables_unwind_in_bpf(&[]);
}

#[test]
fn two_non_pie_executables_at_the_same_address_are_both_unwound_by_their_own_rows() {
    if !require_root() {
        return;
    }
    // Both at 0x400000: rows by address alone would unwind one with the other's.
    two_executables_unwind_in_bpf(&["-no-pie", "-fno-pie"]);
}

#[test]
fn a_library_loaded_after_attach_is_unwound_too() {
    if !require_root() {
        return;
    }
    let plugin = compile(
        "plugin",
        &["-O2", "-fomit-frame-pointer", "-shared", "-fPIC"],
    );
    let host = compile("dlopen_host", &NO_FRAME_POINTERS);
    let leaks = LEAKS.to_string();
    let mut fixture = Fixture::start(&host, &[plugin.path.to_str().unwrap(), &leaks]);
    let mut trace = Leaktrace::attach(
        fixture.pid(),
        &["--unwind", "auto", "--top", "1000", "--print-row-writes"],
    );
    // The first round loads the plugin: its stacks are copied until leaktrace has seen the new
    // mapping and written its rows; from then on they are unwound in BPF.
    fixture.round();
    trace.wait_for_stderr("leaktrace: wrote ");
    for _ in 1..ROUNDS {
        fixture.round();
    }
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    let pid = fixture.pid();
    fixture.finish();
    let report = outcome.last();
    // dlopen's own allocations are outstanding too; the plugin's are exactly its leaks.
    let site = Site {
        function: "plugin_leak",
        caller: "plugin_run",
        caller_marker: "caller of the plugin leak",
        per_round: LEAKS,
    };
    let (with_function, with_both) = site_counts(report, "plugin.c", &site);
    assert_eq!(with_function, LEAKS * ROUNDS, "{report}");
    assert!(with_both * 100 >= LEAKS * ROUNDS * 99, "{report}");
    assert_eq!(report["totals"]["lost_events"], 0);
    // The rounds after the first allocate LEAKS blocks each, all in the plugin, none copied.
    let (copies, allocations) = copies_of(&outcome.stderr, pid);
    assert_eq!(report["totals"]["allocations"], allocations);
    assert!(
        copies <= allocations - LEAKS * (ROUNDS - 1),
        "{copies} of {allocations}: {:?}",
        outcome.stderr
    );
}

#[test]
fn stack_copies_that_do_not_fit_the_ring_buffer_are_counted_as_lost() {
    if !require_root() {
        return;
    }
    let binary = compile("nofp_libc", &NO_FRAME_POINTERS);
    let leaks: u64 = 2000;
    let mut fixture = Fixture::start(&binary, &[&leaks.to_string()]);
    // Room for one record with an 8 KiB stack copy at a time.
    let trace = Leaktrace::attach(
        fixture.pid(),
        &["--unwind", "dwarf", "--ringbuf-bytes", "16384"],
    );
    fixture.round();
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    fixture.finish();
    let report = outcome.last();
    let totals = &report["totals"];
    let seen = |field: &str| totals[field].as_u64().unwrap();
    // A round: `leaks` strdup and `leaks` getline allocations, and fmemopen's FILE and
    // buffers (3 allocations, 3 frees). Each is either seen or counted as lost.
    assert_eq!(
        seen("allocations") + seen("frees") + seen("lost_events"),
        2 * leaks + 6,
        "{totals}"
    );
    assert!(seen("lost_events") > 0, "{totals}");
    assert_eq!(report["complete"], false);
}

#[test]
fn auto_unwinds_with_and_without_frame_pointers_in_bpf_and_dwarf_copies_every_stack() {
    if !require_root() {
        return;
    }
    // The stderr line that counts stack copies, for `binary` run one round under `--unwind
    // mode`.
    let copies_line = |binary: &Binary, args: &[&str], mode: &str| {
        let mut fixture = Fixture::start(binary, args);
        let outcome = Leaktrace::one_round(&mut fixture, &["--unwind", mode]);
        fixture.finish();
        outcome
            .stderr
            .iter()
            .find(|l| l.contains("came with a stack copy"))
            .unwrap_or_else(|| panic!("{:?}", outcome.stderr))
            .clone()
    };
    // Built with frame pointers (the default of `compile`), calling malloc directly: the walk
    // follows them, and glibc's start frames (no frame pointers) by its .eh_frame rows.
    let with_fp = compile("leaky", &[]);
    let line = copies_line(&with_fp, &["100", "4096", "1000"], "auto");
    assert!(
        line.starts_with("leaktrace: pid ")
            && line.contains(": 0 of 1100 allocations came with a stack copy"),
        "{line}"
    );
    // Without: every frame is unwound from the rows, none copied (and the tests above show
    // the stacks complete).
    let without_fp = compile("nofp_libc", &NO_FRAME_POINTERS);
    let line = copies_line(&without_fp, &["100"], "auto");
    assert!(
        line.starts_with("leaktrace: pid ")
            && line.contains(": 0 of 203 allocations came with a stack copy"),
        "{line}"
    );
    // `--unwind dwarf` copies every stack.
    let line = copies_line(&without_fp, &["100"], "dwarf");
    assert!(
        line.starts_with("leaktrace: pid ")
            && line.contains(": 203 of 203 allocations came with a stack copy"),
        "{line}"
    );
}
