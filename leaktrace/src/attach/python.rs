//! CPython in a traced process: where its interpreter is (the module that defines
//! `_PyRuntime`: the `python3.11` executable, or `libpython3.x.so`), which version it is
//! (`Py_Version`, 3.11+), where its evaluation loop's code lies, and the allocator entry points
//! of its object allocator.

use std::{collections::HashSet, sync::Arc};

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

use leaktrace_common::names::program::{CALLOC_ENTRY, MALLOC_ENTRY, PY_FREE_ENTRY, REALLOC_ENTRY};

use crate::{
    proc::{
        files::{self, TargetFile},
        maps::{Mapping, ProcMaps},
        process,
    },
    stacks::python::{
        Interpreter, PyNames, PyProcess,
        code::Memory,
        layout::{Offsets, Version},
    },
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

/// Whether `symbol` is one of CPython's allocators of [`ENTRY_POINTS`]: the anonymous
/// mappings its calls make themselves are pymalloc's arenas (`args::PYMALLOC`).
pub fn is_object_allocator(symbol: &str) -> bool {
    ENTRY_POINTS.iter().any(|&(name, _)| name == symbol)
}

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
    // Where the exported function's code is in the file, for the decoder.
    let speculated_malloc = symbol("PyObject_Malloc")
        .and_then(|(vaddr, size)| {
            let at = usize::try_from(file_offset(vaddr)?).ok()?;
            let len = usize::try_from(size.clamp(1, 256)).ok()?;
            speculated_allocator(data.get(at..at + len)?, vaddr)
        })
        .map(|(slot, function)| (slot.wrapping_add(bias), function.wrapping_add(bias)));
    let code_ranges = maps
        .mappings
        .iter()
        .filter(|m| m.path == path && m.is_executable())
        .map(|m| (m.start, m.end))
        .collect();
    let pymalloc_sites =
        (speculated_malloc.is_some() && super::pymalloc_inline::enabled()).then(|| {
            let range = |name: &str| {
                let (vaddr, size) = symbol(name)?;
                let at = file_offset(vaddr)?;
                Some((at, at + size))
            };
            let probed: Vec<(u64, u64)> = ENTRY_POINTS
                .iter()
                .filter_map(|&(name, _)| range(name))
                .collect();
            let malloc = range("PyObject_Malloc").unwrap_or_default();
            super::pymalloc_inline::find(
                &super::probe_point::ModuleCode::of_elf(data),
                &probed,
                malloc,
            )
        });
    Found::Known(Box::new(Interpreter {
        version: known,
        offsets,
        eval_ranges,
        code_ranges,
        code_type: symbol("PyCode_Type").map(|(vaddr, _)| vaddr.wrapping_add(bias)),
        module: path.to_owned(),
        speculated_malloc,
        pymalloc_sites,
        unseen: None,
    }))
}

/// The object allocator table's `malloc` slot and the function that `PyObject_Malloc`'s
/// `code` (at address `ip`) compares it with before calling through it, if it does.
///
/// A build with link-time optimization (Debian's python3.11) devirtualizes the table's calls
/// speculatively: `if (_PyObject.malloc == _PyObject_Malloc) { pymalloc, inlined } else
/// _PyObject.malloc(...)`, in `PyObject_Malloc` and in every function that `PyObject_Malloc`
/// was inlined into (194 places in Debian's 3.11.2, against 23 calls to `_PyObject_Malloc`;
/// `PyObject_Free` likewise). While the table holds that function (pymalloc, the default),
/// neither the exported functions nor the table's are called for most objects: no probe can
/// see them. Decoded: a load of a rip-relative slot into a register (`mov slot(%rip), %reg`),
/// then `cmp $function, %reg`, `cmp %reg, %reg2` after `lea function(%rip), %reg2`, or
/// `cmpq $function, slot(%rip)`, before any jump, call or return.
pub fn speculated_allocator(code: &[u8], ip: u64) -> Option<(u64, u64)> {
    use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, OpKind, Register};

    #[derive(Clone, Copy)]
    enum Held {
        Slot(u64),
        Address(u64),
    }
    let mut held: Vec<(Register, Held)> = Vec::new();
    let get = |held: &[(Register, Held)], r: Register| {
        held.iter().rev().find(|(h, _)| *h == r).map(|&(_, v)| v)
    };
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    for _ in 0..24 {
        if !decoder.can_decode() {
            break;
        }
        let i = decoder.decode();
        if i.is_invalid() {
            return None;
        }
        let rip_relative = i.is_ip_rel_memory_operand();
        match i.code() {
            Code::Mov_r64_rm64 if rip_relative => {
                held.push((i.op0_register(), Held::Slot(i.ip_rel_memory_address())));
                continue;
            }
            Code::Lea_r64_m if rip_relative => {
                held.push((i.op0_register(), Held::Address(i.ip_rel_memory_address())));
                continue;
            }
            Code::Cmp_rm64_imm32 if rip_relative => {
                return Some((i.ip_rel_memory_address(), i.immediate32to64() as u64));
            }
            Code::Cmp_rm64_imm32 | Code::Cmp_RAX_imm32 if i.op0_kind() == OpKind::Register => {
                if let Some(Held::Slot(slot)) = get(&held, i.op0_register()) {
                    return Some((slot, i.immediate32to64() as u64));
                }
            }
            Code::Cmp_rm64_r64 | Code::Cmp_r64_rm64
                if i.op0_kind() == OpKind::Register && i.op1_kind() == OpKind::Register =>
            {
                match (get(&held, i.op0_register()), get(&held, i.op1_register())) {
                    (Some(Held::Slot(slot)), Some(Held::Address(function)))
                    | (Some(Held::Address(function)), Some(Held::Slot(slot))) => {
                        return Some((slot, function));
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        match i.flow_control() {
            FlowControl::Next | FlowControl::ConditionalBranch => {}
            _ => return None,
        }
        // Anything else that writes a register forgets what it held.
        if i.op_count() > 0 && i.op0_kind() == OpKind::Register {
            let written = i.op0_register().full_register();
            held.retain(|(r, _)| r.full_register() != written);
        }
    }
    None
}

/// Where `PyObject_Free` or `PyMem_Free` finds the function it calls: the `free` slot of
/// CPython's allocator table (`_PyObject`, `_PyMem`), as link-time addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableSlot {
    /// `jmp *slot(%rip)` (3.11, whose tables are variables of their own).
    At(u64),
    /// `mov pointer(%rip),%reg; ...; jmp *disp(%reg)` (3.12 and 3.13, whose tables are in
    /// `_PyRuntime`, reached through its GOT entry at `pointer`).
    Behind { pointer: u64, disp: i64 },
}

impl TableSlot {
    /// The function the slot holds now in the process whose `memory` this is, the module
    /// loaded `bias` bytes past its link-time addresses.
    pub fn function(self, bias: u64, memory: &impl Memory) -> Option<u64> {
        let slot = match self {
            Self::At(slot) => slot.wrapping_add(bias),
            Self::Behind { pointer, disp } => memory
                .u64_at(pointer.wrapping_add(bias))?
                .wrapping_add_signed(disp),
        };
        memory.u64_at(slot)
    }
}

/// The table slot through which `code` (an exported `PyObject_Free` or `PyMem_Free` at address
/// `ip`) calls the free function, if it is a wrapper that ends in that call: builds without
/// link-time optimization (pyenv's, python.org's) compile it to a few `mov`s and an indirect
/// `jmp`, none of which the kernel emulates.
pub fn table_free_slot(code: &[u8], ip: u64) -> Option<TableSlot> {
    use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, OpKind, Register};

    // Registers loaded from a rip-relative word: (register, the word's address).
    let mut loaded: Vec<(Register, u64)> = Vec::new();
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    for _ in 0..8 {
        if !decoder.can_decode() {
            return None;
        }
        let i = decoder.decode();
        if i.is_invalid() {
            return None;
        }
        if i.code() == Code::Jmp_rm64 && i.op0_kind() == OpKind::Memory {
            if i.is_ip_rel_memory_operand() {
                return Some(TableSlot::At(i.ip_rel_memory_address()));
            }
            let base = i.memory_base();
            if i.memory_index() != Register::None {
                return None;
            }
            let &(_, pointer) = loaded.iter().rev().find(|(r, _)| *r == base)?;
            return Some(TableSlot::Behind {
                pointer,
                disp: i.memory_displacement64() as i64,
            });
        }
        if i.flow_control() != FlowControl::Next {
            return None;
        }
        // Anything that writes a register forgets what it held.
        if i.op_count() > 0 && i.op0_kind() == OpKind::Register {
            let written = i.op0_register().full_register();
            loaded.retain(|(r, _)| *r != written);
            if i.code() == Code::Mov_r64_rm64 && i.is_ip_rel_memory_operand() {
                loaded.push((written, i.ip_rel_memory_address()));
            }
        }
    }
    None
}

/// Says, once and in the reports, when the probes cannot see this interpreter's small objects:
/// its object allocator is pymalloc, compiled into its callers (`speculated_allocator`).
/// `memory` is the target's.
pub fn check_objects_seen(pid: u32, interp: &mut Interpreter, memory: &impl Memory) {
    let Some((slot, function)) = interp.speculated_malloc else {
        return;
    };
    if memory.u64_at(slot) != Some(function) {
        // Another allocator (PYTHONMALLOC=malloc, debug): every call goes through the table.
        return;
    }
    if let Some(sites) = &interp.pymalloc_sites {
        if sites.complete() {
            crate::status!(
                "leaktrace: pid {pid}: {} has pymalloc compiled into its callers: {}",
                interp.module,
                sites.describe()
            );
            return;
        }
        let unseen = format!(
            "{} has pymalloc compiled into its callers (link-time optimization), and only {}: some Python objects of up to 512 bytes are not seen (PYTHONMALLOC=malloc, set when the service starts, shows them all)",
            interp.module,
            sites.describe()
        );
        crate::status!("leaktrace: warning: pid {pid}: {unseen}");
        interp.unseen = Some(unseen);
        return;
    }
    let unseen = format!(
        "{} has pymalloc compiled into its callers (link-time optimization): Python objects of up to 512 bytes are not seen one by one (PYTHONMALLOC=malloc, set when the service starts, shows them)",
        interp.module
    );
    crate::status!("leaktrace: warning: pid {pid}: {unseen}");
    interp.unseen = Some(unseen);
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

pub(super) fn mapping_of<'a>(
    maps: &'a ProcMaps,
    path: &str,
    file_offset: u64,
) -> Option<&'a Mapping> {
    maps.mappings.iter().find(|m| {
        m.path == path
            && m.file_offset <= file_offset
            && file_offset < m.file_offset + (m.end - m.start)
    })
}

/// The Python side of a traced process, if it runs a CPython leaktrace knows, its frames named
/// in `names`; says so in one line when it runs one it does not.
pub fn of_process(pid: u32, maps: &ProcMaps, names: &Arc<PyNames>) -> Option<PyProcess> {
    match discover(pid, maps) {
        Found::None => None,
        Found::Unknown(warning) => {
            crate::status!("{warning}");
            None
        }
        Found::Known(mut interp) => match process::memory(pid) {
            Ok(memory) => {
                check_objects_seen(pid, &mut interp, &memory);
                Some(PyProcess::new(*interp, memory, names.clone()))
            }
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

    #[test]
    fn a_speculated_allocator_call_is_decoded_in_each_of_its_forms() {
        // Debian's 3.11: push; test; mov slot(%rip),%rax; cmp $function,%rax; jne.
        let debian = [
            0x53, 0x48, 0x85, 0xff, 0x48, 0x8b, 0x05, 0x10, 0, 0, 0, 0x48, 0x3d, 0x50, 0xb4, 0x4f,
            0, 0x75, 0x10,
        ];
        assert_eq!(
            speculated_allocator(&debian, 0x1000),
            Some((0x100b + 0x10, 0x4f_b450))
        );
        // Position-independent: mov slot(%rip),%rax; lea function(%rip),%rdx; cmp %rdx,%rax.
        let pic = [
            0x48, 0x8b, 0x05, 0, 1, 0, 0, 0x48, 0x8d, 0x15, 0, 2, 0, 0, 0x48, 0x39, 0xd0,
        ];
        assert_eq!(
            speculated_allocator(&pic, 0x1000),
            Some((0x1007 + 0x100, 0x100e + 0x200))
        );
        // cmpq $function, slot(%rip).
        let memory = [0x48, 0x81, 0x3d, 0x20, 0, 0, 0, 0x50, 0xb4, 0x4f, 0];
        assert_eq!(
            speculated_allocator(&memory, 0x1000),
            Some((0x100b + 0x20, 0x4f_b450))
        );
    }

    #[test]
    fn allocators_called_without_a_test_or_garbage_give_none() {
        // pyenv's builds: mov %rdi,%rsi; test; js; mov slot(%rip),%rdi; jmp *slot+8(%rip).
        let pyenv = [
            0x48, 0x89, 0xfe, 0x48, 0x85, 0xff, 0x78, 0x0e, 0x48, 0x8b, 0x3d, 0x10, 0, 0, 0, 0xff,
            0x25, 0x12, 0, 0, 0, 0x48, 0x3d, 0x50, 0xb4, 0x4f, 0,
        ];
        assert_eq!(speculated_allocator(&pyenv, 0x1000), None);
        // The register loaded from the slot is overwritten before the test.
        let clobbered = [
            0x48, 0x8b, 0x05, 0x10, 0, 0, 0, 0x48, 0x31, 0xc0, 0x48, 0x3d, 0x50, 0xb4, 0x4f, 0,
        ];
        assert_eq!(speculated_allocator(&clobbered, 0x1000), None);
        // A compare with a register that holds no address.
        let unknown = [0x48, 0x8b, 0x05, 0x10, 0, 0, 0, 0x48, 0x39, 0xd0];
        assert_eq!(speculated_allocator(&unknown, 0x1000), None);
        for garbage in [
            &[][..],
            &[0x48],
            &[0x48, 0x8b, 0x05, 0x10],
            &[0xff; 64],
            &[0; 300],
        ] {
            assert_eq!(speculated_allocator(garbage, 0), None);
        }
    }

    #[test]
    fn a_table_free_slot_is_decoded_in_each_version_s_form() {
        // 3.11: mov %rdi,%rsi; mov _PyObject(%rip),%rdi; jmp *_PyObject+32(%rip).
        let v3_11 = [
            0x48, 0x89, 0xfe, 0x48, 0x8b, 0x3d, 0xe6, 0xcf, 0x2a, 0, 0xff, 0x25, 0, 0xd0, 0x2a, 0,
        ];
        assert_eq!(
            table_free_slot(&v3_11, 0x1a_f270),
            Some(TableSlot::At(0x45_c280))
        );
        // 3.12: mov GOT(%rip),%rax; mov %rdi,%rsi; mov 0xb0(%rax),%rdi; jmp *0xd0(%rax).
        let v3_12 = [
            0x48, 0x8b, 0x05, 0x19, 0x48, 0x37, 0, 0x48, 0x89, 0xfe, 0x48, 0x8b, 0xb8, 0xb0, 0, 0,
            0, 0xff, 0xa0, 0xd0, 0, 0, 0,
        ];
        assert_eq!(
            table_free_slot(&v3_12, 0x1c_f4e0),
            Some(TableSlot::Behind {
                pointer: 0x54_3d00,
                disp: 0xd0
            })
        );
    }

    #[test]
    fn a_free_that_is_not_a_table_call_or_garbage_gives_no_slot() {
        // glibc's free: test %rdi,%rdi; je.
        assert_eq!(table_free_slot(&[0x48, 0x85, 0xff, 0x74, 0x10], 0), None);
        // The base register was overwritten after its load: mov GOT(%rip),%rax; xor %eax,%eax;
        // jmp *0xd0(%rax).
        let clobbered = [
            0x48, 0x8b, 0x05, 0x10, 0, 0, 0, 0x31, 0xc0, 0xff, 0xa0, 0xd0, 0, 0, 0,
        ];
        assert_eq!(table_free_slot(&clobbered, 0), None);
        // A jump through a register never loaded: jmp *0xd0(%rax).
        assert_eq!(table_free_slot(&[0xff, 0xa0, 0xd0, 0, 0, 0], 0), None);
        // An indexed slot: jmp *(%rax,%rcx,8).
        let indexed = [0x48, 0x8b, 0x05, 0x10, 0, 0, 0, 0xff, 0x24, 0xc8];
        assert_eq!(table_free_slot(&indexed, 0), None);
        for garbage in [&[][..], &[0xff], &[0xff, 0x25, 0], &[0x90; 64], &[0xff; 64]] {
            assert_eq!(table_free_slot(garbage, 0), None);
        }
    }

    /// Memory as a list of words.
    struct Words(Vec<(u64, u64)>);

    impl Memory for Words {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            match self.0.iter().find(|&&(at, _)| at == addr) {
                Some(&(_, word)) if buf.len() == 8 => {
                    buf.copy_from_slice(&word.to_ne_bytes());
                    true
                }
                _ => false,
            }
        }
    }

    #[test]
    fn a_table_slot_reads_the_function_it_holds_where_the_module_is_loaded() {
        let bias = 0x7f00_0000_0000;
        let memory = Words(vec![
            (bias + 0x45_c280, bias + 0x1a_ede0),
            (bias + 0x54_3d00, bias + 0x64_3340),
            (bias + 0x64_3340 + 0xd0, bias + 0x1c_ef80),
        ]);
        assert_eq!(
            TableSlot::At(0x45_c280).function(bias, &memory),
            Some(bias + 0x1a_ede0)
        );
        let behind = TableSlot::Behind {
            pointer: 0x54_3d00,
            disp: 0xd0,
        };
        assert_eq!(behind.function(bias, &memory), Some(bias + 0x1c_ef80));
        // Unreadable: the pointer, or the slot behind it.
        assert_eq!(TableSlot::At(0x10).function(bias, &memory), None);
        let unreadable = TableSlot::Behind {
            pointer: 0x54_3d00,
            disp: 8,
        };
        assert_eq!(unreadable.function(bias, &memory), None);
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
        // Built with link-time optimization: PyObject_Malloc tests the table's pointer
        // against a function of the executable's code before calling it.
        let (slot, function) = interp.speculated_malloc.expect("a speculated call");
        let in_mapping = |addr: u64, exec: bool| {
            maps.mappings.iter().any(|m| {
                m.path == "/usr/bin/python3.11"
                    && m.start <= addr
                    && addr < m.end
                    && m.is_executable() == exec
            })
        };
        assert!(in_mapping(function, true) && in_mapping(slot, false));
    }
}
