//! Helpers that make a test read like its scenario: compile a fixture, start it, attach
//! leaktrace, drive the fixture, stop leaktrace, read its last report.

use std::{
    ffi::CString,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::fd::FromRawFd as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};
use serde_json::Value;

pub const LEAKTRACE: &str = env!("CARGO_BIN_EXE_leaktrace");
const TIMEOUT: Duration = Duration::from_secs(30);
const DETACH_TIMEOUT: Duration = Duration::from_secs(120);

/// Tests that load BPF need root. Outside CI they skip (and say so); under `CI=true` a skip
/// would hide a broken suite, so they fail instead.
pub fn require_root() -> bool {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "BPF tests must run as root under CI=true"
    );
    eprintln!("skipping: needs root (run `sudo -E cargo xtask test`)");
    false
}

/// Whether `what`, which `cargo xtask setup` installs, is here. Outside CI a test without it
/// skips and says so; under `CI=true` a skip would hide a broken setup, so it fails instead.
pub fn installed(what: &str, present: bool) -> bool {
    if !present {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{what} is missing: run `cargo xtask setup`"
        );
        eprintln!("skipping: {what} is not installed (run `cargo xtask setup`)");
    }
    present
}

/// Whether every one of these commands is on the PATH.
pub fn have_commands(commands: &[&str]) -> bool {
    commands.iter().all(|command| {
        Command::new("sh")
            .args(["-c", &format!("command -v {command}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// A fixture compiled into a temporary directory.
pub struct Binary {
    pub _dir: tempfile::TempDir,
    pub path: PathBuf,
}

/// `tests/fixtures/<name>.c` is built with gcc, `<name>.cpp` with g++; `extra_flags` come last,
/// so they override the defaults (`-O2 -fomit-frame-pointer`, `-shared -fPIC`).
pub fn compile(name: &str, extra_flags: &[&str]) -> Binary {
    if fixtures_dir().join(format!("{name}.cpp")).exists() {
        compile_source("g++", &format!("{name}.cpp"), name, extra_flags)
    } else {
        compile_source("gcc", &format!("{name}.c"), name, extra_flags)
    }
}

/// A C++ fixture, `tests/fixtures/<name>.cc`, compiled with g++ into `<output>`.
pub fn compile_cxx(name: &str, output: &str, extra_flags: &[&str]) -> Binary {
    compile_source("g++", &format!("{name}.cc"), output, extra_flags)
}

fn compile_source(compiler: &str, file: &str, output: &str, extra_flags: &[&str]) -> Binary {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(output);
    let source = fixtures_dir().join(file);
    let out = Command::new(compiler)
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
        .arg(&path)
        .arg(&source)
        .args(extra_flags)
        .output()
        .expect("gcc runs");
    assert!(
        out.status.success(),
        "{compiler} {}: {}",
        source.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Binary { _dir: dir, path }
}

/// A running fixture that speaks the line protocol of `tests/fixtures/leaky.c`: it prints
/// "ready", runs a round per line on stdin and prints "done" after each, and exits when
/// stdin closes. Killed on drop.
pub struct Fixture {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Binary {
    /// A binary that a test built itself into `dir`, which is removed with it.
    pub fn new(dir: tempfile::TempDir, path: PathBuf) -> Self {
        Self { _dir: dir, path }
    }
}

impl Fixture {
    pub fn start(binary: &Binary, args: &[&str]) -> Self {
        Self::start_command(Command::new(&binary.path).args(args))
    }

    /// Starts the fixture with a command of the caller's (a wrapper such as `unshare`, an
    /// environment such as `LD_PRELOAD`).
    pub fn start_command(command: &mut Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("fixture starts");
        let stdin = child.stdin.take();
        let lines = line_reader(child.stdout.take().unwrap());
        let mut fixture = Self {
            child,
            stdin,
            lines,
        };
        fixture.expect_line("ready");
        fixture
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn expect_line(&mut self, want: &str) {
        let line = self
            .lines
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|_| panic!("fixture never printed {want:?}"));
        assert_eq!(line, want);
    }

    /// Runs one round, waits until it is done, and returns what the fixture printed before
    /// "done".
    pub fn round(&mut self) -> Vec<String> {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
        self.lines_until_done()
    }

    /// What the fixture prints up to its next "done" (after a command sent with `send`).
    pub fn lines_until_done(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            match self.lines.recv_timeout(TIMEOUT) {
                Ok(line) if line == "done" => return lines,
                Ok(line) => lines.push(line),
                Err(_) => panic!("fixture never said done; printed {lines:?}"),
            }
        }
    }

    /// Sends one line, without waiting for an answer (`patterns.c` runs by itself).
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Closes stdin and waits for the fixture to exit by itself.
    pub fn finish(mut self) -> ExitStatus {
        drop(self.stdin.take());
        wait_timeout(&mut self.child).expect("fixture exits when its stdin closes")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process that runs by itself (a service, the demo): killed when dropped, whatever happens
/// in between.
pub struct Service(pub Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn line_reader(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_timeout(child: &mut Child) -> Option<ExitStatus> {
    wait_timeout_for(child, TIMEOUT)
}

fn wait_timeout_for(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

/// leaktrace attached to a process, reporting JSON. Killed on drop.
pub struct Leaktrace {
    child: Child,
    /// Read as it comes: a report bigger than the pipe's buffer would otherwise block
    /// leaktrace's writes, and so its exit.
    stdout_lines: mpsc::Receiver<String>,
    stdout: Vec<String>,
    stderr_lines: mpsc::Receiver<String>,
    stderr: Vec<String>,
}

/// What leaktrace printed, once it has exited.
pub struct Outcome {
    pub status: ExitStatus,
    pub reports: Vec<Value>,
    pub stderr: Vec<String>,
}

impl Outcome {
    /// The final report, which every trace ends with.
    pub fn last(&self) -> &Value {
        let last = self
            .reports
            .last()
            .unwrap_or_else(|| panic!("no report; stderr: {:?}", self.stderr));
        assert_eq!(last["last"], true, "the final report comes last");
        last
    }
}

/// The final report of `pid` among all of leaktrace's reports (several processes traced).
pub fn last_of(reports: &[Value], pid: u32) -> &Value {
    let last = reports
        .iter()
        .rev()
        .find(|r| r["pid"] == pid)
        .unwrap_or_else(|| panic!("no report for pid {pid}"));
    assert_eq!(last["last"], true, "pid {pid}'s final report comes last");
    last
}

impl Leaktrace {
    /// Starts leaktrace and waits until its probes are attached.
    pub fn attach(pid: u32, extra: &[&str]) -> Self {
        let pid = pid.to_string();
        let mut args = vec!["-p", &pid, "--format", "json", "--interval", "0.5"];
        args.extend_from_slice(extra);
        Self::start(&args)
    }

    /// Starts leaktrace with exactly these arguments and waits until its probes are attached.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(args, Stdio::inherit())
    }

    /// Starts spawn mode's `leaktrace ARGS -- CMD`, whose command reads what is written to the
    /// returned stdin (and writes its lines among the reports, read with `wait_for_stdout`),
    /// and waits until its probes are attached.
    pub fn spawn_with_input(args: &[&str]) -> (Self, std::process::ChildStdin) {
        let mut this = Self::start_with(args, Stdio::piped());
        let stdin = this.child.stdin.take().unwrap();
        (this, stdin)
    }

    fn start_with(args: &[&str], stdin: Stdio) -> Self {
        let mut child = Command::new(LEAKTRACE)
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("leaktrace starts");
        let stdout_lines = line_reader(child.stdout.take().unwrap());
        let stderr_lines = line_reader(child.stderr.take().unwrap());
        let mut this = Self {
            child,
            stdout_lines,
            stdout: Vec::new(),
            stderr_lines,
            stderr: Vec::new(),
        };
        loop {
            match this.stderr_lines.recv_timeout(TIMEOUT) {
                Ok(line) => {
                    let attached = line.starts_with("leaktrace: tracing pid");
                    this.stderr.push(line);
                    if attached {
                        return this;
                    }
                }
                Err(_) => panic!("leaktrace did not attach; stderr: {:?}", this.stderr),
            }
        }
    }

    /// Waits until leaktrace prints a status line that starts with `prefix`.
    pub fn wait_for_stderr(&mut self, prefix: &str) {
        loop {
            match self.stderr_lines.recv_timeout(TIMEOUT) {
                Ok(line) => {
                    let found = line.starts_with(prefix);
                    self.stderr.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => panic!(
                    "leaktrace never printed {prefix:?}; stderr: {:?}",
                    self.stderr
                ),
            }
        }
    }

    /// Waits until a line that starts with `prefix` comes on stdout (spawn mode's command
    /// writes there too), and returns it.
    pub fn wait_for_stdout(&mut self, prefix: &str) -> String {
        loop {
            let line = self.stdout_lines.recv_timeout(TIMEOUT).unwrap_or_else(|_| {
                panic!("no line {prefix:?} on stdout; stdout: {:?}", self.stdout)
            });
            self.stdout.push(line.clone());
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    /// Waits for a report taken after `after_ms` (milliseconds since the epoch), and returns
    /// it: leaktrace has then read everything the target did before.
    pub fn wait_for_report(&mut self, after_ms: u64) -> Value {
        loop {
            let line = self
                .stdout_lines
                .recv_timeout(TIMEOUT)
                .unwrap_or_else(|_| panic!("no report after {after_ms} ms"));
            self.stdout.push(line);
            let line = self.stdout.last().unwrap();
            if !line.starts_with('{') {
                continue;
            }
            let report: Value = serde_json::from_str(line).unwrap();
            if report["timestamp_ms"].as_u64().unwrap() > after_ms {
                return report;
            }
        }
    }

    /// Where it serves `--metrics` (`http://ADDR/metrics`, said before it attached).
    pub fn metrics_address(&self) -> String {
        self.stderr
            .iter()
            .find_map(|line| line.strip_prefix("leaktrace: serving metrics at http://"))
            .and_then(|url| url.strip_suffix("/metrics"))
            .unwrap_or_else(|| panic!("no metrics address; stderr: {:?}", self.stderr))
            .to_owned()
    }

    /// The pid it said it traces first (`leaktrace: tracing pid N ...`): spawn mode's command.
    pub fn pid_of_command(&self) -> u32 {
        self.stderr
            .iter()
            .find_map(|line| line.strip_prefix("leaktrace: tracing pid "))
            .and_then(|rest| rest.split(' ').next())
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("no traced pid; stderr: {:?}", self.stderr))
    }

    /// leaktrace's own pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn interrupt(&self) {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
    }

    /// Waits for leaktrace to exit (it must, by itself or after `interrupt`).
    pub fn wait(mut self) -> Outcome {
        // Detaching takes the kernel ~85 ms per probe, one probe at a time machine-wide: with
        // tests (and allocators with many entry points) in parallel, that adds up.
        let status = wait_timeout_for(&mut self.child, DETACH_TIMEOUT).expect("leaktrace exits");
        // Until the end of its output.
        self.stdout.extend(self.stdout_lines.iter());
        while let Ok(line) = self.stderr_lines.recv_timeout(Duration::from_millis(200)) {
            self.stderr.push(line);
        }
        // Only JSON Lines on stdout are reports; other formats go to files.
        let reports = self
            .stdout
            .iter()
            .filter(|line| line.starts_with('{'))
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect();
        Outcome {
            status,
            reports,
            stderr: std::mem::take(&mut self.stderr),
        }
    }

    /// The scenario most tests run: attach to the fixture, run one round, stop, and check that
    /// leaktrace ended well.
    pub fn one_round(fixture: &mut Fixture, extra: &[&str]) -> Outcome {
        let trace = Self::attach(fixture.pid(), extra);
        fixture.round();
        let outcome = trace.stop();
        assert!(
            outcome.status.success(),
            "{} {:?}",
            outcome.status,
            outcome.stderr
        );
        outcome
    }

    pub fn stop(self) -> Outcome {
        self.interrupt();
        self.wait()
    }
}

impl Drop for Leaktrace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Now, in milliseconds since the epoch (the clock of a report's `timestamp_ms`).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Runs leaktrace to completion with these arguments (for the error cases).
pub fn run_leaktrace(args: &[&str]) -> std::process::Output {
    Command::new(LEAKTRACE)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("leaktrace runs")
}

/// The stack whose innermost named frame is `function`.
pub fn stack_of<'a>(report: &'a Value, function: &str) -> Option<&'a Value> {
    report["stacks"].as_array().unwrap().iter().find(|stack| {
        stack["frames"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|f| f["symbol"].as_str())
            == Some(function)
    })
}

/// Every function named anywhere in the report.
pub fn all_symbols(report: &Value) -> Vec<String> {
    report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|stack| stack["frames"].as_array().unwrap())
        .filter_map(|f| f["symbol"].as_str().map(str::to_owned))
        .collect()
}

/// The first bytes of the target's `malloc`, as the target sees them now.
pub fn malloc_bytes_in(pid: u32) -> [u8; 4] {
    use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let libc_path = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            path.rsplit('/')
                .next()
                .is_some_and(|name| name.starts_with("libc.so"))
        })
        .expect("the fixture maps libc")
        .to_owned();
    let data = std::fs::read(format!("/proc/{pid}/root{libc_path}")).unwrap();
    let elf = object::File::parse(&*data).unwrap();
    let vaddr = elf
        .dynamic_symbols()
        .find(|s| s.name() == Ok("malloc"))
        .unwrap()
        .address();
    let segment = elf
        .segments()
        .find(|s| s.address() <= vaddr && vaddr < s.address() + s.size())
        .unwrap();
    let file_offset = vaddr - segment.address() + segment.file_range().0;
    // The mapping of libc that holds that file offset.
    let addr = maps
        .lines()
        .filter(|line| line.ends_with(&libc_path))
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let (start, end) = (
                u64::from_str_radix(start, 16).ok()?,
                u64::from_str_radix(end, 16).ok()?,
            );
            let offset = u64::from_str_radix(fields.nth(1)?, 16).ok()?;
            (offset <= file_offset && file_offset < offset + (end - start))
                .then(|| start + file_offset - offset)
        })
        .expect("malloc is mapped");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut bytes = [0; 4];
    std::io::Seek::seek(&mut mem, std::io::SeekFrom::Start(addr)).unwrap();
    mem.read_exact(&mut bytes).unwrap();
    bytes
}

/// Outstanding memory of one site: the function that called the allocator, the bytes and
/// allocations it holds, and the report's `origin` (malloc, mmap, mmap_file).
pub type Site = (String, u64, u64, String);

/// The sites a fixture printed as `expect SITE BYTES COUNT ORIGIN` lines (fixture.h), sorted.
pub fn expected_sites(lines: &[String]) -> Vec<Site> {
    let mut sites: Vec<Site> = lines
        .iter()
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!((f.len(), f[0]), (5, "expect"), "{line}");
            (
                f[1].to_owned(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
                f[4].to_owned(),
            )
        })
        .collect();
    sites.sort();
    sites
}

/// Traces two rounds of the fixture `name` (tests/fixtures/NAME.c, which prints `expect`
/// lines) with leaktrace's `extra` arguments; returns the trace and the sites the fixture
/// counted. The fixture has finished.
pub fn trace_two_rounds(name: &str, extra: &[&str]) -> (Outcome, Vec<Site>) {
    let binary = compile(name, &[]);
    let mut fixture = Fixture::start(&binary, &[]);
    let trace = Leaktrace::attach(fixture.pid(), extra);
    fixture.round();
    let expected = fixture.round();
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    fixture.finish();
    (outcome, expected_sites(&expected))
}

/// A report's stacks summed per site (`frames[0]`, the allocator's caller) and origin, sorted.
/// An unrolled loop calls from several places, which are distinct stacks of the same site.
pub fn reported_sites(report: &Value) -> Vec<Site> {
    let mut sites = std::collections::BTreeMap::<(String, String), (u64, u64)>::new();
    for stack in report["stacks"].as_array().unwrap() {
        let site = stack["frames"][0]["symbol"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        let origin = stack["origin"].as_str().unwrap().to_owned();
        let entry = sites.entry((site, origin)).or_default();
        entry.0 += stack["outstanding_bytes"].as_u64().unwrap();
        entry.1 += stack["outstanding_allocations"].as_u64().unwrap();
    }
    let mut sites: Vec<Site> = sites
        .into_iter()
        .map(|((site, origin), (bytes, count))| (site, bytes, count, origin))
        .collect();
    sites.sort();
    sites
}

/// The file offset of the function `name` in the ELF file `data`.
pub fn file_offset_of(data: &[u8], name: &str) -> u64 {
    let file = object::File::parse(data).unwrap();
    let address = file
        .symbols()
        .chain(file.dynamic_symbols())
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("{name} in the fixture"))
        .address();
    file.segments()
        .find_map(|s| {
            let (offset, size) = s.file_range();
            (address >= s.address() && address < s.address() + size)
                .then(|| address - s.address() + offset)
        })
        .expect("a segment holds it")
}

/// A plain uprobe, no BPF program: a perf event of the kernel's uprobe PMU that counts hits
/// (as another tracer's probe would be). Closed (and so removed) on drop.
pub struct PlainUprobe(std::fs::File);

impl PlainUprobe {
    /// An entry probe.
    pub fn attach(path: &Path, offset: u64, pid: u32) -> Self {
        Self::open(path, offset, pid, false)
    }

    /// A return probe: the kernel replaces the return address of every call with its
    /// trampoline's.
    pub fn attach_return(path: &Path, offset: u64, pid: u32) -> Self {
        Self::open(path, offset, pid, true)
    }

    fn open(path: &Path, offset: u64, pid: u32, retprobe: bool) -> Self {
        let pmu: u32 = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")
            .expect("the uprobe PMU")
            .trim()
            .parse()
            .unwrap();
        let path = CString::new(path.to_str().unwrap()).unwrap();
        // struct perf_event_attr (PERF_ATTR_SIZE_VER5, 112 bytes): type, size, config (bit 0:
        // a return probe, /sys/bus/event_source/devices/uprobe/format/retprobe), then flags 0
        // (enabled), config1 = the path, config2 = the offset.
        let mut attr = [0u8; 112];
        attr[0..4].copy_from_slice(&pmu.to_ne_bytes());
        attr[4..8].copy_from_slice(&112u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&u64::from(retprobe).to_ne_bytes());
        attr[56..64].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
        attr[64..72].copy_from_slice(&offset.to_ne_bytes());
        // SAFETY: a valid attr of the size it says, and a path that outlives the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                attr.as_ptr(),
                pid as libc::pid_t,
                -1,
                -1,
                8u64, // PERF_FLAG_FD_CLOEXEC
            )
        };
        assert!(
            fd >= 0,
            "perf_event_open: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a new descriptor that nothing else owns.
        Self(unsafe { std::fs::File::from_raw_fd(fd as i32) })
    }

    /// Hits so far (returns, for a return probe).
    pub fn hits(&mut self) -> u64 {
        let mut count = [0u8; 8];
        std::io::Read::read_exact(&mut self.0, &mut count).unwrap();
        u64::from_ne_bytes(count)
    }
}
