//! The tracers the bench compares: leaktrace (real or no-op programs) and a bpftrace script that
//! does what bcc's memleak does.

use std::{
    collections::BTreeMap,
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
    /// CPU seconds (user + system) that leaktrace's own process used while tracing, from the
    /// end of its attach to SIGINT.
    pub cpu_s: f64,
    /// CPU seconds it used to load and attach (the verifier's time included).
    pub attach_cpu_s: f64,
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
    /// The CPU seconds it had used when it said it was attached.
    attached_cpu_s: f64,
}

impl Tracing {
    pub fn start(tracer: Tracer, pid: u32, dir: &Path) -> anyhow::Result<Self> {
        match tracer {
            Tracer::None => Ok(Self {
                child: None,
                report: None,
                lines: None,
                early: Vec::new(),
                attached_cpu_s: 0.0,
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
        let Some(child) = self.child.take() else {
            return Ok(None);
        };
        // Loading and attaching (seconds of the verifier's time for some programs) are not
        // what tracing costs per second: on a short run they would dominate.
        let cpu_s = cpu_seconds(child.0.id()) - self.attached_cpu_s;
        let interrupted = Instant::now();
        let status = interrupt(child)?;
        let detach_s = interrupted.elapsed().as_secs_f64();
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
            attach_cpu_s: self.attached_cpu_s,
            programs,
            detach_s,
            stack_copies,
            stderr: rest,
        }))
    }
}

impl Tracing {
    /// Stops a `count_calls` bpftrace: function -> calls.
    pub fn counts(mut self) -> anyhow::Result<BTreeMap<String, u64>> {
        let child = self.child.take().context("nothing traced")?;
        let status = interrupt(child)?;
        if !status.success() {
            bail!("bpftrace failed ({status})");
        }
        let mut counts = BTreeMap::new();
        if let Some(lines) = &self.lines {
            while let Ok(line) = lines.recv_timeout(Duration::from_secs(5)) {
                if let Some((function, calls)) = parse_count(&line) {
                    counts.insert(function, calls);
                }
            }
        }
        Ok(counts)
    }
}

/// bpftrace's `@calls[uprobe:/lib/libjemalloc.so.2:malloc]: 1234`: the function, its calls.
fn parse_count(line: &str) -> Option<(String, u64)> {
    let (probe, calls) = line.strip_prefix("@calls[")?.split_once("]: ")?;
    let function = probe.rsplit(':').next()?;
    Some((function.to_owned(), calls.trim().parse().ok()?))
}

/// SIGINT to `child` (as Ctrl-C would), then its exit status.
fn interrupt(mut child: Child) -> anyhow::Result<std::process::ExitStatus> {
    // SAFETY: a plain syscall; the pid is our child's, not yet reaped.
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.0.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("the tracer did not stop within 60 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(2));
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
    let attached_cpu_s = cpu_seconds(child.0.id());
    Ok(Tracing {
        child: Some(child),
        report: Some(report),
        lines: Some(lines),
        early,
        attached_cpu_s,
    })
}

/// The module whose file name starts with `name` that the process maps, as bpftrace wants it
/// (a path in our namespace; the bench's fixtures and services share it).
fn module_of(pid: u32, name: &str) -> anyhow::Result<String> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("reading the memory map of pid {pid}"))?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            Path::new(path)
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(name))
        })
        .map(str::to_owned)
        .with_context(|| format!("pid {pid} maps no {name}"))
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
    fs::write(&script, memleak_script(&module_of(pid, "libc.so")?))
        .with_context(|| format!("writing {}", script.display()))?;
    bpftrace_script(pid, &script)
}

/// Calls of each of `functions` in `module` while it runs (`counts` reads them).
pub fn count_calls(
    pid: u32,
    module: &str,
    functions: &[&str],
    dir: &Path,
) -> anyhow::Result<Tracing> {
    let module = module_of(pid, module)?;
    let probes: Vec<String> = functions
        .iter()
        .map(|f| format!("uprobe:{module}:{f}"))
        .collect();
    let script = dir.join("count_calls.bt");
    fs::write(
        &script,
        // `probe`, not `func`, which printed some of them as bare addresses. The predicate:
        // bpftrace 0.17's `-p` does not keep a library's probes to the process, and
        // redis-benchmark maps the same libjemalloc (its calls were counted too).
        format!(
            "{} /pid == {pid}/ {{ @calls[probe] = count(); }}\n",
            probes.join(", ")
        ),
    )
    .with_context(|| format!("writing {}", script.display()))?;
    bpftrace_script(pid, &script)
}

/// bpftrace running `script` on `pid`, once its probes are attached.
fn bpftrace_script(pid: u32, script: &Path) -> anyhow::Result<Tracing> {
    let mut child = Child(
        Command::new("bpftrace")
            .arg("-p")
            .arg(pid.to_string())
            .arg(script)
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
        attached_cpu_s: 0.0,
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
    fn parses_call_counts() {
        assert_eq!(
            parse_count("@calls[uprobe:/usr/lib/libjemalloc.so.2:sdallocx]: 40012"),
            Some(("sdallocx".into(), 40012))
        );
        assert_eq!(parse_count("@calls[malloc]: many"), None);
        assert_eq!(parse_count("Attaching 3 probes..."), None);
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
        let libc = module_of(std::process::id(), "libc.so").unwrap();
        assert!(libc.contains("libc.so"), "{libc}");
    }
}
