//! `leaktrace -p PID`: the outstanding allocations of a running process, by call stack.

use std::{fs::File, io, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Parser as _;

use leaktrace::{
    cli::Cli, probes, render, reporter::Reporter, target, target::Target, trace, trace::Stop,
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
    let target = Target::open(cli.pid)?;
    let out: Box<dyn io::Write + Send> = match &cli.output {
        Some(path) => {
            Box::new(File::create(path).with_context(|| format!("creating {}", path.display()))?)
        }
        None => Box::new(io::stdout()),
    };
    let (ebpf, maps) = probes::load(cli.ringbuf_bytes, cli.max_depth)?;
    let options = probes::AttachOptions {
        noop_programs: cli.noop_programs,
        free_at_entry: cli.free_at_entry,
        program_stats: cli.print_program_times,
    };
    let probes = probes::attach(ebpf, &target, options)?;
    let rendered_target = render::Target {
        pid: target.pid,
        command: target.command.clone(),
        allocator_module: target.allocator.module.clone(),
    };
    // Started before the user (or a test) is told that tracing runs, with the memory map read
    // at attach: a target that exits at once still gets its stacks symbolized.
    let reporter = Reporter::spawn(rendered_target, target.maps.clone(), cli.format, out)
        .context("starting the reporter thread")?;
    let settings = trace::Settings {
        pid: target.pid,
        interval: Duration::from_secs_f64(cli.interval),
        duration: cli.duration.map(Duration::from_secs_f64),
        top: cli.top,
        window: usize::from(cli.window),
        min_age: cli.min_age.map_or(Duration::ZERO, Duration::from_secs_f64),
        print_bpf_stats: cli.print_bpf_stats,
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
    let stop = runtime.block_on(trace::run(&settings, probes, maps, &reporter))?;
    reporter.finish().context("writing the report")?;
    match stop {
        Stop::TargetExited => {
            eprintln!("leaktrace: process {} exited; probes detached", target.pid)
        }
        Stop::Interrupted | Stop::Terminated | Stop::Duration => {
            eprintln!("leaktrace: detached from pid {}", target.pid);
        }
    }
    Ok(())
}
