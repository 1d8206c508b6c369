//! The deadline the kernel gave a break the restore just made, read back from the
//! lease itself: the lock-table iterator, aimed at the holder, reads the lease's
//! `fl_break_time` / `fl_downgrade_time` with jiffies and the clock in one go, in the
//! kernel, so the answer does not depend on how long the breaking call took (a loaded
//! host, a stalled VM: 805 ms once, under TCG), and needs no agent. With ckpt-agent
//! running, its record of the break also says when it began and who broke it, which
//! shows a break somebody else had started first (the kernel keeps that deadline).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::{
    lease::{record_matches, BreakState},
    lock::{
        kernel::{self, conflicts},
        HeldKind,
    },
    tracer::history::History,
    tracer::{
        iters::{Iters, Prog},
        pins::PinDir,
    },
};

/// A break as the kernel (and the agent) show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenBreak {
    /// CLOCK_MONOTONIC of the kernel's deadline, in whole ticks from the read (the
    /// lease goes at the next tick after it).
    pub deadline_ns: u64,
    /// When this break started, when ckpt-agent recorded it (earlier than the
    /// restore's own break: not ours).
    pub started_ns: Option<u64>,
    /// Processes breaking it (the agent's record, or blocked breakers in the kernel).
    pub breakers: Vec<u32>,
}

/// The iterators, loaded once per restore.
pub struct Tracer {
    iters: Iters,
    pins: PinDir,
    hz: u32,
}

impl Tracer {
    /// None when the iterators cannot be loaded (restore then times the break from
    /// the syscall, less exactly under load).
    pub fn open(pins: &PinDir, hz: u32) -> Option<Tracer> {
        Iters::open(pins, &[Prog::LockTable])
            .ok()
            .map(|iters| Tracer {
                iters,
                pins: pins.clone(),
                hz,
            })
    }

    /// The break of the lease `holder` has on inode `ino`.
    pub fn seen_break(&self, ino: u64, holder: u32, timeout: Duration) -> Result<SeenBreak> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(seen) = self.read(ino, holder)? {
                return Ok(seen);
            }
            if Instant::now() > until {
                bail!("the kernel does not show the lease on inode {ino} of process {holder} breaking after {timeout:?}");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn read(&self, ino: u64, holder: u32) -> Result<Option<SeenBreak>> {
        let table = kernel::read_process(&self.iters, holder)?;
        let Some(lease) = table
            .held
            .iter()
            .find(|l| l.kind == HeldKind::Lease && l.ino == ino && BreakState::breaking(l.flags))
        else {
            return Ok(None);
        };
        let Some(deadline) = BreakState::of(lease.flags, lease.lease.as_ref(), self.hz).primary
        else {
            return Ok(None);
        };
        let history = History::read(&self.pins).ok().flatten();
        let record = lease
            .addr
            .and_then(|a| history.as_ref()?.breaks.get(&a).copied())
            .filter(|r| record_matches(r, lease));
        let breakers = match &record {
            Some(r) => r.breakers[..usize::from(r.n_breakers).min(r.breakers.len())]
                .iter()
                .map(|b| b.pid)
                .collect(),
            None => table
                .blocked
                .iter()
                .filter(|w| conflicts(lease, w))
                .map(|w| w.pid.max(0) as u32)
                .collect(),
        };
        Ok(Some(SeenBreak {
            deadline_ns: deadline.monotonic_ns,
            started_ns: record.map(|r| r.started_ns),
            breakers,
        }))
    }
}
