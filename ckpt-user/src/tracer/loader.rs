//! Loads the tracepoint object (ckpt-ebpf/src/main.rs) with this kernel's layout,
//! attaches its programs and pins programs, links and maps for `ckpt-agent`.
//!
//! By default only rare events are traced: the two lock tracepoints (attached as BTF
//! tracepoints, which cost an uncontended lock call one test of its result), the
//! lease-break tracepoints, signal delivery and thread exit. No syscall tracepoint:
//! any one of them puts every task's syscalls on the slow path. `--exact-deleted`
//! adds the deleted-file triggers, which are syscall tracepoints.
//!
//! Restart: maps are pinned by name, so a new agent's object reuses the old maps (the
//! wait and break records survive). The new programs are attached *before* the old
//! links are unpinned, so no wait start is missed.

use std::{collections::HashSet, fs};

use anyhow::{Context as _, Result};
use aya::{
    programs::{links::FdLink, BtfTracePoint, TracePoint},
    Ebpf, EbpfLoader,
};
use tracing::{debug, info};

use ckpt_common::names;

use super::{format::resolve_layout, pins::PinDir};
use crate::sys::mounts;

/// The tracepoint object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ckpt"));

/// (program, BTF tracepoint): `btf_trace_<name>` in the kernel's BTF.
pub const BTF_PROGRAMS: &[(&str, &str)] = &[
    ("posix_lock_inode", "posix_lock_inode"),
    ("flock_lock_inode", "flock_lock_inode"),
];

/// (program, tracepoint category, tracepoint name): rare events only.
pub const PROGRAMS: &[(&str, &str, &str)] = &[
    ("leases_conflict", "filelock", "leases_conflict"),
    ("signal_generate", "signal", "signal_generate"),
    ("signal_deliver", "signal", "signal_deliver"),
    ("break_lease_noblock", "filelock", "break_lease_noblock"),
    ("break_lease_block", "filelock", "break_lease_block"),
    ("break_lease_unblock", "filelock", "break_lease_unblock"),
    ("sched_process_exit", "sched", "sched_process_exit"),
];

/// `--exact-deleted`: the deleted-file triggers (ckpt-ebpf/src/deleted.rs).
pub const DELETED_PROGRAMS: &[(&str, &str, &str)] = &[
    ("sys_enter_openat", "syscalls", "sys_enter_openat"),
    ("sys_enter_close", "syscalls", "sys_enter_close"),
    ("sys_enter_fcntl", "syscalls", "sys_enter_fcntl"),
    ("sched_process_fork", "sched", "sched_process_fork"),
    ("sched_process_exec", "sched", "sched_process_exec"),
    ("deleted_exit", "sched", "sched_process_exit"),
];

/// Triggers for syscalls some architectures lack (x86-64 has them all): attached when
/// the tracepoint exists. With the exits in `format::DELETED_EXITS`.
pub const OPTIONAL_DELETED_PROGRAMS: &[(&str, &str, &str)] = &[
    ("sys_enter_open", "syscalls", "sys_enter_open"),
    ("sys_enter_openat2", "syscalls", "sys_enter_openat2"),
    ("sys_enter_dup", "syscalls", "sys_enter_dup"),
    ("sys_enter_dup2", "syscalls", "sys_enter_dup2"),
    ("sys_enter_dup3", "syscalls", "sys_enter_dup3"),
    ("sys_enter_close_range", "syscalls", "sys_enter_close_range"),
    ("sys_enter_munmap", "syscalls", "sys_enter_munmap"),
];

/// What to trace beyond the rare events.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tracing {
    /// Note when every lock is taken (a list walk on every granted lock call).
    pub hold_times: bool,
    /// Exact deleted-file tracking (syscall tracepoints on every task).
    pub exact_deleted: bool,
}

pub struct Loaded {
    pub ebpf: Ebpf,
    /// True when pinned maps from an earlier agent were reused.
    pub adopted: bool,
}

/// Loads, attaches and pins everything under `pins`.
pub fn load_and_attach(pins: &PinDir, tracing: Tracing) -> Result<Loaded> {
    if mounts::ensure_tracefs()? {
        info!("mounted tracefs at {}", mounts::TRACEFS);
    }
    if mounts::ensure_bpffs()? {
        info!("mounted bpffs at {}", mounts::BPFFS);
    }
    let mut layout = resolve_layout().context("resolving tracepoint layout")?;
    layout.hold_times = u32::from(tracing.hold_times);
    debug!(?layout, "tracepoint layout");

    for dir in [pins.maps_dir(), pins.progs_dir(), pins.links_dir()] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {dir:?}"))?;
    }
    // Maps of agents before the kernel-is-the-table design: nothing reads them.
    for stale in names::STALE {
        let _ = fs::remove_file(pins.map(stale));
    }
    let adopted = pins.has_state();
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pins.maps_dir())
        .override_global("LAYOUT", &layout, true)
        .load(OBJECT)
        .context("loading the eBPF object")?;
    let btf = aya::Btf::from_sys_fs().context("reading kernel BTF")?;
    let mut attached: HashSet<&str> = HashSet::new();

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
        attached.insert(prog_name);
    }

    let mut classic: Vec<(&str, &str, &str)> = PROGRAMS.to_vec();
    if tracing.exact_deleted {
        let exits = super::format::DELETED_EXITS
            .iter()
            .map(|e| (*e, "syscalls", *e));
        classic.extend(DELETED_PROGRAMS.iter().copied());
        classic.extend(
            OPTIONAL_DELETED_PROGRAMS
                .iter()
                .copied()
                .chain(exits)
                .filter(|(_, category, tp)| mounts::event_dir(category, tp).exists()),
        );
    }
    for (prog_name, category, tp) in classic {
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
        attached.insert(prog_name);
    }

    // Now that everything is attached: detach what an earlier agent attached and this
    // one does not (older programs, or an earlier --exact-deleted).
    for dir in [pins.links_dir(), pins.progs_dir()] {
        for entry in fs::read_dir(&dir)
            .with_context(|| format!("listing {dir:?}"))?
            .flatten()
        {
            // Directories hold the iterators (`iters::Iters::pin`).
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            if !attached.contains(name.to_string_lossy().as_ref()) {
                fs::remove_file(entry.path())
                    .with_context(|| format!("removing stale pin {:?}", entry.path()))?;
            }
        }
    }
    Ok(Loaded { ebpf, adopted })
}

/// Loads ckpt-agent's default programs and attaches each, pinning nothing (`ckpt-user
/// check`): each program's result, by name. Everything is detached and unloaded on
/// return; the object's pinned-by-name maps go to a private directory removed after.
pub fn probe() -> Result<Vec<(String, Result<()>)>> {
    mounts::ensure_tracefs()?;
    mounts::ensure_bpffs()?;
    let layout = resolve_layout().context("resolving tracepoint layout")?;
    let dir =
        std::path::Path::new(mounts::BPFFS).join(format!("ckpt-check-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {dir:?}"))?;
    let result = (|| {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .override_global("LAYOUT", &layout, true)
            .load(OBJECT)
            .context("loading the eBPF object")?;
        let btf = aya::Btf::from_sys_fs().context("reading kernel BTF")?;
        let mut out = Vec::new();
        for (prog_name, tp) in BTF_PROGRAMS {
            let r = (|| -> Result<()> {
                let prog: &mut BtfTracePoint = ebpf
                    .program_mut(prog_name)
                    .with_context(|| format!("program {prog_name} missing from object"))?
                    .try_into()?;
                prog.load(tp, &btf).context("loading")?;
                prog.attach()
                    .with_context(|| format!("attaching to BTF tracepoint {tp}"))?;
                Ok(())
            })();
            out.push((format!("{prog_name} (BTF)"), r));
        }
        for (prog_name, category, tp) in PROGRAMS {
            let r = (|| -> Result<()> {
                let prog: &mut TracePoint = ebpf
                    .program_mut(prog_name)
                    .with_context(|| format!("program {prog_name} missing from object"))?
                    .try_into()?;
                prog.load().context("loading")?;
                prog.attach(category, tp)
                    .with_context(|| format!("attaching to {category}:{tp}"))?;
                Ok(())
            })();
            out.push((format!("{category}:{tp}"), r));
        }
        Ok(out)
    })();
    let _ = fs::remove_dir_all(&dir);
    result
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
