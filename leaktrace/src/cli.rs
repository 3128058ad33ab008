//! Command-line interface.

use std::path::PathBuf;

use clap::Parser;

use crate::render::Format;

/// Outstanding memory allocations of a running process, by call stack: find memory leaks
/// in production without restarting anything.
#[derive(Debug, Parser)]
#[command(name = "leaktrace", version, about, long_about = None)]
pub struct Cli {
    /// The process to trace.
    #[arg(short, long)]
    pub pid: u32,

    /// Seconds between reports.
    #[arg(short, long, value_name = "SECS", default_value = "5", value_parser = positive_secs)]
    pub interval: f64,

    /// Stop after this many seconds (default: until Ctrl-C, SIGTERM or the target exits).
    #[arg(short, long, value_name = "SECS", value_parser = positive_secs)]
    pub duration: Option<f64>,

    /// Count only allocations at least this old: hides blocks that are merely in flight.
    #[arg(long, value_name = "SECS", value_parser = positive_secs)]
    pub min_age: Option<f64>,

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
}

/// `--unwind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Unwind {
    Auto,
    Fp,
    Dwarf,
}

impl Unwind {
    /// The BPF side's `UNWIND_MODE`.
    pub fn bpf_mode(self) -> u32 {
        use leaktrace_common::unwind;
        match self {
            Self::Auto => unwind::AUTO,
            Self::Fp => unwind::FP,
            Self::Dwarf => unwind::DWARF,
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
            (42, 0.5, 3, Some(9.0), Format::Json)
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
    fn rejects_bad_values() {
        for args in [
            &["leaktrace"][..],
            &["leaktrace", "-p", "x"],
            &["leaktrace", "-p", "1", "-i", "0"],
            &["leaktrace", "-p", "1", "-i", "nan"],
            &["leaktrace", "-p", "1", "--ringbuf-bytes", "5000"],
            &["leaktrace", "-p", "1", "--window", "1"],
            &["leaktrace", "-p", "1", "--unwind", "lbr"],
            &["leaktrace", "-p", "1", "--stack-copy-bytes", "5000"],
            &["leaktrace", "-p", "1", "--stack-copy-bytes", "65536"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
