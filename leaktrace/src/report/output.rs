//! Where reports go: stdout, one file, or a directory that gets a timestamped file per report
//! (`--output DIR`, `--keep N`).

use std::{
    collections::VecDeque,
    fs::{self, File},
    io::{self, Write as _},
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

/// Writes rendered reports to their destination.
pub struct Output {
    destination: Destination,
    format: Format,
    pid: u32,
    /// Stdout, or the file that a stream format (text, JSON Lines) appends to; shared by the
    /// outputs of every traced process, a whole report at a time.
    stream: Option<Arc<Mutex<Box<dyn io::Write + Send>>>>,
    /// Files this trace wrote to the directory, oldest first.
    written: VecDeque<PathBuf>,
}

impl Output {
    /// Opens the destination now, so that a path that cannot be written fails before attach.
    pub fn open(destination: Destination, format: Format, pid: u32) -> anyhow::Result<Self> {
        let stream: Option<Box<dyn io::Write + Send>> = match &destination {
            Destination::Stdout => {
                use std::io::IsTerminal as _;
                if format == Format::Pprof && io::stdout().is_terminal() {
                    bail!("a pprof profile is binary: write it to a file with -o FILE");
                }
                Some(Box::new(io::stdout()))
            }
            Destination::File(path) => {
                let file =
                    File::create(path).with_context(|| format!("creating {}", path.display()))?;
                (!format.is_whole_file()).then(|| Box::new(file) as Box<dyn io::Write + Send>)
            }
            Destination::Dir { dir, .. } => {
                fs::create_dir_all(dir)
                    .with_context(|| format!("creating the directory {}", dir.display()))?;
                let probe = dir.join(format!(".leaktrace-{pid}.probe"));
                File::create(&probe)
                    .and_then(|_| fs::remove_file(&probe))
                    .with_context(|| format!("writing into {}", dir.display()))?;
                None
            }
        };
        Ok(Self {
            destination,
            format,
            pid,
            stream: stream.map(|s| Arc::new(Mutex::new(s))),
            written: VecDeque::new(),
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
        }
    }

    /// Whether a report is written at all: stdout gets only the final report of a format whose
    /// report is a whole file.
    pub fn wants(&self, last: bool) -> bool {
        last || !(self.format.is_whole_file() && self.destination == Destination::Stdout)
    }

    pub fn write(&mut self, report: &[u8], timestamp_ms: u64) -> io::Result<()> {
        if let Some(stream) = &self.stream {
            let mut stream = stream
                .lock()
                .map_err(|_| io::Error::other("a reporter thread panicked"))?;
            return stream.write_all(report).and_then(|()| stream.flush());
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
                replace(&path, report)?;
                self.written.push_back(path);
                while keep.is_some_and(|keep| self.written.len() > keep) {
                    if let Some(old) = self.written.pop_front() {
                        fs::remove_file(&old)?;
                    }
                }
                Ok(())
            }
            Destination::File(path) => replace(path, report),
            // Opened as a stream above.
            Destination::Stdout => Err(io::Error::other("stdout is not open")),
        }
    }
}

/// Writes a whole file so that a reader never sees half of it: into a temporary file beside
/// it, then renamed over it. A path that is not a regular file (`/dev/null`, a FIFO) is
/// written in place.
fn replace(path: &Path, contents: &[u8]) -> io::Result<()> {
    if fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return File::create(path)?.write_all(contents);
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, contents)?;
    fs::rename(&tmp, path)
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
        let mut out = Output::open(Destination::File(file.clone()), Format::Json, 7).unwrap();
        out.write(b"one\n", 0).unwrap();
        out.write(b"two\n", 0).unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"one\ntwo\n");
        let out = Output::open(Destination::Stdout, Format::Pprof, 7).unwrap();
        assert!(!out.wants(false) && out.wants(true));
    }
}
