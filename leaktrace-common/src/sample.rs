//! `--sample-bytes N`: the draw of a block, shared by the BPF side (which draws) and its host
//! tests.

/// Whether a block of `size_bytes` is drawn, given a uniform 32-bit random number: with
/// probability `min(1, max(size, 1) / sample_bytes)`. For `size < sample_bytes < 2^32`,
/// `P(r * N < size << 32) = size / N`; `sample_bytes` is at most
/// [`MAX_SAMPLE_BYTES`](crate::MAX_SAMPLE_BYTES), so the product never overflows.
#[inline(always)]
pub fn is_drawn(size_bytes: u64, sample_bytes: u64, random: u32) -> bool {
    let size = size_bytes.max(1);
    size >= sample_bytes || u64::from(random) * sample_bytes < size << 32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MAX_SAMPLE_BYTES;

    #[test]
    fn a_block_is_drawn_with_probability_size_over_n() {
        // Blocks of at least N bytes always, malloc(0) as a block of 1 byte.
        assert!(is_drawn(4096, 4096, u32::MAX));
        assert!(is_drawn(1 << 20, 4096, u32::MAX));
        // 1024 of 4096: drawn for exactly the quarter of random numbers below 2^30.
        assert!(is_drawn(1024, 4096, (1 << 30) - 1));
        assert!(!is_drawn(1024, 4096, 1 << 30));
        assert!(is_drawn(0, 2, (1 << 31) - 1));
        assert!(!is_drawn(0, 2, 1 << 31));
        // Counted over a grid of random numbers: exactly size / N of them draw.
        let drawn = (0..1u64 << 16)
            .filter(|r| is_drawn(100, 1000, (r << 16) as u32))
            .count();
        assert_eq!(drawn, ((1u64 << 16) * 100).div_ceil(1000) as usize);
        // The largest N does not overflow.
        assert!(!is_drawn(1, MAX_SAMPLE_BYTES, u32::MAX));
        assert!(is_drawn(1, MAX_SAMPLE_BYTES, 0));
    }
}
