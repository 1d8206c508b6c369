//! Deleted-but-open files: what the eBPF side tells the agent (a trigger generation,
//! bumped by every event that may change the set) and what the agent's scans read
//! (iterator records) and publish (the `DELETED` table).

/// `FILE_TRIGGERS` slots (written by the programs).
pub mod trigger {
    /// Bumped by every unlink, rename, link, O_TMPFILE open, close of a deleted
    /// file, and by fork, exec, exit and munmap of a process holding one.
    pub const GEN: u32 = 0;
    /// CLOCK_MONOTONIC ns of the latest unlink, rename or O_TMPFILE open.
    pub const UNLINK_NS: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// `DELETED_SCAN` slots.
pub mod scan {
    /// The trigger generation the `DELETED` table reflects (written by the agent).
    pub const DONE: u32 = 0;
    /// The generation a reader waits for (written by `ckpt-user deleted`): the agent
    /// rescans at once instead of at its background pace.
    pub const WANTED: u32 = 1;
    /// CLOCK_MONOTONIC ns of the last scan (`ckpt-user deleted --max-age`).
    pub const AT_NS: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// Iterator record tags.
pub mod tag {
    /// A deleted file held through an fd.
    pub const FD: u32 = 1;
    /// A deleted file mapped into memory.
    pub const MAP: u32 = 2;
}

/// One holder of a deleted regular file, as the scan iterators emit it: an
/// `FD` record is followed by `path_len` bytes of path (`d_path`, NUL included).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeletedRecord {
    pub tag: u32,
    pub tgid: u32,
    /// The fd (`FD`), or 0.
    pub fd: u32,
    pub path_len: u32,
    /// The superblock's device.
    pub s_dev: u32,
    pub nlink: u32,
    pub ino: u64,
    pub size: i64,
    pub blocks: u64,
    /// The mapping's address range (`MAP`).
    pub start: u64,
    pub end: u64,
}

pub const DELETED_RECORD_SIZE: usize = core::mem::size_of::<DeletedRecord>();

/// Longest path kept in the `DELETED` table (longer ones are cut, and say so).
pub const DELETED_PATH_MAX: usize = 256;

/// Scratch of the fd scan: a record and its path, written at once.
#[repr(C)]
pub struct DeletedScratch {
    pub record: DeletedRecord,
    pub path: [u8; crate::files::PATH_MAX],
}

/// A holder in the `DELETED` table: (inode, process, fd or mapping start).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeletedKey {
    pub dev: u32,
    /// `tag::FD` or `tag::MAP`.
    pub kind: u32,
    pub ino: u64,
    pub pid: u32,
    pub fd: u32,
    /// Mapping start (0 for an fd).
    pub start: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeletedValue {
    pub size: i64,
    pub blocks: u64,
    pub nlink: u32,
    /// 1 when `path` was cut at DELETED_PATH_MAX.
    pub path_cut: u32,
    /// Mapping end (0 for an fd).
    pub end: u64,
    /// CLOCK_MONOTONIC ns of the unlink the agent saw before it found the file
    /// deleted (0 when it was deleted before the agent started).
    pub unlinked_ns: u64,
    /// CLOCK_MONOTONIC ns of the scan that found it.
    pub found_ns: u64,
    pub path: [u8; DELETED_PATH_MAX],
}

impl Default for DeletedValue {
    fn default() -> Self {
        DeletedValue {
            size: 0,
            blocks: 0,
            nlink: 0,
            path_cut: 0,
            end: 0,
            unlinked_ns: 0,
            found_ns: 0,
            path: [0; DELETED_PATH_MAX],
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain old data, every bit pattern valid.
    unsafe impl aya::Pod for super::DeletedKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DeletedValue {}
}
