//! Where to put an entry uprobe so that the kernel emulates the probed instruction instead of
//! single-stepping it.
//!
//! A uprobe replaces one instruction with `int3`. On a hit the kernel runs the BPF program, then
//! either emulates the original instruction or copies it to a page of the process and
//! single-steps it there, which costs a second trap. Measured: ~0.9 us per hit when emulated,
//! ~4.3 us single-stepped on glibc, ~30 us on jemalloc under redis. On x86-64 (Linux 6.18,
//! arch/x86/kernel/uprobes.c) the emulated ones are near relative branches (`jmp`, `jcc`, `call
//! rel32`; `branch_setup_xol_ops`, which refuses a 0x66 prefix), `push reg` (`push_setup_xol_ops`)
//! and the canonical nops (`x86_nops[len]`, since 6.16); each form relied on here is tested on
//! the running kernel (tests/integration/probes.rs). `mov`, `test` and `cmp`, which begin most
//! allocators, are single-stepped.
//!
//! The rule, decoded rather than hard-coded (builds of allocators differ): skip a straight-line
//! prefix of instructions that write no memory, not `%rsp` (every entry program reads it, and a
//! return probe hijacks the return address at `[%rsp]`) and no register holding an argument the
//! entry's program reads, up to the first instruction the kernel emulates, provided that no
//! branch anywhere in the module's code lands inside the skipped range (a second hit per call
//! would count a call twice). A register-to-register `mov` copies an argument rather than losing
//! it: the probe's cookie then tells the program which register holds it
//! (`leaktrace_common::args`). Anything unexpected falls back to the entry itself, which is
//! always correct.

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess,
    OpKind, Register,
};
use leaktrace_common::args::{self, reg};

use super::elf_symbols::executable_ranges;

/// Instructions skipped at most: an allocator's fast path checks its argument and loads its
/// thread's state in a few instructions (jemalloc's `free` takes 11 to its first branch).
const MAX_SKIPPED: usize = 16;

/// How the kernel handles a trap at a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Trap {
    /// The probed instruction is emulated in the trap handler: one trap per hit.
    Emulated,
    /// The probed instruction is single-stepped out of line: a second trap per hit, and the
    /// dominant cost of a probe (~5 to 30 us).
    SingleStepped,
}

/// Where to probe a function, and what the program there needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbePoint {
    /// File offset of the probed instruction: the entry, or a later one.
    pub file_offset: u64,
    /// The attach cookie: where the arguments are at that point (`leaktrace_common::args`);
    /// 0 when they are where the ABI puts them.
    pub cookie: u64,
    pub trap: Trap,
}

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

/// The executable code of one module, with the targets of its relative branches (found once:
/// a sweep of glibc's code takes milliseconds, and every entry point of the module needs it).
pub struct ModuleCode<'a> {
    segments: Vec<Segment<'a>>,
    targets: std::cell::OnceCell<Vec<u64>>,
}

impl<'a> ModuleCode<'a> {
    pub fn new(segments: Vec<Segment<'a>>) -> Self {
        Self {
            segments,
            targets: std::cell::OnceCell::new(),
        }
    }

    /// The code of the ELF file `data`; none when it cannot be parsed (every probe then stays
    /// on its entry, taken as single-stepped).
    pub fn of_elf(data: &'a [u8]) -> Self {
        let ranges = executable_ranges(data).unwrap_or_default();
        // A segment that claims bytes past the end of the file (a corrupt or hostile ELF) is
        // left out.
        let segments = ranges
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
        Self::new(segments)
    }

    /// Where to probe the function that starts at file offset `entry`, for a program that
    /// reads the arguments `reads` (0-based, `leaktrace_common::args::read_by`): `entry` itself,
    /// or a later instruction that the kernel emulates and every call reaches with those
    /// arguments intact.
    pub fn choose(&self, entry: u64, reads: &[usize]) -> ProbePoint {
        let segment = self.segment_of(entry);
        let at_entry = self.at_entry(entry);
        let Some((candidate, cookie)) = segment.and_then(|s| first_emulated(s, entry, reads))
        else {
            return at_entry;
        };
        if candidate != entry && self.lands_in(entry, candidate) {
            return at_entry;
        }
        ProbePoint {
            file_offset: candidate,
            cookie,
            trap: Trap::Emulated,
        }
    }

    /// The entry itself as a probe point.
    pub fn at_entry(&self, entry: u64) -> ProbePoint {
        ProbePoint {
            file_offset: entry,
            cookie: 0,
            trap: match self.segment_of(entry).and_then(|s| decode_at(s, entry)) {
                Some(instruction) if is_emulated(&instruction) => Trap::Emulated,
                _ => Trap::SingleStepped,
            },
        }
    }

    /// Its executable segments.
    pub(crate) fn segments(&self) -> &[Segment<'a>] {
        &self.segments
    }

    fn segment_of(&self, at: u64) -> Option<&Segment<'a>> {
        self.segments
            .iter()
            .find(|c| at >= c.file_offset && at - c.file_offset < c.bytes.len() as u64)
    }

    /// Whether a relative branch or call of the module lands in `(entry, candidate]`.
    pub(crate) fn lands_in(&self, entry: u64, candidate: u64) -> bool {
        self.lands_in_except(entry, candidate, &[])
    }

    /// Whether a relative branch or call of the module lands in `(entry, candidate]`
    /// elsewhere than at `allowed` (where branches the caller knows of land; another branch
    /// to the same place goes unseen).
    pub(crate) fn lands_in_except(&self, entry: u64, candidate: u64, allowed: &[u64]) -> bool {
        let targets = self.targets.get_or_init(|| {
            let mut targets: Vec<u64> = self.segments.iter().flat_map(branch_targets).collect();
            targets.sort_unstable();
            targets.dedup();
            targets
        });
        let first_after = targets.partition_point(|&t| t <= entry);
        targets[first_after..]
            .iter()
            .take_while(|&&t| t <= candidate)
            .any(|t| !allowed.contains(t))
    }
}

/// `ModuleCode::choose` on a module made of `code`.
pub fn choose(code: &[Segment<'_>], entry: u64, reads: &[usize]) -> ProbePoint {
    ModuleCode::new(code.to_vec()).choose(entry, reads)
}

fn decode_at(segment: &Segment<'_>, at: u64) -> Option<Instruction> {
    let mut decoder =
        Decoder::with_ip(64, segment.bytes, segment.file_offset, DecoderOptions::NONE);
    decoder
        .set_position(usize::try_from(at.checked_sub(segment.file_offset)?).ok()?)
        .ok()?;
    decoder.set_ip(at);
    let instruction = decoder.decode();
    (!instruction.is_invalid()).then_some(instruction)
}

/// Registers as bits, by `leaktrace_common::args::reg` number.
type Registers = u16;

/// The first instruction from `entry` that the kernel emulates, if only skippable instructions
/// come before it, with the cookie that says where the arguments `reads` are there.
fn first_emulated(segment: &Segment<'_>, entry: u64, reads: &[usize]) -> Option<(u64, u64)> {
    let mut decoder =
        Decoder::with_ip(64, segment.bytes, segment.file_offset, DecoderOptions::NONE);
    decoder
        .set_position(usize::try_from(entry - segment.file_offset).ok()?)
        .ok()?;
    decoder.set_ip(entry);
    let mut info = InstructionInfoFactory::new();
    let mut instruction = Instruction::default();
    // Per argument, the registers that hold its value; only those in `reads` must keep one.
    let mut holders: [Registers; 6] = core::array::from_fn(|n| 1 << args::ABI_ARGS[n]);
    for _ in 0..=MAX_SKIPPED {
        if !decoder.can_decode() {
            return None;
        }
        decoder.decode_out(&mut instruction);
        if instruction.is_invalid() {
            return None;
        }
        if is_emulated(&instruction) {
            let locations: Vec<u64> = (0..6)
                .map(|n| {
                    let held = holders[n];
                    if held & (1 << args::ABI_ARGS[n]) != 0 || !reads.contains(&n) {
                        args::ABI_ARGS[n]
                    } else {
                        u64::from(held.trailing_zeros())
                    }
                })
                .collect();
            return Some((instruction.ip(), args::cookie(&locations)));
        }
        skip(&instruction, &mut info, &mut holders)?;
        if reads
            .iter()
            .any(|&n| holders.get(n).is_none_or(|&h| h == 0))
        {
            return None;
        }
    }
    None
}

/// Whether the x86-64 kernel emulates it (arch/x86/kernel/uprobes.c, 6.18). Only the plain
/// encodings: the kernel refuses branches with an operand-size prefix, and a prefix shows as a
/// longer instruction.
pub(crate) fn is_emulated(instruction: &Instruction) -> bool {
    let len = instruction.len();
    if instruction.is_jcc_short() || instruction.is_jmp_short() {
        return len == 2;
    }
    if instruction.is_jcc_near() {
        return len == 6;
    }
    if instruction.is_jmp_near() || instruction.is_call_near() {
        return len == 5 && instruction.op0_kind() == OpKind::NearBranch64;
    }
    // `push %rbx` is one byte, `push %r12` two (REX.B, the only prefix the kernel takes).
    if instruction.code() == Code::Push_r64 {
        return len == 1 || (len == 2 && instruction.op0_register().number() >= 8);
    }
    false
}

/// Runs a straight-line instruction over `holders` (which registers hold each argument), or
/// None when it cannot be skipped: it branches, writes memory or `%rsp`, or is a system call.
fn skip(
    instruction: &Instruction,
    info: &mut InstructionInfoFactory,
    holders: &mut [Registers; 6],
) -> Option<()> {
    if instruction.flow_control() != FlowControl::Next
        || instruction.has_lock_prefix()
        || matches!(
            instruction.code(),
            Code::Syscall | Code::Sysenter | Code::Int3 | Code::Int_imm8
        )
    {
        return None;
    }
    let info = info.info(instruction);
    let writes = |access: OpAccess| {
        !matches!(
            access,
            OpAccess::None | OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess
        )
    };
    if info.used_memory().iter().any(|used| writes(used.access())) {
        return None;
    }
    // A 64-bit register-to-register copy: the destination now holds what the source held.
    if matches!(instruction.code(), Code::Mov_rm64_r64 | Code::Mov_r64_rm64)
        && instruction.op0_kind() == OpKind::Register
        && instruction.op1_kind() == OpKind::Register
    {
        let to = number(instruction.op0_register())?;
        let from = number(instruction.op1_register())?;
        for held in holders.iter_mut() {
            if *held & (1 << from) != 0 {
                *held |= 1 << to;
            } else {
                *held &= !(1 << to);
            }
        }
        return Some(());
    }
    for used in info.used_registers() {
        if !writes(used.access()) {
            continue;
        }
        let register = used.register().full_register();
        if register == Register::RSP {
            return None;
        }
        if let Some(written) = number(register) {
            for held in holders.iter_mut() {
                *held &= !(1 << written);
            }
        }
    }
    Some(())
}

/// The `leaktrace_common::args::reg` number of a general-purpose register (any width), None
/// for `%rsp` and the others.
pub(crate) fn number(register: Register) -> Option<u64> {
    Some(match register.full_register() {
        Register::RDI => reg::RDI,
        Register::RSI => reg::RSI,
        Register::RDX => reg::RDX,
        Register::RCX => reg::RCX,
        Register::R8 => reg::R8,
        Register::R9 => reg::R9,
        Register::RAX => reg::RAX,
        Register::RBX => reg::RBX,
        Register::RBP => reg::RBP,
        Register::R10 => reg::R10,
        Register::R11 => reg::R11,
        Register::R12 => reg::R12,
        Register::R13 => reg::R13,
        Register::R14 => reg::R14,
        Register::R15 => reg::R15,
        _ => return None,
    })
}

/// The targets of the relative branches and calls in `segment`. A linear sweep: compilers put
/// no data in x86-64 code, and a misdecoded byte can only add a target, which makes the choice
/// more careful, not less.
fn branch_targets(segment: &Segment<'_>) -> Vec<u64> {
    let mut decoder =
        Decoder::with_ip(64, segment.bytes, segment.file_offset, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    let mut targets = Vec::new();
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        let target = instruction.near_branch_target();
        if target != 0 {
            targets.push(target);
        }
    }
    targets
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `bytes` as one segment at file offset 0x1000; the function under test starts there.
    /// Returns the probe's offset from the entry and its cookie.
    fn point(bytes: &[u8], reads: &[usize]) -> (u64, u64) {
        let p = choose(
            &[Segment {
                bytes,
                file_offset: 0x1000,
            }],
            0x1000,
            reads,
        );
        (p.file_offset - 0x1000, p.cookie)
    }

    fn offset(bytes: &[u8], reads: &[usize]) -> u64 {
        point(bytes, reads).0
    }

    const TEST_RDI: [u8; 3] = [0x48, 0x85, 0xff];
    const JE_REL32: [u8; 6] = [0x0f, 0x84, 0x10, 0, 0, 0];
    const RET: u8 = 0xc3;
    const MALLOC: &[usize] = &[0];

    #[test]
    fn glibc_free_s_test_is_skipped_for_its_branch() {
        // glibc 2.36's free: test %rdi,%rdi; je ...; push %rbp
        let code = [&TEST_RDI[..], &JE_REL32, &[0x55, RET]].concat();
        assert_eq!(point(&code, MALLOC), (3, 0));
    }

    #[test]
    fn jemalloc_s_malloc_is_probed_at_its_ja() {
        // cmp $0x1000,%rdi; ja rel32
        let code = [
            &[0x48, 0x81, 0xff, 0x00, 0x10, 0, 0][..],
            &[0x0f, 0x87, 0x93, 0, 0, 0],
            &[RET],
        ]
        .concat();
        assert_eq!(point(&code, MALLOC), (7, 0));
    }

    #[test]
    fn an_argument_copied_to_another_register_is_followed_there() {
        // mimalloc's malloc: mov 0x0(%rip),%rax; mov %rdi,%rsi; mov %fs:(%rax),%rdi;
        // cmp $0x400,%rsi; ja rel8. The size is in %rsi at the ja.
        let code = [
            &[0x48, 0x8b, 0x05, 0, 0, 0, 0][..],
            &[0x48, 0x89, 0xfe],
            &[0x64, 0x48, 0x8b, 0x38],
            &[0x48, 0x81, 0xfe, 0x00, 0x04, 0, 0],
            &[0x77, 0x10, RET],
        ]
        .concat();
        let (at, cookie) = point(&code, MALLOC);
        assert_eq!(at, 21);
        assert_eq!(args::location(cookie, 0), reg::RSI);
        // mimalloc's realloc: both arguments moved, then a tail jump (emulated).
        // mov %rsi,%rdx; mov %rdi,%rsi; mov %fs:(%rax),%rax; mov %rax,%rdi; jmp rel32
        let code = [
            &[0x48, 0x89, 0xf2][..],
            &[0x48, 0x89, 0xfe],
            &[0x64, 0x48, 0x8b, 0x00],
            &[0x48, 0x89, 0xc7],
            &[0xe9, 0x10, 0, 0, 0, RET],
        ]
        .concat();
        let (at, cookie) = point(&code, &[0, 1]);
        assert_eq!(at, 13);
        assert_eq!(args::location(cookie, 0), reg::RSI);
        assert_eq!(args::location(cookie, 1), reg::RDX);
        // A 32-bit copy is no copy of a pointer: mov %edi,%esi; xor %edi,%edi; je
        let code = [&[0x89, 0xfe, 0x31, 0xff][..], &JE_REL32, &[RET]].concat();
        assert_eq!(offset(&code, MALLOC), 0);
    }

    #[test]
    fn an_emulated_first_instruction_stays_and_says_so() {
        // push %r12, as glibc's malloc begins; push %rbx; je rel8; call rel32.
        for code in [
            &[0x41, 0x54, RET][..],
            &[0x53, RET],
            &[0x74, 0x02, RET],
            &[0xe8, 0, 0, 0, 0, RET],
        ] {
            let p = choose(
                &[Segment {
                    bytes: code,
                    file_offset: 0,
                }],
                0,
                MALLOC,
            );
            assert_eq!((p.file_offset, p.trap), (0, Trap::Emulated), "{code:x?}");
        }
        // A REX.W push (48 50) is not one the kernel takes.
        let p = choose(
            &[Segment {
                bytes: &[0x48, 0x50, RET],
                file_offset: 0,
            }],
            0,
            MALLOC,
        );
        assert_eq!(p.trap, Trap::SingleStepped);
    }

    #[test]
    fn only_the_arguments_a_program_reads_stop_the_skip() {
        // xor %edi,%edi writes the pointer free would read, not aligned_alloc's size.
        let code = [&[0x31, 0xff][..], &JE_REL32, &[RET]].concat();
        assert_eq!(offset(&code, MALLOC), 0);
        assert_eq!(offset(&code, &[1]), 2);
        // glibc's mmap: mov %ecx,%r10d; test $0xfff,%r9d; jne: it reads the length and flags.
        let code = [
            &[0x41, 0x89, 0xca][..],
            &[0x41, 0xf7, 0xc1, 0xff, 0x0f, 0, 0],
            &[0x75, 0x10, RET],
        ]
        .concat();
        assert_eq!(point(&code, &[1, 3]), (10, 0));
    }

    #[test]
    fn a_write_to_the_stack_pointer_or_memory_stops_the_skip() {
        // sub $0x18,%rsp moves the stack pointer.
        assert_eq!(
            offset(
                &[&[0x48, 0x83, 0xec, 0x18][..], &JE_REL32, &[RET]].concat(),
                &[]
            ),
            0
        );
        // mov %rax,(%rbx) writes memory.
        assert_eq!(
            offset(&[&[0x48, 0x89, 0x03][..], &JE_REL32, &[RET]].concat(), &[]),
            0
        );
        // glibc's munmap: mov $0xb,%eax; syscall.
        assert_eq!(
            offset(
                &[&[0xb8, 0x0b, 0, 0, 0, 0x0f, 0x05][..], &JE_REL32].concat(),
                &[]
            ),
            0
        );
        // test %rdi,%rdi; ret: nothing emulated before the function leaves.
        assert_eq!(offset(&[&TEST_RDI[..], &[RET]].concat(), MALLOC), 0);
    }

    #[test]
    fn a_branch_into_the_skipped_range_keeps_the_entry() {
        // test; je; ret; jmp back to the je (rel8 -9 from 0x0a lands on 0x03).
        let code = [&TEST_RDI[..], &JE_REL32, &[RET, 0xeb, 0xf6]].concat();
        assert_eq!(offset(&code, MALLOC), 0);
        // The same jump to the entry itself is harmless: the entry is not skipped.
        let code = [&TEST_RDI[..], &JE_REL32, &[RET, 0xeb, 0xf3]].concat();
        assert_eq!(offset(&code, MALLOC), 3);
        // A branch in another segment of the module counts too.
        let code = [&TEST_RDI[..], &JE_REL32, &[RET]].concat();
        let other = [0xe9, 0xfe, 0x0f, 0, 0]; // jmp from 0x0 to 0x1003
        let p = choose(
            &[
                Segment {
                    bytes: &other,
                    file_offset: 0,
                },
                Segment {
                    bytes: &code,
                    file_offset: 0x1000,
                },
            ],
            0x1000,
            MALLOC,
        );
        assert_eq!((p.file_offset, p.trap), (0x1000, Trap::SingleStepped));
    }

    #[test]
    fn a_prefixed_branch_or_a_long_prefix_is_not_trusted() {
        // 66-prefixed jcc: the kernel refuses to emulate it.
        let code = [&TEST_RDI[..], &[0x66, 0x0f, 0x84, 0x10, 0], &[RET]].concat();
        assert_eq!(offset(&code, MALLOC), 0);
        // More skippable instructions before the branch than MAX_SKIPPED: too far.
        let code = [&TEST_RDI[..]; MAX_SKIPPED + 1].concat();
        assert_eq!(offset(&[&code[..], &JE_REL32, &[RET]].concat(), MALLOC), 0);
        let code = [&TEST_RDI[..]; MAX_SKIPPED].concat();
        assert_eq!(
            offset(&[&code[..], &JE_REL32, &[RET]].concat(), MALLOC),
            3 * MAX_SKIPPED as u64
        );
    }

    #[test]
    fn glibc_s_malloc_and_free_on_this_machine_are_probed_on_emulated_instructions() {
        let pid = std::process::id();
        let maps = crate::proc::maps::ProcMaps::read(pid).unwrap();
        let allocator = crate::attach::allocator::discover(pid, &maps).unwrap();
        for symbol in ["malloc", "free"] {
            let entry = allocator
                .entry_points
                .iter()
                .find(|e| e.symbol == symbol)
                .expect("glibc's malloc and free");
            let code = entry.file.read_all().unwrap();
            let module = ModuleCode::of_elf(&code);
            let at = module.choose(entry.file_offset, args::read_by(entry.program));
            assert_eq!(entry.probe, at);
            assert_eq!(
                at.trap,
                Trap::Emulated,
                "{symbol} at {:#x}",
                entry.file_offset
            );
            // Whatever the build, the probe point is within the function's first bytes.
            assert!(
                (entry.file_offset..entry.file_offset + 64).contains(&at.file_offset),
                "{symbol} at {:#x}, probed at {:#x}",
                entry.file_offset,
                at.file_offset
            );
        }
    }

    #[test]
    fn malformed_code_keeps_the_entry() {
        assert_eq!(point(&[], MALLOC), (0, 0));
        assert_eq!(offset(&[0x48], MALLOC), 0);
        assert_eq!(offset(&[0x0f, 0x0b], MALLOC), 0); // ud2
        assert_eq!(offset(&TEST_RDI, MALLOC), 0); // code ends before any branch
        // An entry outside every segment.
        let p = choose(
            &[Segment {
                bytes: &[0x74, 0],
                file_offset: 0,
            }],
            0x5000,
            MALLOC,
        );
        assert_eq!((p.file_offset, p.trap), (0x5000, Trap::SingleStepped));
        let p = ModuleCode::of_elf(b"not an ELF file").choose(0x1234, MALLOC);
        assert_eq!((p.file_offset, p.trap), (0x1234, Trap::SingleStepped));
    }
}
