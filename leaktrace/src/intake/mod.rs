//! Events in: ring buffer records decoded, their stack copies unwound, and applied to the heap
//! model of their process, in the event loop that also takes a snapshot every interval.

pub mod decode;
pub mod event_loop;
