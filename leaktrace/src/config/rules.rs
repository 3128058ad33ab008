//! The rules between flags, all in one place, checked before anything is traced: a command
//! line that breaks one gets one line that says what to do. A rule of one flag's own value
//! belongs to its parser in `cli`.

use anyhow::{bail, ensure};

use super::cli::Cli;
use crate::report::output::names_a_directory;

/// Every rule, in the order the user reads the flags.
pub(super) fn check(cli: &Cli) -> anyhow::Result<()> {
    sizes_in_order(cli)?;
    keep_needs_a_directory(cli)?;
    one_whole_file_holds_one_process(cli)?;
    metrics_top_needs_metrics(cli)?;
    Ok(())
}

fn sizes_in_order(cli: &Cli) -> anyhow::Result<()> {
    if let (Some(min), Some(max)) = (cli.min_size, cli.max_size) {
        ensure!(
            min <= max,
            "--min-size {min} is larger than --max-size {max}: no block could count"
        );
    }
    Ok(())
}

fn keep_needs_a_directory(cli: &Cli) -> anyhow::Result<()> {
    if cli.keep.is_none() {
        return Ok(());
    }
    match &cli.output {
        None => bail!("--keep needs --output DIR: it bounds the files written to a directory"),
        Some(path) if !names_a_directory(path) => bail!(
            "--keep needs --output DIR, and {} is not a directory (end it with / to create one)",
            path.display()
        ),
        Some(_) => Ok(()),
    }
}

fn one_whole_file_holds_one_process(cli: &Cli) -> anyhow::Result<()> {
    let several = cli.pid.len() > 1 || cli.follow_forks;
    let to_one_file = cli.output.as_deref().is_some_and(|p| !names_a_directory(p));
    if several && to_one_file && cli.format.is_whole_file() {
        bail!(
            "one {} file cannot hold the reports of several processes: write them to a directory (-o DIR/)",
            cli.format.extension()
        );
    }
    Ok(())
}

fn metrics_top_needs_metrics(cli: &Cli) -> anyhow::Result<()> {
    ensure!(
        cli.metrics_top.is_none() || cli.metrics.is_some(),
        "--metrics-top needs --metrics ADDR: it bounds the stacks exported there"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn check_args(args: &[&str]) -> Result<(), String> {
        let cli = Cli::try_parse_from(["leaktrace"].iter().chain(args)).unwrap();
        check(&cli).map_err(|e| e.to_string())
    }

    #[test]
    fn each_rule_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().to_str().unwrap();
        let file = format!("{dir}/report.svg");
        assert_eq!(
            check_args(&["-p", "1", "--min-size", "9", "--max-size", "8"]),
            Err("--min-size 9 is larger than --max-size 8: no block could count".into())
        );
        assert_eq!(
            check_args(&["-p", "1", "--keep", "3"]),
            Err("--keep needs --output DIR: it bounds the files written to a directory".into())
        );
        assert_eq!(
            check_args(&["-p", "1", "--keep", "3", "-o", &file]),
            Err(format!(
                "--keep needs --output DIR, and {file} is not a directory (end it with / to create one)"
            ))
        );
        assert_eq!(
            check_args(&["-p", "1", "-p", "2", "-f", "svg", "-o", &file]),
            Err("one svg file cannot hold the reports of several processes: write them to a directory (-o DIR/)".into())
        );
        assert_eq!(
            check_args(&["-p", "1", "--follow-forks", "-f", "pprof", "-o", &file]),
            Err("one pb.gz file cannot hold the reports of several processes: write them to a directory (-o DIR/)".into())
        );
        assert_eq!(
            check_args(&["-p", "1", "--metrics-top", "5"]),
            Err("--metrics-top needs --metrics ADDR: it bounds the stacks exported there".into())
        );
    }

    #[test]
    fn what_the_rules_allow() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().to_str().unwrap();
        let file = format!("{dir}/report.json");
        for args in [
            &["-p", "1"][..],
            &["-p", "1", "--min-size", "8", "--max-size", "8"],
            &["-p", "1", "--keep", "3", "-o", dir],
            &["-p", "1", "--keep", "3", "-o", "/nonexistent/new/"],
            &["-p", "1", "-p", "2", "-f", "json", "-o", &file],
            &["-p", "1", "-p", "2", "-f", "svg", "-o", dir],
            &["-p", "1", "-f", "svg", "-o", &file],
            &["-p", "1", "--metrics", ":9464", "--metrics-top", "0"],
        ] {
            assert_eq!(check_args(args), Ok(()), "{args:?}");
        }
    }
}
