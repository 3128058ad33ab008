//! `cargo xtask bench-unwind`: what unwinding with call-frame information costs the traced
//! process, next to frame pointers, and how fast leaktrace unwinds.
//!
//! A fixture (`tests/fixtures/malloc_free_loop.c`, -O2 with frame pointers, 8 calls deep) times
//! its own malloc/free pairs. Each run measures every configuration once, one after the other
//! (untraced, `--unwind fp`, `--unwind dwarf` at each stack copy size, `--unwind auto`), so that
//! the noise of a shared machine hits them alike; the table gives the median over the runs of
//! ns per pair, the cost added by tracing, and that cost relative to frame pointers.

use std::{
    io::Write as _,
    path::Path,
    process::{ChildStdin, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    Child,
    bench::{lines_of, until_attached},
    leaktrace_binary, require_root, run, setup, step, workspace,
};

/// One way of running the fixture.
struct Config {
    name: String,
    /// leaktrace's arguments; `None` runs the fixture untraced.
    args: Option<Vec<String>>,
    /// The fixture built without frame pointers.
    no_frame_pointers: bool,
}

#[derive(Default)]
struct Samples {
    ns_per_pair: Vec<f64>,
    stacks_per_s: Vec<f64>,
    lost: Vec<u64>,
}

fn configs() -> Vec<Config> {
    let traced = |name: &str, args: &[&str], no_frame_pointers| Config {
        name: name.to_owned(),
        args: Some(args.iter().map(|&a| a.to_owned()).collect()),
        no_frame_pointers,
    };
    let mut configs = vec![
        Config {
            name: "untraced".into(),
            args: None,
            no_frame_pointers: false,
        },
        traced("fp", &["--unwind", "fp"], false),
    ];
    for bytes in ["4096", "8192", "16384", "32768"] {
        configs.push(traced(
            &format!("dwarf {bytes}"),
            &["--unwind", "dwarf", "--stack-copy-bytes", bytes],
            false,
        ));
    }
    configs.push(traced(
        "auto (fixture with fp)",
        &["--unwind", "auto"],
        false,
    ));
    configs.push(traced(
        "auto (fixture without fp)",
        &["--unwind", "auto"],
        true,
    ));
    configs
}

pub fn bench_unwind(pairs: u64, runs: usize) -> anyhow::Result<()> {
    setup()?;
    require_root("bench-unwind")?;
    let leaktrace = leaktrace_binary(None)?;
    let root = workspace();
    let dir = root.join("target/bench-unwind");
    std::fs::create_dir_all(&dir)?;
    let source = crate::fixture("malloc_free_loop.c");
    let with_fp = dir.join("malloc_free_loop");
    let without_fp = dir.join("malloc_free_loop_nofp");
    for (binary, flag) in [
        (&with_fp, "-fno-omit-frame-pointer"),
        (&without_fp, "-fomit-frame-pointer"),
    ] {
        run(Command::new("gcc")
            .args(["-O2", "-g", flag, "-o"])
            .arg(binary)
            .arg(&source))?;
    }
    let configs = configs();
    let mut samples: Vec<Samples> = configs.iter().map(|_| Samples::default()).collect();
    for run in 1..=runs {
        step(&format!(
            "run {run}/{runs}: {pairs} malloc/free pairs per configuration"
        ));
        for (config, samples) in configs.iter().zip(&mut samples) {
            let binary = if config.no_frame_pointers {
                &without_fp
            } else {
                &with_fp
            };
            measure(&leaktrace, binary, pairs, config, samples, &dir)
                .with_context(|| format!("measuring {}", config.name))?;
        }
    }
    print_table(&configs, &samples, runs);
    Ok(())
}

fn measure(
    leaktrace: &Path,
    binary: &Path,
    pairs: u64,
    config: &Config,
    samples: &mut Samples,
    dir: &Path,
) -> anyhow::Result<()> {
    let mut fixture = Child(
        Command::new(binary)
            .arg(pairs.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the fixture")?,
    );
    let mut stdin = fixture.0.stdin.take().context("fixture stdin")?;
    let out = lines_of(fixture.0.stdout.take().context("fixture stdout")?);
    expect(&out, "ready")?;
    let report = dir.join("report.json");
    let mut tracer = None;
    let mut tracer_err = None;
    if let Some(args) = &config.args {
        let mut child = Child(
            Command::new(leaktrace)
                .args(["-p", &fixture.0.id().to_string(), "--format", "json", "-o"])
                .arg(&report)
                .args(["--interval", "1000"])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting leaktrace")?,
        );
        let err = lines_of(child.0.stderr.take().context("leaktrace stderr")?);
        until_attached(&err)?;
        tracer = Some(child);
        tracer_err = Some(err);
    }
    // The first round warms caches and faults pages in; the second is measured.
    round(&mut stdin, &out)?;
    let ns = round(&mut stdin, &out)?;
    samples.ns_per_pair.push(ns);
    if let (Some(mut child), Some(err)) = (tracer, tracer_err) {
        // SAFETY: signals our own child.
        unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGINT) };
        let status = child.0.wait()?;
        if !status.success() {
            bail!("leaktrace failed ({status})");
        }
        while let Ok(line) = err.recv_timeout(Duration::from_millis(500)) {
            if let Some(rate) = line
                .rsplit_once('(')
                .and_then(|(_, tail)| tail.strip_suffix(" stacks/s)"))
                .and_then(|n| n.parse::<f64>().ok())
            {
                samples.stacks_per_s.push(rate);
            }
        }
        let text = std::fs::read_to_string(&report)?;
        let lost = text
            .lines()
            .last()
            .and_then(|l| l.split("\"lost_events\":").nth(1))
            .and_then(|tail| tail.split([',', '}']).next())
            .and_then(|n| n.trim().parse().ok())
            .context("no lost_events in the report")?;
        samples.lost.push(lost);
    }
    drop(stdin);
    Ok(())
}

fn expect(out: &mpsc::Receiver<String>, want: &str) -> anyhow::Result<String> {
    let line = out
        .recv_timeout(Duration::from_secs(120))
        .with_context(|| format!("the fixture never printed {want:?}"))?;
    if !line.starts_with(want) {
        bail!("the fixture printed {line:?}, not {want:?}");
    }
    Ok(line)
}

fn round(stdin: &mut ChildStdin, out: &mpsc::Receiver<String>) -> anyhow::Result<f64> {
    stdin.write_all(b"go\n")?;
    stdin.flush()?;
    let line = expect(out, "ns_per_pair ")?;
    expect(out, "done")?;
    line["ns_per_pair ".len()..]
        .parse()
        .context("ns_per_pair is not a number")
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn print_table(configs: &[Config], samples: &[Samples], runs: usize) {
    let base = median(&samples[0].ns_per_pair);
    let fp_added = median(&samples[1].ns_per_pair) - base;
    println!();
    println!(
        "{:<28} {:>12} {:>12} {:>9} {:>14} {:>6}   ns/pair of each run",
        "configuration", "ns/pair", "added ns", "x fp", "unwound/s", "lost"
    );
    for (config, s) in configs.iter().zip(samples) {
        let ns = median(&s.ns_per_pair);
        let added = ns - base;
        let runs_text: Vec<String> = s.ns_per_pair.iter().map(|v| format!("{v:.0}")).collect();
        let rate = if s.stacks_per_s.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.0}", median(&s.stacks_per_s))
        };
        println!(
            "{:<28} {:>12.0} {:>12} {:>9} {:>14} {:>6}   {}",
            config.name,
            ns,
            if config.args.is_some() {
                format!("{added:.0}")
            } else {
                "-".into()
            },
            if config.args.is_some() {
                format!("{:.2}", added / fp_added)
            } else {
                "-".into()
            },
            rate,
            s.lost.iter().sum::<u64>(),
            runs_text.join(" ")
        );
    }
    println!(
        "\nmedians over {runs} runs; added = ns/pair - untraced; x fp = added / added by --unwind fp; \
         unwound/s = stack copies unwound per second of leaktrace's unwinding time"
    );
}
