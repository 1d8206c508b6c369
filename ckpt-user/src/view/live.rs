//! Read-only access to the agent's pinned maps.
//!
//! Consistency: the agent acknowledges a ring-buffer event only after the lock table
//! holds its effect. [`LiveMaps::barrier`] waits until the ring's consumer position
//! reaches the producer position observed at the call, so a reader sees every lock
//! change the kernel made before it looked.

use std::{
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use ckpt_common::{
    counters::{AgentStat, Counter},
    lease::{LeaseKey, LeaseRecord},
    lock::{LockKey, LockRecord, Waiter},
    names,
};

use crate::{
    sys::map_batch,
    tracer::{pins::PinDir, ring::RingObserver},
};

pub struct LiveMaps {
    /// LOCKS and LEASES are read whole, in batches (`sys::map_batch`).
    locks: MapData,
    leases: MapData,
    pub waiters: HashMap<MapData, u32, Waiter>,
    pub counters: PerCpuArray<MapData, u64>,
    pub stats: Array<MapData, u64>,
    ring: RingObserver,
}

/// The agent's tables at one instant.
pub struct Snapshot {
    pub locks: Vec<(LockKey, LockRecord)>,
    pub leases: Vec<(LeaseKey, LeaseRecord)>,
    /// The agent's write sequence number, when nothing was written during the copy.
    seq: Option<u64>,
}

/// Why the live maps cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("ckpt-agent is not running (no agent holds {0})")]
    NoAgent(String),
    #[error("ckpt-agent is running but its maps under {0} cannot be opened: {1}")]
    Maps(String, String),
}

pub fn open_map(pins: &PinDir, name: &str) -> Result<MapData> {
    let path = pins.map(name);
    MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
}

impl LiveMaps {
    pub fn open(pins: &PinDir) -> std::result::Result<LiveMaps, Unavailable> {
        if !pins.agent_running() {
            return Err(Unavailable::NoAgent(
                pins.agent_lock_file().display().to_string(),
            ));
        }
        let open = || -> Result<LiveMaps> {
            Ok(LiveMaps {
                locks: open_map(pins, names::LOCKS)?,
                leases: open_map(pins, names::LEASES)?,
                waiters: HashMap::try_from(Map::HashMap(open_map(pins, names::WAITERS)?))?,
                counters: PerCpuArray::try_from(Map::PerCpuArray(open_map(
                    pins,
                    names::COUNTERS,
                )?))?,
                stats: Array::try_from(Map::Array(open_map(pins, names::AGENT_STATS)?))?,
                ring: RingObserver::open(open_map(pins, names::LOCK_EVENTS)?)?,
            })
        };
        open().map_err(|e| Unavailable::Maps(pins.root().display().to_string(), format!("{e:#}")))
    }

    /// Waits until the agent has applied every event produced before this call.
    pub fn barrier(&self, timeout: Duration) -> Result<()> {
        let target = self.ring.producer();
        let deadline = Instant::now() + timeout;
        while self.ring.consumer() < target {
            if Instant::now() > deadline {
                bail!(
                    "ckpt-agent is {} bytes of events behind after {:?}; is it stuck?",
                    target - self.ring.consumer(),
                    timeout
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// A consistent copy of the lock and lease tables: retried while the agent was
    /// writing them (iterating a BPF hash map that changes underneath can skip or
    /// repeat keys).
    pub fn snapshot(&self) -> Result<Snapshot> {
        for _ in 0..1000 {
            let before = self.stat(AgentStat::FlushSeq)?;
            if before & 1 == 1 {
                std::thread::yield_now();
                continue;
            }
            let snap = self.snapshot_once()?;
            if snap.seq.is_some() {
                return Ok(snap);
            }
        }
        bail!("the lock table kept changing during 1000 reads; try again")
    }

    /// One pass over both tables, without waiting for a quiet moment. Exact for every
    /// entry the agent did not change meanwhile: a batch read takes each hash bucket
    /// whole, so an unchanged entry is seen exactly once however others change. That
    /// is what a dump needs: its processes are frozen, so their entries hold still,
    /// while other processes may keep the agent busy (retrying for a quiet moment
    /// took up to 250 ms with a lock taken every millisecond elsewhere).
    pub fn snapshot_once(&self) -> Result<Snapshot> {
        let before = self.stat(AgentStat::FlushSeq)?;
        let locks = map_batch::dump(self.locks.fd().as_fd())?;
        let leases = map_batch::dump(self.leases.fd().as_fd())?;
        let quiet = before & 1 == 0 && self.stat(AgentStat::FlushSeq)? == before;
        Ok(Snapshot {
            locks,
            leases,
            seq: quiet.then_some(before),
        })
    }

    /// Whether `snap` was taken while the agent wrote nothing and the agent wrote
    /// nothing since, so that it is still exact for every entry (the agent bumps its
    /// sequence number only on real changes). Call after `barrier`, which makes the
    /// agent apply every event made before.
    pub fn still_current(&self, snap: &Snapshot) -> Result<bool> {
        Ok(snap.seq == Some(self.stat(AgentStat::FlushSeq)?))
    }

    /// The lease table alone (no consistency check: for one entry the caller waits for).
    pub fn leases(&self) -> Result<Vec<(LeaseKey, LeaseRecord)>> {
        map_batch::dump(self.leases.fd().as_fd())
    }

    /// The events the agent has not applied yet (see `RingObserver::peek`).
    pub fn pending_events(&self, f: impl FnMut(&[u8])) {
        self.ring.peek(f)
    }

    pub fn counter(&self, c: Counter) -> Result<u64> {
        Ok(self.counters.get(&(c as u32), 0)?.iter().sum())
    }

    pub fn stat(&self, s: AgentStat) -> Result<u64> {
        Ok(self.stats.get(&(s as u32), 0)?)
    }

    /// Every loss the tracer or agent counted, as (what, how many), non-zero only.
    pub fn losses(&self) -> Result<Vec<(&'static str, u64)>> {
        let mut out = Vec::new();
        for c in [
            Counter::RingBufFull,
            Counter::WaitersFull,
            Counter::SyscallCtxFull,
        ] {
            let n = self.counter(c)?;
            if n > 0 {
                out.push((c.name(), n));
            }
        }
        let n = self.stat(AgentStat::LocksFull)?;
        if n > 0 {
            out.push(("locks_full", n));
        }
        Ok(out)
    }
}

/// CLOCK_MONOTONIC now, in ns (the clock bpf_ktime_get_ns uses).
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}
