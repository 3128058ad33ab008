//! Reports: a snapshot of the heap model every interval with each stack's trend, symbolized,
//! rendered in the chosen format and written where asked; and `leaktrace diff` of two JSON
//! reports.

pub mod diff;
pub mod output;
pub mod render;
pub mod reporter;
pub mod snapshot;
pub mod trends;
