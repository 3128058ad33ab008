//! The trace: events from the ring buffer into the heap model, a snapshot every interval,
//! until Ctrl-C, SIGTERM, `--duration` or the target's exit.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use super::decode::{DecodeError, decode, pid_tgid_of, tgid_of, user_stack};
use crate::{
    attach::{
        allocator::OwnCode,
        forks::{ProcEvent, ProcEvents},
        probes::{Maps, Probes, Unwind, UnwindRows},
        python::Found,
    },
    guard::{self, Guard},
    model::{
        event::{Backing, Event, MapSource},
        heap::{HeapModel, Sampling},
    },
    proc::{clock::monotonic_ns, process},
    report::{
        reporter::Reporter,
        snapshot::{Moment, Selection, snapshot},
        trends::Trends,
    },
    stacks::{
        python::{PyNames, PyProcess},
        unwind::Unwinder,
    },
    target::{Target, address_space::AddressSpace},
};

/// How often events are drained when the ring buffer is not filling fast enough to wake us.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// A stack that holds nothing and allocated nothing for this long is forgotten (and its trend
/// window has emptied): memory stays bounded over hours of tracing a program that keeps making
/// new stacks. Looked for every fifth of it.
const FORGET_IDLE: Duration = Duration::from_secs(5 * 60);

/// Why a trace ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    Interrupted,
    Terminated,
    Duration,
    /// `--count` reports were made.
    Count,
    /// Every traced process exited.
    TargetExited,
    /// The probes cost the target more than `--max-overhead` allows.
    OverBudget(crate::guard::OverBudget),
    /// Reports could no longer be delivered (see `output::Failure`): the trace stops at once
    /// rather than trace with nowhere to report.
    Output(crate::report::output::Failure),
}

/// How a trace ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    pub stop: Stop,
    /// A stack of a final report (of any traced process) is a `leak`.
    pub leak: bool,
}

pub struct Settings {
    pub interval: Duration,
    pub duration: Option<Duration>,
    /// Reports over which trends are measured (`--window`).
    pub window: usize,
    /// Which stacks each report lists.
    pub selection: Selection,
    /// Stop after this many reports.
    pub count: Option<u64>,
    /// Print the BPF counters at the end (benchmarks).
    pub print_bpf_stats: bool,
    /// Print each program's runs and run time at the end (benchmarks).
    pub print_program_times: bool,
    /// `--max-overhead`: stop when the probes take more than this share of the traced
    /// processes' CPU time (see `guard`).
    pub max_overhead_percent: Option<f64>,
    /// Trace the children that traced processes fork (`--follow-forks`).
    pub follow_forks: bool,
    pub unwind: Unwind,
    /// Frames kept per stack (`--max-depth`), also of stacks unwound from a copy.
    pub max_depth: u32,
    /// `--sample-bytes`: the heap models weigh each block by the blocks it stands for.
    pub sampling: Option<Sampling>,
}

/// One process to trace and where its reports go. Each has its own heap model: processes are
/// reported separately, by pid.
pub struct Session {
    pub target: Target,
    /// Its CPython interpreter, when it runs one whose frames leaktrace reads (found at
    /// attach: `attach::python::of_process`; in spawn mode, once the command has exec'd).
    pub python: Option<PyProcess>,
    /// The names of the trace's Python frames, which its reporter reads.
    pub python_names: Arc<PyNames>,
    pub reporter: Reporter,
    /// Its allocator's code: the mappings made there are the allocator's own.
    pub own_code: OwnCode,
}

/// Attaches to a forked child and returns its session (`--follow-forks`).
pub type Adopt<'a> = dyn FnMut(&mut Probes, u32) -> anyhow::Result<Session> + 'a;

/// A traced process, as the event loop keeps it.
struct Traced {
    target: Target,
    /// See [`Session::python`].
    python: Option<PyProcess>,
    python_names: Arc<PyNames>,
    reporter: Reporter,
    own_code: OwnCode,
    /// Unwinds its stack copies (`--unwind auto|dwarf`) with its modules' call-frame
    /// information.
    unwinder: Unwinder,
    heap: HeapModel,
    trends: Trends,
    /// `target.space.changes()` when it was last checked for an exec into another program
    /// (`None`: found, and said).
    exec_checked_at: Option<u64>,
    /// What its reports miss (see `Snapshot::gaps`), beyond its children.
    gaps: Vec<String>,
    /// `--follow-forks`: its children that ran its program, and those of them that exited
    /// (or could not be attached) before leaktrace attached.
    children: u64,
    children_missed: u64,
    /// The count of changes of its memory map when it was last searched for a CPython
    /// interpreter (`None`: found, or found to be one leaktrace cannot read).
    python_searched_at: Option<u64>,
    /// The search at work, on its own thread (see `find_python`).
    python_search: Option<std::thread::JoinHandle<Found>>,
}

/// Runs the trace; every probe is detached and every report written when it returns.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a stage's own piece, handed over once; a struct would only rename them"
)]
pub async fn run(
    settings: &Settings,
    mut probes: Probes,
    maps: Maps,
    sessions: Vec<Session>,
    adopt: &mut Adopt<'_>,
    mut failures: crate::report::output::Failures,
    mut guard: Option<Guard>,
    started: impl FnOnce(),
) -> anyhow::Result<Ended> {
    let start = Instant::now();
    let Maps {
        events,
        stats,
        unwind_rows,
        ids: _,
    } = maps;
    // SAFETY: the ring buffer owns its fd, which stays open and unchanged for as long as the
    // AsyncFd that owns it.
    let mut ring = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("polling the ring buffer")?;
    let (exit_tx, mut exit_rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
    // The processes and memory maps UNWIND_ROWS was last computed from: main's, before
    // attaching, from the targets as they were read then.
    let mut rows_from: Vec<(u32, u64)> = sessions.iter().map(|s| (s.target.pid, 0)).collect();
    let mut row_writer = RowWriter {
        idle: Some(unwind_rows),
        writing: None,
    };
    let mut live = BTreeMap::new();
    for session in sessions {
        let pid = session.target.pid;
        watch_exit(pid, &exit_tx)?;
        live.insert(pid, Traced::new(session, settings));
    }
    // `--follow-forks`: told of every fork as it happens, else children are polled for.
    let mut proc_events = if settings.follow_forks {
        match ProcEvents::subscribe().and_then(|events| {
            // SAFETY: the socket is owned by `events`, which the AsyncFd owns for as long as
            // it is registered.
            unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
                .map_err(std::io::Error::from)
        }) {
            Ok(events) => Some(events),
            Err(err) => {
                crate::status!(
                    "leaktrace: the kernel's process events are not available ({err}): looking for children every {} ms",
                    POLL_INTERVAL.as_millis()
                );
                None
            }
        }
    } else {
        None
    };
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut tick = tokio::time::interval_at((start + settings.interval).into(), settings.interval);
    // Reports stay at whole intervals from the start (`-d 60 -i 5`: 12 reports, the last the
    // final one): a report made late on a busy machine does not push the later ones back.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let deadline = tokio::time::sleep(settings.duration.unwrap_or(Duration::MAX / 4));
    let ends_at = settings.duration.map(|d| tokio::time::Instant::now() + d);
    tokio::pin!(deadline);
    // The BPF side wakes us only when much is waiting; below that, events are drained here.
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut scratch = Scratch::default();
    let mut bad_records = 0u64;
    let mut finished = Vec::new();
    let mut reports = 0u64;
    let mut forgot_at = Instant::now();
    let mut leak = false;
    let mut guard_tick = guard.as_ref().map(|_| {
        let mut tick = tokio::time::interval_at((start + guard::PERIOD).into(), guard::PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    if let Some(guard) = guard.as_mut() {
        guard.start(
            guard::Counters {
                programs: &probes.program_stats(),
                session_returns: stats.session_returns(),
            },
            live.keys().copied(),
        );
    }
    started();

    // Undecodable records count as lost: they would otherwise vanish silently. Returns whether
    // the report holds a leak.
    let take_snapshot = |pid: u32, traced: &mut Traced, last: bool, bad_records: u64| -> bool {
        let now = Moment {
            pid,
            timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            elapsed_s: start.elapsed().as_secs_f64(),
            now_ns: monotonic_ns(),
            lost_events: stats.lost_events() + bad_records,
            unpaired_returns: stats.unpaired_returns(),
            rss_bytes: process::rss_bytes(pid),
            last,
            gaps: traced.gaps().collect(),
        };
        let report = snapshot(&traced.heap, &mut traced.trends, &settings.selection, &now);
        let leak = report.has_leak();
        traced.reporter.send(report);
        leak
    };

    let stop = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting for events")?;
                guard.clear_ready();
                drop(guard);
                bad_records += drain(ring.get_mut(), &mut live, &mut scratch);
            }
            _ = poll.tick() => {
                bad_records += drain(ring.get_mut(), &mut live, &mut scratch);
                // The rows first: until they are in, stacks through the new code are copied.
                if settings.unwind == Unwind::Auto {
                    update_unwinding(&mut row_writer, &mut live, &mut rows_from)?;
                }
                find_python(&mut live, &mut probes)?;
                notice_execs(&mut live);
                // Without the kernel's process events, children are found here: one that
                // lives shorter than a poll may never be seen, which the reports say.
                if settings.follow_forks && proc_events.is_none() {
                    for (parent, child) in new_children(&live) {
                        follow(parent, child, None, &mut live, &mut probes, adopt, &exit_tx, settings)?;
                    }
                    for session in live.values_mut() {
                        session.add_gap(POLLED_CHILDREN.to_owned());
                    }
                }
            }
            _ = tick.tick() => {
                // The last report `--count` allows is the final one.
                if settings.count.is_some_and(|count| reports + 1 >= count) {
                    break Stop::Count;
                }
                bad_records += drain(ring.get_mut(), &mut live, &mut scratch);
                for (&pid, traced) in &mut live {
                    take_snapshot(pid, traced, false, bad_records);
                    // Libraries come and go: a stack first seen from now on is located in the
                    // map as it is now. Code mapped since (dlopen) counts as code without frame
                    // pointers until judged, here or when a stack through it made the address
                    // space read the map again.
                    traced.target.space.refresh();
                }
                reports += 1;
                if forgot_at.elapsed() >= FORGET_IDLE / 5 {
                    forgot_at = Instant::now();
                    let idle_since_ns =
                        monotonic_ns().saturating_sub(FORGET_IDLE.as_nanos() as u64);
                    for traced in live.values_mut() {
                        let trends = &traced.trends;
                        traced
                            .heap
                            .forget_idle_stacks(idle_since_ns, |stack| trends.tracks(stack));
                    }
                }
                if settings.unwind == Unwind::Auto {
                    update_unwinding(&mut row_writer, &mut live, &mut rows_from)?;
                }
            }
            Some(pid) = exit_rx.recv() => {
                bad_records += drain(ring.get_mut(), &mut live, &mut scratch);
                if let Some(mut traced) = live.remove(&pid) {
                    leak |= take_snapshot(pid, &mut traced, true, bad_records);
                    probes.detach(pid);
                    // Its final report is written meanwhile; a forking server's children
                    // must not keep a reporter thread each until the end.
                    let reporter = traced.reporter;
                    finished.push(std::thread::spawn(move || reporter.finish()));
                }
                if live.is_empty() {
                    break Stop::TargetExited;
                }
                crate::status!("leaktrace: process {pid} exited; its probes detached, tracing the others");
            }
            Some(()) = readable(&mut proc_events) => {
                let mut events = Vec::new();
                let drained = proc_events
                    .as_mut()
                    .map_or(Ok(()), |fd| fd.get_mut().drain(&mut events));
                for event in events {
                    if let ProcEvent::Fork { parent, child, ts_ns } = event {
                        follow(parent, child, Some(ts_ns), &mut live, &mut probes, adopt, &exit_tx, settings)?;
                    }
                }
                if let Err(err) = drained {
                    // Overflowed (ENOBUFS): forks were told to nobody.
                    for session in live.values_mut() {
                        session.add_gap(format!("the kernel's process events were lost ({err}): children forked meanwhile may not be followed"));
                    }
                }
            }
            () = next_tick(&mut guard_tick) => {
                if let Some(guard) = guard.as_mut()
                    && let Some(over) = guard.check(
                    guard::Counters { programs: &probes.program_stats(), session_returns: stats.session_returns() },
                    live.keys().copied(),
                )
                {
                    break Stop::OverBudget(over);
                }
            }
            Ok(()) = failures.changed() => {
                if let Some(failure) = failures.borrow_and_update().clone() {
                    break Stop::Output(failure);
                }
            }
            _ = sigint.recv() => break Stop::Interrupted,
            _ = sigterm.recv() => break Stop::Terminated,
            () = &mut deadline => {
                // A report due before the end that the loop had no time to make yet (a busy
                // machine) comes before the final one.
                let mut now = std::task::Context::from_waker(std::task::Waker::noop());
                if let std::task::Poll::Ready(at) = tick.poll_tick(&mut now)
                    && ends_at.is_some_and(|end| at <= end)
                    && settings.count.is_none_or(|count| reports + 1 < count)
                {
                    bad_records += drain(ring.get_mut(), &mut live, &mut scratch);
                    for (&pid, traced) in &mut live {
                        take_snapshot(pid, traced, false, bad_records);
                    }
                }
                break Stop::Duration;
            }
        }
    };
    // A write of the rows still at work ends with the trace; whether it failed no longer
    // matters.
    let _ = row_writer.collect(true);
    bad_records += drain(ring.get_mut(), &mut live, &mut scratch);
    // Forks told but not handled when the trace stopped: children not followed, and said so.
    if let Some(events) = proc_events.as_mut() {
        let mut told = Vec::new();
        let _ = events.get_mut().drain(&mut told);
        for event in told {
            if let ProcEvent::Fork { parent, child, .. } = event
                && let Some(traced) = live.get_mut(&parent)
                && !matches!(process::exe_id(child), Some(exe) if Some(exe) != traced.target.exe)
            {
                traced.children += 1;
                traced.children_missed += 1;
            }
        }
    }
    if settings.print_bpf_stats {
        let counters: Vec<String> = stats
            .all()
            .iter()
            .map(|(name, n)| format!("{name}={n}"))
            .collect();
        crate::status!("leaktrace: bpf stats {}", counters.join(" "));
    }
    if settings.print_program_times {
        for (name, runs, run_time_ns) in probes.program_stats() {
            crate::status!("leaktrace: bpf program {name} runs={runs} run_time_ns={run_time_ns}");
        }
    }
    if let Some(guard) = guard.as_mut() {
        // The last window, however short, counts in the whole trace's numbers.
        guard.finish(
            guard::Counters {
                programs: &probes.program_stats(),
                session_returns: stats.session_returns(),
            },
            live.keys().copied(),
        );
        crate::status!("{}", guard.summary());
    }
    let mut reporters = Vec::new();
    for (pid, mut traced) in std::mem::take(&mut live) {
        leak |= take_snapshot(pid, &mut traced, true, bad_records);
        if settings.unwind != Unwind::Fp {
            report_unwinding(pid, &traced);
        }
        reporters.push(traced.reporter);
    }
    // The kernel takes ~85 ms per uprobe to detach, one after the other: the final reports
    // are on their way meanwhile.
    drop(probes);
    let finished = finished.into_iter().map(|t| {
        t.join().unwrap_or_else(|_| {
            Err(crate::report::output::Failure::WriteFailed(
                "a reporter thread panicked".into(),
            ))
        })
    });
    let mut stop = stop;
    for outcome in reporters.into_iter().map(Reporter::finish).chain(finished) {
        // The first failure is what the trace reports.
        if let Err(failure) = outcome
            && !matches!(stop, Stop::Output(_))
        {
            stop = Stop::Output(failure);
        }
    }
    // A final report that could not be delivered fails the trace too (the reader of stdout
    // leaving is told only there).
    if let Some(failure) = failures.borrow().clone()
        && !matches!(stop, Stop::Output(_))
    {
        stop = Stop::Output(failure);
    }
    Ok(Ended { stop, leak })
}

/// How much unwinding from stack copies cost, on stderr.
/// `--unwind auto`: the map of unwinding rows, or the thread writing it. Building and writing
/// the rows of a large executable takes a while (python3: ~105k rows, 0.1-0.3 s measured):
/// on the event loop, it kept the ring buffer from being drained, and a start-up that
/// allocated meanwhile, each allocation with a stack copy until the rows are in, lost events.
struct RowWriter {
    idle: Option<UnwindRows>,
    writing: Option<std::thread::JoinHandle<(UnwindRows, anyhow::Result<()>)>>,
}

impl RowWriter {
    /// Takes the map back from a write that finished.
    fn collect(&mut self, wait: bool) -> anyhow::Result<()> {
        let Some(handle) = self.writing.take_if(|handle| wait || handle.is_finished()) else {
            return Ok(());
        };
        let (rows, result) = handle
            .join()
            .map_err(|_| anyhow::anyhow!("the thread writing the unwinding rows panicked"))?;
        self.idle = Some(rows);
        result.context("updating the BPF map of unwinding rows")
    }
}

/// `--unwind auto`: tells the BPF side how to unwind the code of the traced processes
/// (UNWIND_ROWS, UNWIND_PAGES), when one of them came or went or its memory map changed since
/// it last did. A spawned command's map changes at its exec, a service's at a dlopen, a
/// followed child's at its exec: until the maps know the new code, every stack through it is
/// copied and unwound with CFI in user space. The rows are built and written on a thread; a
/// change seen while one is at work waits for the next call.
fn update_unwinding(
    writer: &mut RowWriter,
    live: &mut BTreeMap<u32, Traced>,
    from: &mut Vec<(u32, u64)>,
) -> anyhow::Result<()> {
    writer.collect(false)?;
    let now: Vec<(u32, u64)> = live
        .iter()
        .map(|(&pid, traced)| (pid, traced.target.space.changes()))
        .collect();
    if *from == now {
        return Ok(());
    }
    let Some(mut rows) = writer.idle.take() else {
        return Ok(());
    };
    let processes: Vec<_> = live
        .iter_mut()
        .map(|(&pid, traced)| (pid, traced.target.space.row_sources()))
        .collect();
    *from = now;
    let handle = std::thread::Builder::new()
        .name("leaktrace-rows".into())
        .spawn(move || {
            let result = rows.update(&processes);
            (rows, result)
        })
        .context("starting the thread that writes the unwinding rows")?;
    writer.writing = Some(handle);
    Ok(())
}

/// Looks for a CPython interpreter in spawn mode's command once its memory map changed: held
/// before its `exec`, it runs `python3` only after. Its allocations before it is found (the
/// interpreter's start) show native frames only. The search reads and decodes the module's
/// file (Debian's python3.11: 0.1-0.2 s, longer on a busy machine), on a thread: on the event
/// loop, it kept the ring buffer from being drained while the start-up filled it, and events
/// were lost. A search at work is taken up at a later call.
fn find_python(live: &mut BTreeMap<u32, Traced>, probes: &mut Probes) -> anyhow::Result<()> {
    for (&pid, traced) in live.iter_mut() {
        if let Some(search) = traced.python_search.take_if(|search| search.is_finished()) {
            let found = search.join().map_err(|_| {
                anyhow::anyhow!("the thread looking for the CPython interpreter panicked")
            })?;
            take_python(pid, traced, found, probes)?;
        }
        let Some(searched_at) = traced.python_searched_at else {
            continue;
        };
        let space = &traced.target.space;
        if traced.python_search.is_some() || space.changes() == searched_at {
            continue;
        }
        traced.python_searched_at = Some(space.changes());
        let maps = space.maps().clone();
        let search = std::thread::Builder::new()
            .name("leaktrace-python".into())
            .spawn(move || crate::attach::python::discover(pid, &maps))
            .context("starting the thread that looks for the CPython interpreter")?;
        traced.python_search = Some(search);
    }
    Ok(())
}

/// Says once, on stderr and in its reports, that a traced process has exec'd a program other
/// than the one its probes were placed for: spawn mode's command that was a launcher (`env`,
/// `nice`, a wrapper binary), or a service that re-execs itself. Its probes stay on the first
/// program's allocator and interpreter: the new one is seen only where it calls the same
/// functions of the same files, which a report marked complete would hide. Checked when its
/// memory map changed, as it does at an exec.
fn notice_execs(live: &mut BTreeMap<u32, Traced>) {
    let own = process::exe_id(std::process::id());
    for (&pid, traced) in live.iter_mut() {
        let Some(checked_at) = traced.exec_checked_at else {
            continue;
        };
        let changes = traced.target.space.changes();
        if changes == checked_at {
            continue;
        }
        traced.exec_checked_at = Some(changes);
        let now = process::exe_id(pid);
        // Gone, the program it was attached for, or spawn mode's command before its exec.
        if now.is_none() || now == traced.target.exe || now == own {
            continue;
        }
        traced.exec_checked_at = None;
        let program = std::fs::read_link(format!("/proc/{pid}/exe")).map_or_else(
            |_| "another program".to_owned(),
            |p| p.display().to_string(),
        );
        crate::status!(
            "leaktrace: pid {pid} exec'd {program} after leaktrace attached: the probes stay on the allocator of the program before, so {program} is traced only where it calls the same functions of the same libraries; trace it by itself (`leaktrace -- {program} ARGS` or `leaktrace -p {pid}`)"
        );
        traced.add_gap(format!(
            "it exec'd {program} after leaktrace attached: traced only through the probes placed for the program before"
        ));
    }
}

/// Takes what a search found of CPython in process `pid`.
fn take_python(
    pid: u32,
    traced: &mut Traced,
    found: Found,
    probes: &mut Probes,
) -> anyhow::Result<()> {
    match found {
        Found::None => {}
        Found::Unknown(warning) => {
            crate::status!("{warning}");
            traced.python_searched_at = None;
        }
        Found::Known(mut interp) => {
            traced.python_searched_at = None;
            let Ok(memory) = process::memory(pid) else {
                return Ok(());
            };
            crate::attach::python::check_objects_seen(pid, &mut interp, &memory);
            let unseen = interp.unseen.clone();
            probes.set_python(pid, &interp.offsets.walk)?;
            traced.python = Some(PyProcess::new(*interp, memory, traced.python_names.clone()));
            if let Some(unseen) = unseen {
                traced.add_gap(unseen);
            }
        }
    }
    Ok(())
}

fn report_unwinding(pid: u32, traced: &Traced) {
    let unwound = traced.unwinder.stats();
    let busy_s = unwound.busy.as_secs_f64();
    crate::status!(
        "leaktrace: pid {pid}: {} of {} allocations came with a stack copy, unwound with call-frame information ({} frames from CFI, {} from frame pointers) in {:.3}s ({:.0} stacks/s)",
        unwound.stacks,
        traced.heap.traced_allocations(),
        unwound.cfi_frames,
        unwound.fp_frames,
        busy_s,
        if busy_s > 0.0 {
            unwound.stacks as f64 / busy_s
        } else {
            0.0
        }
    );
}

impl Traced {
    fn new(session: Session, settings: &Settings) -> Self {
        // Searched at attach when the process ran already; spawn mode's command is searched
        // once it runs (its memory map is empty until its exec).
        let space = &session.target.space;
        let python_searched_at =
            (session.python.is_none() && space.maps().mappings.is_empty()).then(|| space.changes());
        let gaps = session
            .python
            .as_ref()
            .and_then(|py| py.interpreter().unseen.clone())
            .into_iter()
            .collect();
        Self {
            python_searched_at,
            python_search: None,
            exec_checked_at: Some(session.target.space.changes()),
            target: session.target,
            python: session.python,
            python_names: session.python_names,
            reporter: session.reporter,
            own_code: session.own_code,
            unwinder: Unwinder::new(settings.max_depth),
            heap: HeapModel::new(settings.sampling),
            trends: Trends::new(settings.window, settings.interval.as_secs_f64() / 2.0),
            gaps,
            children: 0,
            children_missed: 0,
        }
    }

    fn gaps(&self) -> impl Iterator<Item = String> + '_ {
        let missed = (self.children_missed > 0).then(|| {
            format!(
                "{} of its {} children (--follow-forks) were not followed (they exited, could not be attached, or the trace ended first): what they allocated is not seen",
                self.children_missed, self.children
            )
        });
        self.gaps.iter().cloned().chain(missed)
    }

    /// Says once that its reports miss something.
    fn add_gap(&mut self, gap: String) {
        if !self.gaps.contains(&gap) {
            self.gaps.push(gap);
        }
    }
}

/// Attaches to `child` of `parent` (`--follow-forks`) if it still runs its parent's program:
/// it is then traced from now on, and its reports say that what it did since its fork
/// (`forked_ns` ago, when known) is not seen. A child that could not be attached is counted
/// as missed in its parent's reports.
#[expect(
    clippy::too_many_arguments,
    reason = "the event loop's state, borrowed piece by piece while `live` changes"
)]
fn follow(
    parent: u32,
    child: u32,
    forked_ns: Option<u64>,
    live: &mut BTreeMap<u32, Traced>,
    probes: &mut Probes,
    adopt: &mut Adopt<'_>,
    exit_tx: &tokio::sync::mpsc::UnboundedSender<u32>,
    settings: &Settings,
) -> anyhow::Result<()> {
    let Some(parent_exe) = live.get(&parent).map(|p| p.target.exe) else {
        return Ok(());
    };
    if live.contains_key(&child) {
        return Ok(());
    }
    let exe = process::exe_id(child);
    // It runs another program already (fork and exec): not one to follow.
    if exe.is_some() && exe != parent_exe {
        return Ok(());
    }
    let result = if exe.is_none() {
        Err(anyhow::anyhow!("it exited"))
    } else {
        adopt(probes, child)
    };
    let attached_ns = monotonic_ns();
    let Some(parent_live) = live.get_mut(&parent) else {
        return Ok(());
    };
    parent_live.children += 1;
    match result {
        Ok(session) => {
            if let Err(err) = watch_exit(child, exit_tx) {
                // Exited (and reaped) between the attach and here: followed all the same, its
                // exit handled at once like any other.
                if process::exists(child) {
                    return Err(err);
                }
                let _ = exit_tx.send(child);
            }
            let mut followed = Traced::new(session, settings);
            followed.add_gap(match forked_ns {
                Some(forked) => format!(
                    "a child followed after its fork (--follow-forks): what it allocated in the {:.1} ms between its fork and the attach is not seen",
                    attached_ns.saturating_sub(forked) as f64 / 1e6
                ),
                None => "a child followed after its fork (--follow-forks): what it allocated between its fork and the attach is not seen".to_owned(),
            });
            live.insert(child, followed);
        }
        Err(err) => {
            parent_live.children_missed += 1;
            crate::status!("leaktrace: not following child {child}: {err:#}");
        }
    }
    Ok(())
}

/// Sends `pid` on `tx` when the process exits.
fn watch_exit(pid: u32, tx: &tokio::sync::mpsc::UnboundedSender<u32>) -> anyhow::Result<()> {
    // SAFETY: the pidfd owns its fd, which stays open for as long as the AsyncFd owns it.
    let exited =
        unsafe { AsyncFd::register_with_interest(process::pidfd(pid)?, Interest::READABLE) }
            .map_err(std::io::Error::from)
            .context("polling the target's pidfd")?;
    let tx = tx.clone();
    tokio::spawn(async move {
        let _ = exited.readable().await;
        let _ = tx.send(pid);
    });
    Ok(())
}

/// What the reports of `--follow-forks` say when children are only polled for.
const POLLED_CHILDREN: &str = "children are looked for every 50 ms (the kernel's process events are not available): a child that lives shorter may not be seen at all";

/// The guard's next tick; never, without a guard.
async fn next_tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Waits until the kernel's process events are readable; never, without them.
async fn readable(events: &mut Option<AsyncFd<ProcEvents>>) -> Option<()> {
    match events {
        Some(events) => {
            let mut guard = events.readable_mut().await.ok()?;
            guard.clear_ready();
            Some(())
        }
        None => std::future::pending().await,
    }
}

/// Children of traced processes, not traced yet, that still run their parent's program, with
/// their parent.
fn new_children(live: &BTreeMap<u32, Traced>) -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    for (&pid, traced) in live {
        for child in process::children(pid) {
            if !live.contains_key(&child)
                && !found.iter().any(|&(_, c)| c == child)
                && traced.target.exe.is_some()
                && process::exe_id(child) == traced.target.exe
            {
                found.push((pid, child));
            }
        }
    }
    found
}

/// Buffers reused from event to event.
#[derive(Default)]
pub struct Scratch {
    frames: Vec<u64>,
    unwound: Vec<u64>,
    /// Native frames with the Python frames among them.
    mixed: Vec<u64>,
}

/// Applies every record waiting in the ring buffer to the model of the process it came from;
/// returns how many could not be decoded.
fn drain(
    ring: &mut RingBuf<MapData>,
    live: &mut BTreeMap<u32, Traced>,
    scratch: &mut Scratch,
) -> u64 {
    let mut bad = 0;
    while let Some(record) = ring.next() {
        let Some(tgid) = tgid_of(&record) else {
            bad += 1;
            continue;
        };
        // A process no longer traced (it exited an instant ago): nothing to apply to.
        let Some(traced) = live.get_mut(&tgid) else {
            continue;
        };
        let Traced {
            target,
            python,
            own_code,
            unwinder,
            heap,
            ..
        } = traced;
        let python = python.as_mut();
        let process = Process {
            space: &mut target.space,
            python,
            own_code,
        };
        if apply(&record, heap, process, unwinder, scratch).is_err() {
            bad += 1;
        }
    }
    bad
}

/// What [`apply`] needs of the process a record came from.
pub struct Process<'a> {
    /// Its address space: the unwinder's modules, and where the frames of stacks not seen
    /// before are located.
    pub space: &'a mut AddressSpace,
    /// Its interpreter, when it runs CPython.
    pub python: Option<&'a mut PyProcess>,
    pub own_code: &'a OwnCode,
}

/// Decodes one record, unwinds its stack copy if it has one, puts the Python frames sent for
/// it among its native ones, and applies it to the heap model of its process; a mapping its
/// allocator made for itself is left out.
pub fn apply(
    record: &[u8],
    heap: &mut HeapModel,
    process: Process<'_>,
    unwinder: &mut Unwinder,
    scratch: &mut Scratch,
) -> Result<(), DecodeError> {
    let Process {
        space,
        mut python,
        own_code,
    } = process;
    if let Some(python) = python.as_deref_mut()
        && python
            .take(record)
            .map_err(|_| DecodeError::Short(record.len()))?
    {
        return Ok(());
    }
    let user = user_stack(record)?;
    let mut event = decode(record, &mut scratch.frames)?;
    let Some((frames, truncated)) = event.stack() else {
        heap.apply(&event, space);
        return Ok(());
    };
    let Scratch { unwound, mixed, .. } = scratch;
    let (native, truncated): (&[u64], bool) = match user {
        // A stack copy: unwound here, into frames that replace the record's. A call that
        // returned no block has no stack to keep.
        Some(user) if !matches!(event, Event::Alloc { addr: 0, .. }) => {
            let truncated = unwinder.unwind(space, &user, frames, truncated, unwound);
            (unwound, truncated)
        }
        _ => (frames, truncated),
    };
    if let Event::Map { source, ts_ns, .. } = &event
        && *source == MapSource::Mmap(Backing::Anonymous)
        && native.iter().any(|&address| {
            space
                .module_at(address, *ts_ns)
                .is_some_and(|(module, offset)| own_code.holds(&module.path, offset))
        })
    {
        return Ok(());
    }
    if let Event::Map {
        source, size_bytes, ..
    } = &mut event
        && *source == MapSource::Mmap(Backing::PymallocArena)
    {
        let caller = native.first().copied().unwrap_or(0);
        match arena_backing(python.as_deref(), caller, *size_bytes) {
            Some(backing) => *source = MapSource::Mmap(backing),
            None => return Ok(()),
        }
    }
    let allocation = match event {
        Event::Alloc { ts_ns, addr, .. } | Event::Map { ts_ns, addr, .. } if addr != 0 => {
            Some(ts_ns)
        }
        _ => None,
    };
    let mixed_in = match (allocation, python, pid_tgid_of(record)) {
        (Some(ts_ns), Some(python), Some(pid_tgid)) => python.mix(pid_tgid, ts_ns, native, mixed),
        _ => false,
    };
    let frames: &[u64] = if mixed_in { mixed } else { native };
    event.set_stack(frames, truncated);
    heap.apply(&event, space);
    Ok(())
}

/// pymalloc's arenas are 1 MiB (CPython 3.10 and later).
const ARENA_BYTES: u64 = 1 << 20;

/// What backs a mapping made inside a call of CPython's object allocator, by code at return
/// address `caller` (`call::ARENA_MMAP`); `None` for the mapping of a nested allocator call
/// (the `malloc` of a large object), hidden as nested calls are: its block is the object.
fn arena_backing(python: Option<&PyProcess>, caller: u64, size_bytes: u64) -> Option<Backing> {
    match python {
        Some(py) if !py.maps_arena(caller) => None,
        // Where the probes miss most small objects (pymalloc compiled into its callers), the
        // arenas are the only view of their memory: counted as any anonymous mapping.
        Some(py) if py.interpreter().unseen.is_some() => Some(Backing::Anonymous),
        Some(_) => Some(Backing::PymallocArena),
        // An interpreter whose code leaktrace does not know: an arena by its size.
        None => (size_bytes == ARENA_BYTES).then_some(Backing::PymallocArena),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leaktrace_common::UserRegs;

    use crate::{
        intake::decode::tests::{alloc_record, alloc_stack_record, free_record},
        proc::maps::ProcMaps,
        target::modules::Modules,
    };

    #[test]
    fn a_stack_copy_is_unwound_before_the_heap_model_sees_it() {
        let mut heap = HeapModel::default();
        let mut scratch = Scratch::default();
        // No module is mapped at these addresses: the unwinder follows the frame pointers in
        // the copy, which here disagree with the frame-pointer stack the record carries.
        let mut space = AddressSpace::new(u32::MAX, ProcMaps::default(), Modules::new());
        let mut unwinder = Unwinder::new(leaktrace_common::MAX_STACK_DEPTH as u32);
        let sp = 0x7000_0000u64;
        let stack: Vec<u8> = [0u64, 0x2222, 0, 0x3333]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        let regs = UserRegs {
            ip: 0x1111,
            sp,
            bp: sp,
        };
        // [sp] = saved bp (sp+16), [sp+8] = 0x2222; [sp+16] = 0, [sp+24] = 0x3333.
        let mut stack = stack;
        stack[..8].copy_from_slice(&(sp + 16).to_ne_bytes());
        let record = alloc_stack_record(0x5000, &[0x1111, 0x9999], regs, &stack);
        let own_code = OwnCode::default();
        let mut apply = |record: &[u8]| {
            let process = Process {
                space: &mut space,
                python: None,
                own_code: &own_code,
            };
            apply(record, &mut heap, process, &mut unwinder, &mut scratch)
        };
        apply(&record).unwrap();
        apply(&alloc_record(0x6000, 8, 0, &[0x1111, 0x9999])).unwrap();
        apply(&free_record(0x5000)).unwrap();
        assert!(apply(&[9, 0, 0, 0]).is_err());
        let mut stacks: Vec<Vec<u64>> = heap
            .usage(u64::MAX)
            .iter()
            .map(|u| heap.stacks().get(u.stack).addresses().collect())
            .collect();
        stacks.sort();
        assert_eq!(
            stacks,
            [vec![0x1111, 0x9999]],
            "the copy's stack was freed; the plain record's frame-pointer stack"
        );
        assert_eq!(unwinder.stats().stacks, 1);
        let copied = heap.stacks().get(crate::model::stack_table::StackId(0));
        assert!(copied.addresses().eq([0x1111, 0x2222, 0x3333]));
    }
}
