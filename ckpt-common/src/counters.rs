//! Indexes of the per-CPU event counters kept by the programs (`COUNTERS`) and of the
//! agent's own statistics (`AGENT_STATS`). A full map or ring buffer is counted here so
//! that loss is never silent.

/// Per-CPU counters written by the eBPF programs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// filelock tracepoint hits handled.
    EventsSeen = 0,
    /// Lock-change events submitted to the ring buffer.
    EventsEmitted = 1,
    /// Lock-change events lost because the ring buffer was full.
    RingBufFull = 2,
    /// Waiters not recorded because WAITERS was full.
    WaitersFull = 3,
    /// Syscall contexts not recorded because SYSCALL_CTX was full.
    SyscallCtxFull = 4,
    /// Lease breaks not followed because BREAK_CTX was full.
    BreakCtxFull = 5,
    /// Leases beyond MAX_BREAK_LEASES in one break, not followed.
    BreakLeasesOverflow = 6,
}

impl Counter {
    pub const COUNT: u32 = 7;

    pub const fn name(self) -> &'static str {
        match self {
            Counter::EventsSeen => "events_seen",
            Counter::EventsEmitted => "events_emitted",
            Counter::RingBufFull => "ringbuf_full",
            Counter::WaitersFull => "waiters_full",
            Counter::SyscallCtxFull => "syscall_ctx_full",
            Counter::BreakCtxFull => "break_ctx_full",
            Counter::BreakLeasesOverflow => "break_leases_overflow",
        }
    }
}

/// Statistics written by the agent into the pinned `AGENT_STATS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentStat {
    /// Events applied to the lock table.
    EventsApplied = 0,
    /// Lock records not stored because LOCKS was full.
    LocksFull = 1,
    /// Locks imported from /proc/locks at start (taken before tracing began).
    Reconciled = 2,
    /// The RingBufFull total the agent last resynchronised after; a larger total
    /// means events were lost and the table must be rebuilt from /proc/locks.
    RingBufFullSeen = 3,
    /// Seqlock over LOCKS: odd while the agent writes a batch, even when LOCKS is
    /// consistent. Readers retry an iteration that saw it change.
    FlushSeq = 4,
}

impl AgentStat {
    pub const COUNT: u32 = 5;
}
