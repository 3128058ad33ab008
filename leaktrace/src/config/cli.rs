//! The command line as clap parses it: every flag, and the rule of its own value (a range, a
//! size). Rules between flags are `rules`'; what each stage gets is `settings`'. The domain's
//! enums get their names and help here: nothing outside `config` knows clap.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum, builder::PossibleValue};

use crate::{
    attach::probes::Unwind,
    report::{diff::DiffFormat, render::Format, snapshot::SortKey},
};

/// Outstanding memory allocations of a running process, by call stack: find memory leaks
/// in production without restarting anything.
#[derive(Debug, Parser)]
#[command(
    name = "leaktrace",
    version,
    about,
    long_about = None,
    args_override_self = true,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    override_usage = "leaktrace -p PID [OPTIONS]\n       leaktrace [OPTIONS] -- CMD [ARGS]...\n       leaktrace diff OLD.json NEW.json",
    after_help = "Exit status: 0 when the trace ran (also when the reader of stdout went away), 1 on an error (bad arguments, a report that could not be written), 3 with --fail-on-leak when a stack of the final report is a leak, 4 when --max-overhead stopped the trace."
)]
pub struct Cli {
    #[command(subcommand)]
    pub subcommand: Option<Command>,

    /// The process to trace; repeat it to trace several (each is reported separately).
    #[arg(
        short,
        long,
        required_unless_present = "command",
        conflicts_with = "command"
    )]
    pub pid: Vec<u32>,

    /// Also trace the children that traced processes fork, while they run the same program
    /// (each reported separately, by pid).
    #[arg(long)]
    pub follow_forks: bool,

    /// Run this command and trace it from its first allocation; the trace ends when it exits.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,

    /// Seconds between reports (at least 0.1).
    #[arg(short, long, value_name = "SECS", default_value = "5", value_parser = interval_secs)]
    pub interval: f64,

    /// Stop after this many seconds (default: until Ctrl-C, SIGTERM or the target exits).
    #[arg(short, long, value_name = "SECS", value_parser = positive_secs)]
    pub duration: Option<f64>,

    /// Stop after this many reports; the last of them is the final report.
    #[arg(short = 'n', long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// Order of the stacks in a report.
    #[arg(long, value_enum, value_name = "KEY", default_value_t = SortKey::Bytes)]
    pub sort: SortKey,

    /// Count only blocks of at least this size (bytes; K, M, G suffixes are powers of 1024).
    #[arg(long, value_name = "BYTES", value_parser = size_bytes)]
    pub min_size: Option<u64>,

    /// Count only blocks of at most this size (bytes; K, M, G suffixes are powers of 1024).
    #[arg(long, value_name = "BYTES", value_parser = size_bytes)]
    pub max_size: Option<u64>,

    /// Exit with status 3 when any stack of the final report is a `leak`.
    #[arg(long)]
    pub fail_on_leak: bool,

    /// Count only allocations at least this old: hides blocks that are merely in flight.
    #[arg(long, value_name = "SECS", value_parser = positive_secs)]
    pub min_age: Option<f64>,

    /// List the stacks that hold mappings of files too. They are never added to the heap
    /// numbers; without this flag, only their total is shown.
    #[arg(long)]
    pub file_mappings: bool,

    /// List the stacks that made pymalloc's arenas (CPython) too. The objects carved from
    /// them are counted one by one, so the arenas are never added to the heap numbers; without
    /// this flag, only their total is shown.
    #[arg(long)]
    pub pymalloc_arenas: bool,

    /// Stacks shown per report, biggest first [default: 10; every stack for folded, pprof
    /// and svg].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub top: Option<usize>,

    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Write reports to this file instead of stdout, or, to a directory (one that exists, or a
    /// path ending in /), a timestamped file per report. A file in the folded, pprof or svg
    /// format holds the latest report.
    #[arg(short, long, value_name = "FILE|DIR")]
    pub output: Option<PathBuf>,

    /// With --output DIR: keep only the newest N report files (bounded disk use).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub keep: Option<u64>,

    /// Trace a sample of the malloc family's blocks, about one per BYTES allocated (K, M, G
    /// suffixes), for a fraction of the cost: a block of s bytes is traced with probability
    /// min(1, s/BYTES). Reports then show unbiased estimates and say so; mappings are traced
    /// whole.
    #[arg(long, value_name = "BYTES", value_parser = sample_bytes)]
    pub sample_bytes: Option<u64>,

    /// Reports over which growth is measured and leaks are told from stable usage.
    #[arg(long, value_name = "REPORTS", default_value_t = 10, value_parser = clap::value_parser!(u16).range(2..))]
    pub window: u16,

    /// Frames kept per stack, innermost first (1 to 127, the kernel's limit); a deeper stack is
    /// cut and marked truncated. Also bounds the Python frames walked per allocation (96 at
    /// most), most of an allocation's cost on a deep Python stack.
    #[arg(long, value_name = "N", default_value_t = leaktrace_common::DEFAULT_STACK_DEPTH, value_parser = clap::value_parser!(u32).range(1..=leaktrace_common::MAX_STACK_DEPTH as i64))]
    pub max_depth: u32,

    /// Size of the BPF ring buffer that carries events (a power of two, in bytes).
    #[arg(long, value_name = "BYTES", default_value_t = leaktrace_common::DEFAULT_RINGBUF_BYTES, value_parser = ringbuf_bytes)]
    pub ringbuf_bytes: u32,

    /// How stacks are unwound: `fp` follows frame pointers; `dwarf` also copies the user stack
    /// of every allocation and unwinds it with the modules' call-frame information (.eh_frame);
    /// `auto` does that only when the frame-pointer walk went through code built without
    /// frame pointers.
    #[arg(long, value_enum, default_value_t = Unwind::Auto)]
    pub unwind: Unwind,

    /// Bytes of user stack copied per allocation for `--unwind dwarf|auto`: 4096, 8192, 16384
    /// or 32768. Deeper stacks are completed from their frame-pointer walk where it agrees.
    #[arg(long, value_name = "BYTES", default_value_t = leaktrace_common::DEFAULT_STACK_COPY_BYTES, value_parser = stack_copy_bytes)]
    pub stack_copy_bytes: u32,

    /// Serve each report's numbers at http://ADDR/metrics for Prometheus: IP:PORT
    /// (127.0.0.1:9464), or :PORT for every interface.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<crate::metrics::ListenAddr>,

    /// Stacks per process exported with --metrics, in the order of --sort (default 20).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=1000))]
    pub metrics_top: Option<u16>,

    /// Stop tracing (with a final report, exit status 4) when the probes take more than
    /// PERCENT of the traced processes' CPU time over a second, as leaktrace estimates it: the
    /// kernel's run-time statistics of its BPF programs plus a measured cost per trap.
    #[arg(long, value_name = "PERCENT", value_parser = overhead_percent)]
    pub max_overhead: Option<f64>,

    /// Benchmarks only: attach programs that do nothing at the same probe points, so that
    /// `cargo xtask bench` measures the cost of the traps alone (the floor).
    #[arg(long, hide = true)]
    pub noop_programs: bool,

    /// Benchmarks only: `--noop-programs` at the entries alone, no return probe anywhere: the
    /// floor of `--sample-bytes`, where a call whose block is not drawn skips its return.
    #[arg(long, hide = true)]
    pub noop_entries_only: bool,

    /// Benchmarks only: probe every allocator function at its first instruction even when a
    /// later one would be cheaper to trap, to measure what the choice saves.
    #[arg(long, hide = true, alias = "free-at-entry")]
    pub probes_at_entry: bool,

    /// Benchmarks only: attach one perf-event uprobe per probe, as on kernels without
    /// uprobe_multi links (before 6.6), to measure what the links save.
    #[arg(long, hide = true)]
    pub probes_one_at_a_time: bool,

    /// Benchmarks only: with `--sample-bytes`, attach the malloc family's entries and returns
    /// apart, as on kernels without uprobe session programs (before 6.13), so that every call
    /// traps at its return, drawn or not: to measure what sessions save.
    #[arg(long, hide = true)]
    pub probes_without_sessions: bool,

    /// Benchmarks only: print the BPF programs' counters to stderr at exit
    /// (`leaktrace: bpf stats NAME=N ...`).
    #[arg(long, hide = true)]
    pub print_bpf_stats: bool,

    /// Benchmarks only: have the kernel time every BPF program run (two clock reads per run)
    /// and print each program's runs and run time to stderr at exit
    /// (`leaktrace: bpf program NAME runs=N run_time_ns=T`).
    #[arg(long, hide = true)]
    pub print_program_times: bool,

    /// Benchmarks only: write the unwinding rows (`--unwind auto`) with one map update per
    /// element, as on kernels without batched updates (before 5.6), to measure what batches
    /// save.
    #[arg(long, hide = true)]
    pub rows_one_at_a_time: bool,

    /// Benchmarks only: print how long each write of the unwinding rows took, to stderr
    /// (`leaktrace: wrote N unwinding rows and P pages in T ms (built in B ms)`).
    #[arg(long, hide = true)]
    pub print_row_writes: bool,
}

/// A value of a domain enum on the command line: its name, and its help when it has one.
fn value(name: &'static str, help: &'static str) -> Option<PossibleValue> {
    let value = PossibleValue::new(name);
    Some(if help.is_empty() {
        value
    } else {
        value.help(help)
    })
}

impl ValueEnum for Unwind {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Auto, Self::Fp, Self::Dwarf]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        match self {
            Self::Auto => value("auto", ""),
            Self::Fp => value("fp", ""),
            Self::Dwarf => value("dwarf", ""),
        }
    }
}

impl ValueEnum for SortKey {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Bytes, Self::Count, Self::Growth]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        match self {
            Self::Bytes => value("bytes", "Outstanding bytes, biggest first"),
            Self::Count => value("count", "Outstanding allocations, most first"),
            Self::Growth => value(
                "growth",
                "Growth in bytes/s over the last reports, fastest first",
            ),
        }
    }
}

impl ValueEnum for Format {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Text, Self::Json, Self::Folded, Self::Pprof, Self::Svg]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        match self {
            Self::Text => value("text", "For people: a header and the top stacks"),
            Self::Json => value(
                "json",
                "One JSON object per report, one per line (the contract in DESIGN.md)",
            ),
            Self::Folded => value(
                "folded",
                "Collapsed stacks (outermost frame first, `;`-joined, then outstanding bytes), \
                 for flamegraph.pl, inferno and speedscope",
            ),
            Self::Pprof => value(
                "pprof",
                "A gzipped pprof profile.proto (inuse_space/objects, alloc_space/objects)",
            ),
            Self::Svg => value("svg", "An SVG flame graph of outstanding bytes"),
        }
    }
}

impl ValueEnum for DiffFormat {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Text, Self::Json]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        match self {
            Self::Text => value("text", ""),
            Self::Json => value("json", ""),
        }
    }
}

fn stack_copy_bytes(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if leaktrace_common::STACK_COPY_SIZES.contains(&n) => Ok(n),
        _ => Err(format!(
            "`{s}` is not one of {:?}",
            leaktrace_common::STACK_COPY_SIZES
        )),
    }
}

/// The shortest interval between reports: each report walks every live block and stack, and
/// a tracer that does nothing but report is of no use (`-i 1e-9` made 20,000 reports in 2 s).
pub const MIN_INTERVAL_SECS: f64 = 0.1;

/// A share of CPU time in percent: above 0, below 100 (the probes cannot take more than all of
/// it, so 100 would never stop anything).
fn overhead_percent(s: &str) -> Result<f64, String> {
    match s.strip_suffix('%').unwrap_or(s).parse::<f64>() {
        Ok(p) if p > 0.0 && p < 100.0 => Ok(p),
        _ => Err(format!(
            "`{s}` is not a percentage of CPU time above 0 and below 100 (0.5, 5, 20%)"
        )),
    }
}

fn interval_secs(s: &str) -> Result<f64, String> {
    match positive_secs(s)? {
        secs if secs >= MIN_INTERVAL_SECS => Ok(secs),
        _ => Err(format!(
            "`{s}` is shorter than the shortest interval, {MIN_INTERVAL_SECS} s"
        )),
    }
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a number of at least 1")),
    }
}

/// A command-line error in one line: clap's message without the usage that follows it, and
/// where to read more. (clap's own errors span several lines and exit with status 2; leaktrace
/// says every error in one line and exits with 1.)
pub fn one_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let message: Vec<&str> = rendered
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    format!("{message} (see `leaktrace --help`)")
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs < 1e9 => Ok(secs),
        _ => Err(format!("`{s}` is not a positive number of seconds")),
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Which stacks grew between two JSON reports (the last report of each file), and by how much.
    Diff(DiffArgs),
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The earlier report (`leaktrace --format json`).
    pub old: PathBuf,
    /// The later report.
    pub new: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = DiffFormat::Text)]
    pub format: DiffFormat,
    /// Stacks shown, most growth first.
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = at_least_one)]
    pub top: usize,
}

/// A size in bytes: `4096`, `4K`, `4KiB`, `1M`, `2G` (powers of 1024).
pub fn size_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("`{s}` is not a size (for example 4096, 64K, 1M)")),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("`{s}` is not a size (for example 4096, 64K, 1M)"))
}

fn sample_bytes(s: &str) -> Result<u64, String> {
    match size_bytes(s)? {
        n @ 1..=leaktrace_common::MAX_SAMPLE_BYTES => Ok(n),
        _ => Err(format!("`{s}` is not a sampling size from 1 byte to 1G")),
    }
}

fn ringbuf_bytes(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n.is_power_of_two() && n >= 4096 => Ok(n),
        _ => Err(format!("`{s}` is not a power of two of at least 4096")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_issue_s_flags() {
        let cli = Cli::try_parse_from([
            "leaktrace",
            "-p",
            "42",
            "-i",
            "0.5",
            "--top",
            "3",
            "--duration",
            "9",
            "--format",
            "json",
        ])
        .unwrap();
        assert_eq!(
            (
                cli.pid.clone(),
                cli.interval,
                cli.top,
                cli.duration,
                cli.format
            ),
            (vec![42], 0.5, Some(3), Some(9.0), Format::Json)
        );
        assert_eq!((cli.unwind, cli.stack_copy_bytes), (Unwind::Auto, 8192));
        let cli = Cli::try_parse_from([
            "leaktrace",
            "-p",
            "42",
            "--unwind",
            "dwarf",
            "--stack-copy-bytes",
            "16384",
        ])
        .unwrap();
        assert_eq!((cli.unwind, cli.stack_copy_bytes), (Unwind::Dwarf, 16384));
    }

    #[test]
    fn spawn_mode_and_diff_are_told_apart_from_a_trace() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
        let spawn =
            Cli::try_parse_from(["leaktrace", "-i", "1", "--", "ls", "-l", "--", "x"]).unwrap();
        assert_eq!(spawn.command, ["ls", "-l", "--", "x"]);
        assert!(spawn.pid.is_empty());
        let diff =
            Cli::try_parse_from(["leaktrace", "diff", "a.json", "b.json", "-f", "json"]).unwrap();
        let Some(Command::Diff(args)) = diff.subcommand else {
            panic!("{diff:?}")
        };
        assert_eq!(
            (args.old, args.new, args.format),
            ("a.json".into(), "b.json".into(), DiffFormat::Json)
        );
        // A command named diff runs after `--`.
        let cmd = Cli::try_parse_from(["leaktrace", "--", "diff", "a", "b"]).unwrap();
        assert!(cmd.subcommand.is_none());
        assert_eq!(cmd.command, ["diff", "a", "b"]);
        for bad in [
            &["leaktrace", "-p", "1", "--", "ls"][..],
            &["leaktrace", "-p", "1", "diff", "a", "b"],
            &["leaktrace", "diff", "a"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(size_bytes("0"), Ok(0));
        assert_eq!(size_bytes("4096"), Ok(4096));
        assert_eq!(size_bytes("64k"), Ok(65536));
        assert_eq!(size_bytes("2G"), Ok(2 << 30));
        for bad in [
            "",
            "K",
            "-1",
            "1.5M",
            "4X",
            "99999999999999999999",
            "17179869184G",
        ] {
            assert!(size_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sample_bytes_are_a_size_from_one_byte_to_1g() {
        let parse = |v: &str| Cli::try_parse_from(["leaktrace", "-p", "1", "--sample-bytes", v]);
        assert_eq!(parse("512K").unwrap().sample_bytes, Some(512 << 10));
        assert_eq!(parse("1").unwrap().sample_bytes, Some(1));
        assert_eq!(parse("1G").unwrap().sample_bytes, Some(1 << 30));
        for bad in ["0", "2G", "1.5M", "x"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Cli::try_parse_from(["leaktrace", "-p", "1"])
                .unwrap()
                .sample_bytes,
            None
        );
    }

    #[test]
    fn max_depth_defaults_to_the_kernel_limit() {
        let cli = Cli::try_parse_from(["leaktrace", "-p", "1"]).unwrap();
        assert_eq!(cli.max_depth, 127);
        for n in ["1", "127"] {
            let cli = Cli::try_parse_from(["leaktrace", "-p", "1", "--max-depth", n]).unwrap();
            assert_eq!(cli.max_depth.to_string(), n);
        }
    }

    #[test]
    fn max_overhead_is_a_percentage_of_cpu_time() {
        let parse =
            |v: &str| Cli::try_parse_from(["leaktrace", "-p", "1", &format!("--max-overhead={v}")]);
        assert_eq!(
            Cli::try_parse_from(["leaktrace", "-p", "1"])
                .unwrap()
                .max_overhead,
            None,
            "off by default"
        );
        for (value, percent) in [("0.5", 0.5), ("5", 5.0), ("20%", 20.0), ("99.9", 99.9)] {
            assert_eq!(parse(value).unwrap().max_overhead, Some(percent), "{value}");
        }
        for bad in ["0", "-1", "100", "150", "nan", "inf", "five", "", "5%%"] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(
                err.contains("is not a percentage of CPU time above 0 and below 100"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn pid_may_be_given_more_than_once() {
        let cli =
            Cli::try_parse_from(["leaktrace", "-p", "1", "--pid", "2", "--follow-forks"]).unwrap();
        assert_eq!(cli.pid, [1, 2]);
        assert!(cli.follow_forks);
    }

    #[test]
    fn rejects_bad_values() {
        for args in [
            &["leaktrace"][..],
            &["leaktrace", "-p", "x"],
            &["leaktrace", "-p", "1", "-i", "0"],
            &["leaktrace", "-p", "1", "-i", "1e-9"],
            &["leaktrace", "-p", "1", "-i", "0.099"],
            &["leaktrace", "-p", "1", "--top", "0"],
            &["leaktrace", "diff", "a", "b", "--top", "0"],
            &["leaktrace", "-p", "1", "-i", "nan"],
            &["leaktrace", "-p", "1", "--ringbuf-bytes", "5000"],
            &["leaktrace", "-p", "1", "--window", "1"],
            &["leaktrace", "-p", "1", "--count", "0"],
            &["leaktrace", "-p", "1", "--sort", "age"],
            &["leaktrace", "-p", "1", "--max-depth", "0"],
            &["leaktrace", "-p", "1", "--max-depth", "128"],
            &["leaktrace", "-p", "1", "--unwind", "lbr"],
            &["leaktrace", "-p", "1", "--stack-copy-bytes", "5000"],
            &["leaktrace", "-p", "1", "--stack-copy-bytes", "65536"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn argument_errors_are_one_line_that_says_where_to_look() {
        for (args, want) in [
            (
                &["leaktrace", "-p", "x"][..],
                "invalid value 'x' for '--pid <PID>': invalid digit found in string (see `leaktrace --help`)",
            ),
            (
                &["leaktrace", "-p", "1", "-i", "1e-9"],
                "invalid value '1e-9' for '--interval <SECS>': `1e-9` is shorter than the shortest interval, 0.1 s (see `leaktrace --help`)",
            ),
            (
                &["leaktrace", "-p", "1", "--top", "0"],
                "invalid value '0' for '--top <N>': `0` is not a number of at least 1 (see `leaktrace --help`)",
            ),
            (
                &["leaktrace", "-p", "1", "--bogus"],
                "unexpected argument '--bogus' found (see `leaktrace --help`)",
            ),
        ] {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(one_line(&err), want, "{args:?}");
        }
        assert!(
            Cli::try_parse_from(["leaktrace", "-p", "1", "-i", "0.1"]).is_ok(),
            "the shortest interval itself"
        );
        // --help is not an error.
        assert!(
            !Cli::try_parse_from(["leaktrace", "--help"])
                .unwrap_err()
                .use_stderr()
        );
    }
}
