//! The memory map of one traced process, kept by one owner: read at attach, read again when an
//! address falls outside every known module and at every report, or pushed by spawn mode's
//! watcher; it locates return addresses in modules, and tells where code keeps frame pointers.

use std::{
    collections::HashMap,
    sync::{Arc, mpsc},
};

use leaktrace_common::unwind_rows::{PAGE_SHIFT, PageRows, UnwindRow, kind, page_key};

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
        let mut space = Self {
            pid,
            resolved: vec![None; maps.mappings.len()],
            maps,
            changes: 0,
            code_unmapped: 0,
            read_ns: 0,
            modules,
            known: HashMap::new(),
            pushed: None,
        };
        space.open_code();
        space
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
        self.open_code();
    }

    /// Opens the module of every mapping of code, as soon as the map that shows it is read: a
    /// module can only be opened through the process (`proc::files`), and the records of a
    /// process that exits are often read after its exit, when its stacks are first located.
    /// Opened later, its frames would stay module + offset (`--unwind fp`, which opens no
    /// module for unwinding rows, showed no names at all for such a process).
    fn open_code(&mut self) {
        for index in 0..self.maps.mappings.len() {
            let mapping = &self.maps.mappings[index];
            if mapping.is_file() && mapping.is_executable() {
                self.module_of(index);
            }
        }
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

/// The rows from which `--unwind auto` unwinds (`leaktrace_common::unwind_rows`) for every
/// traced process: at map index 1 the frame-pointer segment (a `FRAME_POINTER` row for all
/// code that keeps frame pointers), then one segment per module without them, its CFI rows at
/// its own ELF addresses, shared by every process that maps it. Segments are only added: the
/// rows in the map stay valid while new ones are written past them.
pub struct RowTable {
    /// Map index 1 on.
    rows: Vec<UnwindRow>,
    /// Each module's segment by the module's address: its first map index and its count of
    /// rows (the `Arc` keeps the module, and so the key, alive).
    segments: HashMap<usize, (Arc<Module>, u32, u32)>,
}

/// What tells modules apart in a [`RowTable`]: every process that maps a file shares its one
/// `Module`.
fn module_key(module: &Arc<Module>) -> usize {
    Arc::as_ptr(module) as usize
}

/// The map index of the frame-pointer segment: a `FRAME_POINTER` row from 0, a `NONE` row at
/// the top of the address space.
const FRAME_POINTER_SEGMENT: u32 = 1;

/// The traced processes' `UNWIND_PAGES` entries, keyed as the map is (`page_key`).
pub type Pages = HashMap<u64, PageRows>;

impl Default for RowTable {
    fn default() -> Self {
        Self::new()
    }
}

impl RowTable {
    pub fn new() -> Self {
        let row = |pc, kind| UnwindRow {
            pc,
            kind,
            ..UnwindRow::default()
        };
        Self {
            rows: vec![row(0, kind::FRAME_POINTER), row(u64::MAX, kind::NONE)],
            segments: HashMap::new(),
        }
    }

    /// The rows, from map index 1 on.
    pub fn rows(&self) -> &[UnwindRow] {
        &self.rows
    }

    /// The segments of modules that no source of `processes` maps.
    pub fn unused_segments(&self, processes: &[(u32, Vec<RowSource>)]) -> usize {
        let used: std::collections::HashSet<usize> = processes
            .iter()
            .flat_map(|(_, sources)| sources.iter().map(|s| module_key(&s.module)))
            .collect();
        self.segments.keys().filter(|k| !used.contains(k)).count()
    }

    /// Adds the segments of `modules` that have none and need one (code without frame
    /// pointers), while they fit in `max_rows`: the rows of modules a process is about to map
    /// (spawn mode's command before its `exec`), written before they are mapped.
    pub fn add_segments(&mut self, modules: &[Arc<Module>], max_rows: usize) {
        for module in modules {
            if !module.keeps_frame_pointers() {
                let _ = self.segment(module, max_rows);
            }
        }
    }

    /// The segment of `module` (first map index, count), added when it has none and fits in
    /// `max_rows`; `None` when it does not fit.
    fn segment(&mut self, module: &Arc<Module>, max_rows: usize) -> Option<(u32, u32)> {
        if let Some(&(_, first, len)) = self.segments.get(&module_key(module)) {
            return Some((first, len));
        }
        let module_rows = module.unwind_rows();
        // A NONE row at the top ends the segment's last rule: the row after it is another
        // module's.
        let len = module_rows.len() + 1;
        if self.rows.len() + len > max_rows {
            return None;
        }
        let first = self.rows.len() as u32 + 1;
        self.rows.extend_from_slice(module_rows);
        self.rows.push(UnwindRow {
            pc: u64::MAX,
            ..UnwindRow::default()
        });
        self.segments
            .insert(module_key(module), (module.clone(), first, len as u32));
        Some((first, len as u32))
    }

    /// The pages of every executable mapping of `processes` (pid, `AddressSpace::row_sources`),
    /// at most `max_pages`, adding the segments of modules that have none yet while they fit in
    /// `max_rows`. Returns the pages and the count of mappings left without rows (their frames
    /// are copied). Parses the CFI of every module without frame pointers (the first time),
    /// which takes a while: it runs off the event loop.
    pub fn pages(
        &mut self,
        processes: &[(u32, Vec<RowSource>)],
        max_rows: usize,
        max_pages: usize,
    ) -> (Pages, usize) {
        let mut pages = Pages::new();
        let mut left_out = 0;
        for (tgid, sources) in processes {
            for source in sources {
                let (start, end) = (source.start, source.end);
                let module = &source.module;
                let placed = if module.keeps_frame_pointers() {
                    Some((FRAME_POINTER_SEGMENT, 2, 0))
                } else {
                    module
                        .cfi()
                        .and_then(|cfi| cfi.vaddr_of(source.file_offset))
                        .and_then(|vaddr| {
                            let (first, len) = self.segment(module, max_rows)?;
                            Some((first, len, start.wrapping_sub(vaddr)))
                        })
                };
                let Some((first, len, load_bias)) = placed else {
                    left_out += 1;
                    continue;
                };
                let segment = &self.rows[first as usize - 1..(first + len) as usize - 1];
                for (page, entry) in mapping_pages(segment, first, start, end, load_bias) {
                    if pages.len() == max_pages {
                        return (pages, left_out + 1);
                    }
                    pages.insert(page_key(*tgid, page << PAGE_SHIFT), entry);
                }
            }
        }
        (pages, left_out)
    }
}

/// The pages of the mapping `start..end` and the rows of `segment` (at map index `first` on,
/// `load_bias` below the mapping's addresses) that cover each: the row in force at the page's
/// start, up to the last that starts inside it. Pages covered by `NONE` rows alone get none (a
/// frame there is copied).
pub fn mapping_pages(
    segment: &[UnwindRow],
    first: u32,
    start: u64,
    end: u64,
    load_bias: u64,
) -> impl Iterator<Item = (u64, PageRows)> + '_ {
    let last_page = end.saturating_sub(1) >> PAGE_SHIFT;
    ((start >> PAGE_SHIFT)..=last_page)
        .filter(move |_| end > start)
        .filter_map(move |page| {
            let page_start = (page << PAGE_SHIFT).wrapping_sub(load_bias);
            let page_end = page_start.wrapping_add(1 << PAGE_SHIFT);
            let in_force = segment.partition_point(|r| r.pc <= page_start);
            let below_end = segment.partition_point(|r| r.pc < page_end);
            if below_end == 0 {
                return None;
            }
            let from = in_force.max(1) - 1;
            if segment[from..below_end]
                .iter()
                .all(|r| r.kind == kind::NONE)
            {
                return None;
            }
            Some((
                page,
                PageRows {
                    first: first + from as u32,
                    end: first + below_end as u32,
                    load_bias,
                },
            ))
        })
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
    use std::path::Path;

    use leaktrace_common::unwind_rows::Search;

    use super::*;

    fn row(pc: u64, kind: u8) -> UnwindRow {
        UnwindRow {
            pc,
            cfa_offset_bytes: pc as i32 & 0xff,
            kind,
            ..UnwindRow::default()
        }
    }

    /// What a row gives for unwinding, wherever it starts.
    fn rule(row: Option<UnwindRow>) -> Option<(i32, i16, u8)> {
        row.map(|r| (r.cfa_offset_bytes, r.rbp_offset_bytes, r.kind))
    }

    #[test]
    fn a_search_within_each_page_finds_what_the_whole_segment_search_finds() {
        // Functions of all sizes, gaps, a NONE row inside a page, the segment's end row.
        let segment = vec![
            row(0x1000, kind::CFA_SP),
            row(0x1010, kind::CFA_SP),
            row(0x1800, kind::NONE),
            row(0x1820, kind::CFA_BP),
            row(0x4321, kind::CFA_SP),
            row(0x4400, kind::NONE),
            row(0x10010, kind::OUTERMOST),
            row(0x10020, kind::NONE),
            row(u64::MAX, kind::NONE),
        ];
        // Another segment before it in the map: indexes are the map's.
        let mut map = vec![UnwindRow::default(), row(0, kind::FRAME_POINTER)];
        let first = map.len() as u32;
        map.extend_from_slice(&segment);
        map[0].pc = map.len() as u64 - 1;
        let get = |i: u32| map.get(i as usize).copied();
        let count = map.len() as u32 - 1;
        let whole = |at: u64| {
            let i = segment.partition_point(|r| r.pc <= at);
            i.checked_sub(1)
                .map(|i| segment[i])
                .filter(|r| r.kind != kind::NONE)
        };
        // Mapped at 0x55_0000_0000, the segment's addresses 0x1000 higher than its mapping's.
        let (start, bias) = (0x55_0000_0000u64, 0x55_0000_0000u64.wrapping_sub(0x1000));
        let end = start + 0x12000;
        let pages: Vec<_> = mapping_pages(&segment, first, start, end, bias).collect();
        assert!(pages.windows(2).all(|w| w[0].0 < w[1].0));
        for pc in (start..end)
            .step_by(7)
            .chain([start, start + 0x7ff, start + 0x800, end - 1])
        {
            let at = pc - bias;
            let got = match pages.binary_search_by_key(&(pc >> PAGE_SHIFT), |p| p.0) {
                Ok(i) => {
                    assert_eq!(pages[i].1.load_bias, bias);
                    let mut search = Search::within(pages[i].1, count);
                    while search.halve(at, get) {}
                    search.found(at, get)
                }
                Err(_) => None,
            };
            assert_eq!(rule(got), rule(whole(at)), "at {pc:#x}");
        }
        // No page for code covered by NONE rows alone.
        assert!(
            pages
                .iter()
                .all(|&(page, _)| !(0x5..0xf).contains(&(page - (start >> PAGE_SHIFT))))
        );
        assert_eq!(
            mapping_pages(&segment, first, start, start, bias).count(),
            0
        );
        assert_eq!(mapping_pages(&[], first, start, end, bias).count(), 0);
    }

    #[test]
    fn processes_share_a_module_segment_and_keep_their_pages_apart() {
        let pid = std::process::id();
        let mut space = AddressSpace::new(pid, ProcMaps::read(pid).unwrap(), Modules::new());
        let sources = space.row_sources();
        let executable = sources.len();
        assert!(executable >= 2, "this test and libc");
        let mut table = RowTable::new();
        let (alone, left_out) = table.pages(&[(pid, space.row_sources())], 1 << 18, 1 << 16);
        assert_eq!(left_out, 0);
        let rows = table.rows().len();
        // The same modules in a second process (another pid, the same addresses: as after a
        // fork): no rows added, every page twice, under each pid.
        let (both, left_out) = table.pages(
            &[(pid, space.row_sources()), (pid + 1, space.row_sources())],
            1 << 18,
            1 << 16,
        );
        assert_eq!(left_out, 0);
        assert_eq!(table.rows().len(), rows);
        assert_eq!(both.len(), 2 * alone.len());
        for (key, entry) in &alone {
            let other = key + (1 << 36);
            assert_eq!(both.get(&other), Some(entry), "{key:#x}");
        }
        assert_eq!(table.unused_segments(&[(pid, sources)]), 0);
        assert_eq!(table.unused_segments(&[]), table.segments.len());
        // No room for rows: modules without frame pointers are left out, counted.
        let mut full = RowTable::new();
        let (_, left_out) = full.pages(&[(pid, space.row_sources())], 2, 1 << 16);
        let without_fp = space
            .row_sources()
            .iter()
            .filter(|s| !s.module.keeps_frame_pointers())
            .count();
        assert!(without_fp > 0, "libc keeps no frame pointers");
        assert_eq!(left_out, without_fp);
        assert_eq!(full.rows().len(), 2);
    }

    #[test]
    fn rows_written_before_a_module_is_mapped_are_those_its_mappings_use() {
        let pid = std::process::id();
        let maps = ProcMaps::read(pid).unwrap();
        let modules = Modules::new();
        // libc, as spawn mode knows it before the command's exec: by path.
        let libc_path = maps
            .mappings
            .iter()
            .find(|m| m.is_executable() && m.file_name().starts_with("libc.so"))
            .map(|m| m.path.clone())
            .expect("this test maps libc");
        let libc = modules.of_path(Path::new(&libc_path)).unwrap();
        assert_eq!(libc.path, libc_path);
        assert!(!libc.keeps_frame_pointers(), "Debian's libc keeps none");
        assert!(modules.of_path(Path::new("/no/such/file")).is_none());
        let mut table = RowTable::new();
        table.add_segments(&[libc.clone(), libc.clone()], 1 << 18);
        let rows = table.rows().len();
        assert_eq!(rows, 2 + libc.unwind_rows().len() + 1, "its rows, once");
        // Mapped: its mapping is the same module, whose segment is in the table already.
        let mut space = AddressSpace::new(pid, maps, modules.clone());
        let sources = space.row_sources();
        let mapped: Vec<&RowSource> = sources
            .iter()
            .filter(|s| s.module.path == libc_path)
            .collect();
        assert!(!mapped.is_empty());
        assert!(mapped.iter().all(|s| Arc::ptr_eq(&s.module, &libc)));
        let (pages, _) = table.pages(&[(pid, sources)], 1 << 18, 1 << 16);
        let libc_first = table.segments[&module_key(&libc)].1;
        assert_eq!(libc_first, 3, "written first, before any mapping");
        assert!(pages.values().any(|p| p.first == libc_first));
        // A module that keeps frame pointers needs no rows of its own.
        let mut keeps = RowTable::new();
        let with_fp: Vec<Arc<Module>> = space
            .row_sources()
            .into_iter()
            .map(|s| s.module)
            .filter(|m| m.keeps_frame_pointers())
            .collect();
        keeps.add_segments(&with_fp, 1 << 18);
        assert_eq!(keeps.rows().len(), 2);
    }
}
