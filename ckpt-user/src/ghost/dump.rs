//! Deleted-but-open files ("ghost files", as CRIU calls them): their contents go into
//! the image, sparse-aware (SEEK_DATA/SEEK_HOLE: only data extents are stored).
//!
//! The bytes must be those of the frozen moment. Where the filesystem can reflink
//! (btrfs, XFS), a FICLONE copy is made while frozen — instant — and streamed into the
//! image after the thaw; elsewhere the bytes are copied while frozen.

use std::{
    collections::{BTreeSet, HashMap},
    fs::File,
    os::{
        fd::{AsRawFd as _, FromRawFd as _},
        unix::fs::{FileExt as _, MetadataExt as _},
    },
    path::Path,
};

use anyhow::{bail, Context as _, Result};
use indicatif::ProgressBar;

use crate::image::{
    format::{Ghost, GhostMap, Memfd},
    writer::ImageWriter,
};

/// A deleted file to save, reachable through one of its holders' fds or mappings.
#[derive(Clone, Debug)]
pub struct Plan {
    pub through: Through,
    pub ghost: Ghost,
}

/// How the frozen bytes are reached.
#[derive(Clone, Debug)]
pub enum Through {
    /// A new open of /proc/PID/fd/FD or /proc/PID/map_files/START-END.
    Link(String),
    /// A pidfd_getfd dup of process `pid`'s fd `fd`, a description open for reading:
    /// for a leased file, which any open would break (or wait on). Read with pread;
    /// the description's position, which the extent search moves, is put back.
    Dup { pid: u32, fd: i32 },
}

impl std::fmt::Display for Through {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Through::Link(l) => f.write_str(l),
            Through::Dup { pid, fd } => write!(f, "a dup of process {pid}'s fd {fd}"),
        }
    }
}

/// The name memfd_create gave a file: its path is "/memfd:NAME".
fn memfd_name(path: &str) -> Option<&str> {
    path.strip_prefix("/memfd:")
}

/// A readable handle on the frozen contents: our own description of the file (so no
/// process's offset moves), a holder's (read with pread only), or a reflinked clone.
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
    // SAFETY: a new fd open(2) just gave us, owned by nothing else.
    let dst = unsafe { File::from_raw_fd(fd) };
    // SAFETY: FICLONE between two of our own fds.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
    (r == 0).then_some(dst)
}

/// While frozen: opens the deleted file, measures its extents against `limit`, and
/// reflinks it if possible.
pub fn prepare(plan: Plan, limit: u64) -> Result<Source> {
    let file = match &plan.through {
        Through::Link(link) => File::open(link).map_err(anyhow::Error::from),
        Through::Dup { pid, fd } => crate::sys::pidfd::pidfd_open(*pid)
            .and_then(|p| crate::sys::pidfd::pidfd_getfd(&p, *fd))
            .map(File::from),
    }
    .with_context(|| {
        format!(
            "opening deleted file {} through {}",
            plan.ghost.path, plan.through
        )
    })?;
    let mut plan = plan;
    let md = file
        .metadata()
        .with_context(|| format!("stat of deleted file {}", plan.ghost.path))?;
    plan.ghost.uid = Some(md.uid());
    plan.ghost.gid = Some(md.gid());
    plan.ghost.mode = md.mode();
    plan.ghost.size = md.size();
    if let Some(name) = memfd_name(&plan.ghost.path) {
        plan.ghost.memfd = Some(Memfd {
            name: name.to_string(),
            seals: nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_GET_SEALS)
                .unwrap_or(0) as u32,
        });
    }
    plan.ghost.extents = match plan.through {
        Through::Link(_) => extents(&file, plan.ghost.size),
        // The holder's own description: its position goes back where it was (the
        // holder is frozen, so nothing sees it move).
        Through::Dup { .. } => {
            let pos = lseek(&file, 0, libc::SEEK_CUR);
            let found = extents(&file, plan.ghost.size);
            if let Some(pos) = pos {
                lseek(&file, pos, libc::SEEK_SET).with_context(|| {
                    format!("putting back the file position of {}", plan.ghost.path)
                })?;
            }
            found
        }
    };
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
    // A memfd's "directory" is no directory.
    let clone = match plan.ghost.memfd {
        None => reflink(&file, parent),
        Some(_) => None,
    };
    Ok(match clone {
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

/// The device of the kernel's internal shmem mount, which memfds, SysV shared memory
/// and shared anonymous mappings live on (a memfd of our own tells it).
pub fn internal_shmem_dev() -> Option<u64> {
    let fd =
        nix::sys::memfd::memfd_create(c"ckpt-probe", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .ok()?;
    Some(File::from(fd).metadata().ok()?.dev())
}

/// A mapping that is process memory, not a file: shared anonymous memory
/// (`/dev/zero`) and SysV shared memory (`/SYSV<key>`) are files of the internal
/// shmem mount that no process can open. Spawn mode restores no memory; CRIU dumps
/// them with memory and IPC, not as files.
pub fn is_process_memory(path: &str, dev: u64, shmem_dev: Option<u64>) -> bool {
    shmem_dev == Some(dev) && (path == "/dev/zero" || path.starts_with("/SYSV"))
}

/// A mapping of a deleted file in a dumped process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub pid: u32,
    pub start: u64,
    pub end: u64,
}

impl Mapping {
    /// The link to the mapped file (/proc/PID/map_files needs CAP_SYS_ADMIN).
    pub fn link(&self) -> String {
        format!(
            "/proc/{}/map_files/{:x}-{:x}",
            self.pid, self.start, self.end
        )
    }
}

/// The deleted-file mappings of `pids`, from the scan iterator's records.
pub fn mappings_from_scan(
    records: &[crate::ghost::scan::Seen],
    pids: &BTreeSet<u32>,
) -> Vec<Mapping> {
    records
        .iter()
        .filter(|s| s.rec.tag == ckpt_common::deleted::tag::MAP && pids.contains(&s.rec.tgid))
        .map(|s| Mapping {
            pid: s.rec.tgid,
            start: s.rec.start,
            end: s.rec.end,
        })
        .collect()
}

/// The deleted-file mappings of `pid` from /proc/PID/maps (no iterators): every
/// mapping of a file whose path ends in " (deleted)" (which includes names removed
/// while another link is left; the caller keeps those with no link).
pub fn mappings_from_proc(pid: u32) -> Result<Vec<Mapping>> {
    Ok(maps_of(pid)
        .with_context(|| format!("process {pid} exited during the dump"))?
        .into_iter()
        .filter(|m| m.inode != 0 && deleted_path(&m.pathname))
        .map(|m| Mapping {
            pid,
            start: m.address.0,
            end: m.address.1,
        })
        .collect())
}

/// /proc/PID/maps, through procfs.
fn maps_of(pid: u32) -> procfs::ProcResult<Vec<procfs::process::MemoryMap>> {
    Ok(procfs::process::Process::new(pid as i32)?.maps()?.0)
}

/// A file's path as maps shows it, ending in " (deleted)" once unlinked.
fn deleted_path(p: &procfs::process::MMapPath) -> bool {
    matches!(p, procfs::process::MMapPath::Path(path) if path.as_os_str().as_encoded_bytes().ends_with(b" (deleted)"))
}

/// Offset and permissions of each mapping in `maps` (read only for processes that map
/// a deleted file).
pub fn describe(maps: &[Mapping]) -> Vec<GhostMap> {
    let mut read: HashMap<u32, Vec<procfs::process::MemoryMap>> = HashMap::new();
    maps.iter()
        .map(|m| {
            let all = read
                .entry(m.pid)
                .or_insert_with(|| maps_of(m.pid).unwrap_or_default());
            let (offset, perms) = all
                .iter()
                .find(|x| x.address == (m.start, m.end))
                .map_or((0, String::new()), |x| (x.offset, x.perms.as_str()));
            GhostMap {
                pid: m.pid,
                start: m.start,
                end: m.end,
                offset,
                perms,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deleted_mapping_is_found_with_its_offset_and_permissions() {
        // A file of our own, mapped shared at page 1, then unlinked.
        let dir = std::env::temp_dir().join(format!("ckpt-maps-{}", std::process::id()));
        let path = dir.with_extension("f");
        std::fs::write(&path, vec![7u8; 3 * 4096]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        // SAFETY: a new shared mapping of our own file, unmapped below.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                4096,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        std::fs::remove_file(&path).unwrap();
        let me = std::process::id();
        let found = mappings_from_proc(me).unwrap();
        let start = at as u64;
        let ours: Vec<&Mapping> = found.iter().filter(|m| m.start == start).collect();
        assert_eq!(ours.len(), 1, "{found:?}");
        assert_eq!(ours[0].end, start + 4096);
        let d = describe(&[ours[0].clone()]);
        assert_eq!((d[0].offset, d[0].perms.as_str()), (4096, "rw-s"));
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(at, 4096) };
    }

    #[test]
    fn shared_anonymous_and_sysv_memory_are_not_files() {
        let shm = internal_shmem_dev();
        assert!(shm.is_some());
        assert!(is_process_memory("/dev/zero", shm.unwrap(), shm));
        assert!(is_process_memory("/SYSV0000002a", shm.unwrap(), shm));
        assert!(!is_process_memory("/memfd:x", shm.unwrap(), shm));
        assert!(!is_process_memory("/dev/zero", shm.unwrap() + 1, shm));
    }

    #[test]
    fn memfd_names_come_from_the_path() {
        assert_eq!(memfd_name("/memfd:cache"), Some("cache"));
        assert_eq!(memfd_name("/tmp/memfd:x"), None);
    }
}
