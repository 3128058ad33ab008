//! Where an entry program finds the arguments of the call it traces.
//!
//! A probe is often moved past the first instructions of a function, to one the kernel emulates
//! rather than single-steps (user space's `attach::probe_point`). Those instructions may have
//! copied an argument to another register and reused the one the ABI put it in (mimalloc's
//! `malloc` moves the size from `%rdi` to `%rsi` and loads its heap into `%rdi`). The probe's
//! attach cookie then says, per argument, which register holds it at the probe point: 4 bits per
//! argument, argument `n` at bits `4n..4n+4`, holding a [`reg`] number, or 0 for the register
//! the ABI puts it in. A cookie of 0 is a probe at the entry.

/// The registers a cookie can name: the general-purpose registers but `%rsp` (a probe is never
/// moved past a write to it). Numbered from 1; 0 in a cookie is "where the ABI puts it".
pub mod reg {
    pub const RDI: u64 = 1;
    pub const RSI: u64 = 2;
    pub const RDX: u64 = 3;
    pub const RCX: u64 = 4;
    pub const R8: u64 = 5;
    pub const R9: u64 = 6;
    pub const RAX: u64 = 7;
    pub const RBX: u64 = 8;
    pub const RBP: u64 = 9;
    pub const R10: u64 = 10;
    pub const R11: u64 = 11;
    pub const R12: u64 = 12;
    pub const R13: u64 = 13;
    pub const R14: u64 = 14;
    pub const R15: u64 = 15;
}

/// The six integer argument registers of the x86-64 System V ABI, in order, as [`reg`] numbers.
pub const ABI_ARGS: [u64; 6] = [reg::RDI, reg::RSI, reg::RDX, reg::RCX, reg::R8, reg::R9];

/// Bits per argument in a cookie.
const BITS: u32 = 4;

/// Where the cookie of a probe of the session program (`alloc_session`) holds the call it
/// traces there (one of [`call`](crate::call)'s constants), above the arguments' locations.
pub const CALL_SHIFT: u32 = 32;

/// Set in the cookie of a probe of CPython's object or memory allocator (`PyObject_Malloc` and
/// the others): the anonymous mappings a call of it makes or releases itself, with no other
/// allocator call between (pymalloc's arenas), are reported as [`call::ARENA_MMAP`] and
/// `munmap`, not hidden as nested calls are: the objects carved from them are counted one by
/// one, and the arenas are shown apart.
///
/// [`call::ARENA_MMAP`]: crate::call::ARENA_MMAP
pub const PYMALLOC: u64 = 1 << 48;

/// The register (a [`reg`] number) that holds argument `n` (0-based) at a probe with `cookie`.
#[inline(always)]
pub fn location(cookie: u64, n: usize) -> u64 {
    let Some(&abi) = ABI_ARGS.get(n) else {
        return 0;
    };
    match (cookie >> (BITS * n as u32)) & 0xf {
        0 => abi,
        at => at,
    }
}

/// The cookie for arguments held in `locations` (argument `n` in `locations[n]`, a [`reg`]
/// number; at most six). Arguments left where the ABI puts them encode as 0, so a probe at an
/// entry gets the cookie 0.
pub fn cookie(locations: &[u64]) -> u64 {
    (0..)
        .zip(locations.iter().take(ABI_ARGS.len()))
        .map(|(n, &at)| {
            let at = if ABI_ARGS.get(n) == Some(&at) {
                0
            } else {
                at & 0xf
            };
            at << (BITS * n as u32)
        })
        .fold(0, |cookie, bits| cookie | bits)
}

/// The arguments (0-based) that the entry program `program` reads; every entry program also
/// reads `%rsp` (to tell a nested allocator call from a new one). A program this table does not
/// know is taken to read all six. Keep it in step with leaktrace-ebpf's programs: a probe moved
/// past a write to an argument missing here would report a wrong size or address.
pub fn read_by(program: &str) -> &'static [usize] {
    use crate::names::program as p;
    match program {
        p::MALLOC_ENTRY | p::FREE_ENTRY | p::PY_FREE_ENTRY | p::PY_NEW_POOL_ENTRY => &[0],
        p::PY_INLINE_ALLOC => &[0, 1],
        p::PY_INLINE_FREE => &[1],
        p::CALLOC_ENTRY | p::REALLOC_ENTRY | p::MUNMAP_ENTRY | p::XALLOCX_ENTRY => &[0, 1],
        p::REALLOCARRAY_ENTRY => &[0, 1, 2],
        p::POSIX_MEMALIGN_ENTRY => &[0, 2],
        p::ALIGNED_ALLOC_ENTRY => &[1],
        p::MMAP_ENTRY => &[1, 3],
        p::MREMAP_ENTRY => &[0, 1, 2, 3],
        _ => &[0, 1, 2, 3, 4, 5],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cookie_names_each_moved_argument_and_zero_is_the_abi() {
        assert_eq!(cookie(&[]), 0);
        assert_eq!(cookie(&ABI_ARGS), 0);
        for (n, &abi) in ABI_ARGS.iter().enumerate() {
            assert_eq!(location(0, n), abi);
        }
        // mimalloc's malloc: the size in %rsi.
        let c = cookie(&[reg::RSI]);
        assert_eq!(location(c, 0), reg::RSI);
        assert_eq!(location(c, 1), reg::RSI);
        // mimalloc's realloc: the pointer in %rsi, the size in %rdx.
        let c = cookie(&[reg::RSI, reg::RDX]);
        assert_eq!((location(c, 0), location(c, 1)), (reg::RSI, reg::RDX));
        let c = cookie(&[reg::R15, reg::RSI, reg::RDX, reg::RCX, reg::R8, reg::RBX]);
        assert_eq!(location(c, 0), reg::R15);
        assert_eq!(location(c, 5), reg::RBX);
        // Past the sixth argument there is no register.
        assert_eq!(location(u64::MAX, 7), 0);
    }

    #[test]
    fn every_entry_program_says_what_it_reads() {
        use crate::names::program as p;
        for program in p::ALL {
            let read = read_by(program);
            assert!(!read.is_empty() && read.iter().all(|&n| n < 6), "{program}");
        }
        assert_eq!(read_by(p::ALIGNED_ALLOC_ENTRY), &[1]);
    }
}
