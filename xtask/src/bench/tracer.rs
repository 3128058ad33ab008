//! The tracers the bench compares: leaktrace (real or no-op programs) and a bpftrace script that
//! does what bcc's memleak does.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{ATTACH_TIMEOUT, lines_of, until_attached};
use crate::{Child, release_leaktrace};

#[derive(Clone, Copy, Debug)]
pub enum Tracer {
    None,
    /// leaktrace with these extra arguments.
    Leaktrace(&'static [&'static str]),
    Bpftrace,
}

/// What leaktrace's final report said.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub lost_events: u64,
    pub allocations: u64,
    pub frees: u64,
    /// Allocator returns whose entry had no record (BPF counter): allocations missed without
    /// being counted as lost.
    pub return_without_entry: u64,
    /// CPU seconds (user + system) that leaktrace's own process used while tracing.
    pub cpu_s: f64,
    /// Per BPF program: name, runs, total run time in ns (with `--print-program-times`).
    pub programs: Vec<(String, u64, u64)>,
    /// Seconds from SIGINT to leaktrace's exit: the final report, then detaching every probe.
    pub detach_s: f64,
    /// Allocations that came with a stack copy (`--unwind auto` or `dwarf`), as leaktrace said
    /// at its end.
    pub stack_copies: Option<u64>,
    /// Everything leaktrace wrote to stderr.
    pub stderr: Vec<String>,
}

/// `leaktrace: bpf program NAME runs=N run_time_ns=T`
fn parse_program_time(line: &str) -> Option<(String, u64, u64)> {
    let mut words = line
        .strip_prefix("leaktrace: bpf program ")?
        .split_whitespace();
    let name = words.next()?.to_owned();
    let runs = words.next()?.strip_prefix("runs=")?.parse().ok()?;
    let ns = words.next()?.strip_prefix("run_time_ns=")?.parse().ok()?;
    Some((name, runs, ns))
}

/// A tracer attached to a process; `stop` detaches it (and dropping it kills it).
pub struct Tracing {
    child: Option<Child>,
    report: Option<PathBuf>,
    /// Its output, read on a thread so that the tracer never blocks on a full pipe.
    lines: Option<mpsc::Receiver<String>>,
    /// What it wrote until it attached.
    early: Vec<String>,
}

impl Tracing {
    pub fn start(tracer: Tracer, pid: u32, dir: &Path) -> anyhow::Result<Self> {
        match tracer {
            Tracer::None => Ok(Self {
                child: None,
                report: None,
                lines: None,
                early: Vec::new(),
            }),
            Tracer::Leaktrace(extra) => leaktrace(&release_leaktrace(), pid, extra, dir),
            Tracer::Bpftrace => bpftrace(pid, dir),
        }
    }

    /// leaktrace from `binary` (another build) with these extra arguments.
    pub fn start_leaktrace(
        binary: &Path,
        extra: &[&str],
        pid: u32,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        leaktrace(binary, pid, extra, dir)
    }

    /// Interrupts the tracer (as Ctrl-C would) and waits for it; leaktrace's final report.
    pub fn stop(mut self) -> anyhow::Result<Option<Outcome>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let cpu_s = cpu_seconds(child.0.id());
        let interrupted = Instant::now();
        // SAFETY: a plain syscall; the pid is our child's, not yet reaped.
        unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGINT) };
        let deadline = interrupted + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.0.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!("the tracer did not stop within 60 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let detach_s = interrupted.elapsed().as_secs_f64();
        drop(child);
        let Some(report) = &self.report else {
            return Ok(None);
        };
        if !status.success() {
            bail!("leaktrace failed ({status})");
        }
        let text =
            fs::read_to_string(report).with_context(|| format!("reading {}", report.display()))?;
        let last = text.lines().last().context("leaktrace wrote no report")?;
        let json: serde_json::Value =
            serde_json::from_str(last).context("parsing leaktrace's report")?;
        let total = |name: &str| json["totals"][name].as_u64().unwrap_or(0);
        // The rest of its stderr, up to the end (the reader thread hangs up at EOF).
        let mut rest = std::mem::take(&mut self.early);
        if let Some(lines) = &self.lines {
            while let Ok(line) = lines.recv_timeout(Duration::from_secs(5)) {
                rest.push(line);
            }
        }
        let stats = rest
            .iter()
            .find_map(|line| line.strip_prefix("leaktrace: bpf stats "))
            .unwrap_or_default();
        let programs = rest
            .iter()
            .filter_map(|line| parse_program_time(line))
            .collect();
        let stat = |name: &str| {
            stats
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
                .unwrap_or(0)
        };
        // `leaktrace: pid N: C of A allocations came with a stack copy, ...`
        let stack_copies = rest.iter().find_map(|line| {
            let (_, tail) = line.split_once(": pid ")?;
            let (_, tail) = tail.split_once(": ")?;
            let (copies, tail) = tail.split_once(" of ")?;
            tail.contains("came with a stack copy")
                .then(|| copies.parse().ok())
                .flatten()
        });
        Ok(Some(Outcome {
            lost_events: total("lost_events"),
            allocations: total("allocations"),
            frees: total("frees"),
            return_without_entry: stat("return_without_entry"),
            cpu_s,
            programs,
            detach_s,
            stack_copies,
            stderr: rest,
        }))
    }
}

fn leaktrace(binary: &Path, pid: u32, extra: &[&str], dir: &Path) -> anyhow::Result<Tracing> {
    let report = dir.join("leaktrace.json");
    let mut child = Child(
        Command::new(binary)
            .args([
                "-p",
                &pid.to_string(),
                "--format",
                "json",
                "--interval",
                "3600",
            ])
            .arg("--print-bpf-stats")
            .arg("--output")
            .arg(&report)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting leaktrace")?,
    );
    let lines = lines_of(child.0.stderr.take().context("leaktrace stderr")?);
    // It says so once every probe is attached.
    let early = until_attached(&lines)?;
    Ok(Tracing {
        child: Some(child),
        report: Some(report),
        lines: Some(lines),
        early,
    })
}

/// The allocator module the process maps, as bpftrace wants it (a path in our namespace; the
/// bench's fixtures share it).
fn libc_of(pid: u32) -> anyhow::Result<String> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("reading the memory map of pid {pid}"))?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            Path::new(path)
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with("libc.so"))
        })
        .map(str::to_owned)
        .with_context(|| format!("pid {pid} maps no libc"))
}

/// What bcc's memleak does, in bpftrace: the requested size per thread at the entry, the block
/// with its size, time and user stack at the return, deleted at free (and at realloc's entry).
fn memleak_script(libc: &str) -> String {
    let entry = |f: &str| format!("uprobe:{libc}:{f}");
    let ret = |f: &str| format!("uretprobe:{libc}:{f}");
    let returning = [
        "malloc",
        "valloc",
        "pvalloc",
        "calloc",
        "realloc",
        "memalign",
        "aligned_alloc",
    ];
    format!(
        "{malloc}, {valloc}, {pvalloc} {{ @size[tid] = arg0; }}\n\
         {calloc} {{ @size[tid] = arg0 * arg1; }}\n\
         {realloc} {{ delete(@allocs[arg0]); @size[tid] = arg1; }}\n\
         {memalign}, {aligned_alloc} {{ @size[tid] = arg1; }}\n\
         {returns} /@size[tid]/ {{\n\
         \x20 if (retval != 0) {{ @allocs[retval] = (@size[tid], nsecs, ustack); }}\n\
         \x20 delete(@size[tid]);\n\
         }}\n\
         {free} {{ delete(@allocs[arg0]); }}\n\
         END {{ clear(@allocs); clear(@size); }}\n",
        malloc = entry("malloc"),
        valloc = entry("valloc"),
        pvalloc = entry("pvalloc"),
        calloc = entry("calloc"),
        realloc = entry("realloc"),
        memalign = entry("memalign"),
        aligned_alloc = entry("aligned_alloc"),
        returns = returning.map(ret).join(", "),
        free = entry("free"),
    )
}

fn bpftrace(pid: u32, dir: &Path) -> anyhow::Result<Tracing> {
    let script = dir.join("memleak.bt");
    fs::write(&script, memleak_script(&libc_of(pid)?))
        .with_context(|| format!("writing {}", script.display()))?;
    let mut child = Child(
        Command::new("bpftrace")
            .arg("-p")
            .arg(pid.to_string())
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // It complains that it cannot raise RLIMIT_MEMLOCK (this kernel does not need it)
            // and, at exit, that tracefs is not mounted (its probes go with their fds anyway).
            .stderr(Stdio::null())
            .spawn()
            .context("starting bpftrace")?,
    );
    let lines = lines_of(child.0.stdout.take().context("bpftrace stdout")?);
    let probes: usize = loop {
        match lines.recv_timeout(ATTACH_TIMEOUT) {
            Ok(line) => {
                if let Some(n) = line
                    .strip_prefix("Attaching ")
                    .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
                {
                    break n;
                }
            }
            Err(_) => bail!("bpftrace did not start within {ATTACH_TIMEOUT:?}"),
        }
    };
    // It prints that before attaching; each attached probe holds a perf event fd.
    let deadline = Instant::now() + ATTACH_TIMEOUT;
    while perf_event_fds(child.0.id()) < probes {
        if child.0.try_wait()?.is_some() {
            bail!(
                "bpftrace exited while attaching (run {} by hand to see why)",
                script.display()
            );
        }
        if Instant::now() > deadline {
            bail!("bpftrace did not attach within {ATTACH_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Tracing {
        child: Some(child),
        report: None,
        lines: Some(lines),
        early: Vec::new(),
    })
}

/// User + system CPU time of a live process, from /proc/PID/stat (fields 14 and 15, in ticks).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command, which may contain spaces, start at field 3.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(14) + ticks(15)) as f64 / hz
}

fn perf_event_fds(pid: u32) -> usize {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.filter_map(Result::ok)
        .filter(|fd| {
            fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy() == "anon_inode:[perf_event]")
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memleak_script_probes_every_allocating_function_and_free() {
        let script = memleak_script("/lib/libc.so.6");
        for f in [
            "malloc",
            "calloc",
            "realloc",
            "memalign",
            "aligned_alloc",
            "valloc",
            "pvalloc",
        ] {
            assert!(
                script.contains(&format!("uprobe:/lib/libc.so.6:{f}")),
                "{f}"
            );
            assert!(
                script.contains(&format!("uretprobe:/lib/libc.so.6:{f}")),
                "{f}"
            );
        }
        assert!(script.contains("uprobe:/lib/libc.so.6:free { delete(@allocs[arg0]); }"));
    }

    #[test]
    fn parses_program_times() {
        assert_eq!(
            parse_program_time("leaktrace: bpf program alloc_return runs=12 run_time_ns=3400"),
            Some(("alloc_return".into(), 12, 3400))
        );
        assert_eq!(parse_program_time("leaktrace: bpf program x runs=1"), None);
        assert_eq!(parse_program_time("leaktrace: tracing pid 1"), None);
    }

    #[test]
    fn finds_libc_in_this_process() {
        let libc = libc_of(std::process::id()).unwrap();
        assert!(libc.contains("libc.so"), "{libc}");
    }
}
