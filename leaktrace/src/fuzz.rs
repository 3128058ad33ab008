//! Property tests of every parser of bytes leaktrace does not trust, run for a bounded number
//! of cases by `cargo xtask test` (`PROPTEST_CASES`, 256 by default): ring-buffer records
//! (decoded and applied through the unwinder and the heap model), ELF files (an allocator's
//! symbols and code, probe points, call-frame information and the unwinding it drives), the
//! kernel's process events, `/proc` files, `ld.so --list` output, and the JSON reports that
//! `leaktrace diff` reads. Each input is either arbitrary or a valid one mutated (bytes set,
//! words overwritten with edge values, cut short, spliced), which reaches deeper than noise.
//! The property is always the same: no panic, no hang, and a result or an error.

use proptest::{prelude::*, test_runner::Config};

/// proptest's configuration (its `PROPTEST_CASES` variable sets the number of cases), without
/// files of failing cases written into the source tree.
fn config() -> Config {
    Config {
        failure_persistence: None,
        ..Config::default()
    }
}

/// One way to damage an input.
#[derive(Clone, Debug)]
enum Mutation {
    /// Set the byte at this position (modulo the length).
    Byte(usize, u8),
    /// Overwrite 8 bytes at this position with an edge value.
    Word(usize, u64),
    /// Keep this many bytes (modulo the length + 1).
    Cut(usize),
    /// Insert these bytes here.
    Splice(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let edge = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::from(u32::MAX)),
        Just(1 << 63),
        Just(0x7fff_ffff_ffff_f000),
        any::<u64>(),
    ];
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Byte(at, b)),
        3 => (any::<usize>(), edge).prop_map(|(at, w)| Mutation::Word(at, w)),
        1 => any::<usize>().prop_map(Mutation::Cut),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(at, bytes)| Mutation::Splice(at, bytes)),
    ]
}

fn apply(mut data: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = data.len();
        match m {
            Mutation::Byte(at, b) if len > 0 => data[at % len] = *b,
            Mutation::Word(at, w) if len >= 8 => {
                let at = at % (len - 7);
                data[at..at + 8].copy_from_slice(&w.to_le_bytes());
            }
            Mutation::Cut(keep) => data.truncate(keep % (len + 1)),
            Mutation::Splice(at, bytes) => {
                let at = at % (len + 1);
                data.splice(at..at, bytes.iter().copied());
            }
            _ => {}
        }
    }
    data
}

/// `valid` with a few mutations; mutations aimed at `focus` (a range of it) when given.
fn mutated(valid: Vec<u8>, most: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(mutation(), 1..=most).prop_map(move |m| apply(valid.clone(), &m))
}

/// A small real ELF file of this machine, with its call-frame information: libgcc_s (a few
/// hundred KiB; linked into every Rust program).
fn small_elf() -> Vec<u8> {
    let maps = crate::proc::maps::ProcMaps::read(std::process::id()).unwrap();
    let path = maps
        .mappings
        .iter()
        .find(|m| m.file_name().starts_with("libgcc_s"))
        .or_else(|| {
            maps.mappings
                .iter()
                .find(|m| m.file_name().starts_with("libc.so"))
        })
        .expect("libgcc_s or libc mapped")
        .path
        .clone();
    std::fs::read(path).unwrap()
}

/// The part of an ELF file that holds `.eh_frame`, where damage reaches the CFI parser.
fn eh_frame_range(elf: &[u8]) -> std::ops::Range<usize> {
    use object::{Object as _, ObjectSection as _};
    let file = object::File::parse(elf).unwrap();
    let (offset, size) = file
        .section_by_name(".eh_frame")
        .and_then(|s| s.file_range())
        .expect(".eh_frame");
    offset as usize..(offset + size) as usize
}

mod records {
    use leaktrace_common::UserRegs;

    use super::*;
    use crate::{
        intake::{
            decode::{
                decode,
                tests::{alloc_record, alloc_stack_record, call_record, free_record, unmap_record},
                tgid_of, user_stack,
            },
            event_loop::{Process, Scratch, apply},
        },
        model::heap::HeapModel,
        proc::maps::ProcMaps,
        report::{
            render::{Format, Header, Report, Style},
            snapshot::{Moment, Selection, SortKey, snapshot},
            trends::Trends,
        },
        stacks::unwind::Unwinder,
        target::{address_space::AddressSpace, modules::Modules},
    };

    fn valid_record() -> impl Strategy<Value = Vec<u8>> {
        let frames = proptest::collection::vec(any::<u64>(), 0..20);
        prop_oneof![
            (any::<u64>(), any::<u64>(), any::<u64>(), frames.clone())
                .prop_map(|(a, s, o, f)| alloc_record(a, s, o, &f)),
            (
                0u32..16,
                any::<u64>(),
                any::<u64>(),
                any::<(u64, u64)>(),
                frames.clone()
            )
                .prop_map(|(c, a, s, old, f)| call_record(c, a, s, old, &f)),
            any::<u64>().prop_map(free_record),
            (any::<u64>(), any::<u64>()).prop_map(|(a, s)| unmap_record(a, s)),
            (
                any::<u64>(),
                frames,
                any::<(u64, u64, u64)>(),
                proptest::collection::vec(any::<u8>(), 0..512)
            )
                .prop_map(|(a, f, (ip, sp, bp), stack)| {
                    alloc_stack_record(a, &f, UserRegs { ip, sp, bp }, &stack)
                }),
        ]
    }

    fn damaged_record() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..2048),
            valid_record().prop_flat_map(|r| mutated(r, 4)),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        /// Any record decodes or is refused; frames never reach past it.
        #[test]
        fn decoding_never_panics(record in damaged_record()) {
            let _ = tgid_of(&record);
            let _ = user_stack(&record);
            let mut scratch = Vec::new();
            if let Ok(crate::model::event::Event::Alloc { frames, .. }) = decode(&record, &mut scratch) {
                prop_assert!(frames.len() * 8 <= record.len());
            }
        }

        /// A stream of damaged records, applied to the heap model through the unwinder with
        /// this process's own modules (real CFI, garbage stacks), then a snapshot of it.
        #[test]
        fn applying_records_never_panics(records in proptest::collection::vec(damaged_record(), 1..24)) {
            let pid = std::process::id();
            let mut space = AddressSpace::new(pid, ProcMaps::read(pid).unwrap(), Modules::new());
            let mut heap = HeapModel::default();
            let mut unwinder = Unwinder::new(leaktrace_common::DEFAULT_STACK_DEPTH);
            let mut scratch = Scratch::default();
            let own_code = crate::attach::allocator::OwnCode::default();
            for record in &records {
                let process = Process { space: &mut space, python: None, own_code: &own_code };
                let _ = apply(record, &mut heap, process, &mut unwinder, &mut scratch);
            }
            // And reported: the snapshot's sums, trends and every renderer.
            let mut trends = Trends::new(10, 0.5);
            for (i, elapsed_s) in [1.0, 2.0].into_iter().enumerate() {
                let selection = Selection {
                    min_age_ns: 0,
                    sizes: 0..=u64::MAX,
                    top: 100,
                    watch_top: 10,
                    sort: SortKey::Growth,
                    with_freed: true,
                    file_mappings: true,
                    pymalloc_arenas: true,
                };
                let now = Moment {
                    pid,
                    timestamp_ms: 0,
                    elapsed_s,
                    now_ns: u64::MAX,
                    lost_events: 0,
                    unpaired_returns: 0,
                    rss_bytes: None,
                    last: i == 1,
                    gaps: Vec::new(),
                };
                let snap = snapshot(&heap, &mut trends, &selection, &now);
                let header = Header {
                    pid,
                    command: "fuzz".into(),
                    allocator: "glibc".into(),
                    allocator_module: "libc".into(),
                };
                let frames = crate::stacks::symbolize::SymbolizedStacks::from(snap.stacks.iter().map(|_| Vec::new()).collect::<Vec<_>>());
                let report = Report { header: &header, snapshot: &snap, frames: &frames, style: Style::default() };
                for format in [Format::Text, Format::Json, Format::Folded, Format::Pprof, Format::Svg] {
                    let mut out = Vec::new();
                    let _ = format.render(&report, &mut out);
                }
            }
        }
    }
}

mod elf {
    use std::sync::OnceLock;

    use gimli::UnwindContext;

    use super::*;
    use crate::{
        attach::{allocator, probe_point},
        target::cfi::ModuleCfi,
    };

    fn elf() -> &'static [u8] {
        static ELF: OnceLock<Vec<u8>> = OnceLock::new();
        ELF.get_or_init(small_elf)
    }

    /// Damage aimed at `.eh_frame` half of the time, anywhere (headers included) otherwise.
    fn damaged_elf() -> impl Strategy<Value = Vec<u8>> {
        let range = eh_frame_range(elf());
        let aimed =
            proptest::collection::vec((range.clone(), any::<u8>()), 1..16).prop_map(|bytes| {
                let mut data = elf().to_vec();
                for (at, b) in bytes {
                    data[at] = b;
                }
                data
            });
        prop_oneof![aimed, mutated(elf().to_vec(), 6)]
    }

    proptest! {
        #![proptest_config(config())]

        /// Call-frame information parsed from a damaged file, and the rule at any address of
        /// it: a rule or none, never a panic.
        #[test]
        fn cfi_of_a_damaged_file_never_panics(data in damaged_elf(), addresses in proptest::collection::vec(any::<u64>(), 1..32)) {
            if let Ok(module) = ModuleCfi::parse(&*data) {
                let mut ctx = UnwindContext::new();
                for a in addresses {
                    let _ = module.step_at(a, &mut ctx);
                    let _ = module.vaddr_of(a);
                    // Addresses inside the file's code too, where FDEs are.
                    let _ = module.step_at(0x1000 + a % (data.len() as u64 + 1), &mut ctx);
                }
            }
        }

        /// An allocator module read from a damaged file: its symbols, its wrappers' code and
        /// the probe point of each entry point.
        #[test]
        fn an_allocator_from_a_damaged_file_never_panics(data in mutated(elf().to_vec(), 6), entry in any::<u64>()) {
            let _ = allocator::fuzz_resolve(data.clone());
            let _ = probe_point::ModuleCode::of_elf(&data).choose(entry % (data.len() as u64 + 16), &[0, 1]);
        }

        /// Probe points chosen in arbitrary code.
        #[test]
        fn probe_points_in_any_code_never_panic(code in proptest::collection::vec(any::<u8>(), 0..256), file_offset in any::<u64>(), entry in 0u64..300) {
            let segment = probe_point::Segment { bytes: &code, file_offset };
            let at = probe_point::choose(&[segment], file_offset.wrapping_add(entry), &[0, 1, 2]).file_offset;
            prop_assert!(at == file_offset.wrapping_add(entry) || (at > file_offset.wrapping_add(entry) && at - file_offset < code.len() as u64));
        }
    }
}

mod proc_files {
    use super::*;
    use crate::{attach::forks, proc::maps::ProcMaps};

    fn real_maps() -> String {
        std::fs::read_to_string("/proc/self/maps").unwrap()
    }

    proptest! {
        #![proptest_config(config())]

        /// Any text as /proc/PID/maps: parsed or refused; a parsed map finds addresses.
        #[test]
        fn maps_parse_or_are_refused(text in prop_oneof![
            ".{0,400}",
            mutated(real_maps().into_bytes(), 8).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ], addresses in proptest::collection::vec(any::<u64>(), 1..8)) {
            if let Ok(maps) = ProcMaps::parse(&text) {
                for a in addresses {
                    if let Some(m) = maps.find(a) {
                        prop_assert!(m.start <= a && a < m.end);
                    }
                }
            }
        }

        /// /proc/PID/status, `ld.so --list` output: any text.
        #[test]
        fn status_and_loader_listings_never_panic(text in ".{0,300}") {
            let _ = crate::proc::process::parse_vm_rss(&text);
            let _ = crate::attach::spawn::libraries_in_listing(&text);
        }

        /// The kernel's process events, damaged.
        #[test]
        fn process_events_never_panic(datagram in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            mutated(forks::tests::message(1, 7, &[100, 100, 200, 200]), 4),
        ]) {
            let mut out = Vec::new();
            forks::parse(&datagram, &mut out);
            prop_assert!(out.len() <= datagram.len() / 16 + 1);
        }
    }
}

mod diff_input {
    use serde_json::Value;

    use super::*;
    use crate::report::diff::{DiffFormat, Side, render};

    /// Any JSON value, a few levels deep.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("schema".to_owned()),
                        Just("stacks".to_owned()),
                        Just("frames".to_owned()),
                        Just("totals".to_owned()),
                        Just("outstanding_bytes".to_owned()),
                        Just("symbol".to_owned()),
                        ".{0,8}"
                    ],
                    inner,
                    0..8
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A report of `leaktrace --format json` with a damaged value somewhere.
    fn report() -> impl Strategy<Value = String> {
        let valid = r#"{"schema":1,"pid":1,"timestamp_ms":0,"elapsed_s":1.0,"totals":{"outstanding_bytes":4096,"outstanding_allocations":1},"stack_count":2,"stacks":[{"outstanding_bytes":4096,"outstanding_allocations":1,"kind":"leak","origin":"malloc","frames":[{"address":"0x1","symbol":"leak_site","module":"/a","module_offset":"0x1","file":"a.c","line":3}]},{"outstanding_bytes":0,"outstanding_allocations":0,"kind":"stable","frames":[{"module":"/b","module_offset":"0x2"}]}]}"#;
        prop_oneof![
            json().prop_map(|v| v.to_string()),
            mutated(valid.as_bytes().to_vec(), 4)
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        /// Two reports read, and diffed when both are valid: no panic either way, and an
        /// error in one line.
        #[test]
        fn diff_reads_any_report(old in report(), new in report()) {
            let sides = (Side::parse("old", &old), Side::parse("new", &new));
            for side in [&sides.0, &sides.1] {
                if let Err(err) = side {
                    let line = format!("{err:#}");
                    prop_assert!(!line.contains('\n'), "{}", line);
                }
            }
            if let (Ok(old), Ok(new)) = sides {
                let _ = render(&old, &new, DiffFormat::Json, 5);
                let _ = render(&old, &new, DiffFormat::Text, 5);
            }
        }
    }
}
