//! Open files: every fd of every process (path, flags, offset, owner, signal, file
//! handle, dev/inode), grouped into open file descriptions with kcmp so that a
//! description shared by dup() or fork() is one object in the image.
//!
//! Nothing here opens a file: fds are inspected through /proc and pidfd_getfd, so no
//! lease is broken and no file offset moves.

use std::{
    collections::{BTreeSet, HashMap},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
};

use anyhow::{Context as _, Result};
use ckpt_common::files::{list, FdRecord, LockLine, TaskRecord};

use super::{
    fdinfo::{parse_fdinfo, FdInfo},
    table::{FdTable, IterFd},
};
use crate::{
    image::format::{FileKind, OpenFile, Process},
    lock::{kernel::held_kind, proc_locks::ProcLock, KernelDev, LockRange, LockType},
    procinfo::split_deleted,
    sys::{fown, pidfd},
    task::dump as task_dump,
};

pub const O_CLOEXEC: u32 = 0o2000000;

/// One fd of one process, as found.
#[derive(Clone, Debug)]
pub struct FoundFd {
    pub pid: u32,
    pub fd: i32,
    pub path: String,
    /// The path ended in " (deleted)".
    pub unlinked: bool,
    pub info: FdInfo,
    pub dev: KernelDev,
    pub ino: u64,
    pub mode: u32,
    pub nlink: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub owner: Option<(i32, i32)>,
    pub sig: i32,
    pub handle: Option<(i32, Vec<u8>)>,
    /// From the iterator: a nameless inode that may be linked again (O_TMPFILE without
    /// O_EXCL); None when read through /proc, which does not tell.
    pub linkable: Option<bool>,
    /// From the iterator: the kernel's open file description and fd table, and the
    /// superblock's device (which locks carry; stat() differs on btrfs).
    pub kernel: Option<KernelIds>,
    /// From the iterator: the held locks and leases as the kernel's lists have them
    /// (empty when `info.locks` came from fdinfo instead).
    pub lines: Vec<LockLine>,
}

#[derive(Clone, Copy, Debug)]
pub struct KernelIds {
    pub file: u64,
    pub files: u64,
    pub s_dev: KernelDev,
}

impl FoundFd {
    /// An fd for unit tests: `pid`'s fd `fd` on inode `ino` of device 8:1, with mode
    /// `mode` and `nlink` links (0: deleted), nothing else known.
    #[cfg(test)]
    pub fn for_test(pid: u32, fd: i32, ino: u64, mode: u32, nlink: u64) -> FoundFd {
        FoundFd {
            pid,
            fd,
            path: format!("/f{ino}"),
            unlinked: nlink == 0,
            info: FdInfo::default(),
            dev: KernelDev::new(8, 1),
            ino,
            mode,
            nlink,
            size: 10,
            mtime_ns: 1,
            ctime_ns: 2,
            owner: None,
            sig: 0,
            handle: None,
            linkable: None,
            kernel: None,
            lines: Vec::new(),
        }
    }

    pub fn kind(&self) -> FileKind {
        match self.mode & libc::S_IFMT {
            libc::S_IFREG => FileKind::Regular,
            libc::S_IFDIR => FileKind::Directory,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            libc::S_IFLNK => FileKind::Symlink,
            _ => FileKind::Other,
        }
    }

    /// Unlinked while open and no other name left: its contents must go in the image.
    pub fn is_ghost(&self) -> bool {
        self.kind() == FileKind::Regular && self.nlink == 0
    }

    /// A regular file whose name was unlinked while another link keeps it: reopened
    /// by file handle.
    pub fn name_gone(&self) -> bool {
        self.kind() == FileKind::Regular && self.unlinked && self.nlink > 0
    }
}

/// Every fd of `pid`. An fd that disappears while we look is an error: the cgroup is
/// frozen, so it means the process was killed.
pub fn scan(pid: u32) -> Result<Vec<FoundFd>> {
    let gone = || format!("process {pid} exited during the dump");
    let dir = format!("/proc/{pid}/fd");
    let pidfd = pidfd::pidfd_open(pid).with_context(gone)?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(gone)? {
        let entry = entry.with_context(gone)?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let link = std::fs::read_link(entry.path())
            .with_context(gone)?
            .display()
            .to_string();
        let (path, unlinked) = split_deleted(&link);
        let md = std::fs::metadata(entry.path()).with_context(gone)?;
        let info = parse_fdinfo(
            &std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).with_context(gone)?,
        );
        let dup = pidfd::pidfd_getfd(&pidfd, fd).with_context(gone)?;
        out.push(FoundFd {
            pid,
            fd,
            path,
            unlinked,
            info,
            dev: KernelDev::from_st_dev(md.dev()),
            ino: md.ino(),
            mode: md.mode(),
            nlink: md.nlink(),
            size: md.size(),
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
            owner: fown::owner(&dup),
            sig: fown::signal(&dup),
            handle: pidfd::file_handle(&dup),
            linkable: None,
            kernel: None,
            lines: Vec::new(),
        });
    }
    out.sort_by_key(|f| (f.pid, f.fd));
    Ok(out)
}

/// What the iterator cannot tell about an inode: stat()'s device (a btrfs subvolume's
/// differs from the superblock's) and a file handle. Neither changes while the inode
/// lives, so they are read before freezing, keyed by an identity that cannot be
/// reused: superblock device, inode number and generation.
#[derive(Clone, Debug)]
pub struct InodeFacts {
    pub st_dev: u64,
    pub handle: Option<(i32, Vec<u8>)>,
}

pub type InodeKey = (u32, u64, u32);

fn key_of(r: &FdRecord) -> InodeKey {
    (r.s_dev, r.ino, r.generation)
}

/// How many fds of other processes are held at once while learning their inodes.
const PRESCAN_BATCH: usize = 2048;

/// Before the freeze, from one iterator read with paths: every fd's path, and per
/// inode what the iterator cannot tell (stat() device, file handle). For those, one
/// fd per inode is borrowed with pidfd_getfd (which opens nothing: no lease breaks)
/// and the iterator, run on our own fd table, confirms which inode it is. Best effort:
/// an fd closed meanwhile is looked at inside the frozen window instead.
///
/// Paths are taken here because d_path is the iterator's costliest part; inside the
/// window a path is reused when the same description is still open on the same inode.
/// A rename in these few milliseconds is like one just after the thaw: restore checks
/// identity (dev, inode, handle), never the name alone.
pub fn prescan(pids: &BTreeSet<u32>, table: &mut FdTable) -> Result<Prescan> {
    table.prepare(pids.iter().copied(), true)?;
    let first = table.read(&pids.iter().map(|&p| (p, true)).collect::<Vec<_>>())?;
    let mut paths = HashMap::new();
    let mut one_fd_per_inode: HashMap<InodeKey, (u32, u32)> = HashMap::new();
    let mut processes = HashMap::new();
    for part in first.processes {
        // Per process, /proc now; inside the window the iterator's process record
        // says whether it still holds (`task::dump::from_record`).
        if let Some(record) = part.task {
            if let Ok(p) = task_dump::read(part.pid) {
                processes.insert(part.pid, (record, p));
            }
        }
        for e in part.fds {
            one_fd_per_inode
                .entry(key_of(&e.rec))
                .or_insert((e.rec.tgid, e.rec.fd));
            if let Some(p) = e.path {
                paths.insert(e.rec.file, (key_of(&e.rec), p));
            }
        }
    }
    let me = std::process::id();
    let mut facts = HashMap::new();
    let mut pidfds: HashMap<u32, Option<OwnedFd>> = HashMap::new();
    let mut wanted: Vec<(u32, u32)> = one_fd_per_inode.into_values().collect();
    wanted.sort_unstable();
    for chunk in wanted.chunks(PRESCAN_BATCH) {
        let mut borrowed: HashMap<i32, OwnedFd> = HashMap::new();
        for &(pid, fd) in chunk {
            let pidfd = pidfds
                .entry(pid)
                .or_insert_with(|| pidfd::pidfd_open(pid).ok());
            if let Some(dup) = pidfd
                .as_ref()
                .and_then(|p| pidfd::pidfd_getfd(p, fd as i32).ok())
            {
                borrowed.insert(dup.as_raw_fd(), dup);
            }
        }
        for e in table.read(&[(me, false)])?.fds() {
            let Some(dup) = borrowed.get(&(e.rec.fd as i32)) else {
                continue;
            };
            if let Ok(md) = nix::sys::stat::fstat(dup.as_raw_fd()) {
                facts.insert(
                    key_of(&e.rec),
                    InodeFacts {
                        st_dev: md.st_dev,
                        handle: pidfd::file_handle(dup),
                    },
                );
            }
        }
    }
    // The window's links, made now.
    table.forget_path_links();
    table.prepare(pids.iter().copied(), false)?;
    let known = paths
        .iter()
        .filter(|(_, (key, _))| facts.contains_key(key))
        .map(|(file, (key, _))| (*file, *key))
        .collect();
    Ok(Prescan {
        facts,
        paths,
        known,
        processes,
    })
}

/// What is learnt before freezing.
#[derive(Default)]
pub struct Prescan {
    pub facts: HashMap<InodeKey, InodeFacts>,
    /// struct file -> (its inode, its path).
    pub paths: HashMap<u64, (InodeKey, String)>,
    /// (struct file, inode) whose path and inode facts are both known: one cheap
    /// lookup per fd inside the window.
    pub known: foldhash::HashSet<(u64, InodeKey)>,
    /// Processes as the iterator and /proc showed them.
    pub processes: HashMap<u32, (TaskRecord, Process)>,
}

/// fdinfo `lock:` line equivalent of a lock the iterator found on an fd (None for
/// a line without a valid range, which no lock has).
fn proc_lock_of(r: &FdRecord, l: &LockLine) -> Option<ProcLock> {
    use ckpt_common::lock::fl_flags::*;
    let ty = LockType::from_fl_type;
    let kind = held_kind(l.list, l.flags);
    let (state, lock_type, pid) = match l.list {
        list::POSIX if l.flags & FL_OFDLCK != 0 => ("ADVISORY", ty(l.lock_type as u8), -1),
        list::POSIX | list::FLOCK => ("ADVISORY", ty(l.lock_type as u8), i64::from(l.pid)),
        _ => {
            // As the kernel's lock_get_status prints leases: a breaking lease shows
            // its target type.
            let breaking = l.flags & (FL_UNLOCK_PENDING | FL_DOWNGRADE_PENDING) != 0;
            let target = if l.flags & FL_UNLOCK_PENDING != 0 {
                None
            } else if l.flags & FL_DOWNGRADE_PENDING != 0 {
                Some(LockType::Read)
            } else {
                ty(l.lock_type as u8)
            };
            (
                if breaking { "BREAKING" } else { "ACTIVE" },
                target,
                i64::from(l.pid),
            )
        }
    };
    Some(ProcLock {
        id: 0,
        blocked: false,
        kind,
        state: state.to_string(),
        lock_type,
        pid,
        dev: KernelDev(r.s_dev),
        ino: r.ino,
        range: LockRange::new(l.start, l.end)?,
    })
}

/// What the frozen window must still read for the iterator's fds: facts of inodes
/// opened since the prescan, their paths, and fdinfo where lock lists were too long
/// to walk in the kernel. Everything else is assembled after the thaw.
#[derive(Default)]
pub struct LateReads {
    facts: HashMap<InodeKey, InodeFacts>,
    /// (pid, fd) -> readlink of /proc/PID/fd/FD.
    paths: HashMap<(u32, u32), String>,
    /// (pid, fd) -> fdinfo `lock:` lines.
    locks: HashMap<(u32, u32), Vec<ProcLock>>,
}

impl LateReads {
    /// (fds opened since the prescan, fds whose lock lists were too long to walk).
    pub fn counts(&self) -> (usize, usize) {
        (self.paths.len(), self.locks.len())
    }

    pub fn merge(&mut self, other: LateReads) {
        self.facts.extend(other.facts);
        self.paths.extend(other.paths);
        self.locks.extend(other.locks);
    }
}

/// Inside the frozen window: the kernel reads the iterator's records still need.
pub fn late_reads<'a>(
    records: impl IntoIterator<Item = &'a IterFd>,
    pids: &BTreeSet<u32>,
    pre: &Prescan,
) -> Result<LateReads> {
    let mut pidfds: HashMap<u32, OwnedFd> = HashMap::new();
    let mut late = LateReads::default();
    for e in records.into_iter().filter(|e| pids.contains(&e.rec.tgid)) {
        let r = &e.rec;
        let pid = r.tgid;
        let key = key_of(r);
        if !e.locks_truncated && pre.known.contains(&(r.file, key)) {
            continue;
        }
        let gone = || format!("process {pid} exited during the dump");
        if !pre.facts.contains_key(&key) && !late.facts.contains_key(&key) {
            let pidfd = match pidfds.entry(pid) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(pidfd::pidfd_open(pid).with_context(gone)?)
                }
            };
            let dup = pidfd::pidfd_getfd(pidfd, r.fd as i32).with_context(gone)?;
            let md = nix::sys::stat::fstat(dup.as_raw_fd()).with_context(gone)?;
            late.facts.insert(
                key,
                InodeFacts {
                    st_dev: md.st_dev,
                    handle: pidfd::file_handle(&dup),
                },
            );
        }
        let known_path =
            e.path.is_some() || matches!(pre.paths.get(&r.file), Some((k, _)) if *k == key);
        if !known_path {
            // Opened since the prescan.
            let link = std::fs::read_link(format!("/proc/{pid}/fd/{}", r.fd)).with_context(gone)?;
            late.paths.insert((pid, r.fd), link.display().to_string());
        }
        if e.locks_truncated {
            // Too many locks on the inode to walk in the kernel: ask fdinfo.
            let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", r.fd))
                .with_context(gone)?;
            late.locks.insert((pid, r.fd), parse_fdinfo(&text).locks);
        }
    }
    Ok(late)
}

/// Builds the fds of `pids` from the iterator's records (no kernel reads).
pub fn assemble<'a>(
    records: impl IntoIterator<Item = &'a IterFd>,
    pids: &BTreeSet<u32>,
    pre: &Prescan,
    late: &LateReads,
) -> Vec<FoundFd> {
    let mut out = Vec::new();
    for e in records.into_iter().filter(|e| pids.contains(&e.rec.tgid)) {
        let r = &e.rec;
        let pid = r.tgid;
        let key = key_of(r);
        let Some(known) = pre.facts.get(&key).or_else(|| late.facts.get(&key)) else {
            continue;
        };
        let link = e
            .path
            .as_deref()
            .or_else(|| late.paths.get(&(pid, r.fd)).map(String::as_str))
            .or_else(|| pre.paths.get(&r.file).map(|(_, p)| p.as_str()))
            .unwrap_or_default();
        let held = || e.locks.iter().filter(|l| l.blocker == 0);
        let (locks, lines) = match late.locks.get(&(pid, r.fd)) {
            Some(l) => (l.clone(), Vec::new()),
            None => (
                held().filter_map(|l| proc_lock_of(r, l)).collect(),
                held().copied().collect(),
            ),
        };
        let (path, unlinked) = split_deleted(link);
        out.push(FoundFd {
            pid,
            fd: r.fd as i32,
            path,
            unlinked,
            info: FdInfo {
                pos: r.pos as u64,
                flags: r.flags,
                mnt_id: r.mnt_id as u32,
                ino: r.ino,
                locks,
            },
            dev: KernelDev::from_st_dev(known.st_dev),
            ino: r.ino,
            mode: r.i_mode,
            nlink: u64::from(r.nlink),
            size: r.size as u64,
            mtime_ns: r.mtime_sec * 1_000_000_000 + i64::from(r.mtime_nsec),
            ctime_ns: r.ctime_sec * 1_000_000_000 + i64::from(r.ctime_nsec),
            owner: (r.owner_pid != 0).then_some((r.owner_type as i32, r.owner_pid)),
            sig: r.signum as i32,
            handle: known.handle.clone(),
            linkable: Some(r.linkable != 0),
            kernel: Some(KernelIds {
                file: r.file,
                files: r.files,
                s_dev: KernelDev(r.s_dev),
            }),
            lines,
        });
    }
    out.sort_by_key(|f| (f.pid, f.fd));
    out
}

/// A regular file with no name left (its contents go into the image).
pub fn is_ghost_record(e: &IterFd) -> bool {
    e.rec.nlink == 0 && e.rec.i_mode & libc::S_IFMT == libc::S_IFREG
}

fn open_file(id: u32, f: &FoundFd) -> OpenFile {
    OpenFile {
        id,
        path: f.path.clone(),
        kind: f.kind(),
        flags: f.info.flags & !O_CLOEXEC,
        pos: f.info.pos,
        mnt_id: f.info.mnt_id,
        mode: f.mode,
        dev: f.dev,
        ino: f.ino,
        owner: f.owner,
        sig: f.sig,
        deleted: f.is_ghost(),
        unlinked: f.name_gone(),
        handle: f.handle.clone(),
        holders: Vec::new(),
    }
}

/// Groups fds into open file descriptions by the kernel's own identity (fds from the
/// iterator): no kcmp needed.
pub fn descriptions_by_file(fds: &[FoundFd]) -> (Vec<u32>, Vec<OpenFile>) {
    let mut ids: HashMap<u64, u32> = HashMap::new();
    let mut desc_of = Vec::with_capacity(fds.len());
    let mut files: Vec<OpenFile> = Vec::new();
    for f in fds {
        let file = f.kernel.map(|k| k.file).unwrap_or(0);
        let id = *ids.entry(file).or_insert_with(|| {
            files.push(open_file(files.len() as u32, f));
            files.len() as u32 - 1
        });
        desc_of.push(id);
        files[id as usize].holders.push((f.pid, f.fd));
    }
    (desc_of, files)
}

/// Groups fds into open file descriptions: returns, for each fd, the index of its
/// description, and the descriptions.
pub fn descriptions(fds: &[FoundFd]) -> Result<(Vec<u32>, Vec<OpenFile>)> {
    let mut by_inode: HashMap<(KernelDev, u64), Vec<usize>> = HashMap::new();
    for (i, f) in fds.iter().enumerate() {
        by_inode.entry((f.dev, f.ino)).or_default().push(i);
    }
    let mut desc_of = vec![u32::MAX; fds.len()];
    let mut files: Vec<OpenFile> = Vec::new();
    let mut groups: Vec<Vec<usize>> = by_inode.into_values().collect();
    groups.sort();
    for group in groups {
        // Representatives of the descriptions found so far on this inode.
        let mut reps: Vec<usize> = Vec::new();
        for &i in &group {
            let f = &fds[i];
            let mut found = None;
            for &r in &reps {
                let g = &fds[r];
                if pidfd::same_description(f.pid, f.fd, g.pid, g.fd)? {
                    found = Some(desc_of[r]);
                    break;
                }
            }
            let id = match found {
                Some(id) => id,
                None => {
                    let id = files.len() as u32;
                    reps.push(i);
                    files.push(open_file(id, f));
                    id
                }
            };
            desc_of[i] = id;
            files[id as usize].holders.push((f.pid, f.fd));
        }
    }
    Ok((desc_of, files))
}

pub fn cloexec(f: &FoundFd) -> bool {
    f.info.flags & O_CLOEXEC != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const REG: u32 = libc::S_IFREG | 0o644;

    fn on(pid: u32, fd: i32, file: u64, flags: u32) -> FoundFd {
        let mut f = FoundFd::for_test(pid, fd, 7, REG, 1);
        f.info.flags = flags;
        f.kernel = Some(KernelIds {
            file,
            files: u64::from(pid),
            s_dev: KernelDev::new(8, 1),
        });
        f
    }

    #[test]
    fn fds_on_one_kernel_file_are_one_description_with_every_holder() {
        // A dup in process 10 and a fork's copy in 11 share file 0xa; 0xb is apart.
        let fds = [
            on(10, 3, 0xa, O_CLOEXEC | 2),
            on(10, 4, 0xa, 2),
            on(11, 3, 0xa, 2),
            on(10, 5, 0xb, 0),
        ];
        let (desc_of, files) = descriptions_by_file(&fds);
        assert_eq!(desc_of, vec![0, 0, 0, 1]);
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].holders, vec![(10, 3), (10, 4), (11, 3)]);
        // Close-on-exec belongs to the fd, not the description.
        assert_eq!(files[0].flags, 2);
        assert!(cloexec(&fds[0]) && !cloexec(&fds[1]));
        assert_eq!(files[1].holders, vec![(10, 5)]);
    }
}
