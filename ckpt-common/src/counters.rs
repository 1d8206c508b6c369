//! Indexes of the per-CPU counters kept by the programs (`COUNTERS`). A full map is
//! counted here so that loss is never silent; readers report what is missing *now*
//! (a waiter without a start time), the agent logs these totals.

/// Per-CPU counters written by the eBPF programs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Requests the kernel deferred (a wait began or restarted).
    Deferred = 0,
    /// Wait starts not recorded because WAITS was full.
    WaitsFull = 1,
    /// Lease breaks not followed because BREAK_CTX was full.
    BreakCtxFull = 2,
    /// Leases beyond MAX_BREAK_LEASES in one break, not followed.
    BreakLeasesOverflow = 3,
    /// Lease breaks whose record was lost because BREAKS was full.
    BreaksFull = 4,
    /// Hold starts not recorded because HOLDS was full (`--hold-times`).
    HoldsFull = 5,
    /// Lease breaks recorded.
    Breaks = 6,
}

impl Counter {
    pub const COUNT: u32 = 7;

    /// The counters that mean records were lost, each with the map (or limit) it is
    /// about, as the metrics' `map` label and the views name it.
    pub const LOSSES: [(Counter, &'static str); 5] = [
        (Counter::WaitsFull, "waits"),
        (Counter::BreakCtxFull, "break_contexts"),
        (Counter::BreakLeasesOverflow, "break_leases"),
        (Counter::BreaksFull, "breaks"),
        (Counter::HoldsFull, "holds"),
    ];
    pub const ALL: [Counter; Counter::COUNT as usize] = [
        Counter::Deferred,
        Counter::WaitsFull,
        Counter::BreakCtxFull,
        Counter::BreakLeasesOverflow,
        Counter::BreaksFull,
        Counter::HoldsFull,
        Counter::Breaks,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Deferred => "deferred",
            Counter::WaitsFull => "waits_full",
            Counter::BreakCtxFull => "break_ctx_full",
            Counter::BreakLeasesOverflow => "break_leases_overflow",
            Counter::BreaksFull => "breaks_full",
            Counter::HoldsFull => "holds_full",
            Counter::Breaks => "breaks",
        }
    }
}
