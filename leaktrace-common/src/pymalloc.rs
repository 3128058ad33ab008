//! CPython's small-object allocator (pymalloc, Objects/obmalloc.c) as the probes of its
//! inlined fast paths read it. A block of at most 512 bytes lives in a pool of 16 KiB whose
//! header is at the pool's start (`POOL_ADDR(p)`: the block's address with its low 14 bits
//! cleared); the header's `szidx` is the pool's size class, whose blocks have
//! `(szidx + 1) << ALIGNMENT_SHIFT` bytes (`INDEX2SIZE`). The same in 3.11, 3.12 and 3.13 on
//! 64-bit builds (`ALIGNMENT` 16, `POOL_BITS` 14 with the radix tree of `WITH_PYMALLOC_RADIX_TREE`).

/// Bytes of a pool (`POOL_SIZE`).
pub const POOL_BYTES: u64 = 1 << 14;
/// `struct pool_header.szidx`: after `ref` (8), `freeblock`, `nextpool`, `prevpool` (8 each)
/// and `arenaindex` (4).
pub const SZIDX_OFFSET: u64 = 0x24;
/// `ALIGNMENT_SHIFT`: a size class is a multiple of 16 bytes.
pub const ALIGNMENT_SHIFT: u32 = 4;
/// Size classes (`NB_SMALL_SIZE_CLASSES`: 512 / 16).
pub const SIZE_CLASSES: u32 = 32;

/// Bytes of a block of size class `szidx` (`INDEX2SIZE`).
#[inline(always)]
pub const fn block_bytes(szidx: u32) -> u64 {
    ((szidx as u64) + 1) << ALIGNMENT_SHIFT
}

/// Whether `pool` can be the header of the pool that holds `block` and has size class
/// `szidx`: a check against a probe whose registers do not hold what its site was taken for.
#[inline(always)]
pub const fn is_pool_of(pool: u64, block: u64, szidx: u32) -> bool {
    pool & (POOL_BYTES - 1) == 0 && block.wrapping_sub(pool) < POOL_BYTES && szidx < SIZE_CLASSES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_and_pools_as_obmalloc_has_them() {
        assert_eq!(block_bytes(0), 16);
        assert_eq!(block_bytes(31), 512);
        let pool = 0x7f00_0000_c000;
        assert!(is_pool_of(pool, pool + 0x30, 3));
        assert!(!is_pool_of(pool + 8, pool + 0x30, 3));
        assert!(!is_pool_of(pool, pool + POOL_BYTES, 3));
        assert!(!is_pool_of(pool, pool - 16, 3));
        assert!(!is_pool_of(pool, pool + 0x30, 32));
    }
}
