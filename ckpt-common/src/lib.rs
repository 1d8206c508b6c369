//! Types shared by the eBPF programs (`ckpt-ebpf`) and userspace (`ckpt-user`).
//!
//! Everything here is `#[repr(C)]` plain data: it crosses the kernel/user boundary
//! through maps, ring buffers and global variables, so layouts must match exactly on
//! both sides. Keep it `no_std` and free of logic beyond small conversions.
#![no_std]

pub mod counters;
pub mod deleted;
pub mod files;
pub mod lease;
pub mod lock;
pub mod offsets;

/// Every record in the LOCK_EVENTS ring starts with one of these tags (a `u32`).
pub mod tag {
    pub const LOCK: u32 = 1;
    pub const LEASE: u32 = 2;
}

/// Names of the maps and programs, shared so that the agent pins what the
/// programs declare and the readers open what the agent pinned.
pub mod names {
    pub const LOCK_EVENTS: &str = "LOCK_EVENTS";
    pub const LOCKS: &str = "LOCKS";
    pub const LEASES: &str = "LEASES";
    pub const BREAK_CTX: &str = "BREAK_CTX";
    pub const WAITERS: &str = "WAITERS";
    pub const SYSCALL_CTX: &str = "SYSCALL_CTX";
    pub const COUNTERS: &str = "COUNTERS";
    pub const AGENT_STATS: &str = "AGENT_STATS";
    /// The pinned task_file iterator programs, without and with paths. `ckpt-user
    /// dump` aims one link at each process it reads (Linux 6.1+ iterator parameters).
    pub const TASK_FILES: &str = "task_files";
    pub const TASK_FILES_PATHS: &str = "task_files_paths";
    pub const FILE_TRIGGERS: &str = "FILE_TRIGGERS";
    pub const PENDING: &str = "PENDING";
    pub const HOLDERS: &str = "HOLDERS";
    pub const DELETED: &str = "DELETED";
    /// The trigger generation the `DELETED` table reflects (written by the agent).
    pub const DELETED_SCAN: &str = "DELETED_SCAN";
    /// The scan iterators (pinned links; reading one runs it over every process).
    pub const DELETED_FDS: &str = "deleted_fds";
    pub const DELETED_MAPS: &str = "deleted_maps";
}

/// Capacities of the maps. The lock table and the waiter table are sized for large
/// hosts; a full map is counted (see [`counters`]) and reported, never silent.
pub mod capacity {
    pub const LOCKS: u32 = 131_072;
    pub const LEASES: u32 = 16_384;
    pub const BREAK_CTX: u32 = 4_096;
    pub const WAITERS: u32 = 16_384;
    /// Threads with a context: every live thread that made a traced call, least
    /// recently used first out.
    pub const SYSCALL_CTX: u32 = 32_768;
    /// Holders (process, fd or mapping) of deleted files, host-wide.
    pub const DELETED: u32 = 65_536;
    /// Processes holding a deleted file (their fork/exec/exit/munmap trigger a scan).
    pub const HOLDERS: u32 = 16_384;
    /// Threads inside a syscall that may change the deleted set (close of a deleted
    /// file, O_TMPFILE open ...), until its exit.
    pub const PENDING: u32 = 16_384;
    /// Ring buffer bytes: ~200k events, enough to cover an agent restart on a busy host.
    pub const LOCK_EVENTS_BYTES: u32 = 16 * 1024 * 1024;
}
