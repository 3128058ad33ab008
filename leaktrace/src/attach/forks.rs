//! `--follow-forks`: the kernel's process events (the proc connector, a netlink socket) tell
//! of every fork as it happens, with the parent's and the child's process ids, so that a child
//! is attached as soon as it exists and every child that could not be attached (it exited, or
//! exec'd, first) is counted, never silently missed.
//!
//! Why a child is attached after its fork rather than traced from it (from the kernel's code;
//! not measured here, but for the proc connector's latency, see the README): uprobes are
//! scoped to a process's memory, and a child's inherited copy of a breakpoint is removed at its
//! first hit, before any BPF program runs, because no consumer wants that memory; perf's event
//! inheritance would copy the parent's uprobe events at fork but re-reads the probe's path from
//! the forking process's memory; probes scoped to every process with a filter in BPF would trap
//! every process that maps the allocator (every process, for libc), each of their calls paying
//! a trap. So what a child allocates between its fork and the attach is not seen, and its
//! reports say so (`complete: false`).

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// What the kernel said happened to a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcEvent {
    /// A new process (not a thread): `child` was forked by a thread of `parent`.
    Fork {
        parent: u32,
        child: u32,
        /// `CLOCK_MONOTONIC` of the fork.
        ts_ns: u64,
    },
    /// `pid` called exec: it runs another program now.
    Exec { pid: u32 },
}

const NETLINK_CONNECTOR: i32 = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_EVENT_FORK: u32 = 0x1;
const PROC_EVENT_EXEC: u32 = 0x2;
const NLMSG_HDR_BYTES: usize = 16;
const CN_MSG_BYTES: usize = 20;
/// The socket's receive buffer: some 100,000 events.
const RECEIVE_BUFFER_BYTES: libc::c_int = 16 << 20;
/// `struct proc_event`: what, cpu, timestamp_ns, then the event's data.
const EVENT_DATA_AT: usize = 16;

/// A subscription to the kernel's process events (needs CAP_NET_ADMIN; root has it).
pub struct ProcEvents {
    socket: OwnedFd,
    buf: Vec<u8>,
}

impl std::os::fd::AsRawFd for ProcEvents {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }
}

impl ProcEvents {
    pub fn subscribe() -> io::Result<Self> {
        // SAFETY: plain syscalls on values built here; the fd is owned at once.
        let socket = unsafe {
            let fd = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                NETLINK_CONNECTOR,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(fd)
        };
        // SAFETY: sockaddr_nl is plain data.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = CN_IDX_PROC;
        // SAFETY: a sockaddr_nl of the size passed.
        let bound = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if bound != 0 {
            return Err(io::Error::last_os_error());
        }
        // Every process of the machine is told of, and the event loop may be busy attaching
        // for seconds: a large buffer (root may exceed the default limit) keeps the events
        // from overflowing it, which the reports would have to call a gap.
        let bytes: libc::c_int = RECEIVE_BUFFER_BYTES;
        // SAFETY: an int option of the size passed; failing leaves the default buffer.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const bytes).cast(),
                size_of::<libc::c_int>() as u32,
            );
        }
        let mut listen = Vec::with_capacity(NLMSG_HDR_BYTES + CN_MSG_BYTES + 4);
        let len = (NLMSG_HDR_BYTES + CN_MSG_BYTES + 4) as u32;
        listen.extend_from_slice(&len.to_ne_bytes());
        listen.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
        listen.extend_from_slice(&0u16.to_ne_bytes()); // flags
        listen.extend_from_slice(&0u32.to_ne_bytes()); // seq
        listen.extend_from_slice(&std::process::id().to_ne_bytes());
        listen.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        listen.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        listen.extend_from_slice(&0u32.to_ne_bytes()); // seq
        listen.extend_from_slice(&0u32.to_ne_bytes()); // ack
        listen.extend_from_slice(&4u16.to_ne_bytes()); // len of the data
        listen.extend_from_slice(&0u16.to_ne_bytes()); // flags
        listen.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
        // SAFETY: sends the bytes of a local buffer.
        let sent =
            unsafe { libc::send(socket.as_raw_fd(), listen.as_ptr().cast(), listen.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            socket,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Every event waiting, in the order the kernel sent them. `Err` when events were lost
    /// (the socket's buffer overflowed: `ENOBUFS`), which the caller must count as a gap.
    pub fn drain(&mut self, out: &mut Vec<ProcEvent>) -> io::Result<()> {
        loop {
            // SAFETY: receives into a local buffer of the length passed.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                return match err.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(err),
                };
            }
            parse(&self.buf[..n as usize], out);
        }
    }
}

/// The fork and exec events in one netlink datagram; anything else (other events, a
/// truncated message) is skipped.
pub fn parse(mut datagram: &[u8], out: &mut Vec<ProcEvent>) {
    let u32_at = |bytes: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    while let Some(len) = u32_at(datagram, 0) {
        let len = len as usize;
        if len < NLMSG_HDR_BYTES || len > datagram.len() {
            return;
        }
        let message = &datagram[NLMSG_HDR_BYTES..len];
        // Messages are 4-byte aligned.
        datagram = datagram.get(len.next_multiple_of(4)..).unwrap_or_default();
        let Some(event) = message.get(CN_MSG_BYTES..) else {
            continue;
        };
        let data = |i: usize| u32_at(event, EVENT_DATA_AT + 4 * i);
        let ts_ns = event
            .get(8..16)
            .map_or(0, |b| u64::from_ne_bytes(b.try_into().expect("8 bytes")));
        match u32_at(event, 0) {
            // fork: parent_pid, parent_tgid, child_pid, child_tgid. A thread is a "fork" whose
            // child shares the parent's process id.
            Some(PROC_EVENT_FORK) => {
                if let (Some(parent), Some(child), Some(child_tgid)) = (data(1), data(2), data(3))
                    && child == child_tgid
                    && child != parent
                {
                    out.push(ProcEvent::Fork {
                        parent,
                        child,
                        ts_ns,
                    });
                }
            }
            // exec: process_pid, process_tgid.
            Some(PROC_EVENT_EXEC) => {
                if let Some(pid) = data(1) {
                    out.push(ProcEvent::Exec { pid });
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A datagram as the kernel sends it: netlink header, connector header, proc_event.
    pub(crate) fn message(what: u32, ts_ns: u64, data: &[u32]) -> Vec<u8> {
        let mut event = Vec::new();
        event.extend_from_slice(&what.to_ne_bytes());
        event.extend_from_slice(&0u32.to_ne_bytes());
        event.extend_from_slice(&ts_ns.to_ne_bytes());
        for d in data {
            event.extend_from_slice(&d.to_ne_bytes());
        }
        let len = NLMSG_HDR_BYTES + CN_MSG_BYTES + event.len();
        let mut m = (len as u32).to_ne_bytes().to_vec();
        m.resize(NLMSG_HDR_BYTES + CN_MSG_BYTES, 0);
        m.extend_from_slice(&event);
        m.resize(len.next_multiple_of(4), 0);
        m
    }

    #[test]
    fn forks_of_processes_and_execs_are_read_and_threads_are_not_forks() {
        let mut datagram = message(PROC_EVENT_FORK, 7, &[100, 100, 200, 200]);
        // A thread of 100: child pid 201 in process 100.
        datagram.extend(message(PROC_EVENT_FORK, 8, &[100, 100, 201, 100]));
        datagram.extend(message(PROC_EVENT_EXEC, 9, &[200, 200]));
        // Exit (0x80000000): not wanted.
        datagram.extend(message(0x8000_0000, 10, &[200, 200, 0, 0, 100, 100]));
        let mut out = Vec::new();
        parse(&datagram, &mut out);
        assert_eq!(
            out,
            [
                ProcEvent::Fork {
                    parent: 100,
                    child: 200,
                    ts_ns: 7
                },
                ProcEvent::Exec { pid: 200 }
            ]
        );
    }

    #[test]
    fn malformed_datagrams_are_skipped() {
        let whole = message(PROC_EVENT_FORK, 7, &[100, 100, 200, 200]);
        for cut in 0..whole.len() {
            let mut out = Vec::new();
            parse(&whole[..cut], &mut out);
            assert!(out.len() <= 1);
        }
        let mut out = Vec::new();
        // A length shorter than a header, and one longer than the datagram.
        parse(&3u32.to_ne_bytes(), &mut out);
        parse(&[&1000u32.to_ne_bytes()[..], &[0; 40]].concat(), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn this_process_s_fork_is_told() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: the proc connector needs root");
            return;
        }
        let mut events = ProcEvents::subscribe().unwrap();
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let me = std::process::id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut out = Vec::new();
        while !out
            .iter()
            .any(|e| matches!(e, ProcEvent::Fork { parent, child, .. } if *parent == me && *child == pid))
        {
            assert!(std::time::Instant::now() < deadline, "no fork event: {out:?}");
            events.drain(&mut out).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut child = child;
        child.wait().unwrap();
    }
}
