//! Deleted-but-open files come back as they were: the saved extents written into a new
//! file (holes stay holes), opened by every description that had it, then unlinked,
//! so that the restored fds see link count 0 and the same bytes, and a file that
//! several holders had open is one inode again.
//!
//! The copy is made under the original name when it is free (so /proc shows the same
//! "path (deleted)"), else under a hidden name next to it, or in --ghost-dir.

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::{FileExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::image::{format::Ghost, reader::ImageReader};

use super::plan::Creds;

/// A recreated file, removed again on drop unless `unlink` already did.
pub struct Recreated {
    pub path: PathBuf,
    linked: bool,
}

impl Recreated {
    /// Removes the name; the open descriptions keep the inode.
    pub fn unlink(&mut self) -> Result<()> {
        if self.linked {
            std::fs::remove_file(&self.path)
                .with_context(|| format!("unlinking {}", self.path.display()))?;
            self.linked = false;
        }
        Ok(())
    }
}

impl Drop for Recreated {
    fn drop(&mut self) {
        if self.linked {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn create_new(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
}

/// Picks a free name: the original, else `.NAME.ckpt-ghost-INO[-N]` beside it (or in
/// `dir`).
fn create_at(g: &Ghost, dir: Option<&Path>) -> Result<(PathBuf, File)> {
    let orig = Path::new(&g.path);
    let name = orig
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "ghost".into());
    let parent = match dir {
        Some(d) => d.to_path_buf(),
        None => orig.parent().unwrap_or(Path::new("/")).to_path_buf(),
    };
    let mut candidates = vec![parent.join(&name)];
    candidates.extend((0..100).map(|n| {
        let suffix = if n == 0 {
            String::new()
        } else {
            format!("-{n}")
        };
        parent.join(format!(".{name}.ckpt-ghost-{}{suffix}", g.ino))
    }));
    let mut last = None;
    for c in candidates {
        match create_new(&c) {
            Ok(f) => return Ok((c, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "recreating deleted file {} in {} (--ghost-dir picks another directory)",
                        g.path,
                        parent.display()
                    )
                })
            }
        }
    }
    Err(last.unwrap()).with_context(|| {
        format!(
            "no free name for deleted file {} in {}",
            g.path,
            parent.display()
        )
    })
}

/// Writes ghost `g` from the image and gives it to `owner`.
pub fn recreate(
    reader: &ImageReader,
    g: &Ghost,
    owner: &Creds,
    dir: Option<&Path>,
) -> Result<Recreated> {
    let (path, file) = create_at(g, dir)?;
    let made = Recreated { path, linked: true };
    let ctx = || {
        format!(
            "recreating deleted file {} as {}",
            g.path,
            made.path.display()
        )
    };
    reader
        .ghost_data(g, |off, bytes| Ok(file.write_all_at(bytes, off)?))
        .with_context(ctx)?;
    file.set_len(g.size).with_context(ctx)?;
    std::os::unix::fs::fchown(&file, Some(owner.euid), Some(owner.egid)).with_context(ctx)?;
    file.set_permissions(std::fs::Permissions::from_mode(g.mode & 0o7777))
        .with_context(ctx)?;
    Ok(made)
}
