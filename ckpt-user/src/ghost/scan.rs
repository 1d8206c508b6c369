//! Deleted-but-open files: scanning for them (`scan_now`, with the iterators of
//! ckpt-ebpf/src/deleted_scan.rs) and turning the scan's records into the `DELETED`
//! table (holders by inode), shared by the agent (which keeps it) and `ckpt-user
//! deleted`.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Result};
use ckpt_common::deleted::{
    tag, DeletedKey, DeletedRecord, DeletedValue, DELETED_PATH_MAX, DELETED_RECORD_SIZE,
};

use crate::{
    procinfo::split_deleted,
    tracer::iters::{Iters, Prog},
};

/// A record and, for an fd, its path (" (deleted)" already removed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub rec: DeletedRecord,
    pub path: Option<String>,
}

/// Splits a scan iterator's output into records.
pub fn parse(mut buf: &[u8]) -> Result<Vec<Seen>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < DELETED_RECORD_SIZE {
            bail!("deleted-file scan output truncated");
        }
        // SAFETY: plain data of DELETED_RECORD_SIZE bytes; any bit pattern is valid.
        let rec: DeletedRecord =
            unsafe { std::ptr::read_unaligned(buf.as_ptr() as *const DeletedRecord) };
        let len = rec.path_len as usize;
        let Some(raw) = buf.get(DELETED_RECORD_SIZE..DELETED_RECORD_SIZE + len) else {
            bail!("deleted-file scan output truncated in a path");
        };
        let path = (len > 0).then(|| {
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            split_deleted(&String::from_utf8_lossy(&raw[..end])).0
        });
        out.push(Seen { rec, path });
        buf = &buf[DELETED_RECORD_SIZE + len..];
    }
    Ok(out)
}

/// Stores `path` in a table value (cut at DELETED_PATH_MAX - 1 bytes, NUL-ended).
pub fn set_path(v: &mut DeletedValue, path: &str) {
    let b = path.as_bytes();
    let n = b.len().min(DELETED_PATH_MAX - 1);
    v.path = [0; DELETED_PATH_MAX];
    v.path[..n].copy_from_slice(&b[..n]);
    v.path_cut = u32::from(n < b.len());
}

pub fn path_of(v: &DeletedValue) -> String {
    let end = v.path.iter().position(|&b| b == 0).unwrap_or(v.path.len());
    String::from_utf8_lossy(&v.path[..end]).into_owned()
}

/// When and how a scan ran: what new entries are stamped with.
pub struct ScanClock {
    /// CLOCK_MONOTONIC ns of the latest unlink-like event before the scan (0 when
    /// this is the first scan: files deleted before the agent started).
    pub unlink_ns: u64,
    pub now_ns: u64,
}

/// The table from one scan: every fd holder, and mappings of processes that hold the
/// inode through no fd. Entries of inodes already in `previous` keep their times;
/// mapping paths come from an fd of the same inode or from `map_path`.
pub fn build(
    seen: &[Seen],
    previous: &HashMap<DeletedKey, DeletedValue>,
    clock: &ScanClock,
    map_path: impl Fn(u32, u64, u64) -> Option<String>,
) -> HashMap<DeletedKey, DeletedValue> {
    let mut known: HashMap<(u32, u64), (u64, u64)> = HashMap::new();
    for (k, v) in previous {
        known.insert((k.dev, k.ino), (v.unlinked_ns, v.found_ns));
    }
    let mut paths: HashMap<(u32, u64), &str> = HashMap::new();
    let mut with_fd: HashSet<(u32, u64, u32)> = HashSet::new();
    for s in seen.iter().filter(|s| s.rec.tag == tag::FD) {
        if let Some(p) = &s.path {
            paths.entry((s.rec.s_dev, s.rec.ino)).or_insert(p);
        }
        with_fd.insert((s.rec.s_dev, s.rec.ino, s.rec.tgid));
    }
    let mut out = HashMap::new();
    for s in seen {
        let r = &s.rec;
        let inode = (r.s_dev, r.ino);
        let (key, path) = match r.tag {
            tag::FD => (
                DeletedKey {
                    dev: r.s_dev,
                    kind: tag::FD,
                    ino: r.ino,
                    pid: r.tgid,
                    fd: r.fd,
                    start: 0,
                },
                s.path.clone(),
            ),
            tag::MAP if !with_fd.contains(&(r.s_dev, r.ino, r.tgid)) => (
                DeletedKey {
                    dev: r.s_dev,
                    kind: tag::MAP,
                    ino: r.ino,
                    pid: r.tgid,
                    fd: 0,
                    start: r.start,
                },
                paths
                    .get(&inode)
                    .map(std::string::ToString::to_string)
                    .or_else(|| map_path(r.tgid, r.start, r.end)),
            ),
            _ => continue,
        };
        let (unlinked_ns, found_ns) = known
            .get(&inode)
            .copied()
            .unwrap_or((clock.unlink_ns, clock.now_ns));
        let mut v = DeletedValue {
            size: r.size,
            blocks: r.blocks,
            nlink: r.nlink,
            end: if r.tag == tag::MAP { r.end } else { 0 },
            unlinked_ns,
            found_ns,
            ..Default::default()
        };
        set_path(&mut v, path.as_deref().unwrap_or(""));
        // Threads of one process show the same mapping once each.
        out.insert(key, v);
    }
    out
}

/// The file a mapping shows, from /proc's map_files (" (deleted)" removed).
pub fn map_path(pid: u32, start: u64, end: u64) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/{pid}/map_files/{start:x}-{end:x}")).ok()?;
    Some(split_deleted(&link.display().to_string()).0)
}

/// The deleted-but-open files now: one scan of every fd and mapping (the two walks
/// side by side), as the agent's table would hold them, without times.
pub fn scan_now(iters: &Iters) -> Result<HashMap<DeletedKey, DeletedValue>> {
    let (fds, maps) = iters.read_both(Prog::DeletedFds, Prog::DeletedMaps)?;
    let mut seen = parse(&fds)?;
    seen.extend(parse(&maps)?);
    let clock = ScanClock {
        unlink_ns: 0,
        now_ns: 0,
    };
    Ok(build(&seen, &HashMap::new(), &clock, map_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(tag: u32, pid: u32, fd: u32, ino: u64, start: u64) -> DeletedRecord {
        DeletedRecord {
            tag,
            tgid: pid,
            fd,
            s_dev: 7,
            ino,
            size: 100,
            start,
            end: start + 4096,
            ..Default::default()
        }
    }

    #[test]
    fn holders_by_fd_and_mapping_only() {
        let seen = vec![
            Seen {
                rec: rec(tag::FD, 10, 3, 99, 0),
                path: Some("/d/x".into()),
            },
            // Mapped by the fd holder too: not a mapping-only holder.
            Seen {
                rec: rec(tag::MAP, 10, 0, 99, 0x1000),
                path: None,
            },
            // Mapped by another process without an fd (twice: two threads).
            Seen {
                rec: rec(tag::MAP, 11, 0, 99, 0x2000),
                path: None,
            },
            Seen {
                rec: rec(tag::MAP, 11, 0, 99, 0x2000),
                path: None,
            },
            // Mapping-only inode: path from map_files.
            Seen {
                rec: rec(tag::MAP, 12, 0, 55, 0x3000),
                path: None,
            },
        ];
        let mut previous = HashMap::new();
        let mut old = DeletedValue {
            unlinked_ns: 5,
            found_ns: 6,
            ..Default::default()
        };
        set_path(&mut old, "/d/x");
        previous.insert(
            DeletedKey {
                dev: 7,
                kind: tag::FD,
                ino: 99,
                pid: 10,
                fd: 3,
                start: 0,
            },
            old,
        );
        let clock = ScanClock {
            unlink_ns: 50,
            now_ns: 60,
        };
        let t = build(&seen, &previous, &clock, |pid, start, _| {
            Some(format!("/map/{pid}/{start:x}"))
        });
        assert_eq!(t.len(), 3);
        let by = |kind, pid| t.iter().find(|(k, _)| k.kind == kind && k.pid == pid);
        let (_, v) = by(tag::FD, 10).unwrap();
        assert_eq!(
            (v.unlinked_ns, v.found_ns, path_of(v)),
            (5, 6, "/d/x".into())
        );
        let (k, v) = by(tag::MAP, 11).unwrap();
        assert_eq!(
            (k.start, v.end, path_of(v)),
            (0x2000, 0x3000, "/d/x".into())
        );
        assert_eq!(
            (v.unlinked_ns, v.found_ns),
            (5, 6),
            "same inode: same times"
        );
        let (_, v) = by(tag::MAP, 12).unwrap();
        assert_eq!(path_of(v), "/map/12/3000");
        assert_eq!((v.unlinked_ns, v.found_ns), (50, 60));
    }

    #[test]
    fn records_and_paths_parse() {
        let mut r = rec(tag::FD, 1, 4, 9, 0);
        r.path_len = 16;
        // SAFETY: reading a plain-data struct as bytes.
        let raw =
            unsafe { std::slice::from_raw_parts(&r as *const _ as *const u8, DELETED_RECORD_SIZE) };
        let mut buf = raw.to_vec();
        buf.extend_from_slice(b"/a/b (deleted)\0\0");
        let got = parse(&buf).unwrap();
        assert_eq!(got[0].path.as_deref(), Some("/a/b"));
        assert!(parse(&buf[..buf.len() - 1]).is_err());
        let mut v = DeletedValue::default();
        set_path(&mut v, &"x".repeat(300));
        assert_eq!((path_of(&v).len(), v.path_cut), (DELETED_PATH_MAX - 1, 1));
    }
}
