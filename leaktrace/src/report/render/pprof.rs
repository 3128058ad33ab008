//! `--format pprof`: a gzipped `profile.proto` (github.com/google/pprof, proto/profile.proto)
//! with four sample types per stack: inuse_space/bytes and inuse_objects/count (outstanding
//! now), alloc_space/bytes and alloc_objects/count (everything allocated since attach), and
//! labels: `origin` (malloc, mmap, mmap_file), `kind` and `growth_bytes_per_s` of the stacks
//! that hold memory.
//! `go tool pprof`, Pyroscope and Speedscope read it.
//!
//! The messages are written by hand with prost's derive (field numbers from profile.proto), so
//! the build needs no protoc and no generated code.

use std::{collections::HashMap, io::Write as _};

use prost::Message;

use super::Report;
use crate::stacks::symbolize::Frame;

#[derive(Clone, PartialEq, Message)]
pub struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    /// Leaf first.
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Label {
    #[prost(int64, tag = "1")]
    pub key: i64,
    #[prost(int64, tag = "2")]
    pub str: i64,
    #[prost(int64, tag = "3")]
    pub num: i64,
    #[prost(int64, tag = "4")]
    pub num_unit: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Mapping {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    #[prost(uint64, tag = "4")]
    pub file_offset: u64,
    #[prost(int64, tag = "5")]
    pub filename: i64,
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
    #[prost(bool, tag = "10")]
    pub has_inline_frames: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(uint64, tag = "3")]
    pub address: u64,
    /// Inlined callees first; the last line is the function they were inlined into.
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
}

/// Builds the tables of a profile: strings, functions, mappings and locations, each
/// deduplicated, ids from 1 (0 means "none" in profile.proto).
#[derive(Default)]
struct Builder {
    profile: Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(i64, i64), u64>,
    mappings: HashMap<String, usize>,
    locations: HashMap<u64, u64>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), i);
        i
    }

    fn value_type(&mut self, kind: &str, unit: &str) -> ValueType {
        ValueType {
            r#type: self.string(kind),
            unit: self.string(unit),
        }
    }

    fn function(&mut self, frame: &Frame) -> u64 {
        let name = self.string(&super::folded::name(frame));
        let filename = self.string(frame.file.as_deref().unwrap_or(""));
        let next = self.profile.function.len() as u64 + 1;
        *self.functions.entry((name, filename)).or_insert_with(|| {
            self.profile.function.push(Function {
                id: next,
                name,
                system_name: name,
                filename,
            });
            next
        })
    }

    /// The mapping of `frame`'s module; its start is where the module's file offset 0 sits,
    /// so that address - start + file_offset is the offset in the file.
    fn mapping(&mut self, frame: &Frame) -> u64 {
        let Some(module) = &frame.module else {
            return 0;
        };
        let start = frame.address.saturating_sub(frame.module_offset);
        let index = match self.mappings.get(module) {
            Some(&index) => index,
            None => {
                let filename = self.string(module);
                self.profile.mapping.push(Mapping {
                    id: self.profile.mapping.len() as u64 + 1,
                    memory_start: start,
                    memory_limit: frame.address + 1,
                    filename,
                    ..Mapping::default()
                });
                self.mappings
                    .insert(module.clone(), self.profile.mapping.len() - 1);
                self.profile.mapping.len() - 1
            }
        };
        let mapping = &mut self.profile.mapping[index];
        mapping.memory_start = mapping.memory_start.min(start);
        mapping.memory_limit = mapping.memory_limit.max(frame.address + 1);
        mapping.has_functions |= frame.symbol.is_some();
        mapping.has_filenames |= frame.file.is_some();
        mapping.has_line_numbers |= frame.line.is_some();
        mapping.has_inline_frames |= frame.inlined;
        mapping.id
    }

    /// The location of one return address: its frames (inlined ones first) as lines.
    fn location(&mut self, frames: &[&Frame]) -> u64 {
        let address = frames[0].address;
        if let Some(&id) = self.locations.get(&address) {
            return id;
        }
        let mapping_id = self.mapping(frames[frames.len() - 1]);
        let line = frames
            .iter()
            .filter(|f| f.symbol.is_some())
            .map(|f| Line {
                function_id: self.function(f),
                line: f.line.map_or(0, i64::from),
            })
            .collect();
        let id = self.profile.location.len() as u64 + 1;
        self.profile.location.push(Location {
            id,
            mapping_id,
            address,
            line,
        });
        self.locations.insert(address, id);
        id
    }
}

/// The profile of a report, not yet encoded.
pub fn profile(report: &Report<'_>) -> Profile {
    let mut b = Builder::default();
    b.string("");
    b.profile.sample_type = vec![
        b.value_type("inuse_space", "bytes"),
        b.value_type("inuse_objects", "count"),
        b.value_type("alloc_space", "bytes"),
        b.value_type("alloc_objects", "count"),
    ];
    b.profile.default_sample_type = b.string("inuse_space");
    b.profile.period_type = Some(b.value_type("space", "bytes"));
    b.profile.period = 1;
    let snapshot = report.snapshot;
    b.profile.time_nanos = (snapshot.timestamp_ms as i64).saturating_mul(1_000_000);
    b.profile.duration_nanos = (snapshot.elapsed_s * 1e9) as i64;
    let comment = format!(
        "leaktrace: pid {} ({}), {} allocator",
        report.header.pid, report.header.command, report.header.allocator_module
    );
    b.profile.comment = vec![b.string(&comment)];
    let kind_key = b.string("kind");
    let origin_key = b.string("origin");
    let growth_key = b.string("growth_bytes_per_s");
    let mut frames = Vec::new();
    for (stack, symbolized) in snapshot.stacks.iter().zip(report.frames.iter()) {
        frames.clear();
        frames.extend(symbolized.iter());
        // Frames of one return address are adjacent: inlined ones first, then their caller.
        let location_id = frames
            .chunk_by(|a, b| a.address == b.address)
            .map(|frames| b.location(frames))
            .collect();
        let mut label = vec![Label {
            key: origin_key,
            str: b.string(stack.origin.as_str()),
            ..Label::default()
        }];
        if stack.outstanding_bytes > 0 || stack.outstanding_allocations > 0 {
            label.push(Label {
                key: kind_key,
                str: b.string(stack.kind.as_str()),
                ..Label::default()
            });
            label.push(Label {
                key: growth_key,
                num: stack.growth_bytes_per_s.round() as i64,
                num_unit: b.string("bytes"),
                ..Label::default()
            });
        }
        let v = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        b.profile.sample.push(Sample {
            location_id,
            value: vec![
                v(stack.outstanding_bytes),
                v(stack.outstanding_allocations),
                v(stack.allocated.bytes),
                v(stack.allocated.count),
            ],
            label,
        });
    }
    b.profile
}

/// The gzipped profile.
pub fn render(report: &Report<'_>, out: &mut Vec<u8>) -> std::io::Result<()> {
    let encoded = profile(report).encode_to_vec();
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    gz.write_all(&encoded)?;
    gz.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::render::tests::{frame, report_of};
    use crate::stacks::symbolize::SymbolizedStacks;

    #[test]
    fn tables_are_deduplicated_and_inlined_frames_share_a_location() {
        let mut inlined = frame(1, Some("helper"), "/bin/app");
        inlined.inlined = true;
        let frames = vec![
            vec![
                inlined,
                frame(1, Some("leak"), "/bin/app"),
                frame(2, Some("main"), "/bin/app"),
            ],
            vec![
                frame(3, None, "/lib/libx.so"),
                frame(2, Some("main"), "/bin/app"),
            ],
        ];
        let (header, snapshot) = report_of(&[100, 20]);
        let report = Report {
            header: &header,
            snapshot: &snapshot,
            frames: &SymbolizedStacks::from(frames.clone()),
            style: Default::default(),
        };
        let p = profile(&report);
        assert_eq!(p.string_table[0], "");
        assert_eq!(p.location.len(), 3);
        assert_eq!(p.function.len(), 3);
        assert_eq!(p.mapping.len(), 2);
        assert_eq!(p.sample[0].location_id, [1, 2]);
        assert_eq!(p.sample[1].location_id, [3, 2]);
        assert_eq!(p.sample[0].value, [100, 1, 100, 1]);
        let labels: Vec<(&str, &str, i64)> = p.sample[0]
            .label
            .iter()
            .map(|l| {
                (
                    p.string_table[l.key as usize].as_str(),
                    p.string_table[l.str as usize].as_str(),
                    l.num,
                )
            })
            .collect();
        assert_eq!(
            labels,
            [
                ("origin", "malloc", 0),
                ("kind", "stable", 0),
                ("growth_bytes_per_s", "", 0)
            ]
        );
        let name = |id: u64| &p.string_table[p.function[id as usize - 1].name as usize];
        let lines: Vec<_> = p.location[0]
            .line
            .iter()
            .map(|l| name(l.function_id))
            .collect();
        assert_eq!(lines, ["helper", "leak"]);
        // A frame without a symbol has an address and a mapping, no line.
        assert!(p.location[2].line.is_empty());
        assert_eq!(p.location[2].address, 3);
        let mut out = Vec::new();
        render(&report, &mut out).unwrap();
        assert_eq!(&out[..2], [0x1f, 0x8b], "gzip");
    }
}
