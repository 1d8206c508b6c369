//! The agent's statistics in the pinned AGENT_STATS array, and the seqlock readers
//! use to take consistent snapshots of LOCKS and LEASES.

use anyhow::Result;
use aya::maps::{Array, MapData};
use ckpt_common::counters::AgentStat;

pub struct Stats {
    map: Array<MapData, u64>,
}

impl Stats {
    pub fn new(map: Array<MapData, u64>) -> Stats {
        Stats { map }
    }

    pub fn get(&self, s: AgentStat) -> Result<u64> {
        Ok(self.map.get(&(s as u32), 0)?)
    }

    pub fn set(&mut self, s: AgentStat, v: u64) -> Result<()> {
        Ok(self.map.set(s as u32, v, 0)?)
    }

    pub fn add(&mut self, s: AgentStat, n: u64) -> Result<()> {
        if n > 0 {
            let v = self.get(s)?;
            self.set(s, v + n)?;
        }
        Ok(())
    }

    /// Runs `write` with FlushSeq odd, so that readers retry a snapshot that overlaps it.
    pub fn under_seqlock<T>(&mut self, write: impl FnOnce() -> Result<T>) -> Result<T> {
        let seq = self.get(AgentStat::FlushSeq)?;
        let odd = seq + (seq & 1) + 1;
        self.set(AgentStat::FlushSeq, odd)?;
        let out = write();
        self.set(AgentStat::FlushSeq, odd + 1)?;
        out
    }
}
