//! Records of the task_file iterator: one per fd of the process a link is aimed at
//! (and one for the process itself), read by `ckpt-user dump` in one pass instead of
//! four /proc reads per fd.

/// Longest path the iterator emits (the kernel's PATH_MAX); longer ones come out empty.
pub const PATH_MAX: usize = 4096;

/// Record tags: an `FdRecord` is followed by the `LockLine`s of its fd; a session's
/// first fd is preceded by the process's `TaskRecord`.
pub mod tag {
    pub const FD: u32 = 1;
    pub const LOCK: u32 = 2;
    pub const TASK: u32 = 3;
}

/// `task_struct.flags` bit of a process that is exiting.
pub const PF_EXITING: u32 = 0x4;

/// The process whose fds follow: what /proc/PID/status and comm show, and the
/// identities that change with exec (`exec_id`), with new credentials (`cred`, which
/// covers the supplementary groups) and with chdir (`pwd_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskRecord {
    pub tag: u32,
    pub tgid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
    pub flags: u32,
    pub exit_state: u32,
    pub _pad: u32,
    pub exec_id: u64,
    pub cred: u64,
    pub pwd_mnt: u64,
    pub pwd_dentry: u64,
    pub comm: [u8; 16],
}

pub const TASK_RECORD_SIZE: usize = core::mem::size_of::<TaskRecord>();

/// Which of the inode's lock lists a `LockLine` came from.
pub mod list {
    pub const POSIX: u32 = 0;
    pub const FLOCK: u32 = 1;
    pub const LEASE: u32 = 2;
    /// Not a lock: the lists had more than `LOCK_LIST_MAX` entries and were not
    /// walked to the end.
    pub const TRUNCATED: u32 = 3;
}

/// Most entries of one lock list walked per fd; past it a `list::TRUNCATED` line
/// follows and userspace reads that fd's fdinfo instead.
pub const LOCK_LIST_MAX: usize = 48;

/// Bytes of a lock (from its start) and of a lock context read at once by the
/// iterator's lock walk: every field it needs lies in them (checked at load time).
pub const LOCK_SPAN: usize = 192;
pub const LOCK_CTX_SPAN: usize = 64;

/// One fd, as the kernel's structs show it while the iterator holds the fd table.
/// `path_len` bytes of path (NUL included; 0 when none) follow each record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdRecord {
    pub tag: u32,
    pub tgid: u32,
    pub fd: u32,
    pub path_len: u32,
    /// The open file description (struct file *): fds with the same one share offset,
    /// flags, OFD/flock locks and leases. Also the owner of OFD and flock locks.
    pub file: u64,
    /// The fd table (struct files_struct *): the owner of POSIX locks.
    pub files: u64,
    pub pos: i64,
    pub size: i64,
    pub blocks: u64,
    pub ino: u64,
    pub mtime_sec: i64,
    pub ctime_sec: i64,
    pub mtime_nsec: u32,
    pub ctime_nsec: u32,
    /// f_flags, plus O_CLOEXEC when this fd is close-on-exec (as fdinfo shows them).
    pub flags: u32,
    pub f_mode: u32,
    /// The superblock's device (the one locks and /proc/locks name).
    pub s_dev: u32,
    pub nlink: u32,
    pub generation: u32,
    pub mnt_id: i32,
    /// F_GETOWN_EX: the owner's pid and pid type (0 when none), and F_GETSIG.
    pub owner_pid: i32,
    pub owner_type: u32,
    pub signum: u32,
    pub i_mode: u32,
}

/// A lock or lease of the inode held through this fd's description: what its fdinfo
/// `lock:` line shows (the same filter as the kernel's show_fd_locks).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockLine {
    pub tag: u32,
    pub list: u32,
    pub flags: u32,
    pub lock_type: u32,
    pub pid: i32,
    pub _pad: u32,
    pub start: i64,
    pub end: i64,
    pub owner: u64,
}

pub const LOCK_LINE_SIZE: usize = core::mem::size_of::<LockLine>();

/// Bytes of an `FdRecord` on the wire.
pub const FD_RECORD_SIZE: usize = core::mem::size_of::<FdRecord>();

/// The iterator's scratch space: a record and room for its path, written with one
/// `bpf_seq_write`.
#[repr(C)]
pub struct FdScratch {
    pub record: FdRecord,
    pub path: [u8; PATH_MAX],
    pub line: LockLine,
    pub task: TaskRecord,
    /// One lock, then the lock context, as read (u64s: aligned like the kernel's).
    pub lock: [u64; LOCK_SPAN / 8],
    pub ctx: [u64; LOCK_CTX_SPAN / 8],
}
