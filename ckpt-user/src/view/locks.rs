//! `ckpt-user locks`: the live lock and lease table with waiters, as a table or JSON.
//!
//! Two sources produce the same rows: the agent's maps (exact, with owners, ages,
//! waiting times and lease deadlines) and, when no agent runs, /proc/locks (marked
//! `source: "proc"`).

use std::{collections::BTreeSet, time::Duration};

use anyhow::Result;
use ckpt_common::{
    lease::{LeaseKey, LeaseRecord, LeaseState},
    lock::{fl_flags, fl_type, LockKind, Origin, Waiter},
};
use serde::Serialize;

use super::live::{monotonic_ns, LiveMaps};
use crate::{
    leases::model::{is_synthetic, TYPE_UNKNOWN},
    locks::{
        kind_json, kind_label,
        proc_locks::{self, ProcKind, ProcLock},
        record::held_of,
        KernelDev, LockType, OFFSET_MAX,
    },
    procinfo::{command, Commands, PathResolver},
};

/// What a row describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RowKind {
    Lock(LockKind),
    Lease,
}

/// A task blocked on a lock or lease.
#[derive(Clone, Debug, Serialize)]
pub struct WaiterRow {
    pub pid: u32,
    /// Thread id (agent only).
    pub tid: Option<u32>,
    pub command: Option<String>,
    /// "posix", "ofd", "flock", or "lease" for an open() blocked by a lease break.
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

/// A task breaking a lease.
#[derive(Clone, Debug, Serialize)]
pub struct BreakerRow {
    pub pid: u32,
    pub tid: u32,
    pub command: Option<String>,
    /// "write" (open for writing or truncate) or "read".
    #[serde(rename = "type")]
    pub lock_type: LockType,
    /// Opened with O_NONBLOCK: got EWOULDBLOCK instead of waiting.
    pub nonblock: bool,
    /// CLOCK_MONOTONIC ns when it started breaking the lease.
    pub since_monotonic_ns: u64,
}

/// Lease-only fields of a row.
#[derive(Clone, Debug, Serialize)]
pub struct LeaseInfo {
    /// "active" or "breaking".
    pub state: &'static str,
    /// What the lease becomes when the break completes: "read" or "unlock"; equal to
    /// `type` while active.
    pub target_type: &'static str,
    /// Time left before the kernel revokes or downgrades the lease (breaking only;
    /// negative once the deadline passed and the kernel has not acted yet).
    pub remaining_ms: Option<i64>,
    pub break_deadline_monotonic_ns: Option<u64>,
    /// The kernel's own deadline (fl_break_time / fl_downgrade_time), in jiffies.
    pub break_deadline_jiffies: Option<u64>,
    pub break_started_monotonic_ns: Option<u64>,
    /// /proc/sys/fs/lease-break-time in force when the break started.
    pub lease_break_time_s: Option<u32>,
    /// Whether the holder was sent its break signal.
    pub notified: bool,
    /// That signal (SIGIO unless the holder chose another with F_SETSIG).
    pub signal: Option<i32>,
    pub breakers: Vec<BreakerRow>,
    /// All breakers seen, including any beyond those listed.
    pub breakers_total: u32,
}

/// One held lock or lease.
#[derive(Clone, Debug, Serialize)]
pub struct LockRow {
    pub kind: &'static str,
    /// For a lease being broken: the type it had before the break (null if unknown,
    /// for a lease already breaking when tracing started).
    #[serde(rename = "type")]
    pub lock_type: Option<LockType>,
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
    /// "traced" (seen by the tracer), "reconciled" (existed before tracing started:
    /// age unknown) or "proc" (read from /proc/locks).
    pub origin: &'static str,
    /// How long the lock has been held, when known.
    pub held_ms: Option<u64>,
    pub waiters: Vec<WaiterRow>,
    /// "agent" or "proc".
    pub source: &'static str,
    #[serde(flatten)]
    pub lease: Option<LeaseInfo>,
    #[serde(skip)]
    pub row_kind: RowKind,
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

fn origin_label(origin: u8) -> &'static str {
    if origin == Origin::Reconciled as u8 {
        "reconciled"
    } else {
        "traced"
    }
}

fn target_label(t: u8) -> &'static str {
    match t {
        fl_type::F_RDLCK => "read",
        fl_type::F_WRLCK => "write",
        _ => "unlock",
    }
}

fn age_ms(now: u64, since: u64) -> Option<u64> {
    (since > 0).then(|| now.saturating_sub(since) / 1_000_000)
}

/// Rows from the agent's live maps.
pub fn from_agent(live: &LiveMaps) -> Result<Vec<LockRow>> {
    live.barrier(Duration::from_secs(2))?;
    let snap = live.snapshot()?;
    // Leases vanish at their last close without any tracepoint: keep only those
    // /proc/locks still lists (the agent catches up at its next /proc/locks check:
    // half a second, longer with very many locks). Read only when there are leases:
    // reading it costs O(locks²) in the kernel (5 s of CPU at 100,000 locks).
    let kernel = if snap.leases.is_empty() {
        Vec::new()
    } else {
        proc_locks::read()?
    };
    let now = monotonic_ns();
    let mut paths = PathResolver::default();
    let mut commands = Commands::default();
    let mut rows = Vec::new();
    for (k, r) in snap.locks {
        let Some(l) = held_of(&k, &r) else { continue };
        let dev = KernelDev(k.dev);
        let known_owner = l.owner > u32::MAX as u64;
        rows.push(LockRow {
            kind: kind_json(l.kind),
            lock_type: Some(l.lock_type),
            pid: Some(l.pid),
            command: commands.of(l.pid),
            path: paths.path(l.pid, l.fd, dev, k.ino),
            dev: dev.to_string(),
            inode: k.ino,
            start: l.start,
            end: l.end,
            eof: l.end == OFFSET_MAX,
            owner: known_owner.then(|| format!("{:x}", l.owner)),
            fd: (l.fd >= 0).then_some(l.fd),
            origin: origin_label(l.origin as u8),
            held_ms: age_ms(now, l.since_ns),
            waiters: Vec::new(),
            source: "agent",
            lease: None,
            row_kind: RowKind::Lock(l.kind),
            owner_id: known_owner.then_some(l.owner),
            dev_id: dev,
        });
    }
    let mut listed: Vec<&ProcLock> = kernel
        .iter()
        .filter(|p| p.kind == ProcKind::Lease && !p.blocked && p.state != "BREAKER")
        .collect();
    for (k, r) in snap.leases {
        let Some(i) = listed
            .iter()
            .position(|p| p.dev.0 == k.dev && p.ino == k.ino && p.pid == r.pid as i64)
        else {
            continue;
        };
        listed.remove(i);
        rows.push(lease_row(&k, &r, now, &mut paths));
    }
    let waiters: Vec<Waiter> = live
        .waiters
        .iter()
        .filter_map(|e| e.ok().map(|(_, w)| w))
        .collect();
    for w in waiters {
        attach_waiter(&mut rows, &w, now);
    }
    sort(&mut rows);
    Ok(rows)
}

fn lease_row(k: &LeaseKey, r: &LeaseRecord, now: u64, paths: &mut PathResolver) -> LockRow {
    let dev = KernelDev(k.dev);
    let breaking = r.state == LeaseState::Breaking as u8;
    let deadline = (breaking && r.deadline_ns > 0).then_some(r.deadline_ns);
    let breakers = r.breakers[..r.n_breakers as usize]
        .iter()
        .map(|b| BreakerRow {
            pid: b.pid,
            tid: b.tid,
            command: command(b.pid),
            lock_type: LockType::from_fl_type(b.breaker_type).unwrap_or(LockType::Read),
            nonblock: b.nonblock != 0,
            since_monotonic_ns: b.since_ns,
        })
        .collect();
    let known_owner = !is_synthetic(k.owner);
    LockRow {
        kind: "lease",
        lock_type: if r.lease_type == TYPE_UNKNOWN {
            None
        } else {
            LockType::from_fl_type(r.lease_type)
        },
        pid: Some(r.pid),
        command: command(r.pid),
        path: paths.path(r.pid, r.fd, dev, k.ino),
        dev: dev.to_string(),
        inode: k.ino,
        start: 0,
        end: OFFSET_MAX,
        eof: true,
        owner: known_owner.then(|| format!("{:x}", k.owner)),
        fd: (r.fd >= 0).then_some(r.fd),
        origin: origin_label(r.origin),
        held_ms: age_ms(now, r.granted_ns),
        waiters: Vec::new(),
        source: "agent",
        lease: Some(LeaseInfo {
            state: if breaking { "breaking" } else { "active" },
            target_type: target_label(r.target_type),
            remaining_ms: deadline.map(|d| (d as i64 - now as i64) / 1_000_000),
            break_deadline_monotonic_ns: deadline,
            break_deadline_jiffies: (breaking && r.deadline_jiffies > 0)
                .then_some(r.deadline_jiffies),
            break_started_monotonic_ns: (breaking && r.break_started_ns > 0)
                .then_some(r.break_started_ns),
            lease_break_time_s: (breaking && r.break_started_ns > 0)
                .then_some(r.lease_break_time_s),
            notified: r.notified != 0,
            signal: (r.signal != 0).then_some(r.signal),
            breakers,
            breakers_total: r.breakers_total as u32,
        }),
        row_kind: RowKind::Lease,
        owner_id: known_owner.then_some(k.owner),
        dev_id: dev,
    }
}

/// A waiter waits on every lock (or lease) that conflicts with its request.
fn attach_waiter(rows: &mut [LockRow], w: &Waiter, now: u64) {
    let Some(lock_type) = LockType::from_fl_type(w.lock_type) else {
        return;
    };
    let is_lease = w.flags & fl_flags::FL_LEASE != 0;
    let kind = if is_lease {
        None
    } else {
        match LockKind::from_fl_flags(w.flags) {
            Some(k) => Some(k),
            None => return,
        }
    };
    let row = WaiterRow {
        pid: w.tgid,
        tid: Some(w.tid),
        command: command(w.tgid),
        kind: kind.map(kind_json).unwrap_or("lease"),
        lock_type,
        start: w.start,
        end: w.end,
        waiting_ms: Some(now.saturating_sub(w.since_ns) / 1_000_000),
        since_monotonic_ns: Some(w.since_ns),
    };
    for lock in rows.iter_mut() {
        if lock.dev_id.0 != w.dev || lock.inode != w.ino {
            continue;
        }
        let conflicts = lock.lock_type != Some(LockType::Read) || lock_type == LockType::Write;
        let applies = match (lock.row_kind, kind) {
            (RowKind::Lease, None) => conflicts,
            (RowKind::Lock(lk), Some(k)) => {
                same_family(lk, k)
                    && lock.owner_id != Some(w.owner)
                    && overlaps((lock.start, lock.end), (w.start, w.end))
                    && conflicts
            }
            _ => false,
        };
        if applies {
            lock.waiters.push(row.clone());
        }
    }
}

/// Rows from /proc/locks (no agent). Blocked "->" lines become waiters of the lock
/// with the same id.
pub fn from_proc(procs: &[ProcLock]) -> Vec<LockRow> {
    let mut paths = PathResolver::default();
    let mut rows: Vec<(u64, LockRow)> = Vec::new();
    for p in procs.iter().filter(|p| !p.blocked) {
        let (row_kind, lease) = match p.kind {
            ProcKind::Lock(k) => (RowKind::Lock(k), None),
            ProcKind::Lease if p.state != "BREAKER" => {
                let breaking = p.state == "BREAKING";
                let target = p
                    .lock_type
                    .map(|t| t.to_fl_type())
                    .unwrap_or(fl_type::F_UNLCK);
                (
                    RowKind::Lease,
                    Some(LeaseInfo {
                        state: if breaking { "breaking" } else { "active" },
                        target_type: target_label(target),
                        remaining_ms: None,
                        break_deadline_monotonic_ns: None,
                        break_deadline_jiffies: None,
                        break_started_monotonic_ns: None,
                        lease_break_time_s: None,
                        notified: false,
                        signal: None,
                        breakers: Vec::new(),
                        breakers_total: 0,
                    }),
                )
            }
            _ => continue,
        };
        let breaking = lease.as_ref().is_some_and(|l| l.state == "breaking");
        let pid = (p.pid > 0).then_some(p.pid as u32);
        rows.push((
            p.id,
            LockRow {
                kind: match row_kind {
                    RowKind::Lock(k) => kind_json(k),
                    RowKind::Lease => "lease",
                },
                // /proc shows a breaking lease's target, not its own type.
                lock_type: if breaking { None } else { p.lock_type },
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
                lease,
                row_kind,
                owner_id: None,
                dev_id: p.dev,
            },
        ));
    }
    for p in procs.iter().filter(|p| p.blocked) {
        let Some(lock_type) = p.lock_type else {
            continue;
        };
        let kind = match p.kind {
            ProcKind::Lock(k) => kind_json(k),
            ProcKind::Lease => "lease",
            ProcKind::Other => continue,
        };
        if let Some((_, row)) = rows.iter_mut().find(|(id, _)| *id == p.id) {
            row.waiters.push(WaiterRow {
                pid: p.pid.max(0) as u32,
                tid: None,
                command: (p.pid > 0).then(|| command(p.pid as u32)).flatten(),
                kind,
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
        (a.dev_id, a.inode, a.row_kind, a.start, a.pid)
            .cmp(&(b.dev_id, b.inode, b.row_kind, b.start, b.pid))
    });
}

/// Keeps rows held by, waited on, or broken by the given processes.
pub fn filter(rows: Vec<LockRow>, pids: &PidFilter) -> Vec<LockRow> {
    let Some(pids) = pids else { return rows };
    rows.into_iter()
        .filter(|r| {
            r.pid.is_some_and(|p| pids.contains(&p))
                || r.waiters.iter().any(|w| pids.contains(&w.pid))
                || r.lease
                    .as_ref()
                    .is_some_and(|l| l.breakers.iter().any(|b| pids.contains(&b.pid)))
        })
        .collect()
}

fn fmt_ms(ms: u64) -> String {
    if ms >= 1000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{ms}ms")
    }
}

fn type_label(t: Option<LockType>) -> &'static str {
    t.map(LockType::as_str).unwrap_or("?")
}

/// The STATE column: empty for locks; for leases ACTIVE, or BREAKING with the target,
/// the time left and whether the holder was signalled.
fn state_cell(r: &LockRow) -> String {
    let Some(l) = &r.lease else {
        return String::new();
    };
    if l.state == "active" {
        return "ACTIVE".into();
    }
    let mut s = format!("BREAKING->{}", l.target_type.to_uppercase());
    if let Some(ms) = l.remaining_ms {
        s.push_str(&format!(" {ms}ms left"));
    }
    match (l.notified, l.signal) {
        (true, Some(sig)) => s.push_str(&format!(" notified(sig {sig})")),
        (true, None) => s.push_str(" notified"),
        _ => {}
    }
    if !l.breakers.is_empty() {
        let b: Vec<String> = l.breakers.iter().map(|b| b.pid.to_string()).collect();
        s.push_str(&format!(" breakers {}", b.join(",")));
    }
    s
}

/// The human table (lslocks-like, plus waiters and lease state).
pub fn render_table(rows: &[LockRow]) -> String {
    const N: usize = 10;
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
        "STATE",
    ];
    let mut cells: Vec<[String; N]> = vec![header.map(str::to_string)];
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
            match r.row_kind {
                RowKind::Lock(k) => kind_label(k).to_string(),
                RowKind::Lease => "LEASE".to_string(),
            },
            type_label(r.lock_type).to_string(),
            r.start.to_string(),
            if r.eof {
                "EOF".to_string()
            } else {
                r.end.to_string()
            },
            r.path.clone().unwrap_or_else(|| "?".into()),
            format!("{}:{}", r.dev, r.inode),
            if waiters.is_empty() {
                "-".into()
            } else {
                waiters
            },
            state_cell(r),
        ]);
    }
    let mut widths = [0usize; N];
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
                if i + 1 == N {
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
