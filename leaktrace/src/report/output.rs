//! Where reports go: stdout, one file, or a directory that gets a timestamped file per report
//! (`--output DIR`, `--keep N`).

use std::{
    collections::VecDeque,
    fs::{self, File},
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, bail};

use super::render::{Format, Style};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    File(PathBuf),
    /// A file per report; only the newest `keep` stay.
    Dir {
        dir: PathBuf,
        keep: Option<usize>,
    },
}

impl Destination {
    /// `--output PATH` (stdout without it); `keep` bounds the files of a directory.
    pub fn new(output: Option<&Path>, keep: Option<usize>) -> Self {
        match output {
            None => Self::Stdout,
            Some(path) if names_a_directory(path) => Self::Dir {
                dir: path.to_owned(),
                keep,
            },
            Some(path) => Self::File(path.to_owned()),
        }
    }
}

/// `--output PATH` is a directory when it is one, or ends with `/` (created then).
pub fn names_a_directory(path: &Path) -> bool {
    path.as_os_str().to_string_lossy().ends_with('/') || path.is_dir()
}

impl Destination {
    /// Colour and the terminal's width when reports go to a terminal, unless `NO_COLOR` is set
    /// (no-color.org); plain text otherwise.
    pub fn style(&self) -> Style {
        use std::io::IsTerminal as _;
        if *self != Destination::Stdout || !std::io::stdout().is_terminal() {
            return Style::default();
        }
        Style {
            color: std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            width: terminal_width(),
        }
    }
}

/// Why reports stopped being delivered. The trace stops at the first one (see `trace::run`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Stdout is a pipe or socket whose reader closed it (`| head -1`): nobody is listening.
    ReaderGone,
    /// A report could not be written; the message names the destination and the cause.
    WriteFailed(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ReaderGone => f.write_str("the reader of stdout went away"),
            Self::WriteFailed(message) => f.write_str(message),
        }
    }
}

/// Columns of the terminal on stdout.
fn terminal_width() -> Option<usize> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_col > 0).then_some(usize::from(size.ws_col))
}

/// The first [`Failure`] of any output of the trace, for the trace to stop on.
pub type Failures = tokio::sync::watch::Receiver<Option<Failure>>;

/// Writes rendered reports to their destination.
pub struct Output {
    destination: Destination,
    format: Format,
    pid: u32,
    /// Stdout, or the file that a stream format (text, JSON Lines) appends to; shared by the
    /// outputs of every traced process, a whole report at a time.
    stream: Option<Arc<Mutex<Stream>>>,
    /// Files this trace wrote to the directory, oldest first.
    written: VecDeque<PathBuf>,
    failure: Arc<tokio::sync::watch::Sender<Option<Failure>>>,
}

/// Where a stream format goes.
enum Stream {
    Stdout(io::Stdout),
    /// Opened to append: reports are added after what the file held.
    File {
        file: File,
        path: PathBuf,
    },
}

impl Output {
    /// Opens the destination now, so that a path that cannot be written fails before attach.
    /// Nothing that exists is changed: a whole-file format replaces FILE only with a complete
    /// report, and a stream format appends to it.
    pub fn open(destination: Destination, format: Format, pid: u32) -> anyhow::Result<Self> {
        let stream = match &destination {
            Destination::Stdout => {
                use std::io::IsTerminal as _;
                if format == Format::Pprof && io::stdout().is_terminal() {
                    bail!("a pprof profile is binary: write it to a file with -o FILE");
                }
                Some(Stream::Stdout(io::stdout()))
            }
            Destination::File(path) if format.is_whole_file() => {
                check_writable(directory_of(path))
                    .with_context(|| format!("cannot write {}", path.display()))?;
                None
            }
            Destination::File(path) => {
                let file = fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                Some(Stream::File {
                    file,
                    path: path.clone(),
                })
            }
            Destination::Dir { dir, .. } => {
                fs::create_dir_all(dir)
                    .with_context(|| format!("creating the directory {}", dir.display()))?;
                check_writable(dir).with_context(|| format!("writing into {}", dir.display()))?;
                None
            }
        };
        let (failure, _) = tokio::sync::watch::channel(None);
        let failure = Arc::new(failure);
        if matches!(stream, Some(Stream::Stdout(_))) {
            watch_stdout_reader(failure.clone());
        }
        Ok(Self {
            destination,
            format,
            pid,
            stream: stream.map(|s| Arc::new(Mutex::new(s))),
            written: VecDeque::new(),
            failure,
        })
    }

    /// The output of another traced process (`--pid` again, `--follow-forks`): the same stream,
    /// or its own files in the directory.
    pub fn for_pid(&self, pid: u32) -> Self {
        Self {
            destination: self.destination.clone(),
            format: self.format,
            pid,
            stream: self.stream.clone(),
            written: VecDeque::new(),
            failure: self.failure.clone(),
        }
    }

    /// The first failure of this output or of those made from it with [`Output::for_pid`].
    pub fn failures(&self) -> Failures {
        self.failure.subscribe()
    }

    /// Whether a report is written at all: stdout gets only the final report of a format whose
    /// report is a whole file.
    pub fn wants(&self, last: bool) -> bool {
        last || !(self.format.is_whole_file() && self.destination == Destination::Stdout)
    }

    /// Writes one report; a failure is also told to [`Output::failures`].
    pub fn write(&mut self, report: &[u8], timestamp_ms: u64) -> Result<(), Failure> {
        self.write_with(timestamp_ms, &mut |out| out.write_all(report))
    }

    /// Writes one report that `render` writes, straight to the destination (buffered), so
    /// that a report of hundreds of MB is never held whole; what a failure leaves is as with
    /// [`Output::write`]. A failure is also told to [`Output::failures`].
    pub fn write_with(
        &mut self,
        timestamp_ms: u64,
        render: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
    ) -> Result<(), Failure> {
        let result = self.write_report(render, timestamp_ms);
        if let Err(failure) = &result {
            self.failure.send_if_modified(|first| {
                first.is_none() && {
                    *first = Some(failure.clone());
                    true
                }
            });
        }
        result
    }

    fn write_report(
        &mut self,
        report: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
        timestamp_ms: u64,
    ) -> Result<(), Failure> {
        if let Some(stream) = &self.stream {
            let mut stream = stream
                .lock()
                .map_err(|_| Failure::WriteFailed("a reporter thread panicked".into()))?;
            return match &mut *stream {
                Stream::Stdout(stdout) => {
                    let mut stdout = stdout.lock();
                    let mut buffered = BufWriter::new(&mut stdout);
                    // Its flush flushes stdout too.
                    report(&mut buffered)
                        .and_then(|()| buffered.flush())
                        .map_err(|err| match err.kind() {
                            io::ErrorKind::BrokenPipe => Failure::ReaderGone,
                            _ => failed("stdout", &err),
                        })
                }
                Stream::File { file, path } => {
                    append(file, report).map_err(|err| failed(&path.display().to_string(), &err))
                }
            };
        }
        match &self.destination {
            Destination::Dir { dir, keep } => {
                let stem = format!("leaktrace-{}-{}", self.pid, utc_timestamp(timestamp_ms));
                let ext = self.format.extension();
                let mut path = dir.join(format!("{stem}.{ext}"));
                // Two reports in one millisecond (the final one right after a tick).
                for n in 1.. {
                    if !path.exists() {
                        break;
                    }
                    path = dir.join(format!("{stem}-{n}.{ext}"));
                }
                replace(&path, report).map_err(|err| failed(&path.display().to_string(), &err))?;
                self.written.push_back(path);
                while keep.is_some_and(|keep| self.written.len() > keep) {
                    if let Some(old) = self.written.pop_front() {
                        fs::remove_file(&old)
                            .map_err(|err| failed(&old.display().to_string(), &err))?;
                    }
                }
                Ok(())
            }
            Destination::File(path) => {
                replace(path, report).map_err(|err| failed(&path.display().to_string(), &err))
            }
            // Opened as a stream above.
            Destination::Stdout => Err(Failure::WriteFailed("stdout is not open".into())),
        }
    }
}

fn failed(destination: &str, err: &io::Error) -> Failure {
    Failure::WriteFailed(format!("writing the report to {destination}: {err}"))
}

/// Appends a whole report, or nothing: a write that fails part way (a full disk) is cut back
/// to where the report began, so that the file never ends in a partial record.
fn append(
    file: &mut File,
    report: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let before = file.metadata()?.len();
    let written = {
        let mut buffered = BufWriter::new(&mut *file);
        let written = report(&mut buffered).and_then(|()| buffered.flush());
        // What a failed write left in the buffer is dropped, not written after the cut.
        let _ = buffered.into_parts();
        written
    };
    if written.is_err() {
        let _ = file.set_len(before);
    }
    written
}

/// Stdout as a pipe or a socket: when its reader closes it, the kernel reports an error on
/// our end at once, so the trace stops then instead of at its next write (a whole-file format
/// writes only its final report to stdout).
fn watch_stdout_reader(failure: Arc<tokio::sync::watch::Sender<Option<Failure>>>) {
    use std::os::unix::fs::FileTypeExt as _;
    let Ok(meta) = fs::metadata("/proc/self/fd/1") else {
        return;
    };
    if !(meta.file_type().is_fifo() || meta.file_type().is_socket()) {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("stdout-reader".into())
        .spawn(move || {
            loop {
                // No events asked for: poll returns only for POLLERR or POLLHUP, which a pipe
                // reports on its writing end once no reader is left.
                let mut fd = libc::pollfd {
                    fd: 1,
                    events: 0,
                    revents: 0,
                };
                // SAFETY: one pollfd.
                let n = unsafe { libc::poll(&mut fd, 1, -1) };
                if n > 0 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                    failure.send_if_modified(|first| {
                        first.is_none() && {
                            *first = Some(Failure::ReaderGone);
                            true
                        }
                    });
                    return;
                }
                if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    return;
                }
            }
        });
}

/// The directory a file is written into.
fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// That a file can be created in `dir` (created and removed again).
fn check_writable(dir: &Path) -> io::Result<()> {
    tempfile::Builder::new()
        .prefix(".leaktrace-")
        .tempfile_in(dir)
        .map(drop)
}

/// Writes a whole file so that a reader never sees half of it, and so that the file is
/// replaced only by a complete report: into a temporary file in the same directory, synced,
/// then renamed over it (and the directory synced). On any failure the temporary file is
/// removed and the file is left as it was. A path that is not a regular file (`/dev/null`, a
/// FIFO) is written in place.
fn replace(
    path: &Path,
    contents: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let existing = fs::metadata(path).ok();
    if existing.as_ref().is_some_and(|m| !m.is_file()) {
        let mut file = BufWriter::new(fs::OpenOptions::new().write(true).open(path)?);
        return contents(&mut file).and_then(|()| file.flush());
    }
    let dir = directory_of(path);
    let name = path
        .file_name()
        .map_or("report".into(), |n| n.to_string_lossy());
    // Removed when dropped, which every early return does.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    {
        let mut buffered = BufWriter::new(tmp.as_file_mut());
        contents(&mut buffered)?;
        buffered.flush()?;
    }
    // The mode of the file it replaces; a new report is readable by all, as a file that
    // `File::create` makes under the usual umask.
    let mode = existing.map_or(0o644, |m| m.permissions().mode() & 0o7777);
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|err| err.error)?;
    File::open(dir)?.sync_all()
}

/// `20261124T143005.123Z`: sorts by time, and is a valid file name everywhere.
pub fn utc_timestamp(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(utc_timestamp(0), "19700101T000000.000Z");
        assert_eq!(utc_timestamp(951_782_400_000), "20000229T000000.000Z");
        assert_eq!(utc_timestamp(1_764_000_000_123), "20251124T160000.123Z");
    }

    #[test]
    fn destinations() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Destination::new(None, None), Destination::Stdout);
        let file = dir.path().join("r.json");
        assert_eq!(
            Destination::new(Some(&file), None),
            Destination::File(file.clone())
        );
        assert_eq!(
            Destination::new(Some(dir.path()), None),
            Destination::Dir {
                dir: dir.path().to_owned(),
                keep: None
            }
        );
        let sub = PathBuf::from(format!("{}/new/", dir.path().display()));
        let destination = Destination::new(Some(&sub), Some(2));
        assert_eq!(
            destination,
            Destination::Dir {
                dir: sub.clone(),
                keep: Some(2)
            }
        );
        assert!(!sub.exists());
        Output::open(destination, Format::Json, 1).unwrap();
        assert!(sub.is_dir(), "created when opened");
    }

    #[test]
    fn a_directory_keeps_the_newest_reports_and_a_file_the_latest() {
        let dir = tempfile::tempdir().unwrap();
        let dest = Destination::new(Some(dir.path()), Some(2));
        let mut out = Output::open(dest, Format::Svg, 7).unwrap();
        assert!(out.wants(false));
        for (i, ms) in [1000u64, 2000, 2000, 3000].iter().enumerate() {
            out.write(format!("report {i}").as_bytes(), *ms).unwrap();
        }
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "leaktrace-7-19700101T000002.000Z-1.svg",
                "leaktrace-7-19700101T000003.000Z.svg"
            ]
        );
        let last = fs::read_to_string(dir.path().join(&names[1])).unwrap();
        assert_eq!(last, "report 3");

        let file = dir.path().join("p.pb.gz");
        let mut out = Output::open(Destination::File(file.clone()), Format::Pprof, 7).unwrap();
        out.write(b"one", 0).unwrap();
        out.write(b"two", 0).unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"two");
        let file = dir.path().join("r.json");
        let mut out = Output::open(Destination::File(file.clone()), Format::Json, 7).unwrap();
        out.write(b"one\n", 0).unwrap();
        out.write(b"two\n", 0).unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"one\ntwo\n");
        let out = Output::open(Destination::Stdout, Format::Pprof, 7).unwrap();
        assert!(!out.wants(false) && out.wants(true));
    }

    #[test]
    fn an_existing_file_is_kept_until_a_whole_report_replaces_or_extends_it() {
        let dir = tempfile::tempdir().unwrap();
        let names = || {
            let mut names: Vec<String> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        let svg = dir.path().join("old.svg");
        fs::write(&svg, "the report of yesterday").unwrap();
        fs::set_permissions(&svg, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
        // Opening (before attach) and a trace that never reports leave it as it was.
        let mut out = Output::open(Destination::File(svg.clone()), Format::Svg, 7).unwrap();
        assert_eq!(fs::read_to_string(&svg).unwrap(), "the report of yesterday");
        out.write(b"<svg/>", 0).unwrap();
        assert_eq!(fs::read_to_string(&svg).unwrap(), "<svg/>");
        let mode = fs::metadata(&svg).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o640
        );
        // A stream format appends after what the file held.
        let json = dir.path().join("old.json");
        fs::write(&json, "{\"old\":1}\n").unwrap();
        let mut out = Output::open(Destination::File(json.clone()), Format::Json, 7).unwrap();
        assert_eq!(fs::read_to_string(&json).unwrap(), "{\"old\":1}\n");
        out.write(b"{\"new\":2}\n", 0).unwrap();
        assert_eq!(
            fs::read_to_string(&json).unwrap(),
            "{\"old\":1}\n{\"new\":2}\n"
        );
        // No temporary file is left behind.
        assert_eq!(names(), ["old.json", "old.svg"]);
    }

    #[test]
    fn a_failed_replace_leaves_the_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        // The rename fails: the path is a directory that holds a file.
        let path = dir.path().join("report.svg");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), "x").unwrap();
        assert!(replace(&path, &mut |w| w.write_all(b"<svg/>")).is_err());
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["report.svg"]);
        assert_eq!(fs::read(path.join("inside")).unwrap(), b"x");
    }

    #[test]
    fn a_report_that_fails_while_streamed_leaves_nothing_of_itself() {
        let dir = tempfile::tempdir().unwrap();
        // Larger than the write buffer: part of it reaches the file before the failure.
        let mut fails_midway = |w: &mut dyn Write| -> io::Result<()> {
            w.write_all(&[b'x'; 100_000])?;
            Err(io::Error::other("disk full"))
        };
        let json = dir.path().join("r.json");
        fs::write(&json, "{\"old\":1}\n").unwrap();
        let mut out = Output::open(Destination::File(json.clone()), Format::Json, 7).unwrap();
        assert!(out.write_with(0, &mut fails_midway).is_err());
        assert_eq!(fs::read_to_string(&json).unwrap(), "{\"old\":1}\n");
        out.write_with(0, &mut |w| w.write_all(b"{\"new\":2}\n"))
            .unwrap();
        assert_eq!(
            fs::read_to_string(&json).unwrap(),
            "{\"old\":1}\n{\"new\":2}\n"
        );
        let svg = dir.path().join("r.svg");
        fs::write(&svg, "<old/>").unwrap();
        assert!(replace(&svg, &mut fails_midway).is_err());
        assert_eq!(fs::read_to_string(&svg).unwrap(), "<old/>");
        let mut left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["r.json", "r.svg"]);
    }

    #[test]
    fn the_first_failure_is_told_to_the_trace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone/r.svg");
        fs::create_dir(dir.path().join("gone")).unwrap();
        let mut out = Output::open(Destination::File(path.clone()), Format::Svg, 7).unwrap();
        let failures = out.failures();
        fs::remove_dir(dir.path().join("gone")).unwrap();
        let err = out.write(b"<svg/>", 0).unwrap_err();
        let Failure::WriteFailed(message) = &err else {
            panic!("{err:?}")
        };
        assert!(
            message.starts_with(&format!("writing the report to {}: ", path.display())),
            "{message}"
        );
        assert_eq!(*failures.borrow(), Some(err));
    }
}
