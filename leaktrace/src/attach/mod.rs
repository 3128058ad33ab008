//! Getting hold of the target: the process (running, or spawned and held before `exec`), the
//! allocator it uses, where to probe it, and the BPF programs loaded and attached there.

pub mod allocator;
pub mod bpf_syscall;
pub mod elf_symbols;
pub mod forks;
pub mod kernel_btf;
pub mod multi;
pub mod probe_point;
pub mod probes;
pub mod pymalloc_inline;
pub mod python;
pub mod spawn;
