//! File locks: the kernel's table as its lists hold it (`kernel`), the /proc/locks
//! text format (`proc_locks`, the fallback and what tests compare with) and plain
//! value types shared by the readers.

pub mod kernel;
pub mod proc_locks;

pub use ckpt_common::lock::{HeldKind, LockKind, LockType};

/// Kernel dev_t (as in tracepoints and /proc/locks: major << 20 | minor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KernelDev(pub u32);

impl KernelDev {
    pub fn new(major: u32, minor: u32) -> KernelDev {
        KernelDev((major << 20) | (minor & 0xfffff))
    }
    pub fn major(self) -> u32 {
        self.0 >> 20
    }
    pub fn minor(self) -> u32 {
        self.0 & 0xfffff
    }
    /// From a userspace `st_dev` (glibc encoding).
    pub fn from_st_dev(dev: u64) -> KernelDev {
        KernelDev::new(libc::major(dev), libc::minor(dev))
    }
}

impl std::fmt::Display for KernelDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major(), self.minor())
    }
}

/// Largest file offset; the kernel's OFFSET_MAX ("EOF" in /proc/locks).
pub const OFFSET_MAX: i64 = i64::MAX;

/// Whether thread `tid` of `tgid` is still inside a lock call: fcntl or flock, or an
/// open or truncate blocked on a lease break (`/proc/PID/task/TID/syscall` names the
/// call a sleeping thread is in; "running" counts as inside, as between a signal
/// handler and a restart). None when the thread is gone.
pub fn in_lock_call(tgid: u32, tid: u32) -> Option<bool> {
    let s = std::fs::read_to_string(format!("/proc/{tgid}/task/{tid}/syscall")).ok()?;
    let Some(nr) = s
        .split_whitespace()
        .next()
        .and_then(|n| n.parse::<i64>().ok())
    else {
        return Some(true);
    };
    Some(
        [
            libc::SYS_fcntl,
            libc::SYS_flock,
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_openat2,
            libc::SYS_truncate,
        ]
        .contains(&nr),
    )
}
