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

/// `FdRecord::fd` of a description found through a memory mapping, not an fd (the
/// lock-table iterator's mapping walk; only `tgid`, `file`, `ino` and `s_dev` are
/// filled, and `pos` and `size` hold the mapping's start and end).
pub const MAPPING_FD: u32 = u32::MAX;

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
    /// Not a lock: the lists had more than `LOCK_WALK_STEPS` entries, or the fd more
    /// than `LOCK_LINES_PER_FD` locks and waiters, and were not walked to the end;
    /// userspace reads that fd's fdinfo instead.
    pub const TRUNCATED: u32 = 3;
    /// Not a lock: the lists changed under the walk (a link or a second read did not
    /// agree); userspace reads that fd's fdinfo instead.
    pub const UNSTABLE: u32 = 4;
}

/// Most steps (held locks and blocked requests, and climbs back up a tree of blocked
/// requests) of one lock list walked per fd; past it a `list::TRUNCATED` line follows.
/// Each fd's walk steps through every lock of its inode's list (another process's
/// too), so this bounds the walks of N fds on one inode at N times it: a file with
/// 1,000 lockers takes about 10^6 steps (~0.2 s); one with more than this many locks
/// and waiters comes from fdinfo.
pub const LOCK_WALK_STEPS: usize = 4096;

/// Bytes an iterator program may write for one object: the kernel's seq buffer (8
/// pages; 4 KiB ones here, larger elsewhere). More fails the whole read (E2BIG).
pub const ITER_OBJECT_BYTES: usize = 8 * 4096;

/// Most lines one fd's walk writes (its own locks and their waiters), so that they,
/// its record with a full path, its process's record and a marker fit one object's
/// output; past it a `list::TRUNCATED` line follows.
pub const LOCK_LINES_PER_FD: usize =
    (ITER_OBJECT_BYTES - FD_RECORD_SIZE - PATH_MAX - TASK_RECORD_SIZE) / LOCK_LINE_SIZE - 1;

/// Bytes of a lock (from its start) read at once by the lock walks: every field they
/// need lies in them (checked at load time).
pub const LOCK_SPAN: usize = 192;

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
    /// 1 when the inode has no name but may be given one (`I_LINKABLE`: made by
    /// O_TMPFILE without O_EXCL and never linked), as `linkat(AT_EMPTY_PATH)` allows.
    pub linkable: u32,
    pub reserved: u32,
}

/// A lock or lease of the inode held through this fd's description (what its fdinfo
/// `lock:` line shows: the same filter as the kernel's show_fd_locks), or a request
/// blocked on one (`blocker != 0`), as the kernel's lists hold them. Lines of one
/// held lock's blocked requests follow it, depth first.
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
    /// Kernel address of this lock object: the same lock seen through several fds
    /// (dup, fork) is one lock.
    pub lock: u64,
    /// For a blocked request: the address of what it waits behind (a held lock, or
    /// another blocked request it conflicts with); 0 for a held lock.
    pub blocker: u64,
    /// The request's or lock's struct file.
    pub file: u64,
    /// Leases: `fl_break_time` / `fl_downgrade_time` (absolute jiffies, 0 = none),
    /// and jiffies and CLOCK_MONOTONIC ns read together at this line.
    pub break_time: u64,
    pub downgrade_time: u64,
    pub jiffies: u64,
    pub now_ns: u64,
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
    /// One lock read twice (a lock is reported only when both reads agree), and the
    /// lock context, as read (u64s: aligned like the kernel's).
    pub lock: [u64; LOCK_SPAN / 8],
    pub again: [u64; LOCK_SPAN / 8],
    pub walk: WalkState,
}

/// Where the lock-list walk is between its steps (eBPF only). In the per-CPU scratch
/// rather than on the stack: the verifier does not track map memory, so the steps'
/// states converge at once instead of after every combination of these values.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct WalkState {
    /// The description and fd table whose locks are wanted.
    pub f: u64,
    pub files: u64,
    /// The list head, the node the walk is at, and the link it came from.
    pub head: u64,
    pub node: u64,
    pub prev_link: u64,
    /// The held lock whose tree is being walked, the request being visited, the
    /// blocker it must name and the link its `prev` must point at.
    pub root: u64,
    pub cur: u64,
    pub parent: u64,
    pub expect_prev: u64,
    pub which: u32,
    pub mode: u32,
    /// 1 once a line was written.
    pub wrote: u32,
    /// Lines this fd's walk wrote, over its lists (at most `LOCK_LINES_PER_FD`).
    pub lines: u32,
    /// 0 while walking, then 1 (the list's end) or 2 (cut short).
    pub done: u32,
}

// The walk's lines, with the marker and the records that share their object, fit the
// kernel's buffer, and leave room for many locks per fd.
const _: () = assert!(
    (LOCK_LINES_PER_FD + 1) * LOCK_LINE_SIZE + FD_RECORD_SIZE + PATH_MAX + TASK_RECORD_SIZE
        <= ITER_OBJECT_BYTES
);
const _: () = assert!(LOCK_LINES_PER_FD >= 200);
