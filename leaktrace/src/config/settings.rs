//! What each stage gets from the command line, typed, built once the rules passed: loading
//! the BPF programs, attaching them, the event loop's trace, and the reports.

use std::{path::PathBuf, time::Duration};

use super::cli::{Cli, Command};
use crate::{
    attach::probes::{AttachOptions, LoadOptions, RowWrites, StackCapture},
    intake::event_loop,
    metrics::ListenAddr,
    model::heap::Sampling,
    report::{diff::DiffFormat, output::Destination, render::Format, snapshot::Selection},
};

/// What leaktrace was asked to do.
pub enum Config {
    Trace(Box<Trace>),
    Diff(Diff),
}

/// `leaktrace -p PID...` or `leaktrace -- CMD ARGS...`.
pub struct Trace {
    pub targets: Targets,
    pub load: LoadOptions,
    pub attach: AttachOptions,
    pub trace: event_loop::Settings,
    pub report: Reports,
}

/// The processes to trace.
pub enum Targets {
    Pids(Vec<u32>),
    /// A command to run, traced from its first allocation.
    Command(Vec<String>),
}

/// Where reports go and what they decide.
pub struct Reports {
    pub format: Format,
    pub destination: Destination,
    /// Exit with `EXIT_LEAK` when a stack of the final report is a leak.
    pub fail_on_leak: bool,
    /// `--metrics`: also served to Prometheus there.
    pub metrics: Option<ListenAddr>,
}

/// `leaktrace diff OLD NEW`.
pub struct Diff {
    pub old: PathBuf,
    pub new: PathBuf,
    pub format: DiffFormat,
    pub top: usize,
}

impl Config {
    /// The command line, checked against the rules between flags (`rules`).
    pub fn new(cli: Cli) -> anyhow::Result<Self> {
        if let Some(Command::Diff(args)) = cli.subcommand {
            return Ok(Self::Diff(Diff {
                old: args.old,
                new: args.new,
                format: args.format,
                top: args.top,
            }));
        }
        super::rules::check(&cli)?;
        Ok(Self::Trace(Box::new(Trace::new(cli))))
    }
}

impl Trace {
    fn new(cli: Cli) -> Self {
        let targets = if cli.command.is_empty() {
            Targets::Pids(cli.pid)
        } else {
            Targets::Command(cli.command)
        };
        let top = match cli.top {
            Some(top) => top,
            None if cli.format.is_whole_file() => usize::MAX,
            None => 10,
        };
        Self {
            targets,
            load: LoadOptions {
                ringbuf_bytes: cli.ringbuf_bytes,
                capture: StackCapture {
                    mode: cli.unwind,
                    stack_copy_bytes: cli.stack_copy_bytes,
                    max_depth: cli.max_depth,
                },
                sample_bytes: cli.sample_bytes.unwrap_or(0),
                rows: RowWrites {
                    batched: !cli.rows_one_at_a_time,
                    print: cli.print_row_writes,
                },
            },
            attach: AttachOptions {
                noop_programs: cli.noop_programs || cli.noop_entries_only,
                entries_only: cli.noop_entries_only,
                at_entry: cli.probes_at_entry,
                one_at_a_time: cli.probes_one_at_a_time,
                sessions: cli.sample_bytes.is_some() && !cli.probes_without_sessions,
                // The guard's estimate starts from the kernel's run-time statistics.
                program_stats: cli.print_program_times || cli.max_overhead.is_some(),
            },
            trace: event_loop::Settings {
                interval: Duration::from_secs_f64(cli.interval),
                duration: cli.duration.map(Duration::from_secs_f64),
                window: usize::from(cli.window),
                selection: Selection {
                    min_age_ns: cli
                        .min_age
                        .map_or(0, |s| Duration::from_secs_f64(s).as_nanos() as u64),
                    sizes: cli.min_size.unwrap_or(0)..=cli.max_size.unwrap_or(u64::MAX),
                    top,
                    watch_top: match (cli.metrics, cli.metrics_top) {
                        (None, _) => 0,
                        (Some(_), Some(top)) => usize::from(top),
                        (Some(_), None) => crate::metrics::DEFAULT_TOP,
                    },
                    sort: cli.sort,
                    with_freed: cli.format == Format::Pprof,
                    file_mappings: cli.file_mappings,
                    pymalloc_arenas: cli.pymalloc_arenas,
                },
                count: cli.count,
                print_bpf_stats: cli.print_bpf_stats,
                print_program_times: cli.print_program_times,
                max_overhead_percent: cli.max_overhead,
                follow_forks: cli.follow_forks,
                unwind: cli.unwind,
                max_depth: cli.max_depth,
                sampling: cli.sample_bytes.map(Sampling::new),
            },
            report: Reports {
                format: cli.format,
                destination: Destination::new(
                    cli.output.as_deref(),
                    cli.keep.map(|k| usize::try_from(k).unwrap_or(usize::MAX)),
                ),
                fail_on_leak: cli.fail_on_leak,
                metrics: cli.metrics,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::{attach::probes::Unwind, report::snapshot::SortKey};

    fn trace(args: &[&str]) -> Trace {
        let cli = Cli::try_parse_from(["leaktrace"].iter().chain(args)).unwrap();
        match Config::new(cli).unwrap() {
            Config::Trace(trace) => *trace,
            Config::Diff(_) => panic!("{args:?} is a trace"),
        }
    }

    #[test]
    fn each_stage_gets_its_settings() {
        let t = trace(&[
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
        ]);
        assert!(matches!(t.targets, Targets::Pids(ref p) if p == &[42]));
        assert_eq!(t.trace.interval, Duration::from_millis(500));
        assert_eq!(t.trace.duration, Some(Duration::from_secs(9)));
        assert_eq!(t.trace.selection.top, 3);
        assert_eq!(t.report.format, Format::Json);
        assert_eq!(t.report.destination, Destination::Stdout);
        assert_eq!(
            (t.load.capture.mode, t.load.capture.stack_copy_bytes),
            (Unwind::Auto, 8192)
        );
        assert_eq!(t.trace.unwind, Unwind::Auto);
        assert_eq!((t.load.sample_bytes, t.trace.sampling), (0, None));
        assert_eq!(t.trace.max_overhead_percent, None);
        assert!(
            !t.attach.program_stats,
            "no clock reads per run unless asked"
        );
        let t = trace(&[
            "-p",
            "1",
            "--count",
            "4",
            "--sort",
            "growth",
            "--min-size",
            "4K",
            "--max-size",
            "1MiB",
            "--fail-on-leak",
            "--unwind",
            "dwarf",
            "--sample-bytes",
            "512K",
        ]);
        assert_eq!(t.trace.count, Some(4));
        assert_eq!(t.trace.selection.sort, SortKey::Growth);
        assert_eq!(t.trace.selection.sizes, 4096..=1 << 20);
        assert!(t.report.fail_on_leak);
        assert_eq!(
            (t.load.capture.mode, t.trace.unwind),
            (Unwind::Dwarf, Unwind::Dwarf)
        );
        assert_eq!(t.load.sample_bytes, 512 << 10);
        assert_eq!(t.trace.sampling, Some(Sampling::new(512 << 10)));
        let t = trace(&["-p", "1", "--max-overhead", "2.5"]);
        assert_eq!(t.trace.max_overhead_percent, Some(2.5));
        assert!(
            t.attach.program_stats,
            "the guard reads the programs' run times"
        );
        assert!(
            !t.trace.print_program_times,
            "and prints them only when asked"
        );
    }

    #[test]
    fn top_defaults_to_every_stack_for_whole_file_formats() {
        assert_eq!(trace(&["-p", "1"]).trace.selection.top, 10);
        for format in ["folded", "pprof", "svg"] {
            assert_eq!(
                trace(&["-p", "1", "-f", format]).trace.selection.top,
                usize::MAX
            );
        }
        assert!(
            trace(&["-p", "1", "-f", "pprof"])
                .trace
                .selection
                .with_freed
        );
        assert!(!trace(&["-p", "1", "-f", "svg"]).trace.selection.with_freed);
    }

    #[test]
    fn a_command_is_traced_and_diff_is_its_own_config() {
        let t = trace(&["-i", "1", "--", "ls", "-l"]);
        assert!(matches!(t.targets, Targets::Command(ref c) if c == &["ls", "-l"]));
        let cli =
            Cli::try_parse_from(["leaktrace", "diff", "a.json", "b.json", "-f", "json"]).unwrap();
        let Config::Diff(diff) = Config::new(cli).unwrap() else {
            panic!("a diff")
        };
        assert_eq!(
            (diff.old, diff.new, diff.format, diff.top),
            ("a.json".into(), "b.json".into(), DiffFormat::Json, 20)
        );
    }

    #[test]
    fn metrics_are_served_at_an_address_with_a_bounded_top() {
        let t = trace(&["-p", "1", "--metrics", ":9464"]);
        assert_eq!(t.report.metrics, Some(ListenAddr::EveryInterface(9464)));
        assert_eq!(t.trace.selection.watch_top, 20);
        let t = trace(&[
            "-p",
            "1",
            "--metrics",
            "127.0.0.1:9464",
            "--metrics-top",
            "5",
        ]);
        assert_eq!(t.trace.selection.watch_top, 5);
        let t = trace(&["-p", "1"]);
        assert_eq!((t.report.metrics, t.trace.selection.watch_top), (None, 0));
        for bad in [
            &["--metrics", "9464"][..],
            &["--metrics", "localhost:9464"],
            &["--metrics"],
            &["--metrics", ":1", "--metrics-top", "1001"],
            &["--metrics", ":1", "--metrics-top", "-1"],
        ] {
            let args = ["leaktrace", "-p", "1"].iter().chain(bad);
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
        let err = Cli::try_parse_from(["leaktrace", "-p", "1", "--metrics", "9464"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`9464` is not an address to listen on: give IP:PORT"),
            "{err}"
        );
    }

    #[test]
    fn a_broken_rule_is_an_error() {
        let cli =
            Cli::try_parse_from(["leaktrace", "-p", "1", "--min-size", "9", "--max-size", "8"])
                .unwrap();
        assert!(Config::new(cli).is_err());
    }
}
