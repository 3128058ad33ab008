//! `cargo xtask bench-symbolize`: how long a report with 10,000+ distinct stacks takes to
//! symbolize and render (the measurement lives in `leaktrace/examples/symbolize_bench.rs`,
//! which links leaktrace's library; this builds it in release mode and runs it).

use crate::{build_release, require_root, run, setup, step, workspace};

pub fn bench_symbolize(stacks: Option<u64>) -> anyhow::Result<()> {
    setup()?;
    require_root("bench-symbolize (it traces a real process)")?;
    step("building leaktrace and the symbolization bench (release)");
    build_release(&["symbolize_bench"])?;
    let target = workspace().join("target/release");
    step("tracing a generated program with a distinct stack per allocation");
    let mut bench = std::process::Command::new(target.join("examples/symbolize_bench"));
    bench.arg(target.join("leaktrace"));
    if let Some(stacks) = stacks {
        bench.arg(stacks.to_string());
    }
    run(&mut bench)
}
