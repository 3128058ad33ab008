//! `leaktrace -p PID`: the outstanding allocations of a running process, by call stack.

use std::{fs::File, io, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Parser as _;

use leaktrace::{
    cli::Cli,
    probes, render,
    reporter::{Reporter, SharedWriter},
    target,
    target::Target,
    trace,
    trace::{Session, Stop},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the cause chain joined by ": ".
            eprintln!("leaktrace: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    target::check_privileges()?;
    let targets = cli
        .pid
        .iter()
        .map(|&pid| Target::open(pid))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let out: Box<dyn io::Write + Send> = match &cli.output {
        Some(path) => {
            Box::new(File::create(path).with_context(|| format!("creating {}", path.display()))?)
        }
        None => Box::new(io::stdout()),
    };
    // Each traced process has its own reporter thread; they share the output, a whole report
    // at a time.
    let out = SharedWriter::new(out);
    let (ebpf, maps) = probes::load(cli.ringbuf_bytes, cli.max_depth)?;
    let options = probes::AttachOptions {
        noop_programs: cli.noop_programs,
        free_at_entry: cli.free_at_entry,
        program_stats: cli.print_program_times,
    };
    let mut probes = probes::Probes::new(ebpf, options)?;
    let mut sessions = Vec::new();
    let mut announcements = Vec::new();
    for target in &targets {
        let attached = probes.attach(target)?;
        sessions.push(session(target, cli.format, &out)?);
        announcements.push(format!(
            "leaktrace: tracing pid {} ({}) through {} ({attached} probes); a report every {}s, Ctrl-C to stop",
            target.pid,
            target.command,
            target.allocator.describe(),
            cli.interval
        ));
    }
    let settings = trace::Settings {
        interval: Duration::from_secs_f64(cli.interval),
        duration: cli.duration.map(Duration::from_secs_f64),
        top: cli.top,
        window: usize::from(cli.window),
        min_age: cli.min_age.map_or(Duration::ZERO, Duration::from_secs_f64),
        file_mappings: cli.file_mappings,
        print_bpf_stats: cli.print_bpf_stats,
        follow_forks: cli.follow_forks,
    };
    let mut adopt = |probes: &mut probes::Probes, child: u32| {
        let target = Target::open(child)?;
        let attached = probes.attach(&target)?;
        let session = session(&target, cli.format, &out)?;
        eprintln!(
            "leaktrace: following a fork: tracing pid {child} ({}) ({attached} probes)",
            target.command
        );
        Ok(session)
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    // Said once the signal handlers are in place: Ctrl-C from then on ends with a report.
    let started = || {
        for line in &announcements {
            eprintln!("{line}");
        }
    };
    let stop = runtime.block_on(trace::run(
        &settings, probes, maps, sessions, &mut adopt, started,
    ))?;
    let pids = cli
        .pid
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    match stop {
        Stop::TargetExited => eprintln!("leaktrace: process {pids} exited; probes detached"),
        Stop::Interrupted | Stop::Terminated | Stop::Duration => {
            eprintln!("leaktrace: detached from pid {pids}");
        }
    }
    Ok(())
}

/// A reporter for one traced process, started before the user (or a test) is told that
/// tracing runs, with the memory map read at attach: a target that exits at once still gets
/// its stacks symbolized.
fn session(target: &Target, format: render::Format, out: &SharedWriter) -> anyhow::Result<Session> {
    let rendered_target = render::Target {
        pid: target.pid,
        command: target.command.clone(),
        allocator: target.allocator.name().to_owned(),
        allocator_module: target.allocator.module().to_owned(),
    };
    let reporter = Reporter::spawn(
        rendered_target,
        target.maps.clone(),
        format,
        Box::new(out.clone()),
    )
    .context("starting the reporter thread")?;
    Ok(Session {
        pid: target.pid,
        reporter,
    })
}
