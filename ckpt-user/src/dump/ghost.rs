//! Deleted-but-open files ("ghost files", as CRIU calls them): their contents go into
//! the image, sparse-aware (SEEK_DATA/SEEK_HOLE: only data extents are stored).
//!
//! The bytes must be those of the frozen moment. Where the filesystem can reflink
//! (btrfs, XFS), a FICLONE copy is made while frozen — instant — and streamed into the
//! image after the thaw; elsewhere the bytes are copied while frozen.

use std::{
    fs::File,
    os::{
        fd::{AsRawFd as _, FromRawFd as _},
        unix::fs::FileExt as _,
    },
    path::Path,
};

use anyhow::{bail, Context as _, Result};
use indicatif::ProgressBar;

use crate::image::{format::Ghost, writer::ImageWriter};

/// A deleted file to save, reachable through one of its holders' fds.
#[derive(Clone, Debug)]
pub struct Plan {
    pub pid: u32,
    pub fd: i32,
    pub ghost: Ghost,
}

/// A readable handle on the frozen contents: our own description of the file (so no
/// process's offset moves), or a reflinked clone of it.
pub struct Source {
    file: File,
    pub plan: Plan,
    pub cloned: bool,
}

fn lseek(f: &File, off: u64, whence: i32) -> Option<u64> {
    // SAFETY: lseek on our own fd.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    (r >= 0).then_some(r as u64)
}

/// Data extents of a file.
fn extents(f: &File, size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Some(data) = lseek(f, pos, libc::SEEK_DATA) else {
            break;
        };
        let hole = lseek(f, data, libc::SEEK_HOLE).unwrap_or(size).min(size);
        if hole > data {
            out.push((data, hole - data));
        }
        pos = hole.max(data + 1);
    }
    out
}

const FICLONE: libc::c_ulong = 0x4004_9409;

/// Tries to reflink `src` into an unnamed file in `dir` (same filesystem).
fn reflink(src: &File, dir: &Path) -> Option<File> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: plain syscalls on fds we own.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_TMPFILE | libc::O_RDWR, 0o600) };
    if fd < 0 {
        return None;
    }
    let dst = unsafe { File::from_raw_fd(fd) };
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
    (r == 0).then_some(dst)
}

/// While frozen: opens the deleted file, measures its extents against `limit`, and
/// reflinks it if possible.
pub fn prepare(plan: Plan, limit: u64) -> Result<Source> {
    let link = format!("/proc/{}/fd/{}", plan.pid, plan.fd);
    let file = File::open(&link)
        .with_context(|| format!("opening deleted file {} through {link}", plan.ghost.path))?;
    let mut plan = plan;
    plan.ghost.extents = extents(&file, plan.ghost.size);
    let data: u64 = plan.ghost.extents.iter().map(|e| e.1).sum();
    if data > limit {
        bail!(
            "deleted file {} holds {data} bytes of data, more than --ghost-limit {limit}; raise the limit to dump it",
            plan.ghost.path
        );
    }
    let parent = Path::new(&plan.ghost.path)
        .parent()
        .unwrap_or(Path::new("/"));
    Ok(match reflink(&file, parent) {
        Some(clone) => Source {
            file: clone,
            plan,
            cloned: true,
        },
        None => Source {
            file,
            plan,
            cloned: false,
        },
    })
}

/// Copies the data extents into the image; returns the ghost record.
pub fn copy(src: &Source, w: &mut ImageWriter, progress: Option<&ProgressBar>) -> Result<Ghost> {
    let mut g = src.plan.ghost.clone();
    g.data_offset = w.offset();
    let mut buf = vec![0u8; 1 << 20];
    for &(off, len) in &g.extents {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            src.file
                .read_exact_at(&mut buf[..n], off + done)
                .with_context(|| format!("reading deleted file {}", g.path))?;
            w.write(&buf[..n])?;
            done += n as u64;
            if let Some(p) = progress {
                p.inc(n as u64);
            }
        }
    }
    Ok(g)
}
