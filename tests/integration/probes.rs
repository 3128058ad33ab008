//! Where leaktrace probes, checked against the running kernel: each instruction form that
//! `attach::probe_point` takes as emulated is emulated by this kernel, and detaching leaves no
//! breakpoint in the target.

use std::path::Path;

use crate::support::{Fixture, Leaktrace, PlainUprobe, compile, file_offset_of, require_root};
use leaktrace::attach::probe_point::{ModuleCode, Trap};

/// Whether the kernel has single-stepped a probed instruction of `pid`: it maps its page of
/// out-of-line copies ("[uprobes]") into the process the first time it must.
fn single_stepped_in(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .any(|l| l.ends_with("[uprobes]"))
}

#[test]
fn every_form_taken_as_emulated_is_emulated_by_this_kernel() {
    if !require_root() {
        return;
    }
    let binary = compile("probe_forms", &[]);
    let data = std::fs::read(&binary.path).unwrap();
    let code = ModuleCode::of_elf(&data);
    let forms = [
        "form_jcc8",
        "form_jcc32",
        "form_jmp8",
        "form_jmp32",
        "form_call32",
        "form_push_rbx",
        "form_push_r12",
        // The control: a mov is single-stepped, and the check below sees it.
        "form_mov",
    ];
    for form in forms {
        let offset = file_offset_of(&data, form);
        let predicted = code.at_entry(offset).trap;
        assert_eq!(
            predicted == Trap::SingleStepped,
            form == "form_mov",
            "{form}"
        );
        // A process per form: the page of out-of-line copies stays once mapped.
        let mut fixture = Fixture::start(&binary, &[form]);
        let mut probe = PlainUprobe::attach(&binary.path, offset, fixture.pid());
        fixture.round();
        assert_eq!(probe.hits(), 10, "{form}: the probe was hit");
        let stepped = single_stepped_in(fixture.pid());
        assert_eq!(
            stepped,
            predicted == Trap::SingleStepped,
            "{form}: predicted {predicted:?}, the kernel single-stepped: {stepped}"
        );
        drop(probe);
        fixture.finish();
    }
}

/// The bytes of the executable mappings of `module` in process `pid` that differ from the
/// file's: where a probe's breakpoint (0xcc) sits.
fn patched_bytes(pid: u32, module: &Path) -> usize {
    let file = std::fs::read(module).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut differ = 0;
    for line in std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
    {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 || !fields[1].contains('x') || Path::new(fields[5]) != module {
            continue;
        }
        let (start, end) = fields[0].split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let offset = u64::from_str_radix(fields[2], 16).unwrap() as usize;
        let mut text = vec![0u8; (end - start) as usize];
        std::os::unix::fs::FileExt::read_exact_at(&mem, &mut text, start).unwrap();
        let len = text.len().min(file.len().saturating_sub(offset));
        differ += text[..len]
            .iter()
            .zip(&file[offset..offset + len])
            .filter(|(a, b)| a != b)
            .count();
        let _ = &mut mem;
    }
    differ
}

#[test]
fn detaching_leaves_no_breakpoint_in_the_target_s_code() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    let mut fixture = Fixture::start(&binary, &["10", "4096", "100"]);
    let pid = fixture.pid();
    let libc = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .find_map(|l| {
            let path = l.split_whitespace().nth(5)?;
            path.contains("/libc.so").then(|| path.to_owned())
        })
        .expect("the fixture maps glibc");
    let libc = Path::new(&libc);
    assert_eq!(patched_bytes(pid, libc), 0, "no probe before attaching");
    // uprobe_multi links, then one perf-event uprobe per probe (older kernels' way).
    for how in [&[][..], &["--probes-one-at-a-time"]] {
        let trace = Leaktrace::attach(pid, how);
        fixture.round();
        // Every probe is one int3 byte in the code (entry and return probes share a byte).
        let attached = patched_bytes(pid, libc);
        assert!(
            attached >= 10,
            "{how:?}: {attached} bytes patched while attached"
        );
        let outcome = trace.stop();
        assert!(outcome.status.success(), "{:?}", outcome.stderr);
        assert_eq!(
            outcome
                .stderr
                .iter()
                .any(|l| l.starts_with("leaktrace: attaching one probe at a time")),
            !how.is_empty(),
            "{:?}",
            outcome.stderr
        );
        // At the instant leaktrace has exited, every breakpoint is gone.
        assert_eq!(patched_bytes(pid, libc), 0, "{how:?}: {:?}", outcome.stderr);
        fixture.round();
    }
    fixture.finish();
}
