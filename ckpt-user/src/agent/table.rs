//! The lock table: an in-memory index of held locks, mirrored into the pinned `LOCKS`
//! map that readers use. Events are applied through `locks::model`; only the keys an
//! event changed are written, so the map stays consistent lock by lock.

use std::collections::HashMap;

use anyhow::Result;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError};
use ckpt_common::{
    counters::AgentStat,
    lock::{EventSource, LockEvent, LockKey, LockKind, LockRecord, Origin},
};
use tracing::warn;

use crate::locks::{
    model::{Change, HeldLock, List, OwnerLocks, Request},
    KernelDev, LockType,
};

pub type InodeId = (KernelDev, u64);

/// One owner's locks on one list of one inode.
pub type OwnerKey = (InodeId, List, u64);

/// Synthetic owners of locks imported from /proc/locks are small integers; kernel
/// owners are kernel addresses, far above this.
fn is_synthetic(owner: u64) -> bool {
    owner <= u32::MAX as u64
}

/// Who can be holding a lock imported from /proc/locks: (pid, fd) pairs found in
/// /proc/PID/fdinfo. Used to recognise its kernel owner when an event names it.
pub type Holders = Vec<(u32, i32)>;

/// Held locks, in memory and in the pinned map. Changes are staged per key and written
/// by [`LockTable::flush`], so a burst of events costs one map write per lock that
/// actually changed, not one per event.
pub struct LockTable {
    map: BpfHashMap<MapData, LockKey, LockRecord>,
    stats: Array<MapData, u64>,
    owners: HashMap<OwnerKey, OwnerLocks>,
    /// Imported locks whose kernel owner is not known yet, by inode.
    unadopted: HashMap<InodeId, Vec<OwnerKey>>,
    /// Who may hold each unadopted OFD/flock lock (by synthetic owner).
    holders: HashMap<u64, Holders>,
    next_synthetic_owner: u64,
    /// key -> record to write, or None to delete.
    staged: HashMap<LockKey, Option<LockRecord>>,
    /// Counters not yet added to AGENT_STATS.
    applied: u64,
    reconciled: u64,
}

pub fn key_of(dev: KernelDev, ino: u64, l: &HeldLock) -> LockKey {
    LockKey {
        dev: dev.0,
        kind: l.kind as u8,
        _pad: [0; 3],
        ino,
        owner: l.owner,
        start: l.start,
    }
}

pub fn record_of(l: &HeldLock) -> LockRecord {
    LockRecord {
        end: l.end,
        since_ns: l.since_ns,
        pid: l.pid,
        fd: l.fd,
        lock_type: l.lock_type.to_fl_type(),
        origin: l.origin as u8,
        _pad: [0; 6],
    }
}

/// Inverse of `key_of`/`record_of`; `None` for entries this version cannot read.
pub fn held_of(k: &LockKey, r: &LockRecord) -> Option<HeldLock> {
    Some(HeldLock {
        kind: LockKind::from_u8(k.kind)?,
        owner: k.owner,
        start: k.start,
        end: r.end,
        lock_type: LockType::from_fl_type(r.lock_type)?,
        pid: r.pid,
        fd: r.fd,
        since_ns: r.since_ns,
        origin: if r.origin == Origin::Reconciled as u8 {
            Origin::Reconciled
        } else {
            Origin::Traced
        },
    })
}

/// Turns a raw event into a model request; `None` for events that are not locks.
pub fn request_of(ev: &LockEvent) -> Option<Request> {
    let kind = match ev.source {
        s if s == EventSource::Flock as u8 => LockKind::Flock,
        s if s == EventSource::Posix as u8 => match LockKind::from_fl_flags(ev.flags)? {
            LockKind::Flock => return None,
            k => k,
        },
        _ => return None,
    };
    Some(Request {
        kind,
        owner: ev.owner,
        start: ev.start,
        end: ev.end,
        lock_type: LockType::from_fl_type(ev.lock_type),
        pid: ev.pid,
        fd: ev.fd,
        ts_ns: ev.ts_ns,
        ret: ev.ret,
    })
}

impl LockTable {
    /// Opens the table, loading whatever a previous agent left in the pinned map.
    pub fn open(
        map: BpfHashMap<MapData, LockKey, LockRecord>,
        stats: Array<MapData, u64>,
    ) -> Result<LockTable> {
        let mut table = LockTable {
            map,
            stats,
            owners: HashMap::new(),
            unadopted: HashMap::new(),
            holders: HashMap::new(),
            next_synthetic_owner: 1,
            staged: HashMap::new(),
            applied: 0,
            reconciled: 0,
        };
        let saved: Vec<(LockKey, LockRecord)> = table.map.iter().collect::<Result<_, _>>()?;
        for (k, r) in saved {
            let Some(l) = held_of(&k, &r) else { continue };
            let id = (KernelDev(k.dev), k.ino);
            let key = (id, List::of(l.kind), l.owner);
            if is_synthetic(l.owner) {
                table.next_synthetic_owner = table.next_synthetic_owner.max(l.owner + 1);
                table.unadopted.entry(id).or_default().push(key);
            }
            table.owners.entry(key).or_default().insert(l);
        }
        Ok(table)
    }

    pub fn len(&self) -> usize {
        self.owners.values().map(OwnerLocks::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    pub fn stat(&self, s: AgentStat) -> Result<u64> {
        Ok(self.stats.get(&(s as u32), 0)?)
    }

    pub fn set_stat(&mut self, s: AgentStat, v: u64) -> Result<()> {
        Ok(self.stats.set(s as u32, v, 0)?)
    }

    fn add_stat(&mut self, s: AgentStat, n: u64) -> Result<()> {
        if n > 0 {
            let v = self.stat(s)?;
            self.set_stat(s, v + n)?;
        }
        Ok(())
    }

    /// Applies one traced event (in memory; see [`LockTable::flush`]).
    pub fn apply(&mut self, ev: &LockEvent) {
        self.applied += 1;
        let Some(req) = request_of(ev) else {
            return;
        };
        let id = (KernelDev(ev.dev), ev.ino);
        if self.unadopted.contains_key(&id) {
            self.adopt_reconciled(id, &req, ev.tgid);
        }
        let key = (id, List::of(req.kind), req.owner);
        let owner = self.owners.entry(key).or_default();
        let change = owner.apply(&req);
        if owner.is_empty() {
            self.owners.remove(&key);
        }
        self.stage(id, &change);
    }

    fn stage(&mut self, id: InodeId, change: &Change) {
        for l in &change.removed {
            self.staged.insert(key_of(id.0, id.1, l), None);
        }
        for l in &change.added {
            self.staged
                .insert(key_of(id.0, id.1, l), Some(record_of(l)));
        }
    }

    /// Writes staged changes and counters to the pinned maps. Deletions go first so
    /// that a full map has room for what replaces them.
    pub fn flush(&mut self) -> Result<()> {
        if !self.staged.is_empty() {
            let seq = self.stat(AgentStat::FlushSeq)?;
            let seq = seq + (seq & 1) + 1; // odd: writing
            self.set_stat(AgentStat::FlushSeq, seq)?;
            let written = self.write_staged();
            self.set_stat(AgentStat::FlushSeq, seq + 1)?;
            written?;
        }
        let applied = std::mem::take(&mut self.applied);
        let reconciled = std::mem::take(&mut self.reconciled);
        self.add_stat(AgentStat::EventsApplied, applied)?;
        self.add_stat(AgentStat::Reconciled, reconciled)
    }

    fn write_staged(&mut self) -> Result<()> {
        let mut staged: Vec<(LockKey, Option<LockRecord>)> = self.staged.drain().collect();
        staged.sort_by_key(|(_, v)| v.is_some());
        let mut full = 0;
        for (k, v) in staged {
            match v {
                // A lock added and removed within one batch was never written.
                None => match self.map.remove(&k) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(e.into()),
                },
                Some(r) => {
                    if let Err(e) = self.map.insert(k, r, 0) {
                        full += 1;
                        warn!(error = %e, dev = %KernelDev(k.dev), ino = k.ino, "LOCKS map insert failed (map full?): lock not visible to readers");
                    }
                }
            }
        }
        self.add_stat(AgentStat::LocksFull, full)
    }

    /// Locks imported from /proc/locks have no kernel owner. When an event comes from
    /// their owner, give them that owner so that the event applies to them.
    fn adopt_reconciled(&mut self, id: InodeId, req: &Request, tgid: u32) {
        let list = List::of(req.kind);
        let Some(candidates) = self.unadopted.get(&id) else {
            return;
        };
        let ours: Vec<OwnerKey> = candidates
            .iter()
            .filter(|k| k.1 == list)
            .filter(|k| {
                let Some(lock) = self.owners.get(k).and_then(|o| o.iter().next()) else {
                    return false;
                };
                match lock.kind {
                    // POSIX owner = the process: fl_pid identifies it.
                    LockKind::Posix => req.kind == LockKind::Posix && lock.pid == req.pid,
                    // OFD/flock owner = the open file description: match the fd the
                    // request came through (or, for a close, the closing process).
                    LockKind::Ofd | LockKind::Flock => self.holders.get(&k.2).is_some_and(|h| {
                        h.iter()
                            .any(|&(pid, fd)| pid == tgid && (fd == req.fd || req.fd < 0))
                    }),
                }
            })
            .copied()
            .collect();
        for old_key in ours {
            self.forget_unadopted(id, old_key);
            let Some(old) = self.owners.remove(&old_key) else {
                continue;
            };
            let new_key = (id, list, req.owner);
            let mut change = Change::default();
            for l in old.iter() {
                let moved = HeldLock {
                    owner: req.owner,
                    ..*l
                };
                change.removed.push(*l);
                change.added.push(moved);
                self.owners.entry(new_key).or_default().insert(moved);
            }
            self.stage(id, &change);
        }
    }

    fn forget_unadopted(&mut self, id: InodeId, key: OwnerKey) {
        if let Some(v) = self.unadopted.get_mut(&id) {
            v.retain(|k| *k != key);
            if v.is_empty() {
                self.unadopted.remove(&id);
            }
        }
        self.holders.remove(&key.2);
    }

    /// Adds a lock imported from /proc/locks, with a synthetic owner.
    pub fn insert_reconciled(&mut self, id: InodeId, mut l: HeldLock, holders: Holders) {
        l.owner = self.next_synthetic_owner;
        l.origin = Origin::Reconciled;
        self.next_synthetic_owner += 1;
        let key = (id, List::of(l.kind), l.owner);
        self.holders.insert(l.owner, holders);
        self.unadopted.entry(id).or_default().push(key);
        self.owners.entry(key).or_default().insert(l);
        self.stage(
            id,
            &Change {
                removed: vec![],
                added: vec![l],
            },
        );
        self.reconciled += 1;
    }

    /// Removes one lock (used when /proc/locks shows a reconciled lock is gone).
    pub fn remove(&mut self, id: InodeId, l: &HeldLock) {
        let key = (id, List::of(l.kind), l.owner);
        if let Some(o) = self.owners.get_mut(&key) {
            o.remove(l.start);
            if o.is_empty() {
                self.owners.remove(&key);
                self.forget_unadopted(id, key);
            }
        }
        self.stage(
            id,
            &Change {
                removed: vec![*l],
                added: vec![],
            },
        );
    }

    /// Whether imported locks still wait for their owner to show up.
    pub fn has_reconciled(&self) -> bool {
        !self.unadopted.is_empty()
    }

    /// Whether a lock is an imported one whose owner is still unknown.
    pub fn is_unadopted(l: &HeldLock) -> bool {
        l.origin == Origin::Reconciled && is_synthetic(l.owner)
    }

    pub fn iter(&self) -> impl Iterator<Item = (InodeId, &HeldLock)> {
        self.owners
            .iter()
            .flat_map(|((id, _, _), o)| o.iter().map(move |l| (*id, l)))
    }

    /// Forgets everything (before a full resynchronisation).
    pub fn clear(&mut self) {
        let all: Vec<(InodeId, HeldLock)> = self.iter().map(|(id, l)| (id, *l)).collect();
        for (id, l) in all {
            self.remove(id, &l);
        }
    }
}
