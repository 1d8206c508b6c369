//! Acting as the process being restored: its files are opened with its filesystem
//! credentials, and its helper becomes it for good before taking locks and leases, so
//! that an image cannot make a process open or lock what it could not before.

use anyhow::{Context as _, Result};
use nix::unistd::{setfsgid, setfsuid, setgroups, setresgid, setresuid, Gid, Uid};

use crate::plan::Creds;

fn groups(creds: &Creds) -> Vec<Gid> {
    creds.groups.iter().map(|&g| Gid::from_raw(g)).collect()
}

/// Runs `f` with the filesystem uid, gid and groups of `creds` (this thread only;
/// ckpt-user restore has one thread), and switches back to root afterwards.
pub fn as_user<T>(creds: &Creds, f: impl FnOnce() -> T) -> Result<T> {
    if creds.euid == 0 && creds.egid == 0 {
        return Ok(f());
    }
    setgroups(&groups(creds)).context("setgroups")?;
    setfsgid(Gid::from_raw(creds.egid));
    setfsuid(Uid::from_raw(creds.euid));
    let out = f();
    // Back to root (setfsuid(0) gives back the capabilities that the switch to a
    // non-zero fsuid dropped).
    setfsuid(Uid::from_raw(0));
    setfsgid(Gid::from_raw(0));
    setgroups(&[]).context("setgroups")?;
    Ok(out)
}

/// Becomes `creds` for good (in a helper process, before it locks and executes).
pub fn become_user(creds: &Creds) -> Result<()> {
    setgroups(&groups(creds)).context("setgroups")?;
    let (gid, egid) = (Gid::from_raw(creds.gid), Gid::from_raw(creds.egid));
    setresgid(gid, egid, egid).context("setresgid")?;
    let (uid, euid) = (Uid::from_raw(creds.uid), Uid::from_raw(creds.euid));
    setresuid(uid, euid, euid).context("setresuid")?;
    Ok(())
}
