//! Where the agent pins its programs, links and maps in bpffs.
//!
//! ```text
//! <root>/maps/<MAP>      what the tracer records for readers (WAITS, BREAKS, ...)
//! <root>/progs/<prog>    the loaded programs
//! <root>/progs/iters-<build>/<prog>   the iterators, for readers of the same build
//! <root>/links/<prog>    their tracepoint attachments: tracing goes on while no agent runs
//! ```

use std::path::{Path, PathBuf};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ckpt";

#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> PinDir {
        PinDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn progs_dir(&self) -> PathBuf {
        self.root.join("progs")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The agent's instance lock. bpffs cannot hold regular files, so it lives in /run,
    /// named after the pin directory so that agents with different pin dirs coexist.
    pub fn agent_lock_file(&self) -> PathBuf {
        let tag: String = self
            .root
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        PathBuf::from("/run/ckpt").join(format!("agent{tag}.lock"))
    }

    /// Whether an agent holds the instance lock for this pin directory (readers use
    /// this to choose between the live maps and the /proc fallback).
    pub fn agent_running(&self) -> bool {
        use std::os::fd::AsRawFd as _;
        let Ok(file) = std::fs::File::open(self.agent_lock_file()) else {
            return false;
        };
        // SAFETY: flock on an fd we own; a shared lock succeeds only if no agent
        // holds the exclusive one.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
    }

    /// Whether an agent has ever pinned state here.
    pub fn has_state(&self) -> bool {
        self.map(ckpt_common::names::WAITS).exists()
    }

    /// Removes every pin (programs detach once nothing else holds them).
    pub fn remove_all(&self) -> std::io::Result<()> {
        for dir in [self.links_dir(), self.progs_dir(), self.maps_dir()] {
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
        }
        match std::fs::remove_dir(&self.root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}
