//! One owner per traced process: its pid and command line, and its address space (the memory
//! map with a count of its changes, the modules it maps, the code that keeps frame pointers).
//! The unwinder, the stack table, the update of the BPF side's `UNWIND_ROWS` and spawn mode all
//! consult it; nothing else reads the target's memory map.

pub mod address_space;
pub mod cfi;
pub mod modules;

use std::{path::Path, sync::Arc};

use anyhow::bail;

use self::{address_space::AddressSpace, modules::Modules};
use crate::proc::{maps::ProcMaps, process};

/// A process to trace.
pub struct Target {
    pub pid: u32,
    pub command: String,
    pub space: AddressSpace,
    /// The (device, inode) of the program its probes were placed for: what it ran at attach,
    /// or what spawn mode's command will exec. Its children that run it are followed; once
    /// `/proc/PID/exe` names another file, it has exec'd something else.
    pub exe: Option<(u64, u64)>,
}

impl Target {
    /// A running process, that leaktrace may trace; its memory map as it is now.
    pub fn open(pid: u32, modules: &Arc<Modules>) -> anyhow::Result<Self> {
        if !process::exists(pid) {
            bail!("no process with pid {pid}: check the pid (`ps -p {pid}`)");
        }
        match process::tgid(pid) {
            // Tracing itself, leaktrace would report its own allocations, each of which makes
            // more events: a feedback loop.
            Some(tgid) if tgid == std::process::id() => {
                bail!("pid {pid} is leaktrace itself: give the pid of the process to trace")
            }
            // Probes scoped to one thread would see only that thread's calls.
            Some(tgid) if tgid != pid => {
                bail!("pid {pid} is a thread of process {tgid}: give the process, -p {tgid}")
            }
            _ => {}
        }
        let command = process::command(pid).unwrap_or_else(|| format!("pid {pid}"));
        let maps = ProcMaps::read(pid).map_err(|err| {
            if process::exists(pid) {
                anyhow::anyhow!("cannot read the memory map of pid {pid}: {err}")
            } else {
                anyhow::anyhow!("process {pid} exited before leaktrace could attach")
            }
        })?;
        Ok(Self {
            pid,
            command,
            space: AddressSpace::new(pid, maps, modules.clone()),
            exe: process::exe_id(pid),
        })
    }

    /// A command forked and held before its `exec` (spawn mode): its memory map is read once
    /// it runs. Until its exec it runs leaktrace's own program: `exe` is `program`'s, which it
    /// will run.
    pub fn spawned(pid: u32, program: &Path, command: &[String], modules: &Arc<Modules>) -> Self {
        Self {
            pid,
            command: command.join(" "),
            space: AddressSpace::new(pid, ProcMaps::default(), modules.clone()),
            exe: process::file_id(program),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_such_pid_says_so() {
        let err = Target::open(u32::MAX - 1, &Modules::new())
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            err,
            format!(
                "no process with pid {0}: check the pid (`ps -p {0}`)",
                u32::MAX - 1
            )
        );
    }

    #[test]
    fn leaktrace_itself_and_threads_are_refused() {
        let me = std::process::id();
        let err = Target::open(me, &Modules::new()).err().unwrap().to_string();
        assert_eq!(
            err,
            format!("pid {me} is leaktrace itself: give the pid of the process to trace")
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(200));
        });
        let tid = rx.recv().unwrap();
        let err = Target::open(tid, &Modules::new())
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with(&format!("pid {tid} is")), "{err}");
        thread.join().unwrap();
    }
}
