//! `cargo xtask bench-memory`: leaktrace's own memory, as its peak resident set (VmHWM).
//!
//! 1. Per live block: `tests/fixtures/keep_blocks.c` makes `--blocks` allocations from four
//!    call sites, once freeing each at once and once keeping them all; leaktrace traces both
//!    (JSON reports every second, read until every allocation is counted) and its peak RSS is
//!    read then. The difference, divided by the blocks, is what a live block costs: both runs
//!    see the same allocations, so the ring buffer and the rest are the same in both.
//! 2. Per report of many stacks: a generated program makes `--stacks` distinct stacks of about
//!    `--depth` + 9 frames (one block each, kept), and leaktrace writes one final report of
//!    all of them (`--top` as many) in each format; its peak RSS is read before Ctrl-C (the
//!    heap model's part) and until it exits (the report's part).

use std::{
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::{ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{
    Child,
    bench::{lines_of, until_attached},
    bench_watch::status_kib,
    fixture, leaktrace_binary, require_root, run, setup, step, workspace,
};

#[derive(clap::Args)]
pub struct Args {
    /// Live blocks kept by the fixture of part 1.
    #[arg(long, default_value_t = 2_000_000)]
    blocks: u64,
    /// Distinct stacks of part 2.
    #[arg(long, default_value_t = 100_000)]
    stacks: u64,
    /// Distinct functions on every stack of part 2 above the ones that tell stacks apart.
    #[arg(long, default_value_t = 30)]
    depth: u32,
    /// Parts to run: blocks, stacks (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "blocks,stacks")]
    only: Vec<String>,
    /// Formats of part 2 (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "text,json,folded,pprof,svg"
    )]
    formats: Vec<String>,
    /// Trace with this leaktrace binary instead of building the workspace's (to compare
    /// builds side by side).
    #[arg(long)]
    leaktrace: Option<PathBuf>,
}

pub fn bench_memory(args: &Args) -> anyhow::Result<()> {
    setup()?;
    require_root("bench-memory (it traces real processes)")?;
    let root = workspace();
    let leaktrace = leaktrace_binary(args.leaktrace.as_deref())?;
    let dir = root.join(format!("target/bench-memory/{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = parts(args, &leaktrace, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn parts(args: &Args, leaktrace: &Path, dir: &Path) -> anyhow::Result<()> {
    if args.only.iter().any(|p| p == "blocks") {
        blocks(args, leaktrace, dir)?;
    }
    if args.only.iter().any(|p| p == "stacks") {
        stacks(args, leaktrace, dir)?;
    }
    Ok(())
}

/// A fixture that says "ready", allocates on a line from us, then says "done".
struct Fixture {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Fixture {
    fn start(cmd: &mut Command) -> anyhow::Result<Self> {
        let mut child = Child(
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting the fixture")?,
        );
        let stdin = child.0.stdin.take().context("fixture stdin")?;
        let lines = lines_of(child.0.stdout.take().context("fixture stdout")?);
        let fixture = Self {
            child,
            stdin,
            lines,
        };
        fixture.expect("ready", Duration::from_secs(10))?;
        Ok(fixture)
    }

    fn expect(&self, want: &str, timeout: Duration) -> anyhow::Result<()> {
        let line = self
            .lines
            .recv_timeout(timeout)
            .with_context(|| format!("the fixture did not say {want:?}"))?;
        ensure!(line == want, "the fixture said {line:?}, not {want:?}");
        Ok(())
    }

    fn go(&mut self) -> anyhow::Result<()> {
        writeln!(self.stdin, "go").context("writing to the fixture")
    }
}

/// leaktrace tracing a fixture: its stdout's lines, and its stderr's.
struct Tracer {
    child: Child,
    out: Option<mpsc::Receiver<String>>,
}

impl Tracer {
    fn start(leaktrace: &Path, pid: u32, args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Child(
            Command::new(leaktrace)
                .args(["-p", &pid.to_string()])
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("starting {}", leaktrace.display()))?,
        );
        let err = lines_of(child.0.stderr.take().context("leaktrace's stderr")?);
        let out = lines_of(child.0.stdout.take().context("leaktrace's stdout")?);
        until_attached(&err)?;
        // Its later messages are not needed; the thread drains them.
        Ok(Self {
            child,
            out: Some(out),
        })
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    fn peak_kib(&self) -> anyhow::Result<u64> {
        status_kib(self.pid(), "VmHWM:")
    }

    /// Ctrl-C, then its peak RSS until it exits (read while it detaches: the report comes
    /// first), and the time to exit.
    fn interrupt(mut self) -> anyhow::Result<(u64, Duration)> {
        let started = Instant::now();
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGINT) };
        let mut peak = self.peak_kib()?;
        loop {
            if let Some(status) = self.child.0.try_wait()? {
                ensure!(status.success(), "leaktrace failed ({status})");
                return Ok((peak, started.elapsed()));
            }
            // Once it is a zombie its memory is gone: keep the last reading.
            if let Ok(kib) = self.peak_kib() {
                peak = peak.max(kib);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn blocks(args: &Args, leaktrace: &Path, dir: &Path) -> anyhow::Result<()> {
    let binary = dir.join("keep_blocks");
    run(Command::new("gcc")
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&binary)
        .arg(fixture("keep_blocks.c")))?;
    step(&format!(
        "part 1: {} blocks of 32 bytes from 4 call sites, freed at once, then kept",
        args.blocks
    ));
    let mut peaks = Vec::new();
    for keep in [false, true] {
        let mut fixture = Fixture::start(
            Command::new(&binary).args([args.blocks.to_string(), u8::from(keep).to_string()]),
        )?;
        let tracer = Tracer::start(
            leaktrace,
            fixture.child.0.id(),
            &["--format", "json", "--interval", "1", "--top", "10"],
        )?;
        let started = Instant::now();
        fixture.go()?;
        fixture.expect("done", Duration::from_secs(600))?;
        let allocated = Instant::now();
        // Every allocation counted: the model holds what it will hold.
        let reports = tracer.out.as_ref().context("leaktrace's stdout")?;
        let (live, lost) = loop {
            let line = reports
                .recv_timeout(Duration::from_secs(60))
                .context("no report from leaktrace")?;
            let report: serde_json::Value = serde_json::from_str(&line)?;
            let totals = &report["totals"];
            let at = |field: &str| totals[field].as_u64().unwrap_or(0);
            if at("allocations") + at("lost_events") >= args.blocks {
                break (at("outstanding_allocations"), at("lost_events"));
            }
        };
        let peak = tracer.peak_kib()?;
        let rss = status_kib(tracer.pid(), "VmRSS:")?;
        tracer.interrupt()?;
        println!(
            "live blocks {live:>9} (lost events {lost}): leaktrace peak RSS {:8.1} MiB, RSS {:8.1} MiB (allocating took {:.1} s)",
            mib(peak),
            mib(rss),
            (allocated - started).as_secs_f64()
        );
        ensure!(
            lost == 0,
            "events were lost: per-block bytes would be wrong"
        );
        peaks.push((live, peak));
    }
    let [(free_live, free_peak), (kept_live, kept_peak)] = peaks[..] else {
        bail!("two runs expected");
    };
    println!(
        "bytes of leaktrace's peak RSS per live block: {:.1} (({} - {}) KiB / {} blocks)",
        (kept_peak as f64 - free_peak as f64) * 1024.0 / (kept_live - free_live) as f64,
        kept_peak,
        free_peak,
        kept_live - free_live
    );
    Ok(())
}

/// Functions per level and call sites per function, and levels: 24^4 = 331,776 paths.
const FANOUT: u64 = 24;
const LEVELS: u32 = 3;
/// Counter values are multiplied by this (prime to 24) modulo 24^4 before their digits pick
/// the path: a bijection, so paths stay distinct, that spreads them over every call site.
const SCRAMBLE: u64 = 7919;

/// A C program whose `count`th allocation takes the `count`th distinct path to malloc: main
/// calls a chain of `depth` functions, the last of which picks one of FANOUT^(LEVELS + 1)
/// paths through LEVELS levels of FANOUT functions by the digits of a scrambled counter.
fn many_stacks_source(depth: u32) -> String {
    let mut c = String::from(
        "/* Generated by `cargo xtask bench-memory`: a distinct stack per counter value. */\n\
         #include <stdlib.h>\n#include <unistd.h>\n\n\
         static void **kept;\nstatic long kept_n;\n\n\
         __attribute__((noinline)) static void leaf(long x) {\n\
         \x20   kept[kept_n++] = malloc(16 + (x & 7));\n\
         \x20   __asm__ volatile(\"\" ::: \"memory\");\n}\n\n",
    );
    for k in 0..FANOUT {
        let _ = writeln!(
            c,
            "__attribute__((noinline)) void leaf{k}(long x) {{ leaf(x); __asm__ volatile(\"\" ::: \"memory\"); }}"
        );
    }
    for level in 0..LEVELS {
        for k in 0..FANOUT {
            let _ = writeln!(c, "void f{level}_{k}(long x);");
        }
    }
    let dispatch = |c: &mut String, digit_of: u32, callee_level: Option<u32>| {
        let divisor = FANOUT.pow(digit_of);
        let _ = writeln!(c, "    switch ((x / {divisor}L) % {FANOUT}) {{");
        for k in 0..FANOUT {
            let _ = match callee_level {
                Some(level) => writeln!(c, "    case {k}: f{level}_{k}(x); break;"),
                None => writeln!(c, "    case {k}: leaf{k}(x); break;"),
            };
        }
        c.push_str("    }\n    __asm__ volatile(\"\" ::: \"memory\");\n");
    };
    for level in 0..LEVELS {
        for k in 0..FANOUT {
            let _ = writeln!(
                c,
                "\n__attribute__((noinline)) void f{level}_{k}(long x) {{"
            );
            dispatch(&mut c, level + 1, (level + 1 < LEVELS).then_some(level + 1));
            c.push_str("}\n");
        }
    }
    let _ = writeln!(
        c,
        "\n__attribute__((noinline)) void chain{depth}(long x) {{"
    );
    dispatch(&mut c, 0, Some(0));
    c.push_str("}\n");
    for k in (0..depth).rev() {
        let _ = writeln!(
            c,
            "__attribute__((noinline)) void chain{k}(long x) {{ chain{}(x); __asm__ volatile(\"\" ::: \"memory\"); }}",
            k + 1
        );
    }
    c.push_str(
        "\nint main(int argc, char **argv) {\n\
         \x20   long count = atol(argv[1]);\n\
         \x20   char ch;\n\
         \x20   kept = calloc(count, sizeof(void *));\n\
         \x20   write(1, \"ready\\n\", 6);\n\
         \x20   while (read(0, &ch, 1) == 1 && ch != '\\n') {}\n\
         \x20   for (long i = 0; i < count; i++)\n",
    );
    let _ = writeln!(
        c,
        "        chain0(i * {SCRAMBLE}L % {}L);",
        FANOUT.pow(LEVELS + 1)
    );
    c.push_str(
        "    write(1, \"done\\n\", 5);\n\
         \x20   while (read(0, &ch, 1) == 1) {}\n\
         \x20   return 0;\n}\n",
    );
    c
}

fn stacks(args: &Args, leaktrace: &Path, dir: &Path) -> anyhow::Result<()> {
    ensure!(
        args.stacks <= FANOUT.pow(LEVELS + 1),
        "at most {} distinct stacks",
        FANOUT.pow(LEVELS + 1)
    );
    let source = dir.join("many_stacks.c");
    std::fs::write(&source, many_stacks_source(args.depth))?;
    let binary = dir.join("many_stacks");
    run(Command::new("gcc")
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&binary)
        .arg(&source))?;
    step(&format!(
        "part 2: {} distinct stacks of ~{} frames, one final report of all of them",
        args.stacks,
        args.depth + 9
    ));
    let top = args.stacks.to_string();
    for format in &args.formats {
        let output = dir.join(format!("report.{format}"));
        let mut fixture = Fixture::start(Command::new(&binary).arg(args.stacks.to_string()))?;
        let output_arg = output.display().to_string();
        let tracer = Tracer::start(
            leaktrace,
            fixture.child.0.id(),
            &[
                "--format",
                format,
                "--interval",
                "3600",
                "--top",
                &top,
                "-o",
                &output_arg,
            ],
        )?;
        fixture.go()?;
        fixture.expect("done", Duration::from_secs(600))?;
        // Let the intake drain what is in flight (it polls every 50 ms).
        std::thread::sleep(Duration::from_secs(2));
        let before = tracer.peak_kib()?;
        let (peak, exit) = tracer.interrupt()?;
        let bytes = std::fs::metadata(&output).map_or(0, |m| m.len());
        println!(
            "{format:>6}: leaktrace peak RSS {:8.1} MiB before the report, {:8.1} MiB with it ({:.1} MiB of output; Ctrl-C to exit {:.1} s)",
            mib(before),
            mib(peak),
            bytes as f64 / (1024.0 * 1024.0),
            exit.as_secs_f64()
        );
        let _ = std::fs::remove_file(&output);
    }
    Ok(())
}
