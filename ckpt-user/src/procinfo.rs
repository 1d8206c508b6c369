//! Per-process facts from /proc used to label locks: command names and file paths.

use std::{collections::HashMap, os::unix::fs::MetadataExt as _, path::PathBuf};

use crate::locks::KernelDev;

pub fn command(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
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

fn resolve(pid: u32, fd: i32, dev: KernelDev, ino: u64) -> Option<String> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let read = |link: &PathBuf| {
        std::fs::read_link(link)
            .ok()
            .map(|p| p.display().to_string())
    };
    let links: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    let first = (fd >= 0).then(|| dir.join(fd.to_string()));
    for exact in [true, false] {
        for link in first.iter().chain(links.iter()) {
            if matches(link, dev, ino, exact) {
                return read(link);
            }
        }
    }
    None
}
