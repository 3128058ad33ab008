//! `cargo xtask bench-watch`: leaktrace's own memory over a long watch.
//!
//! A service that does not leak (`tests/fixtures/watch_churn.c`: steady malloc/free churn, a
//! flat cache, and a stream of new call stacks that each end up holding nothing) is traced with
//! `--metrics`, scraped every second as Prometheus would, for as long as asked. Every sample
//! period the table shows leaktrace's resident set (VmRSS) and peak (VmHWM), the scrapes
//! answered, and what the last scrape said (stacks holding memory, lost events): memory must
//! reach a plateau, not grow with the hours.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{Child, fixture, leaktrace_binary, require_root, run, setup, step, workspace};

#[derive(clap::Args)]
pub struct Args {
    /// How long to watch.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Seconds between rows of the table.
    #[arg(long, default_value_t = 60)]
    sample_secs: u64,
    /// malloc/free pairs the service makes per millisecond.
    #[arg(long, default_value_t = 10)]
    pairs: u32,
    /// leaktrace's report interval, seconds.
    #[arg(long, default_value = "5")]
    interval: String,
    /// Trace with this leaktrace binary instead of building the workspace's (to compare
    /// builds side by side).
    #[arg(long)]
    leaktrace: Option<PathBuf>,
}

pub fn bench_watch(args: &Args) -> anyhow::Result<()> {
    setup()?;
    require_root("bench-watch")?;
    let root = workspace();
    let leaktrace = leaktrace_binary(args.leaktrace.as_deref())?;
    let dir = root.join("target/bench-watch");
    std::fs::create_dir_all(&dir)?;
    let service = dir.join(format!("watch-churn-{}", std::process::id()));
    run(Command::new("gcc")
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&service)
        .arg(fixture("watch_churn.c")))?;

    let mut fixture = Child(
        Command::new(&service)
            .arg(args.pairs.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the churn service")?,
    );
    let mut ready = String::new();
    BufReader::new(fixture.0.stdout.take().unwrap()).read_line(&mut ready)?;
    let pid = fixture.0.id().to_string();
    let mut tracer = Child(
        Command::new(&leaktrace)
            .args(["-p", &pid, "--interval", &args.interval, "--format", "json"])
            .args(["-o", "/dev/null", "--metrics", "127.0.0.1:0"])
            .stderr(Stdio::piped())
            .spawn()
            .context("starting leaktrace")?,
    );
    let address = metrics_address(&mut tracer)?;
    step(&format!(
        "tracing the churn service (pid {pid}, {} pairs/ms) with {} for {} minutes, scraping {address} every second",
        args.pairs,
        leaktrace.display(),
        args.minutes
    ));
    println!(
        "minutes  leaktrace_rss_MiB  leaktrace_hwm_MiB  service_rss_MiB  scrapes  failed  stacks  lost"
    );
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.minutes * 60.0);
    let mut next_row = start;
    let (mut scrapes, mut failed) = (0u64, 0u64);
    let mut last = String::new();
    while Instant::now() < end {
        match scrape(&address) {
            Ok(body) => {
                scrapes += 1;
                last = body;
            }
            Err(_) => failed += 1,
        }
        if Instant::now() >= next_row {
            next_row += Duration::from_secs(args.sample_secs);
            let tracer_pid = tracer.0.id();
            println!(
                "{:7.1}  {:17.1}  {:17.1}  {:15.1}  {scrapes:7}  {failed:6}  {:>6}  {:>4}",
                start.elapsed().as_secs_f64() / 60.0,
                status_kib(tracer_pid, "VmRSS:")? as f64 / 1024.0,
                status_kib(tracer_pid, "VmHWM:")? as f64 / 1024.0,
                status_kib(fixture.0.id(), "VmRSS:")? as f64 / 1024.0,
                value_of(&last, "leaktrace_stacks{"),
                value_of(&last, "leaktrace_lost_events_total{"),
            );
            std::io::stdout().flush()?;
        }
        if let Some(status) = tracer.0.try_wait()? {
            bail!("leaktrace ended early ({status})");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    // SAFETY: signals our own child.
    unsafe { libc::kill(tracer.0.id() as libc::pid_t, libc::SIGINT) };
    let status = tracer.0.wait()?;
    drop(fixture);
    let _ = std::fs::remove_file(&service);
    if !status.success() {
        bail!("leaktrace failed ({status})");
    }
    Ok(())
}

/// The address leaktrace says it serves metrics at.
fn metrics_address(tracer: &mut Child) -> anyhow::Result<String> {
    let stderr = tracer.0.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let address = loop {
        let line = lines
            .next()
            .context("leaktrace ended before serving metrics")??;
        if let Some(url) = line.strip_prefix("leaktrace: serving metrics at http://") {
            break url.trim_end_matches("/metrics").to_owned();
        }
    };
    // Keep reading (and discarding) its stderr so that it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok(address)
}

fn scrape(address: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if !response.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other("not 200"));
    }
    Ok(response)
}

/// A value of `/proc/PID/status`, in KiB.
pub(crate) fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// The value of the first series whose line starts with `prefix`.
fn value_of<'a>(exposition: &'a str, prefix: &str) -> &'a str {
    exposition
        .lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .unwrap_or("-")
}
