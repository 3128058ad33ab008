//! `leaktrace -p PID`: the outstanding allocations of a running process, by call stack.

use std::{io, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use clap::Parser as _;

use leaktrace::{
    attach::{
        allocator::{self, Allocator},
        probes, spawn,
    },
    config::cli::{Cli, Command, DiffArgs, Unwind},
    intake::{
        event_loop,
        event_loop::{Session, Stop},
    },
    model::heap::Sampling,
    proc::process,
    report::{
        diff,
        output::{Destination, Output},
        render,
        reporter::Reporter,
    },
    target::{Target, modules::Modules},
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
    let old = diff::Side::load(&args.old)?;
    let new = diff::Side::load(&args.new)?;
    let out = diff::render(&old, &new, args.format, args.top);
    match io::Write::write_all(&mut io::stdout(), out.as_bytes()) {
        // A reader that went away (`| head`) is not an error.
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing the diff"),
    }
}

/// Traces; returns whether a final report holds a leak.
fn run(cli: &Cli) -> anyhow::Result<bool> {
    let sizes = cli.sizes()?;
    process::check_privileges()?;
    raise_open_files_limit();
    let modules = Modules::new();
    // Spawn mode forks here, before any thread exists: the child waits before exec until the
    // probes are attached.
    let mut child = None;
    let mut targets = Vec::new();
    if cli.command.is_empty() {
        for &pid in &cli.pid {
            let target = Target::open(pid, &modules)?;
            let allocator = allocator::of_target(&target)?;
            targets.push((target, allocator));
        }
    } else {
        let program = spawn::find_program(&cli.command[0])?;
        let libraries = spawn::libraries(&program)?;
        let forked = spawn::Child::fork(&program, &cli.command)?;
        let allocator = allocator::discover_files(forked.pid, &program, &libraries)
            .with_context(|| format!("finding the allocator of {}", program.display()))?;
        targets.push((
            Target::spawned(forked.pid, &cli.command, &modules),
            allocator,
        ));
        child = Some(forked);
    }
    let pids: Vec<u32> = targets.iter().map(|(t, _)| t.pid).collect();
    let first_command = targets[0].0.command.clone();
    let destination = Destination::new(
        cli.output.as_deref(),
        cli.keep.map(|k| usize::try_from(k).unwrap_or(usize::MAX)),
    )?;
    if (targets.len() > 1 || cli.follow_forks)
        && cli.format.is_whole_file()
        && matches!(destination, Destination::File(_))
    {
        bail!(
            "one {} file cannot hold the reports of several processes: write them to a directory (-o DIR/)",
            cli.format.extension()
        );
    }
    let style = destination.style();
    let output = Output::open(destination, cli.format, pids[0])?;
    let capture = probes::StackCapture {
        mode: cli.unwind.bpf_mode(),
        stack_copy_bytes: cli.stack_copy_bytes,
        max_depth: cli.max_depth,
    };
    let (ebpf, mut maps) = probes::load(probes::LoadOptions {
        ringbuf_bytes: cli.ringbuf_bytes,
        capture,
        sample_bytes: cli.sample_bytes.unwrap_or(0),
    })?;
    if cli.unwind == Unwind::Auto {
        // Before attaching: the first allocations already need to know where frame pointers
        // can be trusted. The map holds one address space: the first traced process's.
        maps.fp_code
            .set(&targets[0].0.space.code_with_frame_pointers())
            .context("filling the BPF map of code with frame pointers")?;
    }
    let options = probes::AttachOptions {
        noop_programs: cli.noop_programs,
        free_at_entry: cli.free_at_entry,
        program_stats: cli.print_program_times,
    };
    let mut probes = probes::Probes::new(ebpf, options)?;
    let mut sessions = Vec::new();
    let mut announcements = Vec::new();
    for (target, allocator) in targets {
        let attached = probes.attach(target.pid, &allocator)?;
        announcements.push(format!(
            "leaktrace: tracing pid {} ({}) through {} ({attached} probes); a report every {}s, Ctrl-C to stop",
            target.pid,
            target.command,
            allocator.describe(),
            cli.interval
        ));
        let output = output.for_pid(target.pid);
        sessions.push(session(
            target, &allocator, &modules, cli.format, style, output,
        )?);
    }
    let watcher = match &mut child {
        Some(child) => {
            let maps = sessions[0].target.space.pushed_maps();
            let watcher =
                spawn::MapsWatcher::start(child.pid, maps).context("starting the maps watcher")?;
            child.release()?;
            Some(watcher)
        }
        None => None,
    };
    let settings = event_loop::Settings {
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
        print_bpf_stats: cli.print_bpf_stats,
        follow_forks: cli.follow_forks,
        unwind: cli.unwind,
        max_depth: cli.max_depth,
        sampling: cli.sample_bytes.map(Sampling::new),
    };
    let mut adopt = |probes: &mut probes::Probes, child: u32| {
        let target = Target::open(child, &modules)?;
        let allocator = allocator::of_target(&target)?;
        let attached = probes.attach(child, &allocator)?;
        eprintln!(
            "leaktrace: following a fork: tracing pid {child} ({}) ({attached} probes)",
            target.command
        );
        session(
            target,
            &allocator,
            &modules,
            cli.format,
            style,
            output.for_pid(child),
        )
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
    let ended = runtime.block_on(event_loop::run(
        &settings, probes, maps, sessions, &mut adopt, started,
    ));
    drop(watcher);
    let ended = ended?;
    let pids = pids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    match ended.stop {
        Stop::TargetExited => eprintln!("leaktrace: process {pids} exited; probes detached"),
        Stop::Interrupted | Stop::Terminated | Stop::Duration | Stop::Count => {
            eprintln!("leaktrace: detached from pid {pids}");
        }
    }
    if let Some(mut child) = child {
        // The trace ended first (--duration, --count, a signal): like `timeout`, the command
        // is asked to stop, so that `leaktrace --duration 60 -- ./service` ends.
        if ended.stop != Stop::TargetExited {
            child.signal(libc::SIGTERM);
        }
        let status = child.wait()?;
        eprintln!("leaktrace: `{first_command}` exited with status {status}");
    }
    if ended.leak && cli.fail_on_leak {
        eprintln!("leaktrace: the final report holds a leak: exit status {EXIT_LEAK}");
    }
    Ok(ended.leak)
}

/// A reporter for one traced process, started before the user (or a test) is told that
/// tracing runs: a target that exits at once still gets its report.
fn session(
    target: Target,
    allocator: &Allocator,
    modules: &Arc<Modules>,
    format: render::Format,
    style: render::Style,
    output: Output,
) -> anyhow::Result<Session> {
    let rendered_target = render::Target {
        pid: target.pid,
        command: target.command.clone(),
        allocator: allocator.name().to_owned(),
        allocator_module: allocator.module().to_owned(),
    };
    let reporter = Reporter::spawn(rendered_target, modules.clone(), format, style, output)
        .context("starting the reporter thread")?;
    Ok(Session { target, reporter })
}

/// Each module of the traced processes stays open for the whole trace (see
/// `target::modules`): the soft limit of open files goes up to the hard one.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
