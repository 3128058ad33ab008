//! Return addresses to functions, files and lines, with blazesym.
//!
//! Each address comes located (its module and file offset, found when the stack was first
//! seen) and is looked up in that module's file, which leaktrace holds open (see
//! `target::modules`). A report's new addresses are looked up together, one call per module;
//! results are cached by module and offset, so code is symbolized once per trace. Runs on the
//! reporter's thread, never on the event path.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use blazesym::symbolize::{
    Input, Symbolized, Symbolizer,
    source::{Elf, Source},
};

use super::python::PyNames;
use crate::{
    model::location::{Location, ModuleId},
    target::modules::{Module, Modules},
};

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
    /// The runtime whose frame this is, for frames that are not native code: `"python"`
    /// (then `symbol` is the function's qualified name, `file` and `line` its source, and
    /// there is no module).
    pub runtime: Option<&'static str>,
}

/// The `runtime` of CPython's frames.
pub const PYTHON: &str = "python";

/// The symbolized frames of a report's stacks. Stacks share most of their frames (a report of
/// 100,000 stacks of 40 frames may have a few thousand distinct return addresses): each
/// distinct location's frames are kept once, with their strings, and a stack is a list of
/// indices into them, so that a report's frames cost 4 bytes per frame of a stack.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SymbolizedStacks {
    /// The frames of every distinct location, one location after the other.
    frames: Vec<Frame>,
    /// Where each location's frames end in `frames` (they start where the previous end).
    location_ends: Vec<usize>,
    /// The locations of every stack, one stack after the other.
    stack_locations: Vec<u32>,
    /// Where each stack's locations end in `stack_locations`.
    stack_ends: Vec<usize>,
}

impl SymbolizedStacks {
    /// Adds the frames of a location; returns its index.
    fn push_location(&mut self, frames: impl IntoIterator<Item = Frame>) -> u32 {
        self.frames.extend(frames);
        self.location_ends.push(self.frames.len());
        // Each is a distinct return address that the heap model holds: far fewer than 2^32.
        u32::try_from(self.location_ends.len() - 1).expect("fewer than 2^32 distinct locations")
    }

    /// Adds a stack of these locations (indices that [`Self::push_location`] returned).
    fn push_stack(&mut self, locations: impl IntoIterator<Item = u32>) {
        self.stack_locations.extend(locations);
        self.stack_ends.push(self.stack_locations.len());
    }

    fn location(&self, location: u32) -> &[Frame] {
        let i = location as usize;
        let start = if i == 0 { 0 } else { self.location_ends[i - 1] };
        &self.frames[start..self.location_ends[i]]
    }

    /// Stacks held.
    pub fn len(&self) -> usize {
        self.stack_ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stack_ends.is_empty()
    }

    /// The frames of stack `i`.
    pub fn stack(&self, i: usize) -> StackFrames<'_> {
        let start = if i == 0 { 0 } else { self.stack_ends[i - 1] };
        StackFrames {
            table: self,
            locations: &self.stack_locations[start..self.stack_ends[i]],
        }
    }

    /// The frames of every stack, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = StackFrames<'_>> + '_ {
        (0..self.len()).map(|i| self.stack(i))
    }
}

/// Every stack of frames as given (each frame a location of its own: tests and fuzzing).
impl From<Vec<Vec<Frame>>> for SymbolizedStacks {
    fn from(stacks: Vec<Vec<Frame>>) -> Self {
        let mut table = Self::default();
        for stack in stacks {
            let locations: Vec<u32> = stack
                .into_iter()
                .map(|frame| table.push_location([frame]))
                .collect();
            table.push_stack(locations);
        }
        table
    }
}

/// The frames of one stack of a [`SymbolizedStacks`], innermost first.
#[derive(Clone, Copy, Debug)]
pub struct StackFrames<'a> {
    table: &'a SymbolizedStacks,
    locations: &'a [u32],
}

impl<'a> StackFrames<'a> {
    /// Its frames, innermost first (an address inside inlined code gives several).
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &'a Frame> + Clone + 'a {
        let table = self.table;
        self.locations
            .iter()
            .flat_map(move |&location| table.location(location))
    }

    /// How many frames it has.
    pub fn len(&self) -> usize {
        self.locations
            .iter()
            .map(|&location| self.table.location(location).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct StackSymbolizer {
    symbolizer: Symbolizer,
    modules: Arc<Modules>,
    /// The trace's Python frames (CPython processes): code named like a module's.
    python: Arc<PyNames>,
    /// The frames of each located address, by module and file offset: code at the same
    /// address in another module is other code.
    cache: HashMap<(ModuleId, u64), Vec<Frame>>,
}

impl StackSymbolizer {
    pub fn new(modules: Arc<Modules>, python: Arc<PyNames>) -> Self {
        let symbolizer = Symbolizer::builder()
            .enable_code_info(true)
            .enable_inlined_fns(true)
            // blazesym tries C++ demangling on any name of a language it does not know, C
            // included, and C's `c`, `b` and `a` are valid manglings of `char`, `bool` and
            // `signed char`: names are demangled here instead, only when mangled.
            .enable_demangling(false)
            .build();
        Self {
            symbolizer,
            modules,
            python,
            cache: HashMap::new(),
        }
    }

    /// The frames of one stack, innermost first; an address inside inlined code gives several.
    pub fn symbolize(&mut self, stack: &[Location]) -> Vec<Frame> {
        let table = self.symbolize_stacks(&[stack]);
        table.stack(0).iter().cloned().collect()
    }

    /// The frames of many stacks (a report's). Addresses not seen before are resolved
    /// together, one blazesym call per module: the module's file is opened and its symbol
    /// and line tables looked up once per report, not once per address.
    pub fn symbolize_stacks(&mut self, stacks: &[&[Location]]) -> SymbolizedStacks {
        // Distinct as they are found: a report's stacks hold millions of frames, a few thousand
        // addresses.
        let missing: HashSet<(ModuleId, u64)> = stacks
            .iter()
            .flat_map(|stack| stack.iter())
            .filter_map(|l| Some((l.module?, l.offset)))
            .filter(|key| !self.cache.contains_key(key))
            .collect();
        let mut missing: Vec<(ModuleId, u64)> = missing.into_iter().collect();
        missing.sort_unstable();
        for batch in missing.chunk_by(|a, b| a.0 == b.0) {
            let module = self.modules.get(batch[0].0);
            let offsets: Vec<u64> = batch.iter().map(|&(_, offset)| offset).collect();
            for (&key, frames) in batch.iter().zip(self.resolve(&module, &offsets)) {
                self.cache.insert(key, frames);
            }
        }
        // Each distinct location is symbolized once per report, whatever number of stacks
        // pass through it.
        let mut table = SymbolizedStacks::default();
        let mut located: HashMap<Location, u32> = HashMap::new();
        let mut locations = Vec::new();
        for stack in stacks {
            locations.clear();
            for location in stack.iter() {
                let index = *located
                    .entry(*location)
                    .or_insert_with(|| match location.module {
                        Some(module) => {
                            table.push_location(self.cache[&(module, location.offset)].iter().map(
                                |frame| Frame {
                                    address: location.address,
                                    ..frame.clone()
                                },
                            ))
                        }
                        None => table.push_location([self.unknown(location.address)]),
                    });
                locations.push(index);
            }
            table.push_stack(locations.iter().copied());
        }
        table
    }

    /// A frame in no module: a Python frame, or an address in no file.
    fn unknown(&self, address: u64) -> Frame {
        match self.python.get(address) {
            Some(py) => Frame {
                address,
                symbol: py.qualname,
                offset: 0,
                module: None,
                module_offset: 0,
                file: py.filename,
                line: py.line,
                inlined: false,
                runtime: Some(PYTHON),
            },
            None => unknown(address),
        }
    }

    /// The frames at these file offsets of `module`, in the same order; their `address` is
    /// the caller's to fill in.
    fn resolve(&self, module: &Module, offsets: &[u64]) -> Vec<Vec<Frame>> {
        let base = |offset: u64| Frame {
            address: 0,
            symbol: None,
            offset: 0,
            module: Some(module.path.clone()),
            module_offset: offset,
            file: None,
            line: None,
            inlined: false,
            runtime: None,
        };
        // A return address points after the call; the call itself is one byte earlier, and
        // that is the line worth showing (it also stays inside the function when the call
        // was the function's last instruction).
        let lookups: Vec<u64> = offsets.iter().map(|&o| o.saturating_sub(1)).collect();
        let symbolized = module.open_path().and_then(|path| {
            let mut elf = Elf::new(path);
            elf.debug_syms = true;
            self.symbolizer
                .symbolize(&Source::Elf(elf), Input::FileOffset(&lookups))
                .ok()
        });
        let Some(symbolized) = symbolized else {
            return offsets.iter().map(|&o| vec![base(o)]).collect();
        };
        offsets
            .iter()
            .zip(symbolized)
            .map(|(&offset, result)| match result {
                Symbolized::Sym(sym) => frames_of(&sym, base(offset)),
                Symbolized::Unknown(_) => vec![base(offset)],
            })
            .collect()
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
        runtime: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::location::Locate as _,
        proc::maps::{Mapping, ProcMaps},
        target::address_space::AddressSpace,
    };

    fn vecs(table: &SymbolizedStacks) -> Vec<Vec<Frame>> {
        table
            .iter()
            .map(|stack| stack.iter().cloned().collect())
            .collect()
    }

    #[inline(never)]
    #[unsafe(no_mangle)]
    extern "C" fn leaktrace_symbolize_test_marker() -> u64 {
        // Nothing that an optimized build would inline into it as a frame of its own.
        42
    }

    /// This process's address space, as a traced process's.
    fn own_space() -> AddressSpace {
        let pid = std::process::id();
        AddressSpace::new(pid, ProcMaps::read(pid).unwrap(), Modules::new())
    }

    /// As a return address: one byte past a call at the marker's first byte.
    fn marker() -> u64 {
        leaktrace_symbolize_test_marker as *const () as u64 + 1
    }

    #[test]
    fn a_batch_resolves_each_address_in_its_own_module() {
        let mut space = own_space();
        let mut symbolizer = StackSymbolizer::new(space.modules().clone(), Arc::default());
        let outside = 0x10;
        let [marker, outside] = [marker(), outside].map(|a| space.locate(a, 0));
        let stacks: [&[Location]; 3] = [&[marker, outside], &[outside], &[marker]];
        let table = symbolizer.symbolize_stacks(&stacks);
        let frames = vecs(&table);
        assert_eq!(
            frames[0][0].symbol.as_deref(),
            Some("leaktrace_symbolize_test_marker")
        );
        assert_eq!(frames[0][0].offset, 1);
        assert_eq!(frames[0][0].address, marker.address);
        assert!(frames[0][0].module.is_some());
        // An address in no file mapping keeps its address and names nothing.
        assert_eq!(frames[0][1], unknown(outside.address));
        assert_eq!(frames[1], [unknown(outside.address)]);
        assert_eq!(frames[2], frames[0][..1]);
        // Cached: the same answer one stack at a time.
        assert_eq!(symbolizer.symbolize(&[marker, outside]), frames[0]);
        // Each distinct location's frames are held once, whatever stacks share them.
        assert_eq!(table.frames.len(), 2);
        assert_eq!(table.stack_locations, [0, 1, 1, 0]);
        assert_eq!(table.stack(1).len(), 1);
        assert!(!table.stack(2).is_empty());
    }

    #[test]
    fn a_table_of_stacks_shares_locations_and_keeps_inlined_frames_together() {
        let frame = |address, symbol: &str, inlined| Frame {
            inlined,
            symbol: Some(symbol.to_owned()),
            ..unknown(address)
        };
        let mut table = SymbolizedStacks::default();
        // A return address inside inlined code: two frames, one location.
        let inner =
            table.push_location([frame(0x10, "inlined", true), frame(0x10, "outer", false)]);
        let main = table.push_location([frame(0x20, "main", false)]);
        table.push_stack([inner, main]);
        table.push_stack([]);
        // Recursion: the same location twice in a row stays two locations' worth of frames.
        table.push_stack([main, main, inner]);
        assert_eq!(table.len(), 3);
        let names = |i: usize| -> Vec<&str> {
            table
                .stack(i)
                .iter()
                .map(|f| f.symbol.as_deref().unwrap())
                .collect()
        };
        assert_eq!(names(0), ["inlined", "outer", "main"]);
        assert!(table.stack(1).is_empty());
        assert_eq!(names(2), ["main", "main", "inlined", "outer"]);
        assert_eq!(table.stack(2).len(), 4);
        let outermost_first: Vec<u64> = table.stack(0).iter().rev().map(|f| f.address).collect();
        assert_eq!(outermost_first, [0x20, 0x10, 0x10]);
        assert_eq!(table.frames.len(), 3, "frames are stored once");
        // A stack costs 4 bytes per location besides its own end.
        assert_eq!(table.stack_locations.len() * size_of::<u32>(), 20);
        assert_eq!(vecs(&SymbolizedStacks::from(vecs(&table))), vecs(&table));
    }

    #[test]
    fn names_follow_the_code_not_the_address() {
        // The mapping of this test binary's code that holds the marker, then, at the same
        // addresses, libc's code: a library unloaded and another loaded in its place.
        let own = own_space();
        let exe = own.maps().find(marker()).unwrap().clone();
        let libc = own
            .maps()
            .mappings
            .iter()
            .find(|m| m.is_executable() && m.file_name().starts_with("libc.so"))
            .unwrap()
            .clone();
        let replaced = Mapping {
            start: exe.start,
            end: exe.end,
            ..libc.clone()
        };
        // The maps come from a watcher, the files by their paths inside the process's root:
        // pid 2 (kthreadd), a kernel thread, has the host's root and no memory map of its own.
        let mut space = AddressSpace::new(
            2,
            ProcMaps {
                mappings: vec![exe.clone()],
            },
            Modules::new(),
        );
        let watcher = space.pushed_maps();
        let mut symbolizer = StackSymbolizer::new(space.modules().clone(), Arc::default());
        let before = space.locate(marker(), 0);
        watcher
            .send(ProcMaps {
                mappings: vec![replaced],
            })
            .unwrap();
        space.refresh();
        let after = space.locate(marker(), 0);
        assert_eq!(before.address, after.address);
        assert_ne!(before.module, after.module);
        let names = vecs(&symbolizer.symbolize_stacks(&[&[before], &[after]]));
        assert_eq!(
            names[0][0].symbol.as_deref(),
            Some("leaktrace_symbolize_test_marker")
        );
        assert_eq!(
            names[1].last().unwrap().module.as_ref(),
            Some(&libc.path),
            "{:?}",
            names[1]
        );
        assert!(
            names[1]
                .iter()
                .all(|f| f.symbol.as_deref() != Some("leaktrace_symbolize_test_marker")),
            "{:?}",
            names[1]
        );
    }

    #[test]
    fn a_file_gone_from_its_path_is_module_plus_offset() {
        // No /proc/PID/map_files entry for this range and no file at this path.
        let maps = ProcMaps::parse(
            "7f0000000000-7f0000002000 r-xp 00001000 fe:01 77 /gone/app (deleted)\n",
        )
        .unwrap();
        let mut space = AddressSpace::new(std::process::id(), maps, Modules::new());
        let mut symbolizer = StackSymbolizer::new(space.modules().clone(), Arc::default());
        let frames = symbolizer.symbolize(&[space.locate(0x7f0000000010, 0)]);
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
                runtime: None,
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
