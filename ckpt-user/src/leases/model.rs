//! The lease table's rules (fs/locks.c), replayed from [`LeaseEvent`]s.
//!
//! - F_SETLEASE RDLCK/WRLCK grants or changes a lease; during a break a change follows
//!   `lease_clear_pending`: RDLCK completes a downgrade break (WRLCK -> RDLCK) but not an
//!   unlock break, F_UNLCK (Released) removes the lease.
//! - A break keeps the lease's own type and sets FL_UNLOCK_PENDING (target UNLCK,
//!   deadline fl_break_time) or FL_DOWNGRADE_PENDING (target RDLCK, deadline
//!   fl_downgrade_time). The events carry the values read from the kernel's lease
//!   object, so deadlines are exact.
//! - time_out_leases past the deadline downgrades or removes the lease.
//! - Closing the last fd removes a lease without any tracepoint; /proc/locks is the
//!   authority on existence, and [`LeaseSet::reconcile`] applies it.

use std::collections::HashMap;

use ckpt_common::{
    lease::{Breaker, LeaseEvent, LeaseKey, LeaseRecord, LeaseState, LeaseWhat, MAX_BREAKERS},
    lock::{fl_flags, fl_type, Origin},
};

use crate::locks::proc_locks::{ProcKind, ProcLock};

/// `lease_type` of a lease imported while breaking: /proc/locks does not show the type
/// it had before the break.
pub const TYPE_UNKNOWN: u8 = 0xff;

/// Owners of imported leases are small integers; kernel owners are kernel addresses.
pub fn is_synthetic(owner: u64) -> bool {
    owner <= u32::MAX as u64
}

/// What a Breaking event says of the break: what the lease becomes, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakDeadline {
    /// F_UNLCK (removed) or F_RDLCK (downgraded).
    pub target: u8,
    /// The kernel's fl_break_time or fl_downgrade_time.
    pub jiffies: u64,
    /// Its CLOCK_MONOTONIC equivalent, from the clock and jiffies the program read
    /// together (the kernel revokes at the first tick after it).
    pub monotonic_ns: u64,
}

impl BreakDeadline {
    /// None when the event shows no break pending (any more).
    pub fn of(ev: &LeaseEvent, hz: u32) -> Option<BreakDeadline> {
        let (target, jiffies) = if ev.flags & fl_flags::FL_UNLOCK_PENDING != 0 {
            (fl_type::F_UNLCK, ev.break_time)
        } else if ev.flags & fl_flags::FL_DOWNGRADE_PENDING != 0 {
            (fl_type::F_RDLCK, ev.downgrade_time)
        } else {
            return None;
        };
        let ns_per_tick = 1_000_000_000 / i64::from(hz.max(1));
        let ticks_left = jiffies.wrapping_sub(ev.jiffies) as i64;
        Some(BreakDeadline {
            target,
            jiffies,
            monotonic_ns: (ev.ts_ns as i64 + ticks_left * ns_per_tick).max(0) as u64,
        })
    }
}

/// All leases, keyed by (dev, inode, owner).
#[derive(Clone, Debug)]
pub struct LeaseSet {
    pub leases: HashMap<LeaseKey, LeaseRecord>,
    hz: u32,
    next_synthetic: u64,
    /// Traced leases /proc/locks showed breaking at the last reconcile while no break
    /// event had come: the kernel marks a lease breaking just before the break
    /// tracepoint fires, so one sighting is not enough to override the events.
    seen_breaking: std::collections::HashSet<LeaseKey>,
}

fn key(dev: u32, ino: u64, owner: u64) -> LeaseKey {
    LeaseKey {
        dev,
        _pad: 0,
        ino,
        owner,
    }
}

impl LeaseSet {
    pub fn new(hz: u32, leases: HashMap<LeaseKey, LeaseRecord>) -> LeaseSet {
        let next_synthetic = leases
            .keys()
            .filter(|k| is_synthetic(k.owner))
            .map(|k| k.owner + 1)
            .max()
            .unwrap_or(1);
        LeaseSet {
            leases,
            hz,
            next_synthetic,
            seen_breaking: Default::default(),
        }
    }

    /// Gives an imported lease of (dev, ino, pid) its kernel owner, if there is one.
    fn adopt(&mut self, k: LeaseKey, pid: u32, changed: &mut Vec<LeaseKey>) {
        if self.leases.contains_key(&k) {
            return;
        }
        let found = self
            .leases
            .iter()
            .find(|(o, r)| {
                o.dev == k.dev && o.ino == k.ino && is_synthetic(o.owner) && r.pid == pid
            })
            .map(|(o, _)| *o);
        if let Some(old) = found {
            let r = self.leases.remove(&old).expect("found above");
            self.leases.insert(k, r);
            changed.extend([old, k]);
        }
    }

    /// Applies one event; returns the keys whose records changed (or vanished).
    pub fn apply(&mut self, ev: &LeaseEvent) -> Vec<LeaseKey> {
        let mut changed = Vec::new();
        let Some(what) = LeaseWhat::from_u32(ev.what) else {
            return changed;
        };
        let k = key(ev.dev, ev.ino, ev.owner);
        let holder = if what == LeaseWhat::Breaking {
            ev.pid
        } else {
            ev.tgid
        };
        self.adopt(k, holder, &mut changed);
        changed.push(k);
        match what {
            LeaseWhat::Set => self.set(k, ev),
            LeaseWhat::Released => {
                self.leases.remove(&k);
            }
            LeaseWhat::Breaking => self.breaking(k, ev),
            LeaseWhat::TimedOut => {
                if ev.lease_type == fl_type::F_UNLCK {
                    self.leases.remove(&k);
                } else if let Some(r) = self.leases.get_mut(&k) {
                    settle(r, fl_type::F_RDLCK);
                }
            }
        }
        changed
    }

    fn set(&mut self, k: LeaseKey, ev: &LeaseEvent) {
        let t = ev.lease_type;
        match self.leases.get_mut(&k) {
            Some(r) if r.state == LeaseState::Breaking as u8 => {
                // lease_clear_pending: RDLCK clears a pending downgrade only; an
                // unlock break goes on with the lease now read-only.
                if t == fl_type::F_RDLCK && r.target_type == fl_type::F_UNLCK {
                    r.lease_type = t;
                } else {
                    settle(r, t);
                }
            }
            Some(r) => {
                r.lease_type = t;
                r.target_type = t;
            }
            None => {
                self.leases.insert(
                    k,
                    LeaseRecord {
                        granted_ns: ev.ts_ns,
                        pid: ev.tgid,
                        fd: ev.fd,
                        lease_type: t,
                        target_type: t,
                        state: LeaseState::Active as u8,
                        origin: Origin::Traced as u8,
                        ..Default::default()
                    },
                );
            }
        }
    }

    fn breaking(&mut self, k: LeaseKey, ev: &LeaseEvent) {
        let Some(BreakDeadline {
            target,
            jiffies: deadline,
            monotonic_ns,
        }) = BreakDeadline::of(ev, self.hz)
        else {
            return; // not (or no longer) breaking
        };
        let hz = self.hz.max(1) as i64;
        let r = self.leases.entry(k).or_insert_with(|| LeaseRecord {
            pid: ev.pid,
            fd: -1,
            state: LeaseState::Active as u8,
            origin: Origin::Traced as u8,
            ..Default::default()
        });
        let starts = r.state != LeaseState::Breaking as u8 || r.target_type != target;
        if starts {
            r.break_started_ns = ev.ts_ns;
            r.n_breakers = 0;
            r.breakers_total = 0;
            r.breakers = [Breaker::default(); MAX_BREAKERS];
            // The sysctl is whole seconds: the deadline was jiffies + s * HZ.
            let ticks = deadline.wrapping_sub(ev.jiffies) as i64;
            r.lease_break_time_s = ((ticks + hz / 2) / hz).max(0) as u32;
        }
        r.state = LeaseState::Breaking as u8;
        r.lease_type = ev.lease_type;
        r.target_type = target;
        r.deadline_jiffies = deadline;
        r.deadline_ns = monotonic_ns;
        if ev.signal != 0 {
            r.notified = 1;
            r.signal = ev.signal;
        }
        let n = r.n_breakers as usize;
        if !r.breakers[..n].iter().any(|b| b.tid == ev.tid) {
            r.breakers_total = r.breakers_total.saturating_add(1);
            if n < MAX_BREAKERS {
                r.breakers[n] = Breaker {
                    since_ns: ev.ts_ns,
                    pid: ev.tgid,
                    tid: ev.tid,
                    breaker_type: ev.breaker_type,
                    nonblock: ev.nonblock,
                    _pad: [0; 6],
                };
                r.n_breakers += 1;
            }
        }
    }

    /// Makes the set agree with /proc/locks: imports leases it lacks (`Reconciled`),
    /// drops leases the kernel no longer has (closed), and fixes states. Returns the
    /// changed keys.
    pub fn reconcile(&mut self, procs: &[ProcLock]) -> Vec<LeaseKey> {
        let mut changed = Vec::new();
        let kernel: Vec<&ProcLock> = procs
            .iter()
            .filter(|p| !p.blocked && p.kind == ProcKind::Lease && p.state != "BREAKER")
            .collect();
        let mut unmatched: Vec<LeaseKey> = self.leases.keys().copied().collect();
        unmatched.sort();
        let seen_before = std::mem::take(&mut self.seen_breaking);
        for p in kernel {
            let pid = p.pid.max(0) as u32;
            let dev = p.dev.0;
            let pos = unmatched
                .iter()
                .position(|k| k.dev == dev && k.ino == p.ino && self.leases[k].pid == pid);
            let target = p
                .lock_type
                .map(|t| t.to_fl_type())
                .unwrap_or(fl_type::F_UNLCK);
            let breaking = p.state == "BREAKING";
            match pos {
                Some(i) => {
                    let k = unmatched.remove(i);
                    let r = self.leases.get_mut(&k).expect("key from the map");
                    let ours_breaking = r.state == LeaseState::Breaking as u8;
                    if !breaking && ours_breaking {
                        settle(r, target);
                        changed.push(k);
                    } else if breaking && !ours_breaking {
                        if r.origin == Origin::Reconciled as u8 || seen_before.contains(&k) {
                            r.state = LeaseState::Breaking as u8;
                            r.target_type = target;
                            changed.push(k);
                        } else {
                            // Its break event may be on its way: look again next time.
                            self.seen_breaking.insert(k);
                        }
                    }
                }
                None => {
                    let k = key(dev, p.ino, self.next_synthetic);
                    self.next_synthetic += 1;
                    self.leases.insert(
                        k,
                        LeaseRecord {
                            pid,
                            fd: -1,
                            lease_type: if breaking { TYPE_UNKNOWN } else { target },
                            target_type: target,
                            state: if breaking {
                                LeaseState::Breaking
                            } else {
                                LeaseState::Active
                            } as u8,
                            origin: Origin::Reconciled as u8,
                            ..Default::default()
                        },
                    );
                    changed.push(k);
                }
            }
        }
        for k in unmatched {
            self.leases.remove(&k);
            changed.push(k);
        }
        changed
    }
}

/// The break is over: the lease is an active lease of type `t`.
fn settle(r: &mut LeaseRecord, t: u8) {
    r.state = LeaseState::Active as u8;
    r.lease_type = t;
    r.target_type = t;
    r.break_started_ns = 0;
    r.deadline_jiffies = 0;
    r.deadline_ns = 0;
    r.n_breakers = 0;
    r.breakers_total = 0;
    r.breakers = [Breaker::default(); MAX_BREAKERS];
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::locks::proc_locks;

    const HZ: u32 = 250;
    const OWNER: u64 = 0xffff_8880_0000_1000;

    fn ev(what: LeaseWhat) -> LeaseEvent {
        LeaseEvent {
            tag: ckpt_common::tag::LEASE,
            what: what as u32,
            ts_ns: 10_000_000_000,
            jiffies: 5_000,
            ino: 42,
            owner: OWNER,
            dev: 8 << 20 | 1,
            pid: 100,
            tgid: 100,
            tid: 100,
            fd: 3,
            ..Default::default()
        }
    }

    fn set(t: u8) -> LeaseEvent {
        LeaseEvent {
            lease_type: t,
            ..ev(LeaseWhat::Set)
        }
    }

    fn brk(flags: u32, deadline: u64, breaker_tid: u32, signal: i32) -> LeaseEvent {
        LeaseEvent {
            flags: fl_flags::FL_LEASE | flags,
            break_time: if flags & fl_flags::FL_UNLOCK_PENDING != 0 {
                deadline
            } else {
                0
            },
            downgrade_time: if flags & fl_flags::FL_DOWNGRADE_PENDING != 0 {
                deadline
            } else {
                0
            },
            lease_type: fl_type::F_WRLCK,
            tgid: breaker_tid,
            tid: breaker_tid,
            breaker_type: fl_type::F_WRLCK,
            signal,
            ..ev(LeaseWhat::Breaking)
        }
    }

    fn only(s: &LeaseSet) -> LeaseRecord {
        assert_eq!(s.leases.len(), 1, "{:?}", s.leases);
        *s.leases.values().next().unwrap()
    }

    #[test]
    fn break_records_exact_deadline_pre_break_type_sysctl_and_signal() {
        let mut s = LeaseSet::new(HZ, HashMap::new());
        s.apply(&set(fl_type::F_WRLCK));
        assert_eq!(only(&s).state, LeaseState::Active as u8);
        // lease-break-time 5 s: deadline = jiffies + 5 * 250.
        s.apply(&brk(fl_flags::FL_UNLOCK_PENDING, 5_000 + 1_250, 200, 29));
        let r = only(&s);
        assert_eq!(r.state, LeaseState::Breaking as u8);
        assert_eq!(
            (r.lease_type, r.target_type),
            (fl_type::F_WRLCK, fl_type::F_UNLCK)
        );
        assert_eq!(r.deadline_jiffies, 6_250);
        assert_eq!(r.deadline_ns, 10_000_000_000 + 5_000_000_000);
        assert_eq!(r.lease_break_time_s, 5);
        assert_eq!((r.notified, r.signal), (1, 29));
        assert_eq!((r.n_breakers, r.breakers[0].pid), (1, 200));
        // A second breaker joins: no new signal, deadline unchanged, two breakers.
        let mut later = brk(fl_flags::FL_UNLOCK_PENDING, 6_250, 201, 0);
        later.ts_ns += 1_000_000_000;
        later.jiffies += 250;
        s.apply(&later);
        let r2 = only(&s);
        assert_eq!(
            (r2.deadline_ns, r2.break_started_ns),
            (r.deadline_ns, r.break_started_ns)
        );
        assert_eq!((r2.n_breakers, r2.breakers_total, r2.notified), (2, 2, 1));
        // The same breaker again (the kernel restarted its wait): still two.
        s.apply(&later);
        assert_eq!(only(&s).n_breakers, 2);
    }

    #[test]
    fn downgrade_break_completed_by_the_holder_and_unlock_break_is_not() {
        let mut s = LeaseSet::new(HZ, HashMap::new());
        s.apply(&set(fl_type::F_WRLCK));
        s.apply(&brk(fl_flags::FL_DOWNGRADE_PENDING, 6_000, 200, 29));
        assert_eq!(only(&s).target_type, fl_type::F_RDLCK);
        s.apply(&set(fl_type::F_RDLCK));
        let r = only(&s);
        assert_eq!(
            (r.state, r.lease_type),
            (LeaseState::Active as u8, fl_type::F_RDLCK)
        );

        let mut s = LeaseSet::new(HZ, HashMap::new());
        s.apply(&set(fl_type::F_WRLCK));
        s.apply(&brk(fl_flags::FL_UNLOCK_PENDING, 6_000, 200, 29));
        s.apply(&set(fl_type::F_RDLCK));
        let r = only(&s);
        assert_eq!(r.state, LeaseState::Breaking as u8, "unlock break goes on");
        assert_eq!(
            (r.lease_type, r.target_type),
            (fl_type::F_RDLCK, fl_type::F_UNLCK)
        );
        s.apply(&LeaseEvent {
            lease_type: fl_type::F_UNLCK,
            ..ev(LeaseWhat::Released)
        });
        assert!(s.leases.is_empty());
    }

    #[test]
    fn time_outs_downgrade_or_remove() {
        let mut s = LeaseSet::new(HZ, HashMap::new());
        s.apply(&set(fl_type::F_WRLCK));
        s.apply(&brk(fl_flags::FL_DOWNGRADE_PENDING, 6_000, 200, 29));
        s.apply(&LeaseEvent {
            lease_type: fl_type::F_RDLCK,
            ..ev(LeaseWhat::TimedOut)
        });
        let r = only(&s);
        assert_eq!(
            (r.state, r.lease_type, r.n_breakers),
            (LeaseState::Active as u8, fl_type::F_RDLCK, 0)
        );
        s.apply(&brk(fl_flags::FL_UNLOCK_PENDING, 7_000, 201, 29));
        s.apply(&LeaseEvent {
            lease_type: fl_type::F_UNLCK,
            ..ev(LeaseWhat::TimedOut)
        });
        assert!(s.leases.is_empty());
    }

    #[test]
    fn reconcile_imports_adopts_and_drops() {
        let procs = proc_locks::parse(
            "1: LEASE  ACTIVE    READ 100 08:01:42 0 EOF\n2: LEASE  BREAKING  UNLCK 300 08:01:43 0 EOF\n",
        )
        .unwrap();
        let mut s = LeaseSet::new(HZ, HashMap::new());
        s.reconcile(&procs);
        assert_eq!(s.leases.len(), 2);
        let breaking = s.leases.values().find(|r| r.pid == 300).unwrap();
        assert_eq!(
            breaking.lease_type, TYPE_UNKNOWN,
            "pre-break type is not in /proc"
        );
        assert_eq!(breaking.origin, Origin::Reconciled as u8);
        // The holder of the imported read lease releases it: adopted, then removed.
        s.apply(&LeaseEvent {
            lease_type: fl_type::F_UNLCK,
            ..ev(LeaseWhat::Released)
        });
        assert_eq!(s.leases.len(), 1);
        // The kernel no longer lists the other one (its fd was closed).
        s.reconcile(&[]);
        assert!(s.leases.is_empty());
    }

    /// The kernel marks a lease breaking just before the break tracepoint fires: a
    /// reconcile in between must not turn a traced lease into a break without its
    /// deadline; only a second sighting without any event does.
    #[test]
    fn reconcile_waits_for_the_break_event_of_a_traced_lease() {
        let mut s = LeaseSet::new(HZ, HashMap::new());
        s.apply(&set(fl_type::F_WRLCK));
        let procs = proc_locks::parse("1: LEASE  BREAKING  UNLCK 100 08:01:42 0 EOF\n").unwrap();
        s.reconcile(&procs);
        assert_eq!(only(&s).state, LeaseState::Active as u8);
        s.apply(&brk(fl_flags::FL_UNLOCK_PENDING, 6_000, 200, 29));
        let r = only(&s);
        assert_eq!(r.state, LeaseState::Breaking as u8);
        assert!(r.break_started_ns > 0, "the event's break, with its times");
        // Without any event, a second sighting settles it.
        let mut s = LeaseSet::new(HZ, HashMap::new());
        s.apply(&set(fl_type::F_WRLCK));
        s.reconcile(&procs);
        s.reconcile(&procs);
        assert_eq!(only(&s).state, LeaseState::Breaking as u8);
    }

    #[test]
    fn reconcile_settles_a_break_that_ended_unseen() {
        let mut s = LeaseSet::new(HZ, HashMap::new());
        s.apply(&set(fl_type::F_WRLCK));
        s.apply(&brk(fl_flags::FL_DOWNGRADE_PENDING, 6_000, 200, 29));
        let procs = proc_locks::parse("1: LEASE  ACTIVE    READ 100 08:01:42 0 EOF\n").unwrap();
        s.reconcile(&procs);
        let r = only(&s);
        assert_eq!(
            (r.state, r.lease_type),
            (LeaseState::Active as u8, fl_type::F_RDLCK)
        );
    }
}
