//! File locks (POSIX, OFD, flock) and their blocked requests, like CRIU's
//! file-lock.c: the kernel's table as its lists hold it (`kernel`), the /proc/locks
//! text format (`proc_locks`, the fallback and what tests compare with), the dump of
//! locks, leases and waiters onto their descriptions (`dump`), the rows of
//! `ckpt-user locks` (`view`) and the wait-for graph with its deadlocks (`graph`).
//! Taking the locks back at restore is in `task::spawn` (each process takes its own).
//! The kind, type and device types are ckpt-common's, re-exported here.

pub mod dump;
pub mod graph;
pub mod kernel;
pub mod proc_locks;
pub mod view;

pub use ckpt_common::{
    dev::KernelDev,
    lock::{HeldKind, LockKind, LockType},
};

/// Largest file offset; the kernel's OFFSET_MAX ("EOF" in /proc/locks).
pub const OFFSET_MAX: i64 = i64::MAX;
