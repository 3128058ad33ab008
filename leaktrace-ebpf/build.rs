use which::which;

/// Rebuild the BPF object when bpf-linker changes (cargo does not see it as a dependency).
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}): run `cargo xtask setup`"),
    }
}
