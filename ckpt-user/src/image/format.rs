//! The image's content, serialised with MessagePack (rmp-serde).
//!
//! File layout (all integers little-endian):
//! ```text
//! 0       magic "CKPTIMG\0"
//! 8       format version (u32), reserved (u32)
//! 16      contents of deleted files, back to back (referenced by offset and length)
//! M       metadata: `Image` as MessagePack
//! end-88  M (u64), metadata length (u64),
//!         key id (8 bytes), HMAC-SHA256 with the host key of every byte before it,
//!         SHA-256 of every byte before it
//! ```
//! Version 1 (still read, never written) has no key id and MAC: its trailer is 48
//! bytes (M, length, SHA-256). Contents come first so that they can be streamed in
//! while the metadata is still being collected; the trailer makes the metadata easy to
//! find, the whole file verifiable (SHA-256) and its origin checkable (the MAC, see
//! `key`).

use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"CKPTIMG\0";
/// The version written; versions 1 to this one are read.
pub const VERSION: u32 = 2;
pub const HEADER_LEN: u64 = 16;
/// Trailer length of the version written.
pub const TRAILER_LEN: u64 = 88;

/// Trailer length of a format version (None: not a version this code knows).
pub fn trailer_len(version: u32) -> Option<u64> {
    match version {
        1 => Some(48),
        2 => Some(TRAILER_LEN),
        _ => None,
    }
}

/// A checkpoint of the file state of every process in a cgroup.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Image {
    /// Unique id (also given to --snapshot-cmd as CKPT_IMAGE_ID).
    pub id: String,
    pub created_unix_ns: u64,
    pub hostname: String,
    pub kernel: String,
    /// The cgroup directory that was dumped.
    pub cgroup: String,
    /// CLOCK_MONOTONIC when the cgroup was frozen; lease deadlines are relative to it.
    pub frozen_monotonic_ns: u64,
    /// How long the cgroup stayed frozen.
    pub frozen_ns: u64,
    /// "agent" (live maps, cross-checked with /proc) or "proc" (no agent running).
    pub source: String,
    /// What this image lacks because no agent was running.
    pub missing: Vec<String>,
    pub processes: Vec<Process>,
    /// Open file descriptions; fds that share one refer to the same entry.
    pub files: Vec<OpenFile>,
    pub locks: Vec<Lock>,
    pub waiters: Vec<Waiter>,
    pub leases: Vec<Lease>,
    /// Deleted-but-open files and where their contents are in the image.
    pub ghosts: Vec<Ghost>,
    /// What each regular file looked like, for the restore-time consistency check.
    pub fingerprints: Vec<Fingerprint>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
    pub cmdline: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
    pub groups: Vec<u32>,
    pub fds: Vec<Fd>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fd {
    pub fd: i32,
    /// Index into `Image::files`.
    pub file: u32,
    pub cloexec: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    Regular,
    Directory,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    Symlink,
    #[default]
    Other,
}

/// An open file description (struct file).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenFile {
    pub id: u32,
    /// The path the kernel reports (without " (deleted)").
    pub path: String,
    pub kind: FileKind,
    /// Open flags (O_ACCMODE, O_APPEND, O_NONBLOCK ...) as in fdinfo, without O_CLOEXEC.
    pub flags: u32,
    pub pos: u64,
    pub mnt_id: u32,
    pub mode: u32,
    pub dev: KernelDev,
    pub ino: u64,
    /// F_GETOWN_EX: (type, pid); type 0 = thread, 1 = process, 2 = process group.
    pub owner: Option<(i32, i32)>,
    /// F_GETSIG (0 = SIGIO).
    pub sig: i32,
    /// Unlinked while open (its contents are in a `Ghost`).
    pub deleted: bool,
    /// Its name was unlinked while another hard link keeps the inode: reopened by its
    /// file handle, not its path.
    #[serde(default)]
    pub unlinked: bool,
    /// name_to_handle_at: (handle type, bytes), when the filesystem supports it.
    pub handle: Option<(i32, Vec<u8>)>,
    /// Every (pid, fd) referring to this description.
    pub holders: Vec<(u32, i32)>,
}

// The domain types, as ckpt-common defines them once (serialised by name).
pub use ckpt_common::{
    dev::KernelDev,
    lock::{HeldKind, LockKind, LockType},
};

/// A held lock. POSIX locks belong to a process; OFD and flock locks to an open file
/// description (shared by every fd and process referring to it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    pub kind: LockKind,
    #[serde(rename = "type")]
    pub lock_type: LockType,
    pub start: i64,
    /// OFFSET_MAX (i64::MAX) for "to EOF".
    pub end: i64,
    /// The owning process (POSIX) or the creator (OFD, flock).
    pub pid: u32,
    /// The description it was taken through / belongs to (index into `files`).
    pub file: u32,
    pub dev: KernelDev,
    pub ino: u64,
}

/// A task blocked on a lock or lease at the freeze.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiter {
    pub pid: u32,
    pub tid: u32,
    pub kind: HeldKind,
    #[serde(rename = "type")]
    pub lock_type: LockType,
    pub start: i64,
    pub end: i64,
    pub dev: KernelDev,
    pub ino: u64,
    /// How long it had been blocked when frozen (None without an agent).
    pub waited_ns: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Breaker {
    pub pid: u32,
    pub tid: u32,
    /// Whether it opened for writing (or truncated) rather than reading.
    pub write: bool,
    pub nonblock: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The description holding it (index into `files`).
    pub file: u32,
    pub pid: u32,
    /// The lease's own type; while breaking, its type before the break (None if unknown).
    #[serde(rename = "type")]
    pub lease_type: Option<LockType>,
    pub breaking: bool,
    /// While breaking: Read (downgrade) or None (unlock).
    pub target_type: Option<LockType>,
    /// Time left before the kernel's deadline at the freeze instant (None if unknown).
    pub remaining_ns: Option<i64>,
    /// lease-break-time (s) in force when the break started.
    pub lease_break_time_s: Option<u32>,
    /// A writer broke it while it was being downgraded: the downgrade's time left at
    /// the freeze instant (the kernel keeps both deadlines; `remaining_ns` is the
    /// unlock one). None otherwise, and in images made before this field.
    #[serde(default)]
    pub downgrade_remaining_ns: Option<i64>,
    pub notified: bool,
    pub signal: Option<i32>,
    pub breakers: Vec<Breaker>,
}

/// A deleted-but-open file and its contents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ghost {
    pub dev: KernelDev,
    pub ino: u64,
    /// The path it had.
    pub path: String,
    pub size: u64,
    pub mode: u32,
    /// Data extents (offset in the file, length), holes elsewhere.
    pub extents: Vec<(u64, u64)>,
    /// Where the extents' bytes are in the image, back to back.
    pub data_offset: u64,
    /// The inode's owner (images written before this field: the holder's).
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    /// Made by O_TMPFILE without O_EXCL and never linked: its holders may still give it
    /// a name (`linkat`), so the restored one must allow that too.
    #[serde(default)]
    pub linkable: bool,
    /// A memfd (memfd_create), recreated as one.
    #[serde(default)]
    pub memfd: Option<Memfd>,
    /// Memory mappings of it in the dumped processes. A file held only by mappings has
    /// no `OpenFile`: its bytes are kept, but a spawn-mode restore cannot map them.
    #[serde(default)]
    pub maps: Vec<GhostMap>,
}

/// What memfd_create(2) and F_ADD_SEALS take back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memfd {
    /// The name given to memfd_create (without the "memfd:" prefix).
    pub name: String,
    /// F_GET_SEALS (F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE, ...).
    pub seals: u32,
}

/// One mapping of a deleted file, as /proc/PID/maps shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GhostMap {
    pub pid: u32,
    pub start: u64,
    pub end: u64,
    /// Offset in the file of `start`.
    pub offset: u64,
    /// "rw-p" and the like.
    pub perms: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub path: String,
    pub dev: KernelDev,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub handle: Option<(i32, Vec<u8>)>,
    /// SHA-256 of the contents (with --hash).
    pub sha256: Option<String>,
    /// `path` was unlinked and another link keeps the file: checked through `handle`.
    #[serde(default)]
    pub unlinked: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Images written when a waiter's kind and device were free strings still read,
    /// as the one kind and device types; an unknown kind or a malformed device is
    /// refused, not carried along.
    #[test]
    fn a_waiter_kind_and_device_are_written_as_before() {
        #[derive(Serialize)]
        struct OldWaiter<'a> {
            pid: u32,
            tid: u32,
            kind: &'a str,
            #[serde(rename = "type")]
            lock_type: &'a str,
            start: i64,
            end: i64,
            dev: &'a str,
            ino: u64,
            waited_ns: Option<u64>,
        }
        let old = |kind| OldWaiter {
            pid: 1,
            tid: 2,
            kind,
            lock_type: "write",
            start: 0,
            end: 9,
            dev: "8:1",
            ino: 7,
            waited_ns: Some(5),
        };
        let bytes = rmp_serde::to_vec_named(&old("lease")).unwrap();
        let w: Waiter = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(w.kind, HeldKind::Lease);
        assert_eq!(w.lock_type, LockType::Write);
        assert_eq!(rmp_serde::to_vec_named(&w).unwrap(), bytes);
        assert_eq!(w.dev, KernelDev::new(8, 1));
        let bytes = rmp_serde::to_vec_named(&old("posixx")).unwrap();
        assert!(rmp_serde::from_slice::<Waiter>(&bytes).is_err());
        let mut bad_dev = old("posix");
        bad_dev.dev = "sda1";
        let bytes = rmp_serde::to_vec_named(&bad_dev).unwrap();
        assert!(rmp_serde::from_slice::<Waiter>(&bytes).is_err());
    }
}
