//! `ckpt-user events`: contention as it happens, one line (or JSON object) per event:
//! a wait began, a wait ended (granted, interrupted by a signal, or its thread exited),
//! a lease break began, a lease being broken ended (released, downgraded or revoked),
//! a deadlock was found.
//!
//! The agent's records are the source (they are what the kernel forgets): its wait
//! starts, its ring of wait ends and its lease breaks, looked at every 100 ms from the
//! pinned maps, so any number of readers can follow at once. A wait's start and end
//! and a break's start are exact (the tracer's clock), even for a wait that began and
//! ended between two looks. Two ends have no event and are stamped when seen, at most
//! 100 ms late: a wait its thread left without one (see `WaitTracker`), and the end of
//! a lease break (read from the kernel's lists for the holder: an iterator aimed at
//! it, cheap).

use std::{
    collections::{BTreeSet, HashMap},
    io::Write,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{bail, Result};
use ckpt_common::lock::{fl_flags, fl_type, LockOwner, WaitStart};
use serde::Serialize;

use crate::{
    lock::{
        graph,
        kernel::{self, KLock},
        view::live_rows,
        HeldKind, LockType,
    },
    tracer::{
        history::{BreakTracker, Ended, History, WaitFollower},
        iters::{unavailable_hint, Iters, Prog},
        pins::PinDir,
    },
};

/// One event, as printed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// "wait_began", "wait_ended", "lease_break_began", "lease_break_ended",
    /// "deadlock".
    pub event: &'static str,
    /// CLOCK_MONOTONIC ns of the event (exact for beginnings; when seen for ends).
    pub monotonic_ns: u64,
    pub pid: u32,
    pub tid: Option<u32>,
    /// "posix", "ofd", "flock", "lease".
    pub kind: Option<HeldKind>,
    #[serde(rename = "type")]
    pub lock_type: Option<LockType>,
    pub start: Option<i64>,
    pub end: Option<i64>,
    pub path: Option<String>,
    /// wait_ended: "granted", "refused", "interrupted", "exited", or "unblocked" (a
    /// lease breaker woken: the lease let go, or a signal). lease_break_ended:
    /// "released", "downgraded", "revoked".
    pub how: Option<&'static str>,
    /// Ends: how long the wait or the break lasted.
    pub after_ms: Option<u64>,
    /// Lease breaks: who broke it.
    pub breakers: Vec<u32>,
    /// Deadlocks: the processes in the cycle, in order.
    pub cycle: Vec<u32>,
}

impl Event {
    fn new(event: &'static str, monotonic_ns: u64, pid: u32) -> Event {
        Event {
            event,
            monotonic_ns,
            pid,
            tid: None,
            kind: None,
            lock_type: None,
            start: None,
            end: None,
            path: None,
            how: None,
            after_ms: None,
            breakers: Vec::new(),
            cycle: Vec::new(),
        }
    }

    /// One line for a person.
    pub fn line(&self) -> String {
        let secs = self.monotonic_ns as f64 / 1e9;
        let what = match (self.kind, self.lock_type, self.start, self.end) {
            (Some(HeldKind::Lease), ..) => {
                format!("lease on {}", self.path.as_deref().unwrap_or("?"))
            }
            (Some(k), t, Some(s), Some(e)) => format!(
                "{k} {} {}{}",
                t.map_or("?", LockType::label),
                crate::lock::range_label(s, e),
                self.path
                    .as_deref()
                    .map(|p| format!(" on {p}"))
                    .unwrap_or_default()
            ),
            _ => String::new(),
        };
        let who = match self.tid {
            Some(t) if t != self.pid => format!("{} (tid {t})", self.pid),
            _ => self.pid.to_string(),
        };
        let after = self
            .after_ms
            .map(|ms| format!(" after {:.3} s", ms as f64 / 1000.0))
            .unwrap_or_default();
        let how = self.how.map(|h| format!(": {h}")).unwrap_or_default();
        match self.event {
            "deadlock" => format!(
                "{secs:.3} deadlock: {}",
                self.cycle
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(" -> ")
            ),
            "lease_break_began" => format!(
                "{secs:.3} lease break began: {what} held by {who}, broken by {:?}",
                self.breakers
            ),
            e => format!(
                "{secs:.3} {}: {who} {what}{how}{after}",
                e.replace('_', " ")
            ),
        }
    }
}

fn wait_event(event: &'static str, at: u64, tid: u32, w: &WaitStart) -> Event {
    Event {
        tid: Some(tid),
        kind: HeldKind::from_fl_flags(w.flags),
        lock_type: LockType::from_fl_type(w.lock_type),
        start: Some(w.start),
        end: Some(w.end),
        ..Event::new(event, at, w.tgid)
    }
}

/// Whether `held` is what request `w` asked for (same owner, covering its range, of
/// its type): the request was granted.
fn grants(held: &KLock, w: &WaitStart) -> bool {
    held.owner == Some(LockOwner(w.owner))
        && w.range().is_some_and(|r| held.range.contains(r))
        && (held.lock_type == w.lock_type || held.lock_type == fl_type::F_WRLCK)
}

/// The file a waiter asks to lock: its own fd on that inode (a waiter's fd holds no
/// lock, so the lock-table walk does not list it). Waits are rare: a look at its fds.
fn path_of(w: &WaitStart) -> Option<String> {
    crate::procinfo::path_of(w.tgid, crate::lock::KernelDev(w.dev), w.ino)
}

/// A lease being broken, as first seen.
struct Pending {
    holder: u32,
    path: Option<String>,
    started_ns: u64,
    deadline_ns: Option<u64>,
}

/// What a reader remembers between two looks.
pub struct Follower {
    waits: WaitFollower,
    breaks: BreakTracker,
    pending: HashMap<u64, Pending>,
    deadlocks: BTreeSet<Vec<u32>>,
    last_graph_ns: u64,
    first: bool,
}

impl Follower {
    pub fn new(pins: &PinDir) -> Result<Follower> {
        Ok(Follower {
            waits: WaitFollower::open(pins)?,
            breaks: BreakTracker::default(),
            pending: HashMap::new(),
            deadlocks: BTreeSet::new(),
            last_graph_ns: 0,
            first: true,
        })
    }

    /// One look: the events since the last one. The first look reports what is
    /// already going on as beginnings (with their true start times).
    pub fn look(&mut self, pins: &PinDir, iters: &Iters, now_ns: u64) -> Result<Vec<Event>> {
        let Some(h) = History::read(pins)? else {
            bail!("ckpt-agent stopped");
        };
        let mut out = Vec::new();
        let look = self.waits.look(&h, now_ns)?;
        if look.lost > 0 {
            eprintln!(
                "ckpt-user: {} wait ends were overwritten before they were read: \
                 those are shown when seen, without how they ended",
                look.lost
            );
        }
        for (tid, w) in &look.began {
            let mut e = wait_event("wait_began", w.since_ns, *tid, w);
            e.path = path_of(w);
            out.push(e);
        }
        for end in &look.ended {
            out.push(ended_event(iters, end));
        }
        let waiting = h.waits.len();

        // Lease breaks: a new record begins one; the lease leaving the holder's
        // lists, or no longer being broken, ends it.
        let fresh = self.breaks.fresh(&h);
        if !fresh.is_empty() {
            let table = kernel::read(iters)?;
            for lease in fresh {
                let r = &h.breaks[&lease];
                let Some(l) = table.held.iter().find(|l| l.addr == Some(lease)) else {
                    continue; // Already over, or an old record.
                };
                if l.flags & (fl_flags::FL_UNLOCK_PENDING | fl_flags::FL_DOWNGRADE_PENDING) == 0 {
                    continue;
                }
                let hz = crate::sys::hz::kernel_hz()?;
                let deadline = crate::lease::BreakState::of(l.flags, l.lease.as_ref(), hz)
                    .primary
                    .map(|d| d.monotonic_ns);
                let p = Pending {
                    holder: l.holder.pid,
                    path: l.holder.path.as_deref().map(String::from),
                    started_ns: r.started_ns,
                    deadline_ns: deadline,
                };
                let mut e = Event::new("lease_break_began", r.started_ns, p.holder);
                e.kind = Some(HeldKind::Lease);
                e.path = p.path.clone();
                e.breakers = r.breakers[..usize::from(r.n_breakers).min(r.breakers.len())]
                    .iter()
                    .map(|b| b.pid)
                    .collect();
                out.push(e);
                self.pending.insert(lease, p);
            }
        }
        let mut done = Vec::new();
        for (lease, p) in &self.pending {
            let now = kernel::read_process(iters, p.holder).ok();
            let l = now
                .as_ref()
                .and_then(|t| t.held.iter().find(|l| l.addr == Some(*lease)));
            let how = match l {
                Some(l)
                    if l.flags & (fl_flags::FL_UNLOCK_PENDING | fl_flags::FL_DOWNGRADE_PENDING)
                        != 0 =>
                {
                    continue
                }
                Some(_) => "downgraded",
                None if p.deadline_ns.is_some_and(|d| now_ns + 100_000_000 >= d) => "revoked",
                None => "released",
            };
            let mut e = Event::new("lease_break_ended", now_ns, p.holder);
            e.kind = Some(HeldKind::Lease);
            e.path = p.path.clone();
            e.how = Some(how);
            e.after_ms = Some(now_ns.saturating_sub(p.started_ns) / 1_000_000);
            out.push(e);
            done.push(*lease);
        }
        for lease in done {
            self.pending.remove(&lease);
        }

        // Deadlocks: looked for when two or more tasks wait, at most once a second.
        if waiting >= 2
            && (self.first || now_ns.saturating_sub(self.last_graph_ns) >= 1_000_000_000)
        {
            self.last_graph_ns = now_ns;
            let (rows, _) = live_rows(pins)?;
            let a = graph::analyse(&rows, graph::threads_of);
            for c in a
                .cycles
                .iter()
                .filter(|c| c.kind == graph::CycleKind::Deadlock)
            {
                let pids: Vec<u32> = c.steps.iter().map(|s| s.pid).collect();
                if self.deadlocks.insert(pids.clone()) {
                    let mut e = Event::new("deadlock", now_ns, pids[0]);
                    e.cycle = pids;
                    out.push(e);
                }
            }
        }
        self.first = false;
        out.sort_by_key(|e| e.monotonic_ns);
        Ok(out)
    }
}

/// A wait's end: how the tracer saw it end, or, for an end seen, what the kernel's
/// lists show now (the lock held: granted; else interrupted) or the thread gone.
fn ended_event(iters: &Iters, end: &Ended) -> Event {
    let w = &end.wait;
    let mut e = wait_event("wait_ended", end.at_ns, end.tid, w);
    e.after_ms = Some(end.at_ns.saturating_sub(w.since_ns) / 1_000_000);
    e.how = Some(match end.how {
        Some(how) => how.as_str(),
        None if !std::path::Path::new(&format!("/proc/{}/task/{}", w.tgid, end.tid)).exists() => {
            "exited"
        }
        None if end.still_listed => "interrupted",
        None => {
            let held = kernel::read_process(iters, w.tgid)
                .map(|t| t.held.iter().any(|l| grants(l, w)))
                .unwrap_or(false);
            if held {
                "granted"
            } else {
                "interrupted"
            }
        }
    });
    e
}

/// Set by SIGINT and SIGTERM: the stream ends with status 0.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Follows until interrupted; `json`: one object per line.
pub fn run(pins: &PinDir, json: bool, out: &mut impl Write) -> Result<()> {
    if !pins.agent_running() {
        bail!(
            "events come from ckpt-agent's records, and no agent runs on {} (start ckpt-agent)",
            pins.root().display()
        );
    }
    let iters = Iters::open(pins, &[Prog::LockTable, Prog::LockTableMaps]).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the kernel's lock lists: {}",
            unavailable_hint(&e)
        )
    })?;
    crate::sys::on_signals(
        &[
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::Signal::SIGTERM,
        ],
        on_stop,
    );
    let mut f = Follower::new(pins)?;
    while !STOP.load(Ordering::Relaxed) {
        let events = match f.look(pins, &iters, crate::sys::monotonic_ns()) {
            Ok(e) => e,
            Err(e) if !pins.agent_running() => return Err(e),
            // One look failed (a process gone mid-read, say): said, and the next goes on.
            Err(e) => {
                eprintln!("ckpt-user: {e:#}");
                Vec::new()
            }
        };
        for e in events {
            if json {
                serde_json::to_writer(&mut *out, &e)?;
                writeln!(out)?;
            } else {
                writeln!(out, "{}", e.line())?;
            }
        }
        out.flush()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::LockRange;

    fn wait(flags: u32, t: u8) -> WaitStart {
        WaitStart {
            since_ns: 5_000_000_000,
            request: 0x10,
            owner: 0x20,
            ino: 7,
            start: 0,
            end: 9,
            dev: 8,
            tgid: 100,
            flags,
            lock_type: t,
            _pad: [0; 3],
        }
    }

    #[test]
    fn a_request_is_granted_by_a_lock_of_its_owner_covering_it() {
        let w = wait(fl_flags::FL_POSIX, fl_type::F_RDLCK);
        let mut l = KLock {
            kind: crate::lock::HeldKind::Lock(ckpt_common::lock::LockKind::Posix),
            lock_type: fl_type::F_WRLCK,
            flags: fl_flags::FL_POSIX,
            pid: 100,
            range: LockRange::new(0, 20).unwrap(),
            dev: crate::lock::KernelDev(8),
            ino: 7,
            owner: Some(ckpt_common::lock::LockOwner(0x20)),
            addr: Some(0x30),
            blocker: None,
            lease: None,
            holder: Default::default(),
        };
        assert!(grants(&l, &w), "a write lock covers a read request");
        l.owner = Some(ckpt_common::lock::LockOwner(0x21));
        assert!(!grants(&l, &w), "another owner's lock");
        l.owner = Some(ckpt_common::lock::LockOwner(0x20));
        l.range = LockRange::new(0, 5).unwrap();
        assert!(!grants(&l, &w), "not the whole range");
    }

    #[test]
    fn lines_say_what_began_and_how_it_ended() {
        let w = wait(fl_flags::FL_FLOCK, fl_type::F_WRLCK);
        let mut e = wait_event("wait_ended", 6_500_000_000, 101, &w);
        e.how = Some("granted");
        e.after_ms = Some(1500);
        e.path = Some("/tmp/a".into());
        assert_eq!(
            e.line(),
            "6.500 wait ended: 100 (tid 101) flock WRITE 0-9 on /tmp/a: granted after 1.500 s"
        );
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["event"], "wait_ended");
        assert_eq!(json["how"], "granted");
        assert_eq!(json["type"], "write");
        let mut d = Event::new("deadlock", 7_000_000_000, 1);
        d.cycle = vec![1, 2, 3];
        assert_eq!(d.line(), "7.000 deadlock: 1 -> 2 -> 3");
    }
}
