//! The layout of the `FP_CODE` array map: the ranges of code known to keep frame pointers,
//! which user space writes and the BPF side searches (`--unwind auto`). Element 0 holds the
//! count, elements `1 + 2i` and `2 + 2i` the start and end of range `i`, sorted by start, at
//! most [`MAX_FP_RANGES`](crate::MAX_FP_RANGES) of them.

/// The element that holds the count of ranges.
pub const COUNT: u32 = 0;

/// The element that holds the start of range `i`.
#[inline(always)]
pub const fn start(i: u32) -> u32 {
    1 + 2 * i
}

/// The element that holds the end of range `i`.
#[inline(always)]
pub const fn end(i: u32) -> u32 {
    2 + 2 * i
}

/// The range among the first `ranges` that holds `pc` (a binary search), reading elements
/// with `get`.
#[inline(always)]
pub fn find(pc: u64, ranges: u32, get: impl Fn(u32) -> Option<u64>) -> Option<(u64, u64)> {
    let (mut lo, mut hi) = (0u32, ranges);
    // log2(MAX_FP_RANGES) + 1 halvings find the last range that starts at or below pc.
    for _ in 0..6 {
        if lo >= hi {
            break;
        }
        let mid = (lo + hi) / 2;
        match get(start(mid)) {
            Some(range_start) if range_start <= pc => lo = mid + 1,
            _ => hi = mid,
        }
    }
    if lo == 0 {
        return None;
    }
    let range_start = get(start(lo - 1))?;
    let range_end = get(end(lo - 1))?;
    (pc < range_end).then_some((range_start, range_end))
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::vec::Vec;

    use super::*;
    use crate::MAX_FP_RANGES;

    /// The map's elements for `ranges`.
    fn elements(ranges: &[(u64, u64)]) -> [u64; 1 + 2 * MAX_FP_RANGES as usize] {
        let mut map = [0; 1 + 2 * MAX_FP_RANGES as usize];
        map[COUNT as usize] = ranges.len() as u64;
        for (i, &(s, e)) in ranges.iter().enumerate() {
            map[start(i as u32) as usize] = s;
            map[end(i as u32) as usize] = e;
        }
        map
    }

    #[test]
    fn finds_the_range_that_holds_a_pc_and_nothing_between_ranges() {
        let ranges: Vec<(u64, u64)> = (0..MAX_FP_RANGES as u64)
            .map(|i| (0x1000 * (2 * i + 1), 0x1000 * (2 * i + 2)))
            .collect();
        for n in [0, 1, 2, 3, 17, MAX_FP_RANGES as usize] {
            let map = elements(&ranges[..n]);
            let get = |i: u32| map.get(i as usize).copied();
            for (i, &(s, e)) in ranges.iter().enumerate() {
                let want = (i < n).then_some((s, e));
                assert_eq!(find(s, n as u32, get), want, "{n} ranges, start of {i}");
                assert_eq!(find(e - 1, n as u32, get), want, "{n} ranges, end of {i}");
                assert_eq!(find(e, n as u32, get), None, "{n} ranges, after {i}");
                assert_eq!(find(s - 1, n as u32, get), None, "{n} ranges, before {i}");
            }
        }
    }

    #[test]
    fn a_map_that_cannot_be_read_finds_nothing() {
        assert_eq!(find(0x1000, 4, |_| None), None);
    }
}
