//! Opening the files of a traced process. Every file of the target that leaktrace reads (to
//! find its allocator and probe points, to unwind and to symbolize its stacks) is opened by
//! [`open`], and only there.

use std::{
    fs::File,
    io::{self, Read as _},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use super::maps::Mapping;

/// Which file of the target.
#[derive(Clone, Copy, Debug)]
pub enum TargetFile<'a> {
    /// The file behind a mapping of its memory map.
    Mapped(&'a Mapping),
    /// A file by the path the target names it with (spawn mode: the command and the libraries
    /// its loader will load, before it runs).
    Path(&'a Path),
}

/// A file of the target, open.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    /// The path it was opened by, for interfaces that take a path (uprobe attachment).
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

    /// The whole file.
    pub fn read_all(mut self) -> io::Result<(PathBuf, Vec<u8>)> {
        let mut data = Vec::new();
        self.file.read_to_end(&mut data)?;
        Ok((self.path, data))
    }
}

/// Opens a file of process `pid`, through the first of these that opens:
/// - for a mapping, the target's own view of it (`/proc/PID/map_files/START-END`: the very file
///   mapped, even deleted, replaced, or in another mount namespace; it needs CAP_SYS_ADMIN);
/// - the path under the target's root (`/proc/PID/root`), so that a container's files are
///   found in its own mount namespace;
/// - the path as it is.
///
/// A mapped file gone from its path (the kernel shows "PATH (deleted)") is only reached
/// through `map_files`: no path names it any more. Fails with the first error.
pub fn open(pid: u32, which: TargetFile<'_>) -> io::Result<Opened> {
    let mut first_error = None;
    for path in candidate_paths(pid, which) {
        match File::open(&path) {
            Ok(file) => return Ok(Opened { file, path }),
            Err(err) => {
                first_error.get_or_insert(err);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| io::Error::from(io::ErrorKind::NotFound)))
}

/// A path that opens `file` again from this process, whatever became of the path it was
/// opened by: for libraries that take paths (blazesym).
pub fn reopen_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// [`open`]'s candidates, best first.
fn candidate_paths(pid: u32, which: TargetFile<'_>) -> Vec<PathBuf> {
    let in_root = |path: &Path| {
        Path::new(&format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(path))
    };
    match which {
        TargetFile::Mapped(mapping) => {
            let mut candidates = vec![PathBuf::from(format!(
                "/proc/{pid}/map_files/{:x}-{:x}",
                mapping.start, mapping.end
            ))];
            if !mapping.path.ends_with(" (deleted)") {
                candidates.push(in_root(Path::new(&mapping.path)));
                candidates.push(PathBuf::from(&mapping.path));
            }
            candidates
        }
        TargetFile::Path(path) if path.is_absolute() => vec![in_root(path), path.to_owned()],
        TargetFile::Path(path) => vec![path.to_owned()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::maps::ProcMaps;

    #[test]
    fn paths_go_through_the_target_s_own_view_first() {
        let maps = ProcMaps::parse(
            "7f0000000000-7f0000002000 r-xp 00001000 fe:01 77 /usr/lib/libc.so.6\n\
             7f0000002000-7f0000003000 r-xp 00000000 fe:01 78 /gone/app (deleted)\n",
        )
        .unwrap();
        assert_eq!(
            candidate_paths(42, TargetFile::Mapped(&maps.mappings[0])),
            [
                "/proc/42/map_files/7f0000000000-7f0000002000",
                "/proc/42/root/usr/lib/libc.so.6",
                "/usr/lib/libc.so.6"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(
            candidate_paths(42, TargetFile::Mapped(&maps.mappings[1])),
            [PathBuf::from(
                "/proc/42/map_files/7f0000002000-7f0000003000"
            )]
        );
        assert_eq!(
            candidate_paths(42, TargetFile::Path(Path::new("/bin/sh"))),
            ["/proc/42/root/bin/sh", "/bin/sh"].map(PathBuf::from)
        );
        assert_eq!(
            candidate_paths(42, TargetFile::Path(Path::new("./app"))),
            [PathBuf::from("./app")]
        );
    }

    #[test]
    fn opens_this_process_s_executable_and_tells_files_apart() {
        let pid = std::process::id();
        let maps = ProcMaps::read(pid).unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let mapping = maps
            .mappings
            .iter()
            .find(|m| Path::new(&m.path) == exe)
            .unwrap();
        let opened = open(pid, TargetFile::Mapped(mapping)).unwrap();
        assert!(opened.path.starts_with(format!("/proc/{pid}/map_files")));
        let by_path = open(pid, TargetFile::Path(&exe)).unwrap();
        assert_eq!(opened.id().unwrap(), by_path.id().unwrap());
        let other = open(pid, TargetFile::Path(Path::new("/bin/sh"))).unwrap();
        assert_ne!(opened.id().unwrap(), other.id().unwrap());
        let missing = open(pid, TargetFile::Path(Path::new("/no/such/file"))).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}
