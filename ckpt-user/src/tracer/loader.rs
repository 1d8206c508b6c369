//! Loads the eBPF object with this kernel's layout, attaches every program to its
//! tracepoint and pins programs, links and maps.
//!
//! The two lock tracepoints, which fire on every lock call, are attached as BTF
//! tracepoints (cheapest to run; see ckpt-ebpf/src/locks.rs); the rest are classic
//! tracepoints.
//!
//! Restart without loss: maps are pinned by name, so a new agent's object reuses the
//! old maps (LOCK_EVENTS still holds what happened while no agent ran). The new
//! programs are attached *before* the old links are unpinned, so no event is missed;
//! during that instant an event may be seen twice, which is harmless because replaying
//! a lock request is idempotent (see `locks::model`).

use std::fs;

use anyhow::{Context as _, Result};
use aya::{
    programs::{links::FdLink, BtfTracePoint, Iter, TracePoint},
    Ebpf, EbpfLoader,
};
use tracing::{debug, info};

use ckpt_common::names;

use super::{format::resolve_layout, pins::PinDir};
use crate::sys::mounts;

/// The eBPF object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ckpt"));

/// (program, BTF tracepoint): `btf_trace_<name>` in the kernel's BTF.
pub const BTF_PROGRAMS: &[(&str, &str)] = &[
    ("posix_lock_inode", "posix_lock_inode"),
    ("flock_lock_inode", "flock_lock_inode"),
];

/// (program, tracepoint category, tracepoint name)
pub const PROGRAMS: &[(&str, &str, &str)] = &[
    ("sys_enter_fcntl", "syscalls", "sys_enter_fcntl"),
    ("sys_enter_flock", "syscalls", "sys_enter_flock"),
    ("sys_exit_fcntl", "syscalls", "sys_exit_fcntl"),
    ("sys_exit_flock", "syscalls", "sys_exit_flock"),
    ("sched_process_exit", "sched", "sched_process_exit"),
    ("generic_add_lease", "filelock", "generic_add_lease"),
    ("generic_delete_lease", "filelock", "generic_delete_lease"),
    ("leases_conflict", "filelock", "leases_conflict"),
    ("signal_generate", "signal", "signal_generate"),
    ("break_lease_noblock", "filelock", "break_lease_noblock"),
    ("break_lease_block", "filelock", "break_lease_block"),
    ("break_lease_unblock", "filelock", "break_lease_unblock"),
    ("time_out_leases", "filelock", "time_out_leases"),
    // Deleted-file triggers (ckpt-ebpf/src/deleted.rs).
    ("sys_enter_openat", "syscalls", "sys_enter_openat"),
    ("sys_enter_close", "syscalls", "sys_enter_close"),
    ("sched_process_fork", "sched", "sched_process_fork"),
    ("sched_process_exec", "sched", "sched_process_exec"),
];

/// Triggers for syscalls some architectures lack (x86-64 has them all): attached when
/// the tracepoint exists. With the exits in `format::DELETED_EXITS`.
pub const OPTIONAL_PROGRAMS: &[(&str, &str, &str)] = &[
    ("sys_enter_open", "syscalls", "sys_enter_open"),
    ("sys_enter_openat2", "syscalls", "sys_enter_openat2"),
    ("sys_enter_dup", "syscalls", "sys_enter_dup"),
    ("sys_enter_dup2", "syscalls", "sys_enter_dup2"),
    ("sys_enter_dup3", "syscalls", "sys_enter_dup3"),
    ("sys_enter_close_range", "syscalls", "sys_enter_close_range"),
    ("sys_enter_munmap", "syscalls", "sys_enter_munmap"),
];

pub struct Loaded {
    pub ebpf: Ebpf,
    /// True when pinned maps from an earlier agent were reused.
    pub adopted: bool,
}

/// Loads, attaches and pins everything under `pins`. `max_locks` overrides the lock
/// table's capacity when the maps are created (not when re-adopted).
pub fn load_and_attach(pins: &PinDir, max_locks: Option<u32>) -> Result<Loaded> {
    if mounts::ensure_tracefs()? {
        info!("mounted tracefs at {}", mounts::TRACEFS);
    }
    if mounts::ensure_bpffs()? {
        info!("mounted bpffs at {}", mounts::BPFFS);
    }
    let layout = resolve_layout().context("resolving tracepoint layout")?;
    debug!(?layout, "tracepoint layout");

    let adopted = pins.has_state();
    for dir in [pins.maps_dir(), pins.progs_dir(), pins.links_dir()] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {dir:?}"))?;
    }
    let mut loader = EbpfLoader::new();
    loader
        .default_map_pin_directory(pins.maps_dir())
        .override_global("LAYOUT", &layout, true);
    if let Some(n) = max_locks {
        loader.map_max_entries(names::LOCKS, n);
    }
    let mut ebpf = loader.load(OBJECT).context("loading the eBPF object")?;
    let btf = aya::Btf::from_sys_fs().context("reading kernel BTF")?;

    for (prog_name, tp) in BTF_PROGRAMS {
        let prog: &mut BtfTracePoint = ebpf
            .program_mut(prog_name)
            .with_context(|| format!("program {prog_name} missing from object"))?
            .try_into()?;
        prog.load(tp, &btf)
            .with_context(|| format!("loading {prog_name}"))?;
        let link_id = prog
            .attach()
            .with_context(|| format!("attaching {prog_name} to BTF tracepoint {tp}"))?;
        let link: FdLink = prog.take_link(link_id)?.into();
        replace_pins(pins, prog_name, link, |p| prog.pin(p))?;
    }

    let exits: Vec<(&str, &str, &str)> = super::format::DELETED_EXITS
        .iter()
        .map(|e| (*e, "syscalls", *e))
        .collect();
    let optional: Vec<(&str, &str, &str)> = OPTIONAL_PROGRAMS
        .iter()
        .copied()
        .chain(exits)
        .filter(|(_, category, tp)| mounts::event_dir(category, tp).exists())
        .collect();
    for (prog_name, category, tp) in PROGRAMS.iter().chain(optional.iter()) {
        let prog: &mut TracePoint = ebpf
            .program_mut(prog_name)
            .with_context(|| format!("program {prog_name} missing from object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("loading {prog_name}"))?;
        let link_id = prog
            .attach(category, tp)
            .with_context(|| format!("attaching {prog_name} to {category}:{tp}"))?;
        let link: FdLink = prog.take_link(link_id)?.try_into()?;
        replace_pins(pins, prog_name, link, |p| prog.pin(p))?;
    }

    // The fd-table iterators are only loaded and pinned: `ckpt-user dump` aims a link
    // at each process it reads (`dump::fd_table`).
    for name in [names::TASK_FILES, names::TASK_FILES_PATHS] {
        let prog: &mut Iter = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from object"))?
            .try_into()?;
        prog.load("task_file", &btf)
            .with_context(|| format!("loading the {name} iterator"))?;
        let pin = pins.progs_dir().join(name);
        if pin.exists() {
            fs::remove_file(&pin).with_context(|| format!("removing old pin {pin:?}"))?;
        }
        prog.pin(&pin)
            .with_context(|| format!("pinning program {pin:?}"))?;
    }
    // The deleted-file scans run over every process: plain links, pinned.
    for (name, target) in [
        (names::DELETED_FDS, "task_file"),
        (names::DELETED_MAPS, "task_vma"),
    ] {
        let prog: &mut Iter = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from object"))?
            .try_into()?;
        prog.load(target, &btf)
            .with_context(|| format!("loading the {name} iterator"))?;
        let link_id = prog.attach().with_context(|| format!("attaching {name}"))?;
        let link: FdLink = prog.take_link(link_id)?.try_into()?;
        replace_pins(pins, name, link, |p| prog.pin(p))?;
    }
    // An older agent's one-for-all iterator link and its process filter.
    for stale in [
        pins.links_dir().join(names::TASK_FILES),
        pins.maps_dir().join("FD_FILTER"),
    ] {
        if stale.exists() {
            fs::remove_file(&stale).with_context(|| format!("removing stale pin {stale:?}"))?;
        }
    }
    Ok(Loaded { ebpf, adopted })
}

/// Pins a freshly attached program and its link under `name`, replacing the previous
/// agent's pins only now that the new program is attached.
fn replace_pins(
    pins: &PinDir,
    name: &str,
    link: FdLink,
    pin_prog: impl FnOnce(&std::path::Path) -> Result<(), aya::pin::PinError>,
) -> Result<()> {
    let link_pin = pins.links_dir().join(name);
    let prog_pin = pins.progs_dir().join(name);
    for old in [&link_pin, &prog_pin] {
        if old.exists() {
            fs::remove_file(old).with_context(|| format!("removing old pin {old:?}"))?;
        }
    }
    link.pin(&link_pin)
        .with_context(|| format!("pinning link {link_pin:?}"))?;
    pin_prog(&prog_pin).with_context(|| format!("pinning program {prog_pin:?}"))?;
    Ok(())
}
