//! Types shared by the eBPF programs (`ckpt-ebpf`) and userspace (`ckpt-user`).
//!
//! Everything here is `#[repr(C)]` plain data: it crosses the kernel/user boundary
//! through maps, ring buffers and global variables, so layouts must match exactly on
//! both sides. Keep it `no_std` and free of logic beyond small conversions.
#![no_std]

pub mod counters;
pub mod deleted;
pub mod dev;
pub mod files;
pub mod lease;
pub mod lock;
pub mod offsets;

/// Reading a value written as a string ("posix", "8:1"): the one visitor that the
/// string-named domain types share.
#[cfg(feature = "user")]
pub(crate) mod serde_str {
    use core::fmt;

    struct Visitor<T> {
        expecting: &'static str,
        parse: fn(&str) -> Option<T>,
    }

    impl<T> serde::de::Visitor<'_> for Visitor<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
            (self.parse)(v).ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(v), &self))
        }
    }

    /// Deserialises a string and turns it into a `T` with `parse`; `expecting` says
    /// what was wanted when it fails.
    pub fn deserialize<'de, D, T>(
        d: D,
        expecting: &'static str,
        parse: fn(&str) -> Option<T>,
    ) -> Result<T, D::Error>
    where
        D: serde::Deserializer<'de>,
    {
        d.deserialize_str(Visitor { expecting, parse })
    }
}

/// Names of the maps and programs, shared so that the agent pins what the
/// programs declare and the readers open what the agent pinned.
pub mod names {
    pub const WAITS: &str = "WAITS";
    pub const WAIT_CARRY: &str = "WAIT_CARRY";
    pub const WAITING: &str = "WAITING";
    pub const WAIT_ENDS: &str = "WAIT_ENDS";
    /// Slot 0: how many wait ends the ring has had (the next `WaitEnd::seq` - 1).
    pub const WAIT_END_SEQ: &str = "WAIT_END_SEQ";
    pub const WAIT_HIST: &str = "WAIT_HIST";
    pub const BREAK_CTX: &str = "BREAK_CTX";
    pub const BREAKS: &str = "BREAKS";
    pub const HOLDS: &str = "HOLDS";
    pub const COUNTERS: &str = "COUNTERS";
    /// The pinned task_file iterator programs, without and with paths. `ckpt-user
    /// dump` aims one link at each process it reads (Linux 6.1+ iterator parameters).
    pub const TASK_FILES: &str = "task_files";
    pub const TASK_FILES_PATHS: &str = "task_files_paths";
    /// The lock-table iterators (every process's fds, and mappings).
    pub const LOCK_TABLE: &str = "lock_table";
    pub const LOCK_TABLE_MAPS: &str = "lock_table_maps";
    pub const FILE_TRIGGERS: &str = "FILE_TRIGGERS";
    pub const PENDING: &str = "PENDING";
    pub const HOLDERS: &str = "HOLDERS";
    pub const DELETED: &str = "DELETED";
    /// The trigger generation the `DELETED` table reflects (written by the agent).
    pub const DELETED_SCAN: &str = "DELETED_SCANS";
    /// The scan iterators (reading one runs it over every process).
    pub const DELETED_FDS: &str = "deleted_fds";
    pub const DELETED_MAPS: &str = "deleted_maps";
    /// Maps of agents before the kernel-is-the-table design, removed at start.
    pub const STALE: &[&str] = &[
        "LOCK_EVENTS",
        "LOCKS",
        "LEASES",
        "WAITERS",
        "SYSCALL_CTX",
        "AGENT_STATS",
        "DELETED_SCAN",
    ];
}

/// Capacities of the maps. A full map is counted (see [`counters`]) and reported,
/// never silent.
pub mod capacity {
    /// Threads blocked on a lock or lease at once.
    pub const WAITS: u32 = 16_384;
    /// Waits carried over by restores not yet resumed.
    pub const WAIT_CARRY: u32 = 1_024;
    pub const BREAK_CTX: u32 = 4_096;
    /// Wait ends kept for readers, per CPU (a power of two): 100 ms of 10,000 ended
    /// waits a second on each CPU, in 88 KiB per CPU.
    pub const WAIT_ENDS: u32 = 1_024;
    /// Leases being broken (or broken recently) at once.
    pub const BREAKS: u32 = 16_384;
    /// `--hold-times`: held lock objects.
    pub const HOLDS: u32 = 262_144;
    /// Holders (process, fd or mapping) of deleted files, host-wide.
    pub const DELETED: u32 = 65_536;
    /// Processes holding a deleted file (their fork/exec/exit/munmap trigger a scan).
    pub const HOLDERS: u32 = 16_384;
    /// Threads inside a syscall that may change the deleted set (close of a deleted
    /// file, O_TMPFILE open ...), until its exit.
    pub const PENDING: u32 = 16_384;
}
