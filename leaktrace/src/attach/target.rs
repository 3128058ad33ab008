//! The process to trace: that it exists, that we may trace it, and which allocator it uses.

use std::fs;

use anyhow::{Context as _, bail};

use super::allocator::{self, Allocator};
use crate::proc::maps::ProcMaps;

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

#[derive(Debug)]
pub struct Target {
    pub pid: u32,
    pub command: String,
    pub allocator: Allocator,
    /// The memory map at attach: it still resolves addresses to files after the target exits.
    pub maps: ProcMaps,
}

impl Target {
    pub fn open(pid: u32) -> anyhow::Result<Self> {
        if pid == 0 || !fs::exists(format!("/proc/{pid}")).unwrap_or(false) {
            bail!("no process with pid {pid}: check the pid (`ps -p {pid}`)");
        }
        let command = read_command(pid).unwrap_or_else(|| format!("pid {pid}"));
        let maps = ProcMaps::read(pid).map_err(|err| {
            if fs::exists(format!("/proc/{pid}")).unwrap_or(false) {
                anyhow::anyhow!("cannot read the memory map of pid {pid}: {err}")
            } else {
                anyhow::anyhow!("process {pid} exited before leaktrace could attach")
            }
        })?;
        let allocator = allocator::discover(pid, &maps)
            .with_context(|| format!("process {pid} ({command})"))?;
        Ok(Self {
            pid,
            command,
            allocator,
            maps,
        })
    }
}

pub fn is_alive(pid: u32) -> bool {
    // A zombie has exited: it runs no more code and has no memory map.
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

fn read_command(pid: u32) -> Option<String> {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let words: Vec<_> = cmdline
        .split(|&b| b == 0)
        .filter(|w| !w.is_empty())
        .map(String::from_utf8_lossy)
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_such_pid_says_so() {
        let err = Target::open(u32::MAX - 1).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "no process with pid {0}: check the pid (`ps -p {0}`)",
                u32::MAX - 1
            )
        );
    }

    #[test]
    fn finds_glibc_in_this_process() {
        let me = Target::open(std::process::id()).unwrap();
        assert!(
            me.allocator.module().contains("libc"),
            "{}",
            me.allocator.module()
        );
        assert!(
            me.allocator
                .entry_points
                .iter()
                .any(|e| e.symbol == "malloc")
        );
        assert!(is_alive(me.pid));
    }
}
