//! Opening the files of a traced process. Every file of the target that leaktrace reads (to
//! find its allocator and probe points, to unwind and to symbolize its stacks) is opened by
//! [`open`], and only there.
//!
//! leaktrace runs as root against processes it does not trust: a process controls the paths
//! it maps (a container's root, a chroot) and could put a symlink to `/etc/shadow`, a FIFO or a
//! device there. So:
//! - the mapped file itself comes first: `/proc/PID/map_files/START-END` is the very file the
//!   process mapped (deleted, replaced or in another mount namespace alike), not a path;
//! - otherwise a path is resolved inside the process's root with `openat2(RESOLVE_IN_ROOT)` on
//!   `/proc/PID/root`: `..` and absolute symlinks stay in that root, and magic links (a
//!   `/proc/1/root/...` symlink in a container that sees the host's /proc) are refused; the
//!   path as the host would resolve it is never tried;
//! - nothing blocks and nothing but a regular file is read: the file is first opened with
//!   `O_PATH` (which opens neither a FIFO nor a device), checked to be a regular file, and only
//!   then reopened for reading, `O_NONBLOCK | O_NOCTTY`, through that descriptor;
//! - whole-file reads are bounded ([`MAX_READ_BYTES`]).
//!
//! Interfaces that take a path (the kernel's uprobe attachment, blazesym) get
//! [`reopen_path`], `/proc/self/fd/N`: it names the open file and resolves nothing in the
//! target's root again.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::FileExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use super::maps::Mapping;

/// The most leaktrace reads of one file into memory (an allocator's library, an executable):
/// far above any real one, far below what would exhaust the machine.
pub const MAX_READ_BYTES: u64 = 1 << 30;

/// Which file of the target.
#[derive(Clone, Copy, Debug)]
pub enum TargetFile<'a> {
    /// The file behind a mapping of its memory map.
    Mapped(&'a Mapping),
    /// A file by the path the target names it with (spawn mode: the command and the libraries
    /// its loader will load, before it runs). A relative path is leaktrace's own.
    Path(&'a Path),
}

/// A regular file of the target, open for reading.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    /// `/proc/self/fd/N` of `file` ([`reopen_path`]), for interfaces that take a path
    /// (uprobe attachment): valid while `file` is open.
    pub path: PathBuf,
}

/// What tells one file from another, whatever path it is reached by: a library replaced on
/// disk, or rewritten in place, is another file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    pub device: u64,
    pub inode: u64,
    pub size_bytes: u64,
    pub mtime_ns: i128,
}

/// The same file.
impl PartialEq for Opened {
    fn eq(&self, other: &Self) -> bool {
        matches!((self.id(), other.id()), (Ok(a), Ok(b)) if a == b)
    }
}

impl Eq for Opened {}

impl Opened {
    pub fn id(&self) -> io::Result<FileId> {
        let meta = self.file.metadata()?;
        Ok(FileId {
            device: meta.dev(),
            inode: meta.ino(),
            size_bytes: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        })
    }

    /// The whole file, as large as it is now: at most [`MAX_READ_BYTES`], else an error.
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        read_bounded(&self.file, MAX_READ_BYTES)
    }
}

/// The whole of `file`, at most `limit` bytes, else an error.
fn read_bounded(file: &File, limit: u64) -> io::Result<Vec<u8>> {
    let len = file.metadata()?.len();
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{len} bytes, more than the {limit} leaktrace reads"),
        ));
    }
    let mut data = vec![0; len as usize];
    let mut filled = 0;
    while filled < data.len() {
        match file.read_at(&mut data[filled..], filled as u64) {
            // Shrunk meanwhile: what is there.
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    data.truncate(filled);
    Ok(data)
}

/// Opens a file of process `pid`, as the module's documentation says: for a mapping, the
/// mapped file itself (`/proc/PID/map_files/START-END`; it needs CAP_SYS_ADMIN), else its path
/// resolved inside the process's root; for a path, that path inside its root. A mapped file
/// gone from its path (the kernel shows "PATH (deleted)") is only reached the first way: no
/// path names it any more. Fails with the first error; a file that is not a regular file is
/// never opened, and fails with `InvalidInput`.
pub fn open(pid: u32, which: TargetFile<'_>) -> io::Result<Opened> {
    match which {
        TargetFile::Mapped(mapping) => {
            let map_file = format!(
                "/proc/{pid}/map_files/{:x}-{:x}",
                mapping.start, mapping.end
            );
            match open_following(Path::new(&map_file)) {
                Ok(opened) => Ok(opened),
                // Not a regular file (a mapped device): its path leads to the same thing.
                Err(err) if err.kind() == io::ErrorKind::InvalidInput => Err(err),
                Err(first) if mapping.path.ends_with(" (deleted)") => Err(first),
                Err(first) => open_in_root(pid, Path::new(&mapping.path)).map_err(|_| first),
            }
        }
        TargetFile::Path(path) if path.is_absolute() => open_in_root(pid, path),
        TargetFile::Path(path) => open_following(path),
    }
}

/// A path that opens `file` again from this process, whatever became of the path it was
/// opened by: for interfaces that take paths (blazesym, uprobe attachment).
pub fn reopen_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// `path`, as process `pid` names it, resolved inside the process's root.
fn open_in_root(pid: u32, path: &Path) -> io::Result<Opened> {
    let root = open_path(
        libc::AT_FDCWD,
        format!("/proc/{pid}/root"),
        Open::Directory,
        0,
    )?;
    let relative = path.strip_prefix("/").unwrap_or(path);
    let relative = if relative.as_os_str().is_empty() {
        Path::new(".")
    } else {
        relative
    };
    let fd = open_path(
        root.as_raw_fd(),
        relative,
        Open::Path,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    )?;
    reopen(fd, path)
}

/// Follows `path` (a magic link of /proc, or a path of leaktrace's own) with `O_PATH`.
fn open_following(path: &Path) -> io::Result<Opened> {
    let fd = open_path(libc::AT_FDCWD, path, Open::Path, 0)?;
    reopen(fd, path)
}

/// Checks what an `O_PATH` descriptor names, then opens it for reading.
fn reopen(path_fd: OwnedFd, name: &Path) -> io::Result<Opened> {
    // SAFETY: fstat writes one struct stat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat of a descriptor we own, into the struct above.
    if unsafe { libc::fstat(path_fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => None,
        libc::S_IFIFO => Some("a FIFO"),
        libc::S_IFCHR => Some("a character device"),
        libc::S_IFBLK => Some("a block device"),
        libc::S_IFSOCK => Some("a socket"),
        libc::S_IFDIR => Some("a directory"),
        _ => Some("not a file"),
    };
    if let Some(kind) = kind {
        return Err(not_regular(name, kind));
    }
    // Reopening through the descriptor resolves nothing again: it is this inode.
    let file = File::from(open_path(
        libc::AT_FDCWD,
        reopen_path_of(&path_fd),
        Open::Read,
        0,
    )?);
    let meta = file.metadata()?;
    if !meta.is_file() || (meta.dev(), meta.ino()) != (st.st_dev, st.st_ino) {
        return Err(not_regular(name, "changed while it was opened"));
    }
    let path = reopen_path(&file);
    Ok(Opened { file, path })
}

fn reopen_path_of(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn not_regular(name: &Path, kind: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{} is {kind}, not a regular file: not read", name.display()),
    )
}

/// How [`open_path`] opens.
#[derive(Clone, Copy)]
enum Open {
    /// `O_PATH`: the inode is found, nothing is opened (no FIFO waits, no device is told).
    Path,
    /// `O_PATH | O_DIRECTORY`.
    Directory,
    /// For reading, never blocking, never becoming the controlling terminal.
    Read,
}

/// `openat2(dirfd, path)` with `resolve` (`RESOLVE_*`), close-on-exec.
fn open_path(
    dirfd: libc::c_int,
    path: impl AsRef<Path>,
    open: Open,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_ref().as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let flags = match open {
        Open::Path => libc::O_PATH,
        Open::Directory => libc::O_PATH | libc::O_DIRECTORY,
        Open::Read => libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
    };
    // SAFETY: open_how is plain data; all zeroes is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = resolve;
    loop {
        // SAFETY: a NUL-terminated path and an open_how of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                path.as_ptr(),
                &raw const how,
                size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a fresh descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::proc::maps::ProcMaps;

    fn read(pid: u32, which: TargetFile<'_>) -> io::Result<String> {
        let data = open(pid, which)?.read_all()?;
        Ok(String::from_utf8(data).unwrap())
    }

    /// A process whose root is `dir` (chroot), waiting until killed.
    struct Chrooted(u32);

    impl Chrooted {
        fn start(dir: &Path) -> Option<Self> {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!("skipping: chroot needs root");
                return None;
            }
            let root = CString::new(dir.as_os_str().as_bytes()).unwrap();
            // SAFETY: the child only makes async-signal-safe calls (chroot, pause, _exit).
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
            if pid == 0 {
                // SAFETY: see above.
                unsafe {
                    if libc::chroot(root.as_ptr()) == 0 {
                        loop {
                            libc::pause();
                        }
                    }
                    libc::_exit(1);
                }
            }
            let this = Self(pid as u32);
            for _ in 0..500 {
                let root = std::fs::read_link(format!("/proc/{pid}/root"));
                if root.is_ok_and(|r| r == dir) {
                    return Some(this);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            panic!("the child never entered its root");
        }

        fn pid(&self) -> u32 {
            self.0
        }
    }

    impl Drop for Chrooted {
        fn drop(&mut self) {
            // SAFETY: signals and reaps our own child.
            unsafe {
                libc::kill(self.0 as libc::pid_t, libc::SIGKILL);
                libc::waitpid(self.0 as libc::pid_t, std::ptr::null_mut(), 0);
            }
        }
    }

    #[test]
    fn paths_resolve_inside_the_target_root_and_never_escape_it() {
        let host = tempfile::tempdir().unwrap();
        let secret = host.path().join("secret");
        std::fs::write(&secret, "host secret").unwrap();
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("lib")).unwrap();
        std::fs::write(r.join("lib/real.so"), "in the root").unwrap();
        // An absolute symlink, a relative one that climbs, and a path with ..: all stay in.
        symlink(&secret, r.join("lib/absolute.so")).unwrap();
        symlink(
            "../../../../../../..".to_owned() + secret.to_str().unwrap(),
            r.join("lib/up.so"),
        )
        .unwrap();
        symlink("/lib/real.so", r.join("lib/inside.so")).unwrap();
        symlink("/proc/1/root/etc/passwd", r.join("lib/magic.so")).unwrap();
        let Some(target) = Chrooted::start(r) else {
            return;
        };
        let pid = target.pid();
        let read = |path: &str| read(pid, TargetFile::Path(Path::new(path)));
        assert_eq!(read("/lib/real.so").unwrap(), "in the root");
        assert_eq!(read("/lib/inside.so").unwrap(), "in the root");
        assert_eq!(read("/lib/../lib/real.so").unwrap(), "in the root");
        for escape in [
            "/lib/absolute.so",
            "/lib/up.so",
            "/lib/magic.so",
            // The host path of the secret, as /proc/PID/maps of a chrooted process shows
            // paths relative to the reader's root.
            secret.to_str().unwrap(),
            &format!("/../../../..{}", secret.display()),
        ] {
            if let Ok(text) = read(escape) {
                assert_ne!(text, "host secret", "{escape} escaped the root");
            }
        }
    }

    #[test]
    fn fifos_devices_and_directories_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let path = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        // A blocking open of a FIFO without a writer would wait forever: this returns.
        let me = std::process::id();
        let err = open(me, TargetFile::Path(&fifo)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{} is a FIFO, not a regular file: not read", fifo.display())
        );
        symlink(&fifo, dir.path().join("link")).unwrap();
        let err = open(me, TargetFile::Path(&dir.path().join("link"))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        for (path, kind) in [
            ("/dev/zero", "a character device"),
            ("/dev/tty", "a character device"),
            ("/", "a directory"),
        ] {
            let err = open(me, TargetFile::Path(Path::new(path))).unwrap_err();
            assert!(err.to_string().contains(kind), "{path}: {err}");
        }
    }

    #[test]
    fn reads_are_bounded_and_mapped_files_open_through_map_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 5000]).unwrap();
        let me = std::process::id();
        let opened = open(me, TargetFile::Path(&path)).unwrap();
        assert_eq!(opened.read_all().unwrap().len(), 5000);
        let err = read_bounded(&opened.file, 4999).unwrap_err();
        assert_eq!(
            err.to_string(),
            "5000 bytes, more than the 4999 leaktrace reads"
        );
        // The path names the same open file.
        assert_eq!(std::fs::read(&opened.path).unwrap().len(), 5000);

        // This process's executable through /proc/self/map_files equals the file by its path;
        // /bin/sh is another file; a missing file is NotFound.
        let maps = ProcMaps::read(me).unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let mapping = maps
            .mappings
            .iter()
            .find(|m| Path::new(&m.path) == exe)
            .unwrap();
        let mapped = open(me, TargetFile::Mapped(mapping)).unwrap();
        let by_path = open(me, TargetFile::Path(&exe)).unwrap();
        assert_eq!(mapped.id().unwrap(), by_path.id().unwrap());
        assert_eq!(mapped, by_path);
        let other = open(me, TargetFile::Path(Path::new("/bin/sh"))).unwrap();
        assert_ne!(mapped.id().unwrap(), other.id().unwrap());
        let missing = open(me, TargetFile::Path(Path::new("/no/such/file"))).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}
