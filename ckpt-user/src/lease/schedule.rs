//! When to break each restored lease so that the kernel revokes it exactly when the
//! policy says, although fs.lease-break-time has whole-second resolution.
//!
//! A break started at `t` with the sysctl at `s` seconds gets the kernel deadline
//! `t + s` (in jiffies; the lease goes at the first tick after it, half a tick late on
//! average). To have it revoked `r` after the release instant `go`, it is broken at
//! `go - (s - r) - tick/2` with `s = ceil(r + SLACK)`: every break falls in the
//! second before `go - SLACK`, and several leases are broken one after another,
//! earliest first, each with its own sysctl value.

use std::time::Duration;

use anyhow::{bail, Result};

use crate::image::format::Lease;

/// `--lease-time`: how long a lease that was being broken has left once restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseTime {
    /// What it had left at the checkpoint.
    Exact,
    /// The whole lease-break-time again (as CRIU does).
    Holder,
    /// Revoked at once: the restored breaker does not wait.
    Breaker,
    /// What it had left, plus (or minus) this many nanoseconds.
    Delta(i64),
}

impl std::str::FromStr for LeaseTime {
    type Err = String;

    fn from_str(s: &str) -> Result<LeaseTime, String> {
        match s {
            "exact" => Ok(LeaseTime::Exact),
            "holder" => Ok(LeaseTime::Holder),
            "breaker" => Ok(LeaseTime::Breaker),
            _ if s.starts_with(['+', '-']) => s[1..]
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v < 1e6)
                .map(|v| {
                    let ns = (v * 1e9).round() as i64;
                    LeaseTime::Delta(if s.starts_with('-') { -ns } else { ns })
                })
                .ok_or_else(|| format!("not a number of seconds: {s}")),
            _ => Err(format!(
                "unknown lease time policy {s:?} (exact, holder, breaker, +N or -N seconds)"
            )),
        }
    }
}

impl std::fmt::Display for LeaseTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseTime::Exact => write!(f, "exact"),
            LeaseTime::Holder => write!(f, "holder"),
            LeaseTime::Breaker => write!(f, "breaker"),
            LeaseTime::Delta(ns) => write!(f, "{:+}", *ns as f64 / 1e9),
        }
    }
}

/// How long a breaking lease has left after the release, under `policy`.
/// `current_break_time_s` stands in when the image does not know the lease-break-time.
pub fn remaining_after_restore(
    lease: &Lease,
    policy: LeaseTime,
    current_break_time_s: u32,
) -> Result<Duration> {
    remaining_under(
        lease.remaining_ns,
        lease.lease_break_time_s,
        policy,
        current_break_time_s,
    )
}

/// [`remaining_after_restore`] from a recorded time left and lease-break-time (as the
/// CRIU plugin's sidecar has them).
pub fn remaining_under(
    remaining_ns: Option<i64>,
    lease_break_time_s: Option<u32>,
    policy: LeaseTime,
    current_break_time_s: u32,
) -> Result<Duration> {
    let full = || u64::from(lease_break_time_s.unwrap_or(current_break_time_s)) * 1_000_000_000;
    let recorded = || -> Result<u64> {
        match remaining_ns {
            Some(ns) => Ok(ns.max(0) as u64),
            None => bail!("the image does not know when its break times out (dumped without ckpt-agent); use --lease-time holder or breaker"),
        }
    };
    let ns = match policy {
        LeaseTime::Exact => recorded()?,
        LeaseTime::Holder => full(),
        LeaseTime::Breaker => 0,
        LeaseTime::Delta(d) => (recorded()? as i64).saturating_add(d).max(0) as u64,
    };
    let remaining = Duration::from_nanos(ns);
    if remaining > MAX_REMAINING {
        bail!(
            "its break would have {} s left, more than a restore sets fs.lease-break-time to ({} s: the setting is host-wide while the break is made, so any lease another process breaks then would wait as long); use --lease-time breaker or -N",
            remaining.as_secs(),
            MAX_REMAINING.as_secs()
        );
    }
    Ok(remaining)
}

/// The longest break a restore makes: one day (the kernel's default is 45 s).
pub const MAX_REMAINING: Duration = Duration::from_secs(86_400);

/// One lease's break: the sysctl value to break it with, and how long before the
/// release instant to do it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Break {
    /// The index the caller gave.
    pub index: usize,
    /// Time from the release to the kernel's deadline.
    pub remaining: Duration,
    pub sysctl_s: u32,
    pub lead: Duration,
}

/// Every break is made at least this long before the release: time to read the
/// kernel's deadline back (`kernel_deadline`) before the instant it fixes.
pub const SLACK: Duration = Duration::from_millis(50);

/// A downgrade is never made at once with F_SETLEASE: the kernel refuses a read lease
/// while the file is open for writing (the holder's own O_RDWR description included),
/// and only a break's deadline downgrades such a lease. One due at once is broken to
/// fall due this long after the release instead.
pub const DOWNGRADE_AT_ONCE: Duration = Duration::from_millis(1);

/// When a break restored with `target` (read: a downgrade; None: unlock) falls due,
/// `remaining` after the release: a downgrade due at once, `DOWNGRADE_AT_ONCE`.
pub fn due(target: Option<crate::image::format::LockType>, remaining: Duration) -> Duration {
    if target.is_some() {
        remaining.max(DOWNGRADE_AT_ONCE)
    } else {
        remaining
    }
}

/// The downgrade deadline to restore beside an unlock one due `unlock` after the
/// release, from the downgrade's recorded time left (`downgrade_ns`). Only one that
/// comes first matters (the unlock removes the lease, and the downgrade with it); one
/// the policy cannot give (over `MAX_REMAINING`) comes after any unlock.
pub fn downgrade_first(
    downgrade_ns: Option<i64>,
    unlock: Duration,
    lease_break_time_s: Option<u32>,
    policy: LeaseTime,
    current_break_time_s: u32,
) -> Option<Duration> {
    let d = remaining_under(
        downgrade_ns?.into(),
        lease_break_time_s,
        policy,
        current_break_time_s,
    )
    .ok()?;
    (d < unlock).then(|| due(Some(crate::image::format::LockType::Read), d))
}

/// The breaks, earliest first. A lease to be revoked at once (`remaining` zero) is
/// broken with the sysctl at 0 and timed out before the release; it is not scheduled
/// here. `first`: pairs (a, b) where a's break must be made before b's (a lease's
/// downgrade before its break to unlock, which the kernel would otherwise not
/// downgrade); a's is moved whole seconds earlier, with the sysctl that many seconds
/// higher, which keeps its deadline.
pub fn plan_breaks(
    remaining: &[(usize, Duration)],
    first: &[(usize, usize)],
    tick: Duration,
) -> Vec<Break> {
    let mut out: Vec<Break> = remaining
        .iter()
        .filter(|(_, r)| !r.is_zero())
        .map(|&(index, r)| {
            let s = (r + SLACK).as_nanos().div_ceil(1_000_000_000) as u64;
            let lead = Duration::from_secs(s) + tick / 2;
            Break {
                index,
                remaining: r,
                sysctl_s: s.min(u64::from(u32::MAX)) as u32,
                lead: lead.saturating_sub(r),
            }
        })
        .collect();
    for &(a, b) in first {
        let lead_of = |i| out.iter().find(|x: &&Break| x.index == i).map(|x| x.lead);
        if let (Some(la), Some(lb)) = (lead_of(a), lead_of(b)) {
            if la <= lb {
                let secs = (lb - la).as_secs() + 1;
                let x = out.iter_mut().find(|x| x.index == a).unwrap();
                x.sysctl_s = x.sysctl_s.saturating_add(secs as u32);
                x.lead += Duration::from_secs(secs);
            }
        }
    }
    out.sort_by(|a, b| b.lead.cmp(&a.lead).then(a.index.cmp(&b.index)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(remaining_ns: Option<i64>, break_time: Option<u32>) -> Lease {
        Lease {
            file: 0,
            pid: 1,
            lease_type: None,
            breaking: true,
            target_type: None,
            remaining_ns,
            lease_break_time_s: break_time,
            downgrade_remaining_ns: None,
            notified: true,
            signal: None,
            breakers: vec![],
        }
    }

    #[test]
    fn policies_parse() {
        assert_eq!("exact".parse(), Ok(LeaseTime::Exact));
        assert_eq!("holder".parse(), Ok(LeaseTime::Holder));
        assert_eq!("breaker".parse(), Ok(LeaseTime::Breaker));
        assert_eq!("+2".parse(), Ok(LeaseTime::Delta(2_000_000_000)));
        assert_eq!("-0.5".parse(), Ok(LeaseTime::Delta(-500_000_000)));
        assert!("2".parse::<LeaseTime>().is_err());
        assert!("+x".parse::<LeaseTime>().is_err());
        assert!("+inf".parse::<LeaseTime>().is_err());
    }

    #[test]
    fn remaining_follows_the_policy() {
        let l = lease(Some(2_600_000_000), Some(5));
        let r = |p| remaining_after_restore(&l, p, 45).unwrap().as_millis();
        assert_eq!(r(LeaseTime::Exact), 2600);
        assert_eq!(r(LeaseTime::Holder), 5000);
        assert_eq!(r(LeaseTime::Breaker), 0);
        assert_eq!(r(LeaseTime::Delta(1_000_000_000)), 3600);
        assert_eq!(r(LeaseTime::Delta(-9_000_000_000)), 0);
        // Past its deadline at the checkpoint, not yet revoked: at once.
        let late = lease(Some(-5), Some(5));
        assert!(remaining_after_restore(&late, LeaseTime::Exact, 45)
            .unwrap()
            .is_zero());
        // A crafted or absurd deadline is refused, not written to the host's sysctl.
        let huge = lease(Some(i64::MAX), Some(u32::MAX));
        for p in [LeaseTime::Exact, LeaseTime::Holder] {
            let err = remaining_after_restore(&huge, p, 45)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("more than a restore sets fs.lease-break-time to (86400 s"),
                "{err}"
            );
        }
        assert!(remaining_after_restore(&huge, LeaseTime::Breaker, 45)
            .unwrap()
            .is_zero());
        // Without the agent: no deadline, so only the policies that need none.
        let blind = lease(None, None);
        assert!(remaining_after_restore(&blind, LeaseTime::Exact, 45).is_err());
        assert_eq!(
            remaining_after_restore(&blind, LeaseTime::Holder, 45)
                .unwrap()
                .as_secs(),
            45
        );
    }

    #[test]
    fn breaks_are_whole_seconds_ahead_by_the_fraction_and_earliest_first() {
        let tick = Duration::from_millis(4);
        let b = plan_breaks(
            &[
                (0, Duration::from_millis(2600)),
                (1, Duration::from_millis(3000)),
                (2, Duration::ZERO),
                (3, Duration::from_millis(100)),
            ],
            &[],
            tick,
        );
        assert_eq!(
            b,
            vec![
                // Whole seconds: a second more, for the slack.
                Break {
                    index: 1,
                    remaining: Duration::from_millis(3000),
                    sysctl_s: 4,
                    lead: Duration::from_millis(1002)
                },
                Break {
                    index: 3,
                    remaining: Duration::from_millis(100),
                    sysctl_s: 1,
                    lead: Duration::from_millis(902)
                },
                Break {
                    index: 0,
                    remaining: Duration::from_millis(2600),
                    sysctl_s: 3,
                    lead: Duration::from_millis(402)
                },
            ]
        );
        // The kernel deadline lands `r` after the release: t + s + tick/2 = go + r.
        for x in &b {
            let r = x.remaining.as_millis() as u64;
            let go_minus_break = x.lead.as_millis() as u64;
            assert_eq!(u64::from(x.sysctl_s) * 1000 + 2 - go_minus_break, r);
            assert!(x.lead >= SLACK);
        }
    }

    #[test]
    fn a_downgrade_is_broken_before_the_unlock_of_the_same_lease() {
        let tick = Duration::from_millis(4);
        // Downgrade 2.9 s, unlock 3.2 s: by the fraction alone the unlock would be
        // broken first (lead 802 ms against 102 ms).
        let remaining = [
            (0, Duration::from_millis(3200)),
            (1, Duration::from_millis(2900)),
        ];
        let b = plan_breaks(&remaining, &[(1, 0)], tick);
        assert_eq!(b.iter().map(|x| x.index).collect::<Vec<_>>(), vec![1, 0]);
        assert_eq!((b[0].sysctl_s, b[0].lead), (4, Duration::from_millis(1102)));
        assert_eq!((b[1].sysctl_s, b[1].lead), (4, Duration::from_millis(802)));
        // Each deadline still lands its `remaining` after the release.
        for x in &b {
            assert_eq!(
                Duration::from_secs(x.sysctl_s.into()) + tick / 2 - x.lead,
                x.remaining
            );
        }
        // Already in order: unchanged.
        let r = [
            (0, Duration::from_millis(3900)),
            (1, Duration::from_millis(3100)),
        ];
        assert_eq!(plan_breaks(&r, &[(1, 0)], tick), plan_breaks(&r, &[], tick));
    }

    #[test]
    fn a_downgrade_is_restored_only_before_its_unlock_and_never_at_once() {
        let s = Duration::from_secs;
        let first = |d: i64, unlock, policy| downgrade_first(Some(d), unlock, Some(5), policy, 45);
        assert_eq!(first(1_000_000_000, s(2), LeaseTime::Exact), Some(s(1)));
        // Due after the unlock, or at the same instant: moot.
        assert_eq!(first(2_000_000_000, s(2), LeaseTime::Exact), None);
        assert_eq!(first(1_000_000_000, s(5), LeaseTime::Holder), None);
        // Overdue at the dump: just after the release.
        assert_eq!(
            first(-300_000_000, s(2), LeaseTime::Exact),
            Some(DOWNGRADE_AT_ONCE)
        );
        // More than a restore gives: after any unlock.
        assert_eq!(first(i64::MAX, s(2), LeaseTime::Exact), None);
        assert_eq!(
            downgrade_first(None, s(2), None, LeaseTime::Exact, 45),
            None
        );
        assert_eq!(due(None, Duration::ZERO), Duration::ZERO);
        assert_eq!(
            due(Some(crate::image::format::LockType::Read), Duration::ZERO),
            DOWNGRADE_AT_ONCE
        );
    }
}
