//! The iterator programs (ckpt-ebpf/src/iters.rs), loaded by whoever reads with them
//! or taken from ckpt-agent's pins of the same build: `ckpt-user locks`, `dump`,
//! `restore` and `deleted` work the same with or without an agent, and never read
//! with programs of another build. The object has no pinned maps, so loading it
//! leaves nothing behind.

use std::{
    collections::HashMap,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::PathBuf,
};

use anyhow::{anyhow, Context as _, Result};
use aya::{programs::Iter, Ebpf, EbpfLoader};
use sha2::{Digest as _, Sha256};

use super::{format::resolve_layout, pins::PinDir};
use crate::sys::{bpf_iter, mounts};

/// The iterator object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ckpt-iters"));

/// An iterator program and what it walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Prog {
    /// Every fd with its facts and lock lines (dump; one process per link).
    TaskFiles,
    /// The same with each fd's path.
    TaskFilesPaths,
    /// Every fd holding a lock or lease, with its lock lines and blocked requests.
    LockTable,
    /// The same for descriptions held through memory mappings.
    LockTableMaps,
    /// Deleted regular files held through fds, and through mappings.
    DeletedFds,
    DeletedMaps,
}

impl Prog {
    pub fn name(self) -> &'static str {
        use ckpt_common::names::*;
        match self {
            Prog::TaskFiles => TASK_FILES,
            Prog::TaskFilesPaths => TASK_FILES_PATHS,
            Prog::LockTable => LOCK_TABLE,
            Prog::LockTableMaps => LOCK_TABLE_MAPS,
            Prog::DeletedFds => DELETED_FDS,
            Prog::DeletedMaps => DELETED_MAPS,
        }
    }

    fn target(self) -> &'static str {
        match self {
            Prog::LockTableMaps | Prog::DeletedMaps => "task_vma",
            _ => "task_file",
        }
    }
}

impl Prog {
    pub const ALL: [Prog; 6] = [
        Prog::TaskFiles,
        Prog::TaskFilesPaths,
        Prog::LockTable,
        Prog::LockTableMaps,
        Prog::DeletedFds,
        Prog::DeletedMaps,
    ];
}

/// Loaded iterator programs.
pub struct Iters {
    progs: HashMap<Prog, OwnedFd>,
    /// Keeps the object's maps (per-CPU scratch) alive; None for the agent's pinned
    /// programs (the pins hold them).
    _ebpf: Option<Ebpf>,
}

/// Where ckpt-agent pins the iterators of this build: readers of the same build use
/// them instead of loading their own (verifying and BTF parsing cost ~100 ms here,
/// seconds in a TCG guest), and never use another build's.
fn pinned_dir(pins: &PinDir) -> PathBuf {
    let id = hex::encode(&Sha256::digest(OBJECT)[..8]);
    pins.progs_dir().join(format!("iters-{id}"))
}

/// Why the iterators cannot be used (the caller falls back to /proc).
pub fn unavailable_hint(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    if nix::unistd::geteuid().is_root() {
        text
    } else {
        format!(
            "{text} (loading BPF iterators needs root: CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN)"
        )
    }
}

impl Iters {
    /// The agent's pinned programs when it pinned this build's, else `load`.
    pub fn open(pins: &PinDir, progs: &[Prog]) -> Result<Iters> {
        let dir = pinned_dir(pins);
        let pinned: Option<HashMap<Prog, OwnedFd>> = progs
            .iter()
            .map(|&p| {
                bpf_iter::obj_get(&dir.join(p.name()))
                    .ok()
                    .map(|fd| (p, fd))
            })
            .collect();
        match pinned {
            Some(progs) => Ok(Iters { progs, _ebpf: None }),
            None => Iters::load(progs),
        }
    }

    /// Pins every program for readers of this build (ckpt-agent), and removes the
    /// pins of other builds.
    pub fn pin(&self, pins: &PinDir) -> Result<()> {
        let dir = pinned_dir(pins);
        if let Ok(entries) = std::fs::read_dir(pins.progs_dir()) {
            for e in entries.flatten() {
                let stale =
                    e.file_name().to_string_lossy().starts_with("iters-") && e.path() != dir;
                if stale {
                    std::fs::remove_dir_all(e.path())
                        .with_context(|| format!("removing stale pins {:?}", e.path()))?;
                }
            }
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {dir:?}"))?;
        for (p, fd) in &self.progs {
            let path = dir.join(p.name());
            let _ = std::fs::remove_file(&path);
            bpf_iter::obj_pin(fd.as_fd(), &path)?;
        }
        Ok(())
    }

    /// Loads `progs` with this kernel's layout.
    pub fn load(progs: &[Prog]) -> Result<Iters> {
        mounts::ensure_tracefs()?;
        let layout = resolve_layout().context("resolving this kernel's layout")?;
        let mut ebpf = EbpfLoader::new()
            .override_global("LAYOUT", &layout, true)
            .load(OBJECT)
            .context("loading the iterator object")?;
        let btf = aya::Btf::from_sys_fs().context("reading kernel BTF")?;
        let mut fds = HashMap::new();
        for &p in progs {
            let prog: &mut Iter = ebpf
                .program_mut(p.name())
                .ok_or_else(|| anyhow!("program {} missing from the iterator object", p.name()))?
                .try_into()?;
            prog.load(p.target(), &btf)
                .with_context(|| format!("loading the {} iterator", p.name()))?;
            let fd = prog.fd()?.as_fd().try_clone_to_owned()?;
            fds.insert(p, fd);
        }
        Ok(Iters {
            progs: fds,
            _ebpf: Some(ebpf),
        })
    }

    pub fn prog(&self, p: Prog) -> Result<BorrowedFd<'_>> {
        self.progs
            .get(&p)
            .map(|fd| fd.as_fd())
            .ok_or_else(|| anyhow!("the {} iterator was not loaded", p.name()))
    }

    /// Runs `p` over every process once; its output.
    pub fn read_all(&self, p: Prog) -> Result<Vec<u8>> {
        let link = bpf_iter::link_all(self.prog(p)?)
            .with_context(|| format!("attaching the {} iterator", p.name()))?;
        let mut out = Vec::with_capacity(1 << 16);
        bpf_iter::read_into(link.as_fd(), &mut out)
            .with_context(|| format!("reading the {} iterator", p.name()))?;
        Ok(out)
    }

    /// Runs `p` over every process once, handing its output to `sink` as it is read
    /// (`bpf_iter::read_pieces`).
    pub fn read_all_pieces(&self, p: Prog, sink: impl FnMut(Vec<u8>) -> bool) -> Result<()> {
        let link = bpf_iter::link_all(self.prog(p)?)
            .with_context(|| format!("attaching the {} iterator", p.name()))?;
        bpf_iter::read_pieces(link.as_fd(), sink)
            .with_context(|| format!("reading the {} iterator", p.name()))
    }

    /// Runs `a` and `b` over every process, side by side on two threads (the fd walk
    /// and the mapping walk each take most of a CPU on a host with many processes).
    pub fn read_both(&self, a: Prog, b: Prog) -> Result<(Vec<u8>, Vec<u8>)> {
        let (a, b) = std::thread::scope(|s| {
            let b = s.spawn(|| self.read_all(b));
            let a = self.read_all(a);
            (a, b.join().expect("an iterator read thread panicked"))
        });
        Ok((a?, b?))
    }

    /// Runs `p` over process `pid` only (Linux 6.1+ iterator parameters).
    pub fn read_process(&self, p: Prog, pid: u32) -> Result<Vec<u8>> {
        let link = bpf_iter::link_for_process(self.prog(p)?, pid)
            .with_context(|| format!("aiming the {} iterator at process {pid}", p.name()))?;
        let mut out = Vec::new();
        bpf_iter::read_into(link.as_fd(), &mut out)
            .with_context(|| format!("reading the {} iterator", p.name()))?;
        Ok(out)
    }
}
