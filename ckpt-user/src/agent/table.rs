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
    model::{HeldLock, InodeLocks, Request},
    KernelDev, LockType,
};

pub type InodeId = (KernelDev, u64);

/// Who can be holding a lock imported from /proc/locks: (pid, fd) pairs found in
/// /proc/PID/fdinfo. Used to recognise its kernel owner when an event names it.
pub type Holders = Vec<(u32, i32)>;

pub struct LockTable {
    map: BpfHashMap<MapData, LockKey, LockRecord>,
    stats: Array<MapData, u64>,
    inodes: HashMap<InodeId, InodeLocks>,
    holders: HashMap<u64, Holders>,
    next_synthetic_owner: u64,
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
        let mut inodes: HashMap<InodeId, InodeLocks> = HashMap::new();
        let mut max_synthetic = 0;
        for entry in map.iter() {
            let (k, r) = entry?;
            if let Some(l) = held_of(&k, &r) {
                if l.origin == Origin::Reconciled && l.owner <= u32::MAX as u64 {
                    max_synthetic = max_synthetic.max(l.owner);
                }
                inodes
                    .entry((KernelDev(k.dev), k.ino))
                    .or_default()
                    .locks
                    .push(l);
            }
        }
        Ok(LockTable {
            map,
            stats,
            inodes,
            holders: HashMap::new(),
            next_synthetic_owner: max_synthetic + 1,
        })
    }

    pub fn len(&self) -> usize {
        self.inodes.values().map(|i| i.locks.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.inodes.is_empty()
    }

    pub fn stat(&self, s: AgentStat) -> Result<u64> {
        Ok(self.stats.get(&(s as u32), 0)?)
    }

    pub fn set_stat(&mut self, s: AgentStat, v: u64) -> Result<()> {
        Ok(self.stats.set(s as u32, v, 0)?)
    }

    fn bump(&mut self, s: AgentStat) -> Result<()> {
        let v = self.stat(s)?;
        self.set_stat(s, v + 1)
    }

    /// Applies one traced event.
    pub fn apply(&mut self, ev: &LockEvent) -> Result<()> {
        self.bump(AgentStat::EventsApplied)?;
        let Some(req) = request_of(ev) else {
            return Ok(());
        };
        let id = (KernelDev(ev.dev), ev.ino);
        self.adopt_reconciled(id, &req, ev.tgid)?;
        let inode = self.inodes.entry(id).or_default();
        let (before, after) = inode.apply(&req);
        if inode.is_empty() {
            self.inodes.remove(&id);
        }
        self.write_diff(id, &before, &after)
    }

    /// Writes the difference between an owner's locks before and after a change.
    fn write_diff(&mut self, id: InodeId, before: &[HeldLock], after: &[HeldLock]) -> Result<()> {
        for b in before {
            if !after.iter().any(|a| a.start == b.start) {
                match self.map.remove(&key_of(id.0, id.1, b)) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        for a in after {
            if before.contains(a) {
                continue;
            }
            if let Err(e) = self.map.insert(key_of(id.0, id.1, a), record_of(a), 0) {
                self.bump(AgentStat::LocksFull)?;
                warn!(error = %e, dev = %id.0, ino = id.1, "LOCKS map insert failed (map full?): lock not visible to readers");
            }
        }
        Ok(())
    }

    /// Locks imported from /proc/locks have no kernel owner. When an event comes from
    /// their owner, give them that owner so that the event applies to them.
    fn adopt_reconciled(&mut self, id: InodeId, req: &Request, tgid: u32) -> Result<()> {
        let Some(inode) = self.inodes.get_mut(&id) else {
            return Ok(());
        };
        let mut changed = Vec::new();
        for l in inode.locks.iter_mut() {
            if l.origin != Origin::Reconciled || l.kind != req.kind || l.owner == req.owner {
                continue;
            }
            if l.owner > u32::MAX as u64 {
                continue; // already adopted: the owner is a kernel address
            }
            let ours = match req.kind {
                // POSIX owner = the process: fl_pid identifies it.
                LockKind::Posix => l.pid == req.pid,
                // OFD/flock owner = the open file description: match the fd it came
                // through (or, for a close without fd, the closing process).
                LockKind::Ofd | LockKind::Flock => self.holders.get(&l.owner).is_some_and(|h| {
                    h.iter()
                        .any(|&(pid, fd)| pid == tgid && (fd == req.fd || req.fd < 0))
                }),
            };
            if ours {
                changed.push(*l);
                self.holders.remove(&l.owner);
                l.owner = req.owner;
            }
        }
        for old in changed {
            match self.map.remove(&key_of(id.0, id.1, &old)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
            let new = HeldLock {
                owner: req.owner,
                ..old
            };
            self.map
                .insert(key_of(id.0, id.1, &new), record_of(&new), 0)?;
        }
        Ok(())
    }

    /// Adds a lock imported from /proc/locks, with a synthetic owner.
    pub fn insert_reconciled(
        &mut self,
        id: InodeId,
        mut l: HeldLock,
        holders: Holders,
    ) -> Result<()> {
        l.owner = self.next_synthetic_owner;
        l.origin = Origin::Reconciled;
        self.next_synthetic_owner += 1;
        self.holders.insert(l.owner, holders);
        self.inodes.entry(id).or_default().locks.push(l);
        self.write_diff(id, &[], &[l])?;
        self.bump(AgentStat::Reconciled)
    }

    /// Removes one lock (used when /proc/locks shows a reconciled lock is gone).
    pub fn remove(&mut self, id: InodeId, l: &HeldLock) -> Result<()> {
        if let Some(inode) = self.inodes.get_mut(&id) {
            inode.locks.retain(|x| x != l);
            if inode.is_empty() {
                self.inodes.remove(&id);
            }
        }
        self.holders.remove(&l.owner);
        self.write_diff(id, std::slice::from_ref(l), &[])
    }

    pub fn has_reconciled(&self) -> bool {
        self.iter()
            .any(|(_, l)| l.origin == Origin::Reconciled && l.owner <= u32::MAX as u64)
    }

    pub fn iter(&self) -> impl Iterator<Item = (InodeId, &HeldLock)> {
        self.inodes
            .iter()
            .flat_map(|(id, i)| i.locks.iter().map(move |l| (*id, l)))
    }

    /// Forgets everything (before a full resynchronisation).
    pub fn clear(&mut self) -> Result<()> {
        let all: Vec<(InodeId, HeldLock)> = self.iter().map(|(id, l)| (id, *l)).collect();
        for (id, l) in all {
            self.remove(id, &l)?;
        }
        Ok(())
    }
}
