//! Return addresses to functions, files and lines, with blazesym.
//!
//! Each address is looked up in the ELF file that backs it, through the target's own view of
//! the file (`/proc/PID/map_files`, which also works for deleted binaries and other mount
//! namespaces), by file offset. A report's new addresses are looked up together, one call per
//! module; results are cached per address, so an address is symbolized once per trace. Runs
//! on the reporter's thread, never on the event path.

use std::{collections::HashMap, path::PathBuf};

use blazesym::symbolize::{
    Input, Symbolized, Symbolizer,
    source::{Elf, Source},
};

use crate::proc::maps::{Mapping, ProcMaps, candidate_paths};

/// One frame of a symbolized stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The return address in the target.
    pub address: u64,
    /// The function, demangled; `None` when the module has no symbol for it.
    pub symbol: Option<String>,
    /// Bytes from the function's start to `address`.
    pub offset: u64,
    /// The file that holds the code (as the target names it).
    pub module: Option<String>,
    /// `address` as an offset into `module`.
    pub module_offset: u64,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// A function inlined into the next frame.
    pub inlined: bool,
}

pub struct StackSymbolizer {
    pid: u32,
    symbolizer: Symbolizer,
    maps: ProcMaps,
    cache: HashMap<u64, Vec<Frame>>,
}

impl StackSymbolizer {
    /// `maps` is the target's memory map as last read, for when the target is already gone.
    pub fn new(pid: u32, maps: ProcMaps) -> Self {
        let symbolizer = Symbolizer::builder()
            .enable_code_info(true)
            .enable_inlined_fns(true)
            // blazesym tries C++ demangling on any name of a language it does not know, C
            // included, and C's `c`, `b` and `a` are valid manglings of `char`, `bool` and
            // `signed char`: names are demangled here instead, only when mangled.
            .enable_demangling(false)
            .build();
        Self {
            pid,
            symbolizer,
            maps,
            cache: HashMap::new(),
        }
    }

    /// Re-reads the target's memory map (libraries come and go); keeps the last one when the
    /// target is gone, so its addresses still resolve to modules.
    pub fn refresh_maps(&mut self) {
        // An exited process (a zombie until reaped) has an empty map: keep the last real one.
        if let Ok(maps) = ProcMaps::read(self.pid)
            && !maps.mappings.is_empty()
        {
            self.maps = maps;
        }
    }

    /// Replaces the memory map (spawn mode: the command's own, read after `exec`).
    pub fn set_maps(&mut self, maps: ProcMaps) {
        if !maps.mappings.is_empty() {
            self.maps = maps;
        }
    }

    /// The frames of one stack, innermost first; an address inside inlined code gives several.
    pub fn symbolize(&mut self, addresses: &[u64]) -> Vec<Frame> {
        self.symbolize_stacks(&[addresses])
            .pop()
            .unwrap_or_default()
    }

    /// The frames of many stacks (a report's). Addresses not seen before are resolved
    /// together, one blazesym call per module: the module's file is opened and its symbol
    /// and line tables looked up once per report, not once per address.
    pub fn symbolize_stacks(&mut self, stacks: &[&[u64]]) -> Vec<Vec<Frame>> {
        let mut missing: Vec<u64> = stacks
            .iter()
            .flat_map(|stack| stack.iter().copied())
            .filter(|address| !self.cache.contains_key(address))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        // Sorted addresses come grouped by mapping.
        let mut rest = &missing[..];
        while let Some(&first) = rest.first() {
            let Some(mapping) = self.maps.find(first).cloned() else {
                self.cache.insert(first, vec![unknown(first)]);
                rest = &rest[1..];
                continue;
            };
            let n = rest.partition_point(|&address| address < mapping.end);
            let (batch, next) = rest.split_at(n);
            for (address, frames) in batch.iter().zip(self.resolve(&mapping, batch)) {
                self.cache.insert(*address, frames);
            }
            rest = next;
        }
        stacks
            .iter()
            .map(|stack| {
                stack
                    .iter()
                    .flat_map(|address| self.cache[address].iter().cloned())
                    .collect()
            })
            .collect()
    }

    /// The frames of `addresses`, all inside `mapping`, in the same order.
    fn resolve(&self, mapping: &Mapping, addresses: &[u64]) -> Vec<Vec<Frame>> {
        let base = |address: u64| Frame {
            address,
            symbol: None,
            offset: 0,
            module: Some(mapping.path.clone()),
            module_offset: address - mapping.start + mapping.file_offset,
            file: None,
            line: None,
            inlined: false,
        };
        // A return address points after the call; the call itself is one byte earlier, and
        // that is the line worth showing (it also stays inside the function when the call
        // was the function's last instruction).
        let lookups: Vec<u64> = addresses
            .iter()
            .map(|&address| base(address).module_offset.saturating_sub(1))
            .collect();
        let symbolized = self.openable_path(mapping).and_then(|path| {
            let mut elf = Elf::new(path);
            elf.debug_syms = true;
            self.symbolizer
                .symbolize(&Source::Elf(elf), Input::FileOffset(&lookups))
                .ok()
        });
        let Some(symbolized) = symbolized else {
            return addresses.iter().map(|&a| vec![base(a)]).collect();
        };
        addresses
            .iter()
            .zip(symbolized)
            .map(|(&address, result)| match result {
                Symbolized::Sym(sym) => frames_of(&sym, base(address)),
                Symbolized::Unknown(_) => vec![base(address)],
            })
            .collect()
    }

    /// The first path under which this process can open the file behind `mapping`:
    /// The first of [`candidate_paths`] that opens. The choice is made by opening the file,
    /// never by whether it has a symbol for an address: a stripped file has none, and a file
    /// at the same path (a newer build, say) would have wrong ones.
    fn openable_path(&self, mapping: &Mapping) -> Option<PathBuf> {
        candidate_paths(self.pid, mapping)
            .into_iter()
            .find(|path| std::fs::File::open(path).is_ok())
    }
}

/// The frames of one symbolized address: inlined calls first (innermost first), then the
/// function that holds the code.
fn frames_of(sym: &blazesym::symbolize::Sym<'_>, base: Frame) -> Vec<Frame> {
    let code = |info: Option<&blazesym::symbolize::CodeInfo<'_>>| {
        info.map(|c| (c.to_path().display().to_string(), c.line))
            .unzip()
    };
    let mut frames = Vec::with_capacity(1 + sym.inlined.len());
    // blazesym lists inlined calls outermost first; frames here go innermost first.
    for inlined in sym.inlined.iter().rev() {
        let (file, line) = code(inlined.code_info.as_ref());
        frames.push(Frame {
            symbol: Some(demangle(&inlined.name)),
            file,
            line: line.flatten(),
            inlined: true,
            ..base.clone()
        });
    }
    let (file, line) = code(sym.code_info.as_deref());
    frames.push(Frame {
        symbol: Some(demangle(&sym.name)),
        offset: (sym.offset as u64) + 1,
        file,
        line: line.flatten(),
        ..base
    });
    frames
}

/// A mangled Rust (legacy or v0) or C++ (Itanium) name, demangled; any other name as it is.
/// Rust names lose their hash suffix (`::h0123456789abcdef`), which only tells builds apart.
pub fn demangle(name: &str) -> String {
    if let Ok(rust) = rustc_demangle::try_demangle(name) {
        return format!("{rust:#}");
    }
    // Itanium manglings start with `_Z` (some platforms add an underscore); without that
    // prefix, cpp_demangle would also read plain C names as types.
    if name.starts_with("_Z")
        && let Some(cpp) = cpp_demangle::Symbol::new(name)
            .ok()
            .and_then(|symbol| symbol.demangle().ok())
    {
        return cpp;
    }
    name.to_owned()
}

fn unknown(address: u64) -> Frame {
    Frame {
        address,
        symbol: None,
        offset: 0,
        module: None,
        module_offset: address,
        file: None,
        line: None,
        inlined: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    #[unsafe(no_mangle)]
    extern "C" fn leaktrace_symbolize_test_marker() -> u64 {
        // Nothing that an optimized build would inline into it as a frame of its own.
        42
    }

    #[test]
    fn a_batch_resolves_each_address_in_its_own_module() {
        let pid = std::process::id();
        let mut symbolizer = StackSymbolizer::new(pid, ProcMaps::read(pid).unwrap());
        // As a return address: one byte past a call at the function's first byte.
        let marker = leaktrace_symbolize_test_marker as *const () as u64 + 1;
        let outside = 0x10;
        let stacks: [&[u64]; 3] = [&[marker, outside], &[outside], &[marker]];
        let frames = symbolizer.symbolize_stacks(&stacks);
        assert_eq!(
            frames[0][0].symbol.as_deref(),
            Some("leaktrace_symbolize_test_marker")
        );
        assert_eq!(frames[0][0].offset, 1);
        assert!(frames[0][0].module.is_some());
        // An address in no file mapping keeps its address and names nothing.
        assert_eq!(frames[0][1], unknown(outside));
        assert_eq!(frames[1], [unknown(outside)]);
        assert_eq!(frames[2], frames[0][..1]);
        // Cached: the same answer one stack at a time.
        assert_eq!(symbolizer.symbolize(&[marker, outside]), frames[0]);
    }

    #[test]
    fn a_file_gone_from_its_path_is_module_plus_offset() {
        // No /proc/PID/map_files entry for this range and no file at this path.
        let maps = ProcMaps::parse(
            "7f0000000000-7f0000002000 r-xp 00001000 fe:01 77 /gone/app (deleted)\n",
        )
        .unwrap();
        let mut symbolizer = StackSymbolizer::new(std::process::id(), maps);
        let frames = symbolizer.symbolize(&[0x7f0000000010]);
        assert_eq!(
            frames,
            [Frame {
                address: 0x7f0000000010,
                symbol: None,
                offset: 0,
                module: Some("/gone/app (deleted)".into()),
                module_offset: 0x1010,
                file: None,
                line: None,
                inlined: false,
            }]
        );
    }

    #[test]
    fn demangles_only_mangled_names() {
        // Plain C names stay as they are, even those that read as C++ type manglings.
        for plain in ["a", "b", "c", "main", "leak_site", "_start", "Z", "_Z", ""] {
            assert_eq!(demangle(plain), plain);
        }
        assert_eq!(
            demangle("_ZN8leaky_rs14Cache$LT$T$GT$6insert17h0123456789abcdefE"),
            "leaky_rs::Cache<T>::insert"
        );
        assert_eq!(
            demangle("_RNvMCs3ZLWLHzac9D_8leaky_rsINtB2_5CacheNtB2_6RecordE6insertB2_"),
            "<leaky_rs::Cache<leaky_rs::Record>>::insert"
        );
        assert_eq!(
            demangle("_ZN5store4PoolINS_4ItemEE4grabEm"),
            "store::Pool<store::Item>::grab(unsigned long)"
        );
        assert_eq!(demangle("_Znwm"), "operator new(unsigned long)");
        // Malformed manglings come back unchanged.
        for bad in ["_ZN5store", "_ZZZ", "_RNv"] {
            assert_eq!(demangle(bad), bad);
        }
    }
}
