//! ckpt as a CRIU 3.17 plugin (`libckpt_criu_plugin.so`, installed into CRIU's
//! plugin directory as `ckpt.so`). CRIU loads every plugin for every run, dumps,
//! pre-dumps and restores alike, so this one does nothing unless CRIU has just dumped
//! a lease (`filelocks.img` has one, which needs `--file-locks`).
//!
//! At the end of such a dump (`exit(DUMP, 0)`: every image is flushed and the tasks
//! are still frozen) it writes `ckpt-leases.json` beside CRIU's images: each lease as
//! the kernel holds it at that instant, with what `filelocks.img` loses (the type a
//! lease being broken had before the break, and the exact time left before the
//! kernel acts). A failure is written into the file and printed on CRIU's stderr; it
//! never fails or crashes CRIU. The restore side (breaking the lease again with the
//! time left, not CRIU's whole lease-break-time) is not built yet; see NOTES.md.
//!
//! With ckpt-agent running (its pins in `$CKPT_PIN_DIR`, default /sys/fs/bpf/ckpt),
//! each breaking lease also gets the agent's record of its break: when it began,
//! whether the holder was signalled, and its breakers.
//!
//! Limits: the dumped tree must be in the host's pid namespace (CRIU's images name
//! processes by their pid in the tree's own namespace; a lease the kernel does not
//! show at that pid is reported as an error in the file).

pub mod images;

use std::{
    ffi::{c_char, c_int, c_uint, c_void},
    io::Write as _,
    os::fd::{FromRawFd as _, OwnedFd, RawFd},
};

use anyhow::{Context as _, Result};
use ckpt_user::{
    lease::snapshot::{self, LeaseSidecar, LeaseSnapshot, SIDECAR, SIDECAR_FORMAT},
    lock::kernel,
    sys::{hz::kernel_hz, monotonic_ns},
    tracer::{
        history::History,
        iters::{Iters, Prog},
        pins::{PinDir, DEFAULT_PIN_DIR},
    },
};
use images::{FileLockEntry, FILE_LOCKS_MAGIC};
use nix::{
    fcntl::{openat, renameat, OFlag},
    sys::stat::Mode,
    unistd::unlinkat,
};

/// CRIU 3.17's `cr_plugin_desc_t` (criu/include/criu-plugin.h): CRIU refuses, and
/// then fails the whole run, a plugin whose version or hook count exceeds its own
/// (0x200 and 10 in 3.17.1; later CRIUs have more hooks and accept 10).
#[repr(C)]
pub struct PluginDesc {
    name: *const c_char,
    init: Option<extern "C" fn(c_int) -> c_int>,
    exit: Option<extern "C" fn(c_int, c_int)>,
    version: c_uint,
    max_hooks: c_uint,
    hooks: [*const c_void; HOOKS],
}

// SAFETY: CRIU only reads the descriptor; its pointers are to a static string and
// to functions.
unsafe impl Sync for PluginDesc {}

const HOOKS: usize = 10;
const CRIU_PLUGIN_VERSION: c_uint = 0x200;
const STAGE_DUMP: c_int = 0;

/// What CRIU looks up in every plugin it loads.
#[no_mangle]
pub static CR_PLUGIN_DESC: PluginDesc = PluginDesc {
    name: c"ckpt".as_ptr(),
    init: Some(init),
    exit: Some(exit),
    version: CRIU_PLUGIN_VERSION,
    max_hooks: HOOKS as c_uint,
    hooks: [std::ptr::null(); HOOKS],
};

/// Always succeeds: an error here would abort CRIU's run.
extern "C" fn init(_stage: c_int) -> c_int {
    0
}

extern "C" fn exit(stage: c_int, ret: c_int) {
    if stage != STAGE_DUMP || ret != 0 {
        return;
    }
    // A panic must not unwind into CRIU (nor abort it).
    let done = std::panic::catch_unwind(|| {
        let Some(dir) = image_dir() else {
            return Ok(());
        };
        after_dump(dir)
    });
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("ckpt CRIU plugin: {e:#}"),
        Err(_) => eprintln!("ckpt CRIU plugin: internal error (panic); no {SIDECAR} written"),
    }
}

/// CRIU's image directory, from `criu_get_image_dir()` (looked up at run time: this
/// library is also linked by tests, outside CRIU); None outside CRIU.
fn image_dir() -> Option<RawFd> {
    // SAFETY: dlsym with a NUL-terminated name; the symbol, when CRIU exports it, is
    // `int criu_get_image_dir(void)`.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"criu_get_image_dir".as_ptr()) };
    if f.is_null() {
        return None;
    }
    // SAFETY: see above.
    let get: extern "C" fn() -> c_int = unsafe { std::mem::transmute(f) };
    let fd = get();
    (fd >= 0).then_some(fd)
}

fn after_dump(dir: RawFd) -> Result<()> {
    let locks: Vec<FileLockEntry> = images::records(
        read_image(dir, "filelocks.img")?.as_deref(),
        FILE_LOCKS_MAGIC,
    )
    .context("reading CRIU's filelocks.img")?;
    let leases: Vec<&FileLockEntry> = locks.iter().filter(|e| e.is_lease()).collect();
    if leases.is_empty() {
        return Ok(());
    }
    let taken = monotonic_ns();
    let mut sidecar = LeaseSidecar {
        format: SIDECAR_FORMAT.into(),
        version: 1,
        taken_monotonic_ns: taken,
        leases: Vec::new(),
        errors: Vec::new(),
    };
    // The agent's records of the breaks, when one runs (history only: without it
    // every kernel fact is still there).
    let pins = PinDir::new(std::env::var_os("CKPT_PIN_DIR").unwrap_or(DEFAULT_PIN_DIR.into()));
    let history = History::read(&pins).unwrap_or_else(|e| {
        sidecar.errors.push(format!(
            "ckpt-agent's records cannot be read ({e:#}): no break starts or breakers"
        ));
        None
    });
    match read_leases(&pins, &leases, taken, history.as_ref()) {
        Ok((found, missing)) => {
            sidecar.leases = found;
            sidecar.errors.extend(missing);
        }
        Err(e) => sidecar.errors.push(format!("{e:#}")),
    }
    for e in &sidecar.errors {
        eprintln!("ckpt CRIU plugin: {e}");
    }
    write_sidecar(dir, &sidecar)
}

/// The kernel's view of each lease CRIU recorded, matched by process and fd; the
/// ones it does not show, as errors.
fn read_leases(
    pins: &PinDir,
    recorded: &[&FileLockEntry],
    now_ns: u64,
    history: Option<&History>,
) -> Result<(Vec<LeaseSnapshot>, Vec<String>)> {
    let iters =
        Iters::open(pins, &[Prog::LockTable]).context("loading ckpt's lock-table iterator")?;
    let hz = kernel_hz()?;
    let mut pids: Vec<i32> = recorded.iter().map(|e| e.pid).collect();
    pids.sort_unstable();
    pids.dedup();
    let mut held = Vec::new();
    for pid in pids.into_iter().filter(|&p| p > 0) {
        let table = kernel::read_process(&iters, pid as u32)
            .with_context(|| format!("reading the leases of process {pid}"))?;
        held.extend(snapshot::of_process(
            &table, pid as u32, now_ns, hz, history,
        ));
    }
    Ok(matched(recorded, held, |e| {
        std::fs::read_to_string(format!("/proc/{}/fdinfo/{}", e.pid, e.fd)).ok()
    }))
}

/// Why a lease CRIU recorded is not in the kernel's lists at its process and fd,
/// from that fd's fdinfo (None: no such fd).
fn missing_reason(e: &FileLockEntry, fdinfo: Option<&str>) -> String {
    let at = format!("fd {} of process {}", e.fd, e.pid);
    match fdinfo {
        Some(t) if !t.contains("LEASE") => format!(
            "the lease CRIU recorded on {at} is gone: the kernel revoked or released it during the dump (CRIU's default --file-validation opens each file, which waits out a lease break: use --file-validation filesize)"
        ),
        _ => format!(
            "CRIU recorded a lease on {at} that the kernel's lists do not show there (a tree in its own pid namespace is not handled yet)"
        ),
    }
}

/// Pairs each recorded lease with the kernel's on the same process and fd, or else
/// the process's one lease not yet paired (a description with several fds is shown
/// through one of them).
fn matched(
    recorded: &[&FileLockEntry],
    mut held: Vec<LeaseSnapshot>,
    fdinfo: impl Fn(&FileLockEntry) -> Option<String>,
) -> (Vec<LeaseSnapshot>, Vec<String>) {
    let (mut found, mut missing) = (Vec::new(), Vec::new());
    for e in recorded {
        let same_pid = |s: &LeaseSnapshot| s.pid as i32 == e.pid;
        let at = held
            .iter()
            .position(|s| same_pid(s) && s.fd == Some(e.fd))
            .or_else(|| held.iter().position(same_pid));
        match at {
            Some(i) => found.push(held.remove(i)),
            None => missing.push(missing_reason(e, fdinfo(e).as_deref())),
        }
    }
    (found, missing)
}

/// An image of CRIU's, or None when it has none of that name.
fn read_image(dir: RawFd, name: &str) -> Result<Option<Vec<u8>>> {
    let fd = match openat(
        Some(dir),
        name,
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {name}")),
    };
    // SAFETY: a new fd of our own.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).with_context(|| format!("reading {name}"))?;
    Ok(Some(bytes))
}

/// Written under a temporary name and renamed: the sidecar is whole or absent.
fn write_sidecar(dir: RawFd, sidecar: &LeaseSidecar) -> Result<()> {
    let tmp = format!(".{SIDECAR}.tmp");
    let fd = openat(
        Some(dir),
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o600),
    )
    .with_context(|| format!("creating {tmp} in CRIU's image directory"))?;
    // SAFETY: a new fd of our own.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let written = (|| -> Result<()> {
        serde_json::to_writer_pretty(&mut file, sidecar)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        renameat(Some(dir), tmp.as_str(), Some(dir), SIDECAR)?;
        Ok(())
    })();
    if written.is_err() {
        let _ = unlinkat(
            Some(dir),
            tmp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
    written.with_context(|| format!("writing {SIDECAR}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(pid: u32, fd: i32) -> LeaseSnapshot {
        LeaseSnapshot {
            pid,
            fd: Some(fd),
            path: None,
            lock_type: None,
            breaking: false,
            target_type: None,
            remaining_ns: None,
            deadline_jiffies: None,
            downgrade_remaining_ns: None,
            break_started_monotonic_ns: None,
            lease_break_time_s: None,
            notified: None,
            signal: None,
            breakers: Vec::new(),
        }
    }

    fn entry(pid: i32, fd: i32) -> FileLockEntry {
        FileLockEntry {
            flag: FileLockEntry::FL_LEASE,
            r#type: 1,
            pid,
            fd,
            start: 0,
            len: 0,
        }
    }

    #[test]
    fn each_recorded_lease_is_paired_once_or_reported() {
        let (a, b, c) = (entry(10, 4), entry(10, 9), entry(11, 3));
        let (found, missing) = matched(&[&a, &b, &c], vec![snap(10, 3), snap(10, 4)], |_| None);
        // fd 4 by its fd, fd 9 by the process's other lease (shown through fd 3).
        assert_eq!(
            found.iter().map(|s| (s.pid, s.fd)).collect::<Vec<_>>(),
            vec![(10, Some(4)), (10, Some(3))]
        );
        assert_eq!(missing.len(), 1);
        assert!(missing[0].contains("process 11"), "{}", missing[0]);
        assert!(missing[0].contains("pid namespace"), "{}", missing[0]);
        // Its fd is there without a lease: revoked during the dump.
        let (_, missing) = matched(&[&c], Vec::new(), |_| Some("pos:\t0\nflags:\t02\n".into()));
        assert!(
            missing[0].contains("--file-validation filesize"),
            "{}",
            missing[0]
        );
    }

    #[test]
    fn the_descriptor_is_what_criu_3_17_accepts() {
        assert_eq!(std::mem::size_of::<PluginDesc>(), 112);
        assert_eq!(CR_PLUGIN_DESC.version, 0x200);
        assert_eq!(CR_PLUGIN_DESC.max_hooks, 10);
        assert_eq!(init(0), 0);
        // Outside CRIU, exit finds no image directory and does nothing.
        exit(STAGE_DUMP, 0);
    }
}
