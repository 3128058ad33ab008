//! leaktrace's logic as a library: the `leaktrace` binary is a thin CLI over it, and benches
//! (`cargo xtask bench`) drive the heap model, decoding and rendering directly.

pub mod allocator;
pub mod cli;
pub mod diff;
pub mod elf_symbols;
pub mod event;
pub mod heap;
pub mod mappings;
pub mod output;
pub mod probe_point;
pub mod probes;
pub mod proc_maps;
pub mod render;
pub mod report;
pub mod reporter;
pub mod spawn;
pub mod symbolize;
pub mod target;
pub mod trace;
pub mod unwind;
