//! Per-process facts: parent, command line, working directory, credentials.

use anyhow::{bail, Context as _, Result};

use ckpt_common::files::{TaskRecord, PF_EXITING};

use crate::image::format::Process;

/// `Uid:`/`Gid:` lines: real, effective, saved, filesystem.
fn ids(status: &str, key: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
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
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} exited during the dump"))?;
    alive_in(pid, &status)
}

/// The same check on a `status` text already read.
fn alive_in(pid: u32, status: &str) -> Result<()> {
    let state = status
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .unwrap_or("")
        .trim();
    if state.starts_with('Z') || state.starts_with('X') {
        bail!("process {pid} exited during the dump");
    }
    if killed(status) {
        bail!("process {pid} exited during the dump (killed while frozen)");
    }
    Ok(())
}

/// SIGKILL pending, for the thread or its process (`SigPnd:`/`ShdPnd:`, hex masks).
fn killed(status: &str) -> bool {
    let bit = 1u64 << (libc::SIGKILL - 1);
    status.lines().any(|l| {
        l.strip_prefix("SigPnd:")
            .or_else(|| l.strip_prefix("ShdPnd:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|m| m & bit != 0)
    })
}

/// Reads everything but the fds.
pub fn read(pid: u32) -> Result<Process> {
    let dir = format!("/proc/{pid}");
    let status = std::fs::read_to_string(format!("{dir}/status"))
        .with_context(|| format!("process {pid} exited during the dump"))?;
    // A zombie (killed while frozen) still has /proc entries, but no files.
    alive_in(pid, &status)?;
    let uid = ids(&status, "Uid:");
    let gid = ids(&status, "Gid:");
    let cmdline = std::fs::read(format!("{dir}/cmdline")).unwrap_or_default();
    Ok(Process {
        pid,
        ppid: ids(&status, "PPid:").first().copied().unwrap_or(0),
        comm: std::fs::read_to_string(format!("{dir}/comm"))
            .unwrap_or_default()
            .trim_end()
            .to_string(),
        cmdline: cmdline
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
        cwd: std::fs::read_link(format!("{dir}/cwd"))
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        uid: uid.first().copied().unwrap_or(0),
        euid: uid.get(1).copied().unwrap_or(0),
        gid: gid.first().copied().unwrap_or(0),
        egid: gid.get(1).copied().unwrap_or(0),
        groups: ids(&status, "Groups:"),
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
    fn a_pending_sigkill_counts_as_exited() {
        let s = |pnd: &str| {
            format!("State:\tS (sleeping)\nSigPnd:\t0000000000000000\nShdPnd:\t{pnd}\n")
        };
        assert!(alive_in(1, &s("0000000000000000")).is_ok());
        assert!(alive_in(1, &s("0000000000004000")).is_ok()); // SIGTERM: not fatal yet
        let e = alive_in(1, &s("0000000000000100")).unwrap_err().to_string();
        assert!(e.contains("killed while frozen"), "{e}");
    }

    #[test]
    fn status_ids() {
        let s = "Name:\tx\nPPid:\t1\nUid:\t1000\t1001\t1000\t1000\nGid:\t50\t50\t50\t50\nGroups:\t4 24 27 \n";
        assert_eq!(ids(s, "Uid:"), vec![1000, 1001, 1000, 1000]);
        assert_eq!(ids(s, "PPid:"), vec![1]);
        assert_eq!(ids(s, "Groups:"), vec![4, 24, 27]);
        assert!(ids("Groups:\n", "Groups:").is_empty());
    }
}
