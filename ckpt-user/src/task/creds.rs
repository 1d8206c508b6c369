//! Acting as the process being restored: its files are opened with its filesystem
//! credentials, and its helper becomes it for good before taking locks and leases, so
//! that an image cannot make a process open or lock what it could not before.

use anyhow::{bail, Result};

use crate::plan::Creds;

fn check(what: &str, r: libc::c_int) -> Result<()> {
    if r < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` with the filesystem uid, gid and groups of `creds` (this thread only;
/// ckpt-user restore has one thread), and switches back to root afterwards.
pub fn as_user<T>(creds: &Creds, f: impl FnOnce() -> T) -> Result<T> {
    if creds.euid == 0 && creds.egid == 0 {
        return Ok(f());
    }
    // SAFETY: plain syscalls on our own credentials.
    unsafe {
        check(
            "setgroups",
            libc::setgroups(creds.groups.len(), creds.groups.as_ptr()),
        )?;
        libc::setfsgid(creds.egid);
        libc::setfsuid(creds.euid);
    }
    let out = f();
    // SAFETY: as above; back to root (setfsuid(0) gives back the capabilities that the
    // switch to a non-zero fsuid dropped).
    unsafe {
        libc::setfsuid(0);
        libc::setfsgid(0);
        check("setgroups", libc::setgroups(0, std::ptr::null()))?;
    }
    Ok(out)
}

/// Becomes `creds` for good (in a helper process, before it locks and executes).
pub fn become_user(creds: &Creds) -> Result<()> {
    // SAFETY: plain syscalls on our own credentials.
    unsafe {
        check(
            "setgroups",
            libc::setgroups(creds.groups.len(), creds.groups.as_ptr()),
        )?;
        check(
            "setresgid",
            libc::setresgid(creds.gid, creds.egid, creds.egid),
        )?;
        check(
            "setresuid",
            libc::setresuid(creds.uid, creds.euid, creds.euid),
        )?;
    }
    Ok(())
}
