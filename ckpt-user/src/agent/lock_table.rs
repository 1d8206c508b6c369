//! The lock table: an in-memory index of held locks, mirrored into the pinned `LOCKS`
//! map that readers use. Events are applied through `locks::model`; only the keys an
//! event changed are written, so the map stays consistent lock by lock.

use std::collections::HashMap;

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use ckpt_common::lock::{LockEvent, LockKey, LockKind, LockRecord, Origin};
use tracing::warn;

use crate::locks::{
    model::{Change, HeldLock, List, OwnerLocks, Request},
    record::{held_of, key_of, record_of, request_of},
    KernelDev,
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
    owners: HashMap<OwnerKey, OwnerLocks>,
    /// Imported locks whose kernel owner is not known yet, by inode.
    unadopted: HashMap<InodeId, Vec<OwnerKey>>,
    /// Who may hold each unadopted OFD/flock lock (by synthetic owner).
    holders: HashMap<u64, Holders>,
    next_synthetic_owner: u64,
    /// key -> record to write, or None to delete.
    staged: HashMap<LockKey, Option<LockRecord>>,
    /// Counters not yet added to AGENT_STATS (see `take_counts`).
    pub applied: u64,
    pub reconciled: u64,
}

/// Deletes a key; a key that is not there is fine (added and removed in one batch).
pub fn remove_quiet<K: aya::Pod, V: aya::Pod>(
    map: &mut BpfHashMap<MapData, K, V>,
    k: &K,
) -> Result<()> {
    match map.remove(k) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl LockTable {
    /// Opens the table, loading whatever a previous agent left in the pinned map.
    pub fn open(map: BpfHashMap<MapData, LockKey, LockRecord>) -> Result<LockTable> {
        let mut table = LockTable {
            map,
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

    /// Writes staged changes to LOCKS (call under the flush seqlock). Deletions go
    /// first so that a full map has room for what replaces them. Returns how many
    /// inserts failed (map full).
    pub fn write_staged(&mut self) -> Result<u64> {
        let mut staged: Vec<(LockKey, Option<LockRecord>)> = self.staged.drain().collect();
        staged.sort_by_key(|(_, v)| v.is_some());
        let mut full = 0;
        for (k, v) in staged {
            match v {
                None => remove_quiet(&mut self.map, &k)?,
                Some(r) => {
                    if let Err(e) = self.map.insert(k, r, 0) {
                        full += 1;
                        warn!(error = %e, dev = %KernelDev(k.dev), ino = k.ino, "LOCKS map insert failed (map full?): lock not visible to readers");
                    }
                }
            }
        }
        Ok(full)
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
