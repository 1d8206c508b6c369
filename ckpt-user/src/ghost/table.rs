//! The agent's table of deleted-but-open files (`DELETED`), for `ckpt-user deleted
//! --max-age` and for the time each file was first seen deleted: rescanned with the
//! deleted_fds / deleted_maps iterators in the background (at most 5% of a CPU), and,
//! with `--exact-deleted`, whenever the programs' trigger generation moved (see
//! ckpt-ebpf/src/deleted.rs); written back as a diff. `HOLDERS` (the processes in
//! it) lets those programs notice their fork, exec, exit and munmap.

use std::collections::{HashMap, HashSet};

use anyhow::Result;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray};
use ckpt_common::deleted::{scan, trigger, DeletedKey, DeletedValue};
use tracing::{debug, warn};

use super::scan::{build, map_path, parse, ScanClock};
use crate::{
    sys::monotonic_ns,
    tracer::iters::{Iters, Prog},
};

/// Removes `k`, already gone or not.
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

pub struct DeletedTable<'a> {
    triggers: PerCpuArray<MapData, u64>,
    map: BpfHashMap<MapData, DeletedKey, DeletedValue>,
    holders: BpfHashMap<MapData, u32, u32>,
    scanned: Array<MapData, u64>,
    iters: &'a Iters,
    /// The triggers are attached: unlink times are exact.
    exact: bool,
    current: HashMap<DeletedKey, DeletedValue>,
    /// The trigger generation of the last scan (None: none yet).
    last_gen: Option<u64>,
    last_scan: std::time::Instant,
    last_took: std::time::Duration,
}

/// Background rescans at most this often, and spaced so that they take at most
/// 1/SCAN_SHARE of a CPU (a scan walks every fd and mapping on the host: ~15 ms at
/// 1,000 processes here); a waiting reader gets one at once.
const MIN_SCAN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);
const SCAN_SHARE: u32 = 20;

/// A rescan at least this often (within the CPU share), triggered or not: without
/// `--exact-deleted` that is the table's age; with it, it finds holders made in ways
/// the programs do not watch (SCM_RIGHTS, pidfd_getfd, reopening /proc/PID/fd/N).
const FULL_SCAN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Sum of the per-CPU generations, latest per-CPU unlink time.
pub fn generation(triggers: &PerCpuArray<MapData, u64>) -> Result<(u64, u64)> {
    let gen = triggers.get(&trigger::GEN, 0)?.iter().sum();
    let unlink = triggers
        .get(&trigger::UNLINK_NS, 0)?
        .iter()
        .copied()
        .max()
        .unwrap_or(0);
    Ok((gen, unlink))
}

impl<'a> DeletedTable<'a> {
    pub fn open(
        triggers: PerCpuArray<MapData, u64>,
        mut map: BpfHashMap<MapData, DeletedKey, DeletedValue>,
        holders: BpfHashMap<MapData, u32, u32>,
        scanned: Array<MapData, u64>,
        iters: &'a Iters,
        exact: bool,
    ) -> Result<DeletedTable<'a>> {
        // A previous agent's table: start from what is true now instead.
        let old: Vec<DeletedKey> = map.keys().filter_map(std::result::Result::ok).collect();
        for k in &old {
            remove_quiet(&mut map, k)?;
        }
        Ok(DeletedTable {
            triggers,
            map,
            holders,
            scanned,
            iters,
            exact,
            current: HashMap::new(),
            last_gen: None,
            last_scan: std::time::Instant::now(),
            last_took: std::time::Duration::ZERO,
        })
    }

    pub fn len(&self) -> usize {
        self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    /// Rescans if anything may have changed since the last scan, and either a reader
    /// waits or the last scan is MIN_SCAN_INTERVAL old; returns whether it did.
    pub fn refresh(&mut self) -> Result<bool> {
        let (gen, unlink_ns) = generation(&self.triggers)?;
        if self.last_gen == Some(gen) && self.last_scan.elapsed() < FULL_SCAN_INTERVAL {
            return Ok(false);
        }
        let wanted = self.scanned.get(&scan::WANTED, 0)?;
        let waited_for = self.last_gen.is_none_or(|g| wanted > g);
        let pace = MIN_SCAN_INTERVAL.max(self.last_took * SCAN_SHARE);
        if !waited_for && self.last_scan.elapsed() < pace {
            return Ok(false);
        }
        self.last_scan = std::time::Instant::now();
        let t0 = self.last_scan;
        let first = self.last_gen.is_none();
        let (fds, maps) = self.iters.read_both(Prog::DeletedFds, Prog::DeletedMaps)?;
        let mut seen = parse(&fds)?;
        seen.extend(parse(&maps)?);
        let clock = ScanClock {
            unlink_ns: if first || !self.exact { 0 } else { unlink_ns },
            now_ns: monotonic_ns(),
        };
        let next = build(&seen, &self.current, &clock, map_path);
        self.write(&next)?;
        self.current = next;
        self.last_gen = Some(gen);
        // Readers wait for this before trusting the table (`ckpt-user deleted`).
        self.scanned.set(scan::DONE, gen, 0)?;
        self.scanned.set(scan::AT_NS, clock.now_ns, 0)?;
        self.last_took = t0.elapsed();
        debug!(
            holders = self.current.len(),
            gen,
            took_us = t0.elapsed().as_micros() as u64,
            "deleted files rescanned"
        );
        Ok(true)
    }

    /// Writes the difference between the table and `next`, then the holder set.
    fn write(&mut self, next: &HashMap<DeletedKey, DeletedValue>) -> Result<()> {
        for k in self.current.keys().filter(|k| !next.contains_key(k)) {
            remove_quiet(&mut self.map, k)?;
        }
        for (k, v) in next {
            if self.current.get(k) != Some(v) {
                if let Err(e) = self.map.insert(k, v, 0) {
                    warn!(error = %e, ino = k.ino, "DELETED map insert failed (map full?)");
                }
            }
        }
        let before: HashSet<u32> = self.current.keys().map(|k| k.pid).collect();
        let after: HashSet<u32> = next.keys().map(|k| k.pid).collect();
        for pid in before.difference(&after) {
            remove_quiet(&mut self.holders, pid)?;
        }
        for pid in after.difference(&before) {
            if let Err(e) = self.holders.insert(pid, 1, 0) {
                warn!(error = %e, pid, "HOLDERS map insert failed (map full?)");
            }
        }
        Ok(())
    }
}
