//! Where to put an entry uprobe so that the kernel emulates the probed instruction instead of
//! single-stepping it.
//!
//! A uprobe replaces one instruction with `int3`. On a hit the kernel runs the BPF program, then
//! either emulates the original instruction (on x86-64: near branches and `push reg`) or copies it
//! to a page of the process and single-steps it there, which costs a second trap. Measured here:
//! ~0.9 us per hit when emulated, ~4.3 us when single-stepped. glibc's `free` begins with
//! `test %rdi,%rdi` (single-stepped) followed by `je` (emulated); probing the `je` sees the same
//! argument registers and stack pointer, on every path through the function.
//!
//! The rule, decoded rather than hard-coded (builds of glibc and other allocators differ): skip a
//! short straight-line prefix of instructions that write no argument register, no `%rsp` and no
//! memory, up to the first instruction the kernel emulates, provided that no branch anywhere in
//! the module's code lands inside the skipped range (a second hit per call would count a free
//! twice). Anything unexpected falls back to the entry itself, which is always correct.
//!
//! Only for functions whose entry carries no uretprobe: a uretprobe must sit on the entry, and a
//! uprobe there shares its trap for free.

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess,
    Register,
};

use super::elf_symbols::executable_ranges;

/// Instructions skipped at most: a prologue's test of the argument comes first or not at all.
const MAX_SKIPPED: usize = 4;

/// Registers an entry program may read: the six integer arguments and the stack pointer.
const PROTECTED: [Register; 7] = [
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
    Register::RSP,
];

/// Executable code of an ELF file, as file offsets: relative branches within one segment have
/// the same displacement in the file as in memory, so decoding at file offsets gives their
/// targets as file offsets.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    /// The bytes of one executable segment.
    pub bytes: &'a [u8],
    /// The file offset of `bytes[0]`.
    pub file_offset: u64,
}

/// The file offset at which to probe the function that starts at `entry`: `entry` itself, or a
/// later instruction that the kernel emulates and every call reaches with the arguments intact.
pub fn emulated_probe_point(code: &[Segment<'_>], entry: u64) -> u64 {
    let Some(segment) = code
        .iter()
        .find(|c| entry >= c.file_offset && entry - c.file_offset < c.bytes.len() as u64)
    else {
        return entry;
    };
    let Some(candidate) = first_emulated(segment, entry) else {
        return entry;
    };
    if candidate == entry || code.iter().any(|c| lands_in(c, entry, candidate)) {
        return entry;
    }
    candidate
}

/// `emulated_probe_point` for the function at file offset `entry` of the ELF file `data`;
/// `entry` itself when the file cannot be parsed.
pub fn in_elf(data: &[u8], entry: u64) -> u64 {
    let Ok(ranges) = executable_ranges(data) else {
        return entry;
    };
    // A segment that claims bytes past the end of the file (a corrupt or hostile ELF) is
    // left out.
    let segments: Vec<Segment<'_>> = ranges
        .iter()
        .filter_map(|&(offset, size)| {
            let start = usize::try_from(offset).ok()?;
            let end = start.checked_add(usize::try_from(size).ok()?)?;
            Some(Segment {
                bytes: data.get(start..end)?,
                file_offset: offset,
            })
        })
        .collect();
    emulated_probe_point(&segments, entry)
}

/// Whether the kernel emulates the instruction at file offset `offset` of the ELF file `data`
/// (else a probe there is single-stepped); false when no instruction decodes there.
pub fn is_emulated_in_elf(data: &[u8], offset: u64) -> bool {
    let Some(code) = usize::try_from(offset).ok().and_then(|at| data.get(at..)) else {
        return false;
    };
    let mut decoder = Decoder::with_ip(64, code, offset, DecoderOptions::NONE);
    let instruction = decoder.decode();
    !instruction.is_invalid() && is_emulated(&instruction)
}

/// The first instruction from `entry` that the kernel emulates, if only skippable instructions
/// come before it.
fn first_emulated(segment: &Segment<'_>, entry: u64) -> Option<u64> {
    let mut decoder =
        Decoder::with_ip(64, segment.bytes, segment.file_offset, DecoderOptions::NONE);
    decoder
        .set_position(usize::try_from(entry - segment.file_offset).ok()?)
        .ok()?;
    decoder.set_ip(entry);
    let mut info = InstructionInfoFactory::new();
    let mut instruction = Instruction::default();
    for _ in 0..=MAX_SKIPPED {
        if !decoder.can_decode() {
            return None;
        }
        decoder.decode_out(&mut instruction);
        if instruction.is_invalid() {
            return None;
        }
        if is_emulated(&instruction) {
            return Some(instruction.ip());
        }
        if !is_skippable(&instruction, &mut info) {
            return None;
        }
    }
    None
}

/// Whether the x86-64 kernel emulates it (arch/x86/kernel/uprobes.c: `branch_setup_xol_ops`,
/// `push_setup_xol_ops`). Only the plain encodings: the kernel refuses branches with an
/// operand-size prefix, and a prefix shows as a longer instruction.
fn is_emulated(instruction: &Instruction) -> bool {
    let len = instruction.len();
    if instruction.is_jcc_short() || instruction.is_jmp_short() {
        return len == 2;
    }
    if instruction.is_jcc_near() {
        return len == 6;
    }
    if instruction.is_jmp_near() {
        return len == 5;
    }
    // `push %rbx` is one byte, `push %r12` two (REX.B).
    instruction.code() == Code::Push_r64 && len <= 2
}

/// Straight-line code that leaves an entry program's view alone: it runs before the probe now,
/// so it must not change what the program reads.
fn is_skippable(instruction: &Instruction, info: &mut InstructionInfoFactory) -> bool {
    if instruction.flow_control() != FlowControl::Next || instruction.has_lock_prefix() {
        return false;
    }
    let info = info.info(instruction);
    let writes = |access: OpAccess| {
        !matches!(
            access,
            OpAccess::None | OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess
        )
    };
    let writes_argument = info
        .used_registers()
        .iter()
        .any(|used| writes(used.access()) && PROTECTED.contains(&used.register().full_register()));
    let writes_memory = info.used_memory().iter().any(|used| writes(used.access()));
    !writes_argument && !writes_memory
}

/// Whether a relative branch or call in `segment` lands in `(entry, candidate]`. A linear sweep:
/// compilers put no data in x86-64 code, and a misdecoded byte can only add a target, which
/// makes the answer more careful, not less.
fn lands_in(segment: &Segment<'_>, entry: u64, candidate: u64) -> bool {
    let mut decoder =
        Decoder::with_ip(64, segment.bytes, segment.file_offset, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        let target = instruction.near_branch_target();
        if target > entry && target <= candidate {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `bytes` as one segment at file offset 0x1000; the function under test starts at 0x1000.
    fn probe_point(bytes: &[u8]) -> u64 {
        emulated_probe_point(
            &[Segment {
                bytes,
                file_offset: 0x1000,
            }],
            0x1000,
        ) - 0x1000
    }

    const TEST_RDI: [u8; 3] = [0x48, 0x85, 0xff];
    const JE_REL32: [u8; 6] = [0x0f, 0x84, 0x10, 0, 0, 0];
    const RET: u8 = 0xc3;

    #[test]
    fn glibc_free_s_test_is_skipped_for_its_branch() {
        // glibc 2.36's free: test %rdi,%rdi; je ...; push %rbp
        let code = [&TEST_RDI[..], &JE_REL32, &[0x55, RET]].concat();
        assert_eq!(probe_point(&code), 3);
    }

    #[test]
    fn an_emulated_first_instruction_stays() {
        // push %r12, as glibc's malloc begins.
        assert_eq!(probe_point(&[0x41, 0x54, RET]), 0);
        assert_eq!(probe_point(&[0x74, 0x02, RET]), 0);
    }

    #[test]
    fn a_write_to_an_argument_or_the_stack_stops_the_skip() {
        // xor %edi,%edi writes the pointer free would read.
        assert_eq!(
            probe_point(&[&[0x31, 0xff][..], &JE_REL32, &[RET]].concat()),
            0
        );
        // sub $0x18,%rsp moves the stack pointer.
        assert_eq!(
            probe_point(&[&[0x48, 0x83, 0xec, 0x18][..], &JE_REL32, &[RET]].concat()),
            0
        );
        // mov %rax,(%rbx) writes memory.
        assert_eq!(
            probe_point(&[&[0x48, 0x89, 0x03][..], &JE_REL32, &[RET]].concat()),
            0
        );
        // test %rdi,%rdi; ret: nothing emulated before the function leaves.
        assert_eq!(probe_point(&[&TEST_RDI[..], &[RET]].concat()), 0);
    }

    #[test]
    fn a_branch_into_the_skipped_range_keeps_the_entry() {
        // test; je; ret; jmp back to the je (rel8 -9 from 0x0a lands on 0x03).
        let code = [&TEST_RDI[..], &JE_REL32, &[RET, 0xeb, 0xf6]].concat();
        assert_eq!(probe_point(&code), 0);
        // The same jump to the entry itself is harmless: the entry is not skipped.
        let code = [&TEST_RDI[..], &JE_REL32, &[RET, 0xeb, 0xf3]].concat();
        assert_eq!(probe_point(&code), 3);
    }

    #[test]
    fn a_prefixed_branch_or_a_long_prefix_is_not_trusted() {
        // 66-prefixed jcc: the kernel refuses to emulate it.
        let code = [&TEST_RDI[..], &[0x66, 0x0f, 0x84, 0x10, 0], &[RET]].concat();
        assert_eq!(probe_point(&code), 0);
        // Five skippable instructions before the branch: too far.
        let code = [&TEST_RDI[..]; 5].concat();
        assert_eq!(probe_point(&[&code[..], &JE_REL32, &[RET]].concat()), 0);
    }

    #[test]
    fn glibc_s_free_on_this_machine_is_probed_after_its_test() {
        let pid = std::process::id();
        let maps = crate::proc::maps::ProcMaps::read(pid).unwrap();
        let allocator = crate::attach::allocator::discover(pid, &maps).unwrap();
        let free = allocator
            .entry_points
            .iter()
            .find(|e| e.symbol == "free")
            .expect("glibc's free");
        let code = free.file.read_all().unwrap();
        let at = in_elf(&code, free.file_offset);
        assert_eq!(free.probe_offset, at);
        // Whatever the build, the probe point is the entry or within its first few bytes.
        assert!(
            (free.file_offset..free.file_offset + 16).contains(&at),
            "free at {:#x}, probed at {at:#x}",
            free.file_offset
        );
        // Debian's glibc (2.36 on these machines) begins free with `test %rdi,%rdi` and a
        // conditional jump, which nothing else jumps into: the jump is the probe point.
        let entry = &code[free.file_offset as usize..free.file_offset as usize + 5];
        let is_jcc = |b: &[u8]| {
            (0x70..=0x7f).contains(&b[0]) || (b[0] == 0x0f && (0x80..=0x8f).contains(&b[1]))
        };
        if entry[..3] == [0x48, 0x85, 0xff] && is_jcc(&entry[3..]) {
            assert_eq!(at, free.file_offset + 3);
        }
        assert_eq!(in_elf(b"not an ELF file", 0x1234), 0x1234);
    }

    #[test]
    fn tells_an_emulated_instruction_from_one_that_is_single_stepped() {
        let code = [&TEST_RDI[..], &JE_REL32, &[0x41, 0x54, RET]].concat();
        assert!(!is_emulated_in_elf(&code, 0), "test %rdi,%rdi");
        assert!(is_emulated_in_elf(&code, 3), "je rel32");
        assert!(is_emulated_in_elf(&code, 9), "push %r12");
        assert!(!is_emulated_in_elf(&code, 11), "ret");
        assert!(!is_emulated_in_elf(&code, 12), "past the end");
        assert!(!is_emulated_in_elf(&code, u64::MAX));
        assert!(!is_emulated_in_elf(&[0x0f], 0), "cut short");
    }

    #[test]
    fn malformed_code_keeps_the_entry() {
        assert_eq!(probe_point(&[]), 0);
        assert_eq!(probe_point(&[0x48]), 0);
        assert_eq!(probe_point(&[0x0f, 0x0b]), 0); // ud2
        assert_eq!(probe_point(&TEST_RDI), 0); // code ends before any branch
        // An entry outside every segment.
        assert_eq!(
            emulated_probe_point(
                &[Segment {
                    bytes: &[0x74, 0],
                    file_offset: 0
                }],
                0x5000
            ),
            0x5000
        );
    }
}
