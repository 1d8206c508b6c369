//! Open files: every fd of every process (path, flags, offset, owner, signal, file
//! handle, dev/inode), grouped into open file descriptions with kcmp so that a
//! description shared by dup() or fork() is one object in the image.
//!
//! Nothing here opens a file: fds are inspected through /proc and pidfd_getfd, so no
//! lease is broken and no file offset moves.

use std::{collections::HashMap, os::unix::fs::MetadataExt as _};

use anyhow::{Context as _, Result};

use crate::{
    image::format::{FileKind, OpenFile},
    locks::KernelDev,
    procinfo::{parse_fdinfo, FdInfo},
    sys::pidfd,
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
}

impl FoundFd {
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
        let (path, unlinked) = match link.strip_suffix(" (deleted)") {
            Some(p) => (p.to_string(), true),
            None => (link, false),
        };
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
            owner: pidfd::owner(&dup),
            sig: pidfd::signal(&dup),
            handle: pidfd::file_handle(&dup),
        });
    }
    out.sort_by_key(|f| (f.pid, f.fd));
    Ok(out)
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
                    files.push(OpenFile {
                        id,
                        path: f.path.clone(),
                        kind: f.kind(),
                        flags: f.info.flags & !O_CLOEXEC,
                        pos: f.info.pos,
                        mnt_id: f.info.mnt_id,
                        mode: f.mode,
                        dev: f.dev.to_string(),
                        ino: f.ino,
                        owner: f.owner,
                        sig: f.sig,
                        deleted: f.is_ghost(),
                        handle: f.handle.clone(),
                        holders: Vec::new(),
                    });
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
