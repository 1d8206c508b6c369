//! A description's signal owner and signal (F_GETOWN_EX/F_SETOWN_EX, F_GETSIG/F_SETSIG):
//! read by the dump, written back by the restore.

use std::os::fd::{AsRawFd, RawFd};

// fcntl commands libc does not name.
const F_SETSIG: libc::c_int = 10;
const F_GETSIG: libc::c_int = 11;
const F_SETOWN_EX: libc::c_int = 15;
const F_GETOWN_EX: libc::c_int = 16;
/// f_owner_ex types.
pub const F_OWNER_PID: libc::c_int = 1;
pub const F_OWNER_PGRP: libc::c_int = 2;

/// The kernel's struct f_owner_ex.
#[repr(C)]
struct OwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}

/// F_GETOWN_EX: (type, pid), None when no owner is set.
pub fn owner(fd: &impl AsRawFd) -> Option<(i32, i32)> {
    let mut o = OwnerEx { kind: 0, pid: 0 };
    // SAFETY: plain fcntl into a local of the kernel's struct f_owner_ex layout.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), F_GETOWN_EX, &mut o) };
    (r == 0 && o.pid != 0).then_some((o.kind, o.pid))
}

/// F_SETOWN_EX: (type, pid), or no owner at all.
pub fn set_owner(fd: RawFd, owner: Option<(i32, i32)>) -> std::io::Result<()> {
    let (kind, pid) = owner.unwrap_or((F_OWNER_PID, 0));
    let o = OwnerEx { kind, pid };
    // SAFETY: F_SETOWN_EX reads a struct f_owner_ex.
    if unsafe { libc::fcntl(fd, F_SETOWN_EX, &o as *const OwnerEx) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// F_GETSIG (0: SIGIO).
pub fn signal(fd: &impl AsRawFd) -> i32 {
    // SAFETY: plain fcntl.
    unsafe { libc::fcntl(fd.as_raw_fd(), F_GETSIG) }.max(0)
}

/// F_SETSIG (0: SIGIO).
pub fn set_signal(fd: RawFd, sig: i32) -> std::io::Result<()> {
    // SAFETY: plain fcntl.
    if unsafe { libc::fcntl(fd, F_SETSIG, sig) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
