//! `ckpt-user graph`: the wait-for graph of the lock table (a waiting task -> the held
//! locks its request conflicts with -> the processes that hold them), across POSIX,
//! OFD and flock locks and lease breaks, with its cycles and whether each is a
//! deadlock.
//!
//! The kernel finds only POSIX-on-POSIX deadlocks (EDEADLK). Here a process is stuck
//! for good when every one of its threads waits and each of those requests conflicts
//! with a lock whose holders are all stuck for good: the greatest such set, found by
//! removing from "every fully blocked process" whoever could still go on. An OFD or
//! flock lock (or lease) belongs to an open file description that several processes
//! may share: it is released only if one of them acts, so it keeps its waiters stuck
//! only when all of them are. A lease break ends by itself when its time runs out:
//! a cycle through one is a stall, ending at that deadline, never a deadlock.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{view::LockRow, HeldKind, LockType};

/// One blocked request: a task, and the rows (held locks) it conflicts with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wait {
    pub pid: u32,
    pub tid: Option<u32>,
    /// Indices into the rows.
    pub blocked_by: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CycleKind {
    /// Nothing in it ends by itself.
    Deadlock,
    /// It goes through a lease break, which the kernel ends at its deadline.
    Stall,
}

/// One step of a cycle: `pid` waits on row `row`, held by `next` (the next step's pid).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub pid: u32,
    pub row: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cycle {
    pub kind: CycleKind,
    pub steps: Vec<Step>,
    /// For a stall: the time left before the first lease break in it ends.
    pub ends_in_ms: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Analysis {
    pub waits: Vec<Wait>,
    /// Processes stuck for good.
    pub deadlocked: BTreeSet<u32>,
    /// Processes stuck until a lease break ends.
    pub stalled: BTreeSet<u32>,
    pub cycles: Vec<Cycle>,
}

/// Most cycles listed (their number can grow exponentially with the graph).
const MAX_CYCLES: usize = 64;

fn is_lease(r: &LockRow) -> bool {
    r.lease.is_some()
}

/// The blocked requests in `rows`: a waiter listed under several rows is one request.
pub fn waits(rows: &[LockRow]) -> Vec<Wait> {
    type Request = (u32, Option<u32>, HeldKind, i64, i64, LockType);
    let mut by_request: BTreeMap<Request, Wait> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        for w in &r.waiters {
            let key = (w.pid, w.tid, w.kind, w.start, w.end, w.lock_type);
            by_request
                .entry(key)
                .or_insert_with(|| Wait {
                    pid: w.pid,
                    tid: w.tid,
                    blocked_by: Vec::new(),
                })
                .blocked_by
                .push(i);
        }
    }
    by_request.into_values().collect()
}

/// The greatest set of fully blocked processes each of whose requests conflicts with
/// a lock all of whose holders are in the set (leases count only with `leases_stick`).
fn stuck(
    rows: &[LockRow],
    waits: &[Wait],
    blocked: &BTreeSet<u32>,
    leases_stick: bool,
) -> BTreeSet<u32> {
    let mut set = blocked.clone();
    loop {
        let keeps = |r: &LockRow, set: &BTreeSet<u32>| {
            (leases_stick || !is_lease(r))
                && !r.holders.is_empty()
                && r.holders.iter().all(|h| set.contains(h))
        };
        let gone: Vec<u32> = set
            .iter()
            .copied()
            .filter(|&p| {
                !waits
                    .iter()
                    .filter(|w| w.pid == p)
                    .all(|w| w.blocked_by.iter().any(|&i| keeps(&rows[i], &set)))
            })
            .collect();
        if gone.is_empty() {
            return set;
        }
        for p in gone {
            set.remove(&p);
        }
    }
}

/// Analyses `rows`; `threads(pid)` is how many threads a process has (None: gone or
/// unknown, taken as one).
pub fn analyse(rows: &[LockRow], threads: impl Fn(u32) -> Option<u32>) -> Analysis {
    let waits = waits(rows);
    let mut waiting: BTreeMap<u32, u32> = BTreeMap::new();
    for w in &waits {
        *waiting.entry(w.pid).or_default() += 1;
    }
    let blocked: BTreeSet<u32> = waiting
        .iter()
        .filter(|&(&p, &n)| n >= threads(p).unwrap_or(1))
        .map(|(&p, _)| p)
        .collect();
    let deadlocked = stuck(rows, &waits, &blocked, false);
    let with_leases = stuck(rows, &waits, &blocked, true);
    let stalled: BTreeSet<u32> = with_leases.difference(&deadlocked).copied().collect();
    let cycles = cycles(rows, &waits, &with_leases, &deadlocked);
    Analysis {
        waits,
        deadlocked,
        stalled,
        cycles,
    }
}

/// Simple cycles among the stuck processes, each once (from its smallest pid), over
/// edges p -> q where p waits on a row whose holders are all stuck and include q.
fn cycles(
    rows: &[LockRow],
    waits: &[Wait],
    stuck: &BTreeSet<u32>,
    deadlocked: &BTreeSet<u32>,
) -> Vec<Cycle> {
    // pid -> [(row, holder)], in a stable order.
    let mut edges: BTreeMap<u32, Vec<(usize, u32)>> = BTreeMap::new();
    for w in waits.iter().filter(|w| stuck.contains(&w.pid)) {
        for &i in &w.blocked_by {
            let r = &rows[i];
            if r.holders.is_empty() || !r.holders.iter().all(|h| stuck.contains(h)) {
                continue;
            }
            for &h in &r.holders {
                let e = edges.entry(w.pid).or_default();
                if !e.contains(&(i, h)) {
                    e.push((i, h));
                }
            }
        }
    }
    let mut out = Vec::new();
    for &start in stuck {
        let mut path: Vec<Step> = Vec::new();
        walk(start, start, &edges, &mut path, &mut out);
        if out.len() >= MAX_CYCLES {
            break;
        }
    }
    for c in &mut out {
        let leases: Vec<&LockRow> = c
            .steps
            .iter()
            .map(|s| &rows[s.row])
            .filter(|r| is_lease(r))
            .collect();
        if leases.is_empty() && c.steps.iter().all(|s| deadlocked.contains(&s.pid)) {
            c.kind = CycleKind::Deadlock;
        } else {
            c.kind = CycleKind::Stall;
            c.ends_in_ms = leases
                .iter()
                .filter_map(|r| r.lease.as_ref()?.remaining_ms)
                .min();
        }
    }
    out
}

fn walk(
    start: u32,
    at: u32,
    edges: &BTreeMap<u32, Vec<(usize, u32)>>,
    path: &mut Vec<Step>,
    out: &mut Vec<Cycle>,
) {
    for &(row, next) in edges.get(&at).map(Vec::as_slice).unwrap_or(&[]) {
        if out.len() >= MAX_CYCLES {
            return;
        }
        path.push(Step { pid: at, row });
        if next == start {
            out.push(Cycle {
                kind: CycleKind::Deadlock,
                steps: path.clone(),
                ends_in_ms: None,
            });
        } else if next > start && !path.iter().any(|s| s.pid == next) {
            walk(start, next, edges, path, out);
        }
        path.pop();
    }
}

/// Keeps what concerns the processes in `pids`: cycles through one of them, and
/// requests of theirs or on locks they hold.
pub fn select(a: &mut Analysis, rows: &[LockRow], pids: &BTreeSet<u32>) {
    a.cycles
        .retain(|c| c.steps.iter().any(|s| pids.contains(&s.pid)));
    a.waits.retain(|w| {
        pids.contains(&w.pid)
            || w.blocked_by
                .iter()
                .any(|&i| rows[i].holders.iter().any(|h| pids.contains(h)))
    });
    let shown: BTreeSet<u32> = a
        .cycles
        .iter()
        .flat_map(|c| c.steps.iter().map(|s| s.pid))
        .chain(pids.iter().copied())
        .collect();
    a.deadlocked.retain(|p| shown.contains(p));
    a.stalled.retain(|p| shown.contains(p));
}

/// Whether a deadlock is among the cycles.
pub fn has_deadlock(a: &Analysis) -> bool {
    a.cycles.iter().any(|c| c.kind == CycleKind::Deadlock)
}

/// Marks the rows that are steps of a deadlock.
pub fn mark(rows: &mut [LockRow], a: &Analysis) {
    for c in a.cycles.iter().filter(|c| c.kind == CycleKind::Deadlock) {
        for s in &c.steps {
            rows[s.row].deadlock = true;
        }
    }
}

/// Threads of a process, from /proc/PID/status (None if it is gone).
pub fn threads_of(pid: u32) -> Option<u32> {
    let status = procfs::process::Process::new(pid as i32)
        .ok()?
        .status()
        .ok()?;
    u32::try_from(status.threads).ok()
}

fn describe(r: &LockRow) -> String {
    let what = match &r.lease {
        Some(_) => "lease break".to_string(),
        None => format!(
            "{} {} {}",
            r.kind,
            r.lock_type.map_or("?", |t| t.label()),
            super::range_label(r.start, r.end)
        ),
    };
    format!("{what} on {}", r.path.as_deref().unwrap_or("?"))
}

fn who(pid: u32, rows: &[LockRow]) -> String {
    let command = rows
        .iter()
        .find(|r| r.pid == Some(pid))
        .and_then(|r| r.command.clone())
        .or_else(|| {
            rows.iter()
                .flat_map(|r| &r.waiters)
                .find(|w| w.pid == pid)
                .and_then(|w| w.command.clone())
        });
    match command {
        Some(c) => format!("{pid} ({c})"),
        None => pid.to_string(),
    }
}

/// One line per cycle, or a line saying there is none.
pub fn render_text(rows: &[LockRow], a: &Analysis) -> String {
    let mut out = String::new();
    for c in &a.cycles {
        let head = match (c.kind, c.ends_in_ms) {
            (CycleKind::Deadlock, _) => "deadlock:".to_string(),
            (CycleKind::Stall, Some(ms)) => format!(
                "stall, ends in {:.1} s when a lease break times out:",
                ms as f64 / 1000.0
            ),
            (CycleKind::Stall, None) => "stall, ends when a lease break times out:".into(),
        };
        let chain: Vec<String> = c
            .steps
            .iter()
            .map(|s| format!("{} waits for {}", who(s.pid, rows), describe(&rows[s.row])))
            .collect();
        let first = c.steps.first().map_or(0, |s| s.pid);
        out.push_str(&format!(
            "{head} {} held by {}\n",
            chain.join(" held by "),
            who(first, rows)
        ));
    }
    if a.cycles.is_empty() {
        out.push_str(&format!(
            "no deadlock ({} blocked requests)\n",
            a.waits.len()
        ));
    }
    out
}

#[derive(Serialize)]
struct JsonEdge {
    pid: u32,
    tid: Option<u32>,
    /// Index into `locks`.
    lock: usize,
}

#[derive(Serialize)]
struct JsonLock<'a> {
    kind: HeldKind,
    #[serde(rename = "type")]
    lock_type: Option<LockType>,
    path: Option<&'a str>,
    start: i64,
    end: i64,
    holders: &'a [u32],
    breaking: bool,
    remaining_ms: Option<i64>,
}

#[derive(Serialize)]
struct JsonStep {
    pid: u32,
    lock: usize,
}

#[derive(Serialize)]
struct JsonCycle {
    kind: CycleKind,
    ends_in_ms: Option<i64>,
    steps: Vec<JsonStep>,
}

#[derive(Serialize)]
pub struct JsonGraph<'a> {
    deadlock: bool,
    deadlocked: &'a BTreeSet<u32>,
    stalled: &'a BTreeSet<u32>,
    /// The held locks that some request waits on.
    locks: Vec<JsonLock<'a>>,
    /// task -> lock: each blocked request and the locks it conflicts with.
    waits: Vec<JsonEdge>,
    cycles: Vec<JsonCycle>,
}

/// The graph as JSON: locks waited on (renumbered), wait edges, cycles.
pub fn to_json<'a>(rows: &'a [LockRow], a: &'a Analysis) -> JsonGraph<'a> {
    // Every row a wait or a cycle step names (a selection may keep a cycle whose other
    // waits it drops).
    let mut index: BTreeMap<usize, usize> = BTreeMap::new();
    let named = a
        .waits
        .iter()
        .flat_map(|w| w.blocked_by.iter().copied())
        .chain(a.cycles.iter().flat_map(|c| c.steps.iter().map(|s| s.row)));
    for i in named {
        let n = index.len();
        index.entry(i).or_insert(n);
    }
    let mut locks: Vec<(usize, JsonLock)> = index
        .iter()
        .map(|(&i, &n)| {
            let r = &rows[i];
            (
                n,
                JsonLock {
                    kind: r.kind,
                    lock_type: r.lock_type,
                    path: r.path.as_deref(),
                    start: r.start,
                    end: r.end,
                    holders: &r.holders,
                    breaking: r.lease.as_ref().is_some_and(|l| l.state == "breaking"),
                    remaining_ms: r.lease.as_ref().and_then(|l| l.remaining_ms),
                },
            )
        })
        .collect();
    locks.sort_by_key(|(n, _)| *n);
    JsonGraph {
        deadlock: has_deadlock(a),
        deadlocked: &a.deadlocked,
        stalled: &a.stalled,
        locks: locks.into_iter().map(|(_, l)| l).collect(),
        waits: a
            .waits
            .iter()
            .flat_map(|w| {
                w.blocked_by.iter().map(|i| JsonEdge {
                    pid: w.pid,
                    tid: w.tid,
                    lock: index[i],
                })
            })
            .collect(),
        cycles: a
            .cycles
            .iter()
            .map(|c| JsonCycle {
                kind: c.kind,
                ends_in_ms: c.ends_in_ms,
                steps: c
                    .steps
                    .iter()
                    .map(|s| JsonStep {
                        pid: s.pid,
                        lock: index[&s.row],
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Graphviz: processes as boxes, locks as ellipses; waits (task -> lock) and holds
/// (lock -> process); deadlock edges red, stall edges orange.
pub fn render_dot(rows: &[LockRow], a: &Analysis) -> String {
    let mut colour: BTreeMap<(u32, usize), &str> = BTreeMap::new();
    for c in &a.cycles {
        for s in &c.steps {
            let col = match c.kind {
                CycleKind::Deadlock => "red",
                CycleKind::Stall => "orange",
            };
            colour.insert((s.pid, s.row), col);
        }
    }
    // (waiting pid, row) -> tid: the waits, and the steps of the cycles kept.
    let mut edges: BTreeMap<(u32, usize), Option<u32>> = BTreeMap::new();
    for w in &a.waits {
        for &i in &w.blocked_by {
            edges.insert((w.pid, i), w.tid);
        }
    }
    for c in &a.cycles {
        for s in &c.steps {
            edges.entry((s.pid, s.row)).or_insert(None);
        }
    }
    let mut out = String::from("digraph waits {\n  rankdir=LR;\n");
    let mut pids = BTreeSet::new();
    let mut locks = BTreeSet::new();
    for &(p, i) in edges.keys() {
        pids.insert(p);
        locks.insert(i);
        pids.extend(rows[i].holders.iter().copied());
    }
    for p in &pids {
        let style = if a.deadlocked.contains(p) {
            ", color=red"
        } else if a.stalled.contains(p) {
            ", color=orange"
        } else {
            ""
        };
        out.push_str(&format!(
            "  p{p} [shape=box, label=\"{}\"{style}];\n",
            dot_escape(&who(*p, rows))
        ));
    }
    for &i in &locks {
        out.push_str(&format!(
            "  l{i} [label=\"{}\"];\n",
            dot_escape(&describe(&rows[i]))
        ));
        for h in &rows[i].holders {
            out.push_str(&format!("  l{i} -> p{h} [label=\"held by\"];\n"));
        }
    }
    for (&(p, i), tid) in &edges {
        let col = colour
            .get(&(p, i))
            .map(|c| format!(", color={c}"))
            .unwrap_or_default();
        let tid = tid.map(|t| format!(" (tid {t})")).unwrap_or_default();
        out.push_str(&format!("  p{p} -> l{i} [label=\"waits{tid}\"{col}];\n"));
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::{
        view::{test_lease, test_row, WaiterRow},
        LockKind,
    };

    fn waiter(pid: u32) -> WaiterRow {
        WaiterRow {
            pid,
            tid: Some(pid),
            command: None,
            kind: HeldKind::Lock(LockKind::Posix),
            lock_type: LockType::Write,
            start: 0,
            end: 0,
            waiting_ms: Some(1),
            since_monotonic_ns: None,
        }
    }

    /// A lock held by `holders`, waited on by `waiters`.
    fn held(kind: HeldKind, holders: &[u32], waiters: &[u32]) -> LockRow {
        let mut r = test_row(kind, holders[0]);
        r.holders = holders.into();
        r.waiters = waiters.iter().map(|&p| waiter(p)).collect();
        r
    }

    const POSIX: HeldKind = HeldKind::Lock(LockKind::Posix);
    const FLOCK: HeldKind = HeldKind::Lock(LockKind::Flock);

    fn one_thread(_: u32) -> Option<u32> {
        Some(1)
    }

    #[test]
    fn a_three_process_cycle_across_flock_and_posix_is_a_deadlock() {
        // 1 waits on 2's flock, 2 on 3's POSIX lock, 3 on 1's POSIX lock.
        let mut rows = vec![
            held(FLOCK, &[2], &[1]),
            held(POSIX, &[3], &[2]),
            held(POSIX, &[1], &[3]),
        ];
        let a = analyse(&rows, one_thread);
        assert_eq!(a.deadlocked, BTreeSet::from([1, 2, 3]));
        assert_eq!(a.cycles.len(), 1);
        assert_eq!(a.cycles[0].kind, CycleKind::Deadlock);
        let pids: Vec<u32> = a.cycles[0].steps.iter().map(|s| s.pid).collect();
        assert_eq!(pids, vec![1, 2, 3]);
        mark(&mut rows, &a);
        assert!(rows.iter().all(|r| r.deadlock));
        assert!(render_text(&rows, &a).starts_with("deadlock: 1 waits for flock"));
    }

    #[test]
    fn a_selection_keeps_whole_cycles() {
        let rows = vec![
            held(FLOCK, &[2], &[1]),
            held(POSIX, &[3], &[2]),
            held(POSIX, &[1], &[3]),
            held(POSIX, &[9], &[8]),
        ];
        let mut a = analyse(&rows, one_thread);
        select(&mut a, &rows, &BTreeSet::from([1]));
        assert_eq!(a.cycles.len(), 1);
        let json = serde_json::to_value(to_json(&rows, &a)).unwrap();
        assert_eq!(json["cycles"][0]["steps"].as_array().unwrap().len(), 3);
        assert_eq!(json["deadlocked"], serde_json::json!([1, 2, 3]));
        assert!(render_dot(&rows, &a).contains("color=red"));
    }

    #[test]
    fn a_chain_without_a_cycle_is_not_one() {
        // 1 waits on 2, 2 waits on 3, 3 runs.
        let rows = vec![held(POSIX, &[2], &[1]), held(POSIX, &[3], &[2])];
        let a = analyse(&rows, one_thread);
        assert!(a.deadlocked.is_empty() && a.cycles.is_empty());
        assert!(render_text(&rows, &a).starts_with("no deadlock (2 blocked"));
    }

    #[test]
    fn a_shared_description_held_by_a_running_process_breaks_the_cycle() {
        // 2's flock description is shared with 4, which runs: 4 can release it.
        let rows = vec![held(FLOCK, &[2, 4], &[1]), held(POSIX, &[1], &[2])];
        let a = analyse(&rows, one_thread);
        assert!(a.deadlocked.is_empty(), "{a:?}");
        assert!(a.cycles.is_empty());
        // Once 4 waits on 1 too, it is one.
        let rows = vec![held(FLOCK, &[2, 4], &[1]), held(POSIX, &[1], &[2, 4])];
        assert_eq!(
            analyse(&rows, one_thread).deadlocked,
            BTreeSet::from([1, 2, 4])
        );
    }

    #[test]
    fn a_process_with_a_running_thread_is_not_stuck() {
        let rows = vec![held(POSIX, &[2], &[1]), held(POSIX, &[1], &[2])];
        let a = analyse(&rows, |p| Some(if p == 1 { 2 } else { 1 }));
        assert!(a.deadlocked.is_empty());
        assert!(a.cycles.is_empty());
    }

    #[test]
    fn a_cycle_through_a_lease_break_is_a_stall_with_its_end() {
        // 1 holds a lease that 2 breaks (2 waits in open), and 1 waits on 2's lock.
        let mut lease = held(HeldKind::Lease, &[1], &[2]);
        lease.lease = Some(Box::new(test_lease(4200)));
        let rows = vec![lease, held(POSIX, &[2], &[1])];
        let a = analyse(&rows, one_thread);
        assert!(a.deadlocked.is_empty());
        assert_eq!(a.stalled, BTreeSet::from([1, 2]));
        assert_eq!(a.cycles.len(), 1);
        assert_eq!(a.cycles[0].kind, CycleKind::Stall);
        assert_eq!(a.cycles[0].ends_in_ms, Some(4200));
        assert!(render_text(&rows, &a).starts_with("stall, ends in 4.2 s"));
        let dot = render_dot(&rows, &a);
        assert!(dot.starts_with("digraph") && dot.contains("color=orange"));
        let json = serde_json::to_value(to_json(&rows, &a)).unwrap();
        assert_eq!(json["deadlock"], false);
        assert_eq!(json["cycles"][0]["kind"], "stall");
    }

    #[test]
    fn a_process_blocked_on_its_own_other_description_deadlocks_alone() {
        // flock on fd 1 then on another description of the same file: waits on itself.
        let rows = vec![held(FLOCK, &[1], &[1])];
        let a = analyse(&rows, one_thread);
        assert_eq!(a.cycles.len(), 1);
        assert_eq!(a.cycles[0].kind, CycleKind::Deadlock);
    }
}
