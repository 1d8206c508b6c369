//! Leases that were being broken, broken again so that the kernel revokes each at the
//! instant the policy asks, counted from the release of the restored processes (see
//! `schedule`). Also puts back every description's signal owner (F_SETOWN_EX) and
//! break signal (F_SETSIG), which setting a lease overwrote.
//!
//! fs.lease-break-time is global: it is changed only for the instant of each break,
//! restored right after, and concurrent restores take turns through a lock file that
//! also remembers the value, so a restore killed in between is repaired by the next.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::CString,
    fs::File,
    io::{Read as _, Seek as _, Write as _},
    os::fd::{AsRawFd as _, OwnedFd, RawFd},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::Serialize;

use super::{
    plan::{lease_type_to_set, Plan},
    schedule::{plan_breaks, remaining_after_restore, LeaseTime},
};
use crate::image::format::{Image, LockType, OpenFile};

const SYSCTL: &str = "/proc/sys/fs/lease-break-time";
const LOCK_DIR: &str = "/run/ckpt";
const LOCK_FILE: &str = "/run/ckpt/lease-break-time.lock";

pub fn mono_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall into a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps until CLOCK_MONOTONIC reaches `at` (the last stretch spinning, for precision).
pub fn sleep_until(at: u64, cancel: &AtomicBool) -> Result<()> {
    loop {
        if cancel.load(Ordering::Relaxed) {
            bail!("interrupted; the restored processes were killed");
        }
        let now = mono_ns();
        if now >= at {
            return Ok(());
        }
        let left = at - now;
        if left > 2_000_000 {
            std::thread::sleep(Duration::from_nanos((left - 1_500_000).min(50_000_000)));
        } else {
            std::hint::spin_loop();
        }
    }
}

pub fn current_break_time() -> Result<u32> {
    std::fs::read_to_string(SYSCTL)
        .with_context(|| format!("reading {SYSCTL}"))?
        .trim()
        .parse()
        .map_err(|_| anyhow!("{SYSCTL}: not a number"))
}

/// Exclusive use of fs.lease-break-time; puts the old value back on drop.
struct Sysctl {
    lock: File,
    old: u32,
}

impl Sysctl {
    fn acquire(warnings: &mut Vec<String>) -> Result<Sysctl> {
        std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
        let mut lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(LOCK_FILE)
            .with_context(|| format!("opening {LOCK_FILE}"))?;
        // SAFETY: plain flock on our own file; released when it is closed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } < 0 {
            bail!("locking {LOCK_FILE}: {}", std::io::Error::last_os_error());
        }
        let mut saved = String::new();
        lock.read_to_string(&mut saved)?;
        if let Ok(v) = saved.trim().parse::<u32>() {
            std::fs::write(SYSCTL, v.to_string())?;
            warnings.push(format!(
                "an earlier restore was killed while it had changed {SYSCTL}; set it back to {v}"
            ));
        }
        let old = current_break_time()?;
        lock.set_len(0)?;
        lock.rewind()?;
        write!(lock, "{old}")?;
        lock.sync_data()?;
        Ok(Sysctl { lock, old })
    }

    fn set(&self, secs: u32) -> Result<()> {
        std::fs::write(SYSCTL, secs.to_string()).with_context(|| format!("writing {SYSCTL}"))
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if std::fs::write(SYSCTL, self.old.to_string()).is_ok() {
            let _ = self.lock.set_len(0);
        }
    }
}

/// What happened to one lease, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct LeaseReport {
    pub path: String,
    /// The restored process that set it.
    pub pid: u32,
    #[serde(rename = "type")]
    pub lease_type: LockType,
    pub breaking: bool,
    /// While breaking: what it becomes (read = downgrade, null = removed).
    pub target_type: Option<LockType>,
    /// While breaking: the kernel's deadline, counted from the release, as planned.
    pub remaining_ns: Option<u64>,
    /// While breaking: CLOCK_MONOTONIC of the deadline, from the break's own timing.
    pub deadline_monotonic_ns: Option<u64>,
    /// The fs.lease-break-time the break was made with.
    pub lease_break_time_s: Option<u32>,
}

fn fcntl(fd: RawFd, cmd: i32, arg: libc::c_long) -> std::io::Result<i32> {
    // SAFETY: plain fcntl on our own fd.
    let r = unsafe { libc::fcntl(fd, cmd, arg) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// fcntl commands libc does not name.
const F_SETSIG: i32 = 10;
const F_SETOWN_EX: i32 = 15;

#[repr(C)]
struct OwnerEx {
    kind: i32,
    pid: i32,
}

fn set_owner(fd: RawFd, owner: Option<(i32, i32)>) -> std::io::Result<()> {
    let ex = match owner {
        Some((kind, pid)) => OwnerEx { kind, pid },
        None => OwnerEx { kind: 1, pid: 0 },
    };
    // SAFETY: F_SETOWN_EX reads a struct f_owner_ex.
    let r = unsafe { libc::fcntl(fd, F_SETOWN_EX, &ex as *const OwnerEx) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The description's recorded owner, with pids of restored processes translated.
fn owner_now(f: &OpenFile, pids: &HashMap<u32, u32>, pgid: i32) -> Option<(i32, i32)> {
    let (kind, pid) = f.owner?;
    if pid == 0 {
        return None;
    }
    match kind {
        // A process group: the restored processes have one of their own.
        2 => Some((2, pgid)),
        _ => pids.get(&(pid as u32)).map(|&new| (kind, new as i32)),
    }
}

/// Starts a break of the lease on `fd`'s file the way a conflicting open does (without
/// opening anything: O_NONBLOCK makes the open fail once the break has started).
fn start_break(fd: RawFd, target: Option<LockType>) -> Result<()> {
    let path = CString::new(format!("/proc/self/fd/{fd}")).unwrap();
    let mode = if target == Some(LockType::Read) {
        libc::O_RDONLY
    } else {
        libc::O_WRONLY
    };
    // SAFETY: plain syscall.
    let r = unsafe { libc::open(path.as_ptr(), mode | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if r >= 0 {
        unsafe { libc::close(r) };
        bail!("the lease was not in place to be broken");
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
        bail!("breaking the lease: {e}");
    }
    Ok(())
}

/// Puts owners and signals back, then breaks every lease that was breaking. Returns
/// the release instant (CLOCK_MONOTONIC) the breaks were timed for, and the reports.
#[allow(clippy::too_many_arguments)]
pub fn restore(
    image: &Image,
    plan: &Plan,
    files: &BTreeMap<u32, OwnedFd>,
    pids: &HashMap<u32, u32>,
    pgid: i32,
    policy: LeaseTime,
    cancel: &AtomicBool,
    warnings: &mut Vec<String>,
) -> Result<(u64, Vec<LeaseReport>)> {
    for &file in plan.files.keys() {
        let f = &image.files[file as usize];
        let fd = files[&file].as_raw_fd();
        if f.sig != 0 {
            fcntl(fd, F_SETSIG, f.sig as libc::c_long)
                .with_context(|| format!("F_SETSIG on {}", f.path))?;
        }
        let owner = owner_now(f, pids, pgid);
        if f.owner.is_some_and(|(_, pid)| pid != 0) && owner.is_none() {
            warnings.push(format!(
                "{}: its signal owner {:?} was not restored; it has none now",
                f.path, f.owner
            ));
        }
        let has_lease = image.leases.iter().any(|l| l.file == file);
        if owner.is_some() || has_lease {
            set_owner(fd, owner).with_context(|| format!("F_SETOWN_EX on {}", f.path))?;
        }
    }

    let mut reports: Vec<LeaseReport> = image
        .leases
        .iter()
        .map(|l| {
            let f = &image.files[l.file as usize];
            LeaseReport {
                path: f.path.clone(),
                pid: pids.get(&l.pid).copied().unwrap_or(0),
                lease_type: lease_type_to_set(l),
                breaking: l.breaking,
                target_type: l.target_type.filter(|_| l.breaking),
                remaining_ns: None,
                deadline_monotonic_ns: None,
                lease_break_time_s: None,
            }
        })
        .collect();
    // Fix the report's pid: the lease was set by its taker.
    for p in &plan.procs {
        for op in &p.leases {
            if let Some(&new) = pids.get(&p.old_pid) {
                reports[op.lease].pid = new;
            }
        }
    }

    let breaking: Vec<usize> = (0..image.leases.len())
        .filter(|&i| image.leases[i].breaking)
        .collect();
    if breaking.is_empty() {
        return Ok((mono_ns(), reports));
    }
    let current = current_break_time()?;
    let mut remaining = Vec::new();
    for &i in &breaking {
        let l = &image.leases[i];
        let r = remaining_after_restore(l, policy, current)
            .map_err(|e| anyhow!("lease on {}: {e}", image.files[l.file as usize].path))?;
        remaining.push((i, r));
    }
    let tick = Duration::from_nanos(1_000_000_000 / u64::from(crate::sys::hz::kernel_hz()?));
    let fd_of = |i: usize| files[&image.leases[i].file].as_raw_fd();
    // A holder that had been sent its break signal is not sent it again: the break is
    // made with no signal owner, then the owner is put back.
    let quiet = |i: usize, f: &dyn Fn() -> Result<()>| -> Result<()> {
        let l = &image.leases[i];
        if !l.notified {
            return f();
        }
        let file = &image.files[l.file as usize];
        set_owner(fd_of(i), None)?;
        let r = f();
        set_owner(fd_of(i), owner_now(file, pids, pgid))?;
        r
    };
    let describe = |i: usize, e: anyhow::Error| {
        anyhow!(
            "lease on {}: {e:#}",
            image.files[image.leases[i].file as usize].path
        )
    };

    // Revoked at once: the break ends as the holder would end it, through the same
    // description (a lease-break-time of 0 would mean "never time out").
    let now_ones: Vec<usize> = remaining
        .iter()
        .filter(|(_, r)| r.is_zero())
        .map(|(i, _)| *i)
        .collect();
    for &i in &now_ones {
        let target = match image.leases[i].target_type {
            Some(LockType::Read) => libc::F_RDLCK,
            _ => libc::F_UNLCK,
        };
        fcntl(fd_of(i), libc::F_SETLEASE, target as libc::c_long)
            .map_err(|e| describe(i, anyhow!("revoking it: {e}")))?;
        reports[i].remaining_ns = Some(0);
        // Downgraded: an ordinary read lease now; unlocked: gone.
        reports[i].breaking = false;
        reports[i].lease_type = LockType::Read;
        reports[i].target_type = None;
    }

    let breaks = plan_breaks(&remaining, tick);
    let sysctl = if breaks.is_empty() {
        None
    } else {
        Some(Sysctl::acquire(warnings)?)
    };
    let mut go = mono_ns() + 20_000_000 + breaks.first().map_or(0, |b| b.lead.as_nanos() as u64);
    for (n, b) in breaks.iter().enumerate() {
        let (i, r) = remaining[remaining.iter().position(|(i, _)| *i == b.index).unwrap()];
        sleep_until(go.saturating_sub(b.lead.as_nanos() as u64), cancel)?;
        if let Some(s) = &sysctl {
            s.set(b.sysctl_s)?;
        }
        let t0 = mono_ns();
        quiet(i, &|| start_break(fd_of(i), image.leases[i].target_type))
            .map_err(|e| describe(i, e))?;
        let t1 = mono_ns();
        let broke = t0 + (t1 - t0) / 2;
        let deadline = broke + u64::from(b.sysctl_s) * 1_000_000_000 + tick.as_nanos() as u64 / 2;
        if n == 0 {
            // The first break fixes the release instant; the others aim at it.
            go = deadline - r.as_nanos() as u64;
        }
        reports[i].remaining_ns = Some(deadline.saturating_sub(go));
        reports[i].deadline_monotonic_ns = Some(deadline);
        reports[i].lease_break_time_s = Some(b.sysctl_s);
    }
    drop(sysctl);
    sleep_until(go, cancel)?;
    let gone =
        |i: usize| now_ones.contains(&i) && image.leases[i].target_type != Some(LockType::Read);
    let reports = reports
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !gone(*i))
        .map(|(_, r)| r)
        .collect();
    Ok((go, reports))
}
