//! Locks as the kernel keeps them (flag and type values), and what the tracer records
//! of them that the kernel forgets: when a blocked request began to wait
//! ([`WaitStart`]) and, opt-in, when a lock was taken ([`HoldStart`]).

/// Kernel `fl_flags` bits (include/linux/filelock.h), identical from 6.1 to 6.18.
pub mod fl_flags {
    pub const FL_POSIX: u32 = 1;
    pub const FL_FLOCK: u32 = 2;
    pub const FL_DELEG: u32 = 4;
    pub const FL_ACCESS: u32 = 8;
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

/// What kind of lock a record is.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LockKind {
    Posix = 1,
    Ofd = 2,
    Flock = 3,
}

impl LockKind {
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

/// When a thread's blocked request began to wait, keyed by thread id in `WAITS`.
///
/// Written when the kernel defers a request (`FILE_LOCK_DEFERRED`), or by the lease
/// break programs for a blocked breaker. The kernel allocates a new request when it
/// restarts an interrupted wait (after a freeze, a stop, a signal handler with
/// SA_RESTART): a deferral with the same identity (owner, inode, range, type) as the
/// thread's entry is that restart and keeps `since_ns`. The entry is dropped when the
/// wait ends without a restart: the request returns from the lock call granted or
/// failed (same `request`), a handler without SA_RESTART runs, or the thread exits.
/// Readers use an entry only for the request it names, found in the kernel's blocked
/// tree, so a wait is shown exactly as long as the kernel has it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WaitStart {
    /// CLOCK_MONOTONIC ns when the thread first blocked on this request.
    pub since_ns: u64,
    /// Kernel address of the blocked request (the `lock` of its line in the tree).
    pub request: u64,
    pub owner: u64,
    pub ino: u64,
    pub start: i64,
    pub end: i64,
    pub dev: u32,
    pub tgid: u32,
    pub flags: u32,
    pub lock_type: u8,
    pub _pad: [u8; 3],
}

impl WaitStart {
    /// Whether `other` asks for the same thing (a restart of this wait).
    pub fn same_request(&self, other: &WaitStart) -> bool {
        self.owner == other.owner
            && self.ino == other.ino
            && self.dev == other.dev
            && self.start == other.start
            && self.end == other.end
            && self.lock_type == other.lock_type
            && self.flags & !fl_flags::FL_SLEEP == other.flags & !fl_flags::FL_SLEEP
    }
}

/// How a wait ended, as the tracer saw it (`WaitEnd::how`).
pub mod wait_end {
    /// The request came back from the lock call granted.
    pub const GRANTED: u8 = 1;
    /// The request came back refused (EDEADLK, say).
    pub const REFUSED: u8 = 2;
    /// A signal handler without SA_RESTART ran: the call returns EINTR.
    pub const INTERRUPTED: u8 = 3;
    /// The thread exited while waiting.
    pub const EXITED: u8 = 4;
    /// A lease breaker was woken (the lease went, was downgraded or timed out, or a
    /// signal came). Not final: if leases still conflict the kernel blocks it again on
    /// the same request and its wait goes on with the same start, which readers see
    /// as a `WAITS` entry with the same `since_ns`.
    pub const UNBLOCKED: u8 = 5;
}

/// A wait that ended, in the `WAIT_ENDS` ring: slot `seq % capacity::WAIT_ENDS`.
///
/// The ring exists because a wait can begin and end between two looks of a reader
/// (the agent looks every 100 ms): the kernel keeps nothing of it afterwards. Several
/// readers follow it at once, each with its own position; a slot is overwritten one
/// lap later, so a reader that falls a lap behind says how many it lost. A slot being
/// rewritten while read is caught by reading it twice.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WaitEnd {
    /// 1 + the index of this end among all ends recorded (0: an empty slot).
    pub seq: u64,
    /// CLOCK_MONOTONIC ns at the end.
    pub ended_ns: u64,
    pub wait: WaitStart,
    pub tid: u32,
    /// A `wait_end` value.
    pub how: u8,
    pub _pad: [u8; 3],
}

/// Upper bounds (ns) of the tracer's wait-time histogram buckets (`WAIT_HIST`); a
/// last bucket takes the rest.
pub const WAIT_BUCKETS_NS: [u64; 14] = [
    1_000_000,
    5_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
    300_000_000_000,
];

/// Slots of the per-CPU `WAIT_HIST` array: one count per bucket (the last is +Inf),
/// then the sum of the waits in ns, then their number.
pub mod wait_hist {
    pub const BUCKETS: u32 = super::WAIT_BUCKETS_NS.len() as u32 + 1;
    pub const SUM_NS: u32 = BUCKETS;
    pub const COUNT: u32 = BUCKETS + 1;
    pub const SLOTS: u32 = BUCKETS + 2;
}

/// Opt-in (`ckpt-agent --hold-times`): when a held lock object was created or first
/// seen holding, keyed by its kernel address in `HOLDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldStart {
    pub since_ns: u64,
    /// Owner of the lock at that time: a reader ignores an entry whose owner differs
    /// from the lock now at that address (the memory was reused).
    pub owner: u64,
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::WaitStart {}
    unsafe impl aya::Pod for super::HoldStart {}
    unsafe impl aya::Pod for super::WaitEnd {}
}
