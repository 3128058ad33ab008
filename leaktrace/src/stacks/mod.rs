//! Call stacks made readable: copied user stacks unwound with call-frame information (on the
//! event path), return addresses symbolized to functions, files and lines (on the reporter's
//! thread).

pub mod python;
pub mod symbolize;
pub mod unwind;
