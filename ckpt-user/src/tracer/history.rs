//! What the agent's programs recorded that the kernel forgets: when each blocked
//! thread began to wait, each lease break's start, breakers and signal, and (with
//! `ckpt-agent --hold-times`) when locks were taken. Read from the pinned maps; an
//! entry is used only for the kernel object it names, as the kernel's lists show it
//! now, so a stale entry is never shown.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    os::fd::AsFd as _,
};

use anyhow::{Context as _, Result};
use aya::maps::{Map, MapData, PerCpuArray};
use ckpt_common::{
    capacity,
    lease::BreakRecord,
    lock::{wait_end, wait_hist, HoldStart, WaitCarry, WaitEnd, WaitStart},
    names,
};
use serde::Serialize;

use super::pins::PinDir;
use crate::sys::map_batch;

/// The tracer's records at one read.
#[derive(Debug, Default)]
pub struct History {
    /// By the blocked request's address.
    pub waits: HashMap<u64, (u32, WaitStart)>,
    /// By the lease's address.
    pub breaks: HashMap<u64, BreakRecord>,
    /// By the lock's address.
    pub holds: HashMap<u64, HoldStart>,
}

fn open(pins: &PinDir, name: &str) -> Result<MapData> {
    let path = pins.map(name);
    MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
}

impl History {
    /// The wait starts and lease breaks; None when no agent runs on `pins` (its maps
    /// would hold only what happened while one ran). `holds` stays empty: with
    /// `--hold-times` it can hold 262,144 entries, and only the lock table shows them
    /// (`read_with_holds`), not the 100 ms looks of the metrics and events.
    pub fn read(pins: &PinDir) -> Result<Option<History>> {
        if !pins.agent_running() {
            return Ok(None);
        }
        let waits: Vec<(u32, WaitStart)> = map_batch::dump(open(pins, names::WAITS)?.fd().as_fd())?;
        let breaks: Vec<(u64, BreakRecord)> =
            map_batch::dump(open(pins, names::BREAKS)?.fd().as_fd())?;
        Ok(Some(History {
            waits: waits
                .into_iter()
                .map(|(tid, w)| (w.request, (tid, w)))
                .collect(),
            breaks: breaks.into_iter().collect(),
            holds: HashMap::new(),
        }))
    }

    /// `read`, and when each lock was taken (`ckpt-agent --hold-times`).
    pub fn read_with_holds(pins: &PinDir) -> Result<Option<History>> {
        let Some(mut h) = History::read(pins)? else {
            return Ok(None);
        };
        let holds: Vec<(u64, HoldStart)> = map_batch::dump(open(pins, names::HOLDS)?.fd().as_fd())?;
        h.holds = holds.into_iter().collect();
        Ok(Some(h))
    }

    /// The waits going on, by thread.
    pub fn waits_by_thread(&self) -> HashMap<u32, WaitStart> {
        self.waits.values().map(|(tid, w)| (*tid, *w)).collect()
    }
}

/// Hands ckpt-agent's programs the waits a restore carries over, by restored thread
/// (see `WaitCarry`). Fails when no agent runs on `pins`, or one from before carries.
pub fn carry_waits(pins: &PinDir, carries: &[(u32, WaitCarry)]) -> Result<()> {
    if !pins.agent_running() {
        anyhow::bail!("ckpt-agent does not run, so nothing records the restarted waits");
    }
    let mut map: aya::maps::HashMap<MapData, u32, WaitCarry> =
        aya::maps::HashMap::try_from(Map::from_map_data(open(pins, names::WAIT_CARRY)?)?)?;
    for (tid, c) in carries {
        map.insert(tid, c, 0)
            .with_context(|| format!("carrying the wait of thread {tid} over"))?;
    }
    Ok(())
}

/// Follows the tracer's per-CPU ring of wait ends (`WaitEnd`) from where it was
/// opened: earlier ends are not reported. Any number of readers may follow at once.
pub struct WaitEndRing {
    ends: PerCpuArray<MapData, WaitEnd>,
    seqs: PerCpuArray<MapData, u64>,
    /// Per CPU: the next `seq` - 1 to read.
    next: Vec<u64>,
}

impl WaitEndRing {
    pub fn open(pins: &PinDir) -> Result<WaitEndRing> {
        let ends = PerCpuArray::try_from(Map::PerCpuArray(open(pins, names::WAIT_ENDS)?))?;
        let seqs = PerCpuArray::try_from(Map::PerCpuArray(open(pins, names::WAIT_END_SEQ)?))?;
        let next = seqs.get(&0, 0)?.to_vec();
        Ok(WaitEndRing { ends, seqs, next })
    }

    /// The ends recorded since the last read, oldest first, and how many were
    /// overwritten before they could be read (a lap behind).
    pub fn read(&mut self) -> Result<(Vec<WaitEnd>, u64)> {
        let seqs = self.seqs.get(&0, 0)?.to_vec();
        let (wanted, mut lost) = ring_span(&mut self.next, &seqs, u64::from(capacity::WAIT_ENDS));
        let mut out = Vec::new();
        for (slot, want) in wanted {
            // Read twice: a slot being rewritten while copied gives two copies that
            // differ, or a `seq` that is not the one wanted (a lap ahead).
            let a = self.ends.get(&slot, 0)?;
            let b = self.ends.get(&slot, 0)?;
            for (cpu, seq) in want {
                match (a.get(cpu), b.get(cpu)) {
                    (Some(x), Some(y)) if x == y && x.seq == seq => out.push(*x),
                    _ => lost += 1,
                }
            }
        }
        out.sort_by_key(|e| e.ended_ns);
        Ok((out, lost))
    }
}

/// Which slots to read, per CPU, to go from `next` to `seqs` (each CPU's count of
/// ends) in a ring of `cap` slots: slot -> [(cpu, seq)], and how many ends are
/// already overwritten. Moves `next` to `seqs`.
fn ring_span(
    next: &mut Vec<u64>,
    seqs: &[u64],
    cap: u64,
) -> (BTreeMap<u32, Vec<(usize, u64)>>, u64) {
    next.resize(seqs.len(), 0);
    let mut wanted: BTreeMap<u32, Vec<(usize, u64)>> = BTreeMap::new();
    let mut lost = 0;
    for (cpu, (&seq, from)) in seqs.iter().zip(next.iter_mut()).enumerate() {
        // A CPU's count never goes back, unless the maps were made anew.
        let mut i = if seq < *from { 0 } else { *from };
        if seq - i > cap {
            lost += seq - i - cap;
            i = seq - cap;
        }
        for k in i..seq {
            wanted
                .entry((k % cap) as u32)
                .or_default()
                .push((cpu, k + 1));
        }
        *from = seq;
    }
    (wanted, lost)
}

/// How a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndHow {
    Granted,
    Refused,
    Interrupted,
    Exited,
    /// A lease breaker woken for good (the lease went, was downgraded or revoked, or a
    /// signal came: the kernel does not say which).
    Unblocked,
}

impl EndHow {
    pub fn from_tracer(how: u8) -> Option<EndHow> {
        Some(match how {
            wait_end::GRANTED => EndHow::Granted,
            wait_end::REFUSED => EndHow::Refused,
            wait_end::INTERRUPTED => EndHow::Interrupted,
            wait_end::EXITED => EndHow::Exited,
            wait_end::UNBLOCKED => EndHow::Unblocked,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EndHow::Granted => "granted",
            EndHow::Refused => "refused",
            EndHow::Interrupted => "interrupted",
            EndHow::Exited => "exited",
            EndHow::Unblocked => "unblocked",
        }
    }
}

/// A wait that ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Ended {
    pub tid: u32,
    pub wait: WaitStart,
    /// CLOCK_MONOTONIC ns: exact from the tracer's ring, else when it was seen.
    pub at_ns: u64,
    /// From the tracer's ring; None when the end was seen, not told (`exact` false).
    pub how: Option<EndHow>,
    /// The tracer recorded the end (else: seen, up to one look late).
    pub exact: bool,
    /// Seen ended while the tracer still lists it (its thread left the lock call
    /// without an event: an interrupted wait the kernel gives no event for).
    pub still_listed: bool,
}

impl Ended {
    /// Whether the tracer's wait-time histogram has it: every end it recorded but a
    /// lease breaker's (which may have gone on waiting).
    pub fn in_tracer_histogram(&self) -> bool {
        self.exact && self.how != Some(EndHow::Unblocked)
    }
}

/// What one look found.
#[derive(Debug, Default)]
pub struct WaitLook {
    /// Waits that began since the last look (with their true start), including
    /// those already over, oldest first.
    pub began: Vec<(u32, WaitStart)>,
    pub ended: Vec<Ended>,
    /// Ends the ring overwrote before they were read (their waits are reported ended
    /// when seen gone, if they were seen at all).
    pub lost: u64,
}

/// Follows waits between looks, for the metrics' histogram and `ckpt-user events`:
/// the tracer's records of waits going on (`WAITS`) and of waits that ended (the
/// ring), plus the one end the kernel gives no event for, seen when a waiting thread
/// is no longer in a lock call.
#[derive(Default)]
pub struct WaitTracker {
    waits: HashMap<u32, WaitStart>,
    /// Waits reported ended (seen) while their entry stays.
    ended: BTreeSet<(u32, u64)>,
}

impl WaitTracker {
    /// One look. `now_waits`: `WAITS` now, by thread; `ring`: the ends read since
    /// the last look; `left_unrecorded(tid, wait)`: whether the thread has left its lock
    /// call while the tracer still lists `wait` (an end the kernel gives no event for).
    pub fn look(
        &mut self,
        now_waits: HashMap<u32, WaitStart>,
        ring: &[WaitEnd],
        lost: u64,
        now_ns: u64,
        left_unrecorded: impl Fn(u32, &WaitStart) -> bool,
    ) -> WaitLook {
        let mut look = WaitLook {
            lost,
            ..WaitLook::default()
        };
        let mut told: BTreeSet<(u32, u64)> = BTreeSet::new();
        for e in ring {
            let key = (e.tid, e.wait.since_ns);
            let how = EndHow::from_tracer(e.how);
            if how == Some(EndHow::Unblocked)
                && now_waits
                    .get(&e.tid)
                    .is_some_and(|w| w.since_ns == e.wait.since_ns)
            {
                continue; // Blocked again: the same wait goes on.
            }
            told.insert(key);
            if self.ended.remove(&key) {
                continue; // Already reported, when seen.
            }
            let known = self
                .waits
                .get(&e.tid)
                .is_some_and(|w| w.since_ns == e.wait.since_ns);
            if !known && look.began.iter().all(|(t, w)| (*t, w.since_ns) != key) {
                look.began.push((e.tid, e.wait));
            }
            look.ended.push(Ended {
                tid: e.tid,
                wait: e.wait,
                at_ns: e.ended_ns,
                how,
                exact: true,
                still_listed: false,
            });
        }
        // Gone from the tracer's records without a record in the ring (lost).
        for (tid, w) in &self.waits {
            let key = (*tid, w.since_ns);
            let gone = now_waits.get(tid).is_none_or(|n| n.since_ns != w.since_ns);
            if gone && !told.contains(&key) && !self.ended.remove(&key) {
                look.ended.push(seen_end(*tid, w, now_ns, false));
            }
        }
        for (tid, w) in &now_waits {
            let key = (*tid, w.since_ns);
            let known = self
                .waits
                .get(tid)
                .is_some_and(|o| o.since_ns == w.since_ns);
            if !known && !told.contains(&key) {
                look.began.push((*tid, *w));
            }
            if !self.ended.contains(&key) && left_unrecorded(*tid, w) {
                self.ended.insert(key);
                look.ended.push(seen_end(*tid, w, now_ns, true));
            }
        }
        self.ended
            .retain(|(tid, s)| now_waits.get(tid).is_some_and(|w| w.since_ns == *s));
        self.waits = now_waits;
        look.began.sort_by_key(|(_, w)| w.since_ns);
        look.ended.sort_by_key(|e| e.at_ns);
        look
    }
}

/// Follows waits from the agent's records, from when it was opened: the ring of wait
/// ends and the waits going on, through a `WaitTracker`.
pub struct WaitFollower {
    tracker: WaitTracker,
    ring: WaitEndRing,
    /// `WAITS`, looked up again for a thread seen out of its lock call.
    waits: aya::maps::HashMap<MapData, u32, WaitStart>,
}

impl WaitFollower {
    pub fn open(pins: &PinDir) -> Result<WaitFollower> {
        Ok(WaitFollower {
            tracker: WaitTracker::default(),
            ring: WaitEndRing::open(pins)?,
            waits: aya::maps::HashMap::try_from(Map::from_map_data(open(pins, names::WAITS)?)?)?,
        })
    }

    /// What began and ended since the last look (`h`: the records read now).
    pub fn look(&mut self, h: &History, now_ns: u64) -> Result<WaitLook> {
        let (ends, lost) = self.ring.read()?;
        Ok(self
            .tracker
            .look(h.waits_by_thread(), &ends, lost, now_ns, |tid, w| {
                left_unrecorded(&self.waits, tid, w)
            }))
    }
}

/// Out of its lock call, then still in `WAITS`, in that order: a wait granted between
/// the read of `WAITS` a look works on and the look at the thread is gone from `WAITS`
/// by then (its end is recorded before the call returns), and its end comes in the
/// next ring read instead.
fn left_unrecorded(
    waits: &aya::maps::HashMap<MapData, u32, WaitStart>,
    tid: u32,
    w: &WaitStart,
) -> bool {
    ended_unrecorded(
        crate::procinfo::in_lock_call(w.tgid, tid),
        || waits.get(&tid, 0).ok(),
        w,
    )
}

/// [`left_unrecorded`]'s decision: `in_call` was looked at first, `listed_now` reads
/// `WAITS` after it.
fn ended_unrecorded(
    in_call: Option<bool>,
    listed_now: impl FnOnce() -> Option<WaitStart>,
    w: &WaitStart,
) -> bool {
    in_call == Some(false) && listed_now().is_some_and(|now| now.since_ns == w.since_ns)
}

/// Follows the tracer's lease-break records between looks.
#[derive(Default)]
pub struct BreakTracker {
    /// (lease, start) of the records seen: an address reused by a later break is a
    /// new break.
    seen: BTreeSet<(u64, u64)>,
}

impl BreakTracker {
    /// The leases whose break began since the last look (on the first look: every
    /// record), oldest first.
    pub fn fresh(&mut self, h: &History) -> Vec<u64> {
        let now: BTreeSet<(u64, u64)> = h.breaks.iter().map(|(l, r)| (*l, r.started_ns)).collect();
        let mut fresh: Vec<(u64, u64)> = now.difference(&self.seen).copied().collect();
        fresh.sort_by_key(|(_, started)| *started);
        self.seen = now;
        fresh.into_iter().map(|(lease, _)| lease).collect()
    }
}

fn seen_end(tid: u32, w: &WaitStart, now_ns: u64, still_listed: bool) -> Ended {
    Ended {
        tid,
        wait: *w,
        at_ns: now_ns,
        how: None,
        exact: false,
        still_listed,
    }
}

/// The tracer's wait-time histogram, summed over CPUs: (count per bucket, the last
/// +Inf; sum in ns; count).
pub fn tracer_wait_histogram(pins: &PinDir) -> Result<(Vec<u64>, u64, u64)> {
    let m: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(open(pins, names::WAIT_HIST)?))?;
    let total = |slot: u32| -> Result<u64> { Ok(m.get(&slot, 0)?.iter().sum()) };
    let buckets = (0..wait_hist::BUCKETS)
        .map(total)
        .collect::<Result<Vec<_>>>()?;
    Ok((buckets, total(wait_hist::SUM_NS)?, total(wait_hist::COUNT)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_break_is_fresh_once_and_a_reused_address_is_a_new_break() {
        let rec = |started_ns| BreakRecord {
            started_ns,
            ..BreakRecord::default()
        };
        let mut h = History::default();
        h.breaks.insert(0xa0, rec(5));
        let mut t = BreakTracker::default();
        assert_eq!(t.fresh(&h), vec![0xa0]);
        assert!(t.fresh(&h).is_empty());
        h.breaks.insert(0xa0, rec(9));
        h.breaks.insert(0xb0, rec(7));
        assert_eq!(t.fresh(&h), vec![0xb0, 0xa0]);
    }

    #[test]
    fn a_ring_span_reads_each_cpu_from_where_it_was_and_counts_what_a_lap_overwrote() {
        let mut next = vec![0, 5];
        let (w, lost) = ring_span(&mut next, &[2, 7], 4);
        assert_eq!(lost, 0);
        assert_eq!(w[&0], vec![(0, 1)]);
        assert_eq!(w[&1], vec![(0, 2), (1, 6)]);
        assert_eq!(w[&2], vec![(1, 7)]);
        assert_eq!(next, vec![2, 7]);
        let (w, lost) = ring_span(&mut next, &[9, 7], 4);
        assert_eq!(lost, 3, "ends 3, 4 and 5 of CPU 0 are overwritten");
        assert_eq!(w.values().flatten().count(), 4);
        let (w, lost) = ring_span(&mut next, &[9, 7], 4);
        assert!(w.is_empty() && lost == 0);
    }

    fn wait(tgid: u32, since: u64) -> WaitStart {
        WaitStart {
            since_ns: since,
            request: since,
            tgid,
            ..WaitStart::default()
        }
    }

    fn end(tid: u32, w: WaitStart, at: u64, how: u8) -> WaitEnd {
        WaitEnd {
            seq: 1,
            ended_ns: at,
            wait: w,
            tid,
            how,
            _pad: [0; 3],
        }
    }

    #[test]
    fn a_wait_between_two_looks_begins_and_ends_with_its_own_times() {
        let mut t = WaitTracker::default();
        let l = t.look(HashMap::new(), &[], 0, 100, |_, _| false);
        assert!(l.began.is_empty() && l.ended.is_empty());
        let w = wait(7, 110);
        let l = t.look(
            HashMap::new(),
            &[end(8, w, 130, wait_end::GRANTED)],
            0,
            200,
            |_, _| false,
        );
        assert_eq!(l.began, vec![(8, w)]);
        assert_eq!(l.ended.len(), 1);
        assert_eq!(l.ended[0].at_ns, 130);
        assert_eq!(l.ended[0].how, Some(EndHow::Granted));
        assert!(l.ended[0].exact && l.ended[0].in_tracer_histogram());
    }

    #[test]
    fn a_lease_breaker_blocked_again_goes_on_waiting() {
        let mut t = WaitTracker::default();
        let w = wait(7, 110);
        let now = HashMap::from([(8, w)]);
        let l = t.look(now.clone(), &[], 0, 120, |_, _| false);
        assert_eq!(l.began.len(), 1);
        let l = t.look(
            now,
            &[end(8, w, 130, wait_end::UNBLOCKED)],
            0,
            200,
            |_, _| false,
        );
        assert!(l.began.is_empty() && l.ended.is_empty());
        let l = t.look(
            HashMap::new(),
            &[end(8, w, 250, wait_end::UNBLOCKED)],
            0,
            300,
            |_, _| false,
        );
        assert_eq!(l.ended.len(), 1);
        assert!(!l.ended[0].in_tracer_histogram(), "the agent counts it");
    }

    #[test]
    fn an_end_without_an_event_is_seen_once_and_a_lost_one_when_gone() {
        let mut t = WaitTracker::default();
        let w = wait(7, 110);
        t.look(HashMap::from([(8, w)]), &[], 0, 120, |_, _| false);
        // The thread left the call, the entry stays: ended when seen, once.
        let l = t.look(HashMap::from([(8, w)]), &[], 0, 220, |_, _| true);
        assert_eq!(l.ended.len(), 1);
        assert!(!l.ended[0].exact && l.ended[0].still_listed);
        let l = t.look(HashMap::from([(8, w)]), &[], 0, 320, |_, _| true);
        assert!(l.ended.is_empty());
        // Its entry finally goes (the thread exits): not reported twice.
        let l = t.look(
            HashMap::new(),
            &[end(8, w, 400, wait_end::EXITED)],
            0,
            420,
            |_, _| true,
        );
        assert!(l.ended.is_empty());
        // A wait gone with its ring record lost: ended when seen.
        let w2 = wait(7, 500);
        t.look(HashMap::from([(9, w2)]), &[], 0, 510, |_, _| false);
        let l = t.look(HashMap::new(), &[], 1, 610, |_, _| false);
        assert_eq!(l.lost, 1);
        assert_eq!(l.ended.len(), 1);
        assert_eq!((l.ended[0].at_ns, l.ended[0].exact), (610, false));
    }

    #[test]
    fn a_wait_ends_unrecorded_only_if_still_listed_after_its_thread_left_the_call() {
        let w = wait(1, 100);
        // Out of the call and still listed: interrupted without an event.
        assert!(ended_unrecorded(Some(false), || Some(w), &w));
        // Granted between the read of WAITS and the look at the thread: gone by now.
        assert!(!ended_unrecorded(Some(false), || None, &w));
        // A later wait of the same thread is another wait.
        assert!(!ended_unrecorded(Some(false), || Some(wait(1, 200)), &w));
        // In the call, or unknown: WAITS is not even read.
        assert!(!ended_unrecorded(Some(true), || panic!("read"), &w));
        assert!(!ended_unrecorded(None, || panic!("read"), &w));
    }
}
