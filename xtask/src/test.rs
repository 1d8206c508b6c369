//! `cargo xtask test`: unit tests, then integration tests against the live kernel.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{is_root, sh, workspace};

/// Host packages whose unit tests run without root.
const UNIT_PACKAGES: &[&str] = &["ckpt-common", "ckpt-user", "xtask"];

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

pub fn run(unit_only: bool) -> Result<()> {
    let mut tally = Tally::default();
    let mut ok = true;

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
        sh(Command::new("cargo").current_dir(workspace()).args([
            "build",
            "--release",
            "-p",
            "ckpt-user",
            "-p",
            "ckpt-tests",
        ]))?;
        let bins = workspace().join("target/release").display().to_string();
        ok &= cargo_test(
            &["--release", "-p", "ckpt-tests"],
            &[("CKPT_BIN_DIR", bins)],
            &mut tally,
        )?;
    }

    println!("{} passed, {} failed", tally.passed, tally.failed);
    if !ok || tally.failed > 0 {
        bail!("tests failed");
    }
    Ok(())
}
