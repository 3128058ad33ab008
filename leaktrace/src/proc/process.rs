//! What `/proc` says about a process: whether it exists and runs, its command line, its
//! resident set, its executable, the children it forked; and a pidfd to wait for its exit.

use std::{
    fs,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
};

use anyhow::{Context as _, bail};

/// Capabilities that tracing needs: BPF and PERFMON (or SYS_ADMIN, which implies both on older
/// kernels), and SYS_ADMIN for `/proc/PID/map_files`.
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Fails with what to do when this process lacks the capabilities tracing needs.
pub fn check_privileges() -> anyhow::Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff line in /proc/self/status")?;
    let has = |cap: u32| effective & (1 << cap) != 0;
    if !(has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))) {
        bail!("leaktrace needs root (CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN): run it with sudo");
    }
    Ok(())
}

/// A process with this pid exists (it may be a zombie).
pub fn exists(pid: u32) -> bool {
    pid != 0 && fs::exists(format!("/proc/{pid}")).unwrap_or(false)
}

pub fn is_alive(pid: u32) -> bool {
    // A zombie has exited: it runs no more code and has no memory map.
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// The CPU time (user and system, in ns) that process `pid` used so far, all its threads
/// together, those that exited included: its process CPU-time clock.
pub fn cpu_time_ns(pid: u32) -> Option<u64> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    let mut clock: libc::clockid_t = 0;
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both write one value of their own type.
    let ok = unsafe {
        libc::clock_getcpuclockid(pid, &mut clock) == 0 && libc::clock_gettime(clock, &mut now) == 0
    };
    if !ok {
        return None;
    }
    let secs = u64::try_from(now.tv_sec).ok()?;
    let nanos = u64::try_from(now.tv_nsec).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// The process (thread group) that task `pid` belongs to.
pub fn tgid(pid: u32) -> Option<u32> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// Its command line, the arguments joined by spaces.
pub fn command(pid: u32) -> Option<String> {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let words: Vec<_> = cmdline
        .split(|&b| b == 0)
        .filter(|w| !w.is_empty())
        .map(String::from_utf8_lossy)
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

/// Its name (`/proc/PID/comm`: the executable's file name, up to 15 bytes, or what the
/// process set with `prctl`); `None` once it has exited.
pub fn comm(pid: u32) -> Option<String> {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.strip_suffix('\n').unwrap_or(&comm).to_owned())
}

/// The target's resident set (`VmRSS` of /proc/PID/status); `None` once it has exited.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

pub(crate) fn parse_vm_rss(status: &str) -> Option<u64> {
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    kib.checked_mul(1024)
}

/// The (device, inode) of a process's executable.
pub fn exe_id(pid: u32) -> Option<(u64, u64)> {
    file_id(format!("/proc/{pid}/exe"))
}

/// The (device, inode) of the file `path` names, through symlinks: what `exe_id` gives for a
/// process that runs it.
pub fn file_id(path: impl AsRef<std::path::Path>) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The children that the threads of a process forked, as `/proc/PID/task/*/children` lists
/// them.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .flat_map(|task| {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            children
                .split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Its memory, to read with `FileExt::read_exact_at` at its addresses.
pub fn memory(pid: u32) -> std::io::Result<fs::File> {
    fs::File::open(format!("/proc/{pid}/mem"))
}

/// A pidfd of the process: readable once it exits.
pub fn pidfd(pid: u32) -> anyhow::Result<OwnedFd> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_counts_the_work_of_every_thread() {
        let me = std::process::id();
        let before = cpu_time_ns(me).unwrap();
        // 20 ms of CPU time on another thread, which then exits: the process clock keeps it.
        std::thread::spawn(|| {
            let thread_ns = || {
                let mut t = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: writes one timespec.
                unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
                t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
            };
            let start = thread_ns();
            while thread_ns() < start + 20_000_000 {}
        })
        .join()
        .unwrap();
        let after = cpu_time_ns(me).unwrap();
        assert!(after >= before + 20_000_000, "{before} -> {after}");
        assert_eq!(cpu_time_ns(0x7fff_fff0), None, "no such process");
        assert_eq!(cpu_time_ns(u32::MAX), None, "not a pid");
    }

    #[test]
    fn reads_vm_rss() {
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t    1234 kB\nThreads: 1\n"),
            Some(1234 * 1024)
        );
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\tlots kB\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn this_process_exists_runs_and_has_a_command_line() {
        let me = std::process::id();
        assert!(exists(me) && is_alive(me));
        assert!(!exists(0) && !exists(u32::MAX - 1));
        assert!(command(me).is_some());
        assert!(exe_id(me).is_some());
        let name = comm(me).unwrap();
        assert!(!name.is_empty() && !name.contains('\n'), "{name:?}");
        assert_eq!(comm(u32::MAX - 1), None);
    }
}
