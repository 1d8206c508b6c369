//! The iterator programs (ckpt-ebpf/src/iters.rs), loaded by whoever reads with them:
//! `ckpt-user locks`, `dump`, `restore` and `deleted` work the same with or without
//! an agent, and never read with programs of another build. The object has no
//! pinned maps, so loading it leaves nothing behind.

use std::{
    collections::HashMap,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
};

use anyhow::{anyhow, Context as _, Result};
use aya::{programs::Iter, Ebpf, EbpfLoader};

use super::format::resolve_layout;
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
    fn name(self) -> &'static str {
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

/// Loaded iterator programs.
pub struct Iters {
    progs: HashMap<Prog, OwnedFd>,
    /// Keeps the object's maps (per-CPU scratch) alive.
    _ebpf: Ebpf,
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
            if std::env::var_os("CKPT_VERIFIER_STATS").is_some() {
                eprintln!(
                    "{}: {:?} verified insns",
                    p.name(),
                    prog.info()?.verified_instruction_count()
                );
            }
            let fd = prog.fd()?.as_fd().try_clone_to_owned()?;
            fds.insert(p, fd);
        }
        Ok(Iters {
            progs: fds,
            _ebpf: ebpf,
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
