//! What the kernel says about a process, and the one place that asks: its memory map
//! (`/proc/PID/maps`), its files (opened through its own view of them), its status, children
//! and exit; and the clock that BPF timestamps use.

pub mod clock;
pub mod files;
pub mod maps;
pub mod process;
