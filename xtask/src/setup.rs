//! Idempotent installation of everything ckpt needs on a fresh Debian machine, one
//! line of output per step. Every other xtask command runs this first.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::util::{is_root, output};

/// Debian packages that building needs: LLVM 22, which bpf-linker is built against
/// (it must match nightly's LLVM).
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
];

/// What the demo runs besides ckpt: sqlite3, and util-linux's flock(1).
const DEMO_PACKAGES: &[&str] = &["sqlite3", "util-linux"];

/// What the test suite drives: stress-ng, sqlite3 and flock(1); tmux (a terminal for
/// `top`); node_exporter (that it accepts the metrics textfile); the filesystems the
/// tests make; CRIU and runc (run in the VMs only: CRIU 3.17.1 does not start on the
/// 6.18 host); and the VM kernel matrix (qemu, busybox, cpio, xz for the kernels' modules).
const TEST_PACKAGES: &[&str] = &[
    "stress-ng",
    "tmux",
    "prometheus-node-exporter",
    "util-linux",
    "sqlite3",
    "e2fsprogs",
    "xfsprogs",
    "btrfs-progs",
    "criu",
    "runc",
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn step(name: &str, msg: &str) {
    println!("setup: {name:<12} {msg}");
}

/// What `cargo xtask bench` compares ckpt with.
const BENCH_PACKAGES: &[&str] = &["bpftrace", "lsof", "fonts-dejavu-core", "curl"];

/// Which command the machine is being set up for: each installs only what it needs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Building ckpt (and what needs nothing else: setup, fuzz).
    Build,
    Demo,
    Test,
    Bench,
}

pub fn run(purpose: Purpose) -> Result<()> {
    let mut packages: Vec<&str> = BUILD_PACKAGES.to_vec();
    match purpose {
        Purpose::Build => {}
        Purpose::Demo => packages.extend(DEMO_PACKAGES),
        Purpose::Test => packages.extend(TEST_PACKAGES),
        Purpose::Bench => packages.extend(TEST_PACKAGES.iter().chain(BENCH_PACKAGES)),
    }
    packages.sort_unstable();
    packages.dedup();
    apt(&packages)?;
    nightly()?;
    bpf_linker()?;
    if purpose == Purpose::Test {
        lint_tools()?;
    }
    Ok(())
}

/// clippy and rustfmt on the default toolchain: the test command checks the code
/// with them first.
fn lint_tools() -> Result<()> {
    let components = output(Command::new("rustup").args(["component", "list", "--installed"]))
        .unwrap_or_default();
    let missing: Vec<&str> = ["clippy", "rustfmt"]
        .into_iter()
        .filter(|c| !components.lines().any(|l| l.starts_with(c)))
        .collect();
    if missing.is_empty() {
        step("lint tools", "clippy and rustfmt present");
        return Ok(());
    }
    step("lint tools", &format!("adding {}", missing.join(" and ")));
    quiet(
        Command::new("rustup")
            .args(["component", "add"])
            .args(&missing),
    )
}

fn installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

/// Runs `cmd` with its output kept; shows the output only if it fails.
fn quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        eprint!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        bail!("{cmd:?} failed ({})", out.status);
    }
    Ok(())
}

/// The packages apt would remove to install `missing` ("Remv NAME [VERSION]" lines
/// of a simulated install).
fn removals(simulation: &str) -> Vec<String> {
    simulation
        .lines()
        .filter_map(|l| l.strip_prefix("Remv "))
        .map(|rest| {
            let mut words = rest.split_whitespace();
            let name = words.next().unwrap_or_default();
            match words.next() {
                Some(v) => format!("{name} {v}"),
                None => name.to_string(),
            }
        })
        .collect()
}

/// Installs whichever of `packages` are missing (apt-get, non-interactive, output
/// shown only on failure). A package apt would remove to do it is named first; it
/// goes ahead only in CI (`CI=true`) or with `CKPT_SETUP_ALLOW_REMOVE=1`.
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
    quiet(Command::new("apt-get").args(["update", "-qq"]))?;
    let install = |simulate: bool| {
        let mut c = Command::new("apt-get");
        c.args(["install", "-y", "-qq", "--no-install-recommends"]);
        if simulate {
            c.arg("-s");
        }
        c.args(&missing).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    let simulation = output(&mut install(true)).unwrap_or_default();
    let removed = removals(&simulation);
    if !removed.is_empty() {
        let list = removed.join(", ");
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        let allowed = std::env::var("CKPT_SETUP_ALLOW_REMOVE").is_ok_and(|v| v == "1");
        if !(ci || allowed) {
            bail!(
                "installing {} would make apt remove {list}; nothing was changed. Install them yourself (apt-get install {}), or run again with CKPT_SETUP_ALLOW_REMOVE=1 to let apt remove them",
                missing.join(" "),
                missing.join(" ")
            );
        }
        step(
            "apt",
            &format!(
                "removing {list}, as apt requires for these packages ({})",
                if ci {
                    "CI=true"
                } else {
                    "CKPT_SETUP_ALLOW_REMOVE=1"
                }
            ),
        );
    }
    quiet(&mut install(false))?;
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
        quiet(Command::new("rustup").args([
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
        quiet(Command::new("rustup").args([
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
    quiet(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", path)
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22"),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removals_are_read_from_a_simulated_install() {
        let sim = "NOTE: This is only a simulation!\nRemv qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1]\nInst cpio (2.13+dfsg-7.1 Debian:12.12/stable [amd64])\nConf cpio (2.13+dfsg-7.1 Debian:12.12/stable [amd64])\n";
        assert_eq!(
            removals(sim),
            vec!["qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1]".to_string()]
        );
        assert!(removals("Inst cpio (2.13)\n").is_empty());
    }
}
