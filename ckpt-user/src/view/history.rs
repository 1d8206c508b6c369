//! What the agent's programs recorded that the kernel forgets: when each blocked
//! thread began to wait, each lease break's start, breakers and signal, and (with
//! `ckpt-agent --hold-times`) when locks were taken. Read from the pinned maps; an
//! entry is used only for the kernel object it names, as the kernel's lists show it
//! now, so a stale entry is never shown.

use std::{collections::HashMap, os::fd::AsFd as _};

use anyhow::{Context as _, Result};
use aya::maps::MapData;
use ckpt_common::{
    lease::BreakRecord,
    lock::{HoldStart, WaitStart},
    names,
};

use crate::{sys::map_batch, tracer::pins::PinDir};

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
    /// None when no agent runs on `pins` (its maps would hold only what happened while
    /// one ran).
    pub fn read(pins: &PinDir) -> Result<Option<History>> {
        if !pins.agent_running() {
            return Ok(None);
        }
        let waits: Vec<(u32, WaitStart)> = map_batch::dump(open(pins, names::WAITS)?.fd().as_fd())?;
        let breaks: Vec<(u64, BreakRecord)> =
            map_batch::dump(open(pins, names::BREAKS)?.fd().as_fd())?;
        let holds: Vec<(u64, HoldStart)> = map_batch::dump(open(pins, names::HOLDS)?.fd().as_fd())?;
        Ok(Some(History {
            waits: waits
                .into_iter()
                .map(|(tid, w)| (w.request, (tid, w)))
                .collect(),
            breaks: breaks.into_iter().collect(),
            holds: holds.into_iter().collect(),
        }))
    }
}
