//! What the user asked for: the command line.

pub mod cli;
