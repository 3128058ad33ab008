//! Which allocator a process really uses: `malloc` and the rest resolved the way the dynamic
//! linker resolves them for that process (the executable first, then its libraries in load
//! order, `LD_PRELOAD` ones included), so that leaktrace attaches where the calls really go:
//! glibc, jemalloc, tcmalloc, mimalloc, a static executable, or a Rust binary with a
//! statically linked, prefixed jemalloc (`_rjem_*`).

use std::{
    collections::{HashMap, HashSet},
    ops::Range,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, bail};
use object::{Object as _, ObjectSection as _, ObjectSegment as _, ObjectSymbol as _};

use leaktrace_common::args;
use leaktrace_common::names::program::{
    ALIGNED_ALLOC_ENTRY, CALLOC_ENTRY, FREE_ENTRY, MALLOC_ENTRY, MMAP_ENTRY, MREMAP_ENTRY,
    MUNMAP_ENTRY, POSIX_MEMALIGN_ENTRY, PY_FREE_ENTRY, PY_INLINE_ALLOC, PY_INLINE_FREE,
    PY_NEW_POOL_ENTRY, REALLOC_ENTRY, REALLOCARRAY_ENTRY, XALLOCX_ENTRY,
};

use super::{
    probe_point::{ModuleCode, ProbePoint},
    python::TableSlot,
};
use crate::{
    proc::{
        files::{self, TargetFile},
        maps::{Mapping, ProcMaps},
        process,
    },
    stacks::python::code::Memory,
    target::Target,
};

/// Entry points looked up by name in the process's global scope, with the BPF program that
/// reads their arguments. Each allocator's API maps onto a C one by argument position:
/// `mallocx(size, flags)` is read like `malloc(size)`, `rallocx(ptr, size, flags)` like
/// `realloc`, `sdallocx(ptr, size, flags)` like `free`. Aliases (tcmalloc's `tc_malloc` is its
/// `malloc`) share an address and get one probe, named by the first name listed.
///
/// jemalloc's `xallocx(ptr, size, extra, flags)` resizes in place and returns the new usable
/// size: its own program reports the block resized to `size` when that is at least `size`.
///
/// Not traced: mimalloc's `mi_reallocf` (frees the block when it fails) and `mi_heap_*` (the
/// size is not the first argument).
const ENTRY_POINTS: &[(&str, &str)] = &[
    // C and POSIX: glibc, and every allocator that replaces it under the same names. Those
    // that release memory come first: they are attached first (see `probes::attach`).
    ("munmap", MUNMAP_ENTRY),
    ("mremap", MREMAP_ENTRY),
    ("realloc", REALLOC_ENTRY),
    ("reallocarray", REALLOCARRAY_ENTRY),
    ("malloc", MALLOC_ENTRY),
    ("calloc", CALLOC_ENTRY),
    ("posix_memalign", POSIX_MEMALIGN_ENTRY),
    ("aligned_alloc", ALIGNED_ALLOC_ENTRY),
    ("memalign", ALIGNED_ALLOC_ENTRY),
    ("valloc", MALLOC_ENTRY),
    ("pvalloc", MALLOC_ENTRY),
    ("free", FREE_ENTRY),
    ("cfree", FREE_ENTRY),
    ("mmap", MMAP_ENTRY),
    // jemalloc.
    ("mallocx", MALLOC_ENTRY),
    ("rallocx", REALLOC_ENTRY),
    ("sdallocx", FREE_ENTRY),
    ("dallocx", FREE_ENTRY),
    ("xallocx", XALLOCX_ENTRY),
    // tcmalloc.
    ("tc_malloc", MALLOC_ENTRY),
    ("tc_malloc_skip_new_handler", MALLOC_ENTRY),
    ("tc_calloc", CALLOC_ENTRY),
    ("tc_realloc", REALLOC_ENTRY),
    ("tc_memalign", ALIGNED_ALLOC_ENTRY),
    ("tc_posix_memalign", POSIX_MEMALIGN_ENTRY),
    ("tc_valloc", MALLOC_ENTRY),
    ("tc_pvalloc", MALLOC_ENTRY),
    ("tc_new", MALLOC_ENTRY),
    ("tc_new_nothrow", MALLOC_ENTRY),
    ("tc_newarray", MALLOC_ENTRY),
    ("tc_newarray_nothrow", MALLOC_ENTRY),
    ("tc_new_aligned", MALLOC_ENTRY),
    ("tc_new_aligned_nothrow", MALLOC_ENTRY),
    ("tc_newarray_aligned", MALLOC_ENTRY),
    ("tc_newarray_aligned_nothrow", MALLOC_ENTRY),
    ("tc_free", FREE_ENTRY),
    ("tc_cfree", FREE_ENTRY),
    ("tc_free_sized", FREE_ENTRY),
    ("tc_delete", FREE_ENTRY),
    ("tc_delete_sized", FREE_ENTRY),
    ("tc_delete_nothrow", FREE_ENTRY),
    ("tc_delete_aligned", FREE_ENTRY),
    ("tc_delete_sized_aligned", FREE_ENTRY),
    ("tc_delete_aligned_nothrow", FREE_ENTRY),
    ("tc_deletearray", FREE_ENTRY),
    ("tc_deletearray_sized", FREE_ENTRY),
    ("tc_deletearray_nothrow", FREE_ENTRY),
    ("tc_deletearray_aligned", FREE_ENTRY),
    ("tc_deletearray_sized_aligned", FREE_ENTRY),
    ("tc_deletearray_aligned_nothrow", FREE_ENTRY),
    // mimalloc: `mi_malloc_aligned(size, alignment)` and the like take the size first.
    ("mi_malloc", MALLOC_ENTRY),
    ("mi_malloc_small", MALLOC_ENTRY),
    ("mi_zalloc", MALLOC_ENTRY),
    ("mi_zalloc_small", MALLOC_ENTRY),
    ("mi_malloc_aligned", MALLOC_ENTRY),
    ("mi_zalloc_aligned", MALLOC_ENTRY),
    ("mi_new", MALLOC_ENTRY),
    ("mi_new_nothrow", MALLOC_ENTRY),
    ("mi_new_aligned", MALLOC_ENTRY),
    ("mi_new_aligned_nothrow", MALLOC_ENTRY),
    ("mi_valloc", MALLOC_ENTRY),
    ("mi_pvalloc", MALLOC_ENTRY),
    ("mi_calloc", CALLOC_ENTRY),
    ("mi_mallocn", CALLOC_ENTRY),
    ("mi_new_n", CALLOC_ENTRY),
    ("mi_calloc_aligned", CALLOC_ENTRY),
    ("mi_realloc", REALLOC_ENTRY),
    ("mi_new_realloc", REALLOC_ENTRY),
    ("mi_realloc_aligned", REALLOC_ENTRY),
    ("mi_reallocn", REALLOCARRAY_ENTRY),
    ("mi_reallocarray", REALLOCARRAY_ENTRY),
    ("mi_new_reallocn", REALLOCARRAY_ENTRY),
    ("mi_recalloc", REALLOCARRAY_ENTRY),
    ("mi_posix_memalign", POSIX_MEMALIGN_ENTRY),
    ("mi_memalign", ALIGNED_ALLOC_ENTRY),
    ("mi_aligned_alloc", ALIGNED_ALLOC_ENTRY),
    ("mi_free", FREE_ENTRY),
    ("mi_cfree", FREE_ENTRY),
    ("mi_free_size", FREE_ENTRY),
    ("mi_free_aligned", FREE_ENTRY),
    ("mi_free_size_aligned", FREE_ENTRY),
];

/// C++ `operator new` (size first in every form: plain, nothrow, aligned) and `operator
/// delete` (pointer first: plain, sized, aligned, nothrow), for `new` and `new[]`.
///
/// They are traced only where the module that provides `malloc` provides them too: an
/// allocator's own operators (jemalloc's, tcmalloc's, mimalloc's) allocate from it directly,
/// without going through its exported `malloc`. Any other provider (libstdc++, whose
/// `operator new` calls `malloc`) is a wrapper around the traced `malloc`/`free`, and probing
/// both would count its blocks twice. A delete that still calls a traced free-like function
/// (jemalloc's `operator delete(void*)` jumps to `free`) is left out for the same reason.
const CXX_OPERATORS: &[(&str, &str)] = &[
    ("_Znwm", MALLOC_ENTRY),
    ("_Znam", MALLOC_ENTRY),
    ("_ZnwmRKSt9nothrow_t", MALLOC_ENTRY),
    ("_ZnamRKSt9nothrow_t", MALLOC_ENTRY),
    ("_ZnwmSt11align_val_t", MALLOC_ENTRY),
    ("_ZnamSt11align_val_t", MALLOC_ENTRY),
    ("_ZnwmSt11align_val_tRKSt9nothrow_t", MALLOC_ENTRY),
    ("_ZnamSt11align_val_tRKSt9nothrow_t", MALLOC_ENTRY),
    ("_ZdlPv", FREE_ENTRY),
    ("_ZdaPv", FREE_ENTRY),
    ("_ZdlPvm", FREE_ENTRY),
    ("_ZdaPvm", FREE_ENTRY),
    ("_ZdlPvRKSt9nothrow_t", FREE_ENTRY),
    ("_ZdaPvRKSt9nothrow_t", FREE_ENTRY),
    ("_ZdlPvSt11align_val_t", FREE_ENTRY),
    ("_ZdaPvSt11align_val_t", FREE_ENTRY),
    ("_ZdlPvmSt11align_val_t", FREE_ENTRY),
    ("_ZdaPvmSt11align_val_t", FREE_ENTRY),
    ("_ZdlPvSt11align_val_tRKSt9nothrow_t", FREE_ENTRY),
    ("_ZdaPvSt11align_val_tRKSt9nothrow_t", FREE_ENTRY),
];

/// A jemalloc linked statically under a prefix, which the program calls directly (not through
/// the dynamic linker): `_rjem_` is the prefix of Rust's tikv-jemallocator.
const PREFIXED_JEMALLOC: &[(&str, &[&str])] = &[(
    "_rjem_",
    &[
        "malloc",
        "calloc",
        "realloc",
        "posix_memalign",
        "aligned_alloc",
        "memalign",
        "valloc",
        "free",
        "mallocx",
        "rallocx",
        "sdallocx",
        "dallocx",
        "xallocx",
    ],
)];

/// One function to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryPoint {
    pub symbol: String,
    /// The BPF program that runs at its entry.
    pub program: &'static str,
    /// The module, as the target names it.
    pub module: String,
    /// `/proc/self/fd/N` of the module's file, opened by `proc::files::open` and held open
    /// by `file`: probes are attached to that very file, not to a path that the target could
    /// point elsewhere meanwhile.
    pub path: PathBuf,
    pub file: Arc<files::Opened>,
    pub file_offset: u64,
    /// Its function's bytes in the file; 0 for a probe inside other functions' code (CPython's
    /// inlined pymalloc).
    pub size: u64,
    /// Where to probe it (its entry program, and its return program at the same place): the
    /// entry, or a later instruction that the kernel emulates rather than single-steps
    /// (`probe_point`).
    pub probe: ProbePoint,
    /// The entry itself as a probe point (`AttachOptions::at_entry`).
    pub entry: ProbePoint,
}

impl EntryPoint {
    /// It is reported at its return, so it also gets the `alloc_return` uretprobe: all but
    /// the free-like ones (munmap too: only a munmap that succeeded releases anything) and
    /// CPython's inlined pymalloc, reported where it is probed.
    pub fn allocates(&self) -> bool {
        !matches!(
            self.program,
            FREE_ENTRY | PY_FREE_ENTRY | PY_INLINE_FREE | PY_INLINE_ALLOC
        )
    }
}

/// The code of the allocator functions leaktrace probes, but the mapping calls': a mapping
/// made from inside one of them is the allocator's own, as one made inside a call whose
/// return is probed is (hidden as a nested call). glibc maps a thread's arena (64 MiB) inside
/// the thread's first allocator call, `free` included, which has no return probe to nest it in.
#[derive(Clone, Debug, Default)]
pub struct OwnCode {
    /// The module as the target names it, and the function's file offsets.
    functions: Vec<(String, Range<u64>)>,
}

impl OwnCode {
    /// Whether the return address at `file_offset` of `module` is inside one of the functions:
    /// after its first byte, at most at its end (a call that ends it).
    pub fn holds(&self, module: &str, file_offset: u64) -> bool {
        self.functions.iter().any(|(name, code)| {
            name == module && code.start < file_offset && file_offset <= code.end
        })
    }
}

/// An allocator that the process uses, and the module that holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Family {
    /// "glibc", "jemalloc", "tcmalloc", "mimalloc", "jemalloc (_rjem_)", or "malloc" for one
    /// leaktrace does not recognise.
    pub name: String,
    pub module: String,
}

/// What leaktrace attaches to in one process.
#[derive(Clone, Debug)]
pub struct Allocator {
    /// The program's own allocator first (a Rust binary's prefixed jemalloc comes before the
    /// `malloc` its C libraries use).
    pub families: Vec<Family>,
    /// One per probed address.
    pub entry_points: Vec<EntryPoint>,
    /// CPython's `PyObject_Free` and `PyMem_Free` where they are wrappers single-stepped at
    /// their entries: probed in the function their tables lead to instead, once the process
    /// shows that it is pymalloc's (`settle_python_frees`).
    pub table_frees: Vec<TableFree>,
    /// Lines for the attach output: why a hot entry point stays single-stepped.
    pub notes: Vec<String>,
}

/// CPython's exported free functions of one module that only call through an allocator table
/// (pyenv's builds: `mov`s and `jmp *`, nothing the kernel emulates), and pymalloc's
/// `_PyObject_Free(ctx, ptr)`, which the tables hold by default and which begins with a branch
/// the kernel emulates.
#[derive(Clone, Debug)]
pub struct TableFree {
    module: String,
    /// Each wrapper's symbol and the table slot it calls through.
    wrappers: Vec<(String, TableSlot)>,
    /// `_PyObject_Free`'s link-time address and file offset.
    vaddr: u64,
    file_offset: u64,
    /// Link-time addresses of the other functions a table may hold, with their names and what
    /// puts them there.
    others: Vec<(u64, &'static str, &'static str)>,
    /// The probe on `_PyObject_Free`, with the pointer in its second argument's register.
    entry: EntryPoint,
}

/// The frees CPython's tables hold other than pymalloc's, and what installs them.
const OTHER_TABLE_FREES: &[(&str, &str)] = &[
    ("_PyMem_RawFree", "PYTHONMALLOC=malloc"),
    (
        "_PyMem_DebugFree",
        "the debug hooks: PYTHONMALLOC=debug, -X dev or a debug build",
    ),
    (
        "_PyMem_DebugRawFree",
        "the debug hooks: PYTHONMALLOC=debug, -X dev or a debug build",
    ),
];

impl Allocator {
    /// The allocator of the program's own allocations, e.g. "jemalloc".
    pub fn name(&self) -> &str {
        &self.families[0].name
    }

    /// The module that holds it, as the target names it.
    pub fn module(&self) -> &str {
        &self.families[0].module
    }

    /// The code of its allocator functions: see [`OwnCode`].
    pub fn own_code(&self) -> OwnCode {
        let functions = self
            .entry_points
            .iter()
            .filter(|e| {
                e.size > 0 && !matches!(e.program, MMAP_ENTRY | MREMAP_ENTRY | MUNMAP_ENTRY)
            })
            .map(|e| (e.module.clone(), e.file_offset..e.file_offset + e.size))
            .collect();
        OwnCode { functions }
    }

    /// Moves the probes of CPython's table-calling frees ([`TableFree`]) onto `_PyObject_Free`
    /// where process `pid` (memory map `maps`, memory `memory`) shows that every one of them
    /// leads there now; otherwise keeps them, with a note saying why. One probe then serves
    /// `PyObject_Free` and `PyMem_Free`, and it sees the pointer the program freed: only
    /// pymalloc's own function is probed, never what debug hooks or another allocator put in
    /// the tables (the debug hooks hand `_PyObject_Free` a pointer of their own).
    pub fn settle_python_frees(&mut self, pid: u32, maps: &ProcMaps, memory: &impl Memory) {
        for table in std::mem::take(&mut self.table_frees) {
            let bias = super::python::mapping_of(maps, &table.module, table.file_offset)
                .map(|m| (m.start + (table.file_offset - m.file_offset)).wrapping_sub(table.vaddr));
            let held: Option<Vec<u64>> = bias.and_then(|bias| {
                table
                    .wrappers
                    .iter()
                    .map(|(_, slot)| slot.function(bias, memory))
                    .collect()
            });
            let why = match (bias, held) {
                (Some(bias), Some(held)) => {
                    let target = table.vaddr.wrapping_add(bias);
                    match held.iter().find(|&&f| f != target) {
                        None => {
                            self.entry_points.retain(|e| {
                                e.module != table.module
                                    || e.program != PY_FREE_ENTRY
                                    || !table.wrappers.iter().any(|(n, _)| *n == e.symbol)
                            });
                            self.entry_points.push(table.entry);
                            continue;
                        }
                        Some(&other) => table
                            .others
                            .iter()
                            .find(|&&(vaddr, ..)| vaddr.wrapping_add(bias) == other)
                            .map_or_else(
                                || "their allocator table holds another function (tracemalloc started before the trace, or an allocator installed with PyMem_SetAllocator)".to_owned(),
                                |&(_, name, why)| format!("their allocator table holds {name} ({why})"),
                            ),
                    }
                }
                _ => format!("cannot read their allocator table in the memory of pid {pid}"),
            };
            self.notes.push(table.note(&why));
        }
    }

    /// Keeps the probes of CPython's table-calling frees at their entries, with a note saying
    /// `why` (spawn mode: a program not started yet has not chosen its allocator, which
    /// `PYTHONMALLOC` and `-X dev` change at start-up).
    pub fn keep_python_frees(&mut self, why: &str) {
        for table in std::mem::take(&mut self.table_frees) {
            self.notes.push(table.note(why));
        }
    }

    /// "jemalloc in /usr/lib/x86_64-linux-gnu/libjemalloc.so.2", joined by " + ".
    pub fn describe(&self) -> String {
        self.families
            .iter()
            .map(|f| format!("{} in {}", f.name, f.module))
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

impl TableFree {
    /// The line that says why its wrappers stay single-stepped.
    fn note(&self, why: &str) -> String {
        let names = self
            .wrappers
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(" and ");
        format!(
            "leaktrace: note: {names} of {} stay probed at their entries, single-stepped, rather than at pymalloc's _PyObject_Free (emulated): {why}",
            self.module
        )
    }
}

/// Finds the allocator of process `pid`, whose memory map is `maps`: the module that
/// provides `malloc` to it and the entry points to probe. Fails, in one line, when the
/// process has no allocator entry point leaktrace knows.
pub fn discover(pid: u32, maps: &ProcMaps) -> anyhow::Result<Allocator> {
    let order = load_order(pid, maps)?;
    let modules: Vec<Module> = order
        .iter()
        .enumerate()
        .map(|(i, name)| Module::read(pid, maps, name, i == 0))
        .collect::<anyhow::Result<_>>()?;
    resolve(&modules)
}

/// The allocator of a running target: [`discover`] in its memory map.
pub fn of_target(target: &Target) -> anyhow::Result<Allocator> {
    let mut allocator = discover(target.pid, target.space.maps())
        .with_context(|| format!("process {} ({})", target.pid, target.command))?;
    if !allocator.table_frees.is_empty() {
        match process::memory(target.pid) {
            Ok(memory) => {
                allocator.settle_python_frees(target.pid, target.space.maps(), &memory);
            }
            Err(err) => allocator.keep_python_frees(&format!(
                "cannot read the memory of pid {} ({err})",
                target.pid
            )),
        }
    }
    Ok(allocator)
}

/// The allocator of a program not started yet (spawn mode: process `pid` is held before its
/// `exec`), from its files: the executable and then the libraries its loader will load, in
/// load order (`ld.so --list`).
pub fn discover_files(
    pid: u32,
    executable: &Path,
    libraries: &[PathBuf],
) -> anyhow::Result<Allocator> {
    let modules: Vec<Module> = std::iter::once(executable)
        .chain(libraries.iter().map(PathBuf::as_path))
        .enumerate()
        .map(|(i, path)| {
            let opened = files::open(pid, TargetFile::Path(path))
                .with_context(|| format!("reading {}", path.display()))?;
            let data = opened
                .read_all()
                .with_context(|| format!("reading {}", path.display()))?;
            let name = path.display().to_string();
            Module::parse(&name, Arc::new(opened), data, i == 0)
                .with_context(|| format!("{name} is not an ELF file leaktrace can read"))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut allocator = resolve(&modules)?;
    allocator.keep_python_frees(
        "leaktrace starts the program before CPython sets up its allocator table (PYTHONMALLOC and -X dev change it then); attached with -p to the running interpreter, leaktrace probes _PyObject_Free where the table holds it",
    );
    Ok(allocator)
}

/// [`resolve`] over one module read from `data` (the property tests feed it damaged files).
#[cfg(test)]
pub(crate) fn fuzz_resolve(data: Vec<u8>) -> anyhow::Result<Allocator> {
    static FILE: std::sync::OnceLock<Arc<files::Opened>> = std::sync::OnceLock::new();
    let file = FILE.get_or_init(|| {
        Arc::new(files::open(std::process::id(), TargetFile::Path(Path::new("/bin/sh"))).unwrap())
    });
    let module = Module::parse("fuzzed", file.clone(), data, false)?;
    resolve(&[module])
}

fn resolve(modules: &[Module]) -> anyhow::Result<Allocator> {
    let lookup = |name: &str| {
        modules
            .iter()
            .enumerate()
            .find_map(|(i, m)| m.lookup(name).map(|sym| (i, sym)))
    };
    let mut candidates: Vec<(usize, String, &'static str, Sym)> = Vec::new();
    let mut families = Vec::new();

    // A prefixed jemalloc in the executable serves the program's own allocations.
    for &(prefix, names) in PREFIXED_JEMALLOC {
        let Some(exe) = modules.first() else { break };
        let found: Vec<_> = names
            .iter()
            .filter_map(|&name| {
                let symbol = format!("{prefix}{name}");
                let program = program_of(name)?;
                exe.all.get(&symbol).map(|&sym| (0, symbol, program, sym))
            })
            .collect();
        if found.iter().any(|c| c.1.ends_with("malloc")) {
            families.push(Family {
                name: format!("jemalloc ({prefix})"),
                module: exe.name.clone(),
            });
            candidates.extend(found);
        }
    }

    let malloc = lookup("malloc");
    if let Some((m, _)) = malloc {
        if lookup("free").is_none() {
            bail!(
                "{} provides `malloc` but no `free` is found: leaktrace cannot trace this allocator",
                modules[m].name
            );
        }
        families.push(Family {
            name: modules[m].classify().to_owned(),
            module: modules[m].name.clone(),
        });
        for &(name, program) in ENTRY_POINTS.iter().chain(super::python::ENTRY_POINTS) {
            if let Some((i, sym)) = lookup(name) {
                candidates.push((i, name.to_owned(), program, sym));
            }
        }
        for &(name, program) in CXX_OPERATORS {
            if let Some((i, sym)) = lookup(name).filter(|&(i, _)| i == m) {
                candidates.push((i, name.to_owned(), program, sym));
            }
        }
    }
    if families.is_empty() {
        let exe = modules
            .first()
            .map_or("the executable", |m| m.name.as_str());
        bail!(
            "no allocator entry point found: neither {exe} nor its libraries define `malloc` \
             (nor a prefixed jemalloc such as `_rjem_malloc`); a stripped static binary hides it"
        );
    }

    // A function that only jumps to another traced one (mimalloc's `posix_memalign` is
    // `jmp mi_posix_memalign`) needs no probe of its own: the target's sees the call. A
    // free-like function that calls another traced free-like one anywhere (jemalloc's
    // `operator delete(void*)` ends in `jmp free`) would report each free twice.
    let mut wrappers = HashSet::new();
    for (k, c) in candidates.iter().enumerate() {
        if c.1 == "malloc" || c.1 == "free" {
            continue;
        }
        let module = &modules[c.0];
        let others: Vec<_> = candidates
            .iter()
            .filter(|o| o.3.vaddr != c.3.vaddr || o.0 != c.0)
            .collect();
        let targets = |free_only: bool| {
            let kept = others.iter().filter(|o| !free_only || o.2 == FREE_ENTRY);
            let addresses: HashSet<u64> = kept
                .clone()
                .filter(|o| o.0 == c.0)
                .map(|o| o.3.vaddr)
                .collect();
            let names: HashSet<&str> = kept.map(|o| o.1.as_str()).collect();
            (addresses, names)
        };
        let (addresses, names) = targets(false);
        let trampoline = module.jumps_first_to_any(&c.3, &addresses, &names);
        let (addresses, names) = targets(true);
        if trampoline || (c.2 == FREE_ENTRY && module.calls_any(&c.3, &addresses, &names)) {
            wrappers.insert(k);
        }
    }

    let code: Vec<ModuleCode<'_>> = modules
        .iter()
        .map(|m| ModuleCode::of_elf(&m.data))
        .collect();
    // CPython's modules whose `PyObject_Malloc` has pymalloc compiled in: its copies in the
    // callers are probed too, except in the functions probed at their entry.
    let pythons: Vec<(usize, Sym, FileRanges)> = candidates
        .iter()
        .filter(|c| c.1 == "PyObject_Malloc" && super::pymalloc_inline::enabled())
        .filter(|c| {
            let data = &modules[c.0].data;
            let at = usize::try_from(c.3.file_offset).unwrap_or(usize::MAX);
            let len = usize::try_from(c.3.size.clamp(1, 256)).unwrap_or(0);
            data.get(at..at.saturating_add(len))
                .and_then(|code| super::python::speculated_allocator(code, c.3.vaddr))
                .is_some()
        })
        .map(|c| {
            let probed = candidates
                .iter()
                .filter(|o| o.0 == c.0)
                .filter(|o| super::python::ENTRY_POINTS.iter().any(|&(n, _)| n == o.1))
                .map(|o| (o.3.file_offset, o.3.file_offset + o.3.size))
                .collect();
            (c.0, c.3, probed)
        })
        .collect();
    let mut seen = HashSet::new();
    let mut entry_points: Vec<EntryPoint> = candidates
        .into_iter()
        .enumerate()
        .filter(|(k, _)| !wrappers.contains(k))
        .filter(|(_, c)| seen.insert((c.0, c.3.vaddr)))
        .map(|(_, (i, symbol, program, sym))| EntryPoint {
            probe: code[i].choose(sym.file_offset, args::read_by(program)),
            entry: code[i].at_entry(sym.file_offset),
            symbol,
            program,
            module: modules[i].name.clone(),
            path: modules[i].file.path.clone(),
            file: modules[i].file.clone(),
            file_offset: sym.file_offset,
            size: sym.size,
        })
        .collect();
    for (i, malloc, probed) in pythons {
        entry_points.extend(inlined_pymalloc(&modules[i], &code[i], malloc, &probed));
    }
    let table_frees = table_frees(modules, &code, &entry_points);
    Ok(Allocator {
        families,
        entry_points,
        table_frees,
        notes: Vec::new(),
    })
}

/// The [`TableFree`] of each module whose `PyObject_Free` or `PyMem_Free` is single-stepped
/// and calls through a table, where the module has `_PyObject_Free` (in its full symbol
/// table: it is static).
fn table_frees(
    modules: &[Module],
    code: &[ModuleCode<'_>],
    entry_points: &[EntryPoint],
) -> Vec<TableFree> {
    let mut found: Vec<TableFree> = Vec::new();
    for (i, module) in modules.iter().enumerate() {
        let wrappers: Vec<(String, TableSlot)> = entry_points
            .iter()
            .filter(|e| {
                e.program == PY_FREE_ENTRY
                    && e.module == module.name
                    && e.probe.trap == super::probe_point::Trap::SingleStepped
            })
            .filter_map(|e| {
                let sym = module.lookup(&e.symbol)?;
                let slot = super::python::table_free_slot(module.code(&sym)?, sym.vaddr)?;
                Some((e.symbol.clone(), slot))
            })
            .collect();
        if wrappers.is_empty() {
            continue;
        }
        let Some(target) = module.static_function("_PyObject_Free") else {
            continue;
        };
        // The freed pointer is the second argument: the program's first, in that register.
        let second = |point: ProbePoint| ProbePoint {
            cookie: args::cookie(&[args::location(point.cookie, 1)]),
            ..point
        };
        let probe = second(code[i].choose(target.file_offset, &[1]));
        let others = OTHER_TABLE_FREES
            .iter()
            .filter_map(|&(name, why)| Some((module.static_function(name)?.vaddr, name, why)))
            .collect();
        found.push(TableFree {
            module: module.name.clone(),
            wrappers,
            vaddr: target.vaddr,
            file_offset: target.file_offset,
            others,
            entry: EntryPoint {
                symbol: "_PyObject_Free".to_owned(),
                program: PY_FREE_ENTRY,
                module: module.name.clone(),
                path: module.file.path.clone(),
                file: module.file.clone(),
                file_offset: target.file_offset,
                size: target.size,
                probe,
                entry: second(code[i].at_entry(target.file_offset)),
            },
        });
    }
    found
}

/// The probes on the copies of pymalloc's fast paths in `module` (`pymalloc_inline`), and on
/// `allocate_from_new_pool`, which `PyObject_Malloc` (`malloc`) calls.
fn inlined_pymalloc(
    module: &Module,
    code: &ModuleCode<'_>,
    malloc: Sym,
    probed: &[(u64, u64)],
) -> Vec<EntryPoint> {
    let sites = super::pymalloc_inline::find(
        code,
        probed,
        (malloc.file_offset, malloc.file_offset + malloc.size),
    );
    let point = |site: &super::pymalloc_inline::Site| ProbePoint {
        file_offset: site.file_offset,
        cookie: site.cookie,
        trap: super::probe_point::Trap::Emulated,
    };
    let entry = |symbol: &str, program: &'static str, probe: ProbePoint| EntryPoint {
        symbol: symbol.to_owned(),
        program,
        module: module.name.clone(),
        path: module.file.path.clone(),
        file: module.file.clone(),
        file_offset: probe.file_offset,
        size: 0,
        probe,
        entry: probe,
    };
    let allocs = sites
        .allocs
        .iter()
        .map(|site| entry("pymalloc_alloc (inlined)", PY_INLINE_ALLOC, point(site)));
    let frees = sites
        .frees
        .iter()
        .map(|site| entry("pymalloc_free (inlined)", PY_INLINE_FREE, point(site)));
    let new_pool = sites.new_pool.map(|offset| {
        let probe = code.choose(offset, args::read_by(PY_NEW_POOL_ENTRY));
        EntryPoint {
            entry: code.at_entry(offset),
            file_offset: offset,
            ..entry("allocate_from_new_pool", PY_NEW_POOL_ENTRY, probe)
        }
    });
    frees.chain(allocs).chain(new_pool).collect()
}

fn program_of(name: &str) -> Option<&'static str> {
    ENTRY_POINTS
        .iter()
        .find(|&&(n, _)| n == name)
        .map(|&(_, program)| program)
}

/// File offset ranges (start, end) of functions.
type FileRanges = Vec<(u64, u64)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sym {
    vaddr: u64,
    size: u64,
    file_offset: u64,
}

/// One ELF module of the process, with what resolution needs from it.
struct Module {
    /// As the target names it (its path in /proc/PID/maps).
    name: String,
    file: Arc<files::Opened>,
    /// Symbols other modules bind to: the dynamic symbol table's defined global functions.
    exported: HashMap<String, Sym>,
    /// Every defined global function (the executable's own code binds to them directly, and
    /// a static executable has no dynamic symbol table).
    all: HashMap<String, Sym>,
    is_executable: bool,
    /// Addresses of PLT stubs and GOT slots, and the symbol they lead to.
    imports: HashMap<u64, String>,
    /// (vaddr, size, file offset) of each loadable segment.
    segments: Vec<(u64, u64, u64)>,
    data: Vec<u8>,
}

/// The file offset of link-time address `addr` in the module whose loadable segments are
/// `segments` (address, size, file offset).
fn file_offset_in(segments: &[(u64, u64, u64)], addr: u64) -> Option<u64> {
    segments
        .iter()
        .find(|&&(start, size, _)| addr.checked_sub(start).is_some_and(|into| into < size))
        .and_then(|&(start, _, offset)| (addr - start).checked_add(offset))
}

impl Module {
    /// Opens the module the target maps under `name` (see `proc::files::open`: the mapped
    /// file itself even when deleted or replaced on disk since it was loaded, as after a
    /// package upgrade, or in a container's own files).
    fn read(pid: u32, maps: &ProcMaps, name: &str, is_executable: bool) -> anyhow::Result<Self> {
        let which = match maps.mappings.iter().find(|m| m.path == name) {
            Some(mapping) => TargetFile::Mapped(mapping),
            None => TargetFile::Path(Path::new(name)),
        };
        let opened =
            files::open(pid, which).with_context(|| format!("reading {name} of process {pid}"))?;
        let data = opened
            .read_all()
            .with_context(|| format!("reading {name} of process {pid}"))?;
        let mut module = Self::parse(name, Arc::new(opened), data, is_executable)
            .with_context(|| format!("{name} is not an ELF file leaktrace can read"))?;
        module.name = name.to_owned();
        Ok(module)
    }

    fn parse(
        name: &str,
        file: Arc<files::Opened>,
        data: Vec<u8>,
        is_executable: bool,
    ) -> Result<Self, object::Error> {
        let elf = object::File::parse(&*data)?;
        let segments: Vec<(u64, u64, u64)> = elf
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                (s.address(), size, offset)
            })
            .collect();
        let file_offset = |addr: u64| file_offset_in(&segments, addr);
        let functions = |symbols: object::SymbolIterator<'_, '_>| {
            let mut map = HashMap::new();
            for symbol in symbols {
                if symbol.kind() != object::SymbolKind::Text
                    || symbol.is_undefined()
                    || !symbol.is_global()
                    || symbol.address() == 0
                {
                    continue;
                }
                let (Ok(name), Some(offset)) = (symbol.name(), file_offset(symbol.address()))
                else {
                    continue;
                };
                map.entry(name.to_owned()).or_insert(Sym {
                    vaddr: symbol.address(),
                    size: symbol.size(),
                    file_offset: offset,
                });
            }
            map
        };
        let exported = functions(elf.dynamic_symbols());
        let mut all = functions(elf.symbols());
        for (name, sym) in &exported {
            all.entry(name.clone()).or_insert(*sym);
        }
        let imports = imports(&elf);
        drop(elf);
        Ok(Self {
            name: name.to_owned(),
            file,
            exported,
            all,
            is_executable,
            imports,
            segments,
            data,
        })
    }

    /// The definition of `name` that a reference from another module binds to. The
    /// executable's own code calls its functions directly, exported or not.
    fn lookup(&self, name: &str) -> Option<Sym> {
        if self.is_executable {
            self.all.get(name).copied()
        } else {
            self.exported.get(name).copied()
        }
    }

    /// A function of the module's full symbol table, local ones included (CPython's
    /// allocator functions are static).
    fn static_function(&self, name: &str) -> Option<Sym> {
        if let Some(&sym) = self.all.get(name) {
            return Some(sym);
        }
        let elf = object::File::parse(&*self.data).ok()?;
        let symbol = elf.symbols().find(|s| {
            s.name() == Ok(name)
                && s.kind() == object::SymbolKind::Text
                && !s.is_undefined()
                && s.address() != 0
        })?;
        Some(Sym {
            vaddr: symbol.address(),
            size: symbol.size(),
            file_offset: file_offset_in(&self.segments, symbol.address())?,
        })
    }

    /// The allocator this module implements, recognised by the API only it exports.
    fn classify(&self) -> &'static str {
        let has = |name: &str| self.all.contains_key(name);
        if has("mallocx") {
            "jemalloc"
        } else if has("tc_malloc") {
            "tcmalloc"
        } else if has("mi_malloc") {
            "mimalloc"
        } else if has("__libc_malloc") {
            "glibc"
        } else {
            "malloc"
        }
    }

    fn code(&self, sym: &Sym) -> Option<&[u8]> {
        // A function's size may be missing; 4 KiB covers any wrapper.
        let len = if sym.size == 0 {
            4096
        } else {
            sym.size.min(4096)
        };
        let &(start, size, offset) = self.segments.iter().find(|&&(start, size, _)| {
            sym.vaddr.checked_sub(start).is_some_and(|into| into < size)
        })?;
        let into = sym.vaddr - start;
        let len = len.min(size - into);
        let begin = usize::try_from(offset.checked_add(into)?).ok()?;
        self.data
            .get(begin..begin.checked_add(usize::try_from(len).ok()?)?)
    }

    /// Whether the function at `sym` calls or jumps to one of `addresses` in this module, or
    /// to one of `names` through the PLT or the GOT.
    fn calls_any(&self, sym: &Sym, addresses: &HashSet<u64>, names: &HashSet<&str>) -> bool {
        let Some(code) = self.code(sym) else {
            return false;
        };
        branch_targets(sym.vaddr, code).any(|target| self.leads_to(target, addresses, names))
    }

    /// Whether the function at `sym` is nothing but a jump (after an optional `endbr64`) to
    /// one of `addresses` or `names`.
    fn jumps_first_to_any(
        &self,
        sym: &Sym,
        addresses: &HashSet<u64>,
        names: &HashSet<&str>,
    ) -> bool {
        const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
        let Some(code) = self.code(sym) else {
            return false;
        };
        let skip = if code.starts_with(&ENDBR64) { 4 } else { 0 };
        let code = &code[skip..];
        let first_is_jump = code.first() == Some(&0xe9) || code.starts_with(&[0xff, 0x25]);
        first_is_jump
            && branch_targets(sym.vaddr.wrapping_add(skip as u64), code)
                .next()
                .is_some_and(|target| self.leads_to(target, addresses, names))
    }

    fn leads_to(&self, target: u64, addresses: &HashSet<u64>, names: &HashSet<&str>) -> bool {
        addresses.contains(&target)
            || self
                .imports
                .get(&target)
                .is_some_and(|name| names.contains(name.as_str()))
    }
}

/// Targets of every `call rel32`, `jmp rel32`, `call *disp(%rip)` and `jmp *disp(%rip)` whose
/// bytes appear in `code` (at `vaddr`). A byte scan, not a disassembly: a false match would
/// also have to hit one of the few addresses asked about.
fn branch_targets(vaddr: u64, code: &[u8]) -> impl Iterator<Item = u64> + '_ {
    (0..code.len()).filter_map(move |i| {
        let rel = |at: usize| {
            code.get(at..at + 4)
                .map(|b| i64::from(i32::from_le_bytes(b.try_into().expect("4 bytes"))))
        };
        let next = |len: usize| vaddr.wrapping_add((i + len) as u64) as i64;
        match code[i] {
            0xe8 | 0xe9 => rel(i + 1).map(|r| next(5).wrapping_add(r) as u64),
            0xff if matches!(code.get(i + 1), Some(0x15 | 0x25)) => {
                rel(i + 2).map(|r| next(6).wrapping_add(r) as u64)
            }
            _ => None,
        }
    })
}

/// PLT stubs and GOT slots of the functions a module imports, by address: a call through
/// either reaches the named function wherever the dynamic linker bound it.
fn imports(file: &object::File<'_>) -> HashMap<u64, String> {
    let mut imports = HashMap::new();
    let (Some(relocations), Some(dynsym)) =
        (file.dynamic_relocations(), file.dynamic_symbol_table())
    else {
        return imports;
    };
    use object::ObjectSymbolTable as _;
    for (slot, relocation) in relocations {
        if let object::RelocationTarget::Symbol(index) = relocation.target()
            && let Ok(symbol) = dynsym.symbol_by_index(index)
            && let Ok(name) = symbol.name()
            && !name.is_empty()
        {
            imports.insert(slot, name.to_owned());
        }
    }
    // Each stub jumps through its GOT slot: `jmp *disp(%rip)` (with a `bnd` or `endbr64`
    // around it in .plt.sec). Entries are 16 bytes (8 in .plt.got).
    let mut stubs = Vec::new();
    for (section, entry) in [(".plt", 16), (".plt.sec", 16), (".plt.got", 8)] {
        let Some(section) = file.section_by_name(section) else {
            continue;
        };
        let Ok(code) = section.data() else { continue };
        let base = section.address();
        for (i, window) in code.windows(2).enumerate() {
            if window == [0xff, 0x25]
                && let Some(slot) = branch_targets(base.wrapping_add(i as u64), &code[i..]).next()
                && let Some(name) = imports.get(&slot)
            {
                let at = base.wrapping_add(i as u64);
                stubs.push((at.wrapping_sub(i as u64 % entry), name.clone()));
            }
        }
    }
    imports.extend(stubs);
    imports
}

/// The process's modules in the order the dynamic linker searches them: the executable, then
/// the link map (`LD_PRELOAD` libraries, then `DT_NEEDED` breadth first, then `dlopen`ed ones).
/// Without a readable link map (a static executable), the executable, then the other
/// executable file mappings in the order they appear in the memory map.
fn load_order(pid: u32, maps: &ProcMaps) -> anyhow::Result<Vec<String>> {
    let (_, exe_inode) =
        process::exe_id(pid).with_context(|| format!("reading /proc/{pid}/exe"))?;
    let exe_mapping = maps
        .mappings
        .iter()
        .find(|m| m.is_file() && m.inode == exe_inode)
        .with_context(|| format!("process {pid} does not map its own executable"))?;
    let mut order = vec![exe_mapping.path.clone()];
    let linked = link_map(pid, maps, exe_mapping).unwrap_or_default();
    let rest = if linked.is_empty() {
        maps.mappings
            .iter()
            .filter(|m| m.is_file() && m.is_executable())
            .map(|m| m.path.clone())
            .collect()
    } else {
        linked
    };
    for path in rest {
        if !order.contains(&path) {
            order.push(path);
        }
    }
    Ok(order)
}

/// The libraries in the dynamic linker's link map (`r_debug.r_map`), as paths of the memory
/// map. None when the executable has no `DT_DEBUG` (static) or the map cannot be read.
fn link_map(pid: u32, maps: &ProcMaps, exe_mapping: &Mapping) -> Option<Vec<String>> {
    let data = files::open(pid, TargetFile::Mapped(exe_mapping))
        .and_then(|opened| opened.read_all())
        .ok()?;
    let file = object::File::parse(&*data).ok()?;
    let dynamic = file.section_by_name(".dynamic")?.address();
    let lowest = file.segments().map(|s| s.address() & !0xfff).min()?;
    let first = maps.mappings.iter().find(|m| {
        m.inode == exe_mapping.inode && m.path == exe_mapping.path && m.file_offset == 0
    })?;
    let bias = first.start.wrapping_sub(lowest);
    let mem = process::memory(pid).ok()?;
    let read_u64 = |addr: u64| {
        let mut buf = [0; 8];
        mem.read_exact_at(&mut buf, addr).ok()?;
        Some(u64::from_le_bytes(buf))
    };
    const DT_NULL: u64 = 0;
    const DT_DEBUG: u64 = 21;
    let mut r_debug = 0;
    for i in 0..512 {
        let at = dynamic.wrapping_add(bias).wrapping_add(i * 16);
        match read_u64(at)? {
            DT_NULL => break,
            DT_DEBUG => {
                r_debug = read_u64(at.wrapping_add(8))?;
                break;
            }
            _ => {}
        }
    }
    if r_debug == 0 {
        return None;
    }
    // struct r_debug { int r_version; struct link_map *r_map; ... }
    // struct link_map { l_addr; char *l_name; l_ld; l_next; l_prev; }
    // The process writes these words: any value, read with wrapping arithmetic.
    let mut node = read_u64(r_debug.wrapping_add(8))?;
    let mut paths = Vec::new();
    for _ in 0..4096 {
        if node == 0 {
            break;
        }
        let (name_ptr, ld, next) = (
            read_u64(node.wrapping_add(8))?,
            read_u64(node.wrapping_add(16))?,
            read_u64(node.wrapping_add(24))?,
        );
        // The executable (empty name) and the vDSO (no file) are skipped; a library is named
        // by the memory map's path of the mapping that holds its dynamic section.
        if let Some(mapping) = maps.find(ld)
            && mapping.inode != exe_mapping.inode
            && name_ptr != 0
        {
            paths.push(mapping.path.clone());
        }
        node = next;
    }
    Some(paths)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn module(name: &str, is_executable: bool) -> Module {
        let opened = files::open(std::process::id(), TargetFile::Path(Path::new(name))).unwrap();
        let data = opened.read_all().unwrap();
        Module::parse(name, Arc::new(opened), data, is_executable).unwrap()
    }

    #[test]
    fn branch_targets_decode_relative_calls_and_jumps() {
        // call +0x10; jmp -0x10; jmp *0x20(%rip); a stray 0xe8 at the end is cut short.
        // Targets are relative to the end of each instruction.
        let code = [
            0xe8, 0x10, 0, 0, 0, 0xe9, 0xf0, 0xff, 0xff, 0xff, 0xff, 0x25, 0x20, 0, 0, 0, 0xe8,
        ];
        let targets: Vec<u64> = branch_targets(0x1000, &code).collect();
        assert_eq!(targets, [0x1015, 0xffa, 0x1030]);
    }

    #[test]
    fn this_process_resolves_malloc_to_glibc_and_skips_libstdcxx_operators() {
        let maps = ProcMaps::read(std::process::id()).unwrap();
        let allocator = discover(std::process::id(), &maps).unwrap();
        assert_eq!(allocator.name(), "glibc");
        assert!(allocator.module().contains("libc.so"), "{allocator:?}");
        let symbols: Vec<&str> = allocator
            .entry_points
            .iter()
            .map(|e| e.symbol.as_str())
            .collect();
        assert!(symbols.contains(&"malloc") && symbols.contains(&"free"));
        assert!(!symbols.iter().any(|s| s.starts_with("_Z")), "{symbols:?}");
        // aligned_alloc and memalign are one function in glibc: probed once.
        let mut offsets: Vec<_> = allocator
            .entry_points
            .iter()
            .map(|e| (e.module.as_str(), e.file_offset))
            .collect();
        offsets.sort();
        offsets.dedup();
        assert_eq!(offsets.len(), allocator.entry_points.len());
    }

    #[test]
    fn allocator_libraries_are_classified_and_their_wrappers_left_out() {
        for (lib, name, probed, left_out) in [
            (
                "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                "jemalloc",
                &["mallocx", "sdallocx", "_Znwm", "_ZdlPvm"][..],
                // operator delete(void*) jumps to free.
                &["_ZdlPv"][..],
            ),
            (
                "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                "tcmalloc",
                &["malloc", "_Znwm", "_ZdlPvm"][..],
                &[][..],
            ),
            (
                "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2",
                "mimalloc",
                &["malloc", "_Znwm"][..],
                // mi_free_size (operator delete(void*, size_t)) jumps to mi_free.
                &["mi_free_size", "_ZdlPvm"][..],
            ),
        ] {
            if !fs::exists(lib).unwrap() {
                // Installed by `cargo xtask setup`; a bare `cargo test` may run without it.
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "{lib} missing"
                );
                eprintln!("skipping {lib}: not installed (cargo xtask setup)");
                continue;
            }
            let library = module(lib, false);
            let exe = fs::read_link("/proc/self/exe").unwrap();
            let exe = module(exe.to_str().unwrap(), true);
            let allocator = resolve(&[exe, module(lib, false)]).unwrap();
            assert_eq!(allocator.name(), name);
            assert_eq!(allocator.module(), lib);
            // Aliases share a probe, named after the first name listed: compare addresses.
            let offsets: Vec<u64> = allocator
                .entry_points
                .iter()
                .map(|e| e.file_offset)
                .collect();
            let offset = |s: &str| library.lookup(s).unwrap().file_offset;
            for s in probed {
                assert!(offsets.contains(&offset(s)), "{lib}: {s} not probed");
            }
            for s in left_out {
                assert!(!offsets.contains(&offset(s)), "{lib}: {s} probed");
            }
        }
    }

    #[test]
    fn the_link_map_lists_this_process_s_libraries_in_load_order() {
        let pid = std::process::id();
        let maps = ProcMaps::read(pid).unwrap();
        let order = load_order(pid, &maps).unwrap();
        let exe = maps.mappings.iter().find(|m| m.path == order[0]).unwrap();
        let linked = link_map(pid, &maps, exe).expect("r_debug is readable");
        assert_eq!(linked, order[1..], "the order is the link map's");
        assert_eq!(
            order[0],
            fs::read_link("/proc/self/exe").unwrap().to_str().unwrap()
        );
        // libc is linked by everything, so it comes after the libraries that need it; the
        // dynamic linker itself is loaded last.
        let libc = order.iter().position(|p| p.contains("/libc.so")).unwrap();
        let ld = order.iter().position(|p| p.contains("/ld-linux")).unwrap();
        assert!(libc < ld, "{order:?}");
    }

    #[test]
    fn non_elf_modules_are_rejected() {
        for data in [&b""[..], b"\x7fELF garbage that is not an ELF header"] {
            let opened = files::open(std::process::id(), TargetFile::Path(Path::new("/bin/sh")));
            assert!(Module::parse("x", Arc::new(opened.unwrap()), data.to_vec(), false).is_err());
        }
    }

    #[test]
    fn a_process_without_malloc_is_an_error() {
        let err = resolve(&[]).unwrap_err().to_string();
        assert!(err.starts_with("no allocator entry point found"), "{err}");
    }
}
