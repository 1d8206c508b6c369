//! `cargo xtask test`: unit tests, then integration tests against the live kernel.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    util::{build_release, is_root, workspace},
    vm,
};

/// Host packages whose unit tests run without root.
const UNIT_PACKAGES: &[&str] = &["ckpt-common", "ckpt-user", "ckpt-criu-plugin", "xtask"];

#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

/// Runs `cargo test ...`, passing its output through and adding up its
/// "test result:" lines.
fn cargo_test(args: &[&str], envs: &[(&str, String)], tally: &mut Tally) -> Result<bool> {
    let mut child = Command::new("cargo")
        .current_dir(workspace())
        .arg("test")
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |word: &str| -> u64 {
                rest.split(';')
                    .find(|p| p.trim().ends_with(word))
                    .and_then(|p| p.split_whitespace().find_map(|w| w.parse().ok()))
                    .unwrap_or(0)
            };
            tally.passed += num("passed");
            tally.failed += num("failed");
        }
    }
    Ok(child.wait()?.success())
}

/// The code as the workspace keeps it: formatted, and clean of every lint in
/// `[workspace.lints]` and clippy's defaults. A failure is counted, and the tests
/// still run.
fn lint() -> Result<bool> {
    let fmt = Command::new("cargo")
        .current_dir(workspace())
        .args(["fmt", "--all", "--check"])
        .status()
        .context("running cargo fmt")?
        .success();
    let clippy = Command::new("cargo")
        .current_dir(workspace())
        .args(["clippy", "--all-targets", "--", "-D", "warnings"])
        .status()
        .context("running cargo clippy")?
        .success();
    if !fmt {
        println!("lint: cargo fmt --check found unformatted code");
    }
    if !clippy {
        println!("lint: cargo clippy found warnings");
    }
    Ok(fmt && clippy)
}

pub struct Options {
    pub unit_only: bool,
    pub host_only: bool,
    /// Kernel series to run in VMs (all when empty).
    pub kernels: Vec<String>,
    pub filter: String,
    pub vm_timeout: std::time::Duration,
}

pub fn run(opts: &Options) -> Result<()> {
    let unit_only = opts.unit_only;
    let mut tally = Tally::default();
    let mut ok = true;

    println!("== lint (cargo fmt --check, cargo clippy -D warnings)");
    ok &= lint()?;

    println!("== unit tests");
    let mut args = vec!["--release"];
    for p in UNIT_PACKAGES {
        args.extend(["-p", p]);
    }
    ok &= cargo_test(&args, &[], &mut tally)?;

    if !unit_only {
        if !is_root() {
            bail!("integration tests load eBPF programs and need root");
        }
        println!("== integration tests (host kernel)");
        let bins = build_release()?.display().to_string();
        // The package test installs this (host only: the VMs have no dpkg).
        let deb = crate::install::package()?.display().to_string();
        // Every test binary runs even after a failure: the per-kernel line counts all.
        let mut args = vec!["--release", "-p", "ckpt-tests", "--no-fail-fast"];
        if !opts.filter.is_empty() {
            args.extend(["--", opts.filter.as_str()]);
        }
        let host = (tally.passed, tally.failed);
        ok &= cargo_test(
            &args,
            &[("CKPT_BIN_DIR", bins), ("CKPT_DEB", deb)],
            &mut tally,
        )?;
        println!(
            "kernel {} (host): {} passed, {} failed",
            crate::util::output(Command::new("uname").arg("-r"))
                .unwrap_or_default()
                .trim(),
            tally.passed - host.0,
            tally.failed - host.1
        );
        if !opts.host_only {
            ok &= vm_matrix(opts, &mut tally)?;
        }
    }

    println!("{} passed, {} failed", tally.passed, tally.failed);
    if !ok || tally.failed > 0 {
        bail!("tests failed");
    }
    Ok(())
}

/// The integration tests in a VM per kernel of the matrix.
fn vm_matrix(opts: &Options, tally: &mut Tally) -> Result<bool> {
    let specs: Vec<&vm::KernelSpec> = vm::KERNELS
        .iter()
        .filter(|k| opts.kernels.is_empty() || opts.kernels.iter().any(|w| w == k.series))
        .collect();
    if specs.is_empty() {
        bail!(
            "no kernel of the matrix matches {:?} (known: 6.1, 6.12)",
            opts.kernels
        );
    }
    let (bins, tests) = vm::build_static()?;
    let mut prepared = Vec::new();
    for spec in specs {
        let kernel = vm::fetch_kernel(spec)?;
        let initrd = vm::initramfs(&bins, &tests, &kernel)?;
        prepared.push((kernel, initrd));
    }
    let accel = vm::pick_accel(&prepared[0].0, &prepared[0].1)?;
    // The VMs run side by side, one per CPU: under TCG each guest is one host thread
    // (thread=single), so the matrix takes as long as its slowest kernel, not the sum.
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut ok = true;
    for batch in prepared.chunks(cpus) {
        let names: Vec<&str> = batch.iter().map(|(k, _)| k.release.as_str()).collect();
        println!(
            "== integration tests in VMs, side by side ({accel}): kernel {}",
            names.join(", kernel ")
        );
        let runs: Vec<(Result<vm::KernelRun>, std::time::Duration)> = std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .iter()
                .map(|(kernel, initrd)| {
                    s.spawn(move || {
                        let started = std::time::Instant::now();
                        let r =
                            vm::run_kernel(kernel, initrd, accel, &opts.filter, opts.vm_timeout);
                        (r, started.elapsed())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a VM runner thread panicked"))
                .collect()
        });
        for ((kernel, _), (run, took)) in batch.iter().zip(runs) {
            let run = run.with_context(|| format!("running the VM of {}", kernel.release))?;
            print!("{}", run.report);
            tally.passed += run.passed;
            tally.failed += run.failed;
            if !run.complete {
                // A panic, a hang or a missing end marker is a failure, never a pass.
                tally.failed += 1;
                ok = false;
                println!(
                    "kernel {}: the VM did not finish its run (see the console above)",
                    kernel.release
                );
            }
            ok &= run.failed == 0;
            println!(
                "kernel {}: {} passed, {} failed ({:.0} s)",
                kernel.release,
                run.passed,
                run.failed,
                took.as_secs_f64()
            );
        }
    }
    if migration_wanted(&opts.filter) {
        let side = |series: &str| {
            prepared
                .iter()
                .find(|(k, _)| k.release.starts_with(&format!("{series}.")))
        };
        match (side("6.12"), side("6.1")) {
            (Some((from, from_rd)), Some((to, to_rd))) => {
                println!(
                    "== migration ({accel}): dump on kernel {}, restore on kernel {}",
                    from.release, to.release
                );
                let runs = vm::run_migration((from, from_rd), (to, to_rd), accel, opts.vm_timeout)?;
                let sides = runs.len();
                for run in &runs {
                    print!("{}", run.report);
                    tally.passed += run.passed;
                    tally.failed += run.failed;
                    ok &= run.complete && run.failed == 0 && run.passed > 0;
                }
                if sides < 2 || runs.iter().any(|r| !r.complete || r.passed == 0) {
                    // A side that did not run or did not finish is a failure.
                    tally.failed += 1;
                    ok = false;
                    println!("migration: {sides} of 2 sides ran to the end (see above)");
                } else {
                    println!(
                        "migration {} -> {}: both sides passed",
                        from.release, to.release
                    );
                }
            }
            _ => println!("migration: skipped (it needs both kernels of the matrix)"),
        }
    }
    Ok(ok)
}

/// The migration runs with the whole matrix, or when the filter names it.
fn migration_wanted(filter: &str) -> bool {
    filter.is_empty() || filter.starts_with("migrat")
}
