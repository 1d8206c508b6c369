//! tracefs and bpffs: mounted on demand (they are not mounted on every host).

use std::path::Path;

use anyhow::{Context as _, Result};
use nix::mount::{mount, MsFlags};

pub const TRACEFS: &str = "/sys/kernel/tracing";
pub const BPFFS: &str = "/sys/fs/bpf";

const TRACEFS_MAGIC: i64 = 0x74726163;
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn fs_magic(path: &str) -> Option<i64> {
    nix::sys::statfs::statfs(path)
        .ok()
        .map(|s| s.filesystem_type().0)
}

/// Mounts `fstype` on `path` unless a filesystem with `magic` is already there.
fn ensure(path: &str, fstype: &str, magic: i64) -> Result<bool> {
    if fs_magic(path) == Some(magic) {
        return Ok(false);
    }
    std::fs::create_dir_all(path).with_context(|| format!("creating {path}"))?;
    mount(
        Some(fstype),
        path,
        Some(fstype),
        MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting {fstype} on {path}"))?;
    Ok(true)
}

/// Mounts tracefs at /sys/kernel/tracing if missing. Returns whether it mounted it.
pub fn ensure_tracefs() -> Result<bool> {
    ensure(TRACEFS, "tracefs", TRACEFS_MAGIC)
}

/// Mounts bpffs at /sys/fs/bpf if missing. Returns whether it mounted it.
pub fn ensure_bpffs() -> Result<bool> {
    ensure(BPFFS, "bpf", BPF_FS_MAGIC)
}

/// The tracefs directory of one event, e.g. `filelock/posix_lock_inode`.
pub fn event_dir(category: &str, name: &str) -> std::path::PathBuf {
    Path::new(TRACEFS).join("events").join(category).join(name)
}
