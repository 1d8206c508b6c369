//! Leases (F_SETLEASE): events (kernel -> agent), the lease table (agent -> readers)
//! and the per-breaker context the programs keep while a break is being set up.

/// F_SETLEASE and F_SETSIG fcntl commands.
pub const F_SETLEASE: u32 = 1024;
pub const F_GETLEASE: u32 = 1025;

/// What a [`LeaseEvent`] reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseWhat {
    /// F_SETLEASE RDLCK/WRLCK succeeded: a new lease, or the holder changed its type.
    Set = 1,
    /// F_SETLEASE F_UNLCK succeeded.
    Released = 2,
    /// A conflicting open/truncate is breaking the lease (or joins a break in progress);
    /// the lease fields are read from the kernel's lease object after the kernel set
    /// the pending flag and deadline.
    Breaking = 3,
    /// time_out_leases found the deadline past: downgraded to RDLCK or removed.
    TimedOut = 4,
}

impl LeaseWhat {
    pub const fn from_u32(v: u32) -> Option<LeaseWhat> {
        match v {
            1 => Some(LeaseWhat::Set),
            2 => Some(LeaseWhat::Released),
            3 => Some(LeaseWhat::Breaking),
            4 => Some(LeaseWhat::TimedOut),
            _ => None,
        }
    }
}

/// One lease event in the LOCK_EVENTS ring.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseEvent {
    /// [`crate::tag::LEASE`].
    pub tag: u32,
    /// A [`LeaseWhat`] value.
    pub what: u32,
    /// CLOCK_MONOTONIC ns and jiffies, read together.
    pub ts_ns: u64,
    pub jiffies: u64,
    pub ino: u64,
    /// The lease's owner: the struct file it was set through.
    pub owner: u64,
    /// Kernel fl_break_time / fl_downgrade_time (absolute jiffies, 0 = none).
    pub break_time: u64,
    pub downgrade_time: u64,
    pub dev: u32,
    /// Holder pid (the lease's fl_pid) when known.
    pub pid: u32,
    /// Task that caused the event (holder for Set/Released, breaker for Breaking).
    pub tgid: u32,
    pub tid: u32,
    /// fd of the F_SETLEASE call (Set/Released), else -1.
    pub fd: i32,
    pub flags: u32,
    /// Set: the new type. Breaking: the type the lease has (its pre-break type).
    /// TimedOut: the type it times out to (F_RDLCK or F_UNLCK).
    pub lease_type: u8,
    /// Breaking: the breaker wants to write (F_WRLCK) or read (F_RDLCK).
    pub breaker_type: u8,
    /// Breaking: the breaker opened with O_NONBLOCK (break_lease_noblock).
    pub nonblock: u8,
    pub _pad: u8,
    /// Breaking: the signal the kernel sent the holder for this break (0 if none: the
    /// break was already in progress), and signal_generate's result.
    pub signal: i32,
    pub signal_result: i32,
    pub _pad2: u32,
}

/// Up to this many leases per breaker are followed through one break (a writer
/// opening a file read-leased by many processes); more are counted as lost.
/// A power of two: the programs mask indexes with it for the verifier.
pub const MAX_BREAK_LEASES: usize = 8;
const _: () = assert!(MAX_BREAK_LEASES.is_power_of_two());

/// Per-thread context between leases_conflict and break_lease_{block,noblock}.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakCtx {
    pub ts_ns: u64,
    /// When this breaker first blocked (kept across the kernel's wait restarts).
    pub block_since_ns: u64,
    /// The breaker's temporary lease (identifies this break attempt).
    pub breaker: u64,
    pub leases: [u64; MAX_BREAK_LEASES],
    pub signals: [i32; MAX_BREAK_LEASES],
    pub signal_results: [i32; MAX_BREAK_LEASES],
    pub n: u32,
    pub breaker_type: u8,
    pub _pad: [u8; 3],
}

/// Key of one lease in the `LEASES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseKey {
    pub dev: u32,
    pub _pad: u32,
    pub ino: u64,
    pub owner: u64,
}

/// State of a lease as /proc/locks would name it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    Active = 1,
    Breaking = 2,
}

/// A task breaking a lease.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Breaker {
    pub since_ns: u64,
    pub pid: u32,
    pub tid: u32,
    /// F_WRLCK (open for write/truncate) or F_RDLCK (open for read).
    pub breaker_type: u8,
    pub nonblock: u8,
    pub _pad: [u8; 6],
}

pub const MAX_BREAKERS: usize = 4;

/// Value of one lease in the `LEASES` map, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseRecord {
    /// CLOCK_MONOTONIC ns when granted (0 when unknown: reconciled).
    pub granted_ns: u64,
    /// When the current break started (0 when not breaking).
    pub break_started_ns: u64,
    /// The kernel's deadline (absolute jiffies) and its CLOCK_MONOTONIC equivalent.
    pub deadline_jiffies: u64,
    pub deadline_ns: u64,
    pub pid: u32,
    pub fd: i32,
    /// /proc/sys/fs/lease-break-time (s) in force when the break started.
    pub lease_break_time_s: u32,
    /// Signal sent to the holder when the break started (0: none seen).
    pub signal: i32,
    /// The lease's own type: while breaking, the type it had before the break.
    pub lease_type: u8,
    /// While breaking: F_UNLCK or F_RDLCK; when active: equal to lease_type.
    pub target_type: u8,
    /// A [`LeaseState`] value.
    pub state: u8,
    /// A [`crate::lock::Origin`] value.
    pub origin: u8,
    /// 1 when the holder was sent its break signal.
    pub notified: u8,
    /// Breakers recorded in `breakers`; `breakers_total` counts all of them.
    pub n_breakers: u8,
    pub breakers_total: u16,
    pub _pad: u32,
    pub breakers: [Breaker; MAX_BREAKERS],
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::LeaseEvent {}
    unsafe impl aya::Pod for super::LeaseKey {}
    unsafe impl aya::Pod for super::LeaseRecord {}
    unsafe impl aya::Pod for super::BreakCtx {}
}
