//! A process's leases as the kernel holds them at one instant, with what a
//! checkpointer that does not read the kernel's lease lists loses: the type a lease
//! being broken had before the break, the break's target and the exact time left
//! before the kernel acts. The CRIU plugin writes these beside CRIU's images, which
//! keep only the target type (`ckpt-user/criu-plugin`).

use serde::{Deserialize, Serialize};

use super::{target_type, BreakState};
use crate::lock::{
    kernel::{KLock, KernelLocks},
    HeldKind, LockType,
};

/// One lease of one process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseSnapshot {
    pub pid: u32,
    /// The fd it was found through (the lowest the walk met first).
    pub fd: Option<i32>,
    pub path: Option<String>,
    /// Its own type: for a lease being broken, the type before the break.
    #[serde(rename = "type")]
    pub lock_type: Option<LockType>,
    pub breaking: bool,
    /// What the break makes it: read (a downgrade) or null (removed); the lease's own
    /// type while not breaking.
    pub target_type: Option<LockType>,
    /// Time left before the kernel revokes or downgrades it, from the snapshot's
    /// instant (negative: the deadline passed and the kernel has not acted yet).
    pub remaining_ns: Option<i64>,
    /// The kernel's own deadline (fl_break_time or fl_downgrade_time), in jiffies.
    pub deadline_jiffies: Option<u64>,
    /// A writer broke a lease that was being downgraded: the downgrade's time left.
    pub downgrade_remaining_ns: Option<i64>,
}

/// The leases held through process `pid`'s fds in `table` (read with
/// `lock::kernel::read_process`), their times counted from `now_ns`
/// (CLOCK_MONOTONIC).
pub fn of_process(table: &KernelLocks, pid: u32, now_ns: u64, hz: u32) -> Vec<LeaseSnapshot> {
    table
        .held
        .iter()
        .filter(|l| l.kind == HeldKind::Lease && l.holder.pid == pid)
        .map(|l| snapshot(l, now_ns, hz))
        .collect()
}

fn snapshot(l: &KLock, now_ns: u64, hz: u32) -> LeaseSnapshot {
    let state = BreakState::of(l.flags, l.lease.as_ref(), hz);
    let left = |d: super::Deadline| d.monotonic_ns as i64 - now_ns as i64;
    LeaseSnapshot {
        pid: l.holder.pid,
        fd: l.holder.fd,
        path: l.holder.path.as_deref().map(String::from),
        lock_type: LockType::from_fl_type(l.lock_type),
        breaking: BreakState::breaking(l.flags),
        target_type: LockType::from_fl_type(target_type(l)),
        remaining_ns: state.primary.map(left),
        deadline_jiffies: state.primary.map(|d| d.jiffies),
        downgrade_remaining_ns: state.downgrade.map(left),
    }
}

#[cfg(test)]
mod tests {
    use ckpt_common::lock::{fl_flags, fl_type, LockOwner};

    use super::*;
    use crate::lock::{
        kernel::{Holder, LeaseClock},
        KernelDev, LockRange,
    };

    fn lease(pid: u32, flags: u32, break_time: u64) -> KLock {
        KLock {
            kind: HeldKind::Lease,
            lock_type: fl_type::F_WRLCK,
            flags: fl_flags::FL_LEASE | flags,
            pid: pid as i32,
            range: LockRange::WHOLE,
            dev: KernelDev(8),
            ino: 7,
            owner: Some(LockOwner(0x10)),
            addr: Some(0x20),
            blocker: None,
            // Read at jiffies 1,000 = 50 s of CLOCK_MONOTONIC, at 250 Hz.
            lease: Some(LeaseClock {
                break_time,
                downgrade_time: 0,
                jiffies: 1_000,
                now_ns: 50_000_000_000,
            }),
            holder: Holder {
                pid,
                fd: Some(3),
                mapping: None,
                path: Some("/tmp/f".into()),
            },
        }
    }

    #[test]
    fn a_breaking_lease_keeps_its_own_type_its_target_and_the_time_left() {
        let table = KernelLocks {
            held: vec![
                // Breaking: deadline at jiffies 1,500 = 52 s; taken at 51 s.
                lease(10, fl_flags::FL_UNLOCK_PENDING, 1_500),
                lease(11, 0, 0),
            ],
            ..Default::default()
        };
        let got = of_process(&table, 10, 51_000_000_000, 250);
        assert_eq!(got.len(), 1, "only pid 10's");
        let s = &got[0];
        assert_eq!(s.lock_type, Some(LockType::Write));
        assert!(s.breaking);
        assert_eq!(s.target_type, None, "removed at the deadline");
        assert_eq!(s.remaining_ns, Some(1_000_000_000));
        assert_eq!(s.deadline_jiffies, Some(1_500));
        let quiet = &of_process(&table, 11, 51_000_000_000, 250)[0];
        assert!(!quiet.breaking);
        assert_eq!(quiet.target_type, Some(LockType::Write));
        assert_eq!(quiet.remaining_ns, None);
    }
}
