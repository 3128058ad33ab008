//! A protobuf wire-format reader, independent of the encoder leaktrace uses (prost): it
//! decodes any message into its fields, so a test checks the bytes a pprof reader would see.

/// One field of a message.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Varint(u64),
    Fixed64(u64),
    Bytes(Vec<u8>),
    Fixed32(u32),
}

/// The fields of a message, in wire order, as (field number, value).
pub fn fields(mut buf: &[u8]) -> Vec<(u64, Value)> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf);
        let value = match key & 7 {
            0 => Value::Varint(varint(&mut buf)),
            1 => {
                let (v, rest) = buf.split_at(8);
                buf = rest;
                Value::Fixed64(u64::from_le_bytes(v.try_into().unwrap()))
            }
            2 => {
                let len = varint(&mut buf) as usize;
                let (v, rest) = buf.split_at(len);
                buf = rest;
                Value::Bytes(v.to_vec())
            }
            5 => {
                let (v, rest) = buf.split_at(4);
                buf = rest;
                Value::Fixed32(u32::from_le_bytes(v.try_into().unwrap()))
            }
            wire => panic!("wire type {wire} of field {}", key >> 3),
        };
        out.push((key >> 3, value));
    }
    out
}

fn varint(buf: &mut &[u8]) -> u64 {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first().expect("truncated varint");
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return value;
        }
    }
    panic!("varint longer than 10 bytes")
}

/// A message's fields, with helpers to read them.
pub struct Message(pub Vec<(u64, Value)>);

impl Message {
    pub fn parse(buf: &[u8]) -> Self {
        Self(fields(buf))
    }

    /// The last value of a scalar field (proto3: absent means 0).
    pub fn uint(&self, field: u64) -> u64 {
        self.0
            .iter()
            .rev()
            .find(|(f, _)| *f == field)
            .map_or(0, |(_, v)| match v {
                Value::Varint(n) | Value::Fixed64(n) => *n,
                other => panic!("field {field} is {other:?}"),
            })
    }

    /// Every element of a repeated integer field, packed or not.
    pub fn uints(&self, field: u64) -> Vec<u64> {
        let mut out = Vec::new();
        for (_, v) in self.0.iter().filter(|(f, _)| *f == field) {
            match v {
                Value::Varint(n) => out.push(*n),
                Value::Bytes(packed) => {
                    let mut buf = &packed[..];
                    while !buf.is_empty() {
                        out.push(varint(&mut buf));
                    }
                }
                other => panic!("field {field} is {other:?}"),
            }
        }
        out
    }

    /// Every element of a repeated message or string field.
    pub fn bytes(&self, field: u64) -> Vec<&[u8]> {
        self.0
            .iter()
            .filter(|(f, _)| *f == field)
            .map(|(_, v)| match v {
                Value::Bytes(b) => &b[..],
                other => panic!("field {field} is {other:?}"),
            })
            .collect()
    }

    pub fn messages(&self, field: u64) -> Vec<Message> {
        self.bytes(field).into_iter().map(Message::parse).collect()
    }
}

#[test]
fn reads_the_wire_format() {
    // field 1 varint 150; field 2 packed [3, 270]; field 3 string "hi"; field 4 fixed32.
    let buf = [
        0x08, 0x96, 0x01, 0x12, 0x03, 0x03, 0x8e, 0x02, 0x1a, 0x02, b'h', b'i', 0x25, 1, 0, 0, 0,
    ];
    let m = Message::parse(&buf);
    assert_eq!(m.uint(1), 150);
    assert_eq!(m.uints(2), [3, 270]);
    assert_eq!(m.bytes(3), [b"hi"]);
    assert_eq!(m.0[3], (4, Value::Fixed32(1)));
    assert_eq!(m.uint(9), 0);
}
