//! The deadline the kernel gave a break the restore just made, read back through
//! ckpt-agent's maps.
//!
//! Timing the breaking syscall from outside places the break somewhere between the
//! clock readings around it: exact when the call is quick, off by up to the whole call
//! when the restore is preempted inside it (a loaded host, a stalled VM: 805 ms once,
//! under TCG). The tracer reads jiffies and the clock together, in the kernel, after
//! the kernel set the deadline, so its answer does not depend on how long the call took.
//! It also shows a break that somebody else had started first (the kernel keeps the
//! first breaker's deadline).
//!
//! The break's event is in the ring before the breaking call returns: it is read from
//! the agent's lease table once the agent has applied it, and from the ring itself
//! before, so the answer never waits for the agent (which can be tens of milliseconds
//! behind under TCG).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ckpt_common::lease::{LeaseEvent, LeaseState, LeaseWhat};

use crate::{
    leases::model::BreakDeadline,
    tracer::{pins::PinDir, ring::Event},
    view::live::LiveMaps,
};

/// A break as the tracer saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenBreak {
    /// CLOCK_MONOTONIC of the kernel's deadline, in whole ticks from the break (the
    /// lease goes at the next tick after it).
    pub deadline_ns: u64,
    /// When this break started (earlier than the restore's own break: not ours).
    pub started_ns: u64,
    /// Processes the tracer saw breaking it.
    pub breakers: Vec<u32>,
}

/// ckpt-agent's maps, when it runs.
pub struct Tracer {
    live: LiveMaps,
    hz: u32,
}

impl Tracer {
    /// None when ckpt-agent is not running (restore works without it, less exactly
    /// under load).
    pub fn open(pins: &PinDir, hz: u32) -> Option<Tracer> {
        LiveMaps::open(pins).ok().map(|live| Tracer { live, hz })
    }

    /// The break of the lease `holder` has on inode `ino`.
    pub fn seen_break(&self, ino: u64, holder: u32, timeout: Duration) -> Result<SeenBreak> {
        let until = Instant::now() + timeout;
        loop {
            // Applied (with the start of a break somebody else began first), or not yet.
            if let Some(seen) = self.in_table(ino, holder)? {
                return Ok(seen);
            }
            if let Some(seen) = self.in_ring(ino, holder) {
                return Ok(seen);
            }
            if Instant::now() > until {
                bail!("ckpt-agent's lease table and ring do not show the break after {timeout:?}");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn in_table(&self, ino: u64, holder: u32) -> Result<Option<SeenBreak>> {
        let found = self.live.leases()?.into_iter().find(|(k, r)| {
            k.ino == ino && r.pid == holder && r.state == LeaseState::Breaking as u8
        });
        Ok(found.map(|(_, r)| SeenBreak {
            deadline_ns: r.deadline_ns,
            started_ns: r.break_started_ns,
            breakers: r.breakers[..usize::from(r.n_breakers).min(r.breakers.len())]
                .iter()
                .map(|b| b.pid)
                .collect(),
        }))
    }

    /// The oldest Breaking event of this lease the agent has not applied yet.
    fn in_ring(&self, ino: u64, holder: u32) -> Option<SeenBreak> {
        let mut first: Option<LeaseEvent> = None;
        self.live.pending_events(|bytes| {
            if let (None, Some(Event::Lease(ev))) = (&first, Event::decode(bytes)) {
                if ev.what == LeaseWhat::Breaking as u32 && ev.ino == ino && ev.pid == holder {
                    first = Some(ev);
                }
            }
        });
        let ev = first?;
        Some(SeenBreak {
            deadline_ns: BreakDeadline::of(&ev, self.hz)?.monotonic_ns,
            started_ns: ev.ts_ns,
            breakers: vec![ev.tgid],
        })
    }
}
