//! The process to trace: that it exists, that we may trace it, and which allocator it uses.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use crate::{
    elf_symbols::{ElfSymbols, executable_ranges},
    probe_point::{Segment, emulated_probe_point},
    proc_maps::{ProcMaps, path_in_target},
};

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

/// Allocator entry points, as exported by glibc (and by the other allocators that replace
/// malloc with the same names).
pub const ENTRY_POINTS: [&str; 13] = [
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
    "free",
    "mmap",
    "munmap",
    "mremap",
];

/// The module that provides `malloc` to the target, and where to attach in it.
#[derive(Debug)]
pub struct Allocator {
    /// As the target names it.
    pub module: String,
    /// Where this process opens it (through the target's root).
    pub path: PathBuf,
    /// Entry point name and file offset, for those the module has.
    pub entry_points: Vec<(&'static str, u64)>,
    /// Where `free` is probed: its entry, or a later instruction that the kernel emulates
    /// rather than single-steps (see `probe_point`).
    pub free_probe_offset: u64,
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
        let libc = maps
            .mappings
            .iter()
            .find(|m| m.is_file() && m.is_executable() && is_libc(m.file_name()))
            .with_context(|| {
                format!(
                    "process {pid} ({command}) maps no glibc (a static binary, or another C library): \
                     leaktrace traces glibc's malloc for now"
                )
            })?;
        let path = path_in_target(pid, &libc.path);
        let symbols = ElfSymbols::read(&path)
            .with_context(|| format!("reading the allocator of process {pid}"))?;
        let entry_points: Vec<_> = ENTRY_POINTS
            .iter()
            .filter_map(|&name| symbols.file_offset(name).map(|offset| (name, offset)))
            .collect();
        for required in ["malloc", "free"] {
            if !entry_points.iter().any(|&(name, _)| name == required) {
                bail!(
                    "{} exports no `{required}`: leaktrace cannot trace this allocator",
                    libc.path
                );
            }
        }
        let free = entry_points
            .iter()
            .find(|&&(name, _)| name == "free")
            .map_or(0, |&(_, offset)| offset);
        let allocator = Allocator {
            module: libc.path.clone(),
            free_probe_offset: free_probe_point(&path, free),
            path,
            entry_points,
        };
        Ok(Self {
            pid,
            command,
            allocator,
            maps,
        })
    }
}

/// `free`'s probe point in the module at `path`; its entry when the code cannot be read.
fn free_probe_point(path: &Path, free: u64) -> u64 {
    let Ok(data) = fs::read(path) else {
        return free;
    };
    let Ok(ranges) = executable_ranges(&data) else {
        return free;
    };
    let segments: Vec<Segment<'_>> = ranges
        .iter()
        .map(|&(offset, size)| Segment {
            bytes: &data[offset as usize..(offset + size) as usize],
            file_offset: offset,
        })
        .collect();
    emulated_probe_point(&segments, free)
}

pub fn is_alive(pid: u32) -> bool {
    // A zombie has exited: it runs no more code and has no memory map.
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

fn is_libc(file_name: &str) -> bool {
    file_name.starts_with("libc.so")
        || (file_name.starts_with("libc-") && file_name.ends_with(".so"))
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
    fn recognises_glibc_names() {
        assert!(is_libc("libc.so.6"));
        assert!(is_libc("libc-2.31.so"));
        assert!(!is_libc("libcrypto.so.3"));
        assert!(!is_libc("libc++.so.1"));
    }

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
            me.allocator.module.contains("libc"),
            "{}",
            me.allocator.module
        );
        assert!(
            me.allocator
                .entry_points
                .iter()
                .any(|&(name, _)| name == "malloc")
        );
        assert!(is_alive(me.pid));
        // Whatever it is, free's probe point is free's entry or within its first few bytes.
        let free = me
            .allocator
            .entry_points
            .iter()
            .find(|&&(name, _)| name == "free")
            .unwrap()
            .1;
        let at = me.allocator.free_probe_offset;
        assert!(
            (free..free + 16).contains(&at),
            "free at {free:#x}, probed at {at:#x}"
        );
        // Debian's glibc (2.36 on these machines) begins free with `test %rdi,%rdi` and a
        // conditional jump, which nothing else jumps into: the jump is the probe point.
        let code = fs::read(&me.allocator.path).unwrap();
        let entry = &code[free as usize..free as usize + 5];
        let is_jcc = |b: &[u8]| {
            (0x70..=0x7f).contains(&b[0]) || (b[0] == 0x0f && (0x80..=0x8f).contains(&b[1]))
        };
        if entry[..3] == [0x48, 0x85, 0xff] && is_jcc(&entry[3..]) {
            assert_eq!(at, free + 3);
        }
    }
}
