//! Spawn mode, `leaktrace -- CMD ARGS...`: the command is forked but held before `exec` until
//! the probes are attached to it, so its very first allocation is traced.
//!
//! Uprobes are attached to the allocator's file (an inode) with a filter on the child's pid;
//! perf events on a task stay across `exec`, so they fire as soon as the new image has mapped
//! that file. Which files the command will load is decided by [`libraries`] alone.

use std::{
    ffi::{CString, OsStr},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::proc::{files, maps::ProcMaps};

/// A command forked and waiting, before `exec`, for [`Child::release`].
pub struct Child {
    pub pid: u32,
    /// Closing it without writing makes the child exit (127) instead of running untraced.
    release: Option<OwnedFd>,
    reaped: bool,
}

impl Child {
    /// Forks `command`; the child waits before `exec`.
    pub fn fork(program: &Path, command: &[String]) -> anyhow::Result<Self> {
        // Everything the child needs is allocated before fork: after it, only async-signal-safe
        // calls (close, read, execv, _exit).
        let path = CString::new(program.as_os_str().as_bytes())
            .context("the command's path contains a NUL byte")?;
        let args: Vec<CString> = command
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<_, _>>()
            .context("an argument of the command contains a NUL byte")?;
        let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error()).context("creating a pipe");
        }
        // SAFETY: fresh fds that nothing else owns.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: leaktrace is single-threaded here (no reporter, no runtime yet); the child
        // only makes async-signal-safe calls on memory prepared above.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("forking the command");
        }
        if pid == 0 {
            // SAFETY: the child: wait for one byte, then exec; anything else ends it.
            unsafe {
                libc::close(write_end.as_raw_fd());
                let mut byte = 0u8;
                let n = loop {
                    let n = libc::read(read_end.as_raw_fd(), (&raw mut byte).cast(), 1);
                    if n >= 0 || *libc::__errno_location() != libc::EINTR {
                        break n;
                    }
                };
                if n == 1 {
                    libc::execv(path.as_ptr(), argv.as_ptr());
                }
                libc::_exit(127);
            }
        }
        drop(read_end);
        Ok(Self {
            pid: pid as u32,
            release: Some(write_end),
            reaped: false,
        })
    }

    /// Lets the command `exec`.
    pub fn release(&mut self) -> anyhow::Result<()> {
        let fd = self.release.take().context("released twice")?;
        // SAFETY: writes one byte from a local.
        let n = unsafe { libc::write(fd.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        if n != 1 {
            return Err(std::io::Error::last_os_error()).context("starting the command");
        }
        Ok(())
    }

    /// Waits for the command to exit; its exit code, or 128 + the signal that killed it.
    pub fn wait(&mut self) -> anyhow::Result<i32> {
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child.
            let r = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut status, 0) };
            if r >= 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err).context("waiting for the command");
            }
        }
        self.reaped = true;
        Ok(if libc::WIFSIGNALED(status) {
            128 + libc::WTERMSIG(status)
        } else {
            libc::WEXITSTATUS(status)
        })
    }

    pub fn signal(&self, signal: i32) {
        if !self.reaped {
            // SAFETY: signals our own, not yet reaped, child.
            unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        }
    }
}

impl Drop for Child {
    /// A child that was never released exits when the pipe closes; reap it.
    fn drop(&mut self) {
        if !self.reaped && self.release.take().is_some() {
            let _ = self.wait();
        }
    }
}

/// The executable that `program` names: a path, or a name looked up in `PATH`.
pub fn find_program(program: &str) -> anyhow::Result<PathBuf> {
    let is_executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| {
            use std::os::unix::fs::PermissionsExt as _;
            m.is_file() && m.permissions().mode() & 0o111 != 0
        })
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        if is_executable(&path) {
            return Ok(path);
        }
        bail!("{program} is not an executable file");
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
        .with_context(|| format!("no command `{program}` in PATH"))
}

/// The libraries `program` will load, in load order, as its dynamic loader (`PT_INTERP`)
/// resolves them (`ld.so --list`, which honours `LD_PRELOAD`); none for a static executable.
pub fn libraries(program: &Path) -> anyhow::Result<Vec<PathBuf>> {
    // leaktrace's own file (the command to run), read as the target's are: never a FIFO or a
    // device, never without bound.
    let data = files::open(std::process::id(), files::TargetFile::Path(program))
        .and_then(|opened| opened.read_all())
        .with_context(|| format!("reading {}", program.display()))?;
    if data.starts_with(b"#!") {
        bail!(
            "{} is a script: leaktrace traces the process it starts, not that process's children; \
             run the program itself (`leaktrace -- PROGRAM ARGS`) or attach with -p",
            program.display()
        );
    }
    let Some(interpreter) = interpreter(&data)
        .with_context(|| format!("{} is not an ELF executable", program.display()))?
    else {
        return Ok(Vec::new());
    };
    let out = Command::new(&interpreter)
        .arg("--list")
        .arg(program)
        .output()
        .with_context(|| format!("running {} --list", interpreter.display()))?;
    Ok(libraries_in_listing(&String::from_utf8_lossy(&out.stdout)))
}

/// The `PT_INTERP` of an ELF file; `None` for a static binary.
fn interpreter(data: &[u8]) -> Option<Option<PathBuf>> {
    use object::read::elf::{FileHeader as _, ProgramHeader as _};
    let elf = object::read::elf::ElfFile64::<object::Endianness>::parse(data).ok()?;
    let endian = elf.endian();
    let headers = elf.elf_header().program_headers(endian, data).ok()?;
    Some(
        headers
            .iter()
            .find(|h| h.p_type(endian) == object::elf::PT_INTERP)
            .and_then(|h| h.data(endian, data).ok())
            .map(|bytes| {
                let bytes = bytes.split(|&b| b == 0).next().unwrap_or_default();
                PathBuf::from(OsStr::from_bytes(bytes))
            }),
    )
}

/// The paths in `ld.so --list` output: `libc.so.6 => /lib/.../libc.so.6 (0x...)` lines, and
/// `/path/lib.so (0x...)` lines (`LD_PRELOAD`ed libraries, the loader itself), in order.
pub(crate) fn libraries_in_listing(listing: &str) -> Vec<PathBuf> {
    listing
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = line.split_once(" => ").map_or(line, |(_, path)| path);
            let path = path.split(" (").next()?.trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Keeps the memory map of a spawned command current (`AddressSpace::pushed_maps`): its
/// libraries are mapped just after `exec`, and a short command may be gone (a zombie, with no
/// map) before its events are read. Often at first, then every 50 ms, until stopped or the
/// command exits.
pub struct MapsWatcher {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl MapsWatcher {
    pub fn start(pid: u32, maps: mpsc::Sender<ProcMaps>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let handle = thread::Builder::new()
            .name("maps-watcher".into())
            .spawn(move || {
                let start = Instant::now();
                let mut last = ProcMaps::default();
                while !stopped.load(Ordering::Relaxed) {
                    let Ok(read) = ProcMaps::read(pid) else {
                        return;
                    };
                    if read.mappings.is_empty() {
                        return; // exited
                    }
                    if read.mappings != last.mappings {
                        if maps.send(read.clone()).is_err() {
                            return;
                        }
                        last = read;
                    }
                    let pause = if start.elapsed() < Duration::from_millis(500) {
                        Duration::from_millis(1)
                    } else {
                        Duration::from_millis(50)
                    };
                    thread::sleep(pause);
                }
            })?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for MapsWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_libraries_in_load_order_from_a_loader_listing() {
        let listing = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                       \t/usr/lib/libjemalloc.so.2 (0x00007f0)\n\
                       \tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f1)\n\
                       \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                       \tlibgone.so.1 => not found\n\
                       \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            libraries_in_listing(listing),
            [
                "/usr/lib/libjemalloc.so.2",
                "/lib/x86_64-linux-gnu/libm.so.6",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(libraries_in_listing("").is_empty());
    }

    #[test]
    fn resolves_the_libc_of_a_system_command_and_refuses_what_is_not_elf() {
        let sh = find_program("sh").unwrap();
        let loaded = libraries(&sh).unwrap();
        let allocator =
            crate::attach::allocator::discover_files(std::process::id(), &sh, &loaded).unwrap();
        assert_eq!(allocator.name(), "glibc");
        assert!(
            allocator.module().ends_with("/libc.so.6"),
            "{}",
            allocator.module()
        );
        assert!(find_program("no-such-command-here").is_err());
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let err = libraries(&script).unwrap_err().to_string();
        assert!(err.contains("is a script"), "{err}");
        std::fs::write(&script, "text").unwrap();
        let err = libraries(&script).unwrap_err().to_string();
        assert!(err.contains("is not an ELF executable"), "{err}");
    }

    #[test]
    fn a_held_child_runs_only_when_released() {
        let program = find_program("true").unwrap();
        let mut child = Child::fork(&program, &["true".into()]).unwrap();
        thread::sleep(Duration::from_millis(50));
        // Still held: not exited.
        let mut status = 0;
        // SAFETY: polls our own child.
        let r = unsafe { libc::waitpid(child.pid as libc::pid_t, &mut status, libc::WNOHANG) };
        assert_eq!(r, 0, "the child waits before exec");
        child.release().unwrap();
        assert_eq!(child.wait().unwrap(), 0);
        // Dropped unreleased: it exits 127 without running.
        let held = Child::fork(&find_program("false").unwrap(), &["false".into()]).unwrap();
        let pid = held.pid;
        drop(held);
        // SAFETY: the pid was reaped by drop: waitpid fails.
        assert_eq!(
            unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) },
            -1
        );
    }
}
