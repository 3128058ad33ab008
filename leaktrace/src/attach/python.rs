//! CPython in a traced process: where its interpreter is (the module that defines
//! `_PyRuntime`: the `python3.11` executable, or `libpython3.x.so`), which version it is
//! (`Py_Version`, 3.11+), where its evaluation loop's code lies, and the allocator entry points
//! of its object allocator.

use std::collections::HashSet;

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

use leaktrace_common::names::program::{CALLOC_ENTRY, MALLOC_ENTRY, PY_FREE_ENTRY, REALLOC_ENTRY};

use crate::{
    proc::{
        files::{self, TargetFile},
        maps::{Mapping, ProcMaps},
        process,
    },
    stacks::python::{
        Interpreter, PyProcess,
        layout::{Offsets, Version},
    },
    target::modules::Modules,
};

/// CPython's object and memory allocators: with pymalloc (the default) they serve blocks of up
/// to 512 bytes from its own arenas, which `malloc` never sees; with `PYTHONMALLOC=malloc`
/// they call `malloc`, and the nested call is counted once, as theirs. `PyMem_Raw*` are not
/// here: they are `malloc` itself.
pub const ENTRY_POINTS: &[(&str, &str)] = &[
    ("PyObject_Free", PY_FREE_ENTRY),
    ("PyMem_Free", PY_FREE_ENTRY),
    ("PyObject_Realloc", REALLOC_ENTRY),
    ("PyMem_Realloc", REALLOC_ENTRY),
    ("PyObject_Malloc", MALLOC_ENTRY),
    ("PyMem_Malloc", MALLOC_ENTRY),
    ("PyObject_Calloc", CALLOC_ENTRY),
    ("PyMem_Calloc", CALLOC_ENTRY),
];

/// What was found of CPython in a process.
#[derive(Debug)]
pub enum Found {
    /// No CPython interpreter (no module defines `_PyRuntime`).
    None,
    Known(Box<Interpreter>),
    /// A CPython leaktrace cannot walk: the warning to show once.
    Unknown(String),
}

/// Looks for the interpreter among the modules of process `pid` whose file name says python.
pub fn discover(pid: u32, maps: &ProcMaps) -> Found {
    let mut seen = HashSet::new();
    for mapping in &maps.mappings {
        if !mapping.is_file()
            || !mapping.file_name().contains("python")
            || !seen.insert(mapping.path.as_str())
        {
            continue;
        }
        let Ok(data) = files::open(pid, TargetFile::Mapped(mapping)).and_then(|f| f.read_all())
        else {
            continue;
        };
        match in_module(&data, maps, &mapping.path) {
            Found::None => {}
            found => return found,
        }
    }
    Found::None
}

/// The interpreter in one module's file (`data`), mapped as `maps` say under `path`.
fn in_module(data: &[u8], maps: &ProcMaps, path: &str) -> Found {
    let Ok(file) = object::File::parse(data) else {
        return Found::None;
    };
    let symbol = |name: &str| {
        file.dynamic_symbols()
            .chain(file.symbols())
            .find(|s| s.name() == Ok(name) && !s.is_undefined() && s.address() != 0)
            .map(|s| (s.address(), s.size()))
    };
    let Some((runtime, _)) = symbol("_PyRuntime") else {
        return Found::None;
    };
    let segments: Vec<(u64, u64, u64, u64)> = file
        .segments()
        .map(|s| (s.address(), s.size(), s.file_range().0, s.file_range().1))
        .collect();
    let file_offset = |vaddr: u64| {
        segments
            .iter()
            .find(|&&(start, size, _, _)| start <= vaddr && vaddr < start + size)
            .map(|&(start, _, offset, _)| vaddr - start + offset)
    };
    // Where the module is loaded: the mapping of its file that holds the first segment's
    // first byte tells the bias of every address.
    let Some(bias) = segments.iter().find_map(|&(vaddr, _, offset, filesz)| {
        let m = mapping_of(maps, path, offset).filter(|_| filesz > 0)?;
        Some((m.start + (offset - m.file_offset)).wrapping_sub(vaddr))
    }) else {
        return Found::None;
    };
    let version = symbol("Py_Version")
        .and_then(|(vaddr, _)| file_offset(vaddr))
        .and_then(|at| data.get(at as usize..at as usize + 8))
        .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")));
    let Some(known) = version.and_then(Version::from_hex) else {
        // Before 3.11 there is no `Py_Version`: the file's name (`libpython3.10.so.1.0`,
        // `python3.9`) says which it is.
        let which = version.map_or_else(
            || version_in_name(path).unwrap_or_else(|| "older than 3.11".to_owned()),
            |hex| format!("{}.{}", hex >> 24, (hex >> 16) & 0xff),
        );
        return Found::Unknown(format!(
            "leaktrace: warning: {path} is CPython {which}, whose frames leaktrace cannot read (3.11, 3.12 and 3.13 it can): Python allocations are shown with native frames only"
        ));
    };
    let runtime_addr = runtime.wrapping_add(bias);
    // 3.13 describes its own layout in the first bytes of `_PyRuntime`, as its build wrote
    // them into the file (the interpreter never changes them).
    let offsets = if known.has_debug_offsets() {
        let bytes = file_offset(runtime)
            .and_then(|at| data.get(usize::try_from(at).ok()?..))
            .unwrap_or_default();
        let hex = version.unwrap_or_default();
        match Offsets::from_debug_offsets(bytes, hex, runtime_addr) {
            Ok(offsets) => offsets,
            Err(why) => {
                return Found::Unknown(format!(
                    "leaktrace: warning: {path} is CPython {}, but {why}: Python allocations are shown with native frames only",
                    known.name()
                ));
            }
        }
    } else {
        match known.header_tables(runtime_addr) {
            Some(offsets) => offsets,
            None => return Found::None,
        }
    };
    let eval_ranges = symbol("_PyEval_EvalFrameDefault")
        .map(|(vaddr, size)| {
            let start = vaddr.wrapping_add(bias);
            vec![(start, start + size)]
        })
        .unwrap_or_default();
    Found::Known(Box::new(Interpreter {
        version: known,
        offsets,
        eval_ranges,
        code_type: symbol("PyCode_Type").map(|(vaddr, _)| vaddr.wrapping_add(bias)),
        module: path.to_owned(),
    }))
}

/// `3.10` in `/usr/lib/libpython3.10.so.1.0`.
fn version_in_name(path: &str) -> Option<String> {
    let name = path.rsplit('/').next()?;
    let rest = &name[name.find("python")? + "python".len()..];
    let (major, rest) = rest.split_once('.')?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (major.chars().all(|c| c.is_ascii_digit()) && !major.is_empty() && !minor.is_empty())
        .then(|| format!("{major}.{minor}"))
}

fn mapping_of<'a>(maps: &'a ProcMaps, path: &str, file_offset: u64) -> Option<&'a Mapping> {
    maps.mappings.iter().find(|m| {
        m.path == path
            && m.file_offset <= file_offset
            && file_offset < m.file_offset + (m.end - m.start)
    })
}

/// The Python side of a traced process, if it runs a CPython leaktrace knows; says so in one
/// line when it runs one it does not.
pub fn of_process(pid: u32, maps: &ProcMaps, modules: &Modules) -> Option<PyProcess> {
    match discover(pid, maps) {
        Found::None => None,
        Found::Unknown(warning) => {
            crate::status!("{warning}");
            None
        }
        Found::Known(interp) => match process::memory(pid) {
            Ok(memory) => Some(PyProcess::new(*interp, memory, modules.python_names())),
            Err(err) => {
                crate::status!(
                    "leaktrace: warning: cannot read the memory of pid {pid} ({err}): Python allocations are shown with native frames only"
                );
                None
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_without_python_is_none_and_garbage_never_panics() {
        let maps = ProcMaps::default();
        assert!(matches!(in_module(b"not an elf", &maps, "/x"), Found::None));
        let me = std::fs::read("/proc/self/exe").unwrap();
        assert!(matches!(in_module(&me, &maps, "/x"), Found::None));
    }

    #[test]
    fn versions_in_file_names() {
        assert_eq!(
            version_in_name("/x/libpython3.10.so.1.0").as_deref(),
            Some("3.10")
        );
        assert_eq!(
            version_in_name("/usr/bin/python3.9").as_deref(),
            Some("3.9")
        );
        assert_eq!(version_in_name("/usr/bin/python3").as_deref(), None);
        assert_eq!(version_in_name("/usr/bin/python").as_deref(), None);
        assert_eq!(version_in_name("/usr/bin/pythonx.y").as_deref(), None);
    }

    /// Debian's python3 is 3.11 and never missing where the tests run.
    #[test]
    fn debian_s_python3_is_found_with_its_version_and_evaluation_loop() {
        let Ok(data) = std::fs::read("/usr/bin/python3.11") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "/usr/bin/python3.11 is missing: `cargo xtask setup` installs it"
            );
            return;
        };
        let mut child = std::process::Command::new("/usr/bin/python3.11")
            .args(["-c", "import time; time.sleep(30)"])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let maps = ProcMaps::read(child.id()).unwrap();
        let found = in_module(&data, &maps, "/usr/bin/python3.11");
        let _ = child.kill();
        let _ = child.wait();
        let Found::Known(interp) = found else {
            panic!("not found: {found:?}");
        };
        assert_eq!(interp.version, Version::V3_11);
        assert_eq!(interp.eval_ranges.len(), 1);
        assert!(interp.code_type.is_some());
    }
}
