use which::which;

/// Re-run the eBPF build when bpf-linker changes (it is the linker of the bpf target).
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
}
