//! Address ranges mapped with mmap/mremap since attach and not unmapped yet.
//!
//! Unlike heap blocks, ranges can be unmapped in part (`munmap` of a mapping's middle leaves
//! two pieces), replaced (`MAP_FIXED` over an existing range), and moved or resized
//! (`mremap`). A mapping stays one allocation, whatever pieces are left of it, until its last
//! page is unmapped.

use std::collections::{BTreeMap, HashMap};

use super::{event::Backing, stack_table::StackId};

/// The kernel unmaps whole pages: `munmap(p, 1)` removes the page at `p`.
const PAGE_BYTES: u64 = 4096;

/// One mmap (or mremap) call's range, or what is left of a piece of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    end: u64,
    mapping: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MapCall {
    stack: StackId,
    ts_ns: u64,
    backing: Backing,
    /// Pieces left of it: the mapping is released when this reaches 0.
    pieces: u32,
}

/// What an unmap did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unmapped {
    /// MappedRanges of which no page is left.
    pub released: u64,
    /// Bytes that were tracked and are now gone.
    pub bytes: u64,
}

#[derive(Debug, Default)]
pub struct MappedRanges {
    /// Pieces by start address; they never overlap.
    pieces: BTreeMap<u64, Piece>,
    mappings: HashMap<u64, MapCall>,
    next_mapping: u64,
}

/// One piece of a mapping, as [`MappedRanges::pieces`] lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PieceUsage {
    /// Identifies the mmap call the piece comes from.
    pub mapping: u64,
    pub size_bytes: u64,
    pub stack: StackId,
    pub ts_ns: u64,
    pub backing: Backing,
}

impl MappedRanges {
    /// `addr..addr + size_bytes` is mapped by a call with `stack`. Whatever was tracked in that
    /// range before is gone (`MAP_FIXED` replaces it); that is returned.
    pub fn map(
        &mut self,
        addr: u64,
        size_bytes: u64,
        stack: StackId,
        ts_ns: u64,
        backing: Backing,
    ) -> Unmapped {
        let replaced = self.unmap(addr, size_bytes, u64::MAX);
        if size_bytes == 0 {
            return replaced;
        }
        let id = self.next_mapping;
        self.next_mapping += 1;
        self.mappings.insert(
            id,
            MapCall {
                stack,
                ts_ns,
                backing,
                pieces: 1,
            },
        );
        self.pieces.insert(
            addr,
            Piece {
                end: addr.saturating_add(size_bytes),
                mapping: id,
            },
        );
        replaced
    }

    /// The backing of the tracked mapping that holds `addr`, if any.
    pub fn backing_at(&self, addr: u64) -> Option<Backing> {
        let (_, piece) = self.pieces.range(..=addr).next_back()?;
        (addr < piece.end).then(|| self.mappings[&piece.mapping].backing)
    }

    /// `munmap(addr, size_bytes)` that began at `released_ns`: removes every tracked byte of the
    /// pages it covers, splitting pieces that stick out on either side. MappedRanges younger than
    /// `released_ns` stay: the range was mapped again (by another thread) after the release
    /// began and before its event, sent at its return, was seen.
    pub fn unmap(&mut self, addr: u64, size_bytes: u64, released_ns: u64) -> Unmapped {
        let mut done = Unmapped::default();
        if size_bytes == 0 {
            return done;
        }
        let start = addr;
        let end = addr
            .saturating_add(size_bytes)
            .checked_next_multiple_of(PAGE_BYTES)
            .unwrap_or(u64::MAX);
        // The piece that starts before `start` may reach into the range; all others that
        // overlap start inside it.
        let first = self
            .pieces
            .range(..start)
            .next_back()
            .filter(|(_, piece)| piece.end > start)
            .map(|(&piece_start, _)| piece_start);
        let overlapping: Vec<u64> = first
            .into_iter()
            .chain(self.pieces.range(start..end).map(|(&s, _)| s))
            .filter(|s| self.mappings[&self.pieces[s].mapping].ts_ns <= released_ns)
            .collect();
        for piece_start in overlapping {
            let piece = self.pieces.remove(&piece_start).expect("listed above");
            let mapping = self
                .mappings
                .get_mut(&piece.mapping)
                .expect("every piece has its mapping");
            mapping.pieces -= 1;
            let mut keep = |from: u64, to: u64, pieces: &mut BTreeMap<u64, Piece>| {
                if from < to {
                    mapping.pieces += 1;
                    pieces.insert(
                        from,
                        Piece {
                            end: to,
                            mapping: piece.mapping,
                        },
                    );
                }
            };
            keep(piece_start, start.min(piece.end), &mut self.pieces);
            keep(end.max(piece_start), piece.end, &mut self.pieces);
            done.bytes += piece.end.min(end) - piece_start.max(start);
            if mapping.pieces == 0 {
                self.mappings.remove(&piece.mapping);
                done.released += 1;
            }
        }
        done
    }

    /// Every piece still mapped, in address order.
    pub fn pieces(&self) -> impl Iterator<Item = PieceUsage> + '_ {
        self.pieces.iter().map(|(&start, piece)| {
            let mapping = &self.mappings[&piece.mapping];
            PieceUsage {
                mapping: piece.mapping,
                size_bytes: piece.end - start,
                stack: mapping.stack,
                ts_ns: mapping.ts_ns,
                backing: mapping.backing,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: StackId = StackId(0);

    fn ranges(m: &MappedRanges) -> Vec<(u64, u64, u64)> {
        m.pieces
            .iter()
            .map(|(&s, p)| (s, p.end, p.mapping))
            .collect()
    }

    #[test]
    fn a_hole_in_the_middle_splits_a_mapping_that_stays_one_allocation() {
        let mut m = MappedRanges::default();
        m.map(0x10000, 0x4000, S, 1, Backing::Anonymous);
        let done = m.unmap(0x11000, 0x1000, u64::MAX);
        assert_eq!(
            done,
            Unmapped {
                released: 0,
                bytes: 0x1000
            }
        );
        assert_eq!(ranges(&m), [(0x10000, 0x11000, 0), (0x12000, 0x14000, 0)]);
        assert_eq!(m.mappings[&0].pieces, 2);
        // The rest goes: head, then tail with a length that is not a page multiple.
        assert_eq!(m.unmap(0x10000, 0x1000, u64::MAX).released, 0);
        assert_eq!(
            m.unmap(0x12000, 0x1001, u64::MAX),
            Unmapped {
                released: 1,
                bytes: 0x2000
            }
        );
        assert!(m.pieces().next().is_none());
        assert!(m.mappings.is_empty());
    }

    #[test]
    fn an_unmap_across_several_mappings_takes_what_it_covers() {
        let mut m = MappedRanges::default();
        m.map(0x10000, 0x2000, S, 1, Backing::Anonymous);
        m.map(0x12000, 0x2000, StackId(1), 2, Backing::File);
        m.map(0x20000, 0x1000, S, 3, Backing::Anonymous);
        let done = m.unmap(0x11000, 0x2000, u64::MAX);
        assert_eq!(
            done,
            Unmapped {
                released: 0,
                bytes: 0x2000
            }
        );
        assert_eq!(
            ranges(&m),
            [
                (0x10000, 0x11000, 0),
                (0x13000, 0x14000, 1),
                (0x20000, 0x21000, 2)
            ]
        );
        assert_eq!(m.backing_at(0x13800), Some(Backing::File));
        assert_eq!(m.backing_at(0x12000), None);
        // A range nobody tracked (mapped before attach) is no error.
        assert_eq!(m.unmap(0x50000, 0x1000, u64::MAX), Unmapped::default());
    }

    #[test]
    fn map_fixed_replaces_what_it_covers() {
        let mut m = MappedRanges::default();
        m.map(0x10000, 0x3000, S, 1, Backing::Anonymous);
        let replaced = m.map(0x10000, 0x3000, StackId(7), 2, Backing::File);
        assert_eq!(
            replaced,
            Unmapped {
                released: 1,
                bytes: 0x3000
            }
        );
        let pieces: Vec<_> = m.pieces().collect();
        assert_eq!(pieces.len(), 1);
        assert_eq!(
            (pieces[0].stack, pieces[0].backing, pieces[0].size_bytes),
            (StackId(7), Backing::File, 0x3000)
        );
    }

    #[test]
    fn odd_lengths_and_address_space_ends_do_not_overflow() {
        let mut m = MappedRanges::default();
        // The mapping is as long as asked; unmapping rounds up to whole pages.
        m.map(0x10000, 100, S, 1, Backing::Anonymous);
        assert_eq!(m.pieces().next().unwrap().size_bytes, 100);
        assert_eq!(m.unmap(0x10000, 1, u64::MAX).bytes, 100);
        m.map(u64::MAX - 0x1000, 0x5000, S, 1, Backing::Anonymous);
        assert_eq!(m.unmap(u64::MAX - 0x1000, u64::MAX, u64::MAX).released, 1);
        assert_eq!(m.unmap(0, 0, u64::MAX), Unmapped::default());
        assert!(m.pieces().next().is_none());
    }
}
