//! The trace: events from the ring buffer into the heap model, a snapshot every interval,
//! until Ctrl-C, SIGTERM, `--duration` or the target's exit.

use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    event::decode,
    heap::HeapModel,
    probes::{Maps, Probes},
    report::{SnapshotInput, Trends, snapshot},
    reporter::Reporter,
};

/// How often events are drained when the ring buffer is not filling fast enough to wake us.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Why a trace ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Interrupted,
    Terminated,
    Duration,
    TargetExited,
}

pub struct Settings {
    pub pid: u32,
    pub interval: Duration,
    pub duration: Option<Duration>,
    pub top: usize,
    pub window: usize,
    pub min_age: Duration,
    pub print_bpf_stats: bool,
    pub file_mappings: bool,
    /// Printed to stderr once tracing runs and Ctrl-C is handled: a signal that follows it
    /// ends the trace with a final report instead of killing leaktrace.
    pub ready_message: String,
}

/// Runs the trace; every probe is detached when it returns.
pub async fn run(
    settings: &Settings,
    probes: Probes,
    maps: Maps,
    reporter: &Reporter,
) -> anyhow::Result<Stop> {
    let start = Instant::now();
    let mut heap = HeapModel::default();
    let mut trends = Trends::new(settings.window, settings.interval.as_secs_f64() / 2.0);
    let Maps { events, stats } = maps;
    // SAFETY: the ring buffer and the pidfd own their fds, which stay open and unchanged for
    // as long as the AsyncFd that owns them.
    let mut ring = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("polling the ring buffer")?;
    // SAFETY: as above.
    let exited =
        unsafe { AsyncFd::register_with_interest(pidfd(settings.pid)?, Interest::READABLE) }
            .map_err(std::io::Error::from)
            .context("polling the target's pidfd")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    eprintln!("{}", settings.ready_message);
    let mut tick = tokio::time::interval_at((start + settings.interval).into(), settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = tokio::time::sleep(settings.duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);
    // The BPF side wakes us only when much is waiting; below that, events are drained here.
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut scratch = Vec::new();
    let mut bad_records = 0u64;

    // Undecodable records count as lost: they would otherwise vanish silently.
    let take_snapshot = |heap: &HeapModel, trends: &mut Trends, last: bool, bad_records: u64| {
        let input = SnapshotInput {
            pid: settings.pid,
            timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            elapsed_s: start.elapsed().as_secs_f64(),
            now_ns: monotonic_ns(),
            lost_events: stats.lost_events() + bad_records,
            min_age_ns: settings.min_age.as_nanos() as u64,
            file_mappings: settings.file_mappings,
            top: settings.top,
            last,
        };
        snapshot(heap, trends, &input)
    };

    let stop = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting for events")?;
                guard.clear_ready();
                drop(guard);
                bad_records += drain(ring.get_mut(), &mut heap, &mut scratch);
            }
            _ = poll.tick() => {
                bad_records += drain(ring.get_mut(), &mut heap, &mut scratch);
            }
            _ = tick.tick() => {
                bad_records += drain(ring.get_mut(), &mut heap, &mut scratch);
                reporter.send(take_snapshot(&heap, &mut trends, false, bad_records));
            }
            _ = sigint.recv() => break Stop::Interrupted,
            _ = sigterm.recv() => break Stop::Terminated,
            () = &mut deadline => break Stop::Duration,
            _ = exited.readable() => break Stop::TargetExited,
        }
    };
    bad_records += drain(ring.get_mut(), &mut heap, &mut scratch);
    if settings.print_bpf_stats {
        let counters: Vec<String> = stats
            .all()
            .iter()
            .map(|(name, n)| format!("{name}={n}"))
            .collect();
        eprintln!("leaktrace: bpf stats {}", counters.join(" "));
    }
    // Empty unless `--print-program-times` turned the kernel's statistics on.
    for (name, runs, run_time_ns) in probes.program_stats() {
        eprintln!("leaktrace: bpf program {name} runs={runs} run_time_ns={run_time_ns}");
    }
    reporter.send(take_snapshot(&heap, &mut trends, true, bad_records));
    // The kernel takes ~85 ms per uprobe to detach, one after the other: the final report is
    // on its way meanwhile.
    drop(probes);
    Ok(stop)
}

/// Applies every record waiting in the ring buffer; returns how many could not be decoded.
fn drain(ring: &mut RingBuf<MapData>, heap: &mut HeapModel, scratch: &mut Vec<u64>) -> u64 {
    let mut bad = 0;
    while let Some(record) = ring.next() {
        match decode(&record, scratch) {
            Ok(event) => heap.apply(&event),
            Err(_) => bad += 1,
        }
    }
    bad
}

fn pidfd(pid: u32) -> anyhow::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return Err(anyhow::anyhow!(
            "process {pid} exited before leaktrace could attach ({err})"
        ));
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
