//! The deadline the kernel gave a break the restore just made, read back from
//! ckpt-agent's lease table.
//!
//! Timing the breaking syscall from outside places the break somewhere between the
//! clock readings around it: exact when the call is quick, off by up to the whole call
//! when the restore is preempted inside it (a loaded host, a stalled VM: 805 ms once,
//! under TCG). The tracer reads jiffies and the clock together, in the kernel, after
//! the kernel set the deadline, so its answer does not depend on how long the call took.
//! It also shows a break that somebody else had started first (the kernel keeps the
//! first breaker's deadline).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ckpt_common::lease::LeaseState;

use crate::{tracer::pins::PinDir, view::live::LiveMaps};

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

/// ckpt-agent's tables, when it runs.
pub struct Tracer {
    live: LiveMaps,
}

impl Tracer {
    /// None when ckpt-agent is not running (restore works without it, less exactly
    /// under load).
    pub fn open(pins: &PinDir) -> Option<Tracer> {
        LiveMaps::open(pins).ok().map(|live| Tracer { live })
    }

    /// The break of the lease `holder` has on inode `ino`, once the agent has applied
    /// every event up to now.
    pub fn seen_break(&self, ino: u64, holder: u32, timeout: Duration) -> Result<SeenBreak> {
        let until = Instant::now() + timeout;
        self.live.barrier(timeout)?;
        loop {
            let found = self.live.leases()?.into_iter().find(|(k, r)| {
                k.ino == ino && r.pid == holder && r.state == LeaseState::Breaking as u8
            });
            if let Some((_, r)) = found {
                return Ok(SeenBreak {
                    deadline_ns: r.deadline_ns,
                    started_ns: r.break_started_ns,
                    breakers: r.breakers[..usize::from(r.n_breakers).min(r.breakers.len())]
                        .iter()
                        .map(|b| b.pid)
                        .collect(),
                });
            }
            if Instant::now() > until {
                bail!("ckpt-agent's lease table does not show the break after {timeout:?}");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}
