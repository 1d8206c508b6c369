//! Every description's signal owner (F_SETOWN_EX, pids translated to the restored ones)
//! and signal (F_SETSIG) put back. Done after the processes are ready, because setting
//! a lease makes its setter the owner.

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::{AsRawFd as _, OwnedFd},
};

use anyhow::{Context as _, Result};

use crate::{
    image::format::{Image, OpenFile},
    plan::Plan,
    sys::fown,
};

/// What restores the owners of descriptions: the old -> new pid map and the restored
/// process group.
pub struct Owners<'a> {
    pub pids: &'a HashMap<u32, u32>,
    pub pgid: i32,
}

impl Owners<'_> {
    /// The description's recorded owner, translated (None: no owner, or one that was
    /// not restored).
    pub fn of(&self, f: &OpenFile) -> Option<(i32, i32)> {
        let (kind, pid) = f.owner?;
        match kind {
            // A process group: the restored processes have one of their own.
            fown::F_OWNER_PGRP => Some((kind, self.pgid)),
            _ => self.pids.get(&(pid as u32)).map(|&new| (kind, new as i32)),
        }
    }

    /// Sets owner and signal of every description; returns warnings for owners that
    /// were not restored.
    pub fn restore(
        &self,
        image: &Image,
        plan: &Plan,
        files: &BTreeMap<u32, OwnedFd>,
    ) -> Result<Vec<String>> {
        let mut warnings = Vec::new();
        for &file in plan.files.keys() {
            let f = &image.files[file as usize];
            let fd = files[&file].as_raw_fd();
            if f.sig != 0 {
                fown::set_signal(fd, f.sig).with_context(|| format!("F_SETSIG on {}", f.path))?;
            }
            let owner = self.of(f);
            if f.owner.is_some() && owner.is_none() {
                warnings.push(format!(
                    "{}: its signal owner {:?} was not restored; it has none now",
                    f.path, f.owner
                ));
            }
            // A lease's setter became the owner: reset it even to none.
            if owner.is_some() || image.leases.iter().any(|l| l.file == file) {
                fown::set_owner(fd, owner).with_context(|| format!("F_SETOWN_EX on {}", f.path))?;
            }
        }
        Ok(warnings)
    }
}
