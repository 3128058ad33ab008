//! leaktrace's own standard streams, which whoever started it may have closed (`2>&-`) or
//! whose reader may go away (`2>&1 | head`): messages must never fail the trace. (Descriptors
//! 0-2 closed at start-up are opened on /dev/null by Rust's runtime before `main`, so no file
//! leaktrace opens takes their number.)

/// `eprintln!` that never panics: a message to a closed or broken stderr is dropped, as the
/// trace must go on (and end cleanly) whether anyone reads its messages or not.
#[macro_export]
macro_rules! status {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stderr(), $($arg)*);
    }};
}
