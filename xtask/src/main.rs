//! `cargo xtask`: set up the BPF toolchain, run the demo, run the tests.

mod bench_memory;
mod bench_symbolize;
mod bench_unwind;
mod bench_watch;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod bench;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the BPF programs needs (idempotent; a no-op once done).
    Setup,
    /// Build leaktrace and trace the bundled leaky demo service for a few reports.
    Demo,
    /// Run the whole test suite: unit tests and, as root, tests that trace real processes.
    Test {
        /// Extra arguments for `cargo test` (a test name filter, `--nocapture`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure what tracing costs the target: a malloc microbenchmark untraced, under
    /// leaktrace, under the floor (no-op programs) and under bpftrace; a server under load;
    /// the aggregator alone; event loss. Needs root; installs bpftrace.
    Bench(bench::Args),
    /// Time symbolizing and rendering a report of 10,000+ distinct stacks (needs root).
    BenchSymbolize {
        /// Distinct stacks in the report (default 12000).
        #[arg(long)]
        stacks: Option<u64>,
    },
    /// Measure leaktrace's own peak memory: per live block (2 million kept), and for a report
    /// of 100,000 distinct stacks in each format (needs root).
    BenchMemory(bench_memory::Args),
    /// Watch a service that does not leak for a long time (`--minutes`, default 30) with
    /// `--metrics`, scraped every second, and print leaktrace's own memory as it goes.
    BenchWatch(bench_watch::Args),
    /// Measure the cost per malloc/free pair of `--unwind dwarf|auto` next to `--unwind fp`,
    /// and how fast leaktrace unwinds stack copies.
    BenchUnwind {
        /// malloc/free pairs per measurement.
        #[arg(long, default_value_t = 200_000)]
        pairs: u64,
        /// Runs; each measures every configuration once, and the table shows medians.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
}

/// Debian packages: rustc 1.96 with the library source its `-Z build-std` needs, LLVM 22 for
/// bpf-linker, gcc and g++ for the test fixtures, the allocators the fixtures link with
/// (jemalloc, tcmalloc, mimalloc), redis, a real service that runs on jemalloc, and Prometheus
/// (2.42 in Debian 12: OpenMetrics scrapes, the HTTP API, promtool) to scrape `--metrics`.
const PACKAGES: [&str; 17] = [
    "rustc-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "gcc",
    "g++",
    "libjemalloc-dev",
    "libtcmalloc-minimal4",
    "libmimalloc-dev",
    "redis-server",
    "redis-tools",
    "util-linux",
    // Debian's python3 (3.11): the Python tests (tests/integration/python.rs) trace it.
    "python3",
    // Its headers: a test compiles tests/fixtures/python_offsets.c against them.
    "libpython3.11-dev",
    "prometheus",
];
/// Of `PACKAGES`, those installed without their recommended packages: Prometheus recommends
/// the node exporter (and its collectors: smartmontools, ipmitool, ...), a daemon the tests do
/// not need and that would listen on every interface where services start on install.
const WITHOUT_RECOMMENDS: [&str; 1] = ["prometheus"];
const TOOLCHAIN: &str = "debian-web";
const BPF_LINKER: &str = "0.13.0";

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup(),
        Task::Demo => demo(),
        Task::Test { args } => test(&args),
        Task::Bench(args) => bench::bench(&args),
        Task::BenchSymbolize { stacks } => bench_symbolize::bench_symbolize(stacks),
        Task::BenchUnwind { pairs, runs } => bench_unwind::bench_unwind(pairs, runs),
        Task::BenchWatch(args) => bench_watch::bench_watch(&args),
        Task::BenchMemory(args) => bench_memory::bench_memory(&args),
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// A C or C++ fixture: they all live in `tests/fixtures`, the tests', the benches' and the
/// demo's alike.
fn fixture(file: &str) -> PathBuf {
    workspace().join("tests/fixtures").join(file)
}

fn step(what: &str) {
    eprintln!("xtask: {what}");
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    String::from_utf8(out.stdout).ok()
}

/// Installs the Debian packages of `packages` that are missing.
fn install_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|pkg| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
                .is_none_or(|status| !status.ends_with("installed"))
        })
        .collect();
    if !missing.is_empty() {
        step(&format!(
            "installing Debian packages: {}",
            missing.join(" ")
        ));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        let (lean, rest): (Vec<&str>, Vec<&str>) = missing
            .iter()
            .partition(|pkg| WITHOUT_RECOMMENDS.contains(pkg));
        for (packages, recommends) in [(rest, true), (lean, false)] {
            if packages.is_empty() {
                continue;
            }
            let mut install = Command::new("apt-get");
            install.args(["install", "-y", "-q"]);
            if !recommends {
                install.arg("--no-install-recommends");
            }
            run(install
                .args(&packages)
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
        }
    }
    Ok(())
}

fn setup() -> anyhow::Result<()> {
    install_packages(&PACKAGES)?;
    if !succeeds(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "--version"])) {
        step(&format!(
            "linking Debian's rustc into rustup as `{TOOLCHAIN}`"
        ));
        run(Command::new("rustup").args(["toolchain", "link", TOOLCHAIN, "/usr"]))?;
    }
    let linker = output(Command::new("bpf-linker").arg("--version"));
    if linker.as_deref().map(str::trim) != Some(&format!("bpf-linker {BPF_LINKER}")) {
        step(&format!(
            "installing bpf-linker {BPF_LINKER} against LLVM 22 (about a minute)"
        ));
        // Without LLVM 22 first on PATH, bpf-linker's build finds Debian's default
        // llvm-config (LLVM 14) and fails to link.
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new("cargo")
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER}"),
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path)
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22"))?;
    }
    step("toolchain ready");
    Ok(())
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (BPF and uprobes): run `sudo -E cargo xtask ...`");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace());
    cmd
}

fn test(args: &[String]) -> anyhow::Result<()> {
    setup()?;
    require_root("the test suite")?;
    step("running the test suite");
    let mut cargo = cargo();
    // The property tests of the parsers of untrusted bytes (leaktrace/src/fuzz.rs): this many
    // cases each, about 15 s in all on the development VM. PROPTEST_CASES set by the caller
    // wins.
    if std::env::var_os("PROPTEST_CASES").is_none() {
        cargo.env("PROPTEST_CASES", FUZZ_CASES);
    }
    run(cargo.arg("test").args(args))
}

/// Cases per property test in `cargo xtask test`.
const FUZZ_CASES: &str = "10000";

include!("../../tests/fixtures/leaky_service_trace.rs");

/// Kills the demo service when dropped, whatever happens in between.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds the leaktrace binary, and these examples of its crate, in release mode.
fn build_release(examples: &[&str]) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "-p",
        "leaktrace",
        "--bin",
        "leaktrace",
    ]);
    for example in examples {
        cmd.args(["--example", example]);
    }
    run(&mut cmd)
}

/// The workspace's leaktrace binary, as `build_release` builds it.
fn release_leaktrace() -> PathBuf {
    workspace().join("target/release/leaktrace")
}

/// The leaktrace binary to run: `given` (a bench's `--leaktrace`, to compare builds side by
/// side), or else the workspace's, built in release mode first.
fn leaktrace_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_owned());
    }
    step("building leaktrace (release)");
    build_release(&[])?;
    Ok(release_leaktrace())
}

fn demo() -> anyhow::Result<()> {
    setup()?;
    require_root("the demo")?;
    let leaktrace = leaktrace_binary(None)?;
    let root = workspace();
    let demo_dir = root.join("target/demo");
    std::fs::create_dir_all(&demo_dir)?;
    let service = demo_dir.join("leaky-service");
    step("building the leaky demo service (tests/fixtures/leaky_service.c)");
    run(Command::new("gcc")
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
        .arg(&service)
        .arg(fixture("leaky_service.c")))?;
    let child = Child(
        Command::new(&service)
            .stdin(Stdio::null())
            .spawn()
            .context("starting the demo service")?,
    );
    let pid = child.0.id().to_string();
    thread::sleep(Duration::from_millis(DEMO_HEAD_START_MS));
    step(&format!(
        "tracing the demo service (pid {pid}) for 7 s: a report every 2 s, blocks younger than 10 ms (requests in flight) left out"
    ));
    let status = Command::new(leaktrace)
        .args(["-p", &pid])
        .args(DEMO_FLAGS)
        .status()
        .context("running leaktrace")?;
    drop(child);
    if !status.success() {
        bail!("leaktrace failed ({status})");
    }
    step(
        "the top stack is the leak (remember_request), the session cache below it is stable; the per-request scratch buffers are absent",
    );
    Ok(())
}
