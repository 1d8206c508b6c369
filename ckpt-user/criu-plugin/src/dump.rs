//! The dump side: at the end of a dump that recorded a lease (`exit(DUMP, 0)`, every
//! image flushed, the tasks still frozen), `ckpt-leases.json` beside CRIU's images:
//! each lease as the kernel holds it at that instant, with what `filelocks.img`
//! loses (the type a lease being broken had before the break, and the exact time
//! left before the kernel acts). With ckpt-agent running (its pins in
//! `$CKPT_PIN_DIR`, default /sys/fs/bpf/ckpt), each breaking lease also gets the
//! agent's record of its break: when it began, whether the holder was signalled, and
//! its breakers.

use std::os::fd::RawFd;

use anyhow::{Context as _, Result};
use ckpt_user::{
    lease::snapshot::{self, LeaseSidecar, LeaseSnapshot, WaiterSnapshot, SIDECAR, SIDECAR_FORMAT},
    lock::kernel,
    sys::{hz::kernel_hz, monotonic_ns},
    tracer::{
        history::History,
        iters::{Iters, Prog},
        pins::PinDir,
    },
};

use crate::{
    images::{
        self, FileLockEntry, PstreeEntry, FILE_LOCKS, FILE_LOCKS_MAGIC, PSTREE, PSTREE_MAGIC,
    },
    read_image, say,
    tasks::Tasks,
    write_atomic, Level,
};

pub fn after_dump(dir: RawFd) -> Result<()> {
    let locks: Vec<FileLockEntry> =
        images::records(read_image(dir, FILE_LOCKS)?.as_deref(), FILE_LOCKS_MAGIC)
            .context("reading CRIU's filelocks.img")?;
    let leases: Vec<&FileLockEntry> = locks.iter().filter(|e| e.is_lease()).collect();
    let pins = crate::pins();
    // The agent's records (history only: without it every kernel fact about a lease
    // is still there, but no waiter is).
    let history = History::read(&pins);
    // Waiters only come from the agent's record: with none waiting anywhere, the
    // tree is not looked at (this runs while CRIU keeps the tasks frozen).
    let anyone_waits = matches!(&history, Ok(Some(h)) if !h.waits.is_empty());
    if leases.is_empty() && !anyone_waits {
        return Ok(());
    }
    let taken = monotonic_ns();
    // The processes whose host pids are needed: the leases' holders, and the whole
    // tree only when someone waits (the agent knows waiters by host pid).
    let needed: Vec<i32> = if anyone_waits {
        let tree: Vec<PstreeEntry> =
            images::records(read_image(dir, PSTREE)?.as_deref(), PSTREE_MAGIC)
                .context("reading CRIU's pstree.img")?;
        tree.iter().map(|e| e.pid as i32).collect()
    } else {
        let mut pids: Vec<i32> = leases.iter().map(|e| e.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    };
    let tasks = Tasks::traced_here(&needed);
    let waiters = match &history {
        Ok(Some(h)) => snapshot::waiters_of(h, &tasks.hosts(), taken)
            .into_iter()
            .map(|w| WaiterSnapshot {
                pid: tasks.virt(w.pid).map_or(w.pid, |p| p as u32),
                tid: tasks.virt_tid(w.pid, w.tid).map_or(w.tid, |t| t as u32),
                ..w
            })
            .collect(),
        _ => Vec::new(),
    };
    if leases.is_empty() && waiters.is_empty() {
        return Ok(());
    }
    let mut sidecar = LeaseSidecar {
        format: SIDECAR_FORMAT.into(),
        version: 1,
        taken_monotonic_ns: taken,
        leases: Vec::new(),
        waiters,
        errors: Vec::new(),
    };
    let history = history.unwrap_or_else(|e| {
        sidecar.errors.push(format!(
            "ckpt-agent's records cannot be read ({e:#}): no break starts, breakers or waiters"
        ));
        None
    });
    if !leases.is_empty() {
        match read_leases(&pins, &tasks, &leases, taken, history.as_ref()) {
            Ok((found, missing)) => {
                sidecar.leases = found;
                sidecar.errors.extend(missing);
            }
            Err(e) => sidecar.errors.push(format!("{e:#}")),
        }
    }
    for e in &sidecar.errors {
        say(Level::Error, e);
    }
    let mut bytes = serde_json::to_vec_pretty(&sidecar)?;
    bytes.push(b'\n');
    write_atomic(dir, SIDECAR, &bytes)
}

/// The kernel's view of each lease CRIU recorded, matched by process and fd; the
/// ones it does not show, as errors.
fn read_leases(
    pins: &PinDir,
    tasks: &Tasks,
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
    for virt in pids {
        let Some(host) = tasks.host(virt) else {
            continue;
        };
        let table = kernel::read_process(&iters, host)
            .with_context(|| format!("reading the leases of process {virt} (host pid {host})"))?;
        // Named as CRIU's images name them.
        held.extend(
            snapshot::of_process(&table, host, now_ns, hz, history)
                .into_iter()
                .map(|s| LeaseSnapshot {
                    pid: virt as u32,
                    ..s
                }),
        );
    }
    Ok(matched(recorded, held, |e| {
        let host = tasks.host(e.pid)?;
        std::fs::read_to_string(format!("/proc/{host}/fdinfo/{}", e.fd)).ok()
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
            "CRIU recorded a lease on {at} that the kernel's lists do not show there"
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
            // The fd CRIU restores the lease on (the same description).
            Some(i) => found.push(LeaseSnapshot {
                fd: Some(e.fd),
                ..held.remove(i)
            }),
            None => missing.push(missing_reason(e, fdinfo(e).as_deref())),
        }
    }
    (found, missing)
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
        // fd 4 by its fd, fd 9 by the process's other lease (shown through fd 3),
        // recorded at the fd CRIU restores it on.
        assert_eq!(
            found.iter().map(|s| (s.pid, s.fd)).collect::<Vec<_>>(),
            vec![(10, Some(4)), (10, Some(9))]
        );
        assert_eq!(missing.len(), 1);
        assert!(missing[0].contains("process 11"), "{}", missing[0]);
        assert!(missing[0].contains("do not show there"), "{}", missing[0]);
        // Its fd is there without a lease: revoked during the dump.
        let (_, missing) = matched(&[&c], Vec::new(), |_| Some("pos:\t0\nflags:\t02\n".into()));
        assert!(
            missing[0].contains("--file-validation filesize"),
            "{}",
            missing[0]
        );
    }
}
