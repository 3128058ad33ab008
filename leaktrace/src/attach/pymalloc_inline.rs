//! CPython's pymalloc where link-time optimization compiled it into its callers.
//!
//! Debian's python3.11 devirtualizes the object allocator's table speculatively
//! (`attach::python::speculated_allocator`) and inlines `pymalloc_alloc` and `pymalloc_free`
//! (Objects/obmalloc.c) at each call: most small objects are made and released without a call
//! that an entry probe could see. Their fast paths keep one shape wherever they land, with
//! registers that differ from place to place:
//!
//! - the pop of a pool's free list (`++pool->ref.count; bp = pool->freeblock;
//!   pool->freeblock = *bp; if (pool->freeblock == NULL) ...`):
//!   `mov 0x8(P),B; addl $1,(P); mov (B),C; mov C,0x8(P); test C,C; jcc`. At the `jcc`, which
//!   the kernel emulates, `B` holds the block and `P` its pool, whose header says the block's
//!   size class. The other way to a block, `allocate_from_new_pool(size_class)`, is a function
//!   of its own, called from each inlined copy: an entry and a return probe see it.
//! - the push onto it (`lastfree = pool->freeblock; *p = lastfree; pool->freeblock = p;
//!   pool->ref.count--; if (lastfree == NULL) ...`):
//!   `mov 0x8(P),X; mov X,(B); ...; mov B,0x8(P); ...; test X,X; jcc`, the block in `B`.
//!
//! Found here by decoding the module's code (a linear sweep), each match checked: nothing
//! between its first instruction and its branch writes the registers the probe reads or
//! branches, and no branch of the module lands in between. The copies inside functions that
//! are probed at their entry already (`PyObject_Malloc`, `PyObject_Free`, ...) are left out:
//! their calls are reported by those probes.

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess,
    OpKind, Register,
};
use leaktrace_common::args;

use super::probe_point::{ModuleCode, Segment, is_emulated, number};

/// Whether the inlined fast paths are probed: `LEAKTRACE_PYMALLOC_INLINE=0` turns it off
/// (undocumented: to compare with the probes of the exported functions alone).
pub fn enabled() -> bool {
    std::env::var_os("LEAKTRACE_PYMALLOC_INLINE").is_none_or(|v| v != "0")
}

/// Instructions from a shape's first to its branch at most (the compiler may schedule others
/// among them).
const MAX_SHAPE: usize = 12;

/// One probe on inlined code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Site {
    /// File offset of the branch probed.
    pub file_offset: u64,
    /// Where the block (argument 0) and its pool (argument 1) are (`args::cookie`).
    pub cookie: u64,
}

/// The inlined fast paths of one module.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sites {
    /// Pops of a free list, probed.
    pub allocs: Vec<Site>,
    /// Pushes onto a free list, probed.
    pub frees: Vec<Site>,
    /// Pops and pushes recognized by their core (the pool's count and free list updated
    /// together), outside the functions probed at their entry: the sites above, and those
    /// whose registers or branches left no place to probe.
    pub alloc_shapes: usize,
    pub free_shapes: usize,
    /// Pushes that pass a probe in `frees`: theirs, or one they jump to.
    pub frees_covered: usize,
    /// `allocate_from_new_pool`'s file offset, called from `PyObject_Malloc`.
    pub new_pool: Option<u64>,
}

impl Sites {
    /// "171 of 171 inlined pymalloc allocations and 52 of 52 releases probed".
    pub fn describe(&self) -> String {
        format!(
            "{} of {} inlined pymalloc allocation sites and {} of {} release sites probed{}",
            self.allocs.len(),
            self.alloc_shapes,
            self.frees_covered,
            self.free_shapes,
            if self.new_pool.is_some() {
                ""
            } else {
                ", allocate_from_new_pool not found"
            }
        )
    }

    /// Whether every inlined fast path found is probed.
    pub fn complete(&self) -> bool {
        self.allocs.len() == self.alloc_shapes
            && self.frees_covered == self.free_shapes
            && self.new_pool.is_some()
            && !self.allocs.is_empty()
    }
}

/// The inlined pymalloc fast paths in `code`, leaving out those within `probed` (file offset
/// ranges of functions probed at their entry), and `allocate_from_new_pool` as called by
/// `PyObject_Malloc`, whose code is at file offsets `malloc`.
pub fn find(code: &ModuleCode<'_>, probed: &[(u64, u64)], malloc: (u64, u64)) -> Sites {
    let mut sites = Sites::default();
    let inside = |at: u64| probed.iter().any(|&(start, end)| start <= at && at < end);
    let mut info = InstructionInfoFactory::new();
    let mut frees = Vec::new();
    let mut jumps = Vec::new();
    for segment in code.segments() {
        let instructions = decode_all(segment);
        for k in 0..instructions.len() {
            if inside(instructions[k].ip()) {
                continue;
            }
            if let Some(core) = alloc_core(&instructions, k) {
                sites.alloc_shapes += 1;
                if let Some((start, site)) = alloc_site(&instructions, core, &mut info)
                    && !code.lands_in(start, site.file_offset)
                {
                    sites.allocs.push(site);
                }
            } else if let Some(core) = free_core(&instructions, k) {
                sites.free_shapes += 1;
                match free_end(&instructions, core, &mut info) {
                    Some(FreeEnd::Site(start, site)) => frees.push((start, site, core.p)),
                    Some(FreeEnd::Jump(target)) => jumps.push((target, core.p)),
                    None => {}
                }
            }
        }
    }
    // A push that jumps into another's tail is probed there, if the pool is in the same
    // register; such a jump is the only branch allowed to land inside a probed push.
    for &(start, site, p) in &frees {
        let merged: Vec<u64> = jumps
            .iter()
            .filter(|&&(target, q)| q == p && start < target && target <= site.file_offset)
            .map(|&(target, _)| target)
            .collect();
        if !code.lands_in_except(start, site.file_offset, &merged) {
            sites.frees.push(site);
            sites.frees_covered += 1 + merged.len();
        }
    }
    sites.allocs.sort_unstable();
    sites.allocs.dedup();
    sites.frees.sort_unstable();
    sites.frees.dedup();
    sites.new_pool = new_pool(code, malloc);
    sites
}

fn decode_all(segment: &Segment<'_>) -> Vec<Instruction> {
    let mut decoder =
        Decoder::with_ip(64, segment.bytes, segment.file_offset, DecoderOptions::NONE);
    let mut all = Vec::with_capacity(segment.bytes.len() / 4);
    while decoder.can_decode() {
        all.push(decoder.decode());
    }
    all
}

/// `[base + displacement]` with no index and no segment, if `i`'s operand `n` is that.
fn memory(i: &Instruction, n: u32) -> Option<(Register, i64)> {
    (i.op_kind(n) == OpKind::Memory
        && i.memory_index() == Register::None
        && i.memory_base().is_gpr64()
        && i.segment_prefix() == Register::None)
        .then(|| (i.memory_base(), i.memory_displacement64() as i64))
}

/// `mov reg, [base + disp]`: (reg, base, disp).
fn load(i: &Instruction) -> Option<(Register, Register, i64)> {
    (i.code() == Code::Mov_r64_rm64)
        .then(|| memory(i, 1).map(|(base, disp)| (i.op0_register(), base, disp)))
        .flatten()
}

/// `mov [base + disp], reg`: (base, disp, reg).
fn store(i: &Instruction) -> Option<(Register, i64, Register)> {
    (i.code() == Code::Mov_rm64_r64 && i.op1_kind() == OpKind::Register)
        .then(|| memory(i, 0).map(|(base, disp)| (base, disp, i.op1_register())))
        .flatten()
}

/// `++pool->ref.count`: `addl $1, (P)` or `incl (P)`, giving `P`.
fn count_up(i: &Instruction) -> Option<Register> {
    let one = match i.code() {
        Code::Add_rm32_imm8 | Code::Add_rm32_imm32 => i.immediate32() == 1,
        Code::Inc_rm32 => true,
        _ => false,
    };
    memory(i, 0)
        .filter(|&(_, disp)| one && disp == 0)
        .map(|(p, _)| p)
}

fn test_self(i: &Instruction, r: Register) -> bool {
    i.code() == Code::Test_rm64_r64
        && i.op0_kind() == OpKind::Register
        && i.op0_register() == r
        && i.op1_register() == r
}

/// The core of a pop at `k`, the count's increment: the index of the load of the free list
/// from the same pool (`mov 0x8(P),B`) within three instructions of it, and `P` and `B`.
fn alloc_core(all: &[Instruction], k: usize) -> Option<(usize, Register, Register)> {
    let p = count_up(&all[k])?;
    let near = k.saturating_sub(3)..(k + 4).min(all.len());
    near.filter(|&j| j != k).find_map(|j| {
        let (b, base, disp) = load(&all[j])?;
        (base == p && disp == 8 && b != p).then_some((j, p, b))
    })
}

/// Whether `i` writes one of `registers` (any part of it), or memory it might alias is
/// irrelevant: the probe reads registers only.
fn writes_any(i: &Instruction, info: &mut InstructionInfoFactory, registers: &[Register]) -> bool {
    info.info(i).used_registers().iter().any(|used| {
        !matches!(
            used.access(),
            OpAccess::None | OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess
        ) && registers.contains(&used.register().full_register())
    })
}

/// From a pop's core: the branch after `test C,C`, with the file offset of the shape's first
/// instruction, when the block and pool registers hold from the load to the branch.
fn alloc_site(
    all: &[Instruction],
    (first, p, b): (usize, Register, Register),
    info: &mut InstructionInfoFactory,
) -> Option<(u64, Site)> {
    let start = first.saturating_sub(3);
    // The increment may come before the load: its index is where the shape starts then.
    let start = (start..first)
        .rev()
        .find(|&j| count_up(&all[j]) == Some(p))
        .unwrap_or(first);
    let mut c = None;
    let mut stored = false;
    let mut tested = false;
    for k in start..(start + MAX_SHAPE).min(all.len()) {
        let i = &all[k];
        if k == first || count_up(i) == Some(p) {
            continue;
        }
        if tested {
            if i.flow_control() != FlowControl::ConditionalBranch || !is_emulated(i) {
                return None;
            }
            let cookie = args::cookie(&[number(b)?, number(p)?]);
            return Some((
                all[start].ip(),
                Site {
                    file_offset: i.ip(),
                    cookie,
                },
            ));
        }
        if k > first
            && c.is_none()
            && let Some((to, base, 0)) = load(i)
            && base == b
            && to != p
            && to != b
        {
            c = Some(to);
            continue;
        }
        if let Some(c) = c {
            if !stored && store(i) == Some((p, 8, c)) {
                stored = true;
                continue;
            }
            if stored && test_self(i, c) {
                tested = true;
                continue;
            }
        }
        if i.flow_control() != FlowControl::Next || writes_any(i, info, &[p, b]) {
            return None;
        }
        if c.is_some_and(|c| writes_any(i, info, &[c])) {
            return None;
        }
    }
    None
}

/// The core of a push at `k`, the store of the block as the pool's free list
/// (`mov B,0x8(P)`), preceded within three instructions by the link of the block to the old
/// list (`mov X,(B)`), itself preceded by the load of that list (`mov 0x8(P),X`): the index of
/// the load, `k`, `P` and `X`.
fn free_core(all: &[Instruction], k: usize) -> Option<FreeCore> {
    let (p, disp, b) = store(&all[k])?;
    if disp != 8 || b == p {
        return None;
    }
    let (link, x) = (k.saturating_sub(3)..k).rev().find_map(|j| {
        let (base, disp, x) = store(&all[j])?;
        (base == b && disp == 0 && x != p && x != b).then_some((j, x))
    })?;
    let load = (link.saturating_sub(3)..link)
        .rev()
        .find(|&j| load(&all[j]) == Some((x, p, 8)))?;
    Some(FreeCore {
        load,
        store: k,
        p,
        x,
    })
}

#[derive(Clone, Copy)]
struct FreeCore {
    load: usize,
    store: usize,
    p: Register,
    x: Register,
}

/// Where a push's core leads, with the pool's register intact and its free list (the block
/// just pushed) untouched.
enum FreeEnd {
    /// The branch after `test X,X`: the site, with the file offset of the load.
    Site(u64, Site),
    /// A jump (into another copy of the same push, where the compiler merged their tails).
    Jump(u64),
}

fn free_end(
    all: &[Instruction],
    core: FreeCore,
    info: &mut InstructionInfoFactory,
) -> Option<FreeEnd> {
    let FreeCore {
        load,
        store: at,
        p,
        x,
    } = core;
    let mut tested = false;
    for k in load + 1..(load + MAX_SHAPE).min(all.len()) {
        let i = &all[k];
        if tested {
            if i.flow_control() != FlowControl::ConditionalBranch || !is_emulated(i) {
                return None;
            }
            // Argument 0 is not read: the block is read from the pool's free list.
            let cookie = args::cookie(&[args::ABI_ARGS[0], number(p)?]);
            return Some(FreeEnd::Site(
                all[load].ip(),
                Site {
                    file_offset: i.ip(),
                    cookie,
                },
            ));
        }
        if k > at && test_self(i, x) {
            tested = true;
            continue;
        }
        if k > at && matches!(i.code(), Code::Jmp_rel8_64 | Code::Jmp_rel32_64) {
            return Some(FreeEnd::Jump(i.near_branch64()));
        }
        if i.flow_control() != FlowControl::Next || writes_any(i, info, &[p, x]) {
            return None;
        }
        // Nothing else writes the free list (a store to it with the pool's register).
        if k > at && memory(i, 0).is_some_and(|(base, disp)| base == p && disp == 8) {
            return None;
        }
    }
    None
}

/// The first function that `PyObject_Malloc` (file offsets `start..end`) calls directly,
/// other than an import's stub: `allocate_from_new_pool`, called when no pool of the size
/// class has a free block (`pymalloc_alloc`, inlined there); the next call is `malloc`'s.
fn new_pool(code: &ModuleCode<'_>, (start, end): (u64, u64)) -> Option<u64> {
    let segment = code
        .segments()
        .iter()
        .find(|s| s.file_offset <= start && end <= s.file_offset + s.bytes.len() as u64)?;
    let at = |offset: u64| usize::try_from(offset - segment.file_offset).ok();
    let mut decoder = Decoder::with_ip(
        64,
        segment.bytes.get(at(start)?..at(end)?)?,
        start,
        DecoderOptions::NONE,
    );
    while decoder.can_decode() {
        let i = decoder.decode();
        if i.code() != Code::Call_rel32_64 {
            continue;
        }
        let target = i.near_branch64();
        let bytes = segment.bytes.get(at(target)?..)?;
        let mut callee = Decoder::with_ip(64, bytes, target, DecoderOptions::NONE);
        let mut first = callee.decode();
        if first.code() == Code::Endbr64 {
            first = callee.decode();
        }
        // A PLT stub jumps through its GOT slot.
        if first.flow_control() == FlowControl::IndirectBranch {
            return None;
        }
        return Some(target);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sites_of(code: &[u8]) -> Sites {
        let module = ModuleCode::new(vec![Segment {
            bytes: code,
            file_offset: 0x1000,
        }]);
        find(&module, &[], (0, 0))
    }

    /// PyObject_Malloc's inlined pop in Debian's 3.11 (P = %rdx, B = %rax, C = %rcx).
    const POP: [u8; 19] = [
        0x48, 0x8b, 0x42, 0x08, // mov 0x8(%rdx),%rax
        0x83, 0x02, 0x01, // addl $0x1,(%rdx)
        0x48, 0x8b, 0x08, // mov (%rax),%rcx
        0x48, 0x89, 0x4a, 0x08, // mov %rcx,0x8(%rdx)
        0x48, 0x85, 0xc9, // test %rcx,%rcx
        0x74, 0x08, // je
    ];

    /// PyObject_Free's inlined push (P = %rsi, B = %rdi, X = %rdx, count in %eax).
    const PUSH: [u8; 23] = [
        0x48, 0x8b, 0x56, 0x08, // mov 0x8(%rsi),%rdx
        0x48, 0x89, 0x17, // mov %rdx,(%rdi)
        0x8b, 0x06, // mov (%rsi),%eax
        0x48, 0x89, 0x7e, 0x08, // mov %rdi,0x8(%rsi)
        0x83, 0xe8, 0x01, // sub $0x1,%eax
        0x89, 0x06, // mov %eax,(%rsi)
        0x48, 0x85, 0xd2, // test %rdx,%rdx
        0x74, 0x0a, // je
    ];

    #[test]
    fn a_pop_and_a_push_are_probed_at_their_branch_with_their_registers() {
        use leaktrace_common::args::{location, reg};
        let sites = sites_of(&POP);
        assert_eq!((sites.alloc_shapes, sites.free_shapes), (1, 0));
        assert_eq!(sites.allocs.len(), 1);
        let site = sites.allocs[0];
        assert_eq!(site.file_offset, 0x1000 + 17);
        assert_eq!(location(site.cookie, 0), reg::RAX);
        assert_eq!(location(site.cookie, 1), reg::RDX);

        let sites = sites_of(&PUSH);
        assert_eq!((sites.alloc_shapes, sites.free_shapes), (0, 1));
        let site = sites.frees[0];
        assert_eq!(site.file_offset, 0x1000 + 21);
        assert_eq!(location(site.cookie, 0), reg::RDI);
        assert_eq!(location(site.cookie, 1), reg::RSI);
    }

    #[test]
    fn a_shape_whose_registers_are_overwritten_is_counted_not_probed() {
        // The block's register overwritten before the branch: `xor %eax,%eax` before the test.
        let mut pop = POP[..14].to_vec();
        pop.extend([0x31, 0xc0, 0x48, 0x85, 0xc9, 0x74, 0x08]);
        let sites = sites_of(&pop);
        assert_eq!((sites.alloc_shapes, sites.allocs.len()), (1, 0));
        assert!(!sites.complete());
        // A branch that the kernel does not emulate (an operand-size prefix).
        let mut push = PUSH[..21].to_vec();
        push.extend([0x66, 0x0f, 0x84, 0, 0]);
        let sites = sites_of(&push);
        assert_eq!((sites.free_shapes, sites.frees.len()), (1, 0));
    }

    #[test]
    fn garbage_never_panics() {
        for garbage in [&[][..], &[0x48], &[0xff; 64], &POP[..10], &PUSH[3..]] {
            let _ = sites_of(garbage);
        }
    }

    /// Debian's python3.11: the shapes the lead counted in its disassembly (171 pops, 52
    /// compares with `_PyObject_Free` before an inlined push).
    #[test]
    fn debian_s_python3_11_has_its_inlined_fast_paths_probed() {
        let Ok(data) = std::fs::read("/usr/bin/python3.11") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "/usr/bin/python3.11 is missing: `cargo xtask setup` installs it"
            );
            return;
        };
        use object::{Object as _, ObjectSymbol as _};
        let elf = object::File::parse(&*data).unwrap();
        // An executable (not position-independent): its text's file offsets are its
        // addresses less 0x400000.
        let range = |name: &str| {
            let s = elf
                .dynamic_symbols()
                .find(|s| s.name() == Ok(name))
                .unwrap();
            (s.address() - 0x40_0000, s.address() - 0x40_0000 + s.size())
        };
        let code = ModuleCode::of_elf(&data);
        let all = find(&code, &[], range("PyObject_Malloc"));
        eprintln!("{}", all.describe());
        assert!(all.complete(), "{}", all.describe());
        assert!(all.allocs.len() >= 150, "{}", all.describe());
        assert!(all.frees.len() >= 40, "{}", all.describe());
        assert_eq!(all.new_pool, Some(0x4f_b540 - 0x40_0000));
        // Those in the functions probed at their entry are left out, and counted nowhere.
        let probed: Vec<(u64, u64)> = crate::attach::python::ENTRY_POINTS
            .iter()
            .map(|&(name, _)| range(name))
            .collect();
        let outside = find(&code, &probed, range("PyObject_Malloc"));
        eprintln!("{}", outside.describe());
        assert!(outside.complete(), "{}", outside.describe());
        assert!(outside.allocs.len() < all.allocs.len());
        assert!(outside.frees.len() < all.frees.len());
    }
}
