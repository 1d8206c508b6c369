//! The kernel's lock-state rules, replayed in userspace.
//!
//! The tracer reports each request the kernel granted; this module applies it exactly
//! as fs/locks.c does, so that the table agrees with /proc/locks lock for lock:
//! - POSIX and OFD (`posix_lock_inode`): one list, told apart only by owner (a
//!   files_struct for POSIX, a struct file for OFD), so the last close of a file sends
//!   a plain POSIX unlock whose owner is the file and which removes its OFD locks.
//!   A request only changes its owner's locks. The
//!   requested range replaces whatever the owner held there; ranges of the same type
//!   that overlap *or touch* are merged; an unlock in the middle splits a range.
//!   A refused request (conflict, EDEADLK, deferred) changes nothing.
//! - flock (`flock_lock_inode`): one lock per open file description. A request of the
//!   type already held is a no-op. Otherwise the old lock is dropped *first*, and the
//!   new one is added only if granted: a failed conversion leaves no lock at all.
//!
//! Replaying a request twice gives the same state (idempotent), which lets an agent that
//! died between applying an event and acknowledging it simply replay it.

use std::collections::BTreeMap;

use ckpt_common::lock::{LockKind, Origin};

use super::{LockType, OFFSET_MAX};

/// One held lock on an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldLock {
    pub kind: LockKind,
    pub owner: u64,
    pub start: i64,
    pub end: i64,
    pub lock_type: LockType,
    pub pid: u32,
    pub fd: i32,
    pub since_ns: u64,
    pub origin: Origin,
}

/// A lock request the kernel processed. `lock_type == None` is an unlock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: LockKind,
    pub owner: u64,
    pub start: i64,
    pub end: i64,
    pub lock_type: Option<LockType>,
    pub pid: u32,
    pub fd: i32,
    pub ts_ns: u64,
    /// The kernel's return value: 0 granted, <0 refused, 1 deferred (caller sleeps).
    pub ret: i32,
    /// flock only: the description's lock as read from the inode's list right after
    /// this request (None: not read; Some(None): no lock).
    pub observed: Option<Option<FlockHeld>>,
}

/// A description's flock lock as the kernel's list showed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlockHeld {
    pub lock_type: LockType,
    /// `fl_pid`: whoever set the lock, which is not the requester when another task
    /// sharing the description asked for the type it already had.
    pub pid: u32,
}

/// Which of the inode's lock lists a lock lives on. POSIX and OFD locks share one
/// list and are told apart only by owner; flock locks have their own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum List {
    Posix,
    Flock,
}

impl List {
    pub fn of(kind: LockKind) -> List {
        match kind {
            LockKind::Posix | LockKind::Ofd => List::Posix,
            LockKind::Flock => List::Flock,
        }
    }
}

/// What a request changed: locks that disappeared and locks that appeared (a lock
/// whose range or type changed is in both).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub removed: Vec<HeldLock>,
    pub added: Vec<HeldLock>,
}

/// The locks one owner holds on one inode's list: disjoint ranges keyed by start.
/// A request touches only the ranges it overlaps or abuts, so an owner holding
/// thousands of ranges costs O(log n) per request, not O(n).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnerLocks {
    ranges: BTreeMap<i64, HeldLock>,
}

impl OwnerLocks {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &HeldLock> {
        self.ranges.values()
    }

    /// Adds a lock as is (used when loading a saved table or importing /proc/locks).
    pub fn insert(&mut self, l: HeldLock) {
        self.ranges.insert(l.start, l);
    }

    pub fn remove(&mut self, start: i64) -> Option<HeldLock> {
        self.ranges.remove(&start)
    }

    /// Applies a request of this owner, exactly as the kernel does.
    pub fn apply(&mut self, req: &Request) -> Change {
        match List::of(req.kind) {
            List::Posix => self.apply_posix(req),
            List::Flock => self.apply_flock(req),
        }
    }

    fn apply_posix(&mut self, req: &Request) -> Change {
        if req.ret != 0 {
            return Change::default();
        }
        // Ranges overlapping or touching [start, end]: disjoint and sorted by start,
        // hence also by end, so walk back from the last one starting by end + 1.
        let lo = req.start.saturating_sub(1);
        let hi = req.end.saturating_add(1);
        let touched: Vec<i64> = self
            .ranges
            .range(..=hi)
            .rev()
            .take_while(|(_, l)| l.end >= lo)
            .map(|(s, _)| *s)
            .collect();
        let old: Vec<HeldLock> = touched
            .iter()
            .filter_map(|s| self.ranges.remove(s))
            .collect();

        // 1. Cut the requested range out of them.
        let mut pieces: Vec<HeldLock> = Vec::with_capacity(old.len() + 2);
        for l in &old {
            if l.end < req.start || l.start > req.end {
                pieces.push(*l);
                continue;
            }
            if l.start < req.start {
                pieces.push(HeldLock {
                    end: req.start - 1,
                    ..*l
                });
            }
            if l.end > req.end {
                pieces.push(HeldLock {
                    start: req.end + 1,
                    ..*l
                });
            }
        }
        // 2. Add the requested range and merge same-type neighbours into it.
        if let Some(lock_type) = req.lock_type {
            pieces.push(HeldLock {
                kind: req.kind,
                owner: req.owner,
                start: req.start,
                end: req.end,
                lock_type,
                pid: req.pid,
                fd: req.fd,
                since_ns: req.ts_ns,
                origin: Origin::Traced,
            });
            pieces.sort_by_key(|l| l.start);
            pieces = merge_touching(pieces, req);
        }
        for p in &pieces {
            self.ranges.insert(p.start, *p);
        }
        Change {
            removed: old
                .iter()
                .filter(|o| !pieces.contains(o))
                .copied()
                .collect(),
            added: pieces.into_iter().filter(|p| !old.contains(p)).collect(),
        }
    }

    fn apply_flock(&mut self, req: &Request) -> Change {
        let held = self.ranges.values().next().copied();
        // What the kernel's list showed after this request is the truth, whatever the
        // order in which concurrent requests on one description reached us.
        if let Some(observed) = req.observed {
            return self.set_flock(held, observed, req);
        }
        if let (Some(held), Some(wanted)) = (held, req.lock_type) {
            if held.lock_type == wanted {
                return Change::default();
            }
        }
        // The old lock goes first, whether or not the new one is granted.
        let target = req
            .lock_type
            .filter(|_| req.ret == 0)
            .map(|lock_type| FlockHeld {
                lock_type,
                pid: req.pid,
            });
        self.set_flock(held, target, req)
    }
}

impl OwnerLocks {
    /// Makes the flock lock of this description `target` (keeping an unchanged one).
    fn set_flock(
        &mut self,
        held: Option<HeldLock>,
        target: Option<FlockHeld>,
        req: &Request,
    ) -> Change {
        if held.map(|h| FlockHeld {
            lock_type: h.lock_type,
            pid: h.pid,
        }) == target
        {
            return Change::default();
        }
        let removed: Vec<HeldLock> = std::mem::take(&mut self.ranges).into_values().collect();
        let mut added = Vec::new();
        if let Some(FlockHeld { lock_type, pid }) = target {
            let l = HeldLock {
                kind: LockKind::Flock,
                owner: req.owner,
                start: 0,
                end: OFFSET_MAX,
                lock_type,
                pid,
                // The request's fd is the lock's only if the request set it.
                fd: if pid == req.pid { req.fd } else { -1 },
                since_ns: req.ts_ns,
                origin: Origin::Traced,
            };
            self.ranges.insert(0, l);
            added.push(l);
        }
        Change { removed, added }
    }
}

/// Merges same-type locks that overlap or touch the request's (growing) range. The
/// merged lock keeps the pid, fd and age of the oldest piece, like the kernel, which
/// extends the first existing lock it finds instead of inserting a new one.
fn merge_touching(sorted: Vec<HeldLock>, req: &Request) -> Vec<HeldLock> {
    let mut out: Vec<HeldLock> = Vec::with_capacity(sorted.len());
    for l in sorted {
        if let Some(last) = out.last_mut() {
            let touches = last.lock_type == l.lock_type
                && last.end != OFFSET_MAX
                && last.end + 1 >= l.start
                && (covers(last, req) || covers(&l, req));
            if touches {
                let keep_first = last.origin == Origin::Traced && last.since_ns <= l.since_ns;
                let base = if keep_first { *last } else { l };
                *last = HeldLock {
                    start: last.start.min(l.start),
                    end: last.end.max(l.end),
                    ..base
                };
                continue;
            }
        }
        out.push(l);
    }
    out
}

/// Whether a lock lies within the request's range (i.e. it is the request or a piece
/// already merged into it); only such pieces are merged with their neighbours.
fn covers(l: &HeldLock, req: &Request) -> bool {
    l.start <= req.end && l.end >= req.start
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All owners' locks on one inode, as the table keeps them.
    #[derive(Default)]
    struct InodeLocks {
        owners: std::collections::HashMap<(List, u64), OwnerLocks>,
    }

    impl InodeLocks {
        fn apply(&mut self, r: &Request) -> Change {
            self.owners
                .entry((List::of(r.kind), r.owner))
                .or_default()
                .apply(r)
        }
        fn all(&self) -> Vec<HeldLock> {
            self.owners
                .values()
                .flat_map(|o| o.iter().copied())
                .collect()
        }
        fn is_empty(&self) -> bool {
            self.all().is_empty()
        }
    }

    const A: u64 = 0xa;
    const B: u64 = 0xb;

    fn req(kind: LockKind, owner: u64, start: i64, end: i64, t: Option<LockType>) -> Request {
        Request {
            kind,
            owner,
            start,
            end,
            lock_type: t,
            pid: owner as u32,
            fd: 3,
            ts_ns: 1,
            ret: 0,
            observed: None,
        }
    }

    fn ranges(s: &InodeLocks, owner: u64) -> Vec<(i64, i64, LockType)> {
        let mut v: Vec<_> = s
            .all()
            .iter()
            .filter(|l| l.owner == owner)
            .map(|l| (l.start, l.end, l.lock_type))
            .collect();
        v.sort();
        v
    }

    use LockType::{Read as R, Write as W};

    #[test]
    fn posix_unlock_in_the_middle_splits() {
        let mut s = InodeLocks::default();
        s.apply(&req(LockKind::Posix, A, 0, 99, Some(W)));
        s.apply(&req(LockKind::Posix, A, 10, 19, None));
        assert_eq!(ranges(&s, A), vec![(0, 9, W), (20, 99, W)]);
    }

    #[test]
    fn posix_adjacent_same_type_merges_and_different_type_does_not() {
        let mut s = InodeLocks::default();
        s.apply(&req(LockKind::Posix, A, 0, 9, Some(R)));
        s.apply(&req(LockKind::Posix, A, 10, 19, Some(R)));
        assert_eq!(ranges(&s, A), vec![(0, 19, R)]);
        s.apply(&req(LockKind::Posix, A, 20, 29, Some(W)));
        assert_eq!(ranges(&s, A), vec![(0, 19, R), (20, 29, W)]);
    }

    #[test]
    fn posix_upgrade_middle_then_downgrade_remerges() {
        let mut s = InodeLocks::default();
        s.apply(&req(LockKind::Posix, A, 0, 29, Some(R)));
        s.apply(&req(LockKind::Posix, A, 10, 19, Some(W)));
        assert_eq!(ranges(&s, A), vec![(0, 9, R), (10, 19, W), (20, 29, R)]);
        s.apply(&req(LockKind::Posix, A, 10, 19, Some(R)));
        assert_eq!(ranges(&s, A), vec![(0, 29, R)]);
    }

    #[test]
    fn posix_to_eof_and_unlock_all() {
        let mut s = InodeLocks::default();
        s.apply(&req(LockKind::Posix, A, 100, OFFSET_MAX, Some(W)));
        s.apply(&req(LockKind::Posix, A, 0, 99, Some(W)));
        assert_eq!(ranges(&s, A), vec![(0, OFFSET_MAX, W)]);
        s.apply(&req(LockKind::Posix, A, 0, OFFSET_MAX, None));
        assert!(s.is_empty());
    }

    #[test]
    fn posix_owners_are_independent_and_refusals_change_nothing() {
        let mut s = InodeLocks::default();
        s.apply(&req(LockKind::Posix, A, 0, 9, Some(R)));
        s.apply(&req(LockKind::Posix, B, 0, 9, Some(R)));
        let mut refused = req(LockKind::Posix, B, 0, 9, Some(W));
        refused.ret = -11;
        s.apply(&refused);
        assert_eq!(ranges(&s, A), vec![(0, 9, R)]);
        assert_eq!(ranges(&s, B), vec![(0, 9, R)]);
    }

    #[test]
    fn posix_separate_same_type_ranges_stay_apart_until_bridged() {
        let mut s = InodeLocks::default();
        s.apply(&req(LockKind::Posix, A, 0, 9, Some(W)));
        s.apply(&req(LockKind::Posix, A, 20, 29, Some(W)));
        assert_eq!(ranges(&s, A), vec![(0, 9, W), (20, 29, W)]);
        s.apply(&req(LockKind::Posix, A, 10, 19, Some(W)));
        assert_eq!(ranges(&s, A), vec![(0, 29, W)]);
    }

    #[test]
    fn close_unlock_of_a_file_owner_removes_its_ofd_locks_but_not_flock() {
        let mut s = InodeLocks::default();
        s.apply(&req(LockKind::Ofd, A, 0, 9, Some(W)));
        s.apply(&req(LockKind::Ofd, A, 20, 29, Some(R)));
        s.apply(&req(LockKind::Flock, A, 0, OFFSET_MAX, Some(R)));
        // locks_remove_file -> locks_remove_posix(filp, filp): FL_POSIX|FL_CLOSE.
        s.apply(&req(LockKind::Posix, A, 0, OFFSET_MAX, None));
        assert_eq!(ranges(&s, A), vec![(0, OFFSET_MAX, R)]);
        assert_eq!(s.all()[0].kind, LockKind::Flock);
    }

    #[test]
    fn change_lists_only_what_moved() {
        let mut s = InodeLocks::default();
        s.apply(&req(LockKind::Posix, A, 0, 9, Some(W)));
        s.apply(&req(LockKind::Posix, A, 100, 109, Some(R)));
        let c = s.apply(&req(LockKind::Posix, A, 10, 19, Some(W)));
        assert_eq!(
            c.removed
                .iter()
                .map(|l| (l.start, l.end))
                .collect::<Vec<_>>(),
            vec![(0, 9)]
        );
        assert_eq!(
            c.added.iter().map(|l| (l.start, l.end)).collect::<Vec<_>>(),
            vec![(0, 19)]
        );
        let c = s.apply(&req(LockKind::Posix, A, 50, 59, None));
        assert_eq!(c, Change::default());
    }

    #[test]
    fn many_ranges_of_one_owner() {
        let mut s = InodeLocks::default();
        for i in 0..2000 {
            s.apply(&req(LockKind::Posix, A, i * 10, i * 10 + 4, Some(W)));
        }
        assert_eq!(ranges(&s, A).len(), 2000);
        // Bridge every gap: one range.
        for i in 0..2000 {
            s.apply(&req(LockKind::Posix, A, i * 10 + 5, i * 10 + 9, Some(W)));
        }
        assert_eq!(ranges(&s, A), vec![(0, 19999, W)]);
    }

    #[test]
    fn flock_observations_win_over_out_of_order_requests() {
        let mut s = InodeLocks::default();
        let w = |pid| Some(FlockHeld { lock_type: W, pid });
        // The kernel did: unlock, then lock (two tasks sharing the description), but
        // the events arrived lock first. Each carries what the list showed after it.
        let lock = Request {
            observed: Some(w(0xa)),
            ..req(LockKind::Flock, A, 0, OFFSET_MAX, Some(W))
        };
        let unlock = Request {
            observed: Some(w(0xa)),
            ..req(LockKind::Flock, A, 0, OFFSET_MAX, None)
        };
        s.apply(&lock);
        s.apply(&unlock);
        assert_eq!(ranges(&s, A), vec![(0, OFFSET_MAX, W)]);
        let gone = Request {
            observed: Some(None),
            ..req(LockKind::Flock, A, 0, OFFSET_MAX, Some(W))
        };
        s.apply(&gone);
        assert!(s.is_empty());
    }

    #[test]
    fn a_flock_keeps_the_pid_of_the_task_that_set_it() {
        // Tasks 10 and 20 share description A. 10 holds a read lock; 20 makes it a
        // write lock (the kernel replaces it: fl_pid 20); 10 then asks for a write
        // lock too, which the kernel finds already there and leaves alone. 10's
        // event reaches us first, observing 20's lock.
        let mut s = InodeLocks::default();
        let by = |pid: u32, t, observed| Request {
            pid,
            fd: pid as i32,
            observed: Some(observed),
            ..req(LockKind::Flock, A, 0, OFFSET_MAX, t)
        };
        let held = |s: &InodeLocks| {
            let l = s.all()[0];
            (l.lock_type, l.pid, l.fd)
        };
        s.apply(&by(
            10,
            Some(R),
            Some(FlockHeld {
                lock_type: R,
                pid: 10,
            }),
        ));
        assert_eq!(held(&s), (R, 10, 10));
        let twenty = Some(FlockHeld {
            lock_type: W,
            pid: 20,
        });
        s.apply(&by(10, Some(W), twenty));
        assert_eq!(held(&s), (W, 20, -1), "task 10's event shows 20's lock");
        s.apply(&by(20, Some(W), twenty));
        assert_eq!(held(&s), (W, 20, -1), "unchanged: no write, no new fd");
        // Without observations the requester's pid is all there is.
        let mut s = InodeLocks::default();
        s.apply(&Request {
            observed: None,
            ..by(10, Some(R), None)
        });
        assert_eq!(held(&s), (R, 10, 10));
    }

    #[test]
    fn replay_is_idempotent() {
        let mut s = InodeLocks::default();
        let r1 = req(LockKind::Posix, A, 0, 29, Some(R));
        let r2 = req(LockKind::Posix, A, 10, 19, None);
        for r in [r1, r1, r2, r2] {
            s.apply(&r);
        }
        assert_eq!(ranges(&s, A), vec![(0, 9, R), (20, 29, R)]);
    }

    #[test]
    fn flock_conversion_and_failed_conversion_drops_old_lock() {
        let mut s = InodeLocks::default();
        s.apply(&req(LockKind::Flock, A, 0, OFFSET_MAX, Some(R)));
        s.apply(&req(LockKind::Flock, A, 0, OFFSET_MAX, Some(R)));
        assert_eq!(ranges(&s, A), vec![(0, OFFSET_MAX, R)]);
        let mut failed = req(LockKind::Flock, A, 0, OFFSET_MAX, Some(W));
        failed.ret = -11;
        s.apply(&failed);
        assert!(
            s.is_empty(),
            "kernel drops the old flock before a failed conversion"
        );
        s.apply(&req(LockKind::Flock, A, 0, OFFSET_MAX, Some(W)));
        s.apply(&req(LockKind::Flock, A, 0, OFFSET_MAX, None));
        assert!(s.is_empty());
    }
}
