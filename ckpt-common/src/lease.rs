//! Lease breaks: what the kernel forgets about them (when a break began, who broke it,
//! whether the holder was signalled), recorded by the lease tracepoint programs. The
//! lease itself (type, pending flags, deadlines) is read from the kernel's lists.

/// F_SETLEASE and F_GETLEASE fcntl commands.
pub const F_SETLEASE: u32 = 1024;
pub const F_GETLEASE: u32 = 1025;

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
    /// When this breaker first blocked, kept between a wait's end and the kernel's
    /// restart of it (0: not blocked yet).
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

/// One break of one lease, keyed by the lease's kernel address in `BREAKS`. Written
/// at break_lease_{block,noblock}, while the kernel still holds the inode's
/// `flc_lock`: the deadlines are the ones the kernel has just set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakRecord {
    /// CLOCK_MONOTONIC ns and jiffies when the break started, read together.
    pub started_ns: u64,
    pub started_jiffies: u64,
    /// The lease's `fl_break_time` / `fl_downgrade_time` as the break left them: a
    /// reader takes this record for the lease at that address only if they still
    /// match (memory is reused once a lease is freed).
    pub break_time: u64,
    pub downgrade_time: u64,
    pub owner: u64,
    /// The signal sent to the holder when the break started (0: none seen).
    pub signal: i32,
    pub notified: u8,
    /// Breakers listed in `breakers`; `breakers_total` counts all of them.
    pub n_breakers: u8,
    pub breakers_total: u16,
    pub breakers: [Breaker; MAX_BREAKERS],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C) plain data; any bytes are a valid value.
    unsafe impl aya::Pod for super::BreakCtx {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BreakRecord {}
}
