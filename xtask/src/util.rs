//! Running commands with their output shown, and finding the workspace.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs a command, output passed through; fails on non-zero exit.
pub fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout, or None if it failed to run.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

/// Builds ckpt-agent and ckpt-user alone (release), for what ships; returns their
/// directory.
pub fn build_ckpt() -> Result<PathBuf> {
    sh(Command::new("cargo").current_dir(workspace()).args([
        "build",
        "--release",
        "-p",
        "ckpt-user",
        "--bins",
    ]))?;
    Ok(workspace().join("target/release"))
}

/// Builds ckpt-agent, ckpt-user and the test helpers (release); returns their directory.
pub fn build_release() -> Result<PathBuf> {
    sh(Command::new("cargo").current_dir(workspace()).args([
        "build",
        "--release",
        "-p",
        "ckpt-user",
        "-p",
        "ckpt-tests",
        "-p",
        "ckpt-criu-plugin",
    ]))?;
    Ok(workspace().join("target/release"))
}
