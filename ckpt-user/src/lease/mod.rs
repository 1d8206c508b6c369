//! Leases as the kernel holds them: a lease being broken keeps its own type while
//! FL_UNLOCK_PENDING (target: unlock) or FL_DOWNGRADE_PENDING (target: read) is set,
//! and its deadlines in `fl_break_time` / `fl_downgrade_time` (jiffies). Both can be
//! pending at once: a writer breaking a lease that is being downgraded sets the unlock
//! deadline and leaves the downgrade one. The kernel acts on a deadline at its next
//! lease check after it (any open, F_GETLEASE, or a blocked breaker's timer): until
//! then the lease stays breaking with the deadline in the past ("overdue").
//!
//! Leases are read with the locks (`lock::kernel`, `lock::dump`); here are their
//! break state, the restore of leases that were being broken (`restore`), on a
//! schedule that makes the kernel revoke each when the policy says (`schedule`),
//! checked against the deadline the kernel really gave (`kernel_deadline`), and a
//! process's leases at one instant for the CRIU plugin (`snapshot`).

pub mod kernel_deadline;
pub mod restore;
pub mod schedule;
pub mod snapshot;

use ckpt_common::{
    lease::BreakRecord,
    lock::{fl_flags, fl_type},
};

use crate::lock::kernel::{KLock, LeaseClock};

/// What a break will do, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    /// F_UNLCK (removed) or F_RDLCK (downgraded).
    pub target: u8,
    /// The kernel's fl_break_time or fl_downgrade_time.
    pub jiffies: u64,
    /// Its CLOCK_MONOTONIC equivalent (the kernel acts at the first check after it).
    pub monotonic_ns: u64,
}

/// A lease's break state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakState {
    /// The deadline that decides the break's outcome: the unlock one when pending,
    /// else the downgrade one. None while the lease is not being broken.
    pub primary: Option<Deadline>,
    /// The downgrade deadline when an unlock one is pending too.
    pub downgrade: Option<Deadline>,
}

/// CLOCK_MONOTONIC of `jiffies`, from a (jiffies, ns) pair read together.
pub fn to_monotonic(jiffies: u64, clock: &LeaseClock, hz: u32) -> u64 {
    let ns_per_tick = 1_000_000_000 / i64::from(hz.max(1));
    let ticks = jiffies.wrapping_sub(clock.jiffies) as i64;
    (clock.now_ns as i64)
        .saturating_add(ticks.saturating_mul(ns_per_tick))
        .max(0) as u64
}

impl BreakState {
    pub fn of(flags: u32, clock: Option<&LeaseClock>, hz: u32) -> BreakState {
        let deadline = |target, j: fn(&LeaseClock) -> u64| {
            clock.map(|c| Deadline {
                target,
                jiffies: j(c),
                monotonic_ns: to_monotonic(j(c), c, hz),
            })
        };
        let unlock = flags & fl_flags::FL_UNLOCK_PENDING != 0;
        let downgrade = flags & fl_flags::FL_DOWNGRADE_PENDING != 0;
        let down = || deadline(fl_type::F_RDLCK, |c| c.downgrade_time);
        match (unlock, downgrade) {
            (true, d) => BreakState {
                primary: deadline(fl_type::F_UNLCK, |c| c.break_time),
                downgrade: if d { down() } else { None },
            },
            (false, true) => BreakState {
                primary: down(),
                downgrade: None,
            },
            (false, false) => BreakState::default(),
        }
    }

    pub fn breaking(flags: u32) -> bool {
        flags & (fl_flags::FL_UNLOCK_PENDING | fl_flags::FL_DOWNGRADE_PENDING) != 0
    }
}

/// What the break leads to: F_UNLCK, F_RDLCK, or the lease's own type while active.
pub fn target_type(l: &KLock) -> u8 {
    if l.flags & fl_flags::FL_UNLOCK_PENDING != 0 {
        fl_type::F_UNLCK
    } else if l.flags & fl_flags::FL_DOWNGRADE_PENDING != 0 {
        fl_type::F_RDLCK
    } else {
        l.lock_type
    }
}

/// Whether the tracer's record of a break is about this lease's current break: the
/// same owner and the deadlines the break set (a freed lease's address can be reused).
pub fn record_matches(r: &BreakRecord, l: &KLock) -> bool {
    let Some(c) = &l.lease else { return false };
    BreakState::breaking(l.flags)
        && l.owner == Some(ckpt_common::lock::LockOwner(r.owner))
        && r.break_time == c.break_time
        && r.downgrade_time == c.downgrade_time
}

/// The breakers an agent's record of a break lists, as images and the CRIU sidecar
/// keep them.
pub fn breakers_of(r: &BreakRecord) -> Vec<crate::image::format::Breaker> {
    r.breakers[..usize::from(r.n_breakers).min(r.breakers.len())]
        .iter()
        .map(|b| crate::image::format::Breaker {
            pid: b.pid,
            tid: b.tid,
            write: b.breaker_type == fl_type::F_WRLCK,
            nonblock: b.nonblock != 0,
        })
        .collect()
}

/// `fs.lease-break-time` (s) in force when a break started, from its deadline.
pub fn break_time_s(r: &BreakRecord, deadline_jiffies: u64, hz: u32) -> u32 {
    let ticks = deadline_jiffies.wrapping_sub(r.started_jiffies) as i64;
    (ticks.max(0) as f64 / f64::from(hz.max(1))).round() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLOCK: LeaseClock = LeaseClock {
        break_time: 1_250,
        downgrade_time: 1_500,
        jiffies: 1_000,
        now_ns: 10_000_000_000,
    };

    #[test]
    fn deadlines_count_from_the_clock_read_with_the_line() {
        let s = BreakState::of(fl_flags::FL_UNLOCK_PENDING, Some(&CLOCK), 250);
        let p = s.primary.unwrap();
        assert_eq!((p.target, p.jiffies), (fl_type::F_UNLCK, 1_250));
        // 250 ticks at 250 Hz: one second after the read.
        assert_eq!(p.monotonic_ns, 11_000_000_000);
        assert_eq!(s.downgrade, None);
    }

    #[test]
    fn both_deadlines_when_a_writer_escalates_a_downgrade() {
        let s = BreakState::of(
            fl_flags::FL_UNLOCK_PENDING | fl_flags::FL_DOWNGRADE_PENDING,
            Some(&CLOCK),
            250,
        );
        assert_eq!(s.primary.unwrap().target, fl_type::F_UNLCK);
        let d = s.downgrade.unwrap();
        assert_eq!((d.target, d.jiffies), (fl_type::F_RDLCK, 1_500));
        let only_down = BreakState::of(fl_flags::FL_DOWNGRADE_PENDING, Some(&CLOCK), 250);
        assert_eq!(only_down.primary.unwrap().target, fl_type::F_RDLCK);
        assert_eq!(BreakState::of(0, Some(&CLOCK), 250), BreakState::default());
    }

    #[test]
    fn an_overdue_deadline_is_in_the_past_and_jiffies_wrap() {
        let c = LeaseClock {
            break_time: 900,
            ..CLOCK
        };
        assert_eq!(to_monotonic(900, &c, 100), 9_000_000_000);
        let w = LeaseClock {
            jiffies: u64::MAX - 9,
            now_ns: 5_000_000_000,
            ..CLOCK
        };
        assert_eq!(to_monotonic(10, &w, 1000), 5_020_000_000);
    }

    #[test]
    fn break_time_is_rounded_to_seconds() {
        let r = BreakRecord {
            started_jiffies: 1_000,
            ..Default::default()
        };
        assert_eq!(break_time_s(&r, 1_000 + 45 * 250, 250), 45);
        assert_eq!(break_time_s(&r, 1_000 + 5 * 250 - 1, 250), 5);
    }
}
