//! The call-frame information of a module (`.eh_frame`, `.debug_frame`): for each pc, how to
//! find the caller's frame; and whether the module keeps frame pointers at all.

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, DebugFrameOffset, EhFrame, EhFrameOffset,
    EndianSlice, LittleEndian, RegisterRule, UnwindContext, UnwindSection, X86_64,
};
use leaktrace_common::unwind_rows::{UnwindRow, kind};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

/// How to find the caller's frame from a frame whose pc is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// From the CFI: the canonical frame address (the caller's stack pointer) is `sp` (or
    /// `bp`) plus `cfa_offset`; the return address is saved at `CFA + ra_offset`, and the
    /// caller's `rbp` at `CFA + bp_offset` (unchanged when `None`).
    Cfi {
        cfa_from_bp: bool,
        cfa_offset: i64,
        ra_offset: i64,
        bp_offset: Option<i64>,
    },
    /// The CFI marks the return address undefined: the outermost frame (`_start`, `clone3`).
    Outermost,
    /// No usable CFI for this pc (none at all, or a rule this unwinder does not evaluate, such
    /// as a DWARF expression): the saved frame pointer and return address sit at `bp`.
    FramePointer,
}

/// The call-frame information of one ELF file, indexed by address.
pub struct ModuleCfi {
    eh_frame: Option<Section>,
    debug_frame: Option<Section>,
    text_address: u64,
    /// Every FDE, sorted by start address.
    fdes: Vec<Fde>,
    /// `PT_LOAD` segments: (file offset, file size, virtual address).
    segments: Vec<(u64, u64, u64)>,
    /// Most of its functions set up a frame pointer (their CFA moves to `rbp`), or it has no
    /// CFI at all, so frame pointers are all one can use.
    pub keeps_frame_pointers: bool,
}

struct Section {
    data: Vec<u8>,
    address: u64,
}

#[derive(Clone, Copy, Debug)]
struct Fde {
    start: u64,
    end: u64,
    in_eh_frame: bool,
    offset: usize,
}

/// A module is taken to keep frame pointers when at least this share of its functions (by
/// FDE count) moves its CFA to `rbp`. Built with `-fno-omit-frame-pointer`, nearly all do
/// (only hand-written start-up code does not); built without, only the few functions that
/// use `alloca` or realign their stack.
const FRAME_POINTER_SHARE: f64 = 0.5;

/// The largest `.eh_frame` or `.debug_frame` read (decompressed): real ones are a few MiB.
const MAX_CFI_SECTION_BYTES: u64 = 256 << 20;

impl ModuleCfi {
    /// Parses an ELF file's CFI sections and indexes their FDEs. `data` may be a whole file
    /// in memory or an `object::ReadCache` over an open file, which reads only the headers
    /// and the sections used (a binary with debug information can be very large).
    pub fn parse<'data, R: object::ReadRef<'data>>(data: R) -> Result<Self, String> {
        let file = object::File::parse(data).map_err(|e| e.to_string())?;
        let section = |name: &str| {
            let section = file.section_by_name(name)?;
            // A compressed section says how large it will be: a hostile file could ask for
            // more memory than the machine has.
            let range = section.compressed_file_range().ok()?;
            if range.uncompressed_size > MAX_CFI_SECTION_BYTES {
                return None;
            }
            let bytes = section.uncompressed_data().ok()?;
            Some(Section {
                data: bytes.into_owned(),
                address: section.address(),
            })
        };
        let text_address = file.section_by_name(".text").map_or(0, |s| s.address());
        let segments = file
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                (offset, size, s.address())
            })
            .collect();
        let mut module = Self {
            eh_frame: section(".eh_frame"),
            debug_frame: section(".debug_frame"),
            text_address,
            fdes: Vec::new(),
            segments,
            keeps_frame_pointers: true,
        };
        let (mut with_fp, mut total) = (0u64, 0u64);
        if let Some(eh) = &module.eh_frame {
            let section = EhFrame::new(&eh.data, LittleEndian);
            let bases = module.bases(eh);
            index(
                &section,
                &bases,
                true,
                &mut module.fdes,
                &mut with_fp,
                &mut total,
            );
        }
        if let Some(debug) = &module.debug_frame {
            let section = DebugFrame::new(&debug.data, LittleEndian);
            let bases = BaseAddresses::default();
            index(
                &section,
                &bases,
                false,
                &mut module.fdes,
                &mut with_fp,
                &mut total,
            );
        }
        module.fdes.sort_by_key(|f| f.start);
        // The same function may be described in both sections; either description will do.
        module.fdes.dedup_by_key(|f| f.start);
        if total > 0 {
            module.keeps_frame_pointers = with_fp as f64 / total as f64 >= FRAME_POINTER_SHARE;
        }
        Ok(module)
    }

    fn bases(&self, eh: &Section) -> BaseAddresses {
        BaseAddresses::default()
            .set_eh_frame(eh.address)
            .set_text(self.text_address)
    }

    /// The ELF virtual address of a file offset.
    pub fn vaddr_of(&self, file_offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|&&(offset, size, _)| {
                file_offset
                    .checked_sub(offset)
                    .is_some_and(|into| into < size)
            })
            .map(|&(offset, _, vaddr)| (file_offset - offset).wrapping_add(vaddr))
    }

    /// The module's CFI as rows for the BPF side's unwinder (`leaktrace_common::unwind_rows`),
    /// at ELF virtual addresses, sorted, a rule that repeats the one before it left out: each
    /// FDE's rows, then a [`kind::NONE`] row where it ends, unless the next one starts there.
    /// gimli evaluates the CFA programs (a well-kept parser, already the user-space
    /// unwinder's); an FDE it cannot evaluate is left out, so frames in it are copied.
    pub fn unwind_rows(&self) -> Vec<UnwindRow> {
        let mut rows: Vec<UnwindRow> = Vec::new();
        let mut ctx = UnwindContext::new();
        for fde in &self.fdes {
            let start = rows.len();
            let complete = if fde.in_eh_frame {
                self.eh_frame.as_ref().is_some_and(|eh| {
                    let section = EhFrame::new(&eh.data, LittleEndian);
                    push_fde_rows(&section, &self.bases(eh), fde.offset, &mut ctx, &mut rows)
                })
            } else {
                self.debug_frame.as_ref().is_some_and(|debug| {
                    let section = DebugFrame::new(&debug.data, LittleEndian);
                    let bases = BaseAddresses::default();
                    push_fde_rows(&section, &bases, fde.offset, &mut ctx, &mut rows)
                })
            };
            if !complete {
                rows.truncate(start);
            }
            push_row(&mut rows, fde.end, UnwindRow::default());
        }
        rows
    }

    /// The unwinding rule at virtual address `vaddr`.
    pub fn step_at(&self, vaddr: u64, ctx: &mut UnwindContext<usize>) -> Step {
        let index = self.fdes.partition_point(|f| f.start <= vaddr);
        let Some(fde) = index
            .checked_sub(1)
            .map(|i| self.fdes[i])
            .filter(|f| vaddr < f.end)
        else {
            return Step::FramePointer;
        };
        let row = if fde.in_eh_frame {
            let Some(eh) = &self.eh_frame else {
                return Step::FramePointer;
            };
            let section = EhFrame::new(&eh.data, LittleEndian);
            let bases = self.bases(eh);
            section
                .fde_from_offset(&bases, EhFrameOffset(fde.offset), EhFrame::cie_from_offset)
                .and_then(|f| f.unwind_info_for_address(&section, &bases, ctx, vaddr))
                .map(|row| {
                    step_of(
                        row.cfa(),
                        row.register(X86_64::RA),
                        row.register(X86_64::RBP),
                    )
                })
        } else {
            let Some(debug) = &self.debug_frame else {
                return Step::FramePointer;
            };
            let section = DebugFrame::new(&debug.data, LittleEndian);
            let bases = BaseAddresses::default();
            section
                .fde_from_offset(
                    &bases,
                    DebugFrameOffset(fde.offset),
                    DebugFrame::cie_from_offset,
                )
                .and_then(|f| f.unwind_info_for_address(&section, &bases, ctx, vaddr))
                .map(|row| {
                    step_of(
                        row.cfa(),
                        row.register(X86_64::RA),
                        row.register(X86_64::RBP),
                    )
                })
        };
        row.unwrap_or(Step::FramePointer)
    }
}

/// Adds the FDEs of one section to `fdes`, and counts those that move the CFA to `rbp`.
fn index<'a, S: UnwindSection<EndianSlice<'a, LittleEndian>>>(
    section: &S,
    bases: &BaseAddresses,
    in_eh_frame: bool,
    fdes: &mut Vec<Fde>,
    with_fp: &mut u64,
    total: &mut u64,
) {
    let mut entries = section.entries(bases);
    // A malformed entry ends the section: what came before it is still good.
    while let Ok(Some(entry)) = entries.next() {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let Ok(fde) = partial.parse(S::cie_from_offset) else {
            continue;
        };
        if fde.len() == 0 {
            continue;
        }
        *total += 1;
        let mut instructions = fde.instructions(section, bases);
        while let Ok(Some(instruction)) = instructions.next() {
            use gimli::CallFrameInstruction::{DefCfa, DefCfaRegister};
            if let DefCfa { register, .. } | DefCfaRegister { register } = instruction
                && register == X86_64::RBP
            {
                *with_fp += 1;
                break;
            }
        }
        fdes.push(Fde {
            start: fde.initial_address(),
            end: fde.initial_address().saturating_add(fde.len()),
            in_eh_frame,
            offset: fde.offset(),
        });
    }
}

/// Appends a row at `pc` to `rows` (sorted): one at the same pc as the last replaces it (an
/// FDE's end where the next one starts), one that repeats the last rule is left out.
/// Appends the rows of the FDE at `offset` of `section` (`.eh_frame` or `.debug_frame`); false
/// when gimli cannot evaluate it.
fn push_fde_rows<'a, S>(
    section: &S,
    bases: &BaseAddresses,
    offset: usize,
    ctx: &mut UnwindContext<usize>,
    rows: &mut Vec<UnwindRow>,
) -> bool
where
    S: UnwindSection<EndianSlice<'a, LittleEndian>>,
    S::Offset: From<usize>,
{
    section
        .fde_from_offset(bases, offset.into(), S::cie_from_offset)
        .and_then(|f| {
            let mut table = f.rows(section, bases, ctx)?;
            while let Some(row) = table.next_row()? {
                push_row(
                    rows,
                    row.start_address(),
                    row_of(
                        row.cfa(),
                        row.register(X86_64::RA),
                        row.register(X86_64::RBP),
                    ),
                );
            }
            Ok(())
        })
        .is_ok()
}

fn push_row(rows: &mut Vec<UnwindRow>, pc: u64, rule: UnwindRow) {
    let row = UnwindRow { pc, ..rule };
    if let Some(last) = rows.last_mut()
        && last.pc >= pc
    {
        *last = row;
    } else {
        rows.push(row);
    }
    let n = rows.len();
    if n >= 2 && same_rule(&rows[n - 2], &rows[n - 1]) {
        rows.pop();
    }
}

fn same_rule(a: &UnwindRow, b: &UnwindRow) -> bool {
    UnwindRow { pc: 0, ..*a } == UnwindRow { pc: 0, ..*b }
}

/// A CFI row as the BPF side's rule: [`kind::NONE`] for what it cannot evaluate (a CFA from
/// another register or an expression, a return address elsewhere than just below the CFA,
/// `rbp` restored from anything but a slot near the CFA).
fn row_of<T: gimli::ReaderOffset>(
    cfa: &CfaRule<T>,
    ra: Option<RegisterRule<T>>,
    bp: Option<RegisterRule<T>>,
) -> UnwindRow {
    let none = UnwindRow::default();
    let (kind, cfa_offset) = match *cfa {
        CfaRule::RegisterAndOffset { register, offset } if register == X86_64::RSP => {
            (kind::CFA_SP, offset)
        }
        CfaRule::RegisterAndOffset { register, offset } if register == X86_64::RBP => {
            (kind::CFA_BP, offset)
        }
        _ => return none,
    };
    let kind = match ra {
        Some(RegisterRule::Offset(-8)) => kind,
        Some(RegisterRule::Undefined) => kind::OUTERMOST,
        _ => return none,
    };
    let rbp_offset = match bp {
        None | Some(RegisterRule::SameValue | RegisterRule::Undefined) => 0,
        Some(RegisterRule::Offset(offset)) if offset != 0 => match i16::try_from(offset) {
            Ok(offset) => offset,
            Err(_) => return none,
        },
        _ => return none,
    };
    let Ok(cfa_offset) = i32::try_from(cfa_offset) else {
        return none;
    };
    UnwindRow {
        pc: 0,
        cfa_offset_bytes: cfa_offset,
        rbp_offset_bytes: rbp_offset,
        kind,
        _pad: 0,
    }
}

fn step_of<T: gimli::ReaderOffset>(
    cfa: &CfaRule<T>,
    ra: Option<RegisterRule<T>>,
    bp: Option<RegisterRule<T>>,
) -> Step {
    let (cfa_from_bp, cfa_offset) = match *cfa {
        CfaRule::RegisterAndOffset { register, offset } if register == X86_64::RSP => {
            (false, offset)
        }
        CfaRule::RegisterAndOffset { register, offset } if register == X86_64::RBP => {
            (true, offset)
        }
        _ => return Step::FramePointer,
    };
    let ra_offset = match ra {
        Some(RegisterRule::Offset(offset)) => offset,
        Some(RegisterRule::Undefined) => return Step::Outermost,
        _ => return Step::FramePointer,
    };
    let bp_offset = match bp {
        Some(RegisterRule::Offset(offset)) => Some(offset),
        _ => None,
    };
    Step::Cfi {
        cfa_from_bp,
        cfa_offset,
        ra_offset,
        bp_offset,
    }
}

#[cfg(test)]
mod tests {
    use gimli::Register;

    use super::*;

    /// This test binary's own CFI: Rust on x86_64 keeps no frame pointers by default.
    fn own_module() -> ModuleCfi {
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        ModuleCfi::parse(&object::ReadCache::new(file)).unwrap()
    }

    #[test]
    fn indexes_the_fdes_of_a_real_binary() {
        let module = own_module();
        assert!(module.fdes.len() > 100, "{} FDEs", module.fdes.len());
        assert!(module.fdes.windows(2).all(|w| w[0].start < w[1].start));
        let mut ctx = UnwindContext::new();
        // Inside a function, past its prologue or not, the return address sits just below
        // the CFA: the x86_64 call pushes it there.
        let fde = module.fdes[module.fdes.len() / 2];
        match module.step_at(fde.start, &mut ctx) {
            Step::Cfi {
                cfa_from_bp: false,
                cfa_offset: 8,
                ra_offset: -8,
                bp_offset: None,
            } => {}
            other => panic!("at a function's first instruction: {other:?}"),
        }
        // Outside every FDE there is no CFI.
        assert_eq!(module.step_at(0, &mut ctx), Step::FramePointer);
    }

    #[test]
    fn unwind_rows_of_a_real_binary_agree_with_its_cfi() {
        let module = own_module();
        let rows = module.unwind_rows();
        assert!(rows.len() > module.fdes.len(), "{} rows", rows.len());
        assert!(
            rows.windows(2).all(|w| w[0].pc < w[1].pc),
            "sorted, one row per pc"
        );
        assert!(
            rows.windows(2).all(|w| !same_rule(&w[0], &w[1])),
            "no row repeats the rule before it"
        );
        let mut ctx = UnwindContext::new();
        let mut checked = 0;
        for fde in module.fdes.iter().step_by(97) {
            for vaddr in [
                fde.start,
                fde.start + 1,
                fde.start + (fde.end - fde.start) / 2,
            ] {
                let row = rows[rows.partition_point(|r| r.pc <= vaddr) - 1];
                let want = match module.step_at(vaddr, &mut ctx) {
                    Step::Cfi {
                        cfa_from_bp,
                        cfa_offset,
                        ra_offset: -8,
                        bp_offset,
                    } => (
                        if cfa_from_bp {
                            kind::CFA_BP
                        } else {
                            kind::CFA_SP
                        },
                        cfa_offset as i32,
                        bp_offset.unwrap_or(0) as i16,
                    ),
                    Step::Outermost => {
                        (kind::OUTERMOST, row.cfa_offset_bytes, row.rbp_offset_bytes)
                    }
                    _ => (kind::NONE, row.cfa_offset_bytes, row.rbp_offset_bytes),
                };
                assert_eq!(
                    (row.kind, row.cfa_offset_bytes, row.rbp_offset_bytes),
                    want,
                    "at {vaddr:#x}"
                );
                checked += 1;
            }
        }
        assert!(checked > 30);
        // Past the last function there is no rule.
        assert_eq!(rows.last().unwrap().kind, kind::NONE);
    }

    #[test]
    fn rows_that_bpf_cannot_evaluate_are_none() {
        type R = CfaRule<usize>;
        let sp8: R = CfaRule::RegisterAndOffset {
            register: X86_64::RSP,
            offset: 8,
        };
        let ra = || Some(RegisterRule::Offset(-8));
        assert_eq!(row_of(&sp8, ra(), None).kind, kind::CFA_SP);
        let expression: R = CfaRule::Expression(gimli::UnwindExpression {
            offset: 0,
            length: 0,
        });
        assert_eq!(row_of(&expression, ra(), None).kind, kind::NONE);
        assert_eq!(
            row_of(&sp8, Some(RegisterRule::Offset(-16)), None).kind,
            kind::NONE
        );
        assert_eq!(row_of(&sp8, None, None).kind, kind::NONE);
        assert_eq!(
            row_of(&sp8, ra(), Some(RegisterRule::Offset(1 << 20))).kind,
            kind::NONE,
            "an rbp slot too far for the row"
        );
        assert_eq!(
            row_of(&sp8, ra(), Some(RegisterRule::Register(X86_64::RAX))).kind,
            kind::NONE
        );
        let huge: R = CfaRule::RegisterAndOffset {
            register: X86_64::RSP,
            offset: 1 << 40,
        };
        assert_eq!(row_of(&huge, ra(), None).kind, kind::NONE);
        assert_eq!(
            row_of(&sp8, Some(RegisterRule::Undefined), None).kind,
            kind::OUTERMOST
        );
    }

    #[test]
    #[ignore = "prints the size of the tables of this machine's libraries"]
    fn row_counts_of_system_libraries() {
        for path in [
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
            "/usr/bin/python3",
        ] {
            let Ok(file) = std::fs::File::open(path) else {
                continue;
            };
            let module = ModuleCfi::parse(&object::ReadCache::new(file)).unwrap();
            let rows = module.unwind_rows();
            let none = rows.iter().filter(|r| r.kind == kind::NONE).count();
            eprintln!(
                "{path}: {} FDEs, {} rows ({none} NONE)",
                module.fdes.len(),
                rows.len()
            );
        }
    }

    #[test]
    fn rejects_what_is_not_elf() {
        assert!(ModuleCfi::parse(&b"not an ELF file"[..]).is_err());
        assert!(ModuleCfi::parse(&[][..]).is_err());
    }

    #[test]
    fn step_rules_from_cfi_rows() {
        type R = CfaRule<usize>;
        let sp16: R = CfaRule::RegisterAndOffset {
            register: X86_64::RSP,
            offset: 16,
        };
        assert_eq!(
            step_of(
                &sp16,
                Some(RegisterRule::Offset(-8)),
                Some(RegisterRule::Offset(-16))
            ),
            Step::Cfi {
                cfa_from_bp: false,
                cfa_offset: 16,
                ra_offset: -8,
                bp_offset: Some(-16)
            }
        );
        assert_eq!(
            step_of(&sp16, Some(RegisterRule::Undefined), None),
            Step::Outermost
        );
        assert_eq!(step_of(&sp16, None, None), Step::FramePointer);
        let other: R = CfaRule::RegisterAndOffset {
            register: Register(3),
            offset: 8,
        };
        assert_eq!(
            step_of(&other, Some(RegisterRule::Offset(-8)), None),
            Step::FramePointer
        );
    }
}
