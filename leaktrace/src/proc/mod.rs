//! What the kernel says about a process: its memory map (`/proc/PID/maps`), and the clock that
//! BPF timestamps use.

pub mod clock;
pub mod maps;
