//! The kernel's lock-state rules, replayed in userspace.
//!
//! The tracer reports each request the kernel granted; this module applies it exactly
//! as fs/locks.c does, so that the table agrees with /proc/locks lock for lock:
//! - POSIX and OFD (`posix_lock_inode`): a request only changes its owner's locks. The
//!   requested range replaces whatever the owner held there; ranges of the same type
//!   that overlap *or touch* are merged; an unlock in the middle splits a range.
//!   A refused request (conflict, EDEADLK, deferred) changes nothing.
//! - flock (`flock_lock_inode`): one lock per open file description. A request of the
//!   type already held is a no-op. Otherwise the old lock is dropped *first*, and the
//!   new one is added only if granted: a failed conversion leaves no lock at all.
//!
//! Replaying a request twice gives the same state (idempotent), which lets an agent that
//! died between applying an event and acknowledging it simply replay it.

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
}

/// All locks on one inode (any owner, any kind).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InodeLocks {
    pub locks: Vec<HeldLock>,
}

impl InodeLocks {
    /// Applies `req` and returns the owner's locks before and after, so that callers
    /// can turn the change into map updates.
    pub fn apply(&mut self, req: &Request) -> (Vec<HeldLock>, Vec<HeldLock>) {
        let (before, others): (Vec<HeldLock>, Vec<HeldLock>) = self
            .locks
            .iter()
            .partition(|l| l.owner == req.owner && l.kind == req.kind);
        let after = match req.kind {
            LockKind::Posix | LockKind::Ofd => apply_posix(&before, req),
            LockKind::Flock => apply_flock(&before, req),
        };
        self.locks = others;
        self.locks.extend(after.iter().copied());
        (before, after)
    }

    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }
}

fn apply_posix(mine: &[HeldLock], req: &Request) -> Vec<HeldLock> {
    if req.ret != 0 {
        return mine.to_vec();
    }
    // 1. Cut the requested range out of everything the owner holds.
    let mut out: Vec<HeldLock> = Vec::with_capacity(mine.len() + 2);
    for l in mine {
        if l.end < req.start || l.start > req.end {
            out.push(*l);
            continue;
        }
        if l.start < req.start {
            out.push(HeldLock {
                end: req.start - 1,
                ..*l
            });
        }
        if l.end > req.end {
            out.push(HeldLock {
                start: req.end + 1,
                ..*l
            });
        }
    }
    // 2. Add the requested range, then merge same-type neighbours as the kernel does.
    if let Some(lock_type) = req.lock_type {
        out.push(HeldLock {
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
        out.sort_by_key(|l| l.start);
        out = merge_touching(out, req);
    }
    out.sort_by_key(|l| l.start);
    out
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
            let overlaps_same = last.lock_type == l.lock_type && last.end >= l.start;
            if touches || overlaps_same {
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

fn apply_flock(mine: &[HeldLock], req: &Request) -> Vec<HeldLock> {
    if let (Some(held), Some(wanted)) = (mine.first(), req.lock_type) {
        if held.lock_type == wanted {
            return mine.to_vec();
        }
    }
    match req.lock_type {
        Some(lock_type) if req.ret == 0 => vec![HeldLock {
            kind: LockKind::Flock,
            owner: req.owner,
            start: 0,
            end: OFFSET_MAX,
            lock_type,
            pid: req.pid,
            fd: req.fd,
            since_ns: req.ts_ns,
            origin: Origin::Traced,
        }],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
    }

    fn ranges(s: &InodeLocks, owner: u64) -> Vec<(i64, i64, LockType)> {
        let mut v: Vec<_> = s
            .locks
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
    fn posix_and_ofd_of_same_pointer_value_are_distinct_kinds() {
        let mut s = InodeLocks::default();
        s.apply(&req(LockKind::Posix, A, 0, 9, Some(W)));
        s.apply(&req(LockKind::Ofd, A, 0, 9, None));
        assert_eq!(ranges(&s, A), vec![(0, 9, W)]);
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
