//! Lock events (kernel -> agent), the lock table (agent -> readers) and waiters
//! (kernel -> readers).

/// Kernel `fl_flags` bits (include/linux/filelock.h), identical from 6.1 to 6.18.
pub mod fl_flags {
    pub const FL_POSIX: u32 = 1;
    pub const FL_FLOCK: u32 = 2;
    pub const FL_DELEG: u32 = 4;
    pub const FL_LEASE: u32 = 32;
    pub const FL_CLOSE: u32 = 64;
    pub const FL_SLEEP: u32 = 128;
    pub const FL_DOWNGRADE_PENDING: u32 = 256;
    pub const FL_UNLOCK_PENDING: u32 = 512;
    pub const FL_OFDLCK: u32 = 1024;
}

/// `F_RDLCK`, `F_WRLCK`, `F_UNLCK` as the kernel stores them in `fl_type`.
pub mod fl_type {
    pub const F_RDLCK: u8 = 0;
    pub const F_WRLCK: u8 = 1;
    pub const F_UNLCK: u8 = 2;
}

/// Returned by posix_lock_inode/flock_lock_inode when the caller must sleep.
pub const FILE_LOCK_DEFERRED: i32 = 1;

/// Which tracepoint produced a [`LockEvent`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventSource {
    /// filelock:posix_lock_inode (POSIX and OFD locks, including unlock on close).
    Posix = 1,
    /// filelock:flock_lock_inode (flock, including unlock on last close).
    Flock = 2,
}

/// A successful lock request, as the kernel applied it. The agent replays these, in
/// order, through the kernel's own merge rules to maintain [`LockKey`] -> [`LockRecord`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockEvent {
    /// [`crate::tag::LOCK`].
    pub tag: u32,
    /// flock only, with `observed`: the `fl_pid` of that lock (0 when there is none).
    /// A same-type request from another task sharing the description changes nothing
    /// in the kernel, so the lock keeps the pid of whoever set it.
    pub observed_pid: u32,
    /// CLOCK_MONOTONIC ns (bpf_ktime_get_ns).
    pub ts_ns: u64,
    pub ino: u64,
    /// `fl_owner`: files_struct for POSIX locks, struct file for OFD and flock.
    pub owner: u64,
    pub start: i64,
    pub end: i64,
    /// Kernel dev_t (major << 20 | minor).
    pub dev: u32,
    /// `fl_pid` of the request.
    pub pid: u32,
    /// tgid of the task that made the request.
    pub tgid: u32,
    /// fd of the fcntl()/flock() call being served, or -1 (close, exit).
    pub fd: i32,
    pub flags: u32,
    pub ret: i32,
    /// An [`EventSource`] value.
    pub source: u8,
    pub lock_type: u8,
    /// flock only: the type of the lock this description holds *after* the request,
    /// read from the inode's flock list at the tracepoint (F_UNLCK: none), or
    /// [`NOT_OBSERVED`].
    pub observed: u8,
    pub _pad: [u8; 5],
}

/// `LockEvent::observed` when the list could not be read.
pub const NOT_OBSERVED: u8 = 0xff;

/// What kind of lock a record is. Values are stable: they are stored in pinned maps.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LockKind {
    Posix = 1,
    Ofd = 2,
    Flock = 3,
}

impl LockKind {
    pub const fn from_u8(v: u8) -> Option<LockKind> {
        match v {
            1 => Some(LockKind::Posix),
            2 => Some(LockKind::Ofd),
            3 => Some(LockKind::Flock),
            _ => None,
        }
    }

    /// The kind of a request, from its `fl_flags`.
    pub const fn from_fl_flags(flags: u32) -> Option<LockKind> {
        if flags & fl_flags::FL_OFDLCK != 0 {
            Some(LockKind::Ofd)
        } else if flags & fl_flags::FL_POSIX != 0 {
            Some(LockKind::Posix)
        } else if flags & fl_flags::FL_FLOCK != 0 {
            Some(LockKind::Flock)
        } else {
            None
        }
    }
}

/// Key of one held lock in the `LOCKS` map. A POSIX owner holds several disjoint
/// ranges on one inode, so the range start is part of the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockKey {
    pub dev: u32,
    /// A [`LockKind`] value.
    pub kind: u8,
    pub _pad: [u8; 3],
    pub ino: u64,
    /// Kernel owner identity, or a synthetic one for locks imported from /proc/locks
    /// (see [`Origin::Reconciled`]).
    pub owner: u64,
    pub start: i64,
}

/// How the agent learned of a lock.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Seen by the tracer: everything is exact.
    Traced = 1,
    /// Imported from /proc/locks because it was taken before tracing started: the
    /// kernel owner identity and acquisition time are unknown.
    Reconciled = 2,
}

/// Value of one held lock in the `LOCKS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockRecord {
    pub end: i64,
    /// CLOCK_MONOTONIC ns when this range was acquired (0 when unknown).
    pub since_ns: u64,
    /// `fl_pid` as /proc/locks would show it (creator for flock/OFD).
    pub pid: u32,
    /// fd the lock was taken through, or -1 when unknown.
    pub fd: i32,
    pub lock_type: u8,
    /// An [`Origin`] value.
    pub origin: u8,
    pub _pad: [u8; 6],
}

/// A task blocked in F_SETLKW / F_OFD_SETLKW / flock(LOCK_EX|LOCK_SH without NB),
/// keyed by thread id in `WAITERS`. Inserted when the kernel defers the request,
/// removed when the syscall returns (granted, interrupted or failed) or the task exits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Waiter {
    /// CLOCK_MONOTONIC ns when the task first blocked on this request.
    pub since_ns: u64,
    pub ino: u64,
    pub owner: u64,
    /// Kernel address of the blocking lock (opaque; used only to tell blockers apart).
    pub blocker: u64,
    pub start: i64,
    pub end: i64,
    pub dev: u32,
    pub tgid: u32,
    pub tid: u32,
    pub flags: u32,
    pub fd: i32,
    pub lock_type: u8,
    pub _pad: [u8; 3],
}

/// Per-thread context of an fcntl()/flock() call, keyed by thread id, so that lock
/// events can name the fd they came through. A thread keeps its entry between calls,
/// marked inactive: a lookup and a store per call cost far less than an insert and a
/// delete.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallCtx {
    pub fd: i32,
    pub cmd: u32,
    pub arg: u64,
    /// Lease named by generic_add_lease/generic_delete_lease during this call
    /// (F_SETLEASE): its inode and owner. `lease_dev == 0` when none.
    pub lease_ino: u64,
    pub lease_owner: u64,
    pub lease_dev: u32,
    /// 1 once this call recorded a blocked waiter in `WAITERS` (only then is there one
    /// to remove at syscall exit).
    pub waited: u8,
    /// 1 from syscall entry to syscall exit: the other fields describe the call the
    /// thread is in. 0 between calls.
    pub active: u8,
    pub _pad: [u8; 2],
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::LockEvent {}
    unsafe impl aya::Pod for super::LockKey {}
    unsafe impl aya::Pod for super::LockRecord {}
    unsafe impl aya::Pod for super::Waiter {}
    unsafe impl aya::Pod for super::SyscallCtx {}
}
