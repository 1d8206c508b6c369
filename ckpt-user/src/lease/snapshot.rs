//! A process's leases as the kernel holds them at one instant, with what a
//! checkpointer that does not read the kernel's lease lists loses: the type a lease
//! being broken had before the break, the break's target and the exact time left
//! before the kernel acts, and from ckpt-agent's record of the break, when it began,
//! whether the holder was signalled and who broke it. The CRIU plugin writes these
//! beside CRIU's images, which keep only the target type (`ckpt-user/criu-plugin`),
//! as a [`LeaseSidecar`], which `ckpt-user inspect` reads.

use serde::{Deserialize, Serialize};

use super::{break_time_s, breakers_of, record_matches, target_type, BreakState};
use crate::{
    image::format::Breaker,
    lease::restore::LeaseReport,
    lock::{
        kernel::{KLock, KernelLocks},
        HeldKind, LockType,
    },
    tracer::history::History,
};

/// The file the CRIU plugin writes beside CRIU's images.
pub const SIDECAR: &str = "ckpt-leases.json";
/// Its `format`.
pub const SIDECAR_FORMAT: &str = "ckpt-criu-leases";

/// The leases of CRIU's dumped processes at one instant, and what could not be read.
#[derive(Debug, Serialize, Deserialize)]
pub struct LeaseSidecar {
    /// "ckpt-criu-leases".
    pub format: String,
    pub version: u32,
    /// CLOCK_MONOTONIC when it was taken: CRIU's dump exit, its tasks still frozen.
    /// `remaining_ns` counts from here.
    pub taken_monotonic_ns: u64,
    pub leases: Vec<LeaseSnapshot>,
    /// The dumped processes' threads that were waiting for a lock (ckpt-agent's
    /// record: the kernel drops a frozen waiter's request, and CRIU keeps none; the
    /// call restarts after the restore). Absent in sidecars before it.
    #[serde(default)]
    pub waiters: Vec<WaiterSnapshot>,
    pub errors: Vec<String>,
}

/// A thread waiting for a lock when the sidecar was taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaiterSnapshot {
    pub pid: u32,
    pub tid: u32,
    /// posix, ofd or flock (null: a kind ckpt does not know).
    pub kind: Option<HeldKind>,
    #[serde(rename = "type")]
    pub lock_type: Option<LockType>,
    /// The bytes asked for, first and last (9223372036854775807: to the end of file).
    pub start: i64,
    pub end: i64,
    pub ino: u64,
    /// CLOCK_MONOTONIC when it began to wait (a restart after a freeze keeps it).
    pub since_monotonic_ns: u64,
    /// How long it had waited when the sidecar was taken.
    pub waited_ns: u64,
}

impl WaiterSnapshot {
    /// The wait to carry over to its restored thread, the tree resuming at `resume_ns`:
    /// begun the time it had waited before the checkpoint (the time frozen not
    /// counted), for a restarted call that blocks again within 5 s.
    pub fn carry(&self, resume_ns: u64) -> Option<ckpt_common::lock::WaitCarry> {
        Some(ckpt_common::lock::WaitCarry {
            since_ns: resume_ns.checked_sub(self.waited_ns)?,
            until_ns: resume_ns.saturating_add(5_000_000_000),
            ino: self.ino,
            start: self.start,
            end: self.end,
            lock_type: self.lock_type?.to_fl_type(),
            _pad: [0; 7],
        })
    }
}

/// The waiters among `pids` in ckpt-agent's record, at `now_ns`, by thread.
pub fn waiters_of(history: &History, pids: &[u32], now_ns: u64) -> Vec<WaiterSnapshot> {
    let mut out: Vec<WaiterSnapshot> = history
        .waits
        .values()
        .filter(|(_, w)| pids.contains(&w.tgid))
        .map(|&(tid, w)| WaiterSnapshot {
            pid: w.tgid,
            tid,
            kind: HeldKind::from_fl_flags(w.flags),
            lock_type: LockType::from_fl_type(w.lock_type),
            start: w.start,
            end: w.end,
            ino: w.ino,
            since_monotonic_ns: w.since_ns,
            waited_ns: now_ns.saturating_sub(w.since_ns),
        })
        .collect();
    out.sort_by_key(|w| (w.pid, w.tid));
    out
}

/// One of the plugin's JSON files from untrusted bytes: any bytes give it or an error.
fn parse_tagged<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    format: fn(&T) -> &str,
    want: &str,
) -> anyhow::Result<T> {
    let v: T = serde_json::from_slice(bytes)?;
    if format(&v) != want {
        anyhow::bail!("not a {want} file (format {:?})", format(&v));
    }
    Ok(v)
}

impl LeaseSidecar {
    /// Reads one from untrusted bytes.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<LeaseSidecar> {
        parse_tagged(bytes, |s: &LeaseSidecar| &s.format, SIDECAR_FORMAT)
    }
}

/// What the CRIU plugin's restore did, beside the images.
pub const REPORT: &str = "ckpt-restore.json";
/// Its `format`.
pub const REPORT_FORMAT: &str = "ckpt-criu-restore";

/// The CRIU plugin's report of a restore: the leases it broke again and when, and
/// what CRIU did not restore as dumped.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// "ckpt-criu-restore".
    pub format: String,
    pub version: u32,
    /// `CKPT_LEASE_TIME`.
    pub policy: String,
    /// CLOCK_MONOTONIC from which the deadlines count: the processes resume right after.
    pub resume_monotonic_ns: u64,
    pub leases: Vec<LeaseReport>,
    /// Waiters whose restarted call keeps its start (`since_monotonic_ns`: the start
    /// handed to ckpt-agent, the time it had waited before the resume).
    #[serde(default)]
    pub waiters: Vec<WaiterSnapshot>,
    /// Locks and leases CRIU did not restore as dumped.
    pub differences: Vec<String>,
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
}

impl RestoreReport {
    /// Reads one from untrusted bytes.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<RestoreReport> {
        parse_tagged(bytes, |r: &RestoreReport| &r.format, REPORT_FORMAT)
    }

    /// For a person (`ckpt-user inspect`).
    pub fn render(&self) -> String {
        let mut out = format!(
            "CRIU restore with the ckpt plugin (policy {}): {} leases broken again, counted from CLOCK_MONOTONIC {:.3} s\n",
            self.policy,
            self.leases.len(),
            self.resume_monotonic_ns as f64 / 1e9
        );
        for l in &self.leases {
            let downgrade = l.downgrade_remaining_ns.map_or(String::new(), |d| {
                format!(" (downgraded {:.3} s after it)", d as f64 / 1e9)
            });
            out.push_str(&format!(
                "  pid {} {}: {} lease, breaking to {}, {:.3} s left at resume{downgrade}\n",
                l.pid,
                l.path,
                l.lease_type.name(),
                l.target_type.map_or("unlock", LockType::name),
                l.remaining_ns.unwrap_or(0) as f64 / 1e9
            ));
        }
        for w in &self.waiters {
            out.push_str(&format!(
                "  waiter pid {} tid {}: its restarted call keeps its start ({:.3} s waited before the checkpoint)\n",
                w.pid,
                w.tid,
                w.waited_ns as f64 / 1e9
            ));
        }
        for (what, lines) in [
            ("not restored as dumped", &self.differences),
            ("warning", &self.warnings),
            ("error", &self.errors),
        ] {
            for l in lines {
                out.push_str(&format!("  {what}: {l}\n"));
            }
        }
        out
    }
}

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
    /// From ckpt-agent's record of the break (null, or empty, without one): when it
    /// began, the lease-break-time then, whether the holder was sent its signal, which
    /// one, and who broke it.
    pub break_started_monotonic_ns: Option<u64>,
    pub lease_break_time_s: Option<u32>,
    pub notified: Option<bool>,
    pub signal: Option<i32>,
    pub breakers: Vec<Breaker>,
}

/// The sidecar for a person (`ckpt-user inspect`).
pub fn render(s: &LeaseSidecar) -> String {
    let secs = |ns: i64| ns as f64 / 1e9;
    let mut out = format!(
        "CRIU dump, ckpt lease sidecar v{} taken at CLOCK_MONOTONIC {:.3} s: {} leases, {} waiters\n",
        s.version,
        secs(s.taken_monotonic_ns as i64),
        s.leases.len(),
        s.waiters.len()
    );
    for l in &s.leases {
        let ty = l.lock_type.map_or("?", LockType::name);
        out.push_str(&format!(
            "  pid {} fd {} {}: {ty} lease",
            l.pid,
            l.fd.map_or("?".into(), |f| f.to_string()),
            l.path.as_deref().unwrap_or("?")
        ));
        if l.breaking {
            out.push_str(&format!(
                ", breaking to {}",
                l.target_type.map_or("unlock", LockType::name)
            ));
            if let Some(ns) = l.remaining_ns {
                out.push_str(&format!(", {:.3} s left", secs(ns)));
            }
            match l.notified {
                Some(true) => out.push_str(&format!(
                    ", holder signalled ({})",
                    l.signal.map_or("SIGIO".into(), |s| format!("signal {s}"))
                )),
                Some(false) => out.push_str(", holder not signalled"),
                None => {}
            }
            if !l.breakers.is_empty() {
                let b: Vec<String> = l
                    .breakers
                    .iter()
                    .map(|b| {
                        format!(
                            "{} ({}{})",
                            b.pid,
                            if b.write { "write" } else { "read" },
                            if b.nonblock { ", nonblock" } else { "" }
                        )
                    })
                    .collect();
                out.push_str(&format!(", breakers {}", b.join(" ")));
            }
        }
        out.push('\n');
    }
    for w in &s.waiters {
        out.push_str(&format!(
            "  waiter pid {} tid {}: {} {} lock on {} of inode {}, waiting {:.3} s\n",
            w.pid,
            w.tid,
            w.lock_type.map_or("?", LockType::name),
            w.kind.map_or("?", HeldKind::label),
            crate::lock::range_label(w.start, w.end),
            w.ino,
            secs(w.waited_ns as i64)
        ));
    }
    for e in &s.errors {
        out.push_str(&format!("  error: {e}\n"));
    }
    out
}

/// The leases held through process `pid`'s fds in `table` (read with
/// `lock::kernel::read_process`), their times counted from `now_ns`
/// (CLOCK_MONOTONIC), with the agent's records of their breaks when there are some.
pub fn of_process(
    table: &KernelLocks,
    pid: u32,
    now_ns: u64,
    hz: u32,
    history: Option<&History>,
) -> Vec<LeaseSnapshot> {
    table
        .held
        .iter()
        .filter(|l| l.kind == HeldKind::Lease && l.holder.pid == pid)
        .map(|l| snapshot(l, now_ns, hz, history))
        .collect()
}

fn snapshot(l: &KLock, now_ns: u64, hz: u32, history: Option<&History>) -> LeaseSnapshot {
    let state = BreakState::of(l.flags, l.lease.as_ref(), hz);
    let left = |d: super::Deadline| d.monotonic_ns as i64 - now_ns as i64;
    let record = l
        .addr
        .and_then(|a| history?.breaks.get(&a))
        .filter(|r| record_matches(r, l));
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
        break_started_monotonic_ns: record.map(|r| r.started_ns),
        lease_break_time_s: record
            .zip(state.primary)
            .map(|(r, d)| break_time_s(r, d.jiffies, hz)),
        notified: record.map(|r| r.notified != 0),
        signal: record.and_then(|r| (r.signal != 0).then_some(r.signal)),
        breakers: record.map(breakers_of).unwrap_or_default(),
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
    fn a_sidecar_is_read_from_any_bytes_and_shown_with_its_break() {
        let mut lease = of_process(
            &KernelLocks {
                held: vec![lease(10, fl_flags::FL_UNLOCK_PENDING, 1_500)],
                ..Default::default()
            },
            10,
            51_000_000_000,
            250,
            None,
        );
        lease[0].notified = Some(true);
        lease[0].breakers = vec![Breaker {
            pid: 12,
            tid: 12,
            write: true,
            nonblock: true,
        }];
        let s = LeaseSidecar {
            format: SIDECAR_FORMAT.into(),
            version: 1,
            taken_monotonic_ns: 51_000_000_000,
            leases: lease,
            waiters: vec![WaiterSnapshot {
                pid: 20,
                tid: 21,
                kind: Some(HeldKind::Lock(crate::lock::LockKind::Posix)),
                lock_type: Some(LockType::Write),
                start: 0,
                end: 9,
                ino: 7,
                since_monotonic_ns: 48_000_000_000,
                waited_ns: 3_000_000_000,
            }],
            errors: vec!["one thing".into()],
        };
        let bytes = serde_json::to_vec(&s).unwrap();
        let back = LeaseSidecar::parse(&bytes).unwrap();
        assert_eq!(back.leases, s.leases);
        assert_eq!(back.waiters, s.waiters);
        let text = render(&back);
        assert!(
            text.contains("pid 10 fd 3 /tmp/f: write lease, breaking to unlock, 1.000 s left, holder signalled (SIGIO), breakers 12 (write, nonblock)"),
            "{text}"
        );
        assert!(text.contains("error: one thing"), "{text}");
        assert!(
            text.contains(
                "waiter pid 20 tid 21: write POSIX lock on 0-9 of inode 7, waiting 3.000 s"
            ),
            "{text}"
        );
        // A sidecar from before waiters were kept still reads.
        assert!(LeaseSidecar::parse(
            br#"{"format":"ckpt-criu-leases","version":1,"taken_monotonic_ns":0,"leases":[],"errors":[]}"#
        )
        .is_ok());
        for n in 0..bytes.len() {
            assert!(LeaseSidecar::parse(&bytes[..n]).is_err());
        }
        assert!(LeaseSidecar::parse(
            br#"{"format":"x","version":1,"taken_monotonic_ns":0,"leases":[],"errors":[]}"#
        )
        .is_err());
    }

    #[test]
    fn a_restore_report_is_read_from_any_bytes_and_shown() {
        let r = RestoreReport {
            format: REPORT_FORMAT.into(),
            version: 1,
            policy: "exact".into(),
            resume_monotonic_ns: 9_000_000_000,
            leases: vec![LeaseReport {
                path: "/tmp/f".into(),
                pid: 10,
                lease_type: LockType::Write,
                breaking: true,
                target_type: None,
                remaining_ns: Some(2_500_000_000),
                deadline_monotonic_ns: Some(11_500_000_000),
                deadline_source: Some(crate::lease::restore::DeadlineSource::Tracer),
                lease_break_time_s: Some(3),
                downgrade_remaining_ns: Some(1_250_000_000),
                downgrade_deadline_monotonic_ns: Some(10_250_000_000),
            }],
            waiters: vec![WaiterSnapshot {
                pid: 11,
                tid: 12,
                kind: Some(HeldKind::Lock(crate::lock::LockKind::Posix)),
                lock_type: Some(LockType::Write),
                start: 0,
                end: 9,
                ino: 77,
                since_monotonic_ns: 8_000_000_000,
                waited_ns: 1_000_000_000,
            }],
            differences: vec![
                "fd 4 of process 10: the write POSIX lock on 0-9 was not restored (it holds none)"
                    .into(),
            ],
            warnings: Vec::new(),
            errors: Vec::new(),
        };
        let bytes = serde_json::to_vec(&r).unwrap();
        assert_eq!(RestoreReport::parse(&bytes).unwrap(), r);
        for n in 0..bytes.len() {
            assert!(RestoreReport::parse(&bytes[..n]).is_err());
        }
        let text = r.render();
        assert!(
            text.contains("pid 10 /tmp/f: write lease, breaking to unlock, 2.500 s left at resume (downgraded 1.250 s after it)"),
            "{text}"
        );
        assert!(
            text.contains("not restored as dumped: fd 4 of process 10"),
            "{text}"
        );
        assert!(
            text.contains(
                "waiter pid 11 tid 12: its restarted call keeps its start (1.000 s waited"
            ),
            "{text}"
        );
        // Carried over from the resume, the frozen time not counted.
        let c = r.waiters[0].carry(9_000_000_000).unwrap();
        assert_eq!((c.since_ns, c.until_ns), (8_000_000_000, 14_000_000_000));
        assert_eq!((c.ino, c.start, c.end, c.lock_type), (77, 0, 9, 1));
        let unknown = WaiterSnapshot {
            lock_type: None,
            ..r.waiters[0].clone()
        };
        assert!(unknown.carry(9_000_000_000).is_none());
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
        let got = of_process(&table, 10, 51_000_000_000, 250, None);
        assert_eq!(got.len(), 1, "only pid 10's");
        let s = &got[0];
        assert_eq!(s.lock_type, Some(LockType::Write));
        assert!(s.breaking);
        assert_eq!(s.target_type, None, "removed at the deadline");
        assert_eq!(s.remaining_ns, Some(1_000_000_000));
        assert_eq!(s.deadline_jiffies, Some(1_500));
        let quiet = &of_process(&table, 11, 51_000_000_000, 250, None)[0];
        assert!(!quiet.breaking);
        assert_eq!(quiet.target_type, Some(LockType::Write));
        assert_eq!(quiet.remaining_ns, None);
    }
}
