//! Syscalls for looking into another process's open files without disturbing them:
//! pidfd_getfd (a dup sharing the description, no open(), so no lease break), kcmp
//! (do two fds share one description?), file handles.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use anyhow::{bail, Result};

fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// A pidfd for `pid`.
pub fn pidfd_open(pid: u32) -> Result<OwnedFd> {
    // SAFETY: plain syscall; the result is a new fd we own.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if r < 0 {
        bail!("pidfd_open({pid}): {}", last_err());
    }
    // SAFETY: a new fd the kernel just gave us, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// Our own fd for the open file description behind `fd` in the pidfd's process.
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> Result<OwnedFd> {
    // SAFETY: plain syscall; the result is a new fd we own.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        bail!("pidfd_getfd(fd {fd}): {}", last_err());
    }
    // SAFETY: a new fd the kernel just gave us, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

const KCMP_FILE: libc::c_int = 0;

/// Whether fd1 of pid1 and fd2 of pid2 are the same open file description.
pub fn same_description(pid1: u32, fd1: i32, pid2: u32, fd2: i32) -> Result<bool> {
    // SAFETY: plain syscall.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid1,
            pid2,
            KCMP_FILE,
            fd1 as u64,
            fd2 as u64,
        )
    };
    if r < 0 {
        bail!("kcmp({pid1}:{fd1}, {pid2}:{fd2}): {}", last_err());
    }
    Ok(r == 0)
}

/// Longest file handle kept (MAX_HANDLE_SZ).
const MAX_HANDLE: usize = 128;

/// struct file_handle with room for the longest handle (nix has no handle calls).
#[repr(C)]
struct Handle {
    bytes: u32,
    kind: i32,
    data: [u8; MAX_HANDLE],
}

/// open_by_handle_at(O_PATH): the inode a handle names, on the filesystem `on` (any
/// fd on it) lives on, even if no name leads to it any more (needs
/// CAP_DAC_READ_SEARCH).
pub fn open_by_handle(on: &OwnedFd, handle: &(i32, Vec<u8>)) -> std::io::Result<OwnedFd> {
    if handle.1.len() > MAX_HANDLE {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut h = Handle {
        bytes: handle.1.len() as u32,
        kind: handle.0,
        data: [0; MAX_HANDLE],
    };
    h.data[..handle.1.len()].copy_from_slice(&handle.1);
    // SAFETY: h holds `bytes` bytes of handle after its header.
    let r = unsafe {
        libc::open_by_handle_at(
            on.as_raw_fd(),
            &mut h as *mut Handle as *mut libc::file_handle,
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd, ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// name_to_handle_at on an open fd: (handle type, bytes), or None if the filesystem
/// has no handles.
pub fn file_handle(fd: &OwnedFd) -> Option<(i32, Vec<u8>)> {
    const MAX: usize = MAX_HANDLE;
    let mut h = Handle {
        bytes: MAX as u32,
        kind: 0,
        data: [0; MAX],
    };
    let mut mnt: libc::c_int = 0;
    // SAFETY: h has room for MAX bytes of handle after its header.
    let r = unsafe {
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut h as *mut Handle as *mut libc::file_handle,
            &mut mnt,
            libc::AT_EMPTY_PATH,
        )
    };
    (r == 0).then(|| (h.kind, h.data[..h.bytes as usize].to_vec()))
}
