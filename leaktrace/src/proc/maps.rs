//! `/proc/PID/maps`: which file backs an address.

use std::{
    fs::File,
    io::{self, Read as _, Seek as _, SeekFrom},
};

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// The `r`, `w`, `x` and `p`/`s` flags.
    pub perms: [u8; 4],
    pub file_offset: u64,
    pub inode: u64,
    /// The path as the target sees it (in its own mount namespace); empty for anonymous
    /// mappings, `[heap]`-style names for special ones.
    pub path: String,
}

impl Mapping {
    pub fn is_executable(&self) -> bool {
        self.perms[2] == b'x'
    }

    /// A mapping of a regular file (not anonymous, not `[stack]`, `[vdso]`, ...).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/')
    }

    /// The file name without the directory.
    pub fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
}

/// A line that does not have the shape of a maps line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed /proc/PID/maps line: {0:?}")]
pub struct MalformedLine(pub String);

/// The memory map of a process, sorted by address as the kernel lists it.
#[derive(Clone, Debug, Default)]
pub struct ProcMaps {
    pub mappings: Vec<Mapping>,
}

impl ProcMaps {
    /// The memory map of process `pid` as it is now; empty once the process exited (a zombie
    /// has no memory). Never a part of a map: see [`read_whole`].
    pub fn read(pid: u32) -> io::Result<Self> {
        let path = format!("/proc/{pid}/maps");
        // A read torn by an exec is read again from the new program's memory; one torn by an
        // exit finds nothing the second time.
        for _ in 0..3 {
            if let Some(text) = read_whole(&mut File::open(&path)?, String::new())? {
                return Self::parse(&text)
                    .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err));
            }
        }
        Ok(Self::default())
    }

    pub fn parse(text: &str) -> Result<Self, MalformedLine> {
        let mappings = text
            .lines()
            .filter(|line| !line.is_empty())
            .map(parse_line)
            .collect::<Result<_, _>>()?;
        Ok(Self { mappings })
    }

    /// The file mapping that holds `addr`.
    pub fn find(&self, addr: u64) -> Option<&Mapping> {
        self.position(addr).map(|index| &self.mappings[index])
    }

    /// The index of the file mapping that holds `addr`.
    pub fn position(&self, addr: u64) -> Option<usize> {
        let index = self.mappings.partition_point(|m| m.end <= addr);
        self.mappings
            .get(index)
            .filter(|m| m.start <= addr && addr < m.end && m.is_file())
            .map(|_| index)
    }
}

/// Reads the rest of `file`, a `/proc/PID/maps` of which `text` was read so far; `None` when
/// the read was torn. The kernel lists a map a few lines per read(2), each time from the
/// process's memory as it is then: a read that spans the exit (or the exec) of the process ends
/// early, with the lines read so far and nothing after, and a process that exited during its
/// map's read looked as if it had unmapped all the rest of its code (its stacks then lost
/// their names). Once the whole file is read, one byte read again from its start tells: the
/// memory the file was opened on is still there (then it was there all along, since the
/// kernel never brings it back), or it is gone.
fn read_whole(file: &mut File, mut text: String) -> io::Result<Option<String>> {
    file.read_to_string(&mut text)?;
    if text.is_empty() {
        return Ok(Some(text));
    }
    file.seek(SeekFrom::Start(0))?;
    let mut first = [0u8; 1];
    Ok((file.read(&mut first)? == 1).then_some(text))
}

fn parse_line(line: &str) -> Result<Mapping, MalformedLine> {
    let malformed = || MalformedLine(line.to_owned());
    // address perms offset dev inode [path]; the path may contain spaces.
    let mut fields = line.splitn(6, ' ');
    let mut next = || fields.next().ok_or_else(malformed);
    let (range, perms, offset, _dev, inode) = (next()?, next()?, next()?, next()?, next()?);
    let path = fields.next().unwrap_or("").trim_start().to_owned();
    let (start, end) = range.split_once('-').ok_or_else(malformed)?;
    let hex = |s: &str| u64::from_str_radix(s, 16).map_err(|_| malformed());
    let perms: [u8; 4] = perms.as_bytes().try_into().map_err(|_| malformed())?;
    let mapping = Mapping {
        start: hex(start)?,
        end: hex(end)?,
        perms,
        file_offset: hex(offset)?,
        inode: inode.parse().map_err(|_| malformed())?,
        path,
    };
    if mapping.start >= mapping.end {
        return Err(malformed());
    }
    Ok(mapping)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d4c0a00000-55d4c0a01000 r--p 00000000 fe:01 1234                       /usr/bin/app
55d4c0a01000-55d4c0a02000 r-xp 00001000 fe:01 1234                       /usr/bin/app
55d4c1a00000-55d4c1a21000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000028000 r--p 00000000 fe:01 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000028000-7f00001bd000 r-xp 00028000 fe:01 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000300000-7f0000301000 r-xp 00000000 fe:01 77                         /tmp/with space (deleted)
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
";

    #[test]
    fn parses_and_finds_file_mappings() {
        let maps = ProcMaps::parse(MAPS).unwrap();
        assert_eq!(maps.mappings.len(), 7);
        let libc = maps.find(0x7f0000028010).unwrap();
        assert_eq!(libc.file_name(), "libc.so.6");
        assert_eq!(libc.file_offset, 0x28000);
        assert!(libc.is_executable());
        assert_eq!(
            maps.find(0x7f0000300000).unwrap().path,
            "/tmp/with space (deleted)"
        );
        // Anonymous and special mappings back no file.
        assert_eq!(maps.find(0x55d4c1a00010), None);
        assert_eq!(maps.find(0x7ffd00000010), None);
        // Between mappings and past the end.
        assert_eq!(maps.find(0x55d4c0a02000), None);
        assert_eq!(maps.find(u64::MAX), None);
    }

    #[test]
    fn a_read_torn_by_the_exit_of_the_process_is_told_from_a_whole_one() {
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let pid = child.id();
        let path = format!("/proc/{pid}/maps");
        // sleep's map shows once exec'd: at least its own code, libc and the loader.
        let whole = (0..200)
            .map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(10));
                ProcMaps::read(pid).unwrap()
            })
            .find(|maps| maps.mappings.iter().any(|m| m.file_name() == "sleep"))
            .expect("sleep's map");
        assert!(whole.mappings.len() > 4);
        // Two reads under way: their first lines read, then the process exits (a zombie, not
        // reaped yet).
        let started = || {
            let mut file = File::open(&path).unwrap();
            let mut part = [0u8; 64];
            let got = file.read(&mut part).unwrap();
            (file, String::from_utf8_lossy(&part[..got]).into_owned())
        };
        let (mut plain, mut plain_text) = started();
        let (mut checked, checked_text) = started();
        child.kill().unwrap();
        // SAFETY: waitid into a zeroed siginfo_t; WNOWAIT leaves the child to `wait` below.
        let waited = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT)
        };
        assert_eq!(waited, 0);
        // Read on to the end, the file ends where the exit cut it: a map of one line or two,
        // which was taken for the whole map before.
        plain.read_to_string(&mut plain_text).unwrap();
        assert!(
            plain_text.lines().count() < whole.mappings.len(),
            "{plain_text}"
        );
        assert_eq!(read_whole(&mut checked, checked_text).unwrap(), None);
        // Read again, a process that exited has an empty map.
        assert!(ProcMaps::read(pid).unwrap().mappings.is_empty());
        child.wait().unwrap();
        assert!(ProcMaps::read(pid).is_err());
        // A live process's map reads whole.
        let me = std::process::id();
        let mut file = File::open(format!("/proc/{me}/maps")).unwrap();
        let text = read_whole(&mut file, String::new()).unwrap().unwrap();
        assert!(ProcMaps::parse(&text).unwrap().mappings.len() > 4);
    }

    #[test]
    fn rejects_malformed_lines() {
        for line in [
            "garbage",
            "1000-2000 r-xp 0 fe:01",
            "zz-2000 r-xp 00000000 fe:01 1 /x",
            "2000-1000 r-xp 00000000 fe:01 1 /x",
            "1000-2000 r-x 00000000 fe:01 1 /x",
            "1000-2000 r-xp 00000000 fe:01 notanumber /x",
        ] {
            assert_eq!(
                ProcMaps::parse(line).unwrap_err(),
                MalformedLine(line.to_owned())
            );
        }
    }
}
