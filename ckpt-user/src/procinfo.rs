//! Per-process facts from /proc: command names, file paths, whether a thread is in a
//! lock call.

use std::{collections::HashMap, os::unix::fs::MetadataExt as _, path::PathBuf};

use ckpt_common::dev::KernelDev;

pub fn command(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// `command`, read once per process.
#[derive(Default)]
pub struct Commands(HashMap<u32, Option<String>>);

impl Commands {
    pub fn of(&mut self, pid: u32) -> Option<String> {
        self.0.entry(pid).or_insert_with(|| command(pid)).clone()
    }
}

/// Resolves (dev, inode) to a path through a process's open fds, trying the fd the
/// lock was taken through first. Results are cached per (pid, dev, inode).
#[derive(Default)]
pub struct PathResolver {
    cache: HashMap<(u32, KernelDev, u64), Option<String>>,
}

impl PathResolver {
    pub fn path(&mut self, pid: u32, fd: i32, dev: KernelDev, ino: u64) -> Option<String> {
        self.cache
            .entry((pid, dev, ino))
            .or_insert_with(|| resolve(pid, fd, dev, ino))
            .clone()
    }
}

/// Whether an fd link is the file: same inode, and same device when `exact`. Locks
/// name the superblock's device, while stat() on btrfs gives the subvolume's, so an
/// inode-only match among one process's fds is the fallback.
fn matches(link: &PathBuf, dev: KernelDev, ino: u64, exact: bool) -> bool {
    std::fs::metadata(link)
        .map(|m| m.ino() == ino && (!exact || KernelDev::from_st_dev(m.dev()) == dev))
        .unwrap_or(false)
}

/// The path of (dev, inode) among `pid`'s open fds, " (deleted)" taken off.
pub fn path_of(pid: u32, dev: KernelDev, ino: u64) -> Option<String> {
    resolve(pid, -1, dev, ino).map(|p| split_deleted(&p).0)
}

fn resolve(pid: u32, fd: i32, dev: KernelDev, ino: u64) -> Option<String> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let read = |link: &PathBuf| {
        std::fs::read_link(link)
            .ok()
            .map(|p| p.display().to_string())
    };
    let first = (fd >= 0).then(|| dir.join(fd.to_string()));
    // The usual case, without listing the directory (that cost ~40 us per lock).
    if let Some(link) = first.as_ref().filter(|l| matches(l, dev, ino, true)) {
        return read(link);
    }
    let links: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    for exact in [true, false] {
        for link in first.iter().chain(links.iter()) {
            if matches(link, dev, ino, exact) {
                return read(link);
            }
        }
    }
    None
}

/// A path as /proc/PID/fd and d_path show it: " (deleted)" ends an unlinked one.
pub fn split_deleted(link: &str) -> (String, bool) {
    match link.strip_suffix(" (deleted)") {
        Some(p) => (p.to_string(), true),
        None => (link.to_string(), false),
    }
}

/// Whether thread `tid` of `tgid` is still inside a lock call: fcntl or flock, or an
/// open or truncate blocked on a lease break (`/proc/PID/task/TID/syscall` names the
/// call a sleeping thread is in; "running" counts as inside, as between a signal
/// handler and a restart). None when the thread is gone.
pub fn in_lock_call(tgid: u32, tid: u32) -> Option<bool> {
    let s = std::fs::read_to_string(format!("/proc/{tgid}/task/{tid}/syscall")).ok()?;
    let Some(nr) = s
        .split_whitespace()
        .next()
        .and_then(|n| n.parse::<i64>().ok())
    else {
        return Some(true);
    };
    Some(
        [
            libc::SYS_fcntl,
            libc::SYS_flock,
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_openat2,
            libc::SYS_truncate,
        ]
        .contains(&nr),
    )
}
