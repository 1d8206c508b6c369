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

fn matches(link: &PathBuf, dev: KernelDev, ino: u64) -> bool {
    std::fs::metadata(link)
        .map(|m| m.ino() == ino && KernelDev::from_st_dev(m.dev()) == dev)
        .unwrap_or(false)
}

fn resolve(pid: u32, fd: i32, dev: KernelDev, ino: u64) -> Option<String> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let read = |link: &PathBuf| {
        std::fs::read_link(link)
            .ok()
            .map(|p| p.display().to_string())
    };
    if fd >= 0 {
        let link = dir.join(fd.to_string());
        if matches(&link, dev, ino) {
            return read(&link);
        }
    }
    for e in std::fs::read_dir(&dir).ok()?.flatten() {
        let link = e.path();
        if matches(&link, dev, ino) {
            return read(&link);
        }
    }
    None
}
