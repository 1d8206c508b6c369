//! Reconciliation with /proc/locks, the kernel's own list.
//!
//! At first start (and after lost events) locks that exist in the kernel but were never
//! traced are imported, marked `Origin::Reconciled`: /proc/locks tells kind, type,
//! range, inode and (except for OFD) the creating pid, but not the kernel owner nor
//! when the lock was taken. While such locks remain un-adopted, `verify` compares them
//! with /proc/locks periodically and drops any the kernel no longer has.

use std::collections::{HashMap, HashSet};

use anyhow::Result;
use ckpt_common::lock::{LockKind, Origin};

use super::lock_table::{Holders, InodeId, LockTable};
use crate::locks::{
    model::HeldLock,
    proc_locks::{self, ProcKind, ProcLock},
    KernelDev, LockType,
};

/// A lock's identity as far as /proc/locks can tell.
type Shape = (LockKind, KernelDev, u64, i64, i64, LockType);

fn held_shapes(locks: &[ProcLock]) -> Vec<(Shape, &ProcLock)> {
    locks
        .iter()
        .filter(|p| !p.blocked)
        .filter_map(|p| match (p.kind, p.lock_type) {
            (ProcKind::Lock(k), Some(t)) => Some(((k, p.dev, p.ino, p.start, p.end, t), p)),
            _ => None,
        })
        .collect()
}

fn shape_of(id: InodeId, l: &HeldLock) -> Shape {
    (l.kind, id.0, id.1, l.start, l.end, l.lock_type)
}

/// Imports the locks /proc/locks has and the table lacks. Returns how many.
pub fn import_proc_locks(table: &mut LockTable) -> Result<usize> {
    let procs = proc_locks::read()?;
    let mut have: HashMap<Shape, usize> = HashMap::new();
    for (id, l) in table.iter() {
        *have.entry(shape_of(id, l)).or_default() += 1;
    }
    let missing: Vec<(Shape, ProcLock)> = held_shapes(&procs)
        .into_iter()
        .filter_map(|(shape, p)| match have.get_mut(&shape) {
            Some(n) if *n > 0 => {
                *n -= 1;
                None
            }
            _ => Some((shape, p.clone())),
        })
        .collect();
    if missing.is_empty() {
        return Ok(0);
    }
    let holders = find_holders(&missing);
    for (shape, p) in &missing {
        let (kind, dev, ino, start, end, lock_type) = *shape;
        let h: Holders = holders.get(&(kind, dev, ino)).cloned().unwrap_or_default();
        let pid = if p.pid > 0 {
            p.pid as u32
        } else {
            h.first().map(|x| x.0).unwrap_or(0)
        };
        let fd = h.iter().find(|x| x.0 == pid).map(|x| x.1).unwrap_or(-1);
        let lock = HeldLock {
            kind,
            owner: 0,
            start,
            end,
            lock_type,
            pid,
            fd,
            since_ns: 0,
            origin: Origin::Reconciled,
        };
        table.insert_reconciled((dev, ino), lock, h);
    }
    Ok(missing.len())
}

/// An un-adopted reconciled lock that /proc/locks did not show at the last check.
pub type Suspect = (InodeId, u64, i64, i64);

/// Drops un-adopted reconciled locks that /proc/locks no longer shows. At once when
/// the inode has no lock of that kind left (the holder let go: nothing can be lost,
/// and the inode may soon be reused by a new file); otherwise on the second check in a
/// row only: /proc/locks may already show a change whose event the agent has not
/// applied yet (its owner unlocked part of it a moment ago), and dropping the lock then
/// would lose what remains of it for good.
pub fn verify(table: &mut LockTable, procs: &[ProcLock], suspects: &mut HashSet<Suspect>) {
    let mut kernel: HashMap<Shape, usize> = HashMap::new();
    for (shape, _) in held_shapes(procs) {
        *kernel.entry(shape).or_default() += 1;
    }
    let locked: HashSet<(LockKind, InodeId)> = kernel
        .keys()
        .map(|(kind, dev, ino, ..)| (*kind, (*dev, *ino)))
        .collect();
    // Traced locks are exact: count them first, then let reconciled ones fill what
    // remains of the kernel's count.
    let mut ours: Vec<(InodeId, HeldLock)> = table.iter().map(|(id, l)| (id, *l)).collect();
    ours.sort_by_key(|(_, l)| LockTable::is_unadopted(l));
    let mut stale = Vec::new();
    for (id, l) in ours {
        let n = kernel.entry(shape_of(id, &l)).or_default();
        if *n > 0 {
            *n -= 1;
        } else if LockTable::is_unadopted(&l) {
            stale.push((id, l));
        }
    }
    let before = std::mem::take(suspects);
    for (id, l) in stale {
        let key = (id, l.owner, l.start, l.end);
        if before.contains(&key) || !locked.contains(&(l.kind, id)) {
            table.remove(id, &l);
        } else {
            suspects.insert(key);
        }
    }
}

/// (pid, fd) pairs whose fdinfo shows a lock of the given kind on the given inode.
fn find_holders(wanted: &[(Shape, ProcLock)]) -> HashMap<(LockKind, KernelDev, u64), Holders> {
    use std::os::unix::fs::MetadataExt as _;
    let inodes: std::collections::HashSet<(KernelDev, u64)> =
        wanted.iter().map(|((_, d, i, ..), _)| (*d, *i)).collect();
    let mut out: HashMap<(LockKind, KernelDev, u64), Holders> = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for f in fds.flatten() {
            let Some(fd) = f.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(md) = std::fs::metadata(f.path()) else {
                continue;
            };
            let id = (KernelDev::from_st_dev(md.dev()), md.ino());
            if !inodes.contains(&id) {
                continue;
            }
            let fdinfo = std::fs::read_to_string(p.path().join("fdinfo").join(fd.to_string()))
                .unwrap_or_default();
            for kind in fdinfo_lock_kinds(&fdinfo) {
                out.entry((kind, id.0, id.1)).or_default().push((pid, fd));
            }
        }
    }
    out
}

/// Kinds of the `lock:` lines in a /proc/PID/fdinfo/FD text.
pub fn fdinfo_lock_kinds(fdinfo: &str) -> Vec<LockKind> {
    crate::procinfo::parse_fdinfo(fdinfo)
        .locks
        .into_iter()
        .filter_map(|p| match p.kind {
            ProcKind::Lock(k) => Some(k),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_lock_lines_are_recognised() {
        let fdinfo = "pos:\t0\nflags:\t02\nmnt_id:\t25\nino:\t77\nlock:\t1: FLOCK  ADVISORY  WRITE 5 08:01:77 0 EOF\nlock:\t2: OFDLCK ADVISORY  READ -1 08:01:77 0 9\n";
        assert_eq!(
            fdinfo_lock_kinds(fdinfo),
            vec![LockKind::Flock, LockKind::Ofd]
        );
        assert!(fdinfo_lock_kinds("pos:\t0\n").is_empty());
    }
}
