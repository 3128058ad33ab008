//! `leaktrace -p PID`: the outstanding allocations of a running process, by call stack.

use std::{io, process::ExitCode, sync::Arc};

use anyhow::{Context as _, bail};
use clap::Parser as _;

use leaktrace::{
    attach::{
        allocator::{self, Allocator},
        probes::{self, Unwind},
        python, spawn,
    },
    config::{
        cli::Cli,
        settings::{self, Config, Targets},
    },
    guard::{
        self, Guard,
        estimate::{ProbeKind, ProgramTraps},
    },
    intake::{
        event_loop,
        event_loop::{Session, Stop},
    },
    metrics::{self, Exporter},
    proc::process,
    report::{
        diff,
        output::{Failure, Output},
        render,
        reporter::Reporter,
    },
    stacks::python::{PyNames, PyProcess},
    status,
    target::{
        Target,
        modules::{Module, Modules},
    },
};

/// `--fail-on-leak` found a leak.
const EXIT_LEAK: u8 = 3;
/// `--max-overhead` stopped the trace (whatever the final report holds: it is cut short).
const EXIT_OVER_BUDGET: u8 = 4;

/// How a trace that ran ends.
enum Exit {
    Traced,
    Leak,
    OverBudget,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print what they were asked for.
        Err(err) if !err.use_stderr() => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            status!(
                "leaktrace: error: {}",
                leaktrace::config::cli::one_line(&err)
            );
            return ExitCode::FAILURE;
        }
    };
    let result = Config::new(cli).and_then(|config| match config {
        Config::Diff(args) => diff(&args).map(|()| Exit::Traced),
        Config::Trace(trace) => run(&trace),
    });
    match result {
        Ok(Exit::Leak) => ExitCode::from(EXIT_LEAK),
        Ok(Exit::OverBudget) => ExitCode::from(EXIT_OVER_BUDGET),
        Ok(Exit::Traced) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the cause chain joined by ": ".
            status!("leaktrace: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `leaktrace diff OLD NEW`.
fn diff(args: &settings::Diff) -> anyhow::Result<()> {
    let old = diff::Side::load(&args.old)?;
    let new = diff::Side::load(&args.new)?;
    let out = diff::render(&old, &new, args.format, args.top);
    match io::Write::write_all(&mut io::stdout(), out.as_bytes()) {
        // A reader that went away (`| head`) is not an error.
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing the diff"),
    }
}

/// Traces; returns how it ended: whether `--fail-on-leak` found a leak in a final report, or
/// `--max-overhead` stopped it.
fn run(config: &settings::Trace) -> anyhow::Result<Exit> {
    process::check_privileges()?;
    // Before anything is attached (or forked): a port in use is one line and no probe.
    let metrics_listener = config
        .report
        .metrics
        .map(metrics::ListenAddr::bind)
        .transpose()?;
    let exporter = metrics_listener
        .as_ref()
        .map(|_| Arc::new(Exporter::default()));
    raise_open_files_limit();
    let modules = Modules::new();
    // The trace's Python frames, named once for every process and reporter.
    let python_names = Arc::new(PyNames::default());
    let (mut targets, spawned) = open_targets(&config.targets, &modules, &python_names)?;
    let (mut child, to_map) = match spawned {
        Some(Spawned { child, modules }) => (Some(child), modules),
        None => (None, Vec::new()),
    };
    let pids: Vec<u32> = targets.iter().map(|(t, ..)| t.pid).collect();
    let first_command = targets[0].0.command.clone();
    let reports = &config.report;
    let style = reports.destination.style();
    let output = Output::open(reports.destination.clone(), reports.format, pids[0])?;
    let (ebpf, mut maps) = probes::load(config.load)?;
    if config.trace.unwind == Unwind::Auto {
        // Before attaching: the first allocations already need their rows.
        let processes: Vec<_> = targets
            .iter_mut()
            .map(|(target, ..)| (target.pid, target.space.row_sources()))
            .collect();
        maps.unwind_rows
            .update(&processes)
            .and_then(|()| maps.unwind_rows.prepare(&to_map))
            .context("filling the BPF map of unwinding rows")?;
    }
    let mut probes = probes::Probes::new(ebpf, maps.ids.clone(), config.attach)?;
    let mut sessions = Vec::new();
    let mut announcements = Vec::new();
    let mut probe_kinds = Vec::new();
    for (target, python, allocator) in targets {
        // The layout first: the first allocations the probes see already get their frames.
        if let Some(py) = &python {
            probes.set_python(target.pid, &py.interpreter().offsets.walk)?;
        }
        let attached = probes.attach(target.pid, &allocator)?;
        if config.trace.max_overhead_percent.is_some() {
            probe_kinds.extend(guard::probes_of(&attached));
        }
        announcements.push(format!(
            "leaktrace: tracing pid {} ({}) through {} ({}); a report every {}s, Ctrl-C to stop",
            target.pid,
            target.command,
            allocator.describe(),
            attached.describe(),
            config.trace.interval.as_secs_f64()
        ));
        announcements.extend(attached.warnings());
        announcements.extend(allocator.notes.iter().cloned());
        let output = output.for_pid(target.pid);
        sessions.push(session(
            (target, python),
            &allocator,
            (&modules, &python_names),
            reports.format,
            style,
            output,
            exporter.clone(),
        )?);
    }
    let guard = config.trace.max_overhead_percent.map(|budget| {
        let single_stepped = probe_kinds
            .iter()
            .filter(|probe| probe.kind == ProbeKind::SingleStepped)
            .count();
        announcements.push(format!(
            "leaktrace: overhead guard: stopping if the probes take more than {budget}% of the traced CPU time in a second ({single_stepped} of {} probes single-stepped)",
            probe_kinds.len()
        ));
        Guard::new(
            budget,
            ProgramTraps::new(guard::estimate::MEASURED, probe_kinds.iter().copied()),
        )
    });
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
    let mut adopt = |probes: &mut probes::Probes, child: u32| {
        let target = Target::open(child, &modules)?;
        let python = python::of_process(child, target.space.maps(), &python_names);
        let allocator = allocator::of_target(&target)?;
        let attached = probes.attach(child, &allocator)?;
        if let Some(py) = &python {
            probes.set_python(child, &py.interpreter().offsets.walk)?;
        }
        status!(
            "leaktrace: following a fork: tracing pid {child} ({}) ({})",
            target.command,
            attached.describe()
        );
        session(
            (target, python),
            &allocator,
            (&modules, &python_names),
            reports.format,
            style,
            output.for_pid(child),
            exporter.clone(),
        )
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    let mut serving = None;
    if let (Some(listener), Some(exporter)) = (metrics_listener, &exporter) {
        let _runtime = runtime.enter();
        let address = listener.local_addr().context("--metrics")?;
        let listener = tokio::net::TcpListener::from_std(listener).context("serving --metrics")?;
        // On the runtime that drains the ring buffer: scrapes are served between batches of
        // events, and never wait on a client (see metrics::server).
        runtime.spawn(metrics::server::serve(listener, Arc::clone(exporter)));
        serving = Some(format!(
            "leaktrace: serving metrics at http://{address}/metrics"
        ));
    }
    // Said once the signal handlers are in place: Ctrl-C from then on ends with a report.
    let started = || {
        if let Some(line) = &serving {
            eprintln!("{line}");
        }
        for line in &announcements {
            status!("{line}");
        }
    };
    let ended = runtime.block_on(event_loop::run(
        &config.trace,
        probes,
        maps,
        sessions,
        &mut adopt,
        output.failures(),
        guard,
        started,
    ));
    drop(watcher);
    let ended = ended?;
    say_how_it_ended(&ended, &pids, child, &first_command)?;
    if matches!(ended.stop, Stop::OverBudget(_)) {
        return Ok(Exit::OverBudget);
    }
    // When the reader went away no final report reached anyone: it cannot have shown a leak.
    let fail =
        ended.leak && reports.fail_on_leak && ended.stop != Stop::Output(Failure::ReaderGone);
    if fail {
        status!("leaktrace: the final report holds a leak: exit status {EXIT_LEAK}");
        return Ok(Exit::Leak);
    }
    Ok(Exit::Traced)
}

/// The processes to trace, each with its CPython interpreter (if it runs one leaktrace reads)
/// and its allocator.
type Opened = Vec<(Target, Option<PyProcess>, Allocator)>;

/// Spawn mode's command, held before its `exec`.
struct Spawned {
    child: spawn::Child,
    /// The modules it will map: its program and the libraries its loader will load.
    modules: Vec<Arc<Module>>,
}

/// The targets with their allocators, and spawn mode's command. Spawn mode forks here, before
/// any thread exists: the child waits before exec until the probes are attached.
fn open_targets(
    targets: &Targets,
    modules: &Arc<Modules>,
    python_names: &Arc<PyNames>,
) -> anyhow::Result<(Opened, Option<Spawned>)> {
    match targets {
        Targets::Pids(pids) => {
            let mut targets = Vec::new();
            for &pid in pids {
                let target = Target::open(pid, modules)?;
                let python = python::of_process(pid, target.space.maps(), python_names);
                let allocator = allocator::of_target(&target)?;
                targets.push((target, python, allocator));
            }
            Ok((targets, None))
        }
        Targets::Command(command) => {
            let program = spawn::find_program(&command[0])?;
            let libraries = spawn::libraries(&program)?;
            let forked = spawn::Child::fork(&program, command)?;
            let allocator = allocator::discover_files(forked.pid, &program, &libraries)
                .with_context(|| format!("finding the allocator of {}", program.display()))?;
            // Its interpreter, if it runs one, is looked for once it has exec'd.
            let target = Target::spawned(forked.pid, &program, command, modules);
            let to_map = std::iter::once(&program)
                .chain(&libraries)
                .filter_map(|path| modules.of_path(path))
                .collect();
            let spawned = Spawned {
                child: forked,
                modules: to_map,
            };
            Ok((vec![(target, None, allocator)], Some(spawned)))
        }
    }
}

/// Says on stderr why the trace ended; in spawn mode, stops the command if it still runs and
/// says how it exited.
fn say_how_it_ended(
    ended: &event_loop::Ended,
    pids: &[u32],
    child: Option<spawn::Child>,
    command: &str,
) -> anyhow::Result<()> {
    let pids = pids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    match &ended.stop {
        Stop::TargetExited => status!("leaktrace: process {pids} exited; probes detached"),
        Stop::Interrupted | Stop::Terminated | Stop::Duration | Stop::Count => {
            status!("leaktrace: detached from pid {pids}");
        }
        // Not an error: whoever read the reports stopped reading (`| head`).
        Stop::Output(Failure::ReaderGone) => {
            status!(
                "leaktrace: the reader of stdout went away: stopped tracing, detached from pid {pids}"
            );
        }
        Stop::Output(Failure::WriteFailed(_)) => {}
        Stop::OverBudget(why) => {
            status!("{}", guard::over_budget_line(why, &pids, EXIT_OVER_BUDGET));
        }
    }
    if let Some(mut child) = child {
        // The trace ended first (--duration, --count, a signal): like `timeout`, the command
        // is asked to stop, so that `leaktrace --duration 60 -- ./service` ends.
        if ended.stop != Stop::TargetExited {
            child.signal(libc::SIGTERM);
        }
        let status = child.wait()?;
        status!("leaktrace: `{command}` exited with status {status}");
    }
    if let Stop::Output(Failure::WriteFailed(message)) = &ended.stop {
        bail!("{message}; stopped tracing, detached from pid {pids}");
    }
    Ok(())
}

/// A reporter for one traced process, started before the user (or a test) is told that
/// tracing runs: a target that exits at once still gets its report.
fn session(
    (target, python): (Target, Option<PyProcess>),
    allocator: &Allocator,
    (modules, python_names): (&Arc<Modules>, &Arc<PyNames>),
    format: render::Format,
    style: render::Style,
    output: Output,
    exporter: Option<Arc<Exporter>>,
) -> anyhow::Result<Session> {
    let header = render::Header {
        pid: target.pid,
        command: target.command.clone(),
        allocator: allocator.name().to_owned(),
        allocator_module: allocator.module().to_owned(),
    };
    let reporter = Reporter::spawn(
        header,
        modules.clone(),
        python_names.clone(),
        format,
        style,
        output,
        exporter,
    )
    .context("starting the reporter thread")?;
    Ok(Session {
        target,
        python,
        python_names: python_names.clone(),
        reporter,
        own_code: allocator.own_code(),
    })
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
