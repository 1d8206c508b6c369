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
    io::Read as _,
    os::{
        fd::{AsRawFd as _, OwnedFd, RawFd},
        unix::fs::FileExt as _,
    },
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use nix::fcntl::{Flock, FlockArg};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{
    kernel_deadline::{SeenBreak, Tracer},
    schedule::{downgrade_first, due, plan_breaks, remaining_after_restore, Break, LeaseTime},
};
use crate::{
    fd::owners::Owners,
    image::format::{Image, LockType},
    plan::{lease_type_to_set, Plan},
    sys::monotonic_ns,
    sys::{fown, realtime::Fifo},
    tracer::pins::PinDir,
};

const SYSCTL: &str = "/proc/sys/fs/lease-break-time";
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
    SysctlFiles::default().read()
}

/// fs.lease-break-time and the lock file restores take turns through; the lock file
/// also holds what a restore that dies may have left in the sysctl (see [`Record`]).
#[derive(Clone, Debug)]
pub struct SysctlFiles {
    pub sysctl: PathBuf,
    pub lock: PathBuf,
}

/// Overrides [`LOCK_FILE`]: tests that plant a killed restore's record use a private
/// one, so that no concurrent ckpt command repairs it first.
pub const LOCK_ENV: &str = "CKPT_LEASE_BREAK_TIME_LOCK";

impl Default for SysctlFiles {
    fn default() -> Self {
        SysctlFiles {
            sysctl: SYSCTL.into(),
            lock: std::env::var_os(LOCK_ENV)
                .filter(|v| !v.is_empty())
                .map_or_else(|| LOCK_FILE.into(), PathBuf::from),
        }
    }
}

impl SysctlFiles {
    fn read(&self) -> Result<u32> {
        let name = self.sysctl.display();
        std::fs::read_to_string(&self.sysctl)
            .with_context(|| format!("reading {name}"))?
            .trim()
            .parse()
            .map_err(|_| anyhow!("{name}: not a number"))
    }

    fn write(&self, v: u32) -> Result<()> {
        std::fs::write(&self.sysctl, v.to_string())
            .with_context(|| format!("writing {}", self.sysctl.display()))
    }
}

/// What the lock file says while a restore may have changed the sysctl: the host's
/// value, and the (at most two) values the restore may have left in it — the one it
/// set last and the one it is about to set. Written, one fixed-size `pwrite`, before
/// every change, so it is never behind the sysctl; a restore killed between the two
/// leaves a record naming a value the sysctl does not hold, which repairs nothing and
/// warns about nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub host: u32,
    pub ours: [u32; 2],
}

impl Record {
    /// Fixed width: a rewrite replaces every byte of the previous record.
    fn encode(&self) -> String {
        format!(
            "{:>10} {:>10} {:>10}\n",
            self.host, self.ours[0], self.ours[1]
        )
    }

    fn decode(text: &str) -> Option<Record> {
        let v: Vec<u32> = text
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        match v[..] {
            [host, a, b] => Some(Record { host, ours: [a, b] }),
            // ckpt-user before issue 16 saved the bare host value, whatever the sysctl
            // then held: it cannot tell a change of ours from the host's own setting.
            _ => None,
        }
    }

    /// What to do, given the sysctl now: put the host's value back only if the sysctl
    /// still holds a value a restore set; a value someone set since is theirs.
    pub fn repair(&self, now: u32) -> Option<u32> {
        (now != self.host && self.ours.contains(&now)).then_some(self.host)
    }
}

/// Puts back what a killed restore left in fs.lease-break-time, unless a restore holds
/// the lock now (then it is that restore's business). Run by every ckpt-user command
/// and by ckpt-agent at start; quiet when there is nothing to do or no permission.
/// Returns the warning to print.
pub fn repair_lease_break_time() -> Option<String> {
    repair_with(&SysctlFiles::default())
}

pub fn repair_with(files: &SysctlFiles) -> Option<String> {
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&files.lock)
        .ok()?;
    // EWOULDBLOCK: a restore holds it.
    let Ok(lock) = Flock::lock(lock, FlockArg::LockExclusiveNonblock) else {
        return None;
    };
    repair_locked(files, &lock).ok().flatten()
}

/// The repair, with the lock held.
fn repair_locked(files: &SysctlFiles, lock: &File) -> Result<Option<String>> {
    let mut text = String::new();
    lock.take(256).read_to_string(&mut text)?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    let mut warning = None;
    if let Some(rec) = Record::decode(&text) {
        let now = files.read()?;
        if let Some(host) = rec.repair(now) {
            files.write(host)?;
            warning = Some(format!(
                "a restore was killed while it had set {} to {now}; set it back to {host}",
                files.sysctl.display()
            ));
        }
    }
    lock.set_len(0)?;
    Ok(warning)
}

/// Exclusive use of fs.lease-break-time; puts the host's value back on drop.
pub struct Sysctl {
    files: SysctlFiles,
    lock: Flock<File>,
    /// The host's value (after any repair).
    pub host: u32,
    /// What we set last.
    last: u32,
}

impl Sysctl {
    /// Waits for any other restore's turn to end; repairs what a killed one left.
    pub fn acquire(files: SysctlFiles, warnings: &mut Vec<String>) -> Result<Sysctl> {
        if let Some(dir) = files.lock.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let name = files.lock.display().to_string();
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&files.lock)
            .with_context(|| format!("opening {name}"))?;
        let lock = Flock::lock(lock, FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow!("locking {name}: {e}"))?;
        warnings.extend(repair_locked(&files, &lock)?);
        let host = files.read()?;
        Ok(Sysctl {
            files,
            lock,
            host,
            last: host,
        })
    }

    fn record(&self, rec: Option<Record>) -> Result<()> {
        match rec {
            // One write of the whole record at offset 0 (33 bytes, within one page):
            // a kill lands before or after it, never inside.
            Some(r) => self.lock.write_all_at(r.encode().as_bytes(), 0)?,
            None => self.lock.set_len(0)?,
        }
        Ok(())
    }

    fn set(&mut self, secs: u32) -> Result<()> {
        self.record(Some(Record {
            host: self.host,
            ours: [self.last, secs],
        }))?;
        self.files.write(secs)?;
        self.last = secs;
        Ok(())
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if self.last == self.host || self.files.write(self.host).is_ok() {
            let _ = self.record(None);
        }
    }
}

/// What happened to one lease, for the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Broken to unlock while it was being downgraded: the downgrade's deadline too,
    /// counted from the release as planned, and its CLOCK_MONOTONIC (null when it
    /// comes after the unlock, which makes it moot, or was not recorded).
    #[serde(default)]
    pub downgrade_remaining_ns: Option<u64>,
    #[serde(default)]
    pub downgrade_deadline_monotonic_ns: Option<u64>,
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
        // SAFETY: closing the fd open(2) just gave us.
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
/// `ours_since`: when this restore first broke the lease (a downgrade, then an unlock
/// is one break of ours).
fn deadline_of(
    path: &str,
    timed: Timed,
    ours_since: u64,
    seen: Option<Result<SeenBreak>>,
    warnings: &mut Vec<String>,
) -> (u64, DeadlineSource) {
    let half_tick = timed.tick.as_nanos() as u64 / 2;
    let window = timed.after - timed.before;
    let from_timing =
        timed.before + window / 2 + u64::from(timed.sysctl_s) * 1_000_000_000 + half_tick;
    match seen {
        Some(Ok(seen)) => {
            if seen.started_ns.is_some_and(|s| s < ours_since) {
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
            downgrade_remaining_ns: None,
            downgrade_deadline_monotonic_ns: None,
        })
        .collect();

    // Taken before anything is computed from the sysctl: the host's value is read
    // under the lock, after any repair, never another restore's momentary value or a
    // killed one's leftover.
    let sysctl = if image.leases.iter().any(|l| l.breaking) {
        Some(Sysctl::acquire(SysctlFiles::default(), warnings)?)
    } else {
        None
    };
    let current = match &sysctl {
        Some(s) => s.host,
        None => current_break_time()?,
    };
    let mut remaining = Vec::new();
    for (i, l) in image.leases.iter().enumerate().filter(|(_, l)| l.breaking) {
        let r = remaining_after_restore(l, policy, current)
            .map_err(|e| anyhow!("lease on {}: {e}", image.files[l.file as usize].path))?;
        remaining.push((i, due(l.target_type, r)));
    }
    let hz = crate::sys::hz::kernel_hz()?;
    let mut leases: Vec<Rebreak> = image
        .leases
        .iter()
        .zip(&taker)
        .map(|(l, &holder)| {
            let file = &image.files[l.file as usize];
            Rebreak {
                fd: files[&l.file].as_raw_fd(),
                path: file.path.clone(),
                target: l.target_type,
                notified: l.notified,
                owner: owners.of(file),
                holder,
                downgrade_of: None,
            }
        })
        .collect();
    // Being downgraded when a writer broke it to unlock: the downgrade deadline is
    // restored too.
    for (i, unlock) in remaining.clone() {
        let l = &image.leases[i];
        if l.target_type.is_none() {
            let d = downgrade_first(
                l.downgrade_remaining_ns,
                unlock,
                l.lease_break_time_s,
                policy,
                current,
            );
            add_downgrade(&mut leases, &mut remaining, i, d);
        }
    }

    // Revoked at once (only an unlock is: see `due`): the break ends as the holder
    // would end it, through the same description (a lease-break-time of 0 would mean
    // "never time out").
    let now_ones: Vec<usize> = remaining
        .iter()
        .filter(|(_, r)| r.is_zero())
        .map(|(i, _)| *i)
        .collect();
    for &i in &now_ones {
        fcntl(leases[i].fd, libc::F_SETLEASE, libc::F_UNLCK.into())
            .map_err(|e| leases[i].describe(anyhow!("revoking it: {e}")))?;
        reports[i].remaining_ns = Some(0);
    }

    let go = match sysctl {
        Some(sysctl) => Schedule::new(&leases, &remaining, pins, hz).run(
            sysctl,
            &mut reports,
            cancel,
            warnings,
            |_, _, _| {},
        )?,
        None => monotonic_ns(),
    };
    let reports = reports
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !now_ones.contains(i))
        .map(|(_, r)| r)
        .collect();
    Ok((go, reports))
}

/// One lease to break again, on the description that holds it.
#[derive(Clone)]
pub struct Rebreak {
    /// An fd of ours on the lease's description.
    pub fd: RawFd,
    pub path: String,
    /// What the break makes it: read (a downgrade) or None (removed).
    pub target: Option<LockType>,
    /// The holder had been sent its break signal before the checkpoint: this break
    /// sends none.
    pub notified: bool,
    /// The description's signal owner, put back after a break made without one.
    pub owner: Option<(i32, i32)>,
    /// The process holding it (where the kernel's deadline is read back).
    pub holder: u32,
    /// This break is the downgrade of lease `i` of the same list, made before that
    /// lease's break to unlock (the kernel keeps both deadlines), and reported with it.
    pub downgrade_of: Option<usize>,
}

impl Rebreak {
    /// The break for reading that restores lease `index`'s downgrade deadline.
    pub fn downgrade(&self, index: usize) -> Rebreak {
        Rebreak {
            target: Some(LockType::Read),
            downgrade_of: Some(index),
            ..self.clone()
        }
    }

    fn describe(&self, e: anyhow::Error) -> anyhow::Error {
        anyhow!("lease on {}: {e:#}", self.path)
    }

    /// Starts the break. A holder that had been sent its break signal is not sent it
    /// again: the break is made with no signal owner, then the owner is put back.
    fn start(&self) -> Result<()> {
        if !self.notified {
            return start_break(self.fd, self.target);
        }
        fown::set_owner(self.fd, None)?;
        let r = start_break(self.fd, self.target);
        fown::set_owner(self.fd, self.owner)?;
        r
    }
}

/// Adds the break that restores lease `of`'s downgrade deadline (`downgrade`: from
/// `schedule::downgrade_first`) to `leases` and `remaining`.
pub fn add_downgrade(
    leases: &mut Vec<Rebreak>,
    remaining: &mut Vec<(usize, Duration)>,
    of: usize,
    downgrade: Option<Duration>,
) {
    if let Some(d) = downgrade {
        remaining.push((leases.len(), d));
        let b = leases[of].downgrade(of);
        leases.push(b);
    }
}

fn tick_of(hz: u32) -> Duration {
    Duration::from_nanos(1_000_000_000 / u64::from(hz.max(1)))
}

/// The breaks of some leases, planned (`plan_breaks`), and where the kernel's
/// deadlines are read back.
pub struct Schedule<'a> {
    leases: &'a [Rebreak],
    breaks: Vec<Break>,
    /// None: timed from the syscall.
    tracer: Option<Tracer>,
    /// The kernel's tick rate: deadlines are in jiffies.
    hz: u32,
}

impl<'a> Schedule<'a> {
    /// Plans the breaks of `leases` (`remaining`: time from the release to each one's
    /// deadline, by index; a zero is not broken here). The lock-table iterator, read
    /// back through ckpt-agent's pins when it pinned them, is opened only if there is
    /// something to break.
    pub fn new(
        leases: &'a [Rebreak],
        remaining: &[(usize, Duration)],
        pins: &PinDir,
        hz: u32,
    ) -> Schedule<'a> {
        let first: Vec<(usize, usize)> = leases
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.downgrade_of.map(|of| (i, of)))
            .collect();
        let breaks = plan_breaks(remaining, &first, tick_of(hz));
        let tracer = if breaks.is_empty() {
            None
        } else {
            Tracer::open(pins, hz)
        };
        Schedule {
            leases,
            breaks,
            tracer,
            hz,
        }
    }
    /// Makes the breaks on their schedule, with `sysctl` held, and returns the release
    /// instant they were timed for (fixed by the first break's deadline), once it has
    /// come. `reports` is indexed like `leases` (a downgrade's break reports into the
    /// lease it is the downgrade of). `before_release` runs between the
    /// last break and that instant, with it, the reports and the warnings (work that
    /// must not delay the release).
    pub fn run(
        &self,
        mut sysctl: Sysctl,
        reports: &mut [LeaseReport],
        cancel: &AtomicBool,
        warnings: &mut Vec<String>,
        before_release: impl FnOnce(u64, &[LeaseReport], &[String]),
    ) -> Result<u64> {
        let Some(first) = self.breaks.first() else {
            return Ok(monotonic_ns());
        };
        // No ordinary task gets between a clock reading and the break it times.
        let fifo = Fifo::enter();
        let mut go = monotonic_ns() + 20_000_000 + first.lead.as_nanos() as u64;
        // When this restore first broke each description.
        let mut ours_since: BTreeMap<RawFd, u64> = BTreeMap::new();
        for (n, b) in self.breaks.iter().enumerate() {
            let l = &self.leases[b.index];
            let ino = nix::sys::stat::fstat(l.fd)?.st_ino;
            sleep_until(go.saturating_sub(b.lead.as_nanos() as u64), cancel)?;
            sysctl.set(b.sysctl_s)?;
            let before = monotonic_ns();
            l.start().map_err(|e| l.describe(e))?;
            let after = monotonic_ns();
            let timed = Timed {
                before,
                after,
                sysctl_s: b.sysctl_s,
                tick: tick_of(self.hz),
            };
            let seen = self
                .tracer
                .as_ref()
                .map(|t| t.seen_break(ino, l.holder, TRACER_WAIT));
            let since = *ours_since.entry(l.fd).or_insert(before);
            let (deadline, source) = deadline_of(&l.path, timed, since, seen, warnings);
            if n == 0 {
                // The first break fixes the release instant; the others aim at it.
                go = deadline - b.remaining.as_nanos() as u64;
            }
            match l.downgrade_of {
                Some(of) => {
                    let r = &mut reports[of];
                    r.downgrade_remaining_ns = Some(deadline.saturating_sub(go));
                    r.downgrade_deadline_monotonic_ns = Some(deadline);
                }
                None => {
                    let r = &mut reports[b.index];
                    r.remaining_ns = Some(deadline.saturating_sub(go));
                    r.deadline_monotonic_ns = Some(deadline);
                    r.deadline_source = Some(source);
                    r.lease_break_time_s = Some(b.sysctl_s);
                }
            }
        }
        drop(sysctl);
        before_release(go, reports, warnings);
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

    fn files(name: &str, now: u32) -> SysctlFiles {
        let d = std::env::temp_dir().join(format!("ckpt-sysctl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let f = SysctlFiles {
            sysctl: d.join("lease-break-time"),
            lock: d.join("run/lease-break-time.lock"),
        };
        f.write(now).unwrap();
        f
    }

    impl Sysctl {
        /// As SIGKILL would: the lock is released (its fd closed), nothing else runs.
        fn die(self) {
            let me = std::mem::ManuallyDrop::new(self);
            // SAFETY: `me` is never used or dropped again; only its lock is dropped.
            drop(unsafe { std::ptr::read(&me.lock) });
        }
    }

    fn recorded(f: &SysctlFiles) -> String {
        std::fs::read_to_string(&f.lock).unwrap_or_default()
    }

    #[test]
    fn a_killed_restore_is_repaired_by_the_next_command() {
        let f = files("killed", 45);
        let mut w = Vec::new();
        let mut s = Sysctl::acquire(f.clone(), &mut w).unwrap();
        s.set(46).unwrap();
        s.set(7).unwrap();
        s.die();
        assert_eq!(f.read().unwrap(), 7);
        let said = repair_with(&f).expect("repaired");
        assert!(said.contains("set it back to 45"), "{said}");
        assert_eq!(f.read().unwrap(), 45);
        assert!(recorded(&f).is_empty());
        assert!(w.is_empty());
        assert_eq!(repair_with(&f), None, "once");
    }

    #[test]
    fn no_warning_when_killed_before_the_change_and_no_stale_value() {
        // Killed between writing the record and writing the sysctl.
        let f = files("early", 45);
        let s = Sysctl::acquire(f.clone(), &mut Vec::new()).unwrap();
        s.record(Some(Record {
            host: 45,
            ours: [45, 46],
        }))
        .unwrap();
        s.die();
        assert_eq!(repair_with(&f), None);
        assert_eq!(f.read().unwrap(), 45);
        assert!(recorded(&f).is_empty());
        // The host's value changed since (an admin, a test): the record is stale.
        let s = Sysctl::acquire(f.clone(), &mut Vec::new()).unwrap();
        s.record(Some(Record {
            host: 45,
            ours: [45, 46],
        }))
        .unwrap();
        s.die();
        f.write(5).unwrap();
        let mut w = Vec::new();
        let s = Sysctl::acquire(f.clone(), &mut w).unwrap();
        assert_eq!(s.host, 5, "the host's setting, not the stale 45");
        assert!(w.is_empty(), "{w:?}");
        drop(s);
        assert_eq!(f.read().unwrap(), 5);
    }

    #[test]
    fn never_repaired_while_a_restore_holds_the_lock() {
        let f = files("held", 45);
        let mut s = Sysctl::acquire(f.clone(), &mut Vec::new()).unwrap();
        s.set(9).unwrap();
        assert_eq!(repair_with(&f), None);
        assert_eq!(f.read().unwrap(), 9);
        drop(s);
        assert_eq!(f.read().unwrap(), 45);
        assert!(recorded(&f).is_empty());
    }

    #[test]
    fn records_are_fixed_width_and_old_ones_are_ignored() {
        let r = Record {
            host: 45,
            ours: [7, 4_000_000_000],
        };
        assert_eq!(
            r.encode().len(),
            Record {
                host: 1,
                ours: [1, 1]
            }
            .encode()
            .len()
        );
        assert_eq!(Record::decode(&r.encode()), Some(r));
        assert_eq!(Record::decode("45"), None);
        assert_eq!(r.repair(7), Some(45));
        assert_eq!(r.repair(45), None);
        assert_eq!(r.repair(30), None);
    }

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
        let (d, src) = deadline_of(
            "f",
            timed(1_000, 1_600_001_000),
            1_000,
            Some(Ok(seen)),
            &mut w,
        );
        assert_eq!((d, src), (3_002_001_000, DeadlineSource::Tracer));
        assert!(w.is_empty(), "{w:?}");
        // Without it, the middle of the call, and a warning that says so.
        let (d, src) = deadline_of("f", timed(1_000, 1_600_001_000), 1_000, None, &mut w);
        assert_eq!((d, src), (3_802_001_000, DeadlineSource::SyscallTiming));
        assert!(w[0].contains("took 1600.0 ms"), "{w:?}");
    }

    #[test]
    fn a_quick_syscall_needs_no_warning_and_a_foreign_break_gets_one() {
        let mut w = Vec::new();
        let (d, _) = deadline_of("f", timed(1_000, 21_000), 1_000, None, &mut w);
        assert_eq!(d, 11_000 + 3_000_000_000 + 2_000_000);
        assert!(w.is_empty());
        let seen = SeenBreak {
            deadline_ns: 2_500_000_000,
            started_ns: Some(500),
            breakers: vec![42],
        };
        let (d, _) = deadline_of(
            "f",
            timed(1_000, 21_000),
            1_000,
            Some(Ok(seen.clone())),
            &mut w,
        );
        assert_eq!(d, 2_502_000_000);
        assert!(
            w[0].contains("already being broken (by pids [42])"),
            "{w:?}"
        );
        // Our own downgrade at 400, then our break to unlock: no warning.
        let mut quiet = Vec::new();
        deadline_of("f", timed(1_000, 21_000), 400, Some(Ok(seen)), &mut quiet);
        assert!(quiet.is_empty(), "{quiet:?}");
        let (_, src) = deadline_of(
            "f",
            timed(1_000, 21_000),
            1_000,
            Some(Err(anyhow!("slow"))),
            &mut w,
        );
        assert_eq!(src, DeadlineSource::SyscallTiming);
        assert!(w[1].starts_with("lease on f: slow;"), "{w:?}");
    }
}
