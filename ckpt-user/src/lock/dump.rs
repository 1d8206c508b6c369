//! Locks, leases and waiters of the dumped processes, placed on their descriptions.
//!
//! Held locks and leases come from each fd's lock lines: the iterator's walk of the
//! inode's lists (with a lease's own type, pending flags and deadlines, read with
//! jiffies and the clock together), or fdinfo `lock:` lines where the walk was cut
//! (the lease then lacks its deadline). Waiters come from the kernel's blocked trees
//! read just before the freeze: freezing interrupts blocked lock calls, which the
//! kernel restarts after the thaw. ckpt-agent's records add what the kernel forgets:
//! when each waiter began to wait, when a break began, its breakers and whether the
//! holder was signalled.

use std::collections::{BTreeSet, HashSet};

use anyhow::{bail, Result};

use ckpt_common::{files::LockLine, lock::fl_type};

use crate::{
    fd::dump::FoundFd,
    image::format::{Lease, Lock, LockKind, LockType, Waiter},
    lease::{self, BreakState},
    lock::{
        kernel::{self, KLock, LeaseClock},
        proc_locks::ProcLock,
        HeldKind, KernelDev, LockOwner, LockRange,
    },
    tracer::history::History,
};

pub struct Collected {
    pub locks: Vec<Lock>,
    pub leases: Vec<Lease>,
    pub waiters: Vec<Waiter>,
}

/// One held lock or lease, from either source, as the image needs it.
struct Entry {
    kind: HeldKind,
    /// Its own type (a lease's type before any break; None when only fdinfo, which
    /// shows a breaking lease's target, was read).
    lock_type: Option<LockType>,
    flags: u32,
    /// fl_pid: creator (OFD locks read from fdinfo show -1).
    pid: i32,
    range: LockRange,
    dev: KernelDev,
    ino: u64,
    addr: Option<u64>,
    owner: Option<LockOwner>,
    clock: Option<LeaseClock>,
}

/// An iterator line as an entry (None for what ckpt does not keep). A line with an
/// impossible range means the kernel's layout was misread: the dump stops rather
/// than lose that lock.
fn from_line(f: &FoundFd, l: &LockLine) -> Result<Option<Entry>> {
    let Some(kind) = kernel::held_kind(l.list, l.flags) else {
        return Ok(None);
    };
    let Some(range) = LockRange::new(l.start, l.end) else {
        bail!(
            "the kernel's lists gave a {kind} on {} with the range {}..{}, which no lock has: ckpt misread this kernel's layout; no image was written",
            f.path,
            l.start,
            l.end
        );
    };
    let dev = f.kernel.map(|k| k.s_dev).unwrap_or(f.dev);
    Ok(Some(Entry {
        kind,
        lock_type: LockType::from_fl_type(l.lock_type as u8),
        flags: l.flags,
        pid: l.pid,
        range,
        dev,
        ino: f.ino,
        addr: Some(l.lock),
        owner: Some(LockOwner(l.owner)),
        clock: (kind == HeldKind::Lease).then_some(LeaseClock {
            break_time: l.break_time,
            downgrade_time: l.downgrade_time,
            jiffies: l.jiffies,
            now_ns: l.now_ns,
        }),
    }))
}

fn from_fdinfo(p: &ProcLock) -> Option<Entry> {
    use ckpt_common::lock::fl_flags::{FL_DOWNGRADE_PENDING, FL_UNLOCK_PENDING};
    let kind = p.kind?;
    let breaking = p.state == "BREAKING";
    let flags = match (breaking, p.lock_type) {
        (false, _) => 0,
        (true, Some(LockType::Read)) => FL_DOWNGRADE_PENDING,
        (true, _) => FL_UNLOCK_PENDING,
    };
    Some(Entry {
        kind,
        // /proc shows a breaking lease's target, not its own type.
        lock_type: if breaking { None } else { p.lock_type },
        flags,
        pid: p.pid as i32,
        range: p.range,
        dev: p.dev,
        ino: p.ino,
        addr: None,
        owner: None,
        clock: None,
    })
}

/// Puts every lock and lease on its description, and the waiters of `pids` as they
/// were just before the freeze (`blocked`, from the kernel's trees).
pub fn collect(
    fds: &[FoundFd],
    desc_of: &[u32],
    pids: &BTreeSet<u32>,
    blocked: &[KLock],
    history: Option<&History>,
    frozen_ns: u64,
    hz: u32,
) -> Result<Collected> {
    let mut out = Collected {
        locks: Vec::new(),
        leases: Vec::new(),
        waiters: Vec::new(),
    };
    // Every lock once: one kernel object (by address), or one fdinfo line shape per
    // (kind, owner, range, type).
    let mut seen_addr = HashSet::new();
    let mut seen_shape = HashSet::new();
    for (i, f) in fds.iter().enumerate() {
        let desc = desc_of[i];
        let entries: Vec<Entry> = if f.lines.is_empty() {
            f.info.locks.iter().filter_map(from_fdinfo).collect()
        } else {
            let held = f.lines.iter().filter(|l| l.blocker == 0);
            held.map(|l| from_line(f, l))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .flatten()
                .collect()
        };
        for e in entries {
            let fresh = match e.addr {
                Some(a) => seen_addr.insert(a),
                None => {
                    let owner = match e.kind {
                        HeldKind::Lock(LockKind::Posix) => (0, f.pid, desc),
                        _ => (1, 0, desc),
                    };
                    seen_shape.insert((
                        e.kind,
                        owner,
                        e.range,
                        e.lock_type.map(|t| t == LockType::Write),
                    ))
                }
            };
            if !fresh {
                continue;
            }
            match e.kind {
                HeldKind::Lock(k) => {
                    let Some(lock_type) = e.lock_type else {
                        continue;
                    };
                    out.locks.push(Lock {
                        kind: k,
                        lock_type,
                        start: e.range.start(),
                        end: e.range.end(),
                        // A POSIX lock belongs to its process; OFD and flock locks
                        // name their creator (fdinfo hides an OFD lock's: the holder).
                        pid: if k == LockKind::Posix || e.pid <= 0 {
                            f.pid
                        } else {
                            e.pid as u32
                        },
                        file: desc,
                        dev: e.dev,
                        ino: e.ino,
                    });
                }
                HeldKind::Lease => out.leases.push(lease(&e, f, desc, history, frozen_ns, hz)),
            }
        }
    }
    for w in blocked
        .iter()
        .filter(|w| w.pid > 0 && pids.contains(&(w.pid as u32)))
    {
        let Some(lock_type) = LockType::from_fl_type(w.lock_type) else {
            continue;
        };
        let wait = w.addr.and_then(|a| history?.waits.get(&a));
        out.waiters.push(Waiter {
            pid: w.pid as u32,
            tid: wait.map_or(w.pid as u32, |(tid, _)| *tid),
            kind: w.kind,
            lock_type,
            start: w.range.start(),
            end: w.range.end(),
            dev: w.dev,
            ino: w.ino,
            waited_ns: wait.map(|(_, s)| frozen_ns.saturating_sub(s.since_ns)),
        });
    }
    Ok(out)
}

fn lease(
    e: &Entry,
    f: &FoundFd,
    desc: u32,
    history: Option<&History>,
    frozen_ns: u64,
    hz: u32,
) -> Lease {
    let breaking = BreakState::breaking(e.flags);
    let state = BreakState::of(e.flags, e.clock.as_ref(), hz);
    let deadline = state.primary;
    let as_klock = KLock {
        kind: e.kind,
        lock_type: e.lock_type.map_or(fl_type::F_UNLCK, LockType::to_fl_type),
        flags: e.flags,
        pid: e.pid,
        range: e.range,
        dev: e.dev,
        ino: e.ino,
        owner: e.owner,
        addr: e.addr,
        blocker: None,
        lease: e.clock,
        holder: Default::default(),
    };
    let record = e
        .addr
        .and_then(|a| history?.breaks.get(&a))
        .filter(|r| lease::record_matches(r, &as_klock));
    let target = if breaking {
        LockType::from_fl_type(lease::target_type(&as_klock))
    } else {
        e.lock_type
    };
    Lease {
        file: desc,
        pid: if e.pid > 0 { e.pid as u32 } else { f.pid },
        lease_type: e.lock_type,
        breaking,
        target_type: target,
        remaining_ns: deadline.map(|d| d.monotonic_ns as i64 - frozen_ns as i64),
        downgrade_remaining_ns: state
            .downgrade
            .map(|d| d.monotonic_ns as i64 - frozen_ns as i64),
        lease_break_time_s: record
            .zip(deadline)
            .map(|(r, d)| lease::break_time_s(r, d.jiffies, hz)),
        notified: record.is_some_and(|r| r.notified != 0),
        signal: record.and_then(|r| (r.signal != 0).then_some(r.signal)),
        breakers: record.map(lease::breakers_of).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ckpt_common::lock::WaitStart;

    const REG: u32 = libc::S_IFREG | 0o644;

    /// An fdinfo `lock:` line as /proc shows it.
    fn line(kind: LockKind, lock_type: LockType, pid: i64, start: i64, end: i64) -> ProcLock {
        ProcLock {
            id: 1,
            blocked: false,
            kind: Some(HeldKind::Lock(kind)),
            state: "ADVISORY".into(),
            lock_type: Some(lock_type),
            pid,
            dev: KernelDev::new(8, 1),
            ino: 7,
            range: LockRange::new(start, end).unwrap(),
        }
    }

    fn fd_with(pid: u32, fd: i32, locks: Vec<ProcLock>) -> FoundFd {
        let mut f = FoundFd::for_test(pid, fd, 7, REG, 1);
        f.info.locks = locks;
        f
    }

    #[test]
    fn each_lock_once_on_its_description_with_its_owner() {
        let posix = line(LockKind::Posix, LockType::Write, 10, 0, 9);
        // An OFD lock as fdinfo shows it: pid -1, seen through two processes' fds on
        // one description.
        let ofd = line(LockKind::Ofd, LockType::Read, -1, 20, 29);
        let fds = [
            fd_with(10, 3, vec![posix.clone(), ofd.clone()]),
            fd_with(10, 4, vec![posix]), // a dup: the same lock
            fd_with(11, 3, vec![ofd]),
        ];
        let c = collect(
            &fds,
            &[0, 0, 0],
            &BTreeSet::from([10, 11]),
            &[],
            None,
            0,
            250,
        )
        .unwrap();
        let got: Vec<(LockKind, LockType, i64, u32, u32)> = c
            .locks
            .iter()
            .map(|l| (l.kind, l.lock_type, l.start, l.pid, l.file))
            .collect();
        assert_eq!(
            got,
            vec![
                (LockKind::Posix, LockType::Write, 0, 10, 0),
                (LockKind::Ofd, LockType::Read, 20, 10, 0),
            ]
        );
        assert!(c.leases.is_empty() && c.waiters.is_empty());
    }

    #[test]
    fn a_lock_line_with_an_impossible_range_stops_the_dump() {
        let mut f = FoundFd::for_test(10, 3, 7, REG, 1);
        f.lines.push(LockLine {
            tag: ckpt_common::files::tag::LOCK,
            list: ckpt_common::files::list::POSIX,
            lock_type: u32::from(fl_type::F_WRLCK),
            start: 9,
            end: 2,
            lock: 0x40,
            ..Default::default()
        });
        let e = collect(&[f], &[0], &BTreeSet::from([10]), &[], None, 0, 250)
            .err()
            .expect("a lock that cannot be kept must not be dropped");
        assert!(e.to_string().contains("9..2"), "{e}");
    }

    #[test]
    fn a_waiter_of_the_dumped_processes_keeps_how_long_it_had_waited() {
        let blocked = |pid: i32, addr: u64| KLock {
            kind: HeldKind::Lock(LockKind::Flock),
            lock_type: fl_type::F_WRLCK,
            flags: 0,
            pid,
            range: LockRange::WHOLE,
            dev: KernelDev::new(8, 1),
            ino: 7,
            owner: None,
            addr: Some(addr),
            blocker: None,
            lease: None,
            holder: Default::default(),
        };
        let mut h = History::default();
        h.waits.insert(
            0xb0,
            (
                12,
                WaitStart {
                    since_ns: 1_000,
                    tgid: 10,
                    ..WaitStart::default()
                },
            ),
        );
        let c = collect(
            &[],
            &[],
            &BTreeSet::from([10]),
            &[blocked(10, 0xb0), blocked(99, 0xc0)],
            Some(&h),
            5_000,
            250,
        )
        .unwrap();
        assert_eq!(c.waiters.len(), 1, "process 99 is not dumped");
        let w = &c.waiters[0];
        assert_eq!((w.pid, w.tid, w.waited_ns), (10, 12, Some(4_000)));
        assert_eq!(w.kind, HeldKind::Lock(LockKind::Flock));
    }
}
