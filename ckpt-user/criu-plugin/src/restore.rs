//! The restore side: a lease that was being broken expires when it would have, not
//! after CRIU's whole lease-break-time again.
//!
//! CRIU 3.17 re-breaks such a lease itself (it sets the lease as it was before the
//! break, then opens the file O_NONBLOCK), and the kernel fixes a break's deadline at
//! the first break, so the plugin must keep CRIU from breaking it:
//! - `before` (restore init, before CRIU reads `filelocks.img`): with a valid
//!   `ckpt-leases.json`, each breaking lease it knows is rewritten as the plain
//!   lease it was before the break (or, when the policy leaves it no time, as what
//!   the break made of it). The dumped file is kept as `ckpt-filelocks.orig.img`.
//! - `at_resume` (the first RESUME_DEVICES_LATE: every process restored, all still
//!   stopped): puts the dumped `filelocks.img` back, checks every lock and lease CRIU
//!   restored against it, and breaks the rewritten leases on ckpt's schedule
//!   (`ckpt_user::lease::restore::Schedule`), returning at the instant the deadlines
//!   count from; CRIU resumes the processes right after. A holder that had been sent
//!   its break signal is not sent it again. Writes `ckpt-restore.json`.
//! - `after` (restore exit): if the restore failed before the processes resumed,
//!   puts the dumped `filelocks.img` back.
//!
//! The policy is `CKPT_LEASE_TIME` (exact, holder, breaker, +N, -N seconds, as
//! `ckpt-user restore --lease-time`; default exact). A lease the sidecar does not
//! know, a missing or corrupt sidecar, or an unknown policy leaves CRIU's own
//! behaviour, and says so. A killed restore leaves `ckpt-filelocks.orig.img`, which
//! the next restore with the plugin puts back first.
//!
//! The break is an open of the holder's own description (through a pidfd_getfd dup)
//! for writing (or reading, for a downgrade), O_NONBLOCK, by CRIU's process: the same
//! open CRIU would make of the file's path.

use std::{
    os::fd::{AsRawFd as _, OwnedFd, RawFd},
    sync::{atomic::AtomicBool, Mutex},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use ckpt_user::{
    fd::fdinfo::{parse_fdinfo, FdInfo},
    lease::{
        restore::{
            add_downgrade, current_break_time, LeaseReport, Rebreak, Schedule, Sysctl, SysctlFiles,
        },
        schedule::{downgrade_first, due, remaining_under, LeaseTime},
        snapshot::{LeaseSidecar, RestoreReport, WaiterSnapshot, REPORT, REPORT_FORMAT, SIDECAR},
    },
    lock::{HeldKind, LockRange, LockType},
    sys::{fown, hz::kernel_hz, monotonic_ns, pidfd},
    tracer::history,
};
use nix::fcntl::renameat;

use crate::{
    has, image_dir,
    images::{self, FileLockEntry, FILE_LOCKS, FILE_LOCKS_MAGIC},
    pins, read_image, say,
    tasks::Tasks,
    write_atomic, Level,
};

/// The dumped `filelocks.img`, while CRIU reads a rewritten one.
pub const ORIGINAL: &str = "ckpt-filelocks.orig.img";
/// The lease time policy.
pub const POLICY_ENV: &str = "CKPT_LEASE_TIME";

/// A lease CRIU restores as not breaking, for the plugin to break at resume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub pid: i32,
    pub fd: i32,
    pub path: String,
    /// Its type before the break (what CRIU sets).
    pub lease_type: LockType,
    /// What the break makes it: read (a downgrade) or None (removed).
    pub target: Option<LockType>,
    pub notified: bool,
    /// From the resume to the kernel's deadline.
    pub remaining: Duration,
    /// Broken to unlock while being downgraded: from the resume to the downgrade
    /// deadline, when it comes first.
    pub downgrade: Option<Duration>,
}

/// What CRIU is to read instead of the dumped `filelocks.img`.
#[derive(Debug, Default, PartialEq)]
pub struct Prepared {
    pub entries: Vec<FileLockEntry>,
    pub pending: Vec<Pending>,
    /// Leases left to CRIU, and why.
    pub notes: Vec<String>,
}

/// Rewrites each breaking lease of `dumped` that `sidecar` knows, under `policy`.
pub fn prepare(
    dumped: &[FileLockEntry],
    sidecar: &LeaseSidecar,
    policy: LeaseTime,
    current_break_time_s: u32,
) -> Prepared {
    let mut out = Prepared::default();
    for e in dumped {
        if !e.is_breaking_lease() {
            out.entries.push(e.clone());
            continue;
        }
        let at = format!("the lease on fd {} of process {}", e.fd, e.pid);
        let known = sidecar.leases.iter().find(|l| {
            l.pid as i32 == e.pid && l.fd == Some(e.fd) && l.breaking && l.lock_type.is_some()
        });
        let planned = match (known, e.lock_type()) {
            (None, _) => Err(format!("{at} is not in {SIDECAR}")),
            (Some(l), Ok(target)) if l.target_type != target => Err(format!(
                "{at} breaks to {} in CRIU's image, to {} in {SIDECAR}",
                type_name(target),
                type_name(l.target_type)
            )),
            (Some(_), Err(t)) => Err(format!("{at} has an unknown type {t}")),
            (Some(l), Ok(target)) => remaining_under(
                l.remaining_ns,
                l.lease_break_time_s,
                policy,
                current_break_time_s,
            )
            .map(|remaining| (l, target, due(target, remaining)))
            .map_err(|err| format!("{at}: {err:#}")),
        };
        match planned {
            Err(why) => {
                out.notes.push(format!(
                    "{why}: CRIU breaks it again with the whole lease-break-time"
                ));
                out.entries.push(e.clone());
            }
            // No time left to unlock: restored as no lease (a downgrade is never due at
            // once: see `due`).
            Ok((_, None, r)) if r.is_zero() => {}
            Ok((l, target, remaining)) => {
                let lease_type = l.lock_type.expect("filtered above");
                let downgrade = target
                    .is_none()
                    .then(|| {
                        downgrade_first(
                            l.downgrade_remaining_ns,
                            remaining,
                            l.lease_break_time_s,
                            policy,
                            current_break_time_s,
                        )
                    })
                    .flatten();
                out.entries.push(FileLockEntry {
                    r#type: FileLockEntry::type_number(Some(lease_type)),
                    ..e.clone()
                });
                out.pending.push(Pending {
                    pid: e.pid,
                    fd: e.fd,
                    path: l.path.clone().unwrap_or_else(|| "?".into()),
                    lease_type,
                    target,
                    // Without the agent's record: the kernel sends the lease signal
                    // when a break starts (lm_break), to the owner F_SETLEASE set.
                    notified: l.notified.unwrap_or(true),
                    remaining,
                    downgrade,
                });
            }
        }
    }
    out
}

fn type_name(t: Option<LockType>) -> &'static str {
    t.map_or("unlock", LockType::name)
}

/// Between restore init and the first resume hook.
struct Restore {
    /// What CRIU was given.
    given: Vec<FileLockEntry>,
    pending: Vec<Pending>,
    notes: Vec<String>,
    policy: LeaseTime,
    /// `filelocks.img` was rewritten (the dumped one is [`ORIGINAL`]).
    rewritten: bool,
    /// The sidecar's waiters: their restarted calls keep their start.
    waiters: Vec<WaiterSnapshot>,
}

static STATE: Mutex<Option<Restore>> = Mutex::new(None);

fn state() -> std::sync::MutexGuard<'static, Option<Restore>> {
    STATE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Restore init.
pub fn before(dir: RawFd) -> Result<()> {
    *state() = None;
    if has(dir, ORIGINAL) {
        put_back(dir)?;
        say(
            Level::Warn,
            &format!("an earlier restore was stopped before its processes resumed: {FILE_LOCKS} is the dumped one again"),
        );
    }
    let bytes = read_image(dir, FILE_LOCKS)?;
    let dumped: Vec<FileLockEntry> = match &bytes {
        Some(b) => images::records(Some(b), FILE_LOCKS_MAGIC)
            .with_context(|| format!("reading CRIU's {FILE_LOCKS}"))?,
        None => Vec::new(),
    };
    // Nothing to do without a lease, unless the sidecar has waiters to carry over.
    if !dumped.iter().any(FileLockEntry::is_lease) && !has(dir, SIDECAR) {
        return Ok(());
    }
    let breaking = dumped.iter().filter(|e| e.is_breaking_lease()).count();
    let criu_alone = match breaking {
        0 => "the restored locks and leases are not checked".to_string(),
        n => format!("CRIU breaks the {n} lease(s) that were being broken again with the whole lease-break-time"),
    };
    let sidecar = match read_image(dir, SIDECAR)? {
        // Dumped without the plugin, and nothing CRIU gets wrong.
        None if breaking == 0 => return Ok(()),
        None => bail!("no {SIDECAR} (dumped without the plugin): {criu_alone}"),
        Some(b) => LeaseSidecar::parse(&b)
            .with_context(|| format!("{SIDECAR} is unreadable; {criu_alone}"))?,
    };
    if sidecar.version != 1 {
        bail!(
            "{SIDECAR} is version {}, not 1: {criu_alone}",
            sidecar.version
        );
    }
    let policy = match std::env::var(POLICY_ENV) {
        Err(_) => LeaseTime::Exact,
        Ok(v) => v
            .parse()
            .map_err(|e| anyhow::anyhow!("{POLICY_ENV}: {e}; {criu_alone}"))?,
    };
    let prepared = prepare(&dumped, &sidecar, policy, current_break_time()?);
    for n in &prepared.notes {
        say(Level::Warn, n);
    }
    let rewritten = prepared.entries != dumped;
    if let (true, Some(bytes)) = (rewritten, &bytes) {
        write_atomic(dir, ORIGINAL, bytes)?;
        let new = images::image(FILE_LOCKS_MAGIC, &prepared.entries);
        if let Err(e) = write_atomic(dir, FILE_LOCKS, &new) {
            put_back(dir)?;
            return Err(e);
        }
    }
    say(
        Level::Info,
        &format!(
            "{} lease(s) will be broken again at resume (policy {policy})",
            prepared.pending.len()
        ),
    );
    *state() = Some(Restore {
        given: prepared.entries,
        pending: prepared.pending,
        notes: prepared.notes,
        policy,
        rewritten,
        waiters: sidecar.waiters,
    });
    Ok(())
}

/// The dumped `filelocks.img` back in its place (one rename).
fn put_back(dir: RawFd) -> Result<()> {
    renameat(Some(dir), ORIGINAL, Some(dir), FILE_LOCKS)
        .with_context(|| format!("putting the dumped {FILE_LOCKS} back from {ORIGINAL}"))
}

/// The first resume hook; later ones find nothing to do.
pub fn at_resume() -> Result<()> {
    let Some(st) = state().take() else {
        return Ok(());
    };
    let dir = image_dir();
    let mut report = RestoreReport {
        format: REPORT_FORMAT.into(),
        version: 1,
        policy: st.policy.to_string(),
        resume_monotonic_ns: 0,
        leases: Vec::new(),
        waiters: Vec::new(),
        differences: Vec::new(),
        warnings: st.notes,
        errors: Vec::new(),
    };
    if st.rewritten {
        match dir.map(put_back) {
            Some(Ok(())) => {}
            Some(Err(e)) => report.errors.push(format!("{e:#}")),
            None => report.errors.push(format!(
                "CRIU's image directory is closed: {FILE_LOCKS} stays rewritten; the next restore with the plugin puts the dumped one ({ORIGINAL}) back"
            )),
        }
    }
    // Checked before the breaks, which must come last: the processes resume at the
    // instant they count from.
    let mut virt: Vec<i32> = st.given.iter().map(|e| e.pid).collect();
    virt.extend(st.waiters.iter().map(|w| w.pid as i32));
    virt.sort_unstable();
    virt.dedup();
    let tasks = Tasks::traced_here(&virt);
    report.differences = differences(&st.given, |pid, fd| {
        let host = tasks.host(pid)?;
        std::fs::read_to_string(format!("/proc/{host}/fdinfo/{fd}"))
            .ok()
            .map(|t| parse_fdinfo(&t))
    });
    let waiters: Vec<(Option<u32>, &WaiterSnapshot)> = st
        .waiters
        .iter()
        .map(|w| (tasks.host_tid(w.pid as i32, w.tid as i32), w))
        .collect();
    // Published between the last break and the instant the deadlines count from,
    // so that CRIU resumes the processes right at it; the waits carried over then too.
    let mut published = None;
    let broken = rebreak(&st.pending, &tasks, |go, leases, warnings| {
        report.resume_monotonic_ns = go;
        report.leases = leases.to_vec();
        report.warnings.extend_from_slice(warnings);
        carry_over(&waiters, go, &mut report);
        published = Some(publish(&report, dir));
    });
    if published.is_none() && !waiters.is_empty() {
        report.resume_monotonic_ns = monotonic_ns();
        carry_over(&waiters, report.resume_monotonic_ns, &mut report);
    }
    match (broken, published) {
        (Ok(()), Some(done)) => done,
        (Ok(()), None) => publish(&report, dir),
        (Err(e), _) => {
            report.errors.push(format!("{e:#}"));
            publish(&report, dir)
        }
    }
}

/// Hands ckpt-agent the waits of `waiters` (by host thread), the tree resuming at
/// `go`: their restarted calls keep their start. Says in `report` what it did.
fn carry_over(waiters: &[(Option<u32>, &WaiterSnapshot)], go: u64, report: &mut RestoreReport) {
    let mut carries = Vec::new();
    for (host, w) in waiters {
        match (host, w.carry(go)) {
            (Some(tid), Some(c)) => {
                carries.push((*tid, c));
                report.waiters.push(WaiterSnapshot {
                    since_monotonic_ns: c.since_ns,
                    ..(*w).clone()
                });
            }
            _ => report.warnings.push(format!(
                "waiter pid {} tid {}: not found among the restored threads, or of an unknown type; its restarted call starts a new wait",
                w.pid, w.tid
            )),
        }
    }
    if carries.is_empty() {
        return;
    }
    if let Err(e) = history::carry_waits(&pins(), &carries) {
        report.warnings.push(format!(
            "the waiters' restarted calls start new waits: {e:#}"
        ));
        report.waiters.clear();
    }
}

/// The report on CRIU's log and stderr, and in [`REPORT`].
fn publish(report: &RestoreReport, dir: Option<RawFd>) -> Result<()> {
    for l in &report.leases {
        say(
            Level::Info,
            &format!(
                "lease on {} of process {}: broken again, {:.3} s left at resume",
                l.path,
                l.pid,
                l.remaining_ns.unwrap_or(0) as f64 / 1e9
            ),
        );
    }
    for (level, lines) in [
        (Level::Error, &report.errors),
        (Level::Warn, &report.differences),
        (Level::Warn, &report.warnings),
    ] {
        for l in lines {
            say(level, l);
        }
    }
    if let Some(dir) = dir {
        let mut bytes = serde_json::to_vec_pretty(report)?;
        bytes.push(b'\n');
        write_atomic(dir, REPORT, &bytes)?;
    }
    Ok(())
}

/// Breaks each pending lease through a dup of its holder's description, on ckpt's
/// schedule; calls `before_release` with the instant the deadlines count from, the
/// leases and the warnings, and returns once that instant has come.
fn rebreak(
    pending: &[Pending],
    tasks: &Tasks,
    before_release: impl FnOnce(u64, &[LeaseReport], &[String]),
) -> Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let holders = pending
        .iter()
        .map(|p| {
            tasks.host(p.pid).with_context(|| {
                format!("process {} is not among the processes CRIU restored", p.pid)
            })
        })
        .collect::<Result<Vec<u32>>>()?;
    let fds = pending
        .iter()
        .zip(&holders)
        .map(|(p, &host)| {
            let pidfd = pidfd::pidfd_open(host)?;
            pidfd::pidfd_getfd(&pidfd, p.fd)
                .with_context(|| format!("the lease's fd in process {}", p.pid))
        })
        .collect::<Result<Vec<OwnedFd>>>()?;
    let mut leases: Vec<Rebreak> = pending
        .iter()
        .zip(&fds)
        .zip(&holders)
        .map(|((p, fd), &holder)| Rebreak {
            fd: fd.as_raw_fd(),
            path: p.path.clone(),
            target: p.target,
            notified: p.notified,
            owner: fown::owner(fd),
            holder,
            downgrade_of: None,
        })
        .collect();
    let mut reports: Vec<LeaseReport> = pending
        .iter()
        .map(|p| LeaseReport {
            path: p.path.clone(),
            pid: p.pid as u32,
            lease_type: p.lease_type,
            breaking: true,
            target_type: p.target,
            remaining_ns: None,
            deadline_monotonic_ns: None,
            deadline_source: None,
            lease_break_time_s: None,
            downgrade_remaining_ns: None,
            downgrade_deadline_monotonic_ns: None,
        })
        .collect();
    let hz = kernel_hz()?;
    let mut remaining: Vec<(usize, Duration)> = pending
        .iter()
        .enumerate()
        .map(|(i, p)| (i, p.remaining))
        .collect();
    for (i, p) in pending.iter().enumerate() {
        add_downgrade(&mut leases, &mut remaining, i, p.downgrade);
    }
    // The plan (and the iterator load) before the sysctl is taken: other restores
    // wait for it.
    let schedule = Schedule::new(&leases, &remaining, &pins(), hz);
    let mut warnings = Vec::new();
    let sysctl = Sysctl::acquire(SysctlFiles::default(), &mut warnings)?;
    schedule.run(
        sysctl,
        &mut reports,
        &AtomicBool::new(false),
        &mut warnings,
        before_release,
    )?;
    Ok(())
}

/// Restore exit: a restore that failed before its processes resumed leaves the
/// dumped `filelocks.img` as it found it.
pub fn after() -> Result<()> {
    let Some(st) = state().take() else {
        return Ok(());
    };
    if !st.rewritten {
        return Ok(());
    }
    match image_dir() {
        Some(dir) => put_back(dir),
        None => bail!("CRIU's image directory is closed: {FILE_LOCKS} stays rewritten; the next restore with the plugin puts the dumped one ({ORIGINAL}) back"),
    }
}

/// Each lock or lease of `expected` that its fd's description does not hold. Read
/// from fdinfo, where the kernel prints a description's locks under `flc_lock` (a
/// consistent read of exactly that description, at no cost of loading iterators).
pub fn differences(
    expected: &[FileLockEntry],
    fdinfo: impl Fn(i32, i32) -> Option<FdInfo>,
) -> Vec<String> {
    let mut out = Vec::new();
    for e in expected {
        let at = format!("fd {} of process {}", e.fd, e.pid);
        let (Some(kind), Ok(ty), Some(range)) = (e.kind(), e.lock_type(), e.range()) else {
            out.push(format!(
                "{at}: CRIU's image has a lock ckpt cannot read ({e:?})"
            ));
            continue;
        };
        let breaking = e.is_breaking_lease();
        let want = describe(kind, ty, breaking, range);
        let Some(info) = fdinfo(e.pid, e.fd) else {
            out.push(format!("{at} is not open: its {want} was not restored"));
            continue;
        };
        let found = info.locks.iter().any(|l| {
            l.kind == Some(kind)
                && l.lock_type == ty
                && (l.state == "BREAKING") == breaking
                && l.range == range
        });
        if !found {
            let seen: Vec<String> = info
                .locks
                .iter()
                .filter_map(|l| {
                    Some(describe(
                        l.kind?,
                        l.lock_type,
                        l.state == "BREAKING",
                        l.range,
                    ))
                })
                .collect();
            out.push(format!(
                "{at}: the {want} was not restored (it holds {})",
                if seen.is_empty() {
                    "none".into()
                } else {
                    seen.join(", ")
                }
            ));
        }
    }
    out
}

fn describe(kind: HeldKind, ty: Option<LockType>, breaking: bool, range: LockRange) -> String {
    match (kind, breaking) {
        (HeldKind::Lease, true) => format!("lease breaking to {}", type_name(ty)),
        (HeldKind::Lease, false) => format!("{} lease", type_name(ty)),
        _ => format!("{} {} lock on {range}", type_name(ty), kind.label()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ckpt_user::lease::schedule::DOWNGRADE_AT_ONCE;
    use ckpt_user::lease::snapshot::{LeaseSnapshot, SIDECAR_FORMAT};

    fn lease(pid: i32, fd: i32, ty: u32) -> FileLockEntry {
        FileLockEntry {
            flag: FileLockEntry::FL_LEASE,
            r#type: ty,
            pid,
            fd,
            start: 0,
            len: 0,
        }
    }

    fn known(
        pid: u32,
        fd: i32,
        ty: LockType,
        target: Option<LockType>,
        left_ms: i64,
    ) -> LeaseSnapshot {
        LeaseSnapshot {
            pid,
            fd: Some(fd),
            path: Some("/f".into()),
            lock_type: Some(ty),
            breaking: true,
            target_type: target,
            remaining_ns: Some(left_ms * 1_000_000),
            deadline_jiffies: None,
            downgrade_remaining_ns: None,
            break_started_monotonic_ns: None,
            lease_break_time_s: Some(10),
            notified: Some(true),
            signal: None,
            breakers: Vec::new(),
        }
    }

    fn sidecar(leases: Vec<LeaseSnapshot>) -> LeaseSidecar {
        LeaseSidecar {
            format: SIDECAR_FORMAT.into(),
            version: 1,
            taken_monotonic_ns: 1,
            leases,
            waiters: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// A write lock on bytes 0-9 through fd 4 of process 7.
    fn posix() -> FileLockEntry {
        FileLockEntry {
            flag: FileLockEntry::FL_POSIX,
            r#type: 1,
            pid: 7,
            fd: 4,
            start: 0,
            len: 10,
        }
    }

    const BREAKING_TO_UNLOCK: u32 = 6;
    const BREAKING_TO_READ: u32 = 4;

    #[test]
    fn breaking_leases_become_their_pre_break_selves_and_wait_for_the_plugin() {
        let posix = posix();
        let dumped = [
            posix.clone(),
            lease(7, 3, BREAKING_TO_UNLOCK),
            lease(8, 3, BREAKING_TO_READ),
            lease(9, 5, BREAKING_TO_UNLOCK),
            lease(9, 6, 0),
        ];
        let s = sidecar(vec![
            known(7, 3, LockType::Write, None, 3000),
            known(8, 3, LockType::Write, Some(LockType::Read), 1500),
        ]);
        let p = prepare(&dumped, &s, LeaseTime::Exact, 45);
        assert_eq!(
            p.entries,
            vec![
                posix,
                lease(7, 3, 1),
                lease(8, 3, 1),
                // Unknown to the sidecar: CRIU's, untouched.
                lease(9, 5, BREAKING_TO_UNLOCK),
                lease(9, 6, 0),
            ]
        );
        assert_eq!(p.pending.len(), 2);
        assert_eq!(p.pending[0].remaining, Duration::from_millis(3000));
        assert_eq!(p.pending[0].target, None);
        assert!(p.pending[0].notified);
        assert_eq!(p.pending[1].target, Some(LockType::Read));
        assert_eq!(p.notes.len(), 1);
        assert!(
            p.notes[0].contains("fd 5 of process 9 is not in ckpt-leases.json"),
            "{:?}",
            p.notes
        );
        // The policies: the whole lease-break-time, and none at all.
        let p = prepare(&dumped, &s, LeaseTime::Holder, 45);
        assert_eq!(p.pending[0].remaining, Duration::from_secs(10));
        let p = prepare(&dumped, &s, LeaseTime::Breaker, 45);
        // Broken to unlock: gone. A downgrade is broken to fall due just after the
        // resume, never given to CRIU as a read lease: the kernel refuses one while
        // the file is open for writing, the holder's own O_RDWR description included.
        assert_eq!(p.pending.len(), 1);
        assert_eq!(p.pending[0].target, Some(LockType::Read));
        assert_eq!(p.pending[0].remaining, DOWNGRADE_AT_ONCE);
        assert_eq!(p.entries[1], lease(8, 3, 1));
        assert_eq!(p.entries.len(), 4);
    }

    #[test]
    fn a_lease_with_a_downgrade_and_an_unlock_pending_waits_for_both() {
        let dumped = [lease(7, 3, BREAKING_TO_UNLOCK)];
        let with_downgrade = |ns| {
            let mut l = known(7, 3, LockType::Write, None, 3000);
            l.downgrade_remaining_ns = Some(ns);
            sidecar(vec![l])
        };
        let p = prepare(
            &dumped,
            &with_downgrade(1_000_000_000),
            LeaseTime::Exact,
            45,
        );
        assert_eq!(p.pending[0].downgrade, Some(Duration::from_secs(1)));
        assert_eq!(p.entries, vec![lease(7, 3, 1)]);
        // Overdue at the dump: just after the resume, still a write lease for CRIU.
        let p = prepare(&dumped, &with_downgrade(-5), LeaseTime::Exact, 45);
        assert_eq!(p.pending[0].downgrade, Some(DOWNGRADE_AT_ONCE));
        assert_eq!(p.entries, vec![lease(7, 3, 1)]);
        // Due after the unlock: moot.
        let p = prepare(
            &dumped,
            &with_downgrade(4_000_000_000),
            LeaseTime::Exact,
            45,
        );
        assert_eq!(p.pending[0].downgrade, None);
    }

    #[test]
    fn a_sidecar_that_disagrees_leaves_the_lease_to_criu() {
        let dumped = [lease(7, 3, BREAKING_TO_UNLOCK)];
        // The sidecar says downgrade; CRIU's image says unlock.
        let s = sidecar(vec![known(
            7,
            3,
            LockType::Write,
            Some(LockType::Read),
            3000,
        )]);
        let p = prepare(&dumped, &s, LeaseTime::Exact, 45);
        assert_eq!(p.entries, dumped);
        assert!(p.pending.is_empty());
        assert!(
            p.notes[0].contains("breaks to unlock in CRIU's image, to read"),
            "{:?}",
            p.notes
        );
        // An absurd time left is refused, not written to the host's sysctl.
        let s = sidecar(vec![known(
            7,
            3,
            LockType::Write,
            None,
            i64::MAX / 1_000_000,
        )]);
        let p = prepare(&dumped, &s, LeaseTime::Exact, 45);
        assert_eq!(p.entries, dumped);
        assert!(
            p.notes[0].contains("more than a restore sets"),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn differences_name_what_the_kernel_does_not_hold() {
        let posix = posix();
        let breaking = lease(7, 3, BREAKING_TO_UNLOCK);
        let fdinfo = |_pid: i32, fd: i32| match fd {
            4 => Some(parse_fdinfo(
                "pos:\t0\nflags:\t02\nlock:\t1: POSIX  ADVISORY  WRITE 7 08:01:77 0 9\n",
            )),
            3 => Some(parse_fdinfo(
                "pos:\t0\nflags:\t02\nlock:\t2: LEASE  ACTIVE  WRITE 7 08:01:78 0 EOF\n",
            )),
            _ => None,
        };
        let d = differences(&[posix.clone(), lease(7, 3, 1)], fdinfo);
        assert!(d.is_empty(), "{d:?}");
        let d = differences(
            &[FileLockEntry { len: 11, ..posix }, breaking, lease(7, 9, 0)],
            fdinfo,
        );
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(
            d[0].contains(
                "write POSIX lock on 0-10 was not restored (it holds write POSIX lock on 0-9)"
            ),
            "{d:?}"
        );
        assert!(
            d[1].contains("lease breaking to unlock was not restored (it holds write lease)"),
            "{d:?}"
        );
        assert!(d[2].contains("fd 9 of process 7 is not open"), "{d:?}");
        // Any bytes of an image: a difference, never a panic.
        let odd = FileLockEntry {
            flag: 99,
            r#type: 77,
            pid: -1,
            fd: -1,
            start: i64::MAX,
            len: i64::MIN,
        };
        assert!(differences(&[odd], fdinfo)[0].contains("cannot read"));
    }
}
