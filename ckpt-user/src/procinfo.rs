//! Per-process facts from /proc used to label locks: command names and file paths.

use std::{collections::HashMap, os::unix::fs::MetadataExt as _, path::PathBuf};

use crate::lock::{
    proc_locks::{self, ProcLock},
    KernelDev,
};

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

/// What /proc/PID/fdinfo/N says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FdInfo {
    pub pos: u64,
    /// Octal in the file; O_CLOEXEC set when the fd is close-on-exec.
    pub flags: u32,
    pub mnt_id: u32,
    pub ino: u64,
    /// `lock:` lines: the locks and leases of this fd's description (and, for POSIX,
    /// of this process through this description).
    pub locks: Vec<ProcLock>,
}

pub fn parse_fdinfo(text: &str) -> FdInfo {
    let mut info = FdInfo::default();
    let mut lock_lines = String::new();
    for line in text.lines() {
        let (k, v) = line.split_once(':').unwrap_or((line, ""));
        let v = v.trim();
        match k {
            "pos" => info.pos = v.parse().unwrap_or(0),
            "flags" => info.flags = u32::from_str_radix(v, 8).unwrap_or(0),
            "mnt_id" => info.mnt_id = v.parse().unwrap_or(0),
            "ino" => info.ino = v.parse().unwrap_or(0),
            "lock" => {
                lock_lines.push_str(v);
                lock_lines.push('\n');
            }
            _ => {}
        }
    }
    info.locks = proc_locks::parse(&lock_lines).unwrap_or_default();
    info
}

/// A path as /proc/PID/fd and d_path show it: " (deleted)" ends an unlinked one.
pub fn split_deleted(link: &str) -> (String, bool) {
    match link.strip_suffix(" (deleted)") {
        Some(p) => (p.to_string(), true),
        None => (link.to_string(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_fields_and_lock_lines() {
        let text = "pos:\t4096\nflags:\t02100002\nmnt_id:\t31\nino:\t77\n\
lock:\t1: POSIX  ADVISORY  WRITE 10 08:01:77 0 99\nlock:\t2: LEASE  BREAKING  UNLCK 10 08:01:77 0 EOF\n";
        let i = parse_fdinfo(text);
        assert_eq!((i.pos, i.mnt_id), (4096, 31));
        assert_eq!(i.flags, 0o2100002);
        assert_eq!(i.flags & 0o2000000, 0o2000000);
        assert_eq!(i.ino, 77);
        assert_eq!(i.locks.len(), 2);
        assert_eq!(i.locks[0].end, 99);
    }
}
