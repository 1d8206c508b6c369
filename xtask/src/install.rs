//! `cargo xtask install` and `cargo xtask package`: the release binaries, a systemd
//! unit for ckpt-agent, man pages and shell completions, laid out under a prefix; as
//! files in place, or as a Debian package built with dpkg-deb from the same layout.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::util::{output, sh, workspace};

/// The systemd unit, with `@BIN@` for the directory of the binaries. Type=notify:
/// ckpt-agent says READY=1 once its programs are attached and its maps pinned, so
/// units ordered after it find them. Its pins survive a stop (a restart loses
/// nothing but history); `ckpt-agent --unpin` is the way to stop tracing for good.
const UNIT: &str = "[Unit]
Description=ckpt agent: records the lock waits and lease breaks the kernel forgets
Documentation=man:ckpt-agent(1) man:ckpt-user(1)
After=local-fs.target

[Service]
Type=notify
ExecStart=@BIN@/ckpt-agent
Restart=on-failure
RestartSec=2s

[Install]
WantedBy=multi-user.target
";

/// Builds the release binaries and lays out everything under `root`/`prefix`: the
/// binaries in bin/, docs in share/, and the unit in lib/systemd/system for /usr,
/// etc/systemd/system otherwise (where a local administrator's units go).
/// Returns the files written, relative to `root`.
pub fn stage(root: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
    if !prefix.starts_with('/') {
        bail!("--prefix {prefix}: not an absolute path");
    }
    // Only what ships: not the test helpers.
    let bins = crate::util::build_ckpt()?;
    let under = |rel: &str| root.join(prefix.trim_start_matches('/')).join(rel);
    let bin_dir = under("bin");
    std::fs::create_dir_all(&bin_dir)?;
    for b in ["ckpt-user", "ckpt-agent"] {
        let to = bin_dir.join(b);
        std::fs::copy(bins.join(b), &to)
            .with_context(|| format!("copying {b} to {}", to.display()))?;
    }
    let share = under("share");
    sh(Command::new(bins.join("ckpt-user"))
        .arg("__docs")
        .arg(&share))?;
    // Man pages compressed, as Debian ships them.
    for e in std::fs::read_dir(share.join("man/man1"))?.flatten() {
        if e.path().extension().is_some_and(|x| x == "1") {
            sh(Command::new("gzip").args(["-9nf"]).arg(e.path()))?;
        }
    }
    let unit_dir = if prefix == "/usr" {
        root.join("lib/systemd/system")
    } else {
        root.join("etc/systemd/system")
    };
    std::fs::create_dir_all(&unit_dir)?;
    let bin_path = Path::new(prefix).join("bin");
    std::fs::write(
        unit_dir.join("ckpt-agent.service"),
        UNIT.replace("@BIN@", &bin_path.display().to_string()),
    )?;
    let mut files = Vec::new();
    collect(root, root, &mut files)?;
    files.sort();
    Ok(files)
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        let p = e.path();
        if e.file_type()?.is_dir() {
            collect(root, &p, out)?;
        } else {
            out.push(p.strip_prefix(root)?.to_path_buf());
        }
    }
    Ok(())
}

/// `cargo xtask install`: stages into a scratch directory, then copies into
/// `destdir` (default /), so a failed build installs nothing.
pub fn install(prefix: &str, destdir: &Path) -> Result<()> {
    let scratch = workspace().join("target/install-stage");
    let _ = std::fs::remove_dir_all(&scratch);
    let files = stage(&scratch, prefix)?;
    for rel in &files {
        let to = destdir.join(rel);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::copy(scratch.join(rel), &to)
            .with_context(|| format!("installing {}", to.display()))?;
        println!("install: {}", to.display());
    }
    let unit = files
        .iter()
        .find(|f| f.ends_with("ckpt-agent.service"))
        .map(|f| destdir.join(f).display().to_string())
        .unwrap_or_default();
    println!(
        "install: done; to run the agent: systemctl daemon-reload && systemctl enable --now ckpt-agent ({unit})"
    );
    Ok(())
}

/// `cargo xtask install-criu-plugin`: the plugin as `dir`/ckpt.so, written beside it
/// and renamed into place (CRIU aborts a run on a plugin it cannot load).
pub fn install_criu_plugin(dir: &Path) -> Result<()> {
    sh(Command::new("cargo").current_dir(workspace()).args([
        "build",
        "--release",
        "-p",
        "ckpt-criu-plugin",
    ]))?;
    let built = workspace().join("target/release/libckpt_criu_plugin.so");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (tmp, to) = (dir.join(".ckpt.so.tmp"), dir.join("ckpt.so"));
    std::fs::copy(&built, &tmp).with_context(|| format!("copying to {}", tmp.display()))?;
    std::fs::rename(&tmp, &to).with_context(|| format!("installing {}", to.display()))?;
    println!(
        "install: {} (CRIU loads it on every dump and restore; remove it to stop)",
        to.display()
    );
    Ok(())
}

/// `cargo xtask package`: target/ckpt_VERSION_ARCH.deb, built with dpkg-deb from the
/// /usr layout. Returns its path.
pub fn package() -> Result<PathBuf> {
    let root = workspace().join("target/deb/ckpt");
    let _ = std::fs::remove_dir_all(&root);
    let files = stage(&root, "/usr")?;
    let version = env!("CARGO_PKG_VERSION");
    let arch = output(Command::new("dpkg").arg("--print-architecture"))
        .context("dpkg --print-architecture")?
        .trim()
        .to_string();
    let size_kib: u64 = files
        .iter()
        .map(|f| std::fs::metadata(root.join(f)).map_or(0, |m| m.len()))
        .sum::<u64>()
        / 1024;
    let doc = root.join("usr/share/doc/ckpt");
    std::fs::create_dir_all(&doc)?;
    std::fs::write(
        doc.join("copyright"),
        "ckpt\nLicense: MIT OR Apache-2.0 (see the project's repository)\n",
    )?;
    std::fs::create_dir_all(root.join("DEBIAN"))?;
    std::fs::write(
        root.join("DEBIAN/control"),
        format!(
            "Package: ckpt\nVersion: {version}\nArchitecture: {arch}\nMaintainer: ckpt developers <ckpt@localhost>\nInstalled-Size: {size_kib}\nDepends: libc6\nSection: admin\nPriority: optional\nDescription: file-state checkpointer and lock debugger for Linux processes\n ckpt-agent records lock waits and lease breaks with eBPF; ckpt-user shows\n live locks, leases and deleted-but-open files, and dumps and restores a\n cgroup's file state with the true remaining lease-break time.\n"
        ),
    )?;
    let deb = workspace().join(format!("target/ckpt_{version}_{arch}.deb"));
    let out = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&root)
        .arg(&deb)
        .output()
        .context("running dpkg-deb")?;
    if !out.status.success() {
        bail!(
            "dpkg-deb --build failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(deb)
}
