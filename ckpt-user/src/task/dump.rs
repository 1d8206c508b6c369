//! Per-process facts: parent, command line, working directory, credentials (from
//! the fd-table iterator's task record, or /proc through the procfs crate).

use anyhow::{bail, Context as _, Result};
use procfs::process::Status;

use ckpt_common::files::{TaskRecord, PF_EXITING};

use crate::image::format::Process;

/// /proc/PID, failing as "exited" when the process is gone.
fn proc_of(pid: u32) -> Result<procfs::process::Process> {
    procfs::process::Process::new(pid as i32)
        .with_context(|| format!("process {pid} exited during the dump"))
}

fn status_of(p: &procfs::process::Process, pid: u32) -> Result<Status> {
    p.status()
        .with_context(|| format!("process {pid} exited during the dump"))
}

/// Fails if `pid` exited, became a zombie or was killed since the freeze.
///
/// A process killed while frozen was alive at the freeze instant, but its exit may run
/// while the window reads it (cgroup v2 lets a killed task leave the freeze to exit),
/// tearing its fd table mid-read; and when the kill lands is a race. So a dump refuses
/// it, deterministically: `kill(SIGKILL)` marks SIGKILL pending before it returns,
/// so a kill made before this check (e.g. by --snapshot-cmd) is always seen here, and
/// one made after it cannot have changed what was already read.
pub fn still_alive(pid: u32) -> Result<()> {
    alive_in(pid, &status_of(&proc_of(pid)?, pid)?)
}

/// The same check on a status already read.
fn alive_in(pid: u32, status: &Status) -> Result<()> {
    if status.state.starts_with('Z') || status.state.starts_with('X') {
        bail!("process {pid} exited during the dump");
    }
    if killed(status) {
        bail!("process {pid} exited during the dump (killed while frozen)");
    }
    Ok(())
}

/// SIGKILL pending, for the thread or its process (`SigPnd`/`ShdPnd`).
fn killed(status: &Status) -> bool {
    let bit = 1u64 << (libc::SIGKILL - 1);
    (status.sigpnd | status.shdpnd) & bit != 0
}

/// Reads everything but the fds.
pub fn read(pid: u32) -> Result<Process> {
    let p = proc_of(pid)?;
    let status = status_of(&p, pid)?;
    // A zombie (killed while frozen) still has /proc entries, but no files.
    alive_in(pid, &status)?;
    Ok(Process {
        pid,
        ppid: status.ppid.max(0) as u32,
        // stat's comm is the name as it is (status escapes some bytes).
        comm: p.stat().map_or_else(|_| status.name.clone(), |s| s.comm),
        cmdline: p
            .cmdline()
            .unwrap_or_default()
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect(),
        cwd: p.cwd().map(|c| c.display().to_string()).unwrap_or_default(),
        uid: status.ruid,
        euid: status.euid,
        gid: status.rgid,
        egid: status.egid,
        groups: status.groups.iter().map(|&g| g as u32).collect(),
        fds: Vec::new(),
    })
}

/// The process as the iterator saw it inside the frozen window (`now`), completed by
/// a /proc read made before freezing (`before`) when nothing it covers changed since:
/// not exec'd (cmdline), same credentials object (groups) and same working directory.
/// Otherwise, or without a record (a process without fds), /proc is read now.
pub fn from_record(
    pid: u32,
    now: Option<&TaskRecord>,
    before: Option<&(TaskRecord, Process)>,
) -> Result<Process> {
    let Some(now) = now else {
        return read(pid);
    };
    if now.flags & PF_EXITING != 0 || now.exit_state != 0 {
        bail!("process {pid} exited during the dump");
    }
    match before {
        Some((then, p)) if unchanged(then, now) => Ok(Process {
            ppid: now.ppid,
            uid: now.uid,
            euid: now.euid,
            gid: now.gid,
            egid: now.egid,
            ..p.clone()
        }),
        _ => read(pid),
    }
}

/// Whether what a /proc read of `then` covers still holds at `now`.
fn unchanged(then: &TaskRecord, now: &TaskRecord) -> bool {
    then.tgid == now.tgid
        && then.exec_id == now.exec_id
        && then.cred == now.cred
        && then.pwd_mnt == now.pwd_mnt
        && then.pwd_dentry == now.pwd_dentry
        && then.comm == now.comm
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: u32) -> TaskRecord {
        TaskRecord {
            tgid: pid,
            ppid: 1,
            uid: 5,
            exec_id: 3,
            cred: 0xffff_8000_0000_1000,
            pwd_mnt: 0xffff_8000_0000_2000,
            pwd_dentry: 0xffff_8000_0000_3000,
            comm: *b"worker\0\0\0\0\0\0\0\0\0\0",
            ..Default::default()
        }
    }

    #[test]
    fn a_process_read_before_freezing_is_reused_only_if_unchanged() {
        // Our own process: the fallback reads /proc/self-equivalent facts.
        let me = std::process::id();
        let then = record(me);
        let before = Process {
            pid: me,
            ppid: 1,
            cmdline: vec!["before".into()],
            uid: 5,
            ..Default::default()
        };
        let mut now = then;
        now.ppid = 77;
        let p = from_record(me, Some(&now), Some(&(then, before.clone()))).unwrap();
        assert_eq!(
            (p.ppid, p.cmdline.clone()),
            (77, vec!["before".to_string()])
        );
        for change in [
            |r: &mut TaskRecord| r.exec_id += 1,
            |r: &mut TaskRecord| r.cred += 64,
            |r: &mut TaskRecord| r.pwd_dentry += 64,
            |r: &mut TaskRecord| r.comm[0] = b'x',
        ] {
            let mut now = then;
            change(&mut now);
            let p = from_record(me, Some(&now), Some(&(then, before.clone()))).unwrap();
            assert_ne!(
                p.cmdline, before.cmdline,
                "a changed process must be read again"
            );
        }
        let mut dying = then;
        dying.flags |= PF_EXITING;
        assert!(from_record(me, Some(&dying), Some(&(then, before))).is_err());
    }

    #[test]
    fn a_pending_sigkill_counts_as_exited_and_a_zombie_too() {
        // Our own status, as procfs reads it, with pending signals set by hand.
        let me = std::process::id();
        let mine = status_of(&proc_of(me).unwrap(), me).unwrap();
        assert!(alive_in(1, &mine).is_ok());
        let mut s = mine.clone();
        s.shdpnd = 1 << (libc::SIGTERM - 1); // not fatal yet
        assert!(alive_in(1, &s).is_ok());
        s.sigpnd = 1 << (libc::SIGKILL - 1);
        let e = alive_in(1, &s).unwrap_err().to_string();
        assert!(e.contains("killed while frozen"), "{e}");
        let mut z = mine;
        z.state = "Z (zombie)".into();
        assert!(alive_in(1, &z).is_err());
    }

    #[test]
    fn our_own_process_reads_as_it_is() {
        let me = std::process::id();
        let p = read(me).unwrap();
        // SAFETY: getuid/getppid have no preconditions.
        let (uid, ppid) = unsafe { (libc::getuid(), libc::getppid()) };
        assert_eq!((p.uid, p.ppid), (uid, ppid as u32));
        assert_eq!(
            p.cwd,
            std::env::current_dir().unwrap().display().to_string()
        );
        assert_eq!(
            p.cmdline.first().map(String::as_str),
            std::env::args().next().as_deref()
        );
    }
}
