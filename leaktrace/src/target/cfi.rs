//! The call-frame information of a module (`.eh_frame`, `.debug_frame`): for each pc, how to
//! find the caller's frame; and whether the module keeps frame pointers at all.

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, DebugFrameOffset, EhFrame, EhFrameOffset,
    EndianSlice, LittleEndian, RegisterRule, UnwindContext, UnwindSection, X86_64,
};
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
