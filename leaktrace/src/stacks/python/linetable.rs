//! Line numbers from a code object's location table (`co_linetable`), in the format of
//! CPython 3.11 to 3.13: `Objects/locations.md` in CPython's source, decoded as
//! `Objects/codeobject.c` does (`_PyLineTable_InitAddressRange`, `advance`, `get_line_delta`).
//!
//! Each entry starts with a byte whose high bit is set: bits 3..7 are its code, bits 0..3 its
//! length in code units, less one. Codes 0..=9 (short form) and 10..=12 (one line, delta
//! `code - 10`) carry no line change or a small one; 13 (no columns) and 14 (long form) carry
//! the line delta as a signed varint; 15 means the instructions have no line.

/// The line of the instruction at byte offset `offset_bytes` into the code (`lasti` x 2), for
/// a code object whose first line is `first_line`; `None` when the table gives it no line or
/// does not reach it (a damaged or foreign table).
pub fn line_at(table: &[u8], first_line: i32, offset_bytes: u64) -> Option<u32> {
    let mut at = 0usize;
    let mut start = 0u64;
    let mut line = i64::from(first_line);
    while at < table.len() {
        let head = table[at];
        if head & 0x80 == 0 {
            return None;
        }
        let code = (head >> 3) & 15;
        let end = start + 2 * (u64::from(head & 7) + 1);
        let delta = match code {
            13 | 14 => signed_varint(table.get(at + 1..)?)?,
            10..=12 => i64::from(code - 10),
            _ => 0,
        };
        line += delta;
        if start <= offset_bytes && offset_bytes < end {
            return if code == 15 {
                None
            } else {
                u32::try_from(line).ok()
            };
        }
        start = end;
        at += 1;
        while at < table.len() && table[at] & 0x80 == 0 {
            at += 1;
        }
    }
    None
}

/// An unsigned varint of 6-bit chunks, least significant first, bit 6 set on all but the last.
fn varint(bytes: &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 63) << (6 * i);
        if b & 64 == 0 {
            return Some(value);
        }
    }
    None
}

/// A signed varint: the low bit of the unsigned one is the sign.
fn signed_varint(bytes: &[u8]) -> Option<i64> {
    let v = varint(bytes)?;
    let magnitude = i64::try_from(v >> 1).ok()?;
    Some(if v & 1 != 0 { -magnitude } else { magnitude })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(code: u8, units: u8) -> u8 {
        0x80 | (code << 3) | (units - 1)
    }

    #[test]
    fn short_one_line_no_column_long_and_none_forms() {
        let table = [
            // 2 units on the first line (short form: a column byte follows).
            entry(0, 2),
            0x05,
            // 1 unit, one line down (one-line form: two column bytes).
            entry(11, 1),
            3,
            9,
            // 3 units, 5 lines down, no columns: signed varint 10 = +5.
            entry(13, 3),
            10,
            // 1 unit, 2 lines up, long form: -2 = 5, then end line, columns.
            entry(14, 1),
            5,
            0,
            1,
            2,
            // 2 units without a line.
            entry(15, 2),
        ];
        assert_eq!(line_at(&table, 10, 0), Some(10));
        assert_eq!(line_at(&table, 10, 2), Some(10));
        assert_eq!(line_at(&table, 10, 4), Some(11));
        assert_eq!(line_at(&table, 10, 6), Some(16));
        assert_eq!(line_at(&table, 10, 10), Some(16));
        assert_eq!(line_at(&table, 10, 12), Some(14));
        assert_eq!(line_at(&table, 10, 14), None);
        // Past the table's end.
        assert_eq!(line_at(&table, 10, 40), None);
    }

    #[test]
    fn multi_chunk_varints() {
        // +100 lines: 200 = 0b11_001000 -> chunks 8 | 64, 3.
        let table = [entry(13, 1), 8 | 64, 3];
        assert_eq!(line_at(&table, 1, 0), Some(101));
    }

    #[test]
    fn a_table_of_python_itself_decodes() {
        // `def f():\n    x = 1\n    return x` compiled by CPython 3.11: co_firstlineno 1,
        // co_linetable b'\x80\x00\xd8\x08\t\x80A\xd8\x0b\x0c\x80H'.
        let table = b"\x80\x00\xd8\x08\t\x80A\xd8\x0b\x0c\x80H";
        assert_eq!(line_at(table, 1, 0), Some(1)); // RESUME
        assert_eq!(line_at(table, 1, 2), Some(2)); // LOAD_CONST 1
        assert_eq!(line_at(table, 1, 4), Some(2)); // STORE_FAST x
        assert_eq!(line_at(table, 1, 6), Some(3)); // LOAD_FAST x
        assert_eq!(line_at(table, 1, 8), Some(3)); // RETURN_VALUE
    }

    #[test]
    fn malformed_tables_give_no_line_and_never_panic() {
        assert_eq!(line_at(&[], 1, 0), None);
        // A continuation byte where an entry must start.
        assert_eq!(line_at(&[0x05], 1, 0), None);
        // A varint cut short.
        assert_eq!(line_at(&[entry(13, 1)], 1, 0), None);
        assert_eq!(line_at(&[entry(14, 1), 0x40 | 3], 1, 0), None);
        // A line that goes below zero.
        assert_eq!(line_at(&[entry(13, 1), 41], 1, 0), None);
        // Endless varint bytes.
        assert_eq!(
            line_at(
                &[
                    entry(13, 1),
                    0x7f,
                    0x7f,
                    0x7f,
                    0x7f,
                    0x7f,
                    0x7f,
                    0x7f,
                    0x7f,
                    0x7f,
                    0x7f,
                    0x7f
                ],
                1,
                0
            ),
            None
        );
        for n in 0..=255u8 {
            let _ = line_at(&[n, n, n, n], i32::MAX, u64::MAX);
            let _ = line_at(&[n; 3], i32::MIN, 0);
        }
    }
}
