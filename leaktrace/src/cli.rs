//! Command-line interface.

use std::path::PathBuf;

use clap::Parser;

use crate::render::Format;

/// Outstanding memory allocations of a running process, by call stack: find memory leaks
/// in production without restarting anything.
#[derive(Debug, Parser)]
#[command(name = "leaktrace", version, about, long_about = None)]
pub struct Cli {
    /// The process to trace; repeat it to trace several (each is reported separately).
    #[arg(short, long, required = true)]
    pub pid: Vec<u32>,

    /// Also trace the children that traced processes fork, while they run the same program
    /// (each reported separately, by pid).
    #[arg(long)]
    pub follow_forks: bool,

    /// Seconds between reports.
    #[arg(short, long, value_name = "SECS", default_value = "5", value_parser = positive_secs)]
    pub interval: f64,

    /// Stop after this many seconds (default: until Ctrl-C, SIGTERM or the target exits).
    #[arg(short, long, value_name = "SECS", value_parser = positive_secs)]
    pub duration: Option<f64>,

    /// Count only allocations at least this old: hides blocks that are merely in flight.
    #[arg(long, value_name = "SECS", value_parser = positive_secs)]
    pub min_age: Option<f64>,

    /// List the stacks that hold mappings of files too. They are never added to the heap
    /// numbers; without this flag, only their total is shown.
    #[arg(long)]
    pub file_mappings: bool,

    /// Stacks shown per report, biggest first.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub top: usize,

    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Write reports to this file instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Reports over which growth is measured and leaks are told from stable usage.
    #[arg(long, value_name = "REPORTS", default_value_t = 10, value_parser = clap::value_parser!(u16).range(2..))]
    pub window: u16,

    /// Frames kept per stack, innermost first (1 to 127, the kernel's limit); a deeper stack is
    /// cut and marked truncated.
    #[arg(long, value_name = "N", default_value_t = leaktrace_common::DEFAULT_STACK_DEPTH, value_parser = clap::value_parser!(u32).range(1..=leaktrace_common::MAX_STACK_DEPTH as i64))]
    pub max_depth: u32,

    /// Size of the BPF ring buffer that carries events (a power of two, in bytes).
    #[arg(long, value_name = "BYTES", default_value_t = leaktrace_common::DEFAULT_RINGBUF_BYTES, value_parser = ringbuf_bytes)]
    pub ringbuf_bytes: u32,

    /// Benchmarks only: attach programs that do nothing at the same probe points, so that
    /// `cargo xtask bench` measures the cost of the traps alone (the floor).
    #[arg(long, hide = true)]
    pub noop_programs: bool,

    /// Benchmarks only: probe `free` at its first instruction even when a later one would be
    /// cheaper to trap, to measure what the choice saves.
    #[arg(long, hide = true)]
    pub free_at_entry: bool,

    /// Benchmarks only: print the BPF programs' counters to stderr at exit
    /// (`leaktrace: bpf stats NAME=N ...`).
    #[arg(long, hide = true)]
    pub print_bpf_stats: bool,

    /// Benchmarks only: have the kernel time every BPF program run (two clock reads per run)
    /// and print each program's runs and run time to stderr at exit
    /// (`leaktrace: bpf program NAME runs=N run_time_ns=T`).
    #[arg(long, hide = true)]
    pub print_program_times: bool,
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs < 1e9 => Ok(secs),
        _ => Err(format!("`{s}` is not a positive number of seconds")),
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
            (cli.pid, cli.interval, cli.top, cli.duration, cli.format),
            (vec![42], 0.5, 3, Some(9.0), Format::Json)
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
            &["leaktrace", "-p", "1", "-i", "nan"],
            &["leaktrace", "-p", "1", "--ringbuf-bytes", "5000"],
            &["leaktrace", "-p", "1", "--window", "1"],
            &["leaktrace", "-p", "1", "--max-depth", "0"],
            &["leaktrace", "-p", "1", "--max-depth", "128"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
