//! Builds the BPF programs (`leaktrace-ebpf`) for `bpfel-unknown-none` and leaves the object in
//! `OUT_DIR`, where `src/probes.rs` embeds it.
//!
//! The BPF target needs `-Z build-std=core`, so a toolchain with the library source of its own
//! version. Two kinds have it: Debian's `rustc-web` + `rust-web-src`, linked into rustup as
//! `debian-web` by `cargo xtask setup` (stable, so unstable flags need `RUSTC_BOOTSTRAP=1`), or
//! a rustup nightly with `rust-src`. Whichever is present is used; `LEAKTRACE_BPF_TOOLCHAIN`
//! overrides the choice.

use std::{path::Path, process::Command};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

const DEBIAN_TOOLCHAIN: &str = "debian-web";

fn has_toolchain(name: &str) -> bool {
    Command::new("rustup")
        .args(["run", name, "rustc", "--version"])
        .output()
        .is_ok_and(|out| out.status.success())
}

fn nightly_has_rust_src() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .is_some_and(|sysroot| {
            Path::new(sysroot.trim())
                .join("lib/rustlib/src/rust/library/core")
                .is_dir()
        })
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=LEAKTRACE_BPF_TOOLCHAIN");
    let chosen = std::env::var("LEAKTRACE_BPF_TOOLCHAIN").ok();
    let toolchain = match chosen.as_deref() {
        Some(name) => name.to_owned(),
        None if has_toolchain(DEBIAN_TOOLCHAIN) => DEBIAN_TOOLCHAIN.to_owned(),
        None if nightly_has_rust_src() => "nightly".to_owned(),
        None => {
            return Err(anyhow!(
                "no toolchain can build the BPF programs: run `cargo xtask setup` \
                 (or install a nightly toolchain with rust-src)"
            ));
        }
    };
    if toolchain != "nightly" {
        // SAFETY: build scripts are single-threaded here; aya-build reads it and its child
        // cargo inherits it, which turns on `-Z build-std=core` for a stable toolchain.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }

    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root_dir = Path::new(&manifest_dir).join("../leaktrace-ebpf");
    let root_dir = root_dir.to_str().context("non-UTF-8 workspace path")?;
    let package = Package {
        name: "leaktrace-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Custom(&toolchain))
        .with_context(|| format!("building the BPF programs with toolchain `{toolchain}`"))
}
