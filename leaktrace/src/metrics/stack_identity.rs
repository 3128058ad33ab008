//! What names a stack in Prometheus: a `stack_id` that the same stack keeps across reports and
//! runs, and the `function` of the program that allocated.

use std::hash::Hasher as _;

use crate::{model::stack_table::Origin, stacks::symbolize::Frame};

/// The id of a symbolized stack: 16 hex digits of the FNV-1a hash of its frames (function and
/// offset into it, or module file name and offset into the file, line, inlined) and its
/// origin. Addresses are left out, so the same code path of the same build has the same id in
/// every run (ASLR moves the addresses, not the offsets); the offsets are kept, so two call
/// sites in one function, which leaktrace reports as two stacks, never share an id.
pub fn stack_id(frames: &[Frame], origin: Origin) -> String {
    // FNV-1a is fixed by its definition (std's hashers may change between Rust releases).
    let mut hash = fnv::FnvHasher::default();
    for frame in frames {
        match &frame.symbol {
            Some(symbol) => {
                hash.write(symbol.as_bytes());
                hash.write(&frame.offset.to_le_bytes());
            }
            None => {
                hash.write(module_name(frame).as_bytes());
                hash.write(&frame.module_offset.to_le_bytes());
            }
        }
        hash.write(&frame.line.unwrap_or(0).to_le_bytes());
        hash.write(&[u8::from(frame.inlined), b'\n']);
    }
    hash.write(origin.as_str().as_bytes());
    format!("{:016x}", hash.finish())
}

/// The innermost function of the program: the first frame that is neither the C or C++
/// runtime (libc, libstdc++, the dynamic loader), nor the allocator's own library, nor a
/// standard library's allocation path compiled into the program (`std::`, Rust's `alloc::`).
/// A leak through `strdup` or `std::vector<T>::push_back` names the code that called them. When
/// every frame is such code, the innermost one; a frame without a symbol is
/// `module+0xoffset`.
pub fn program_function(frames: &[Frame], allocator_module: &str) -> String {
    let allocator_library = file_name(allocator_module);
    let runtime = |frame: &Frame| {
        let module = module_name(frame);
        let library = module.contains(".so")
            && (module == allocator_library
                || RUNTIME_LIBRARIES.iter().any(|lib| module.starts_with(lib)));
        library
            || frame.symbol.as_deref().is_some_and(|symbol| {
                RUNTIME_FUNCTIONS
                    .iter()
                    .any(|prefix| symbol.starts_with(prefix))
            })
    };
    let Some(frame) = frames
        .iter()
        .find(|frame| !runtime(frame))
        .or(frames.first())
    else {
        return "?".to_owned();
    };
    match &frame.symbol {
        Some(symbol) => symbol.clone(),
        None => format!("{}+{:#x}", module_name(frame), frame.module_offset),
    }
}

/// Libraries, by the start of their file name, that allocate for the program.
const RUNTIME_LIBRARIES: [&str; 6] = [
    "libc.so",
    "libc-",
    "libstdc++.so",
    "libgcc_s.so",
    "libm.so",
    "ld-linux",
];

/// Functions, by the start of their name, of the standard libraries' allocation paths that are
/// compiled into the program (templates, Rust's generic collections) or its allocator shims.
const RUNTIME_FUNCTIONS: [&str; 12] = [
    "std::",
    "<std::",
    "__gnu_cxx::",
    "operator new",
    "alloc::",
    "<alloc::",
    "core::",
    "<core::",
    "__rust_",
    "__rdl_",
    "__rg_",
    "_rjem_",
];

/// The file name of the module a frame's code is in (no directory, no " (deleted)").
fn module_name(frame: &Frame) -> &str {
    frame.module.as_deref().map_or("?", file_name)
}

fn file_name(path: &str) -> &str {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    path.rsplit('/').next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(symbol: Option<&str>, offset: u64, module: &str, module_offset: u64) -> Frame {
        Frame {
            address: 0x7f00_0000_0000 + module_offset,
            symbol: symbol.map(str::to_owned),
            offset,
            module: Some(module.to_owned()),
            module_offset,
            file: None,
            line: symbol.map(|_| 10),
            inlined: false,
            runtime: None,
        }
    }

    fn leak_stack(base: u64) -> Vec<Frame> {
        let mut frames = vec![
            frame(Some("leak_site"), 0x16, "/srv/app", 0x1136),
            frame(Some("main"), 0x2c, "/srv/app", 0x1180),
            frame(None, 0, "/lib/x86_64-linux-gnu/libc.so.6", 0x2724a),
        ];
        for f in &mut frames {
            f.address = base + f.module_offset;
        }
        frames
    }

    #[test]
    fn the_same_code_path_has_the_same_id_wherever_it_was_loaded() {
        let id = stack_id(&leak_stack(0x5555_0000_0000), Origin::Malloc);
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(stack_id(&leak_stack(0x5600_1234_0000), Origin::Malloc), id);
        // A deleted file (a package upgrade) or another directory (a container) is the same
        // module.
        let mut moved = leak_stack(0x5555_0000_0000);
        moved[2].module = Some("/usr/lib/x86_64-linux-gnu/libc.so.6 (deleted)".into());
        assert_eq!(stack_id(&moved, Origin::Malloc), id);
    }

    #[test]
    fn stacks_that_leaktrace_tells_apart_have_different_ids() {
        let id = stack_id(&leak_stack(0), Origin::Malloc);
        assert_ne!(stack_id(&leak_stack(0), Origin::Mmap), id);
        // Another call site in the same function.
        let mut other_site = leak_stack(0);
        other_site[0].offset = 0x20;
        assert_ne!(stack_id(&other_site, Origin::Malloc), id);
        // Another return address in a module without symbols.
        let mut other_offset = leak_stack(0);
        other_offset[2].module_offset += 1;
        assert_ne!(stack_id(&other_offset, Origin::Malloc), id);
        // A frame more, or inlined rather than called.
        assert_ne!(stack_id(&leak_stack(0)[..2], Origin::Malloc), id);
        let mut inlined = leak_stack(0);
        inlined[0].inlined = true;
        assert_ne!(stack_id(&inlined, Origin::Malloc), id);
        // Names are not run together: "ab" + "c" is not "a" + "bc".
        let ab_c = [frame(Some("ab"), 0, "/a", 0), frame(Some("c"), 0, "/a", 0)];
        let a_bc = [frame(Some("a"), 0, "/a", 0), frame(Some("bc"), 0, "/a", 0)];
        assert_ne!(
            stack_id(&ab_c, Origin::Malloc),
            stack_id(&a_bc, Origin::Malloc)
        );
    }

    #[test]
    fn the_id_is_fixed_by_the_frames_alone() {
        // FNV-1a of these bytes does not depend on the Rust release or the process: a change
        // here renames every stack in users' Prometheus. (The empty stack hashes "malloc",
        // its origin: FNV-1a 64 of those six bytes, computed apart.)
        assert_eq!(stack_id(&[], Origin::Malloc), "d9c0619da0f59bad");
        assert_eq!(
            stack_id(
                &[frame(Some("leak_site"), 0x16, "/srv/app", 0x1136)],
                Origin::Malloc
            ),
            stack_id(
                &[frame(Some("leak_site"), 0x16, "/elsewhere/app", 0x9999)],
                Origin::Malloc
            ),
        );
    }

    #[test]
    fn the_function_is_the_program_s_not_the_runtime_s() {
        let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        let stdcxx = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6";
        // strdup in libc, called by the program.
        let through_libc = [
            frame(Some("strdup"), 0x1a, libc, 0x9a1a),
            frame(Some("remember_request"), 0x16, "/srv/app", 0x1136),
            frame(Some("main"), 0x2c, "/srv/app", 0x1180),
        ];
        assert_eq!(program_function(&through_libc, libc), "remember_request");
        // C++: operator new in libstdc++, a vector's growth compiled into the program.
        let cxx = [
            frame(Some("operator new(unsigned long)"), 0x1c, stdcxx, 0xa1c),
            frame(
                Some("std::vector<int, std::allocator<int> >::_M_realloc_insert<int const&>"),
                0x40,
                "/srv/app",
                0x2040,
            ),
            frame(Some("Index::add(int)"), 0x10, "/srv/app", 0x2100),
        ];
        assert_eq!(program_function(&cxx, libc), "Index::add(int)");
        // Rust: the global allocator's shims and alloc:: are the runtime.
        let rust = [
            frame(Some("alloc::alloc::alloc"), 0, "/srv/app", 0x3000),
            frame(
                Some("<alloc::raw_vec::RawVec<T,A>>::grow_one"),
                0x20,
                "/srv/app",
                0x3020,
            ),
            frame(Some("leaky_rs::Cache<T>::insert"), 0x31, "/srv/app", 0x3100),
        ];
        assert_eq!(program_function(&rust, libc), "leaky_rs::Cache<T>::insert");
        // The allocator's own library (jemalloc's internal frames).
        let jemalloc = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
        let wrapped = [
            frame(Some("je_malloc_default"), 0x10, jemalloc, 0x100),
            frame(
                Some("zmalloc_usable"),
                0x21,
                "/usr/bin/redis-server",
                0x5021,
            ),
        ];
        assert_eq!(program_function(&wrapped, jemalloc), "zmalloc_usable");
        // A program without symbols: its module and offset.
        let stripped = [frame(None, 0, "/srv/app (deleted)", 0x1136)];
        assert_eq!(program_function(&stripped, libc), "app+0x1136");
        // Only runtime frames: the innermost one.
        assert_eq!(program_function(&through_libc[..1], libc), "strdup");
        assert_eq!(program_function(&[], libc), "?");
        // A statically linked allocator lives in the program itself: its caller still counts.
        let static_exe = [frame(Some("leak_site"), 0x16, "/srv/app", 0x1136)];
        assert_eq!(program_function(&static_exe, "/srv/app"), "leak_site");
    }
}
