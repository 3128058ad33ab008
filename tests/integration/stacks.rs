//! Stacks an engineer can act on: the depth limit and truncation, demangled Rust and C++ names,
//! modules without symbols as `module+offset`, a process in its own mount namespace, a binary
//! deleted or replaced while it runs, and a leak three calls deep as a new user meets it.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    ops::Range,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::Value;

use super::line_of;
use crate::support::{
    Binary, Fixture, LEAKTRACE, Leaktrace, compile, now_ms, require_root, stack_of,
};

fn fixture_source(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(file)
        .canonicalize()
        .unwrap()
}

/// Builds `tests/fixtures/<source>` into `<name>` in a fresh temporary directory with
/// `program` (gcc, g++, rustc) and its flags.
fn build(program: &str, flags: &[&str], source: &str, name: &str) -> Binary {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    // Flags after the source: `-l` options must follow the objects that need them.
    let out = Command::new(program)
        .arg("-o")
        .arg(&path)
        .arg(fixture_source(source))
        .args(flags)
        .output()
        .unwrap_or_else(|err| panic!("{program} runs: {err}"));
    assert!(
        out.status.success(),
        "{program} {source}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Binary::new(dir, path)
}

/// The one stack in the report that holds exactly `bytes`.
fn stack_holding(report: &Value, bytes: u64) -> &Value {
    let found: Vec<&Value> = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["outstanding_bytes"] == bytes)
        .collect();
    assert_eq!(found.len(), 1, "one stack of {bytes} bytes in {report}");
    found[0]
}

/// The one stack in the report with a frame (not an inlined one) in `function`, and the index
/// of that frame among the stack's frames that are not inlined.
fn stack_through<'a>(report: &'a Value, function: &str) -> (&'a Value, usize) {
    let found: Vec<(&Value, usize)> = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|stack| {
            outer_frames(stack)
                .iter()
                .position(|f| f["symbol"] == function)
                .map(|i| (stack, i))
        })
        .collect();
    assert_eq!(found.len(), 1, "one stack through {function} in {report}");
    found[0]
}

/// The frames of a stack that are return addresses, leaving out the inlined ones.
fn outer_frames(stack: &Value) -> Vec<&Value> {
    stack["frames"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["inlined"] == false)
        .collect()
}

fn symbols(stack: &Value) -> Vec<&str> {
    stack["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["symbol"].as_str().unwrap_or("?"))
        .collect()
}

fn module_offset(frame: &Value) -> u64 {
    let hex = frame["module_offset"].as_str().unwrap();
    u64::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap()
}

/// Where `symbol`'s code lies in `elf`, as file offsets: `nm -S` gives its address and size,
/// the program headers where that address is in the file.
fn file_range_of(elf: &Path, symbol: &str) -> Range<u64> {
    use object::{Object as _, ObjectSegment as _};

    let out = Command::new("nm")
        .args(["-S", "--defined-only"])
        .arg(elf)
        .output()
        .expect("nm runs");
    assert!(out.status.success());
    let listing = String::from_utf8(out.stdout).unwrap();
    let (addr, size) = listing
        .lines()
        .find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() == 4 && f[3] == symbol).then(|| {
                (
                    u64::from_str_radix(f[0], 16).unwrap(),
                    u64::from_str_radix(f[1], 16).unwrap(),
                )
            })
        })
        .unwrap_or_else(|| panic!("nm lists {symbol} in {}", elf.display()));
    let data = std::fs::read(elf).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let segment = file
        .segments()
        .find(|s| s.address() <= addr && addr < s.address() + s.size())
        .expect("the symbol is in a segment");
    let start = addr - segment.address() + segment.file_range().0;
    start..start + size
}

/// Asserts that a frame of a module without symbols is `module+offset` with an offset inside
/// `function` of the unstripped copy (return addresses point after the call: one byte back is
/// the call itself).
fn assert_unnamed_frame_in(frame: &Value, module: &Path, unstripped: &Path, function: &str) {
    assert_eq!(frame["symbol"], Value::Null, "{frame}");
    assert_eq!(frame["file"], Value::Null, "{frame}");
    assert_eq!(frame["module"], module.to_str().unwrap(), "{frame}");
    let range = file_range_of(unstripped, function);
    let offset = module_offset(frame);
    assert!(
        range.contains(&(offset - 1)),
        "{function} is at {range:#x?} in {}, the frame at {offset:#x}",
        unstripped.display()
    );
}

#[test]
fn max_depth_keeps_exactly_n_frames_and_marks_only_deeper_stacks_truncated() {
    if !require_root() {
        return;
    }
    let binary = compile("deep", &[]);
    // Stacks of 6, 8, 9 and 46 return addresses (L + 6 for L levels), 1000 + L bytes each.
    let mut fixture = Fixture::start(&binary, &["0", "2", "3", "40"]);
    let outcome = Leaktrace::one_round(&mut fixture, &["--max-depth", "8"]);
    let report = outcome.last();

    let descend = |n: usize| std::iter::repeat_n("descend", n);
    let shape = |bytes: u64| {
        let stack = stack_holding(report, bytes);
        (symbols(stack), stack["truncated"].as_bool().unwrap())
    };
    // The C runtime's frames, which keep no frame pointers, unwound from glibc's .eh_frame.
    let start = [
        "main",
        "__libc_start_call_main",
        "__libc_start_main_impl",
        "_start",
    ];
    assert_eq!(
        shape(1000),
        (
            ["bottom"]
                .into_iter()
                .chain(descend(1))
                .chain(start)
                .collect(),
            false
        )
    );
    // Exactly 8 frames: all of them, not truncated.
    assert_eq!(
        shape(1002),
        (
            ["bottom"]
                .into_iter()
                .chain(descend(3))
                .chain(start)
                .collect(),
            false
        )
    );
    // One frame more than the limit: cut to 8, truncated.
    assert_eq!(
        shape(1003),
        (
            ["bottom"]
                .into_iter()
                .chain(descend(4))
                .chain(start[..3].iter().copied())
                .collect(),
            true
        )
    );
    assert_eq!(
        shape(1040),
        (["bottom"].into_iter().chain(descend(7)).collect(), true)
    );
    fixture.finish();
}

#[test]
fn max_depth_holds_for_stacks_unwound_from_a_copy() {
    if !require_root() {
        return;
    }
    // No frame pointers: under --unwind dwarf every stack is unwound from a copy, with CFI,
    // through main and libc's start-up code.
    let binary = compile("deep", &["-O2", "-fomit-frame-pointer"]);
    // Stacks of L + 6 return addresses for L levels, 1000 + L bytes each.
    let mut fixture = Fixture::start(&binary, &["0", "40"]);
    let outcome = Leaktrace::one_round(&mut fixture, &["--unwind", "dwarf", "--max-depth", "2"]);
    // Cut to their two innermost frames, the two stacks are one.
    let stack = stack_holding(outcome.last(), 1000 + 1040);
    assert_eq!(
        (symbols(stack), stack["truncated"].as_bool().unwrap()),
        (vec!["bottom", "descend"], true),
        "{stack}"
    );
    let outcome = Leaktrace::one_round(&mut fixture, &["--unwind", "dwarf", "--max-depth", "8"]);
    let report = outcome.last();
    let whole = stack_holding(report, 1000);
    assert_eq!(whole["truncated"], false, "{whole}");
    assert_eq!(
        symbols(whole)[..3],
        ["bottom", "descend", "main"],
        "{whole}"
    );
    let cut = stack_holding(report, 1040);
    assert_eq!(
        (symbols(cut), cut["truncated"].as_bool().unwrap()),
        (
            ["bottom"]
                .into_iter()
                .chain(std::iter::repeat_n("descend", 7))
                .collect(),
            true
        ),
        "{cut}"
    );
    fixture.finish();
}

#[test]
fn code_loaded_where_other_code_was_unloaded_gets_its_own_names() {
    if !require_root() {
        return;
    }
    // The same code twice under other names: loaded at the same address, the two libraries
    // hold different functions at the same return addresses.
    let library = |name: &str, leak: &str| {
        build(
            "gcc",
            &["-O1", "-g", "-shared", "-fPIC", &format!("-DLEAK={leak}")],
            "reloaded_lib.c",
            name,
        )
    };
    let (alpha, bravo) = (
        library("libalpha.so", "leak_alpha"),
        library("libbravo.so", "leak_bravo"),
    );
    let host = compile("reload_host", &[]);
    let paths = [&alpha, &bravo].map(|b| b.path.to_str().unwrap());
    let mut fixture = Fixture::start(&host, &paths);
    let mut trace = Leaktrace::attach(fixture.pid(), &["--top", "1000"]);
    // A report after each step: leaktrace has read the events and the memory map of the
    // step before (a stack is located when its events are read, in the map as it is then).
    let first = fixture.round();
    trace.wait_for_report(now_ms());
    let second = fixture.round();
    assert_eq!(
        first, second,
        "the second library is loaded where the first was"
    );
    trace.wait_for_report(now_ms());
    fixture.round();
    let outcome = trace.stop();
    let report = outcome.last();
    let allocations = |function: &str| {
        stack_of(report, function).map(|s| s["outstanding_allocations"].as_u64().unwrap())
    };
    assert_eq!(
        (allocations("leak_alpha"), allocations("leak_bravo")),
        (Some(100), Some(50)),
        "{report}"
    );
    fixture.finish();
}

#[test]
fn the_default_depth_keeps_the_127_frames_the_kernel_gives() {
    if !require_root() {
        return;
    }
    let binary = compile("deep", &[]);
    let mut fixture = Fixture::start(&binary, &["100", "200"]);
    let outcome = Leaktrace::one_round(&mut fixture, &[]);
    let report = outcome.last();

    let whole = stack_holding(report, 1100);
    let names = symbols(whole);
    assert_eq!(names.len(), 106);
    assert_eq!(names[..2], ["bottom", "descend"]);
    assert_eq!(
        names[102..],
        [
            "main",
            "__libc_start_call_main",
            "__libc_start_main_impl",
            "_start"
        ]
    );
    assert_eq!(whole["truncated"], false);

    let cut = stack_holding(report, 1200);
    let names = symbols(cut);
    assert_eq!(names.len(), 127);
    assert!(names[1..].iter().all(|&n| n == "descend"), "{names:?}");
    assert_eq!(cut["truncated"], true);
    fixture.finish();
}

#[test]
fn rust_leaks_are_named_with_demangled_rust_names() {
    if !require_root() {
        return;
    }
    // rustc's default (legacy) symbol mangling, then v0: the names differ, both demangled.
    rust_leaks_are_named(
        &[],
        [
            "leaky_rs::Cache<T>::insert",
            "leaky_rs::remember",
            "<leaky_rs::Journal as leaky_rs::Sink>::append",
        ],
    );
    rust_leaks_are_named(
        &["-C", "symbol-mangling-version=v0"],
        [
            "<leaky_rs::Cache<leaky_rs::Record>>::insert",
            "leaky_rs::remember::<&str>",
            "<leaky_rs::Journal as leaky_rs::Sink>::append",
        ],
    );
}

/// Traces a round of `tests/fixtures/leaky_rs.rs` built with `mangling` flags, and checks
/// that its three leak sites show as `names`, with exact counts, bytes and lines.
fn rust_leaks_are_named(mangling: &[&str], names: [&str; 3]) {
    let mut flags = vec![
        "--edition=2021",
        "-C",
        "opt-level=1",
        "-C",
        "force-frame-pointers=yes",
        "-g",
    ];
    flags.extend_from_slice(mangling);
    let binary = build("rustc", &flags, "leaky_rs.rs", "leaky_rs");
    let mut fixture = Fixture::start(&binary, &[]);
    let outcome = Leaktrace::one_round(&mut fixture, &["--top", "100"]);
    let report = outcome.last();

    // (function, source line of its allocation, allocations, bytes each) for one round.
    for (function, line, count, size) in [
        (names[0], "self.entries.push(Box::new(value));", 50, 96),
        (names[1], "log.push(line.as_ref().to_owned());", 30, 40),
        (
            names[2],
            "let mut chunk = Vec::with_capacity(len);",
            20,
            256,
        ),
    ] {
        let (stack, at) = stack_through(report, function);
        assert_eq!(stack["outstanding_allocations"], count, "{function}");
        assert_eq!(stack["outstanding_bytes"], count * size, "{function}");
        let frames = outer_frames(stack);
        assert!(
            frames[at]["file"]
                .as_str()
                .unwrap()
                .ends_with("leaky_rs.rs"),
            "{}",
            frames[at]
        );
        assert_eq!(
            frames[at]["line"],
            line_of("leaky_rs.rs", line),
            "{function}"
        );
        assert_eq!(frames[at + 1]["symbol"], "leaky_rs::main", "{function}");
    }
    // Demangled everywhere: no mangled names, no hash suffixes (`::h0123456789abcdef`).
    for symbol in crate::support::all_symbols(report) {
        let hashed = symbol.split("::").any(|part| {
            part.len() == 17
                && part.starts_with('h')
                && part[1..].chars().all(|c| c.is_ascii_hexdigit())
        });
        assert!(
            !hashed && !symbol.starts_with("_ZN") && !symbol.starts_with("_R"),
            "{symbol}"
        );
    }
    fixture.finish();
}

#[test]
fn cpp_leaks_are_named_with_demangled_cpp_names() {
    if !require_root() {
        return;
    }
    let binary = build(
        "g++",
        &["-O1", "-g", "-fno-omit-frame-pointer"],
        "leaky_cpp.cpp",
        "leaky_cpp",
    );
    let mut fixture = Fixture::start(&binary, &[]);
    let outcome = Leaktrace::one_round(&mut fixture, &[]);
    let report = outcome.last();

    // malloc called by a method of a class template.
    let grab = stack_holding(report, 40 * 64);
    assert_eq!(grab["outstanding_allocations"], 40);
    let frames = outer_frames(grab);
    assert_eq!(
        frames[0]["symbol"],
        "store::Pool<store::Item>::grab(unsigned long)"
    );
    assert!(
        frames[0]["file"]
            .as_str()
            .unwrap()
            .ends_with("leaky_cpp.cpp")
    );
    assert_eq!(
        frames[0]["line"],
        line_of("leaky_cpp.cpp", "void *p = std::malloc(bytes);")
    );
    assert_eq!(frames[1]["symbol"], "main");

    // `new Node` through Node's own operator new, built with frame pointers: every frame.
    let node = stack_holding(report, 15 * 32);
    assert_eq!(
        symbols(node)[..3],
        [
            "store::Node::operator new(unsigned long)",
            "store::Pool<store::Node>::make()",
            "main"
        ]
    );

    // `new Item` through libstdc++'s operator new, named from its dynamic symbols. (Debian
    // builds it without frame pointers, so the walk skips Pool<Item>::make: DWARF unwinding
    // is another issue.)
    let item = stack_holding(report, 25 * 48);
    let frame = &item["frames"][0];
    assert_eq!(frame["symbol"], "operator new(unsigned long)");
    assert!(
        frame["module"].as_str().unwrap().contains("libstdc++.so"),
        "{frame}"
    );
    fixture.finish();
}

#[test]
fn stripped_modules_show_as_module_plus_offset_inside_the_right_function() {
    if !require_root() {
        return;
    }
    // An executable without any symbols.
    let binary = compile("leaky", &[]);
    let stripped = binary.path.with_file_name("leaky-stripped");
    let out = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&binary.path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut fixture = Fixture::start_command(Command::new(&stripped).args(["5", "100", "5"]));
    let outcome = Leaktrace::one_round(&mut fixture, &[]);
    let leak = stack_holding(outcome.last(), 500);
    assert_unnamed_frame_in(&leak["frames"][0], &stripped, &binary.path, "leak_site");
    assert_unnamed_frame_in(&leak["frames"][1], &stripped, &binary.path, "main");
    fixture.finish();

    // A shared library stripped of .symtab: its exported function keeps a name from .dynsym,
    // its static one is `module+offset`.
    let lib = build(
        "gcc",
        &["-O1", "-g", "-fno-omit-frame-pointer", "-shared", "-fPIC"],
        "libleak.c",
        "libleak.so",
    );
    let lib_dir = tempfile::tempdir().unwrap();
    let stripped_lib = lib_dir.path().join("libleak.so");
    let out = Command::new("strip")
        .arg("-o")
        .arg(&stripped_lib)
        .arg(&lib.path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    {
        use object::Object as _;
        let data = std::fs::read(&stripped_lib).unwrap();
        let elf = object::File::parse(&*data).unwrap();
        assert!(elf.section_by_name(".symtab").is_none());
        assert!(elf.section_by_name(".dynsym").is_some());
    }
    let dir = lib_dir.path().to_str().unwrap();
    let program = build(
        "gcc",
        &[
            "-O1",
            "-g",
            "-fno-omit-frame-pointer",
            &format!("-L{dir}"),
            &format!("-Wl,-rpath,{dir}"),
            "-lleak",
        ],
        "uselib.c",
        "uselib",
    );
    let mut fixture = Fixture::start(&program, &[]);
    let outcome = Leaktrace::one_round(&mut fixture, &[]);
    let leak = stack_holding(outcome.last(), 20 * 300);
    let frames = leak["frames"].as_array().unwrap();
    assert_unnamed_frame_in(&frames[0], &stripped_lib, &lib.path, "chunk_alloc");
    assert_eq!(frames[1]["symbol"], "lib_leak");
    assert_eq!(frames[1]["file"], Value::Null);
    assert_eq!(frames[1]["module"], stripped_lib.to_str().unwrap());
    assert!(file_range_of(&lib.path, "lib_leak").contains(&(module_offset(&frames[1]) - 1)));
    assert_eq!(frames[2]["symbol"], "main");
    assert_eq!(frames[2]["line"], line_of("uselib.c", "= lib_leak(300);"));
    fixture.finish();
}

#[test]
fn a_process_in_its_own_mount_namespace_is_symbolized_from_its_own_files() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    // The fixture runs from a tmpfs mounted in its own mount namespace: the path exists only
    // there. unshare and sh exec, so the fixture keeps the pid of the child started here.
    let mount = tempfile::tempdir().unwrap();
    let inside = mount.path().join("leaky-ns");
    let mut fixture = Fixture::start_command(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t tmpfs tmpfs "$1" && cp "$2" "$3" && exec "$3" 5 100 5"#)
            .arg("sh")
            .args([mount.path(), &binary.path, &inside]),
    );
    let pid = fixture.pid();
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
        inside
    );
    assert!(!inside.exists(), "the binary is not visible on the host");

    let trace = Leaktrace::attach(pid, &[]);
    fixture.round();
    let outcome = trace.stop();
    assert!(
        outcome.status.success(),
        "{} {:?}",
        outcome.status,
        outcome.stderr
    );
    let leak = stack_holding(outcome.last(), 500);
    let frame = &leak["frames"][0];
    assert_eq!(frame["symbol"], "leak_site");
    assert_eq!(frame["module"], inside.to_str().unwrap());
    assert!(frame["file"].as_str().unwrap().ends_with("leaky.c"));
    assert_eq!(
        frame["line"],
        line_of("leaky.c", "void *p = malloc(bytes);")
    );
    assert_eq!(leak["frames"][1]["symbol"], "main");
    fixture.finish();
}

#[test]
fn a_binary_deleted_or_replaced_while_running_is_symbolized_from_the_running_file() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    // Something else entirely, with other symbols at other offsets.
    let other = compile("family", &[]);
    for replaced in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app");
        std::fs::copy(&binary.path, &path).unwrap();
        let mut fixture = Fixture::start_command(Command::new(&path).args(["5", "100", "5"]));
        if replaced {
            // As a deploy does: a new file renamed over the old one.
            let new = dir.path().join("app.new");
            std::fs::copy(&other.path, &new).unwrap();
            std::fs::rename(&new, &path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
        let outcome = Leaktrace::one_round(&mut fixture, &[]);
        let leak = stack_holding(outcome.last(), 500);
        let frame = &leak["frames"][0];
        assert_eq!(frame["symbol"], "leak_site", "replaced: {replaced}");
        // The kernel's name for a mapping whose file is gone from its path.
        assert_eq!(frame["module"], format!("{} (deleted)", path.display()));
        assert_eq!(
            frame["line"],
            line_of("leaky.c", "void *p = malloc(bytes);")
        );
        assert_eq!(leak["frames"][1]["symbol"], "main");
        fixture.finish();
    }
}

/// Runs leaktrace on `pid` with its default text output, as a user would, while `work` runs;
/// returns what it printed on stdout.
fn trace_text(pid: u32, work: impl FnOnce()) -> String {
    let mut child = Command::new(LEAKTRACE)
        .args(["-p", &pid.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("leaktrace starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("leaktrace: tracing pid") {
        line.clear();
        let n = stderr.read_line(&mut line).unwrap();
        assert!(n > 0, "leaktrace did not attach: {line}");
    }
    work();
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    out
}

#[test]
fn a_leak_three_calls_deep_is_named_at_every_level_with_file_and_line() {
    if !require_root() {
        return;
    }
    // As a new user builds it: `gcc -g`, nothing else.
    let binary = build("gcc", &["-g"], "three_deep.c", "three_deep");
    let mut fixture = Fixture::start(&binary, &[]);
    let text = trace_text(fixture.pid(), || {
        fixture.round();
    });
    fixture.finish();

    let lines: Vec<&str> = text.lines().collect();
    let last = lines
        .iter()
        .rposition(|l| l.contains("leaktrace final report"))
        .unwrap_or_else(|| panic!("a final report in {text}"));
    let report = &lines[last..];
    assert!(
        report
            .iter()
            .any(|l| l.starts_with("outstanding 5.0 KiB in 10 allocations")),
        "{text}"
    );
    let top = report
        .iter()
        .position(|l| l.starts_with("#1 "))
        .unwrap_or_else(|| panic!("a top stack in {text}"));
    assert_eq!(
        report[top].split_whitespace().take(6).collect::<Vec<_>>(),
        ["#1", "5.0", "KiB", "in", "10", "allocs"],
        "{text}"
    );
    let source = fixture_source("three_deep.c");
    let source = source.to_str().unwrap();
    // Each frame line is `function+0xOFFSET (file:line)`.
    for (i, (function, call)) in [
        ("c", "char *p = malloc(bytes);"),
        ("b", "void *p = c(bytes);"),
        ("a", "= b(512);"),
        ("main", "a();"),
    ]
    .into_iter()
    .enumerate()
    {
        let frame = report[top + 1 + i].trim();
        let (name, rest) = frame.split_once("+0x").unwrap_or_else(|| panic!("{text}"));
        assert_eq!(name, function, "{text}");
        assert!(
            rest.ends_with(&format!(" ({source}:{})", line_of("three_deep.c", call))),
            "{function} at {call:?} in {text}"
        );
    }
}
