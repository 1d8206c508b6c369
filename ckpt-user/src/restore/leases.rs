//! Leases that were being broken, broken again so that the kernel revokes each at the
//! instant the policy asks, counted from the release of the restored processes (see
//! `schedule`).
//!
//! fs.lease-break-time is global: it is changed only for the instant of each break,
//! restored right after, and concurrent restores take turns through a lock file that
//! also remembers the value, so a restore killed in between is repaired by the next.

use std::{
    collections::BTreeMap,
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
    kernel_deadline::{SeenBreak, Tracer},
    owners::Owners,
    plan::{lease_type_to_set, Plan},
    schedule::{plan_breaks, remaining_after_restore, Break, LeaseTime},
};
use crate::{
    image::format::{Image, LockType},
    sys::monotonic_ns,
    sys::{fown, realtime::Fifo},
    tracer::pins::PinDir,
};

const SYSCTL: &str = "/proc/sys/fs/lease-break-time";
const LOCK_DIR: &str = "/run/ckpt";
const LOCK_FILE: &str = "/run/ckpt/lease-break-time.lock";

/// Sleeps until CLOCK_MONOTONIC reaches `at` (the last stretch spinning, for precision).
pub fn sleep_until(at: u64, cancel: &AtomicBool) -> Result<()> {
    loop {
        if cancel.load(Ordering::Relaxed) {
            bail!("interrupted; the restored processes were killed");
        }
        let now = monotonic_ns();
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
    /// While breaking: CLOCK_MONOTONIC of the deadline (see `deadline_source`).
    pub deadline_monotonic_ns: Option<u64>,
    /// While breaking: how `deadline_monotonic_ns` was learnt.
    pub deadline_source: Option<DeadlineSource>,
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

/// How long the kernel may take to show a break (the lease is marked breaking before
/// the breaking call returns, so this is a safety net); the first break leaves
/// `schedule::SLACK` for it before the release.
const TRACER_WAIT: Duration = Duration::from_millis(40);

/// A release this much after its planned instant is reported.
const LATE_NS: u64 = 2_000_000;

/// A break timed from outside: the clock before and after the syscall.
struct Timed {
    before: u64,
    after: u64,
    sysctl_s: u32,
    tick: Duration,
}

/// Where a lease's deadline came from, for the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeadlineSource {
    /// The kernel's deadline, read back from the lease.
    Tracer,
    /// The middle of the breaking syscall plus the sysctl.
    SyscallTiming,
}

/// The CLOCK_MONOTONIC instant the kernel will revoke a lease just broken: the
/// tracer's reading when there is one, else the middle of the syscall. Both carry the
/// half tick by which the kernel is late on average (it revokes at the tick after).
fn deadline_of(
    path: &str,
    timed: Timed,
    seen: Option<Result<SeenBreak>>,
    warnings: &mut Vec<String>,
) -> (u64, DeadlineSource) {
    let half_tick = timed.tick.as_nanos() as u64 / 2;
    let window = timed.after - timed.before;
    let from_timing =
        timed.before + window / 2 + u64::from(timed.sysctl_s) * 1_000_000_000 + half_tick;
    match seen {
        Some(Ok(seen)) => {
            if seen.started_ns.is_some_and(|s| s < timed.before) {
                warnings.push(format!(
                    "lease on {path}: already being broken (by pids {:?}) before the restore broke it; the kernel keeps that break's deadline",
                    seen.breakers
                ));
            }
            (seen.deadline_ns + half_tick, DeadlineSource::Tracer)
        }
        Some(Err(e)) => {
            warnings.push(format!(
                "lease on {path}: {e:#}; its deadline is timed from the syscall ({:.1} ms long)",
                window as f64 / 1e6
            ));
            (from_timing, DeadlineSource::SyscallTiming)
        }
        None => {
            if window > LATE_NS {
                warnings.push(format!(
                    "lease on {path}: breaking it took {:.1} ms, so its deadline may be off by up to half that (as root on Linux 6.1+, ckpt reads the kernel's own)",
                    window as f64 / 1e6
                ));
            }
            (from_timing, DeadlineSource::SyscallTiming)
        }
    }
}

/// How the restored deadlines are chosen, and where the kernel's are read back.
pub struct Deadlines<'a> {
    pub policy: LeaseTime,
    /// ckpt-agent's pins: its lease table is opened only if a lease was breaking.
    pub pins: &'a PinDir,
}

/// Breaks every lease that was breaking (the owners are in place, so the break signal
/// goes where it went before). Returns the release instant (CLOCK_MONOTONIC) the breaks
/// were timed for, and the reports.
pub fn restore(
    image: &Image,
    plan: &Plan,
    files: &BTreeMap<u32, OwnedFd>,
    owners: &Owners,
    Deadlines { policy, pins }: Deadlines,
    cancel: &AtomicBool,
    warnings: &mut Vec<String>,
) -> Result<(u64, Vec<LeaseReport>)> {
    // Each lease was set by its taker (see `plan`).
    let mut taker = vec![0; image.leases.len()];
    for p in &plan.procs {
        for op in &p.leases {
            taker[op.lease] = owners.pids.get(&p.old_pid).copied().unwrap_or(0);
        }
    }
    let mut reports: Vec<LeaseReport> = image
        .leases
        .iter()
        .zip(&taker)
        .map(|(l, &pid)| LeaseReport {
            path: image.files[l.file as usize].path.clone(),
            pid,
            lease_type: lease_type_to_set(l),
            breaking: l.breaking,
            target_type: l.target_type.filter(|_| l.breaking),
            remaining_ns: None,
            deadline_monotonic_ns: None,
            deadline_source: None,
            lease_break_time_s: None,
        })
        .collect();

    let current = current_break_time()?;
    let mut remaining = Vec::new();
    for (i, l) in image.leases.iter().enumerate().filter(|(_, l)| l.breaking) {
        let r = remaining_after_restore(l, policy, current)
            .map_err(|e| anyhow!("lease on {}: {e}", image.files[l.file as usize].path))?;
        remaining.push((i, r));
    }
    let leases = Breaking {
        image,
        files,
        owners,
        taker: &taker,
        hz: crate::sys::hz::kernel_hz()?,
    };

    // Revoked at once: the break ends as the holder would end it, through the same
    // description (a lease-break-time of 0 would mean "never time out").
    let now_ones: Vec<usize> = remaining
        .iter()
        .filter(|(_, r)| r.is_zero())
        .map(|(i, _)| *i)
        .collect();
    for &i in &now_ones {
        let target = image.leases[i]
            .target_type
            .map_or(libc::F_UNLCK, LockType::fcntl_type);
        fcntl(leases.fd(i), libc::F_SETLEASE, target.into())
            .map_err(|e| leases.describe(i, anyhow!("revoking it: {e}")))?;
        reports[i].remaining_ns = Some(0);
        // Downgraded: an ordinary read lease now; unlocked: gone.
        reports[i].breaking = false;
        reports[i].lease_type = LockType::Read;
        reports[i].target_type = None;
    }

    let breaks = plan_breaks(&remaining, leases.tick());
    let go = if breaks.is_empty() {
        monotonic_ns()
    } else {
        leases.on_schedule(&breaks, pins, &mut reports, cancel, warnings)?
    };
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

/// The image's leases on the descriptions ckpt-user opened.
struct Breaking<'a> {
    image: &'a Image,
    files: &'a BTreeMap<u32, OwnedFd>,
    owners: &'a Owners<'a>,
    /// The restored pid that set each lease.
    taker: &'a [u32],
    /// The kernel's tick rate: deadlines are in jiffies.
    hz: u32,
}

impl Breaking<'_> {
    fn tick(&self) -> Duration {
        Duration::from_nanos(1_000_000_000 / u64::from(self.hz.max(1)))
    }

    fn fd(&self, i: usize) -> RawFd {
        self.files[&self.image.leases[i].file].as_raw_fd()
    }

    fn path(&self, i: usize) -> &str {
        &self.image.files[self.image.leases[i].file as usize].path
    }

    fn describe(&self, i: usize, e: anyhow::Error) -> anyhow::Error {
        anyhow!("lease on {}: {e:#}", self.path(i))
    }

    /// Starts the break of lease `i`. A holder that had been sent its break signal is
    /// not sent it again: the break is made with no signal owner, then the owner is put
    /// back.
    fn start(&self, i: usize) -> Result<()> {
        let l = &self.image.leases[i];
        if !l.notified {
            return start_break(self.fd(i), l.target_type);
        }
        let fd = self.fd(i);
        fown::set_owner(fd, None)?;
        let r = start_break(fd, l.target_type);
        fown::set_owner(fd, self.owners.of(&self.image.files[l.file as usize]))?;
        r
    }

    /// Makes `breaks` on their schedule and returns the release instant they were
    /// timed for (fixed by the first break's deadline).
    fn on_schedule(
        &self,
        breaks: &[Break],
        pins: &PinDir,
        reports: &mut [LeaseReport],
        cancel: &AtomicBool,
        warnings: &mut Vec<String>,
    ) -> Result<u64> {
        let tracer = Tracer::open(pins, self.hz);
        let sysctl = Sysctl::acquire(warnings)?;
        // No ordinary task gets between a clock reading and the break it times.
        let fifo = Fifo::enter();
        let mut go = monotonic_ns() + 20_000_000 + breaks[0].lead.as_nanos() as u64;
        for (n, b) in breaks.iter().enumerate() {
            let i = b.index;
            let ino = nix::sys::stat::fstat(self.fd(i))?.st_ino;
            sleep_until(go.saturating_sub(b.lead.as_nanos() as u64), cancel)?;
            sysctl.set(b.sysctl_s)?;
            let before = monotonic_ns();
            self.start(i).map_err(|e| self.describe(i, e))?;
            let after = monotonic_ns();
            let timed = Timed {
                before,
                after,
                sysctl_s: b.sysctl_s,
                tick: self.tick(),
            };
            let seen = tracer
                .as_ref()
                .map(|t| t.seen_break(ino, self.taker[i], TRACER_WAIT));
            let (deadline, source) = deadline_of(self.path(i), timed, seen, warnings);
            if n == 0 {
                // The first break fixes the release instant; the others aim at it.
                go = deadline - b.remaining.as_nanos() as u64;
            }
            reports[i].remaining_ns = Some(deadline.saturating_sub(go));
            reports[i].deadline_monotonic_ns = Some(deadline);
            reports[i].deadline_source = Some(source);
            reports[i].lease_break_time_s = Some(b.sysctl_s);
        }
        drop(sysctl);
        sleep_until(go, cancel)?;
        drop(fifo);
        let late = monotonic_ns().saturating_sub(go);
        if late > LATE_NS {
            warnings.push(format!(
                "the processes were released {:.1} ms after the instant the lease deadlines count from",
                late as f64 / 1e6
            ));
        }
        Ok(go)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(4);

    fn timed(before: u64, after: u64) -> Timed {
        Timed {
            before,
            after,
            sysctl_s: 3,
            tick: TICK,
        }
    }

    #[test]
    fn the_tracer_beats_a_long_syscall() {
        let mut w = Vec::new();
        // Preempted for 1.6 s inside the call; the kernel broke it at its start.
        let seen = SeenBreak {
            deadline_ns: 3_000_000_000 + 1_000,
            started_ns: Some(1_000),
            breakers: vec![],
        };
        let (d, src) = deadline_of("f", timed(1_000, 1_600_001_000), Some(Ok(seen)), &mut w);
        assert_eq!((d, src), (3_002_001_000, DeadlineSource::Tracer));
        assert!(w.is_empty(), "{w:?}");
        // Without it, the middle of the call, and a warning that says so.
        let (d, src) = deadline_of("f", timed(1_000, 1_600_001_000), None, &mut w);
        assert_eq!((d, src), (3_802_001_000, DeadlineSource::SyscallTiming));
        assert!(w[0].contains("took 1600.0 ms"), "{w:?}");
    }

    #[test]
    fn a_quick_syscall_needs_no_warning_and_a_foreign_break_gets_one() {
        let mut w = Vec::new();
        let (d, _) = deadline_of("f", timed(1_000, 21_000), None, &mut w);
        assert_eq!(d, 11_000 + 3_000_000_000 + 2_000_000);
        assert!(w.is_empty());
        let seen = SeenBreak {
            deadline_ns: 2_500_000_000,
            started_ns: Some(500),
            breakers: vec![42],
        };
        let (d, _) = deadline_of("f", timed(1_000, 21_000), Some(Ok(seen)), &mut w);
        assert_eq!(d, 2_502_000_000);
        assert!(
            w[0].contains("already being broken (by pids [42])"),
            "{w:?}"
        );
        let (_, src) = deadline_of(
            "f",
            timed(1_000, 21_000),
            Some(Err(anyhow!("slow"))),
            &mut w,
        );
        assert_eq!(src, DeadlineSource::SyscallTiming);
        assert!(w[1].starts_with("lease on f: slow;"), "{w:?}");
    }
}
