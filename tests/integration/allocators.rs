//! The allocator a process really uses, found with no flag beyond `-p`: jemalloc, tcmalloc
//! and mimalloc (linked or `LD_PRELOAD`ed), C++ operator new/delete, a static executable,
//! a Rust binary with a prefixed jemalloc, and a target in its own pid and mount namespaces.

use std::{collections::BTreeMap, path::Path, process::Command};

use serde_json::Value;

use crate::support::{
    Binary, Fixture, Leaktrace, compile, compile_cxx, installed, require_root, run_leaktrace,
    stack_of,
};

const LIB: &str = "/usr/lib/x86_64-linux-gnu";

/// "expect SITE BYTES COUNT" lines, as the fixture counted them.
fn expected(lines: &[String]) -> Vec<(String, u64, u64)> {
    let mut want: Vec<_> = lines
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
    want
}

/// Outstanding bytes and blocks per site: the function that called the allocator.
fn sites(report: &Value) -> Vec<(String, u64, u64)> {
    sites_by(report, |frames| {
        frames[0]["symbol"].as_str().map(str::to_owned)
    })
}

/// Outstanding bytes and blocks per site, as `site_of` names a stack's frames.
fn sites_by(
    report: &Value,
    site_of: impl Fn(&[Value]) -> Option<String>,
) -> Vec<(String, u64, u64)> {
    let mut got = BTreeMap::<String, (u64, u64)>::new();
    for stack in report["stacks"].as_array().unwrap() {
        let site = site_of(stack["frames"].as_array().unwrap()).unwrap_or_else(|| "?".into());
        let entry = got.entry(site).or_default();
        entry.0 += stack["outstanding_bytes"].as_u64().unwrap();
        entry.1 += stack["outstanding_allocations"].as_u64().unwrap();
    }
    got.into_iter().map(|(site, (b, n))| (site, b, n)).collect()
}

/// Runs two rounds of `tests/fixtures/allocators.cc` under leaktrace and checks every leak
/// site to the byte, no unmatched free (nothing counted twice), and the allocator named.
fn allocators_fixture_is_exact(fixture: &mut Fixture, allocator: &str, module: &str) {
    let trace = Leaktrace::attach(fixture.pid(), &["--top", "100"]);
    fixture.round();
    let want = expected(&fixture.round());
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    hot_entries_are_emulated(&outcome.stderr);
    let report = outcome.last();
    assert_eq!(report["allocator"], allocator, "{:?}", outcome.stderr);
    // The memory map names a library by its real path, not by its soname link.
    let module = std::fs::canonicalize(module).unwrap();
    assert_eq!(report["allocator_module"], module.to_str().unwrap());
    assert_eq!(sites(report), want, "{:?}", outcome.stderr);
    let totals = &report["totals"];
    assert_eq!(
        totals["outstanding_bytes"],
        want.iter().map(|w| w.1).sum::<u64>()
    );
    assert_eq!(totals["lost_events"], 0);
    assert_eq!(
        totals["unmatched_frees"], 0,
        "a free counted twice shows as a free of an unknown block"
    );
}

/// malloc, free and their aliases are probed on instructions the kernel emulates (a
/// single-stepped probe costs a service ~30x its throughput): the announcement lists the
/// single-stepped entry points, and leaktrace warns of a hot one.
fn hot_entries_are_emulated(stderr: &[String]) {
    let line = stderr
        .iter()
        .find(|l| l.starts_with("leaktrace: tracing pid"))
        .expect("the announcement");
    assert!(line.contains(" entries emulated, "), "{line}");
    let single = line
        .split_once("single-stepped (")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map_or("", |(list, _)| list);
    for symbol in single.split(", ") {
        assert!(
            !symbol.contains("malloc") && !symbol.contains("free") && !symbol.starts_with("_Z"),
            "{symbol} is single-stepped: {line}"
        );
    }
    assert!(
        !stderr.iter().any(|l| l.starts_with("leaktrace: warning:")),
        "{stderr:?}"
    );
}

fn have(lib: &str) -> bool {
    installed(lib, Path::new(LIB).join(lib).exists())
}

#[test]
fn jemalloc_linked_c_and_cxx_and_its_own_api_are_exact() {
    if !require_root() || !have("libjemalloc.so.2") {
        return;
    }
    let binary = compile_cxx(
        "allocators",
        "with-jemalloc",
        &["-DUSE_JEMALLOC", "-ljemalloc"],
    );
    let mut fixture = Fixture::start(&binary, &[]);
    allocators_fixture_is_exact(&mut fixture, "jemalloc", &format!("{LIB}/libjemalloc.so.2"));
    fixture.finish();
}

#[test]
fn jemalloc_linked_statically_into_a_dynamic_executable_is_found_in_it() {
    if !require_root() || !have("libjemalloc_pic.a") {
        return;
    }
    // As services often ship it: the executable defines malloc itself and, like the dynamic
    // linker, leaktrace finds it there before glibc's.
    let archive = format!("{LIB}/libjemalloc_pic.a");
    let binary = compile_cxx(
        "allocators",
        "with-static-jemalloc",
        &[
            "-DUSE_JEMALLOC",
            "-Wl,--whole-archive",
            &archive,
            "-Wl,--no-whole-archive",
            "-ldl",
        ],
    );
    let mut fixture = Fixture::start(&binary, &[]);
    allocators_fixture_is_exact(&mut fixture, "jemalloc", binary.path.to_str().unwrap());
    fixture.finish();
}

#[test]
fn mimalloc_linked_c_and_cxx_and_its_own_api_are_exact() {
    if !require_root() || !have("libmimalloc.so.2") {
        return;
    }
    let binary = compile_cxx(
        "allocators",
        "with-mimalloc",
        &["-DUSE_MIMALLOC", "-lmimalloc"],
    );
    let mut fixture = Fixture::start(&binary, &[]);
    allocators_fixture_is_exact(&mut fixture, "mimalloc", &format!("{LIB}/libmimalloc.so.2"));
    fixture.finish();
}

#[test]
fn tcmalloc_linked_c_and_cxx_and_its_own_api_are_exact() {
    if !require_root() || !have("libtcmalloc_minimal.so.4") {
        return;
    }
    // Debian ships no unversioned libtcmalloc_minimal.so without the -dev package.
    let lib = format!("{LIB}/libtcmalloc_minimal.so.4");
    let binary = compile_cxx("allocators", "with-tcmalloc", &["-DUSE_TCMALLOC", &lib]);
    let mut fixture = Fixture::start(&binary, &[]);
    allocators_fixture_is_exact(&mut fixture, "tcmalloc", &lib);
    fixture.finish();
}

#[test]
fn an_ld_preloaded_tcmalloc_is_found_before_glibc() {
    if !require_root() || !have("libtcmalloc_minimal.so.4") {
        return;
    }
    let lib = format!("{LIB}/libtcmalloc_minimal.so.4");
    let binary = compile_cxx("allocators", "plain", &[]);
    let mut fixture = Fixture::start_command(Command::new(&binary.path).env("LD_PRELOAD", &lib));
    allocators_fixture_is_exact(&mut fixture, "tcmalloc", &lib);
    fixture.finish();
}

#[test]
fn cxx_on_glibc_counts_each_operator_new_once_through_malloc() {
    if !require_root() {
        return;
    }
    // libstdc++'s operator new calls malloc and its operator delete calls free: only those
    // are probed, so each block is counted once (frame 0 is then operator new itself, and
    // without frame pointers in libstdc++ the site may be cut: compare the totals).
    let binary = compile_cxx("allocators", "on-glibc", &[]);
    let mut fixture = Fixture::start(&binary, &[]);
    let trace = Leaktrace::attach(fixture.pid(), &["--top", "100"]);
    fixture.round();
    // libstdc++'s aligned operator new rounds the size up to a multiple of the alignment
    // for aligned_alloc, which is what malloc's family sees.
    let want: Vec<_> = expected(&fixture.round())
        .into_iter()
        .map(|(site, bytes, n)| {
            let align = match site.as_str() {
                "new_aligned_site" => 64,
                "new_array_aligned_nothrow_site" => 128,
                _ => 1,
            };
            let each = (bytes / n).div_ceil(align) * align;
            (site, each * n, n)
        })
        .collect();
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    let report = outcome.last();
    assert_eq!(report["allocator"], "glibc");
    let totals = &report["totals"];
    assert_eq!(
        totals["outstanding_bytes"],
        want.iter().map(|w| w.1).sum::<u64>()
    );
    assert_eq!(
        totals["outstanding_allocations"],
        want.iter().map(|w| w.2).sum::<u64>()
    );
    assert_eq!(totals["unmatched_frees"], 0);
    assert_eq!(totals["lost_events"], 0);
    fixture.finish();
}

/// The 100 x 4096-byte leak of `tests/fixtures/leaky.c`, named and exact.
fn leaky_fixture_is_exact(fixture: &mut Fixture, pid: u32) -> Value {
    let trace = Leaktrace::attach(pid, &[]);
    fixture.round();
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    hot_entries_are_emulated(&outcome.stderr);
    let report = outcome.last().clone();
    let leak = stack_of(&report, "leak_site")
        .unwrap_or_else(|| panic!("leak_site named: {report}; {:?}", outcome.stderr));
    assert_eq!(leak["outstanding_bytes"], 100 * 4096);
    assert_eq!(leak["outstanding_allocations"], 100);
    assert_eq!(report["totals"]["outstanding_bytes"], 100 * 4096);
    assert_eq!(report["totals"]["unmatched_frees"], 0);
    report
}

#[test]
fn a_static_executable_is_traced_in_itself() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &["-static"]);
    let mut fixture = Fixture::start(&binary, &["100", "4096", "1000"]);
    let pid = fixture.pid();
    let report = leaky_fixture_is_exact(&mut fixture, pid);
    assert_eq!(report["allocator"], "glibc");
    assert_eq!(report["allocator_module"], binary.path.to_str().unwrap());
    fixture.finish();
}

#[test]
fn a_process_without_any_allocator_gets_one_clear_line() {
    if !require_root() {
        return;
    }
    // A static program without libc: it writes "ready" and sleeps.
    let binary = compile(
        "no_allocator",
        &["-static", "-nostdlib", "-fno-stack-protector"],
    );
    let fixture = Fixture::start(&binary, &[]);
    let pid = fixture.pid().to_string();
    let out = run_leaktrace(&["-p", &pid]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "leaktrace: error: process {pid} ({}): no allocator entry point found",
            binary.path.display()
        )),
        "{stderr}"
    );
}

/// The pid, in this (the host's) namespace, of the only child of `parent`.
fn only_child(parent: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
        .expect("the kernel lists children");
    let pids: Vec<u32> = children
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 1, "{children}");
    pids[0]
}

#[test]
fn a_target_in_its_own_pid_and_mount_namespaces_is_traced_by_its_host_pid() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    // Inside the new mount namespace, the fixture runs from a tmpfs mounted over an empty
    // directory: its executable exists only there, and leaktrace must go through
    // /proc/PID/root to read it.
    let hidden = tempfile::tempdir().unwrap();
    let script = format!(
        "mount -t tmpfs tmpfs {dir} && cp {bin} {dir}/leaky && exec {dir}/leaky 100 4096 1000",
        dir = hidden.path().display(),
        bin = binary.path.display()
    );
    let mut fixture = Fixture::start_command(
        Command::new("unshare")
            .args(["--pid", "--mount", "--fork", "--kill-child", "sh", "-c"])
            .arg(&script),
    );
    let pid = only_child(fixture.pid());
    assert!(
        !hidden.path().join("leaky").exists(),
        "the executable is invisible outside the namespace"
    );
    let report = leaky_fixture_is_exact(&mut fixture, pid);
    assert_eq!(report["pid"], pid);
    let leak = stack_of(&report, "leak_site").unwrap();
    assert_eq!(
        leak["frames"][0]["module"],
        format!("{}/leaky", hidden.path().display()),
        "modules are named as the target sees them"
    );
    fixture.finish();
}

/// `tests/fixtures/rjem`, a Rust program whose global allocator is tikv-jemallocator: a
/// jemalloc linked statically into the executable, under the `_rjem_` prefix.
fn build_rjem_fixture() -> Binary {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/rjem/Cargo.toml");
    let dir = tempfile::tempdir().unwrap();
    // Its own target directory under the workspace's, kept between runs: the jemalloc C
    // build takes a minute.
    let target_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        // Frame pointers, so that stacks reach the fixture's functions.
        .env("RUSTFLAGS", "-C force-frame-pointers=yes")
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "building the rjem fixture: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.path().join("rjem-leaky");
    std::fs::copy(target_dir.join("release/rjem-leaky"), &path).unwrap();
    Binary { _dir: dir, path }
}

#[test]
fn a_rust_binary_with_a_prefixed_static_jemalloc_is_exact() {
    if !require_root() {
        return;
    }
    let binary = build_rjem_fixture();
    let mut fixture = Fixture::start(&binary, &[]);
    let trace = Leaktrace::attach(fixture.pid(), &["--top", "100"]);
    fixture.round();
    let want = expected(&fixture.round());
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    hot_entries_are_emulated(&outcome.stderr);
    let report = outcome.last();
    assert_eq!(report["allocator"], "jemalloc (_rjem_)");
    assert_eq!(report["allocator_module"], binary.path.to_str().unwrap());
    // Frame 0 is in the allocator shim (`__rust_alloc`, inlined into std's callers); the site
    // is the innermost function of the fixture's own, named by its demangled path.
    let got = sites_by(report, |frames| {
        frames
            .iter()
            .filter_map(|f| f["symbol"].as_str())
            .find_map(|s| s.strip_prefix("rjem_leaky::"))
            .map(str::to_owned)
    });
    assert_eq!(got, want, "{:?}", outcome.stderr);
    assert_eq!(report["totals"]["unmatched_frees"], 0);
    assert_eq!(report["totals"]["lost_events"], 0);
    fixture.finish();
}

#[test]
fn an_allocator_deleted_from_disk_since_it_was_loaded_is_traced_through_map_files() {
    if !require_root() || !have("libjemalloc.so.2") {
        return;
    }
    // As after a package upgrade: the process still runs the old, now deleted, files.
    let binary = compile("leaky", &[]);
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libjemalloc.so.2");
    std::fs::copy(format!("{LIB}/libjemalloc.so.2"), &lib).unwrap();
    let mut fixture = Fixture::start_command(
        Command::new(&binary.path)
            .args(["100", "4096", "1000"])
            .env("LD_PRELOAD", &lib),
    );
    std::fs::remove_file(&lib).unwrap();
    let pid = fixture.pid();
    let report = leaky_fixture_is_exact(&mut fixture, pid);
    assert_eq!(report["allocator"], "jemalloc");
    assert_eq!(
        report["allocator_module"],
        format!("{} (deleted)", lib.display())
    );
    fixture.finish();
}

#[test]
fn a_container_with_its_own_root_and_libc_is_traced_in_its_own_files() {
    if !require_root() {
        return;
    }
    // A minimal root file system: the fixture, and copies of the dynamic linker and libc
    // (other inodes than the host's, at the same paths). Probes on the host's libc would see
    // nothing.
    let binary = compile("leaky", &[]);
    let root = tempfile::tempdir().unwrap();
    for (from, to) in [
        (binary.path.to_str().unwrap(), "leaky"),
        ("/lib64/ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2"),
        (
            "/lib/x86_64-linux-gnu/libc.so.6",
            "lib/x86_64-linux-gnu/libc.so.6",
        ),
    ] {
        let to = root.path().join(to);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, &to).unwrap();
    }
    let mut fixture = Fixture::start_command(
        Command::new("unshare")
            .args(["--pid", "--mount", "--fork", "--kill-child", "--root"])
            .arg(root.path())
            .args(["/leaky", "100", "4096", "1000"]),
    );
    let pid = only_child(fixture.pid());
    let report = leaky_fixture_is_exact(&mut fixture, pid);
    assert_eq!(report["allocator"], "glibc");
    // The kernel names a file by its path from leaktrace's root when it can reach it (here,
    // the container's root is a directory of the host's); the file opened is the container's.
    let copy = root.path().join("lib/x86_64-linux-gnu/libc.so.6");
    assert_eq!(report["allocator_module"], copy.to_str().unwrap());
    let leak = stack_of(&report, "leak_site").unwrap();
    assert_eq!(
        leak["frames"][0]["module"],
        root.path().join("leaky").to_str().unwrap()
    );
    fixture.finish();
}
