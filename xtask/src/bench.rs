//! `cargo xtask bench`: what tracing costs the target, measured side by side.
//!
//! The machine may be shared and noisy, so every configuration runs once per round, rounds
//! interleave the configurations (in a rotating order), and the table shows the median with the
//! min and max over rounds. Ratios are taken within a round, then summarized the same way.

mod load;
mod python;
mod services;
mod stats;
mod tracer;
mod traps;
mod unwind;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{ChildStdin, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, bail};

use self::{
    stats::Summary,
    tracer::{Tracer, Tracing},
};
use super::{Child, build_release, fixture, require_root, run, setup, step, workspace};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rounds: each configuration runs once per round.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds each microbenchmark workload runs per configuration and round.
    #[arg(long, default_value_t = 0.5)]
    seconds: f64,
    /// Seconds of load on each service per configuration and round (redis: per test, SET and
    /// GET, sized from a short first run).
    #[arg(long, default_value_t = 2.0)]
    server_seconds: f64,
    /// Run only these parts (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
    /// The python part: an earlier leaktrace binary (a copy of `target/release/leaktrace`
    /// before a change) whose configurations run too, interleaved with this build's, so that
    /// the change is measured side by side.
    #[arg(long, value_name = "PATH")]
    baseline: Option<PathBuf>,
    /// The python part: the interpreter that runs the handler loop (a pyenv build, whose
    /// `PyObject_*` are functions, rather than Debian's, which inlines pymalloc).
    #[arg(long, value_name = "PATH", default_value = "/usr/bin/python3.11")]
    python: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Micro,
    /// The echo server built with frame pointers.
    Server,
    /// The echo server built without frame pointers, as distribution packages are.
    ServerNofp,
    Redis,
    Loss,
    Aggregator,
    Traps,
    Python,
    /// BPF time per allocation: frame pointers against `--unwind auto` without them.
    Unwind,
}

/// Where the bench keeps its binaries, scripts and leaktrace's reports.
fn bench_dir() -> PathBuf {
    workspace().join("target/bench")
}

/// The microbenchmark's workloads, in the order the fixture prints them.
const WORKLOADS: [(&str, &str); 4] = [
    ("pairs_1t", "malloc+free 3 calls deep, 1 thread"),
    ("pairs_2t", "the same, 2 threads (per thread)"),
    ("realloc_mix", "malloc, realloc x2, free (per 2 calls)"),
    ("mixed_sizes", "8 B to 64 KiB, 64 held"),
];

pub fn bench(args: &Args) -> anyhow::Result<()> {
    setup()?;
    require_root("the bench")?;
    super::install_packages(&["bpftrace"])?;
    if args.rounds == 0 || !(args.seconds > 0.0 && args.server_seconds > 0.0) {
        bail!("--rounds, --seconds and --server-seconds must be positive");
    }
    step("building leaktrace and the aggregator bench (release)");
    build_release(&["aggregator_bench"])?;
    let dir = bench_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let malloc_bench = compile(&dir, "malloc_bench")?;
    let echo_server = compile(&dir, "echo_server")?;
    let load_before = load_average();

    let wanted = |part| args.only.is_empty() || args.only.contains(&part);
    let micro = wanted(Part::Micro)
        .then(|| micro(args, &malloc_bench))
        .transpose()?;
    let server = wanted(Part::Server)
        .then(|| services::echo(args, &echo_server, "frame pointers"))
        .transpose()?;
    let server_nofp = wanted(Part::ServerNofp)
        .then(|| {
            let binary = compile_with(
                &dir,
                "echo_server",
                "echo_server_nofp",
                "-fomit-frame-pointer",
            )?;
            services::echo(args, &binary, "built without frame pointers")
        })
        .transpose()?;
    let redis = wanted(Part::Redis)
        .then(|| services::redis(args))
        .transpose()?;
    let loss = wanted(Part::Loss)
        .then(|| loss(&malloc_bench))
        .transpose()?;
    let aggregator = wanted(Part::Aggregator).then(aggregator).transpose()?;
    let traps = wanted(Part::Traps)
        .then(|| traps::traps(args, &malloc_bench))
        .transpose()?;
    let python = wanted(Part::Python)
        .then(|| python::python(args))
        .transpose()?;
    let unwind = wanted(Part::Unwind)
        .then(|| unwind::unwind(args))
        .transpose()?;

    println!();
    println!(
        "leaktrace bench · {} rounds · load average {} before, {} after (2 cores shared: read the ratios, taken within each round)",
        args.rounds,
        load_before,
        load_average()
    );
    if let Some(micro) = micro {
        micro.print();
    }
    for service in [server, server_nofp, redis].into_iter().flatten() {
        service.print();
    }
    if let Some(loss) = loss {
        loss.print();
    }
    if let Some(aggregator) = aggregator {
        aggregator.print();
    }
    if let Some(traps) = traps {
        traps.print();
    }
    if let Some(python) = python {
        python.print();
    }
    if let Some(unwind) = unwind {
        unwind.print();
    }
    Ok(())
}

fn compile(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    // Frame pointers, as leaktrace's stacks want them; -O2 as services are built.
    compile_with(dir, name, name, "-fno-omit-frame-pointer")
}

/// `tests/fixtures/NAME.c` built into `dir/output` with `-O2 -g` and `frame_pointers`.
fn compile_with(
    dir: &Path,
    name: &str,
    output: &str,
    frame_pointers: &str,
) -> anyhow::Result<PathBuf> {
    let out = dir.join(output);
    step(&format!(
        "compiling tests/fixtures/{name}.c ({frame_pointers})"
    ));
    run(Command::new("gcc")
        .args(["-O2", "-g", frame_pointers, "-pthread", "-o"])
        .arg(&out)
        .arg(fixture(&format!("{name}.c"))))?;
    Ok(out)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// A fixture that talks over stdin/stdout, killed when dropped.
struct Fixture {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Fixture {
    fn start(binary: &Path) -> anyhow::Result<Self> {
        Self::start_command(&mut Command::new(binary))
    }

    fn start_command(command: &mut Command) -> anyhow::Result<Self> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {:?}", command.get_program()))?;
        let stdin = child.stdin.take().context("fixture stdin")?;
        let stdout = child.stdout.take().context("fixture stdout")?;
        Ok(Self {
            child: Child(child),
            stdin,
            lines: lines_of(stdout),
        })
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    fn send(&mut self, line: &str) -> anyhow::Result<()> {
        writeln!(self.stdin, "{line}").context("writing to the fixture")
    }

    fn line(&self, timeout: Duration) -> anyhow::Result<String> {
        self.lines
            .recv_timeout(timeout)
            .context("the bench fixture stopped answering")
    }

    /// `NAME VALUE ...` lines up to `done` (malloc_bench's workloads): name -> value.
    fn results(&self, per_line: Duration) -> anyhow::Result<BTreeMap<String, f64>> {
        let mut values = BTreeMap::new();
        loop {
            let line = self.line(per_line)?;
            if line == "done" {
                return Ok(values);
            }
            let mut words = line.split_whitespace();
            let (Some(name), Some(value)) = (words.next(), words.next()) else {
                bail!("unexpected fixture output `{line}`");
            };
            values.insert(name.to_owned(), value.parse::<f64>()?);
        }
    }
}

/// How long attaching may take: leaktrace loads and attaches in well under a second, but the
/// machine may be busy.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until leaktrace, whose stderr's lines these are, says that every probe is attached;
/// returns what it wrote before (the attach summary, warnings).
pub(crate) fn until_attached(stderr: &mpsc::Receiver<String>) -> anyhow::Result<Vec<String>> {
    let mut early = Vec::new();
    loop {
        match stderr.recv_timeout(ATTACH_TIMEOUT) {
            Ok(line) if line.starts_with("leaktrace: tracing pid") => return Ok(early),
            Ok(line) if line.starts_with("leaktrace: error") => bail!("{line}"),
            Ok(line) => early.push(line),
            Err(_) => bail!("leaktrace did not attach within {ATTACH_TIMEOUT:?}"),
        }
    }
}

/// Lines of a child's output, read on a thread so that waiting for one can time out.
pub(crate) fn lines_of(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A configuration of the microbenchmark: who traces the fixture, and how.
#[derive(Clone, Copy)]
struct Config {
    name: &'static str,
    tracer: Tracer,
}

const UNTRACED: Config = Config {
    name: "untraced",
    tracer: Tracer::None,
};
const LEAKTRACE: Config = Config {
    name: "leaktrace",
    tracer: Tracer::Leaktrace(&[]),
};
const FLOOR: Config = Config {
    name: "floor",
    tracer: Tracer::Leaktrace(&["--noop-programs"]),
};
/// The floor of `--sample-bytes`: no-op programs at the entries alone, since a call whose block
/// is not drawn skips its return; the cheapest any sampling tracer can be at these probe points.
const FLOOR_ENTRIES: Config = Config {
    name: "floor entry",
    tracer: Tracer::Leaktrace(&["--noop-entries-only"]),
};
const BPFTRACE: Config = Config {
    name: "bpftrace",
    tracer: Tracer::Bpftrace,
};
/// What `--sample-bytes` is for: production, at the sampling rate of jemalloc's heap profiler.
const SAMPLED: Config = Config {
    name: "lt sampled",
    tracer: Tracer::Leaktrace(&["--sample-bytes", SAMPLE_BYTES]),
};
const SAMPLE_BYTES: &str = "512K";
const LEAKTRACE_FREE_AT_ENTRY: Config = Config {
    name: "lt free@0",
    tracer: Tracer::Leaktrace(&["--free-at-entry"]),
};
const FLOOR_FREE_AT_ENTRY: Config = Config {
    name: "floor free@0",
    tracer: Tracer::Leaktrace(&["--noop-programs", "--free-at-entry"]),
};

const MICRO_CONFIGS: [Config; 7] = [
    UNTRACED,
    LEAKTRACE,
    SAMPLED,
    FLOOR,
    BPFTRACE,
    LEAKTRACE_FREE_AT_ENTRY,
    FLOOR_FREE_AT_ENTRY,
];

/// The configurations of one round, in an order that rotates from round to round, so that no
/// configuration always runs first (or right after the build of a colleague...).
fn rotated<T: Copy>(items: &[T], round: usize) -> Vec<T> {
    let mut v = items.to_vec();
    v.rotate_left(round % items.len());
    v
}

/// Per round: config -> workload -> ns per call (or pair).
type Rounds = Vec<BTreeMap<&'static str, BTreeMap<String, f64>>>;

/// Runs malloc_bench once per configuration and round, configurations in an order that
/// rotates from round to round: `command` is what the fixture runs (`run SECS`, `traps SECS`),
/// and `traced` sees what each tracer said.
fn fixture_rounds(
    args: &Args,
    binary: &Path,
    what: &str,
    configs: &[Config],
    command: &str,
    mut traced: impl FnMut(&Config, Option<tracer::Outcome>) -> anyhow::Result<()>,
) -> anyhow::Result<Rounds> {
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let mut results = BTreeMap::new();
        for config in rotated(configs, round) {
            step(&format!(
                "{what} round {}/{}: {}",
                round + 1,
                args.rounds,
                config.name
            ));
            let mut fixture = Fixture::start(binary)?;
            expect(&fixture.line(Duration::from_secs(10))?, "ready")?;
            let tracing = Tracing::start(config.tracer, fixture.pid(), &bench_dir())?;
            fixture.send(command)?;
            let ns = fixture.results(Duration::from_secs_f64(args.seconds * 20.0 + 30.0))?;
            traced(&config, tracing.stop()?)?;
            fixture.send("quit")?;
            results.insert(config.name, ns);
        }
        rounds.push(results);
    }
    Ok(rounds)
}

/// `[round][config] -> workload -> ns per pair`
struct Micro {
    rounds: Rounds,
    /// Events leaktrace lost in its microbenchmark runs, and the events it saw.
    lost_events: u64,
    events: u64,
    return_without_entry: u64,
}

fn micro(args: &Args, binary: &Path) -> anyhow::Result<Micro> {
    let (mut lost_events, mut events, mut return_without_entry) = (0, 0, 0);
    let rounds = fixture_rounds(
        args,
        binary,
        "microbenchmark",
        &MICRO_CONFIGS,
        &format!("run {}", args.seconds),
        |config, outcome| {
            if config.name == LEAKTRACE.name {
                let outcome = outcome.context("leaktrace wrote no report")?;
                if outcome.allocations == 0 {
                    bail!("leaktrace saw no allocation: it did not trace the fixture");
                }
                lost_events += outcome.lost_events;
                events += outcome.allocations + outcome.frees;
                return_without_entry += outcome.return_without_entry;
            }
            Ok(())
        },
    )?;
    Ok(Micro {
        rounds,
        lost_events,
        events,
        return_without_entry,
    })
}

fn expect(line: &str, want: &str) -> anyhow::Result<()> {
    if line != want {
        bail!("the fixture said `{line}`, not `{want}`");
    }
    Ok(())
}

impl Micro {
    fn value(&self, round: usize, config: &str, workload: &str) -> Option<f64> {
        self.rounds[round].get(config)?.get(workload).copied()
    }

    /// Per round, `f(value of config...)`, summarized over rounds.
    fn over_rounds(&self, f: impl Fn(usize) -> Option<f64>) -> Summary {
        Summary::of((0..self.rounds.len()).filter_map(f))
    }

    /// `(a - untraced) / (b - untraced)` within each round.
    fn added_ratio(&self, workload: &str, a: &str, b: &str) -> Summary {
        self.over_rounds(|r| {
            let base = self.value(r, UNTRACED.name, workload)?;
            let a = self.value(r, a, workload)? - base;
            let b = self.value(r, b, workload)? - base;
            (b > 0.0).then_some(a / b)
        })
    }

    fn print(&self) {
        println!();
        println!(
            "malloc microbenchmark: ns per pair of allocator calls, median [min..max] over rounds"
        );
        let table = |configs: &[Config]| {
            print!("{:<12}", "workload");
            for config in configs {
                print!(" {:>22}", config.name);
            }
            println!();
            for (workload, _) in WORKLOADS {
                print!("{workload:<12}");
                for config in configs {
                    let s = self.over_rounds(|r| self.value(r, config.name, workload));
                    print!(" {:>22}", s.show(0));
                }
                println!();
            }
        };
        table(&MICRO_CONFIGS[..5]);
        for (workload, what) in WORKLOADS {
            println!("  {workload}: {what}");
        }
        println!(
            "  floor: the same probe points with BPF programs that do nothing; lt sampled: --sample-bytes {SAMPLE_BYTES}"
        );
        println!("free probed at its first instruction instead (a single-stepped trap):");
        table(&MICRO_CONFIGS[5..]);
        println!();
        println!("ratios of added cost (traced - untraced), per round, median [min..max]:");
        let ratios: [(&str, &str, &str); 5] = [
            ("leaktrace/floor <=1.3", LEAKTRACE.name, FLOOR.name),
            ("sampled/floor", SAMPLED.name, FLOOR.name),
            ("bpftrace/leaktrace >=3", BPFTRACE.name, LEAKTRACE.name),
            (
                "lt free@0/leaktrace",
                LEAKTRACE_FREE_AT_ENTRY.name,
                LEAKTRACE.name,
            ),
            ("floor free@0/floor", FLOOR_FREE_AT_ENTRY.name, FLOOR.name),
        ];
        print!("{:<12}", "workload");
        for (title, _, _) in ratios {
            print!(" {title:>22}");
        }
        println!();
        for (workload, _) in WORKLOADS {
            print!("{workload:<12}");
            for (_, a, b) in ratios {
                print!(" {:>22}", self.added_ratio(workload, a, b).show(2));
            }
            println!();
        }
        println!(
            "leaktrace lost {} of {} events over all microbenchmark runs (default settings); {} allocator returns seen without their entry",
            self.lost_events, self.events, self.return_without_entry
        );
    }
}

/// Connections the load generator keeps busy, each one request at a time.
const CONNECTIONS: usize = 4;

/// Zero-drop event rates under leaktrace at default settings.
struct Loss {
    /// (offered events/s, achieved events/s, lost events)
    steps: Vec<(Option<f64>, f64, u64)>,
    /// Per BPF program of the first step: name, runs, ns per run (the kernel's own timing).
    programs: Vec<(String, u64, f64)>,
}

/// Seconds per step of the loss ramp: long enough to fill a ring buffer that is not drained.
const LOSS_SECONDS: f64 = 4.0;

/// Runs the microbenchmark's two threads flat out under leaktrace; if anything was lost, offers
/// lower rates until nothing is.
fn loss(binary: &Path) -> anyhow::Result<Loss> {
    let mut loss = Loss {
        steps: Vec::new(),
        programs: Vec::new(),
    };
    let mut offered: Option<f64> = None;
    for _ in 0..6 {
        step(&format!(
            "loss: {} under leaktrace for {LOSS_SECONDS} s",
            offered.map_or("two threads flat out".into(), |r| format!(
                "{r:.0} events/s offered"
            ))
        ));
        let mut fixture = Fixture::start(binary)?;
        expect(&fixture.line(Duration::from_secs(10))?, "ready")?;
        // The kernel times each program run here (it costs two clock reads per run, so not in
        // the microbenchmark's timed runs).
        let tracer = Tracer::Leaktrace(&["--print-program-times"]);
        let tracing = Tracing::start(tracer, fixture.pid(), &bench_dir())?;
        // Two events (malloc, free) per pair.
        let pairs_per_s = offered.map_or(0.0, |r| r / 2.0);
        fixture.send(&format!("rate {pairs_per_s} {LOSS_SECONDS}"))?;
        let line = fixture.line(Duration::from_secs_f64(LOSS_SECONDS * 10.0 + 30.0))?;
        let achieved = line
            .strip_prefix("rate ")
            .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
            .with_context(|| format!("unexpected fixture output `{line}`"))?
            * 2.0;
        let outcome = tracing.stop()?.context("leaktrace wrote no report")?;
        fixture.send("quit")?;
        loss.steps.push((offered, achieved, outcome.lost_events));
        if loss.programs.is_empty() {
            loss.programs = outcome
                .programs
                .iter()
                .map(|(name, runs, ns)| (name.clone(), *runs, *ns as f64 / (*runs).max(1) as f64))
                .collect();
        }
        if outcome.lost_events == 0 {
            break;
        }
        offered = Some(achieved / 2.0);
    }
    Ok(loss)
}

impl Loss {
    fn print(&self) {
        println!();
        println!(
            "loss under leaktrace (default settings: 32 MiB ring buffer), {LOSS_SECONDS} s per step:"
        );
        for &(offered, achieved, lost) in &self.steps {
            println!(
                "  offered {:>14}  achieved {:>10.0} events/s  lost {lost}",
                offered.map_or("flat out".into(), |r| format!("{r:.0}/s")),
                achieved
            );
        }
        match self.steps.iter().find(|s| s.2 == 0) {
            Some(&(None, achieved, _)) => println!(
                "  zero drops at the microbenchmark's full rate: {achieved:.0} events/s (the traps, not the intake, set that rate)"
            ),
            Some(&(Some(_), achieved, _)) => {
                println!("  highest rate seen with zero drops: {achieved:.0} events/s")
            }
            None => println!("  drops at every rate tried"),
        }
        println!(
            "  where leaktrace's added cost goes: time inside each BPF program, as the kernel measures it (bpf run-time stats, first step):"
        );
        for (name, runs, ns) in &self.programs {
            println!("    {name:<22} {runs:>10} runs {ns:>8.0} ns per run");
        }
    }
}

/// The heap model alone (leaktrace/examples/aggregator_bench.rs).
struct Aggregator {
    /// live-set size -> bytes per live allocation
    bytes_per_live: Vec<(u64, f64)>,
    /// live-set size -> events/s of CPU time, of wall time, of the model without decoding, and
    /// of a bare hash map (CPU time)
    events_per_s: Vec<(u64, Summary, Summary, Summary, Summary)>,
}

/// Live-set sizes at which events/s are measured: what fits in caches, and what does not.
const AGGREGATOR_LIVE: [u64; 3] = [10_000, 100_000, 1_000_000];

fn aggregator() -> anyhow::Result<Aggregator> {
    let binary = workspace().join("target/release/examples/aggregator_bench");
    let mut result = Aggregator {
        bytes_per_live: Vec::new(),
        events_per_s: Vec::new(),
    };
    for live in AGGREGATOR_LIVE {
        step(&format!("aggregator: {live} live allocations"));
        let out = Command::new(&binary)
            .arg(live.to_string())
            .output()
            .with_context(|| format!("running {}", binary.display()))?;
        if !out.status.success() {
            bail!("{} failed ({})", binary.display(), out.status);
        }
        let (mut cpu, mut wall, mut apply, mut bare) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words[..] {
                ["bytes_per_live", n, bytes] if live == AGGREGATOR_LIVE[0] => {
                    result.bytes_per_live.push((n.parse()?, bytes.parse()?));
                }
                ["events_per_s", c, w] => {
                    cpu.push(c.parse()?);
                    wall.push(w.parse()?);
                }
                ["bare_map_events_per_s", b] => bare.push(b.parse()?),
                ["apply_only_events_per_s", a] => apply.push(a.parse()?),
                _ => {}
            }
        }
        result.events_per_s.push((
            live,
            Summary::of(cpu),
            Summary::of(wall),
            Summary::of(apply),
            Summary::of(bare),
        ));
    }
    Ok(result)
}

impl Aggregator {
    fn print(&self) {
        println!();
        println!(
            "aggregator alone (decode + heap model, one thread; 1000 stacks of 8-32 frames; each alloc at a new address, each free of the oldest):"
        );
        println!(
            "{:>12} {:>24} {:>24} {:>24} {:>24}",
            "live allocs",
            "M events/s (CPU time)",
            "(wall time)",
            "model alone (CPU)",
            "bare hash map (CPU)"
        );
        for (live, cpu, wall, apply, bare) in &self.events_per_s {
            println!(
                "{live:>12} {:>24} {:>24} {:>24} {:>24}",
                cpu.scaled(1e-6).show(2),
                wall.scaled(1e-6).show(2),
                apply.scaled(1e-6).show(2),
                bare.scaled(1e-6).show(2)
            );
        }
        println!(
            "  model alone: the same events applied without decoding records (stacks held in memory); bare hash map: the same addresses into a hash map with entries of the same size (no stacks)"
        );
        for (live, bytes) in &self.bytes_per_live {
            println!(
                "  user-space bytes per live allocation at {live} live: {bytes:.1} (all bytes the process allocated for the model, counted by a global allocator, divided by live allocations)"
            );
        }
    }
}
