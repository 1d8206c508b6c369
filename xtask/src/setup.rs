//! Idempotent installation of everything ckpt needs on a fresh Debian machine, one
//! line of output per step. Every other xtask command runs this first.

use std::process::Command;

use anyhow::{bail, Result};

use crate::util::{is_root, output, sh};

/// Debian packages: LLVM 22 for building bpf-linker against nightly's LLVM, and the
/// tools the tests and the demo drive (stress-ng, sqlite3, util-linux's flock), and
/// what the VM matrix needs (qemu, busybox, cpio).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "stress-ng",
    "util-linux",
    "sqlite3",
    // Filesystems the tests run on.
    "e2fsprogs",
    "xfsprogs",
    "btrfs-progs",
    // The VM kernel matrix.
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn step(name: &str, msg: &str) {
    println!("setup: {name:<12} {msg}");
}

/// What `cargo xtask bench` compares ckpt with, installed by the bench itself.
pub const BENCH_PACKAGES: &[&str] = &["bpftrace", "lsof", "fonts-dejavu-core"];

pub fn run() -> Result<()> {
    apt(APT_PACKAGES)?;
    nightly()?;
    bpf_linker()?;
    Ok(())
}

fn installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

/// Installs whichever of `packages` are missing (apt-get, non-interactive).
pub fn apt(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        step("apt", "all packages present");
        return Ok(());
    }
    if !is_root() {
        bail!("apt packages missing ({}); run as root", missing.join(" "));
    }
    step("apt", &format!("installing {}", missing.join(" ")));
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

fn nightly() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("nightly", "present");
    } else {
        step(
            "nightly",
            "installing the nightly toolchain (builds the eBPF crate)",
        );
        sh(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if components.lines().any(|l| l.starts_with("rust-src")) {
        step("rust-src", "present");
    } else {
        step("rust-src", "adding rust-src to nightly (-Z build-std=core)");
        sh(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let version = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if version.contains(BPF_LINKER_VERSION) {
        step("bpf-linker", &format!("{BPF_LINKER_VERSION} present"));
        return Ok(());
    }
    step(
        "bpf-linker",
        &format!("building {BPF_LINKER_VERSION} against LLVM 22 (about 3 minutes)"),
    );
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    sh(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("PATH", path)
        .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22"))?;
    Ok(())
}
