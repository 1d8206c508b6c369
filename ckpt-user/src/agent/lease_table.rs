//! The lease table: `leases::model::LeaseSet` mirrored into the pinned LEASES map.

use std::collections::{HashMap, HashSet};

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, MapData};
use ckpt_common::lease::{LeaseEvent, LeaseKey, LeaseRecord};
use tracing::warn;

use super::lock_table::remove_quiet;
use crate::{leases::model::LeaseSet, locks::proc_locks::ProcLock};

pub struct LeaseTable {
    map: BpfHashMap<MapData, LeaseKey, LeaseRecord>,
    set: LeaseSet,
    staged: HashSet<LeaseKey>,
}

impl LeaseTable {
    /// Opens the table, loading whatever a previous agent left in the pinned map.
    pub fn open(map: BpfHashMap<MapData, LeaseKey, LeaseRecord>, hz: u32) -> Result<LeaseTable> {
        let saved: HashMap<LeaseKey, LeaseRecord> = map.iter().collect::<Result<_, _>>()?;
        Ok(LeaseTable {
            map,
            set: LeaseSet::new(hz, saved),
            staged: HashSet::new(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.set.leases.is_empty()
    }

    pub fn len(&self) -> usize {
        self.set.leases.len()
    }

    pub fn apply(&mut self, ev: &LeaseEvent) {
        self.staged.extend(self.set.apply(ev));
    }

    /// Agrees with /proc/locks (see `LeaseSet::reconcile`).
    pub fn reconcile(&mut self, procs: &[ProcLock]) {
        self.staged.extend(self.set.reconcile(procs));
    }

    pub fn has_staged(&self) -> bool {
        !self.staged.is_empty()
    }

    /// Writes staged changes to LEASES (call under the flush seqlock). Returns how
    /// many inserts failed (map full).
    pub fn write_staged(&mut self) -> Result<u64> {
        let mut full = 0;
        for k in std::mem::take(&mut self.staged) {
            match self.set.leases.get(&k) {
                None => remove_quiet(&mut self.map, &k)?,
                Some(r) => {
                    if let Err(e) = self.map.insert(k, *r, 0) {
                        full += 1;
                        warn!(error = %e, ino = k.ino, "LEASES map insert failed (map full?)");
                    }
                }
            }
        }
        Ok(full)
    }
}
