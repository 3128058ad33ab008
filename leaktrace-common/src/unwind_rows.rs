//! Unwinding in BPF from compact tables built from `.eh_frame` (`--unwind auto`), as the
//! OpenTelemetry eBPF profiler does: for code without frame pointers, user space turns each
//! module's call-frame information into rows "from this pc on, the caller's stack pointer (the
//! CFA) is `rsp` or `rbp` plus an offset, the return address is just below it, the caller's
//! `rbp` is saved at this offset from it (or unchanged)", sorted by pc, in the `UNWIND_ROWS`
//! array map. The BPF side finds a frame's row by binary search and steps to its caller with
//! two reads of the stack, where it used to send an 8 KiB copy of the stack to user space.
//!
//! Map layout: element 0 is a header ([`header`]) that holds the count of rows and a
//! generation; rows follow at `1..=count`, one segment per module (every process that maps a
//! module shares its segment), at the module's own ELF addresses, sorted by `pc` within the
//! segment. A row holds until the next one; a row of kind [`kind::NONE`] marks where no rule
//! holds (between functions, or a rule these tables cannot express: a DWARF expression, a
//! return address elsewhere than at CFA - 8). The `UNWIND_PAGES` hash map takes a traced
//! process and a page of its code ([`page_key`]) to the rows of the module mapped there and
//! the bias between the process's addresses and the module's: two executables at the same
//! address (non-PIE, both at 0x400000) never see each other's rows.

/// The kinds of [`UnwindRow`].
pub mod kind {
    /// No rule: a frame here is left to the stack copy.
    pub const NONE: u8 = 0;
    /// CFA = `rsp` + `cfa_offset_bytes`.
    pub const CFA_SP: u8 = 1;
    /// CFA = `rbp` + `cfa_offset_bytes`.
    pub const CFA_BP: u8 = 2;
    /// The return address is undefined: the outermost frame (`_start`, `clone3`).
    pub const OUTERMOST: u8 = 3;
    /// Code that keeps frame pointers: `rbp` points at the frame record `[saved rbp, return
    /// address]` (the offsets are unused). One such row covers a whole module's code.
    pub const FRAME_POINTER: u8 = 4;
}

/// Rows at most in `UNWIND_ROWS`, header included: 4 MiB of map. Debian's libc and
/// libstdc++ together need ~60k; rows past the limit are left out, and frames in them are
/// copied instead.
pub const MAX_UNWIND_ROWS: u32 = 1 << 18;

/// log2 of the bytes of code per entry of the `UNWIND_PAGES` hash map: a page's entry says
/// which rows cover it, so that a search halves a few dozen rows rather than the whole table.
pub const PAGE_SHIFT: u32 = 12;
/// Pages of code `UNWIND_PAGES` indexes at most: 256 MiB of code.
pub const MAX_UNWIND_PAGES: u32 = 1 << 16;

/// An `UNWIND_PAGES` value: rows `first..end` cover the page; `first` is the row in force at
/// the page's start. The rows are at the module's addresses: a pc of the page is
/// `load_bias` past its row's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRows {
    pub first: u32,
    pub end: u32,
    pub load_bias: u64,
}

/// The `UNWIND_PAGES` key of the page of `pc` in process `tgid`: pids are below 2^22 (the
/// kernel's `PID_MAX_LIMIT`), user pages below 2^36 (x86-64's 47-bit user space, 5-level
/// paging's 56 bits excepted), so one u64 holds both and the lookup stays a hash of 8 bytes.
#[inline(always)]
pub fn page_key(tgid: u32, pc: u64) -> u64 {
    (u64::from(tgid) << 36) | ((pc >> PAGE_SHIFT) & ((1 << 36) - 1))
}

/// The `UNWIND_ROWS` header: `count` rows follow it. `generation` changes at every rewrite of
/// the rows or the pages, which makes every [`RowHint`] stale.
#[inline(always)]
pub fn header(count: u32, generation: u32) -> UnwindRow {
    UnwindRow {
        pc: u64::from(count),
        cfa_offset_bytes: generation as i32,
        ..UnwindRow::default()
    }
}

/// The (count of rows, generation) of a [`header`].
#[inline(always)]
pub fn read_header(header: &UnwindRow) -> (u32, u32) {
    (header.pc as u32, header.cfa_offset_bytes as u32)
}

/// Halvings that find a row among [`MAX_UNWIND_ROWS`]: log2 of it, plus one.
pub const SEARCH_STEPS: u32 = 19;

/// One row of the table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindRow {
    /// The first address the row covers (in the traced process).
    pub pc: u64,
    /// Added to `rsp` or `rbp` (see `kind`), it gives the CFA: the caller's `rsp`.
    pub cfa_offset_bytes: i32,
    /// Where the caller's `rbp` is saved, from the CFA; 0 when `rbp` is unchanged (the CFA
    /// itself is the caller's stack: nothing is ever saved there).
    pub rbp_offset_bytes: i16,
    /// One of [`kind`]'s constants.
    pub kind: u8,
    pub _pad: u8,
}

/// The registers an unwinding step needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Regs {
    pub pc: u64,
    pub sp: u64,
    pub bp: u64,
}

/// What one step from a frame gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The caller's registers.
    Caller(Regs),
    /// The frame was the outermost one: the stack is complete.
    End,
    /// The step could not be taken (no rule, a read that failed, a CFA that goes nowhere).
    Failed,
}

/// The row that covers `pc` among the `count` rows of a map read with `get` (index 1..=count),
/// by binary search; `None` when no row does, or the one that does is [`kind::NONE`].
#[inline(always)]
pub fn find(pc: u64, count: u32, get: impl Fn(u32) -> Option<UnwindRow>) -> Option<UnwindRow> {
    let mut search = Search::new(count);
    for _ in 0..SEARCH_STEPS {
        if !search.halve(pc, &get) {
            break;
        }
    }
    search.found(pc, &get)
}

/// Slots of the BPF side's per-CPU `ROW_HINTS` array: the row found last for a pc of a
/// process, by a hash of both ([`hint_slot`]). The outer frames of a thread (`start_thread`,
/// `clone3`, `__libc_start_call_main`) return to the same pcs at every allocation, and a hint
/// spares their search (the page's hash lookup and the halvings: most of a frame's cost).
pub const ROW_HINT_SLOTS: u32 = 1 << 13;

/// The `ROW_HINTS` slot of `pc` in process `tgid`.
#[inline(always)]
pub fn hint_slot(tgid: u32, pc: u64) -> u32 {
    // Fibonacci hashing: the top bits of the product mix every bit of the pc; the pid goes
    // to bits the pcs of one page share, so that forked processes (same pcs) differ.
    let key = pc ^ (u64::from(tgid) << 48);
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - ROW_HINT_SLOTS.trailing_zeros())) as u32
}

/// A `ROW_HINTS` value: the rule of the pcs `start_pc..end_pc` of process `tgid`, found
/// under the rows' `generation`. It holds the rule itself, so that a hint that holds costs
/// one lookup of a per-CPU array (no torn writes from other CPUs) and no read of the rows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowHint {
    pub start_pc: u64,
    pub end_pc: u64,
    pub tgid: u32,
    pub generation: u32,
    pub cfa_offset_bytes: i32,
    pub rbp_offset_bytes: i16,
    pub kind: u8,
    pub _pad: u8,
}

impl RowHint {
    /// A hint for `row`, found for a pc of the page `page_start..page_start + 4 KiB`, where
    /// pcs are `load_bias` past rows, and `next_pc` starts the next row (or is `u64::MAX`).
    /// It covers no more than the page: the next page may hold another module.
    #[inline(always)]
    pub fn new(
        row: &UnwindRow,
        next_pc: u64,
        page: &PageRows,
        page_start: u64,
        tgid: u32,
        generation: u32,
    ) -> Self {
        let page_end = page_start + (1 << PAGE_SHIFT);
        let start = row.pc.wrapping_add(page.load_bias);
        let end = next_pc.wrapping_add(page.load_bias);
        // A row's start or its successor's past the page (or wrapped around by the bias)
        // gives way to the page's bounds.
        let start_pc = if start < page_start || start > page_end {
            page_start
        } else {
            start
        };
        let end_pc = if end > page_end || end < start_pc {
            page_end
        } else {
            end
        };
        Self {
            start_pc,
            end_pc,
            tgid,
            generation,
            cfa_offset_bytes: row.cfa_offset_bytes,
            rbp_offset_bytes: row.rbp_offset_bytes,
            kind: row.kind,
            _pad: 0,
        }
    }

    /// The row of `pc` in process `tgid` under the rows' `generation` if this hint holds it
    /// (its `pc` is `start_pc`); `None` otherwise (another process, stale, another pc).
    #[inline(always)]
    pub fn row_for(&self, tgid: u32, generation: u32, pc: u64) -> Option<UnwindRow> {
        (self.tgid == tgid
            && self.generation == generation
            && self.start_pc <= pc
            && pc < self.end_pc
            && self.kind != kind::NONE)
            .then_some(UnwindRow {
                pc: self.start_pc,
                cfa_offset_bytes: self.cfa_offset_bytes,
                rbp_offset_bytes: self.rbp_offset_bytes,
                kind: self.kind,
                _pad: 0,
            })
    }
}

/// A binary search for the last row at or below a pc, one halving at a time (the BPF side runs
/// them in a bounded loop, inside the `bpf_loop` callback of a frame).
#[derive(Clone, Copy, Debug)]
pub struct Search {
    /// Rows below `lo` start at or below the pc; rows from `hi` on start above it.
    pub lo: u32,
    pub hi: u32,
}

impl Search {
    /// A search among `count` rows.
    #[inline(always)]
    pub fn new(count: u32) -> Self {
        // A mask, not `min`: a comparison would give the BPF verifier a path on which the
        // count is a known constant, and the search's bounds with it. A count past the rows
        // written reads rows that do not exist, which ends the search.
        let count = count & (MAX_UNWIND_ROWS - 1);
        // The rows are at 1..=count.
        Self {
            lo: 1,
            hi: count + 1,
        }
    }

    /// A search among the rows of a page (`UNWIND_PAGES`), of `count` rows in all: it finds
    /// nothing when the page's entry does not fit the rows.
    #[inline(always)]
    pub fn within(page: PageRows, count: u32) -> Self {
        let count = count & (MAX_UNWIND_ROWS - 1);
        if page.first == 0 || page.first >= page.end || page.end > count + 1 {
            return Self { lo: 0, hi: 0 };
        }
        // Row `first` starts at or below every pc of the page.
        Self {
            lo: page.first + 1,
            hi: page.end,
        }
    }

    /// One halving; false when the search is over.
    #[inline(always)]
    pub fn halve(&mut self, pc: u64, get: impl Fn(u32) -> Option<UnwindRow>) -> bool {
        if self.lo >= self.hi {
            return false;
        }
        let mid = self.lo + (self.hi - self.lo) / 2;
        match get(mid) {
            Some(row) if row.pc <= pc => self.lo = mid + 1,
            Some(_) => self.hi = mid,
            None => {
                self.lo = 0;
                self.hi = 0;
                return false;
            }
        }
        true
    }

    /// The index of the row found for `pc`, once the search is over and found one: what a
    /// hint remembers ([`hinted`]).
    #[inline(always)]
    pub fn found_index(&self) -> u32 {
        self.lo.wrapping_sub(1)
    }

    /// The row found for `pc`, once the search is over.
    #[inline(always)]
    pub fn found(&self, pc: u64, get: impl Fn(u32) -> Option<UnwindRow>) -> Option<UnwindRow> {
        if self.lo <= 1 || self.lo > MAX_UNWIND_ROWS {
            return None;
        }
        let row = get(self.lo - 1)?;
        // A search within a page starts at the page's first row, which may start past pc.
        (row.kind != kind::NONE && row.pc <= pc).then_some(row)
    }
}

/// The caller of the frame at `regs`, by `row` (the row of `regs.pc`), reading the stack's
/// words with `read`, which writes the word at an address into its second argument and
/// returns false when it cannot. (An out-parameter initialized here, rather than an
/// `Option`: the payload of a `None` is undefined, and LLVM may then leave a register
/// unwritten on a path on which the BPF verifier sees it read.)
#[inline(always)]
pub fn step(row: &UnwindRow, regs: Regs, mut read: impl FnMut(u64, &mut u64) -> bool) -> Step {
    let base = match row.kind {
        kind::CFA_SP => regs.sp,
        kind::CFA_BP => regs.bp,
        kind::OUTERMOST => return Step::End,
        kind::FRAME_POINTER => return step_frame_pointer(regs, read),
        _ => return Step::Failed,
    };
    let cfa = base.wrapping_add(row.cfa_offset_bytes as i64 as u64);
    // The caller's frame lies above this one: anything else is a wrong rule or a broken
    // stack, and would unwind in circles.
    if cfa <= regs.sp {
        return Step::Failed;
    }
    // The saved rbp first: it lies below the return address, and a reader that fetches the
    // stack upward from the word asked for then finds the return address in what it fetched.
    let mut bp = regs.bp;
    if row.rbp_offset_bytes != 0
        && !read(
            cfa.wrapping_add(row.rbp_offset_bytes as i64 as u64),
            &mut bp,
        )
    {
        return Step::Failed;
    }
    let mut pc = 0;
    if !read(cfa - 8, &mut pc) {
        return Step::Failed;
    }
    if pc == 0 {
        return Step::End;
    }
    Step::Caller(Regs { pc, sp: cfa, bp })
}

/// The caller of a frame in code that keeps frame pointers: `rbp` points at the frame record
/// `[saved rbp, return address]`, just below the caller's stack.
#[inline(always)]
pub fn step_frame_pointer(regs: Regs, mut read: impl FnMut(u64, &mut u64) -> bool) -> Step {
    if regs.bp == 0 {
        return Step::End;
    }
    if regs.bp < regs.sp {
        return Step::Failed;
    }
    let (mut bp, mut pc) = (0, 0);
    if !read(regs.bp, &mut bp) || !read(regs.bp.wrapping_add(8), &mut pc) {
        return Step::Failed;
    }
    if pc == 0 {
        return Step::End;
    }
    Step::Caller(Regs {
        pc,
        sp: regs.bp.wrapping_add(16),
        bp,
    })
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{collections::BTreeMap, vec, vec::Vec};

    use super::*;

    fn row(pc: u64, kind: u8, cfa: i32, rbp: i16) -> UnwindRow {
        UnwindRow {
            pc,
            cfa_offset_bytes: cfa,
            rbp_offset_bytes: rbp,
            kind,
            _pad: 0,
        }
    }

    /// The map's elements for `rows`: the header, then the rows.
    fn map(rows: &[UnwindRow]) -> Vec<UnwindRow> {
        let mut map = vec![row(rows.len() as u64, 0, 0, 0)];
        map.extend_from_slice(rows);
        map
    }

    #[test]
    fn finds_the_last_row_at_or_below_a_pc_and_none_in_gaps() {
        for n in [1usize, 2, 3, 7, 64, 1000] {
            // Functions at 0x1000 * (i + 1), 0x800 long, a NONE row after each.
            let mut rows = Vec::new();
            for i in 0..n as u64 {
                let start = 0x1000 * (i + 1);
                rows.push(row(start, kind::CFA_SP, 8, 0));
                rows.push(row(start + 4, kind::CFA_SP, 16, -16));
                rows.push(row(start + 0x800, kind::NONE, 0, 0));
            }
            let map = map(&rows);
            let get = |i: u32| map.get(i as usize).copied();
            let count = rows.len() as u32;
            for i in 0..n as u64 {
                let start = 0x1000 * (i + 1);
                assert_eq!(find(start, count, get), Some(rows[3 * i as usize]));
                assert_eq!(find(start + 3, count, get), Some(rows[3 * i as usize]));
                assert_eq!(find(start + 4, count, get), Some(rows[3 * i as usize + 1]));
                assert_eq!(
                    find(start + 0x7ff, count, get).unwrap().cfa_offset_bytes,
                    16
                );
                assert_eq!(find(start + 0x800, count, get), None, "gap after {i}");
            }
            assert_eq!(find(0xfff, count, get), None, "before the first row");
            assert_eq!(find(0, count, get), None);
        }
    }

    #[test]
    fn a_search_within_a_page_finds_what_the_whole_search_finds() {
        let rows = [
            row(0x1000, kind::CFA_SP, 8, 0),
            row(0x1004, kind::CFA_SP, 16, -16),
            row(0x1ff0, kind::NONE, 0, 0),
            row(0x2010, kind::CFA_BP, 16, -16),
            row(0x2020, kind::NONE, 0, 0),
        ];
        let map = map(&rows);
        let get = |i: u32| map.get(i as usize).copied();
        let count = rows.len() as u32;
        // Page 0x1000: rows 1..4; page 0x2000: rows 3..6 (row 3 in force at its start).
        for (page, pcs) in [
            (
                PageRows {
                    first: 1,
                    end: 4,
                    load_bias: 0,
                },
                [0x1000, 0x1003, 0x1004, 0x1fef, 0x1ff0, 0x1fff],
            ),
            (
                PageRows {
                    first: 3,
                    end: 6,
                    load_bias: 0,
                },
                [0x2000, 0x200f, 0x2010, 0x201f, 0x2020, 0x2fff],
            ),
        ] {
            for pc in pcs {
                let mut search = Search::within(page, count);
                while search.halve(pc, get) {}
                assert_eq!(search.found(pc, get), find(pc, count, get), "at {pc:#x}");
            }
        }
    }

    /// What a row gives for unwinding, wherever it starts.
    fn rule(row: Option<UnwindRow>) -> Option<(i32, i16, u8)> {
        row.map(|r| (r.cfa_offset_bytes, r.rbp_offset_bytes, r.kind))
    }

    #[test]
    fn a_hint_finds_what_the_search_finds_or_nothing() {
        let rows = [
            row(0x1000, kind::CFA_SP, 8, 0),
            row(0x1004, kind::CFA_SP, 16, -16),
            row(0x1ff0, kind::NONE, 0, 0),
            row(0x2010, kind::FRAME_POINTER, 0, 0),
            row(0x2020, kind::CFA_BP, 16, -16),
        ];
        let map = map(&rows);
        let get = |i: u32| map.get(i as usize).copied();
        let count = rows.len() as u32;
        // The module mapped 0x5000_0000 higher: one page entry per page of the process.
        let bias = 0x5000_0000u64;
        let (tgid, generation) = (77, 3);
        for pc in (0xff0..0x3000u64).step_by(3) {
            let want = find(pc, count, get);
            let page = PageRows {
                first: 1,
                end: count + 1,
                load_bias: bias,
            };
            let mut search = Search::within(page, count);
            while search.halve(pc, get) {}
            let Some(found) = search.found(pc, get) else {
                assert_eq!(want, None, "at {pc:#x}");
                continue;
            };
            let next = get(search.found_index() + 1).map_or(u64::MAX, |r| r.pc);
            let page_start = (pc + bias) & !0xfff;
            let hint = RowHint::new(&found, next, &page, page_start, tgid, generation);
            // Every pc of the page that the hint covers has the row the search finds.
            for other in (page_start..page_start + 0x1000).step_by(5) {
                if let Some(got) = hint.row_for(tgid, generation, other) {
                    assert_eq!(rule(Some(got)), rule(find(other - bias, count, get)));
                }
            }
            assert_eq!(rule(hint.row_for(tgid, generation, pc + bias)), rule(want));
            // Another process, another generation: nothing.
            assert_eq!(hint.row_for(tgid + 1, generation, pc + bias), None);
            assert_eq!(hint.row_for(tgid, generation + 1, pc + bias), None);
        }
        // A zeroed slot holds nothing.
        assert_eq!(RowHint::default().row_for(0, 0, 0), None);
    }

    #[test]
    fn page_keys_keep_processes_and_pages_apart() {
        assert_ne!(page_key(1, 0x40_0000), page_key(2, 0x40_0000));
        assert_eq!(page_key(1, 0x40_0000), page_key(1, 0x40_0fff));
        assert_ne!(page_key(1, 0x40_0000), page_key(1, 0x40_1000));
        let top = (1u64 << 47) - 1;
        assert_ne!(page_key(4_194_303, top), page_key(4_194_302, top));
        assert_eq!(page_key(4_194_303, top) >> 36, 4_194_303);
    }

    #[test]
    fn a_page_entry_that_does_not_fit_the_rows_finds_nothing() {
        let map = map(&[
            row(0x1000, kind::CFA_SP, 8, 0),
            row(0x1010, kind::NONE, 0, 0),
        ]);
        let get = |i: u32| map.get(i as usize).copied();
        for page in [
            PageRows {
                first: 0,
                end: 2,
                load_bias: 0,
            },
            PageRows {
                first: 2,
                end: 2,
                load_bias: 0,
            },
            PageRows {
                first: 2,
                end: 1,
                load_bias: 0,
            },
            PageRows {
                first: 1,
                end: 4,
                load_bias: 0,
            },
            PageRows {
                first: u32::MAX,
                end: u32::MAX,
                load_bias: 0,
            },
        ] {
            let mut search = Search::within(page, 2);
            while search.halve(0x1000, get) {}
            assert_eq!(search.found(0x1000, get), None, "{page:?}");
        }
    }

    #[test]
    fn finds_rows_in_a_full_table() {
        let rows: Vec<UnwindRow> = (0..u64::from(MAX_UNWIND_ROWS) - 1)
            .map(|i| row(16 * i + 16, kind::CFA_SP, (i % 1000) as i32 + 8, 0))
            .collect();
        let map = map(&rows);
        let get = |i: u32| map.get(i as usize).copied();
        for i in [0usize, 1, 12345, rows.len() - 2, rows.len() - 1] {
            assert_eq!(find(rows[i].pc + 15, rows.len() as u32, get), Some(rows[i]));
        }
    }

    #[test]
    fn a_map_that_cannot_be_read_or_lies_about_its_count_finds_nothing_wrong() {
        assert_eq!(find(0x1000, 4, |_| None), None);
        assert_eq!(find(0x1000, 0, |_| Some(row(0, kind::CFA_SP, 8, 0))), None);
        // A count past the rows written: reads beyond them fail, and find says so.
        let map = map(&[row(0x1000, kind::CFA_SP, 8, 0)]);
        let get = |i: u32| map.get(i as usize).copied();
        assert_eq!(find(0x1000, u32::MAX, get), None);
    }

    /// A stack: words by address.
    fn memory(words: &[(u64, u64)]) -> impl FnMut(u64, &mut u64) -> bool {
        let words: BTreeMap<u64, u64> = words.iter().copied().collect();
        move |at, word| match words.get(&at) {
            Some(&w) => {
                *word = w;
                true
            }
            None => false,
        }
    }

    #[test]
    fn steps_by_cfa_rules() {
        let regs = Regs {
            pc: 0x1234,
            sp: 0x7000,
            bp: 0x9999,
        };
        // At a function's first instruction: the return address is at [rsp].
        let read = memory(&[(0x7000, 0x5555)]);
        assert_eq!(
            step(&row(0, kind::CFA_SP, 8, 0), regs, read),
            Step::Caller(Regs {
                pc: 0x5555,
                sp: 0x7008,
                bp: 0x9999
            })
        );
        // After push rbp; sub $0x20,%rsp: CFA = rsp + 0x30, rbp saved at CFA - 16.
        let read = memory(&[(0x7028, 0x5555), (0x7020, 0x7100)]);
        assert_eq!(
            step(&row(0, kind::CFA_SP, 0x30, -16), regs, read),
            Step::Caller(Regs {
                pc: 0x5555,
                sp: 0x7030,
                bp: 0x7100
            })
        );
        // CFA from rbp.
        let regs_bp = Regs { bp: 0x7010, ..regs };
        let read = memory(&[(0x7018, 0x5555), (0x7010, 0x7200)]);
        assert_eq!(
            step(&row(0, kind::CFA_BP, 16, -16), regs_bp, read),
            Step::Caller(Regs {
                pc: 0x5555,
                sp: 0x7020,
                bp: 0x7200
            })
        );
        assert_eq!(
            step(&row(0, kind::OUTERMOST, 8, 0), regs, memory(&[])),
            Step::End
        );
        // A return address of 0 ends the stack too.
        assert_eq!(
            step(&row(0, kind::CFA_SP, 8, 0), regs, memory(&[(0x7000, 0)])),
            Step::End
        );
    }

    #[test]
    fn malformed_rules_and_stacks_fail_instead_of_looping() {
        let regs = Regs {
            pc: 0x1234,
            sp: 0x7000,
            bp: 0x10,
        };
        let all = memory(&[(0x6ff8, 1), (0x7000, 2), (0x8, 3)]);
        // A CFA at or below the stack pointer, from a negative offset or a small rbp.
        assert_eq!(step(&row(0, kind::CFA_SP, 0, 0), regs, all), Step::Failed);
        let all = memory(&[(0x6ff8, 1), (0x7000, 2), (0x8, 3)]);
        assert_eq!(step(&row(0, kind::CFA_SP, -8, 0), regs, all), Step::Failed);
        let all = memory(&[(0x6ff8, 1), (0x7000, 2), (0x8, 3)]);
        assert_eq!(step(&row(0, kind::CFA_BP, 8, 0), regs, all), Step::Failed);
        // An offset that wraps the address space.
        let all = memory(&[]);
        let high = Regs {
            sp: u64::MAX - 4,
            ..regs
        };
        assert_eq!(
            step(&row(0, kind::CFA_SP, 0x10, 0), high, all),
            Step::Failed
        );
        // Unknown kinds, NONE, and reads that fail.
        for k in [kind::NONE, 5, 200] {
            assert_eq!(step(&row(0, k, 8, 0), regs, memory(&[])), Step::Failed);
        }
        assert_eq!(
            step(&row(0, kind::CFA_SP, 16, -16), regs, memory(&[(0x7008, 5)])),
            Step::Failed,
            "the saved rbp cannot be read"
        );
    }

    #[test]
    fn steps_by_frame_pointers() {
        let regs = Regs {
            pc: 0x1234,
            sp: 0x7000,
            bp: 0x7040,
        };
        let read = memory(&[(0x7040, 0x7100), (0x7048, 0x5555)]);
        assert_eq!(
            step_frame_pointer(regs, read),
            Step::Caller(Regs {
                pc: 0x5555,
                sp: 0x7050,
                bp: 0x7100
            })
        );
        assert_eq!(
            step_frame_pointer(Regs { bp: 0, ..regs }, memory(&[])),
            Step::End
        );
        // A frame pointer below the stack pointer is not a frame of this stack.
        assert_eq!(
            step_frame_pointer(Regs { bp: 0x6000, ..regs }, memory(&[])),
            Step::Failed
        );
        assert_eq!(step_frame_pointer(regs, memory(&[])), Step::Failed);
        // A row of code with frame pointers steps the same way.
        let read = memory(&[(0x7040, 0x7100), (0x7048, 0x5555)]);
        assert_eq!(
            step(&row(0, kind::FRAME_POINTER, 0, 0), regs, read),
            step_frame_pointer(regs, memory(&[(0x7040, 0x7100), (0x7048, 0x5555)]))
        );
    }
}
