//! The lock table: an in-memory index of held locks, mirrored into the pinned `LOCKS`
//! map that readers use. Events are applied through `locks::model`; only the keys an
//! event changed are written, so the map stays consistent lock by lock.

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use ckpt_common::lock::{LockEvent, LockKey, LockKind, LockRecord, Origin};
use foldhash::HashMap;
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
    /// OFD and flock owners (open file descriptions) used by several tasks.
    shared: SharedOwners,
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
            owners: HashMap::default(),
            unadopted: HashMap::default(),
            holders: HashMap::default(),
            next_synthetic_owner: 1,
            staged: HashMap::default(),
            shared: SharedOwners::default(),
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

    /// Applies one traced event found at ring position `pos` (in memory; see
    /// [`LockTable::write_staged`]).
    pub fn apply(&mut self, ev: &LockEvent, pos: u64) {
        self.applied += 1;
        let Some(req) = request_of(ev) else {
            return;
        };
        let id = (KernelDev(ev.dev), ev.ino);
        if self.unadopted.contains_key(&id) {
            self.adopt_reconciled(id, &req, ev.tgid);
        }
        let key = (id, List::of(req.kind), req.owner);
        // Skip an event already reflected in a state read back from the kernel.
        // flock events carry the kernel's state (see locks::model); OFD ones do not.
        let tracked = req.kind == LockKind::Ofd
            || (req.kind == LockKind::Posix && self.shared.contains(&key));
        if tracked && !self.shared.observe(key, ev.tgid, ev.fd, pos) {
            return;
        }
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

    pub fn has_staged(&self) -> bool {
        !self.staged.is_empty()
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

    /// Reads back the true lock set of every shared description that had events since
    /// the last call, from /proc/TGID/fdinfo/FD of a task holding it. `producer` is the
    /// ring's producer position read *before*: every event before it is reflected in
    /// what fdinfo shows, so the owner's events still queued before it are skipped.
    /// Returns whether anything was staged.
    pub fn resync_shared(&mut self, producer: u64) -> bool {
        let mut changed = false;
        for (key, (tgid, fd)) in self.shared.take_dirty(producer) {
            let Some(kernel) = read_description_locks(tgid, fd, key) else {
                continue;
            };
            let ((dev, ino), _, owner) = key;
            let before: Vec<HeldLock> = self
                .owners
                .get(&key)
                .map(|o| o.iter().copied().collect())
                .unwrap_or_default();
            let mut after = OwnerLocks::default();
            for mut l in kernel {
                l.owner = owner;
                // Keep what the model knew about an unchanged range (its age, its fd).
                if let Some(b) = before
                    .iter()
                    .find(|b| b.start == l.start && b.end == l.end && b.lock_type == l.lock_type)
                {
                    // The holder's pid is the kernel's: tasks sharing the description
                    // may have re-taken it in an order the ring did not keep.
                    l = HeldLock { pid: l.pid, ..*b };
                }
                after.insert(l);
            }
            let after_v: Vec<HeldLock> = after.iter().copied().collect();
            if before != after_v {
                changed = true;
                self.stage(
                    (dev, ino),
                    &Change {
                        removed: before
                            .iter()
                            .filter(|b| !after_v.contains(b))
                            .copied()
                            .collect(),
                        added: after_v
                            .iter()
                            .filter(|a| !before.contains(a))
                            .copied()
                            .collect(),
                    },
                );
            }
            if after.is_empty() {
                self.owners.remove(&key);
            } else {
                self.owners.insert(key, after);
            }
        }
        changed
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

/// Open file descriptions (OFD and flock owners) that several tasks lock through.
///
/// The filelock tracepoints fire after the kernel released the inode's lock list, so
/// when two tasks change one description's locks at the same moment their events can
/// reach the ring in the opposite order to the kernel's (stress-ng's flock stressor
/// shares one description among four processes). Such owners are read back from
/// fdinfo after every batch that touched them ([`LockTable::resync_shared`]); once the
/// tasks stop, the table is exact again.
#[derive(Default)]
pub struct SharedOwners {
    meta: HashMap<OwnerKey, OwnerMeta>,
}

#[derive(Clone, Copy, Default)]
struct OwnerMeta {
    last_tgid: u32,
    /// A (tgid, fd) known to hold the description.
    holder: Option<(u32, i32)>,
    shared: bool,
    dirty: bool,
    /// Events before this ring position are reflected in the last read-back.
    skip_until: u64,
}

/// Entries kept before forgetting owners (descriptions come and go without events).
const MAX_OWNER_META: usize = 65_536;

impl SharedOwners {
    fn contains(&self, key: &OwnerKey) -> bool {
        self.meta.get(key).is_some_and(|m| m.shared)
    }

    /// Notes an event; returns false if it must be skipped.
    fn observe(&mut self, key: OwnerKey, tgid: u32, fd: i32, pos: u64) -> bool {
        if self.meta.len() >= MAX_OWNER_META && !self.meta.contains_key(&key) {
            self.meta.retain(|_, m| m.shared);
        }
        let m = self.meta.entry(key).or_default();
        if pos < m.skip_until {
            return false;
        }
        if m.last_tgid != 0 && m.last_tgid != tgid {
            m.shared = true;
        }
        m.last_tgid = tgid;
        if fd >= 0 {
            m.holder = Some((tgid, fd));
        }
        m.dirty |= m.shared;
        true
    }

    /// Shared owners touched since the last call, with a holder to read them through.
    fn take_dirty(&mut self, producer: u64) -> Vec<(OwnerKey, (u32, i32))> {
        let mut out = Vec::new();
        for (k, m) in self.meta.iter_mut().filter(|(_, m)| m.dirty) {
            m.dirty = false;
            if let Some(h) = m.holder {
                m.skip_until = producer;
                out.push((*k, h));
            }
        }
        out
    }
}

/// The locks of one description as the kernel has them: the OFD or flock `lock:`
/// lines of /proc/TGID/fdinfo/FD on the owner's inode. None if the fd is gone or now
/// names another file.
fn read_description_locks(tgid: u32, fd: i32, key: OwnerKey) -> Option<Vec<HeldLock>> {
    let ((dev, ino), list, _) = key;
    let info = crate::procinfo::parse_fdinfo(
        &std::fs::read_to_string(format!("/proc/{tgid}/fdinfo/{fd}")).ok()?,
    );
    if info.ino != ino {
        return None;
    }
    let want = match list {
        List::Flock => LockKind::Flock,
        List::Posix => LockKind::Ofd,
    };
    let procs = info.locks;
    Some(
        procs
            .into_iter()
            .filter(|p| !p.blocked && p.dev == dev && p.ino == ino)
            .filter(|p| p.kind == crate::locks::proc_locks::ProcKind::Lock(want))
            .filter_map(|p| {
                Some(HeldLock {
                    kind: want,
                    owner: 0,
                    start: p.start,
                    end: p.end,
                    lock_type: p.lock_type?,
                    pid: if p.pid > 0 { p.pid as u32 } else { tgid },
                    fd,
                    since_ns: crate::view::live::monotonic_ns(),
                    origin: Origin::Traced,
                })
            })
            .collect(),
    )
}
