//! One agent per pin directory: an exclusive flock on a file in /run.

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, Write as _},
    os::fd::AsRawFd,
};

use anyhow::{bail, Context as _, Result};

use crate::tracer::pins::PinDir;

pub struct InstanceLock {
    _file: File,
}

impl InstanceLock {
    pub fn acquire(pins: &PinDir) -> Result<InstanceLock> {
        let path = pins.agent_lock_file();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {dir:?}"))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {path:?}"))?;
        if !try_flock(&file, libc::LOCK_EX) {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            bail!(
                "another ckpt-agent is already running for {} (pid {}, lock {})",
                pins.root().display(),
                pid.trim(),
                path.display()
            );
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(InstanceLock { _file: file })
    }
}

fn try_flock(file: &File, op: i32) -> bool {
    // SAFETY: flock on an fd we own.
    unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) == 0 }
}
