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
    cli::Unwind,
    event::{Event, decode, user_stack},
    heap::HeapModel,
    probes::{Maps, Probes},
    report::{SnapshotInput, Trends, snapshot},
    reporter::Reporter,
    unwind::Unwinder,
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
    pub unwind: Unwind,
}

/// Runs the trace; every probe is detached when it returns.
pub async fn run(
    settings: &Settings,
    probes: Probes,
    maps: Maps,
    mut unwinder: Unwinder,
    reporter: &Reporter,
) -> anyhow::Result<Stop> {
    let start = Instant::now();
    let mut heap = HeapModel::default();
    let mut trends = Trends::new(settings.window, settings.interval.as_secs_f64() / 2.0);
    let Maps {
        events,
        stats,
        mut fp_code,
    } = maps;
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
    let mut tick = tokio::time::interval_at((start + settings.interval).into(), settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = tokio::time::sleep(settings.duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);
    // The BPF side wakes us only when much is waiting; below that, events are drained here.
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut scratch = Scratch::default();
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
                bad_records += drain(ring.get_mut(), &mut heap, &mut scratch, &mut unwinder);
            }
            _ = poll.tick() => {
                bad_records += drain(ring.get_mut(), &mut heap, &mut scratch, &mut unwinder);
            }
            _ = tick.tick() => {
                bad_records += drain(ring.get_mut(), &mut heap, &mut scratch, &mut unwinder);
                reporter.send(take_snapshot(&heap, &mut trends, false, bad_records));
                if settings.unwind == Unwind::Auto {
                    // Code mapped since (dlopen) counts as code without frame pointers until judged here.
                    unwinder.refresh_maps();
                    fp_code
                        .set(&unwinder.code_with_frame_pointers())
                        .context("updating the BPF map of code with frame pointers")?;
                }
            }
            _ = sigint.recv() => break Stop::Interrupted,
            _ = sigterm.recv() => break Stop::Terminated,
            () = &mut deadline => break Stop::Duration,
            _ = exited.readable() => break Stop::TargetExited,
        }
    };
    bad_records += drain(ring.get_mut(), &mut heap, &mut scratch, &mut unwinder);
    reporter.send(take_snapshot(&heap, &mut trends, true, bad_records));
    if settings.unwind != Unwind::Fp {
        let unwound = unwinder.stats();
        let busy_s = unwound.busy.as_secs_f64();
        eprintln!(
            "leaktrace: {} of {} allocations came with a stack copy, unwound with call-frame information ({} frames from CFI, {} from frame pointers) in {:.3}s ({:.0} stacks/s)",
            unwound.stacks,
            heap.counters().allocations,
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
    // The kernel takes ~85 ms per uprobe to detach, one after the other: the final report is
    // on its way meanwhile.
    drop(probes);
    Ok(stop)
}

/// Buffers reused from event to event.
#[derive(Default)]
pub struct Scratch {
    frames: Vec<u64>,
    unwound: Vec<u64>,
}

/// Applies every record waiting in the ring buffer; returns how many could not be decoded.
fn drain(
    ring: &mut RingBuf<MapData>,
    heap: &mut HeapModel,
    scratch: &mut Scratch,
    unwinder: &mut Unwinder,
) -> u64 {
    let mut bad = 0;
    while let Some(record) = ring.next() {
        if apply(&record, heap, scratch, unwinder).is_err() {
            bad += 1;
        }
    }
    bad
}

/// Decodes one record, unwinds its stack copy if it has one, and applies it to the heap model.
pub fn apply(
    record: &[u8],
    heap: &mut HeapModel,
    scratch: &mut Scratch,
    unwinder: &mut Unwinder,
) -> Result<(), crate::event::DecodeError> {
    let user = user_stack(record)?;
    let event = decode(record, &mut scratch.frames)?;
    match (event, user) {
        (
            Event::Alloc {
                ts_ns,
                addr,
                size_bytes,
                old_addr,
                frames,
                ..
            },
            Some(user),
        ) if addr != 0 => {
            let truncated = unwinder.unwind(&user, frames, &mut scratch.unwound);
            heap.apply(&Event::Alloc {
                ts_ns,
                addr,
                size_bytes,
                old_addr,
                frames: &scratch.unwound,
                truncated,
            });
        }
        (event, _) => heap.apply(&event),
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use leaktrace_common::UserRegs;

    use super::*;
    use crate::{
        event::tests::{alloc_record, alloc_stack_record, free_record},
        proc_maps::ProcMaps,
    };

    #[test]
    fn a_stack_copy_is_unwound_before_the_heap_model_sees_it() {
        let mut heap = HeapModel::default();
        let mut scratch = Scratch::default();
        // No module is mapped at these addresses: the unwinder follows the frame pointers in
        // the copy, which here disagree with the frame-pointer stack the record carries.
        let mut unwinder = Unwinder::new(u32::MAX, ProcMaps::default());
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
        apply(&record, &mut heap, &mut scratch, &mut unwinder).unwrap();
        apply(
            &alloc_record(0x6000, 8, 0, &[0x1111, 0x9999]),
            &mut heap,
            &mut scratch,
            &mut unwinder,
        )
        .unwrap();
        let mut stacks: Vec<Vec<u64>> = heap
            .usage(u64::MAX)
            .iter()
            .map(|u| heap.stacks().get(u.stack).frames.to_vec())
            .collect();
        stacks.sort();
        assert_eq!(
            stacks,
            [vec![0x1111, 0x2222, 0x3333], vec![0x1111, 0x9999]],
            "the copy's stack, and the plain record's frame-pointer stack"
        );
        assert_eq!(unwinder.stats().stacks, 1);
        apply(&free_record(0x5000), &mut heap, &mut scratch, &mut unwinder).unwrap();
        assert_eq!(heap.usage(u64::MAX).len(), 1);
        assert!(apply(&[9, 0, 0, 0], &mut heap, &mut scratch, &mut unwinder).is_err());
    }
}
