//! Deleted-but-open files come back as they were: the saved extents written into a new
//! inode (holes stay holes) with the recorded owner and mode, opened by every
//! description that had it, so that the restored fds see link count 0 and the same
//! bytes, and a file that several holders had open is one inode again.
//!
//! The new inode never has a visible name: it is made with O_TMPFILE on the filesystem
//! of the directory the file was deleted from (or the nearest directory above it that
//! still exists, or `--ghost-dir`), and a memfd with memfd_create. So no image can
//! plant a file anywhere, and a restore killed at any point leaves nothing a user
//! would find. Where a filesystem has no O_TMPFILE, a private name is removed again
//! before any byte is written. Holders reopen it through /proc/self/fd with their own
//! credentials: their rights decide how it is opened, not whether it may exist.

use std::{
    ffi::CString,
    fs::File,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::{FileExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use nix::{
    errno::Errno,
    fcntl::{OFlag, SealFlag},
    sys::{memfd::MemFdCreateFlag, stat::Mode},
};

use crate::image::{format::Ghost, reader::ImageReader};

use crate::plan::Creds;

/// Mode bits a restore gives: permissions and sticky, and the set-id bits only from an
/// authenticated image (an fd on a set-id file could be run with fexecve).
const PERMISSIONS: u32 = 0o1777;
const SET_ID: u32 = 0o6000;

/// A recreated deleted file: an fd on the nameless inode.
pub struct Recreated {
    file: File,
    /// Where it lives (the directory its O_TMPFILE was made in), for messages.
    pub dir: Option<PathBuf>,
}

impl Recreated {
    /// The path a holder opens it by (this process's fd, as a magic link).
    pub fn reopen_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// What the image may decide about a recreated file.
#[derive(Clone, Copy, Debug)]
pub struct Trust {
    /// The image is authenticated with this host's key: its set-id bits are kept.
    pub keep_set_id: bool,
}

/// The directory an O_TMPFILE for `g` is made in: `over` if given, else the nearest
/// existing directory on the way up from the file's old one.
fn directory_for(g: &Ghost, over: Option<&Path>) -> Result<PathBuf> {
    if let Some(d) = over {
        return Ok(d.to_path_buf());
    }
    let old = Path::new(&g.path);
    if !old.is_absolute() {
        bail!(
            "image is corrupt: deleted file {:?} has no absolute path",
            g.path
        );
    }
    let mut dir = old.parent().unwrap_or(Path::new("/"));
    loop {
        if dir.is_dir() {
            return Ok(dir.to_path_buf());
        }
        dir = dir.parent().unwrap_or(Path::new("/"));
    }
}

/// A nameless regular file in `dir`; linkable (O_TMPFILE without O_EXCL) only if the
/// original was. Returns whether it is linkable.
fn nameless_in(dir: &Path, linkable: bool) -> Result<(File, bool)> {
    let excl = if linkable {
        OFlag::empty()
    } else {
        OFlag::O_EXCL
    };
    let flags = OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC | excl;
    match nix::fcntl::open(dir, flags, Mode::from_bits_truncate(0o600)) {
        // SAFETY: a new fd, ours alone.
        Ok(fd) => return Ok((unsafe { File::from_raw_fd(fd) }, linkable)),
        // No O_TMPFILE on this filesystem (or kernel): a private name, gone at once.
        Err(Errno::EOPNOTSUPP | Errno::EISDIR | Errno::EINVAL) => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "creating a nameless file in {} (--ghost-dir picks another directory)",
                    dir.display()
                )
            })
        }
    }
    for n in 0..100u32 {
        let name = dir.join(format!(".ckpt-ghost-{}-{n}", std::process::id()));
        let flags =
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match nix::fcntl::open(&name, flags, Mode::from_bits_truncate(0o600)) {
            Ok(fd) => {
                // SAFETY: a new fd, ours alone.
                let file = unsafe { File::from_raw_fd(fd) };
                nix::unistd::unlink(&name)
                    .with_context(|| format!("removing {}", name.display()))?;
                return Ok((file, false));
            }
            Err(Errno::EEXIST) => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("creating a file in {}", dir.display()))
            }
        }
    }
    bail!("no free private name in {}", dir.display())
}

fn memfd(name: &str) -> Result<File> {
    // The kernel refuses names over 249 bytes; a longer one is cut.
    let mut end = name.len().min(249);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let c = CString::new(name[..end].replace('\0', ""))?;
    let fd: OwnedFd = nix::sys::memfd::memfd_create(
        &c,
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .with_context(|| format!("memfd_create({name:?})"))?;
    Ok(File::from(fd))
}

/// Writes ghost `g` from the image into a nameless inode owned as recorded (images
/// without an owner: the holder `opener`). Returns it and any warning.
pub fn recreate(
    reader: &ImageReader,
    g: &Ghost,
    opener: &Creds,
    over: Option<&Path>,
    trust: Trust,
) -> Result<(Recreated, Vec<String>)> {
    let mut warnings = Vec::new();
    let (file, dir) = match &g.memfd {
        Some(m) => (memfd(&m.name)?, None),
        None => {
            let dir = directory_for(g, over)?;
            let (file, linkable) = nameless_in(&dir, g.linkable)?;
            if g.linkable && !linkable {
                warnings.push(format!(
                    "deleted file {}: {} has no O_TMPFILE, so the restored file cannot be linked into the tree as the original could",
                    g.path,
                    dir.display()
                ));
            }
            (file, Some(dir))
        }
    };
    let ctx = || format!("recreating deleted file {}", g.path);
    reader
        .ghost_data(g, |off, bytes| Ok(file.write_all_at(bytes, off)?))
        .with_context(ctx)?;
    file.set_len(g.size).with_context(ctx)?;
    let uid = g.uid.unwrap_or(opener.euid);
    let gid = g.gid.unwrap_or(opener.egid);
    // Owner first: a chown may clear set-id bits, which the chmod then sets.
    std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).with_context(ctx)?;
    let mut mode = g.mode & PERMISSIONS;
    if g.mode & SET_ID != 0 {
        if trust.keep_set_id {
            mode |= g.mode & SET_ID;
        } else {
            warnings.push(format!(
                "deleted file {}: set-id bits {:o} dropped (the image is not authenticated)",
                g.path,
                g.mode & SET_ID
            ));
        }
    }
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(ctx)?;
    if let Some(m) = &g.memfd {
        let seals = SealFlag::from_bits_truncate(m.seals as i32);
        if !seals.is_empty() {
            nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_ADD_SEALS(seals))
                .with_context(|| format!("sealing memfd {} ({:#x})", g.path, m.seals))?;
        }
    }
    Ok((Recreated { file, dir }, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ghost(path: &str) -> Ghost {
        Ghost {
            path: path.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_removed_directory_gives_the_nearest_one_above() {
        let base = std::env::temp_dir().join(format!("ckpt-ghost-dir-{}", std::process::id()));
        std::fs::create_dir_all(base.join("a")).unwrap();
        let g = ghost(&base.join("a/b/c/file").display().to_string());
        assert_eq!(directory_for(&g, None).unwrap(), base.join("a"));
        assert_eq!(
            directory_for(&g, Some(Path::new("/x"))).unwrap(),
            Path::new("/x")
        );
        assert!(directory_for(&ghost("relative/file"), None).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_nameless_file_leaves_no_name() {
        let base = std::env::temp_dir().join(format!("ckpt-ghost-tmp-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let (f, _) = nameless_in(&base, false).unwrap();
        f.write_all_at(b"x", 0).unwrap();
        assert_eq!(std::fs::read_dir(&base).unwrap().count(), 0);
        drop(f);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
