//! uprobe_multi links (Linux 6.6+): one link attaches one program at many offsets of one file,
//! for one process. Detaching one waits for the kernel's grace periods once for all its probes,
//! where each perf-event uprobe (what aya 0.14 attaches) is detached under a machine-wide mutex
//! with its own grace periods: ~85 ms per probe, 2.4 s for glibc's 23, ~4 s for redis's 48.
//!
//! aya 0.14 creates no such link, and the kernel takes one only for a program loaded with the
//! expected attach type `BPF_TRACE_UPROBE_MULTI`, which aya does not set for a uprobe. So the
//! programs are loaded a second time here, from the same object, relocated by aya-obj against
//! the maps aya created (found through the map ids of the programs aya loaded): both copies share
//! every map. On a kernel without uprobe_multi, loading or linking fails and the caller falls back
//! to aya's perf-event uprobes.
//!
//! The copies carry the BTF that aya loaded (found through the same programs) and their function
//! and line information, as aya's own loads do: the verifier requires function information of a
//! program whose subprograms are callbacks (`bpf_loop`, which the unwinder uses).

use std::{
    collections::HashMap,
    ffi::CString,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use anyhow::{Context as _, anyhow, bail};
use aya::maps::MapData;

use super::bpf_syscall::{ATTR_BYTES, bpf, bpf_status, put};

/// `bpf(2)` commands and constants of the uapi (include/uapi/linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_KPROBE: u32 = 2;
const BPF_TRACE_UPROBE_MULTI: u32 = 48;
/// Linux 6.13+: one program at the entry and, unless the entry returned non-zero, at the return.
const BPF_TRACE_UPROBE_SESSION: u32 = 57;
const BPF_F_UPROBE_MULTI_RETURN: u32 = 1;

/// Where the probes of a link run its program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    Entry,
    Return,
    /// A uprobe session: at the entry, and at the return of the calls whose entry returned 0.
    Session,
}

impl LinkKind {
    fn attach_type(self) -> u32 {
        match self {
            Self::Entry | Self::Return => BPF_TRACE_UPROBE_MULTI,
            Self::Session => BPF_TRACE_UPROBE_SESSION,
        }
    }
}

/// The programs loaded for uprobe_multi links, by name.
pub struct MultiPrograms {
    programs: HashMap<String, OwnedFd>,
}

impl MultiPrograms {
    /// Loads `names` from the BPF object `object` for uprobe_multi links (sessions when
    /// `kind` is `Session`), on the maps of the programs that aya loaded (their map ids), with
    /// the BTF aya loaded for them (its id).
    pub fn load(
        object: &[u8],
        names: &[&str],
        kind: LinkKind,
        map_ids: &[u32],
        btf_id: Option<u32>,
    ) -> anyhow::Result<Self> {
        let btf = btf_id
            .map(|id| {
                let mut attr = [0u8; ATTR_BYTES];
                put(&mut attr, 0, id.to_ne_bytes());
                bpf(BPF_BTF_GET_FD_BY_ID, &mut attr).with_context(|| format!("BTF id {id}"))
            })
            .transpose()?;
        // The maps aya created, by the name the kernel knows them by (at most 15 bytes).
        let mut maps: HashMap<String, MapData> = HashMap::new();
        for &id in map_ids {
            let map = MapData::from_id(id).with_context(|| format!("map id {id}"))?;
            let name = map
                .info()
                .context("map info")?
                .name_as_str()
                .unwrap_or_default()
                .to_owned();
            maps.insert(name, map);
        }
        let mut obj = aya_obj::Object::parse(object).context("parsing the BPF object")?;
        let definitions: Vec<(String, aya_obj::Map)> = obj
            .maps
            .iter()
            .map(|(name, map)| (name.clone(), map.clone()))
            .collect();
        let mut fds = Vec::new();
        for (name, _) in &definitions {
            let kernel_name: String = name.chars().take(15).collect();
            let fd = maps
                .iter()
                .find(|(k, _)| k.as_str() == kernel_name || name.ends_with(k.as_str()))
                .map(|(_, map)| map.fd().as_fd().as_raw_fd());
            fds.push(fd);
        }
        let text_sections = obj
            .functions
            .keys()
            .map(|(section_index, _)| *section_index)
            .collect();
        // Only the maps that aya created: a program that uses another fails to load below.
        obj.relocate_maps(
            definitions
                .iter()
                .zip(&fds)
                .filter_map(|((name, map), fd)| Some((name.as_str(), (*fd)?, map))),
            &text_sections,
        )
        .map_err(|err| anyhow!("relocating maps: {err}"))?;
        obj.relocate_calls(&text_sections)
            .map_err(|err| anyhow!("relocating calls: {err}"))?;
        let license = CString::new(obj.license.as_bytes()).context("license")?;
        let mut programs = HashMap::new();
        for &name in names {
            let program = obj
                .programs
                .get(name)
                .with_context(|| format!("no program {name} in the BPF object"))?;
            let function = obj
                .functions
                .get(&program.function_key())
                .with_context(|| format!("no code for {name}"))?;
            let insns = &function.instructions;
            let func_info = function.func_info.func_info_bytes();
            let line_info = function.line_info.line_info_bytes();
            let mut prog_name = [0u8; 16];
            for (to, from) in prog_name.iter_mut().zip(name.bytes().take(15)) {
                *to = from;
            }
            let mut log = vec![0u8; 1 << 20];
            // Without a log first: a log that fills up fails the load (ENOSPC), and the
            // verifier's log of alloc_return is long. With one only to say why it failed.
            let load = |log: Option<&mut Vec<u8>>| {
                let mut attr = [0u8; ATTR_BYTES];
                put(&mut attr, 0, BPF_PROG_TYPE_KPROBE.to_ne_bytes());
                put(&mut attr, 4, (insns.len() as u32).to_ne_bytes());
                put(&mut attr, 8, (insns.as_ptr() as u64).to_ne_bytes());
                put(&mut attr, 16, (license.as_ptr() as u64).to_ne_bytes());
                if let Some(log) = log {
                    put(&mut attr, 24, 1u32.to_ne_bytes());
                    put(&mut attr, 28, (log.len() as u32).to_ne_bytes());
                    put(&mut attr, 32, (log.as_mut_ptr() as u64).to_ne_bytes());
                }
                put(&mut attr, 48, prog_name);
                put(&mut attr, 68, kind.attach_type().to_ne_bytes());
                if let Some(btf) = &btf {
                    put(&mut attr, 72, (btf.as_raw_fd() as u32).to_ne_bytes());
                    put(
                        &mut attr,
                        76,
                        (function.func_info_rec_size as u32).to_ne_bytes(),
                    );
                    put(&mut attr, 80, (func_info.as_ptr() as u64).to_ne_bytes());
                    put(
                        &mut attr,
                        88,
                        (function.func_info.len() as u32).to_ne_bytes(),
                    );
                    put(
                        &mut attr,
                        92,
                        (function.line_info_rec_size as u32).to_ne_bytes(),
                    );
                    put(&mut attr, 96, (line_info.as_ptr() as u64).to_ne_bytes());
                    put(
                        &mut attr,
                        104,
                        (function.line_info.len() as u32).to_ne_bytes(),
                    );
                }
                bpf(BPF_PROG_LOAD, &mut attr)
            };
            let fd = load(None).map_err(|err| {
                let _ = load(Some(&mut log));
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                let tail = String::from_utf8_lossy(&log[end.saturating_sub(300)..end]).into_owned();
                anyhow!("loading {name} for {kind:?} links: {err}: {}", tail.trim())
            })?;
            programs.insert(name.to_owned(), fd);
        }
        Ok(Self { programs })
    }

    /// Adds the programs of `other`.
    pub fn extend(&mut self, other: Self) {
        self.programs.extend(other.programs);
    }

    pub fn get(&self, name: &str) -> Option<BorrowedFd<'_>> {
        self.programs.get(name).map(|fd| fd.as_fd())
    }

    /// Per program: its name, its runs and its run time in ns (the kernel's statistics, zero
    /// while they are off), as `Probes::program_stats` gives them for aya's copies.
    pub fn run_stats(&self) -> impl Iterator<Item = (&str, u64, u64)> + '_ {
        self.programs.iter().filter_map(|(name, fd)| {
            let (runs, run_time_ns) = run_stats(fd.as_fd()).ok()?;
            Some((name.as_str(), runs, run_time_ns))
        })
    }
}

/// `bpf_prog_info`'s `run_time_ns` and `run_cnt` of a program (include/uapi/linux/bpf.h): the
/// info is read up to `run_cnt`, the kernel fills what it has and zeroes nothing past it.
fn run_stats(program: BorrowedFd<'_>) -> std::io::Result<(u64, u64)> {
    const RUN_TIME_NS: usize = 192;
    const RUN_CNT: usize = 200;
    let mut info = [0u8; RUN_CNT + 8];
    let mut attr = [0u8; ATTR_BYTES];
    put(&mut attr, 0, (program.as_raw_fd() as u32).to_ne_bytes());
    put(&mut attr, 4, (info.len() as u32).to_ne_bytes());
    put(&mut attr, 8, (info.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY (of bpf_status's call): `info` outlives the call and is as long as `attr` says.
    bpf_status(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let word = |at: usize| u64::from_ne_bytes(info[at..at + 8].try_into().unwrap_or_default());
    Ok((word(RUN_CNT), word(RUN_TIME_NS)))
}

/// A uprobe_multi link; dropping it detaches all its probes.
pub struct MultiLink(#[expect(dead_code, reason = "held for its drop")] OwnedFd);

/// Attaches `program` at `offsets` (file offsets, each with the cookie at the same index) of
/// the file `path`, in process `pid` only; `kind` says where it runs (a session program must
/// have been loaded as one).
pub fn attach(
    program: BorrowedFd<'_>,
    path: &Path,
    offsets: &[u64],
    cookies: &[u64],
    pid: u32,
    kind: LinkKind,
) -> anyhow::Result<MultiLink> {
    if offsets.len() != cookies.len() || offsets.is_empty() {
        bail!("{} offsets and {} cookies", offsets.len(), cookies.len());
    }
    let path = CString::new(path.as_os_str().as_bytes()).context("a path with a NUL byte")?;
    let mut attr = [0u8; ATTR_BYTES];
    put(&mut attr, 0, (program.as_raw_fd() as u32).to_ne_bytes());
    put(&mut attr, 8, kind.attach_type().to_ne_bytes());
    let flags = if kind == LinkKind::Return {
        BPF_F_UPROBE_MULTI_RETURN
    } else {
        0
    };
    // link_create.uprobe_multi: path, offsets, ref_ctr_offsets (none), cookies, cnt, flags,
    // pid; link_create.flags (offset 12) must stay 0.
    put(&mut attr, 16, (path.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 24, (offsets.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 40, (cookies.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 48, u32::try_from(offsets.len())?.to_ne_bytes());
    put(&mut attr, 52, flags.to_ne_bytes());
    put(&mut attr, 56, pid.to_ne_bytes());
    let fd = bpf(BPF_LINK_CREATE, &mut attr).with_context(|| {
        if kind == LinkKind::Session {
            "creating a uprobe session link"
        } else {
            "creating a uprobe_multi link"
        }
    })?;
    Ok(MultiLink(fd))
}
