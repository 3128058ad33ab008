//! `leaktrace -p PID`: the outstanding allocations of a running process, by call stack.

use std::{io, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Parser as _;

use leaktrace::{
    cli::{Cli, Command, DiffArgs},
    output::{Destination, Output},
    probes, render,
    reporter::Reporter,
    spawn, target,
    target::Target,
    trace,
    trace::Stop,
};

/// `--fail-on-leak` found a leak.
const EXIT_LEAK: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.subcommand {
        Some(Command::Diff(args)) => diff(args).map(|()| false),
        None => run(&cli),
    };
    match result {
        Ok(leak) if leak && cli.fail_on_leak => ExitCode::from(EXIT_LEAK),
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the cause chain joined by ": ".
            eprintln!("leaktrace: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `leaktrace diff OLD NEW`.
fn diff(args: &DiffArgs) -> anyhow::Result<()> {
    let old = leaktrace::diff::Side::load(&args.old)?;
    let new = leaktrace::diff::Side::load(&args.new)?;
    let out = leaktrace::diff::render(&old, &new, args.format, args.top);
    match io::Write::write_all(&mut io::stdout(), out.as_bytes()) {
        // A reader that went away (`| head`) is not an error.
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing the diff"),
    }
}

/// Traces; returns whether the final report holds a leak.
fn run(cli: &Cli) -> anyhow::Result<bool> {
    let sizes = cli.sizes()?;
    target::check_privileges()?;
    // Spawn mode forks here, before any thread exists: the child waits before exec until the
    // probes are attached.
    let mut child = None;
    let target = match cli.pid {
        Some(pid) => Target::open(pid)?,
        None => {
            let program = spawn::find_program(&cli.command[0])?;
            let libc = spawn::allocator_module(&program)?;
            let forked = spawn::Child::fork(&program, &cli.command)?;
            let target = spawn::target(forked.pid, &cli.command, &libc)?;
            child = Some(forked);
            target
        }
    };
    let destination = Destination::new(
        cli.output.as_deref(),
        cli.keep.map(|k| usize::try_from(k).unwrap_or(usize::MAX)),
    )?;
    let style = render::Style::for_destination(&destination);
    let out = Output::open(destination, cli.format, target.pid)?;
    let (ebpf, maps) = probes::load(cli.ringbuf_bytes, cli.max_depth)?;
    let probes = probes::attach(ebpf, &target)?;
    let rendered_target = render::Target {
        pid: target.pid,
        command: target.command.clone(),
        allocator_module: target.allocator.module.clone(),
    };
    // Started before the user (or a test) is told that tracing runs, with the memory map read
    // at attach: a target that exits at once still gets its stacks symbolized.
    let reporter = Reporter::spawn(rendered_target, target.maps.clone(), cli.format, style, out)
        .context("starting the reporter thread")?;
    let watcher = match &mut child {
        Some(child) => {
            let watcher = spawn::MapsWatcher::start(child.pid, reporter.maps_updater())
                .context("starting the maps watcher")?;
            child.release()?;
            Some(watcher)
        }
        None => None,
    };
    let settings = trace::Settings {
        pid: target.pid,
        interval: Duration::from_secs_f64(cli.interval),
        duration: cli.duration.map(Duration::from_secs_f64),
        top: cli.top(),
        window: usize::from(cli.window),
        min_age: cli.min_age.map_or(Duration::ZERO, Duration::from_secs_f64),
        sizes,
        sort: cli.sort,
        count: cli.count,
        with_freed: cli.format == render::Format::Pprof,
        file_mappings: cli.file_mappings,
        ready_message: format!(
            "leaktrace: tracing pid {} ({}) through {} ({} probes); a report every {}s, Ctrl-C to stop",
            target.pid,
            target.command,
            target.allocator.module,
            probes.attached(),
            cli.interval
        ),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    let ended = runtime.block_on(trace::run(&settings, probes, maps, &reporter))?;
    drop(watcher);
    reporter.finish().context("writing the report")?;
    match ended.stop {
        Stop::TargetExited => {
            eprintln!("leaktrace: process {} exited; probes detached", target.pid)
        }
        Stop::Interrupted | Stop::Terminated | Stop::Duration | Stop::Count => {
            eprintln!("leaktrace: detached from pid {}", target.pid);
        }
    }
    if let Some(mut child) = child {
        // The trace ended first (--duration, --count, a signal): like `timeout`, the command
        // is asked to stop, so that `leaktrace --duration 60 -- ./service` ends.
        if ended.stop != Stop::TargetExited {
            child.signal(libc::SIGTERM);
        }
        let status = child.wait()?;
        eprintln!(
            "leaktrace: `{}` exited with status {status}",
            target.command
        );
    }
    if ended.leak && cli.fail_on_leak {
        eprintln!("leaktrace: the final report holds a leak: exit status {EXIT_LEAK}");
    }
    Ok(ended.leak)
}
