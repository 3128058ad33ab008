//! Return addresses to functions, files and lines, with blazesym.
//!
//! Each address is looked up in the ELF file that backs it, through the target's own view of
//! the file (`/proc/PID/map_files`, which also works for deleted binaries and other mount
//! namespaces), by file offset. Results are cached per address, so an address is symbolized
//! once per trace. Runs on the reporter's thread, never on the event path.

use std::collections::HashMap;

use blazesym::symbolize::{
    Input, Symbolized, Symbolizer,
    source::{Elf, Source},
};

use crate::proc_maps::{ProcMaps, candidate_paths};

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
            .enable_demangling(true)
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

    /// The frames of one stack, innermost first; an address inside inlined code gives several.
    pub fn symbolize(&mut self, addresses: &[u64]) -> Vec<Frame> {
        let mut frames = Vec::with_capacity(addresses.len());
        for &address in addresses {
            if !self.cache.contains_key(&address) {
                let resolved = self.resolve(address);
                self.cache.insert(address, resolved);
            }
            frames.extend_from_slice(&self.cache[&address]);
        }
        frames
    }

    fn resolve(&self, address: u64) -> Vec<Frame> {
        let Some(mapping) = self.maps.find(address) else {
            return vec![Frame {
                address,
                ..unknown(address)
            }];
        };
        let module_offset = address - mapping.start + mapping.file_offset;
        let base = Frame {
            address,
            symbol: None,
            offset: 0,
            module: Some(mapping.path.clone()),
            module_offset,
            file: None,
            line: None,
            inlined: false,
        };
        // A return address points after the call; the call itself is one byte earlier, and
        // that is the line worth showing (it also stays inside the function when the call
        // was the function's last instruction).
        let lookup = module_offset.saturating_sub(1);
        let sym = candidate_paths(self.pid, mapping)
            .into_iter()
            .find_map(|path| {
                let mut elf = Elf::new(path);
                elf.debug_syms = true;
                let src = Source::Elf(elf);
                match self
                    .symbolizer
                    .symbolize_single(&src, Input::FileOffset(lookup))
                {
                    Ok(Symbolized::Sym(sym)) => Some(sym.into_owned()),
                    _ => None,
                }
            });
        let Some(sym) = sym else {
            return vec![base];
        };
        let code = |info: Option<&blazesym::symbolize::CodeInfo<'_>>| {
            info.map(|c| (c.to_path().display().to_string(), c.line))
                .unzip()
        };
        let mut frames = Vec::with_capacity(1 + sym.inlined.len());
        // blazesym lists inlined calls outermost first; frames here go innermost first.
        for inlined in sym.inlined.iter().rev() {
            let (file, line) = code(inlined.code_info.as_ref());
            frames.push(Frame {
                symbol: Some(inlined.name.to_string()),
                file,
                line: line.flatten(),
                inlined: true,
                ..base.clone()
            });
        }
        let (file, line) = code(sym.code_info.as_deref());
        frames.push(Frame {
            symbol: Some(sym.name.to_string()),
            offset: (sym.offset as u64) + 1,
            file,
            line: line.flatten(),
            ..base
        });
        frames
    }
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
