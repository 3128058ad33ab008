//! Where the kernel keeps a process's uretprobe trampoline address, read from its BTF
//! (/sys/kernel/btf/vmlinux): `current->mm->uprobes_state.xol_area->vaddr`, the first slot of
//! the `[uprobes]` area (`uprobe_get_trampoline_vaddr` in kernel/events/uprobes.c). The BPF
//! programs compare a return slot against it (`is_uprobe_trampoline` in leaktrace-ebpf).
//!
//! Only struct member offsets are needed, so this reads the BTF type section itself: aya-obj
//! 0.3 parses BTF but keeps its members crate-private.

use std::borrow::Cow;

/// A BTF blob that could not be read, or lacks a type or member the path needs.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BtfError {
    #[error("not BTF (bad magic or header)")]
    Header,
    #[error("BTF truncated at byte {0}")]
    Truncated(usize),
    #[error("BTF type kind {0} is unknown")]
    UnknownKind(u32),
    #[error("no struct {0} in the kernel's BTF")]
    NoStruct(String),
    #[error("no member {member} in struct {within}")]
    NoMember { member: String, within: String },
    #[error("member {0} is not at a whole byte")]
    BitField(String),
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// One type: its kind, name and, for a struct or union, its members.
struct Type {
    kind: u32,
    name_offset: u32,
    /// The type it refers to (typedef, const, volatile, ...); 0 when none.
    refers_to: u32,
    members: Vec<Member>,
}

struct Member {
    name_offset: u32,
    type_id: u32,
    offset_bits: u32,
}

/// The types of one BTF blob, by id (id 0 is `void`).
pub struct Types<'a> {
    strings: &'a [u8],
    types: Vec<Type>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .ok_or(BtfError::Truncated(at))
}

impl<'a> Types<'a> {
    /// Parses a little-endian BTF blob (x86-64's).
    pub fn parse(data: &'a [u8]) -> Result<Self, BtfError> {
        let magic = data.get(0..2).ok_or(BtfError::Header)?;
        if u16::from_le_bytes([magic[0], magic[1]]) != MAGIC {
            return Err(BtfError::Header);
        }
        let header_bytes = u32_at(data, 4)? as usize;
        let section = |offset_at: usize, len_at: usize| -> Result<&'a [u8], BtfError> {
            let start = header_bytes
                .checked_add(u32_at(data, offset_at)? as usize)
                .ok_or(BtfError::Header)?;
            let end = start
                .checked_add(u32_at(data, len_at)? as usize)
                .ok_or(BtfError::Header)?;
            data.get(start..end).ok_or(BtfError::Truncated(end))
        };
        let type_section = section(8, 12)?;
        let strings = section(16, 20)?;
        let mut types = vec![Type {
            kind: 0,
            name_offset: 0,
            refers_to: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        while at < type_section.len() {
            let name_offset = u32_at(type_section, at)?;
            let info = u32_at(type_section, at + 4)?;
            let size_or_type = u32_at(type_section, at + 8)?;
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let bitfields = info >> 31 == 1;
            let mut members = Vec::new();
            // The bytes after the common header, per kind (include/uapi/linux/btf.h).
            let extra = match kind {
                // ptr, fwd, typedef, volatile, const, restrict, func, float, type_tag
                2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
                // int, var, decl_tag
                1 | 14 | 17 => 4,
                // array
                3 => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + 12 * i;
                        let raw_offset = u32_at(type_section, m + 8)?;
                        members.push(Member {
                            name_offset: u32_at(type_section, m)?,
                            type_id: u32_at(type_section, m + 4)?,
                            offset_bits: if bitfields {
                                raw_offset & 0x00ff_ffff
                            } else {
                                raw_offset
                            },
                        });
                    }
                    12 * vlen
                }
                // enum, func_proto
                6 | 13 => 8 * vlen,
                // datasec, enum64
                15 | 19 => 12 * vlen,
                other => return Err(BtfError::UnknownKind(other)),
            };
            at += extra;
            if at > type_section.len() {
                return Err(BtfError::Truncated(at));
            }
            let refers_to = if matches!(kind, 8 | 9 | 10 | 11 | 18) {
                size_or_type
            } else {
                0
            };
            types.push(Type {
                kind,
                name_offset,
                refers_to,
                members,
            });
        }
        Ok(Self { strings, types })
    }

    fn name(&self, offset: u32) -> Cow<'a, str> {
        let tail = self.strings.get(offset as usize..).unwrap_or_default();
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        String::from_utf8_lossy(&tail[..end])
    }

    /// The struct or union under typedefs and qualifiers; `None` for any other type.
    fn composite(&self, mut id: u32) -> Option<&Type> {
        // A chain of qualifiers is short; the bound stops a malformed loop.
        for _ in 0..16 {
            let ty = self.types.get(id as usize)?;
            match ty.kind {
                KIND_STRUCT | KIND_UNION => return Some(ty),
                _ if ty.refers_to != 0 => id = ty.refers_to,
                _ => return None,
            }
        }
        None
    }

    /// The member `name` of `ty`, looking into its anonymous structs and unions (`mm_struct`
    /// keeps all its fields in one): its offset in bits from `ty`'s start, and its type.
    fn member(&self, ty: &Type, name: &str, depth: u32) -> Option<(u32, u32)> {
        for member in &ty.members {
            if member.name_offset != 0 {
                if self.name(member.name_offset) == name {
                    return Some((member.offset_bits, member.type_id));
                }
            } else if depth < 8
                && let Some(inner) = self.composite(member.type_id)
                && let Some((offset, type_id)) = self.member(inner, name, depth + 1)
            {
                return Some((member.offset_bits + offset, type_id));
            }
        }
        None
    }

    /// The byte offset of `path` (members, each within the previous one's struct) in
    /// `struct name`.
    pub fn offset_of(&self, name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let mut ty = self
            .types
            .iter()
            .find(|t| {
                t.kind == KIND_STRUCT && !t.members.is_empty() && self.name(t.name_offset) == name
            })
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))?;
        let mut within = name.to_owned();
        let mut bits = 0u32;
        for (i, member) in path.iter().enumerate() {
            let no_member = || BtfError::NoMember {
                member: (*member).to_owned(),
                within: within.clone(),
            };
            let (offset, type_id) = self.member(ty, member, 0).ok_or_else(no_member)?;
            bits = bits.checked_add(offset).ok_or_else(no_member)?;
            if i + 1 < path.len() {
                ty = self.composite(type_id).ok_or_else(no_member)?;
                within = (*member).to_owned();
            }
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::BitField(path.join(".")));
        }
        Ok(bits / 8)
    }
}

/// The byte offsets of `task_struct.mm`, `mm_struct.uprobes_state.xol_area` and
/// `xol_area.vaddr`, which lead from the current task to its trampoline address.
pub fn trampoline_offsets(btf: &[u8]) -> Result<[u32; 3], BtfError> {
    let types = Types::parse(btf)?;
    Ok([
        types.offset_of("task_struct", &["mm"])?,
        types.offset_of("mm_struct", &["uprobes_state", "xol_area"])?,
        types.offset_of("xol_area", &["vaddr"])?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob from its types' bytes and its strings.
    fn blob(types: &[u32], strings: &[u8]) -> Vec<u8> {
        let type_bytes: Vec<u8> = types.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut data = Vec::new();
        data.extend_from_slice(&MAGIC.to_le_bytes());
        data.extend_from_slice(&[1, 0]);
        for word in [
            24,
            0,
            type_bytes.len() as u32,
            type_bytes.len() as u32,
            strings.len() as u32,
        ] {
            data.extend_from_slice(&word.to_le_bytes());
        }
        data.extend_from_slice(&type_bytes);
        data.extend_from_slice(strings);
        data
    }

    const STRUCT: u32 = KIND_STRUCT << 24;

    /// `struct outer { long pad; struct { int x; struct inner in; }; }` and
    /// `struct inner { long a; long b; }`, with a typedef and a const between.
    fn nested() -> Vec<u8> {
        // names: 1 "outer", 7 "inner", 13 "pad", 17 "x", 19 "in", 22 "a", 24 "b", 26 "long"
        let strings = b"\0outer\0inner\0pad\0x\0in\0a\0b\0long\0";
        blob(
            &[
                // 1: long
                26,
                1 << 24,
                8,
                64,
                // 2: struct outer, 2 members
                1,
                STRUCT | 2,
                32,
                13,
                1,
                0,
                0,
                3,
                64,
                // 3: anonymous struct, 2 members
                0,
                STRUCT | 2,
                24,
                17,
                1,
                0,
                19,
                4,
                64,
                // 4: const -> 5: typedef -> 6: struct inner
                0,
                10 << 24,
                5,
                0,
                8 << 24,
                6,
                7,
                STRUCT | 2,
                16,
                22,
                1,
                0,
                24,
                1,
                64,
            ],
            strings,
        )
    }

    #[test]
    fn members_are_found_through_anonymous_structs_typedefs_and_qualifiers() {
        let data = nested();
        let types = Types::parse(&data).unwrap();
        assert_eq!(types.offset_of("outer", &["pad"]), Ok(0));
        assert_eq!(types.offset_of("outer", &["x"]), Ok(8));
        assert_eq!(types.offset_of("outer", &["in", "b"]), Ok(24));
        assert_eq!(
            types.offset_of("outer", &["in", "c"]),
            Err(BtfError::NoMember {
                member: "c".into(),
                within: "in".into()
            })
        );
        assert_eq!(
            types.offset_of("nothing", &["x"]),
            Err(BtfError::NoStruct("nothing".into()))
        );
    }

    #[test]
    fn malformed_blobs_are_errors_not_panics() {
        let data = nested();
        assert_eq!(Types::parse(&[]).err(), Some(BtfError::Header));
        assert_eq!(
            Types::parse(&[0x9f, 0xeb]).err(),
            Some(BtfError::Truncated(4))
        );
        for len in 0..data.len() {
            assert!(Types::parse(&data[..len]).is_err(), "{len}");
        }
        let mut unknown = data.clone();
        // The first type's info word: kind 31.
        unknown[24 + 4..24 + 8].copy_from_slice(&(31u32 << 24).to_le_bytes());
        assert_eq!(
            Types::parse(&unknown).err(),
            Some(BtfError::UnknownKind(31))
        );
        // A member offset past u32 in total, or not at a byte.
        let mut odd = data;
        odd[24 + 16 + 12 + 8..24 + 16 + 12 + 12].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(
            Types::parse(&odd).unwrap().offset_of("outer", &["pad"]),
            Err(BtfError::BitField("pad".into()))
        );
    }

    #[test]
    fn this_kernel_gives_the_trampoline_path() {
        let Ok(btf) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI's kernel has BTF"
            );
            eprintln!("skipped: this kernel has no BTF");
            return;
        };
        let [task_mm, mm_area, area_vaddr] = trampoline_offsets(&btf).unwrap();
        // Whatever the build, none of them is the first field of its struct.
        assert!(task_mm > 0 && mm_area > 0 && area_vaddr > 0);
        assert_eq!(task_mm % 8, 0);
    }
}
