//! `cargo xtask fuzz [--seconds N] [--recompute-checksum]`: the image fuzz harness's
//! long run (ckpt-user's `fuzz` example, in process, release build). A panicking input
//! is kept by the harness under ckpt-user/fuzz/crashes; an abort (out of memory, stack
//! overflow), which kills the process, is kept here from the harness's scratch file.

use std::{os::unix::process::ExitStatusExt as _, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::util::workspace;

pub fn run(seconds: f64, recompute: bool) -> Result<()> {
    let scratch = std::path::Path::new(if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    })
    .join(format!("ckpt-xtask-fuzz-{}", std::process::id()));
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace())
        .args([
            "run",
            "--release",
            "-p",
            "ckpt-user",
            "--example",
            "fuzz",
            "--",
        ])
        .args(["--seconds", &seconds.to_string()])
        .arg("--scratch")
        .arg(&scratch);
    if recompute {
        cmd.arg("--recompute-checksum");
    }
    let status = cmd.status().context("running the fuzz harness")?;
    if let Some(sig) = status.signal() {
        let current = scratch.join("current.img");
        let bytes = std::fs::read(&current).unwrap_or_default();
        let keep = workspace().join("ckpt-user/fuzz/crashes").join(format!(
            "abort-{}-{}.img",
            sig,
            bytes.len()
        ));
        std::fs::write(&keep, &bytes)?;
        let _ = std::fs::remove_dir_all(&scratch);
        bail!(
            "the fuzz harness was killed by signal {sig}: its last input is kept as {}",
            keep.display()
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if !status.success() {
        bail!("the fuzz harness found panics (inputs kept under ckpt-user/fuzz/crashes)");
    }
    Ok(())
}
