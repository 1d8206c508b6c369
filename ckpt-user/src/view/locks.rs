//! `ckpt-user locks`: the live lock table with waiters, as a table or JSON.
//!
//! Two sources produce the same rows: the agent's maps (exact, with owners, ages and
//! waiting times) and, when no agent runs, /proc/locks (marked `source: "proc"`).

use std::{collections::BTreeSet, time::Duration};

use anyhow::Result;
use ckpt_common::lock::{LockKind, Origin};
use serde::Serialize;

use super::live::{monotonic_ns, LiveMaps};
use crate::{
    agent::table::held_of,
    locks::{
        kind_json, kind_label,
        proc_locks::{ProcKind, ProcLock},
        KernelDev, LockType, OFFSET_MAX,
    },
    procinfo::{command, PathResolver},
};

/// A task blocked on a lock.
#[derive(Clone, Debug, Serialize)]
pub struct WaiterRow {
    pub pid: u32,
    /// Thread id (agent only).
    pub tid: Option<u32>,
    pub command: Option<String>,
    pub kind: &'static str,
    #[serde(rename = "type")]
    pub lock_type: LockType,
    pub start: i64,
    pub end: i64,
    /// How long it has been blocked (agent only).
    pub waiting_ms: Option<u64>,
    /// CLOCK_MONOTONIC ns when it blocked (agent only).
    pub since_monotonic_ns: Option<u64>,
}

/// One held lock.
#[derive(Clone, Debug, Serialize)]
pub struct LockRow {
    pub kind: &'static str,
    #[serde(rename = "type")]
    pub lock_type: LockType,
    /// Creator's pid (None for OFD locks read from /proc, which the kernel hides).
    pub pid: Option<u32>,
    pub command: Option<String>,
    pub path: Option<String>,
    /// "major:minor" of the filesystem.
    pub dev: String,
    pub inode: u64,
    pub start: i64,
    /// Last byte; 9223372036854775807 (OFFSET_MAX) means "to end of file".
    pub end: i64,
    pub eof: bool,
    /// Opaque owner identity: equal for locks of one POSIX process or one open file
    /// description (fork-shared descriptions included). None when unknown.
    pub owner: Option<String>,
    /// fd the lock was taken through, if known.
    pub fd: Option<i32>,
    /// "traced" (seen by the tracer), "reconciled" (taken before tracing started:
    /// age unknown) or "proc" (read from /proc/locks).
    pub origin: &'static str,
    /// How long the lock has been held, when known.
    pub held_ms: Option<u64>,
    pub waiters: Vec<WaiterRow>,
    /// "agent" or "proc".
    pub source: &'static str,
    #[serde(skip)]
    kind_id: LockKind,
    #[serde(skip)]
    owner_id: Option<u64>,
    #[serde(skip)]
    dev_id: KernelDev,
}

/// Restricts rows to some processes (from --pid or --cgroup).
pub type PidFilter = Option<BTreeSet<u32>>;

fn overlaps(a: (i64, i64), b: (i64, i64)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// POSIX and OFD locks live in one list and conflict with each other; flock apart.
fn same_family(a: LockKind, b: LockKind) -> bool {
    (a == LockKind::Flock) == (b == LockKind::Flock)
}

/// Rows from the agent's live maps.
pub fn from_agent(live: &LiveMaps) -> Result<Vec<LockRow>> {
    live.barrier(Duration::from_secs(2))?;
    let now = monotonic_ns();
    let mut paths = PathResolver::default();
    let mut rows = Vec::new();
    for (k, r) in live.lock_snapshot()? {
        let Some(l) = held_of(&k, &r) else { continue };
        let dev = KernelDev(k.dev);
        let known_owner = l.owner > u32::MAX as u64;
        rows.push(LockRow {
            kind: kind_json(l.kind),
            lock_type: l.lock_type,
            pid: Some(l.pid),
            command: command(l.pid),
            path: paths.path(l.pid, l.fd, dev, k.ino),
            dev: dev.to_string(),
            inode: k.ino,
            start: l.start,
            end: l.end,
            eof: l.end == OFFSET_MAX,
            owner: known_owner.then(|| format!("{:x}", l.owner)),
            fd: (l.fd >= 0).then_some(l.fd),
            origin: match l.origin {
                Origin::Traced => "traced",
                Origin::Reconciled => "reconciled",
            },
            held_ms: (l.since_ns > 0).then(|| now.saturating_sub(l.since_ns) / 1_000_000),
            waiters: Vec::new(),
            source: "agent",
            kind_id: l.kind,
            owner_id: known_owner.then_some(l.owner),
            dev_id: dev,
        });
    }
    for entry in live.waiters.iter() {
        let (_, w) = entry?;
        let Some(kind) = LockKind::from_fl_flags(w.flags) else {
            continue;
        };
        let Some(lock_type) = LockType::from_fl_type(w.lock_type) else {
            continue;
        };
        let row = WaiterRow {
            pid: w.tgid,
            tid: Some(w.tid),
            command: command(w.tgid),
            kind: kind_json(kind),
            lock_type,
            start: w.start,
            end: w.end,
            waiting_ms: Some(now.saturating_sub(w.since_ns) / 1_000_000),
            since_monotonic_ns: Some(w.since_ns),
        };
        // A waiter waits on every lock that conflicts with its request.
        for lock in rows.iter_mut() {
            if lock.dev_id.0 == w.dev
                && lock.inode == w.ino
                && same_family(lock.kind_id, kind)
                && lock.owner_id != Some(w.owner)
                && overlaps((lock.start, lock.end), (w.start, w.end))
                && (lock.lock_type == LockType::Write || lock_type == LockType::Write)
            {
                lock.waiters.push(row.clone());
            }
        }
    }
    sort(&mut rows);
    Ok(rows)
}

/// Rows from /proc/locks (no agent). Blocked "->" lines become waiters of the lock
/// with the same id.
pub fn from_proc(procs: &[ProcLock]) -> Vec<LockRow> {
    let mut paths = PathResolver::default();
    let mut rows: Vec<(u64, LockRow)> = Vec::new();
    for p in procs.iter().filter(|p| !p.blocked) {
        let (ProcKind::Lock(kind), Some(lock_type)) = (p.kind, p.lock_type) else {
            continue;
        };
        let pid = (p.pid > 0).then_some(p.pid as u32);
        rows.push((
            p.id,
            LockRow {
                kind: kind_json(kind),
                lock_type,
                pid,
                command: pid.and_then(command),
                path: pid.and_then(|pid| paths.path(pid, -1, p.dev, p.ino)),
                dev: p.dev.to_string(),
                inode: p.ino,
                start: p.start,
                end: p.end,
                eof: p.end == OFFSET_MAX,
                owner: None,
                fd: None,
                origin: "proc",
                held_ms: None,
                waiters: Vec::new(),
                source: "proc",
                kind_id: kind,
                owner_id: None,
                dev_id: p.dev,
            },
        ));
    }
    for p in procs.iter().filter(|p| p.blocked) {
        let (ProcKind::Lock(kind), Some(lock_type)) = (p.kind, p.lock_type) else {
            continue;
        };
        if let Some((_, row)) = rows.iter_mut().find(|(id, _)| *id == p.id) {
            row.waiters.push(WaiterRow {
                pid: p.pid.max(0) as u32,
                tid: None,
                command: (p.pid > 0).then(|| command(p.pid as u32)).flatten(),
                kind: kind_json(kind),
                lock_type,
                start: p.start,
                end: p.end,
                waiting_ms: None,
                since_monotonic_ns: None,
            });
        }
    }
    let mut rows: Vec<LockRow> = rows.into_iter().map(|(_, r)| r).collect();
    sort(&mut rows);
    rows
}

fn sort(rows: &mut [LockRow]) {
    rows.sort_by(|a, b| {
        (a.dev_id, a.inode, a.kind_id, a.start, a.pid)
            .cmp(&(b.dev_id, b.inode, b.kind_id, b.start, b.pid))
    });
}

/// Keeps rows held by, or waited on by, the given processes.
pub fn filter(rows: Vec<LockRow>, pids: &PidFilter) -> Vec<LockRow> {
    let Some(pids) = pids else { return rows };
    rows.into_iter()
        .filter(|r| {
            r.pid.is_some_and(|p| pids.contains(&p))
                || r.waiters.iter().any(|w| pids.contains(&w.pid))
        })
        .collect()
}

fn fmt_end(r: &LockRow) -> String {
    if r.eof {
        "EOF".to_string()
    } else {
        r.end.to_string()
    }
}

fn fmt_ms(ms: u64) -> String {
    if ms >= 1000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{ms}ms")
    }
}

/// The human table (lslocks-like, plus waiters).
pub fn render_table(rows: &[LockRow]) -> String {
    let header = [
        "COMMAND",
        "PID",
        "KIND",
        "TYPE",
        "START",
        "END",
        "PATH",
        "DEV:INODE",
        "WAITERS",
    ];
    let mut cells: Vec<[String; 9]> = vec![header.map(str::to_string)];
    for r in rows {
        let waiters = r
            .waiters
            .iter()
            .map(|w| match w.waiting_ms {
                Some(ms) => format!("{}({})", w.pid, fmt_ms(ms)),
                None => w.pid.to_string(),
            })
            .collect::<Vec<_>>()
            .join(",");
        cells.push([
            r.command.clone().unwrap_or_else(|| "?".into()),
            r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            kind_label(r.kind_id).to_string(),
            r.lock_type.as_str().to_string(),
            r.start.to_string(),
            fmt_end(r),
            r.path.clone().unwrap_or_else(|| "?".into()),
            format!("{}:{}", r.dev, r.inode),
            if waiters.is_empty() {
                "-".into()
            } else {
                waiters
            },
        ]);
    }
    let mut widths = [0usize; 9];
    for row in &cells {
        for (i, c) in row.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    for row in &cells {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == row.len() {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(line.join(" ").trim_end());
        out.push('\n');
    }
    out
}
