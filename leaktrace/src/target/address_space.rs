//! The memory map of one traced process, kept by one owner: read at attach, read again when an
//! address falls outside every known module and at every report, or pushed by spawn mode's
//! watcher; it locates return addresses in modules, and tells where code keeps frame pointers.

use std::{
    collections::HashMap,
    sync::{Arc, mpsc},
};

use leaktrace_common::unwind_rows::{PAGE_SHIFT, PageRows, UnwindRow, kind};

use super::modules::{Module, Modules};
use crate::{
    model::location::{Locate, Location, ModuleId},
    proc::{
        clock::monotonic_ns,
        maps::{Mapping, ProcMaps},
    },
};

pub struct AddressSpace {
    pid: u32,
    maps: ProcMaps,
    /// How many times `maps` changed since attach.
    changes: u64,
    /// How many of those changes unmapped code (see [`Locate::code_unmapped`]).
    code_unmapped: u64,
    /// When `maps` was last read (`CLOCK_MONOTONIC`). An address outside every module re-reads
    /// it only for an event younger than that: code mapped before the event (a library
    /// dlopen'd just before) is then found, and a JIT's or a garbage address costs one read per
    /// batch of events, not one per event.
    read_ns: u64,
    modules: Arc<Modules>,
    /// The module of each mapping of `maps` located in so far, by index.
    resolved: Vec<Option<ModuleId>>,
    /// Modules of files this process maps, by (inode, path), since code was last unmapped:
    /// the other mappings of a file, and a map read again, need no new open.
    known: HashMap<(u64, String), ModuleId>,
    /// Memory maps pushed by a watcher thread (spawn mode).
    pushed: Option<mpsc::Receiver<ProcMaps>>,
}

impl AddressSpace {
    /// `maps` is the target's memory map as read at attach (empty for a command not started
    /// yet); it stays when the target exits, so that its addresses still resolve.
    pub fn new(pid: u32, maps: ProcMaps, modules: Arc<Modules>) -> Self {
        Self {
            pid,
            resolved: vec![None; maps.mappings.len()],
            maps,
            changes: 0,
            code_unmapped: 0,
            read_ns: 0,
            modules,
            known: HashMap::new(),
            pushed: None,
        }
    }

    pub fn maps(&self) -> &ProcMaps {
        &self.maps
    }

    pub fn modules(&self) -> &Arc<Modules> {
        &self.modules
    }

    /// How many times the memory map changed since attach: when it did, the code known to
    /// keep frame pointers may have changed too.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// A sender for newer memory maps, read by another thread (spawn mode's watcher: a short
    /// command may be gone, with no map left, before its events are read).
    pub fn pushed_maps(&mut self) -> mpsc::Sender<ProcMaps> {
        let (tx, rx) = mpsc::channel();
        self.pushed = Some(rx);
        tx
    }

    /// Reads the memory map again; keeps the last one when the target is gone (an exited
    /// process, a zombie until reaped, has an empty map).
    pub fn refresh(&mut self) {
        self.read_ns = monotonic_ns();
        let pushed = self
            .pushed
            .as_ref()
            .and_then(|rx| rx.try_iter().last())
            .filter(|maps| !maps.mappings.is_empty());
        let read = ProcMaps::read(self.pid)
            .ok()
            .filter(|maps| !maps.mappings.is_empty());
        if let Some(maps) = read.or(pushed) {
            self.replace(maps);
        }
    }

    fn replace(&mut self, maps: ProcMaps) {
        if maps.mappings == self.maps.mappings {
            return;
        }
        let is_code = |m: &&Mapping| m.is_file() && m.is_executable();
        if self
            .maps
            .mappings
            .iter()
            .filter(is_code)
            .any(|old| !maps.mappings.contains(old))
        {
            self.code_unmapped += 1;
            self.known.clear();
        }
        self.changes += 1;
        self.resolved = vec![None; maps.mappings.len()];
        self.maps = maps;
    }

    /// The module of the mapping at `index`.
    fn module_of(&mut self, index: usize) -> ModuleId {
        if let Some(id) = self.resolved[index] {
            return id;
        }
        let mapping = &self.maps.mappings[index];
        let key = (mapping.inode, mapping.path.clone());
        let id = match self.known.get(&key) {
            Some(&id) => id,
            None => {
                let id = self.modules.of_mapping(self.pid, mapping);
                self.known.insert(key, id);
                id
            }
        };
        self.resolved[index] = Some(id);
        id
    }

    /// The module that holds `address`, and the offset in its file, for an event at `at_ns`.
    pub fn module_at(&mut self, address: u64, at_ns: u64) -> Option<(Arc<Module>, u64)> {
        let location = self.locate(address, at_ns);
        Some((self.modules.get(location.module?), location.offset))
    }

    /// The executable mappings of files with their modules, in address order: what
    /// [`unwind_rows`] builds the rows of this address space from.
    pub fn row_sources(&mut self) -> Vec<RowSource> {
        let mut sources = Vec::new();
        for index in 0..self.maps.mappings.len() {
            let mapping = &self.maps.mappings[index];
            if !(mapping.is_executable() && mapping.is_file()) {
                continue;
            }
            let (start, end, file_offset) = (mapping.start, mapping.end, mapping.file_offset);
            let id = self.module_of(index);
            let module = self.modules.get(id);
            sources.push(RowSource {
                start,
                end,
                file_offset,
                module,
            });
        }
        sources
    }
}

/// An executable mapping of a file, and its module.
pub struct RowSource {
    start: u64,
    end: u64,
    file_offset: u64,
    module: Arc<Module>,
}

/// The rows from which `--unwind auto` unwinds (`leaktrace_common::unwind_rows`), at the
/// addresses the executable mappings are mapped at, sorted, at most `max` of them: one
/// `FRAME_POINTER` row for a mapping of a module that keeps frame pointers, the module's
/// CFI rows for the others. Each mapping's rows end with a `NONE` row at its end; rows
/// past `max` are left out (frames there are copied). Parses every module's CFI (the first
/// time), which takes a while: it runs off the event loop.
pub fn unwind_rows(sources: &[RowSource], max: usize) -> Vec<UnwindRow> {
    let mut rows: Vec<UnwindRow> = Vec::new();
    for source in sources {
        let (start, end, file_offset) = (source.start, source.end, source.file_offset);
        let module = &source.module;
        if module.keeps_frame_pointers() {
            let row = |pc, kind| UnwindRow {
                pc,
                kind,
                ..UnwindRow::default()
            };
            if rows.len() + 2 > max {
                break;
            }
            if rows.last().is_some_and(|last| last.pc == start) {
                rows.pop();
            }
            if rows
                .last()
                .is_none_or(|last| last.kind != kind::FRAME_POINTER)
            {
                rows.push(row(start, kind::FRAME_POINTER));
            }
            rows.push(row(end, kind::NONE));
            continue;
        }
        let Some(vaddr) = module.cfi().and_then(|cfi| cfi.vaddr_of(file_offset)) else {
            continue;
        };
        let vaddr_end = vaddr.wrapping_add(end - start);
        let module_rows = module.unwind_rows();
        // The rule in force at the mapping's start, then the rows inside it.
        let first = module_rows.partition_point(|r| r.pc <= vaddr);
        let covering = first.checked_sub(1).map(|i| module_rows[i]);
        let mut mapped: Vec<UnwindRow> = Vec::new();
        for row in covering
            .map(|r| UnwindRow { pc: vaddr, ..r })
            .into_iter()
            .chain(module_rows[first..].iter().copied())
            .take_while(|r| r.pc < vaddr_end)
        {
            mapped.push(UnwindRow {
                pc: row.pc - vaddr + start,
                ..row
            });
        }
        mapped.push(UnwindRow {
            pc: end,
            ..UnwindRow::default()
        });
        if rows.len() + mapped.len() > max {
            break;
        }
        // Mappings come sorted by address, and do not overlap: the previous one's end row
        // gives way to this one's first.
        if rows.last().is_some_and(|last| last.pc == start) && mapped[0].pc == start {
            rows.pop();
        }
        rows.extend(mapped);
    }
    rows
}

/// The `UNWIND_PAGES` entries of `rows` (sorted by pc, at map index 1 on): for each page of
/// code that a row with a rule covers, the rows that cover it. Pages covered by `NONE` rows
/// alone get none (a frame there is copied). At most `max` pages: past them, frames are
/// copied.
pub fn page_index(rows: &[UnwindRow], max: usize) -> Vec<(u64, PageRows)> {
    let mut pages: Vec<(u64, PageRows)> = Vec::new();
    for (i, pair) in rows.windows(2).enumerate() {
        let (row, next) = (pair[0], pair[1]);
        if row.kind == kind::NONE || next.pc <= row.pc {
            continue;
        }
        let index = i as u32 + 1;
        for page in (row.pc >> PAGE_SHIFT)..=((next.pc - 1) >> PAGE_SHIFT) {
            match pages.last_mut() {
                Some((last, rows)) if *last == page => rows.end = index + 1,
                _ => {
                    if pages.len() == max {
                        return pages;
                    }
                    // The page's first row is the one in force at its start, which may be a
                    // NONE row (or none: then pcs before the first row find nothing).
                    let start = page << PAGE_SHIFT;
                    let mut first = index;
                    while first > 1 && rows[first as usize - 1].pc > start {
                        first -= 1;
                    }
                    pages.push((
                        page,
                        PageRows {
                            first,
                            end: index + 1,
                        },
                    ));
                }
            }
        }
    }
    // A page's rows run on to the first row at or after its end: a NONE row inside the page
    // ends the rule before it.
    for (page, entry) in &mut pages {
        let page_end = (*page + 1) << PAGE_SHIFT;
        while (entry.end as usize) <= rows.len() && rows[entry.end as usize - 1].pc < page_end {
            entry.end += 1;
        }
    }
    pages
}

impl Locate for AddressSpace {
    fn code_unmapped(&self) -> u64 {
        self.code_unmapped
    }

    fn locate(&mut self, address: u64, at_ns: u64) -> Location {
        // A Python frame is in no mapping: no reason to read the map again.
        if crate::model::location::is_python_frame(address) {
            return Location::unknown(address);
        }
        let mut index = self.maps.position(address);
        if index.is_none() && self.read_ns < at_ns {
            self.refresh();
            index = self.maps.position(address);
        }
        let Some(index) = index else {
            return Location::unknown(address);
        };
        let mapping = &self.maps.mappings[index];
        let offset = (address - mapping.start).wrapping_add(mapping.file_offset);
        Location {
            address,
            module: Some(self.module_of(index)),
            offset,
        }
    }
}

#[cfg(test)]
mod tests {
    use leaktrace_common::unwind_rows::{Search, find};

    use super::*;

    fn row(pc: u64, kind: u8) -> UnwindRow {
        UnwindRow {
            pc,
            cfa_offset_bytes: pc as i32 & 0xff,
            kind,
            ..UnwindRow::default()
        }
    }

    #[test]
    fn a_search_within_each_page_finds_what_the_whole_table_search_finds() {
        // Functions of all sizes, gaps, a NONE row inside a page, a frame-pointer mapping
        // of several pages.
        let rows = vec![
            row(0x1000, kind::CFA_SP),
            row(0x1010, kind::CFA_SP),
            row(0x1800, kind::NONE),
            row(0x1820, kind::CFA_BP),
            row(0x4321, kind::CFA_SP),
            row(0x4400, kind::NONE),
            row(0x10000, kind::FRAME_POINTER),
            row(0x14000, kind::NONE),
            row(0x14000 + 0x10, kind::OUTERMOST),
            row(0x14000 + 0x20, kind::NONE),
        ];
        let pages = page_index(&rows, 1000);
        let mut map = vec![UnwindRow {
            pc: rows.len() as u64,
            ..UnwindRow::default()
        }];
        map.extend_from_slice(&rows);
        let get = |i: u32| map.get(i as usize).copied();
        let count = rows.len() as u32;
        assert!(pages.windows(2).all(|w| w[0].0 < w[1].0));
        for pc in (0..0x16000u64)
            .step_by(7)
            .chain([0x1000, 0x17ff, 0x1800, 0x13fff, 0x14000])
        {
            let want = find(pc, count, get);
            let got = match pages.binary_search_by_key(&(pc >> PAGE_SHIFT), |p| p.0) {
                Ok(i) => {
                    let mut search = Search::within(pages[i].1, count);
                    while search.halve(pc, get) {}
                    search.found(pc, get)
                }
                Err(_) => None,
            };
            assert_eq!(got, want, "at {pc:#x}");
        }
        // No page for code covered by NONE rows alone.
        assert!(pages.iter().all(|&(page, _)| !(0x5..0x10).contains(&page)));
        assert_eq!(page_index(&rows, 3).len(), 3);
        assert!(page_index(&[], 10).is_empty());
    }
}
