//! Locks, leases and waiters of the dumped processes.
//!
//! /proc/PID/fdinfo/N `lock:` lines name the locks of each description (and POSIX locks
//! of each process through it): they place every lock on the right open file
//! description. With an agent, every such lock must also be in the agent's table, and
//! every lock the agent attributes to a dumped process or description must show up in
//! fdinfo; a disagreement stops the dump. The agent adds what /proc cannot tell: lease
//! deadlines, pre-break types, whether the holder was signalled, breakers, waiting times.

use std::collections::{BTreeSet, HashMap, HashSet};

use anyhow::{bail, Result};
use ckpt_common::{
    lease::{LeaseRecord, LeaseState},
    lock::{fl_flags, fl_type, LockKind as KLockKind, Waiter as KWaiter},
};

use super::files::FoundFd;
use crate::{
    image::format::{Breaker, Lease, Lock, LockKind, LockType, Waiter},
    leases::model::{is_synthetic, TYPE_UNKNOWN},
    locks::{
        model::HeldLock,
        proc_locks::{ProcKind, ProcLock},
        record::held_of,
        KernelDev, LockType as KLockType,
    },
    view::live::Snapshot,
};

/// What the agent knew at the freeze: its tables, and the waiters from just before the
/// freeze (freezing interrupts blocked lock calls; they restart after the thaw).
pub struct AgentView {
    pub snapshot: Snapshot,
    pub waiters: Vec<KWaiter>,
}

pub struct Collected {
    pub locks: Vec<Lock>,
    pub leases: Vec<Lease>,
    pub waiters: Vec<Waiter>,
}

fn kind_of(k: KLockKind) -> LockKind {
    match k {
        KLockKind::Posix => LockKind::Posix,
        KLockKind::Ofd => LockKind::Ofd,
        KLockKind::Flock => LockKind::Flock,
    }
}

fn ty(t: KLockType) -> LockType {
    match t {
        KLockType::Read => LockType::Read,
        KLockType::Write => LockType::Write,
    }
}

fn fl_ty(t: u8) -> Option<LockType> {
    KLockType::from_fl_type(t).map(ty)
}

fn describe(p: &ProcLock) -> String {
    let end = if p.end == i64::MAX {
        "EOF".to_string()
    } else {
        p.end.to_string()
    };
    format!("{:?} {:?} {}-{}", p.kind, p.lock_type, p.start, end)
}

/// A lock or lease line found in fdinfo, placed on its description.
struct Found<'a> {
    line: &'a ProcLock,
    pid: u32,
    fd: i32,
    desc: u32,
}

/// Puts every lock, lease and waiter on its description, cross-checking the agent's
/// tables against the `lock:` lines. `owners` maps kernel owners (struct file) to
/// descriptions when the iterator told them (empty otherwise: learnt from matches).
pub fn collect(
    fds: &[FoundFd],
    desc_of: &[u32],
    pids: &BTreeSet<u32>,
    agent: Option<&AgentView>,
    proc_waiters: &[ProcLock],
    frozen_ns: u64,
    owners: HashMap<u64, u32>,
) -> Result<Collected> {
    // 1. Every lock and lease line, once per (kind, owner, range).
    let mut seen = HashSet::new();
    let mut found: Vec<Found> = Vec::new();
    for (i, f) in fds.iter().enumerate() {
        let desc = desc_of[i];
        for line in &f.info.locks {
            let owner_key = match line.kind {
                ProcKind::Lock(KLockKind::Posix) => (0, f.pid as u64, desc),
                _ => (1, 0, desc),
            };
            let shape = (
                format!("{:?}", line.kind),
                owner_key,
                line.start,
                line.end,
                line.lock_type,
            );
            if seen.insert(shape) {
                found.push(Found {
                    line,
                    pid: f.pid,
                    fd: f.fd,
                    desc,
                });
            }
        }
    }
    // stat() gives btrfs files their subvolume's device, locks the superblock's: know
    // each file by both (fdinfo lock lines carry the latter).
    let inodes: HashSet<(KernelDev, u64)> = fds
        .iter()
        .map(|f| (f.dev, f.ino))
        .chain(
            fds.iter()
                .filter_map(|f| f.kernel.map(|k| (k.s_dev, f.ino))),
        )
        .chain(
            fds.iter()
                .flat_map(|f| f.info.locks.iter().map(|l| (l.dev, l.ino))),
        )
        .collect();

    let mut out = Collected {
        locks: Vec::new(),
        leases: Vec::new(),
        waiters: Vec::new(),
    };
    let agent_locks: Vec<(KernelDev, u64, HeldLock)> = agent
        .map(|a| {
            a.snapshot
                .locks
                .iter()
                .filter_map(|(k, r)| held_of(k, r).map(|l| (KernelDev(k.dev), k.ino, l)))
                .filter(|(d, i, _)| inodes.contains(&(*d, *i)))
                .collect()
        })
        .unwrap_or_default();
    let mut matched = vec![false; agent_locks.len()];
    // Candidates by inode, so matching is linear in the number of locks.
    let mut by_inode: HashMap<(KernelDev, u64), Vec<usize>> = HashMap::new();
    for (j, (d, ino, _)) in agent_locks.iter().enumerate() {
        by_inode.entry((*d, *ino)).or_default().push(j);
    }
    // Kernel owner (struct file) of each description, learnt from OFD/flock matches.
    let mut owner_desc = owners;

    for fl in found.iter() {
        let line = fl.line;
        let ProcKind::Lock(kind) = line.kind else {
            continue;
        };
        let Some(lock_type) = line.lock_type else {
            continue;
        };
        let dev = line.dev;
        let mut pid = if kind == KLockKind::Posix {
            fl.pid
        } else {
            line.pid.max(0) as u32
        };
        if agent.is_some() {
            let candidates = by_inode
                .get(&(dev, line.ino))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let hit = candidates.iter().copied().find(|&j| {
                let l = &agent_locks[j].2;
                !matched[j]
                    && l.kind == kind
                    && l.start == line.start
                    && l.end == line.end
                    && l.lock_type == lock_type
                    && match kind {
                        KLockKind::Posix => l.pid == fl.pid,
                        _ => {
                            is_synthetic(l.owner)
                                || owner_desc.get(&l.owner).is_none_or(|d| *d == fl.desc)
                        }
                    }
            });
            let Some(j) = hit else {
                bail!(
                    "lock disagreement on {dev}:{}: /proc/{}/fdinfo/{} shows {} but the agent's table does not",
                    line.ino,
                    fl.pid,
                    fl.fd,
                    describe(line)
                );
            };
            matched[j] = true;
            let l = &agent_locks[j].2;
            if kind != KLockKind::Posix {
                if !is_synthetic(l.owner) {
                    owner_desc.insert(l.owner, fl.desc);
                }
                pid = l.pid;
            }
        }
        out.locks.push(Lock {
            kind: kind_of(kind),
            lock_type: ty(lock_type),
            start: line.start,
            end: line.end,
            pid,
            file: fl.desc,
            dev: dev.to_string(),
            ino: line.ino,
        });
    }
    // Locks the agent attributes to a dumped process or description must have been seen.
    for (j, (d, ino, l)) in agent_locks.iter().enumerate() {
        let ours = match l.kind {
            KLockKind::Posix => pids.contains(&l.pid),
            _ => owner_desc.contains_key(&l.owner),
        };
        if !matched[j] && ours {
            let end = if l.end == i64::MAX {
                "EOF".to_string()
            } else {
                l.end.to_string()
            };
            bail!(
                "lock disagreement on {d}:{ino}: the agent has {:?} {:?} {}-{end} of pid {} but /proc/*/fdinfo does not",
                l.kind,
                l.lock_type,
                l.start,
                l.pid
            );
        }
    }

    // 2. Leases.
    let mut lease_matched = HashSet::new();
    for fl in found
        .iter()
        .filter(|f| f.line.kind == ProcKind::Lease && f.line.state != "BREAKER")
    {
        let line = fl.line;
        let breaking = line.state == "BREAKING";
        let target = line.lock_type.map(ty);
        let lease = match agent {
            None => Lease {
                file: fl.desc,
                pid: line.pid.max(0) as u32,
                lease_type: if breaking { None } else { target },
                breaking,
                target_type: target,
                remaining_ns: None,
                lease_break_time_s: None,
                notified: false,
                signal: None,
                breakers: Vec::new(),
            },
            Some(a) => {
                let hit = a.snapshot.leases.iter().find(|(k, r)| {
                    !lease_matched.contains(k)
                        && k.dev == line.dev.0
                        && k.ino == line.ino
                        && r.pid as i64 == line.pid
                        && (is_synthetic(k.owner)
                            || owner_desc.get(&k.owner).is_none_or(|d| *d == fl.desc))
                });
                let Some((k, r)) = hit else {
                    bail!(
                        "lease disagreement on {}:{}: /proc/{}/fdinfo/{} shows a {} lease the agent has no record of",
                        line.dev,
                        line.ino,
                        fl.pid,
                        fl.fd,
                        line.state.to_lowercase()
                    );
                };
                lease_matched.insert(*k);
                if (r.state == LeaseState::Breaking as u8) != breaking {
                    bail!(
                        "lease disagreement on {}:{}: /proc says {} but the agent says {}",
                        line.dev,
                        line.ino,
                        line.state,
                        if breaking { "active" } else { "breaking" }
                    );
                }
                lease_from_agent(fl.desc, r, frozen_ns)
            }
        };
        out.leases.push(lease);
    }

    // 3. Waiters, as they were just before the freeze.
    match agent {
        Some(a) => {
            for w in a.waiters.iter().filter(|w| pids.contains(&w.tgid)) {
                let Some(lock_type) = fl_ty(w.lock_type) else {
                    continue;
                };
                let kind = if w.flags & fl_flags::FL_LEASE != 0 {
                    "lease"
                } else {
                    match KLockKind::from_fl_flags(w.flags) {
                        Some(KLockKind::Posix) => "posix",
                        Some(KLockKind::Ofd) => "ofd",
                        Some(KLockKind::Flock) => "flock",
                        None => continue,
                    }
                };
                out.waiters.push(Waiter {
                    pid: w.tgid,
                    tid: w.tid,
                    kind: kind.into(),
                    lock_type,
                    start: w.start,
                    end: w.end,
                    dev: KernelDev(w.dev).to_string(),
                    ino: w.ino,
                    waited_ns: Some(frozen_ns.saturating_sub(w.since_ns)),
                });
            }
        }
        None => {
            for p in proc_waiters
                .iter()
                .filter(|p| p.blocked && p.pid > 0 && pids.contains(&(p.pid as u32)))
            {
                let Some(lock_type) = p.lock_type.map(ty) else {
                    continue;
                };
                let kind = match p.kind {
                    ProcKind::Lock(KLockKind::Posix) => "posix",
                    ProcKind::Lock(KLockKind::Ofd) => "ofd",
                    ProcKind::Lock(KLockKind::Flock) => "flock",
                    ProcKind::Lease => "lease",
                    ProcKind::Other => continue,
                };
                out.waiters.push(Waiter {
                    pid: p.pid as u32,
                    tid: p.pid as u32,
                    kind: kind.into(),
                    lock_type,
                    start: p.start,
                    end: p.end,
                    dev: p.dev.to_string(),
                    ino: p.ino,
                    waited_ns: None,
                });
            }
        }
    }
    Ok(out)
}

fn lease_from_agent(file: u32, r: &LeaseRecord, frozen_ns: u64) -> Lease {
    let breaking = r.state == LeaseState::Breaking as u8;
    Lease {
        file,
        pid: r.pid,
        lease_type: if r.lease_type == TYPE_UNKNOWN {
            None
        } else {
            fl_ty(r.lease_type)
        },
        breaking,
        target_type: if breaking {
            fl_ty(r.target_type)
        } else {
            fl_ty(r.lease_type)
        },
        remaining_ns: (breaking && r.deadline_ns > 0)
            .then(|| r.deadline_ns as i64 - frozen_ns as i64),
        lease_break_time_s: (breaking && r.break_started_ns > 0).then_some(r.lease_break_time_s),
        notified: r.notified != 0,
        signal: (r.signal != 0).then_some(r.signal),
        breakers: r.breakers[..r.n_breakers as usize]
            .iter()
            .map(|b| Breaker {
                pid: b.pid,
                tid: b.tid,
                write: b.breaker_type == fl_type::F_WRLCK,
                nonblock: b.nonblock != 0,
            })
            .collect(),
    }
}
