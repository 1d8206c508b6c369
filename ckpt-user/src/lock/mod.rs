//! File locks (POSIX, OFD, flock) and their blocked requests, like CRIU's
//! file-lock.c: the kernel's table as its lists hold it (`kernel`), the /proc/locks
//! text format (`proc_locks`, the fallback and what tests compare with), the dump of
//! locks, leases and waiters onto their descriptions (`dump`), the rows of
//! `ckpt-user locks` (`view`) and the wait-for graph with its deadlocks (`graph`).
//! Taking the locks back at restore is in `task::spawn` (each process takes its own).
//! The kind, type, range, owner and device types are ckpt-common's, re-exported here.

pub mod dump;
pub mod graph;
pub mod kernel;
pub mod proc_locks;
pub mod view;

pub use ckpt_common::{
    dev::KernelDev,
    lock::{HeldKind, LockKind, LockOwner, LockRange, LockType},
};

/// "start-end", or "start-EOF" to the end of the file; a range that is not valid
/// (from a damaged image) is shown as it is.
pub fn range_label(start: i64, end: i64) -> String {
    LockRange::new(start, end).map_or_else(|| format!("{start}-{end}"), |r| r.to_string())
}
