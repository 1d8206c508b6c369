//! Opening every open file description of the image once, with the credentials of the
//! process that holds it: the original flags (never O_CREAT or O_TRUNC), the offset,
//! and a check that the file opened is the one validated.
//!
//! Opens are non-blocking: a lease still held by a running process makes the restore
//! stop with an error instead of waiting for (and breaking) that lease.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::CString,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::Path,
};

use anyhow::{bail, Context as _, Result};

use super::validate::{Checked, Identity};
use crate::{
    ghost::restore::Recreated,
    image::format::{FileKind, Image, OpenFile},
    plan::{FdSource, Plan, Source},
    task::creds,
};

/// Flags open(2) takes back; the others in fdinfo's flags are the kernel's own.
const OPEN_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_APPEND
    | libc::O_NONBLOCK
    | libc::O_DSYNC
    | libc::O_SYNC
    | libc::O_DIRECT
    | libc::O_LARGEFILE
    | libc::O_DIRECTORY
    | libc::O_NOFOLLOW
    | libc::O_NOATIME
    | libc::O_PATH;

/// Flags F_SETFL can change after the open (O_ASYNC is set by the holder itself).
const SETFL_FLAGS: i32 = libc::O_APPEND | libc::O_NONBLOCK | libc::O_DIRECT | libc::O_NOATIME;

fn open_one(path: &Path, f: &OpenFile) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut flags = f.flags as i32 & OPEN_FLAGS;
    if f.kind == FileKind::Regular {
        // O_TMPFILE is __O_TMPFILE | O_DIRECTORY, and f_flags keeps both.
        flags &= !libc::O_DIRECTORY;
    }
    let flags = flags | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
    // SAFETY: plain syscall; the fd is ours.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd open(2) just gave us, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if f.flags as i32 & libc::O_PATH == 0 {
        let flags = nix::fcntl::OFlag::from_bits_truncate(f.flags as i32 & SETFL_FLAGS);
        let _ = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags));
        if matches!(
            f.kind,
            FileKind::Regular | FileKind::Directory | FileKind::BlockDevice
        ) {
            nix::unistd::lseek(fd.as_raw_fd(), f.pos as i64, nix::unistd::Whence::SeekSet)?;
        }
    }
    Ok(fd)
}

fn why(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => {
            "a lease on it is held by a process still running (is the original still alive?)".into()
        }
        _ => e.to_string(),
    }
}

/// Every description of the plan, by image file index.
pub fn descriptions(
    image: &Image,
    plan: &Plan,
    ghosts: &HashMap<usize, Recreated>,
    checked: &Checked,
) -> Result<BTreeMap<u32, OwnedFd>> {
    let mut out = BTreeMap::new();
    for (&file, fp) in &plan.files {
        let f = &image.files[file as usize];
        let who = &plan.procs[fp.opener];
        let path = match &fp.source {
            Source::Path(p) => Path::new(p).to_path_buf(),
            Source::Ghost(g) => ghosts[g].reopen_path(),
            Source::Handle => match checked.by_handle.get(&(f.dev, f.ino)) {
                Some(fd) => format!("/proc/self/fd/{}", fd.as_raw_fd()).into(),
                None => bail!(
                    "image is corrupt: {} is to be found by file handle, but has no fingerprint",
                    f.path
                ),
            },
        };
        let fd = creds::as_user(&who.creds, || open_one(&path, f))?.map_err(|e| {
            anyhow::anyhow!(
                "process {} fd {}: cannot open {} as uid {}: {}",
                who.old_pid,
                who.fds
                    .iter()
                    .find(|d| d.source == FdSource::File(file))
                    .map_or(-1, |d| d.fd),
                f.path,
                who.creds.euid,
                why(&e)
            )
        })?;
        let md = std::fs::File::from(fd.try_clone()?)
            .metadata()
            .with_context(|| format!("stat {}", f.path))?;
        // Only a path names a file that could have been swapped: a ghost is our own
        // inode, whatever now has its old name.
        let want = match &fp.source {
            Source::Path(p) => checked.identities.get(p),
            Source::Ghost(_) | Source::Handle => None,
        };
        if let Some(want) = want {
            if Identity::of(&md) != *want {
                bail!("{}: replaced by another file while restoring", f.path);
            }
        }
        let kind_ok = match f.kind {
            FileKind::Regular => md.is_file(),
            FileKind::Directory => md.is_dir(),
            FileKind::CharDevice => md.mode() & libc::S_IFMT == libc::S_IFCHR,
            FileKind::BlockDevice => md.mode() & libc::S_IFMT == libc::S_IFBLK,
            _ => true,
        };
        if !kind_ok {
            bail!("{}: is no longer a {:?}", f.path, f.kind);
        }
        out.insert(file, fd);
    }
    Ok(out)
}
