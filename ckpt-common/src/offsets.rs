//! Tracepoint field offsets, resolved in userspace from tracefs `format` files at load
//! time and handed to the programs as read-only globals (`EbpfLoader::override_global`).
//! Field names and offsets differ between kernels (6.1 `fl_owner` vs 6.9+ `owner`), so
//! nothing here is hard-coded.

/// Offsets of the `filelock:filelock_lock` event class (posix_lock_inode,
/// flock_lock_inode, fcntl_setlk, locks_remove_posix).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockTpOffsets {
    pub i_ino: u32,
    pub s_dev: u32,
    pub blocker: u32,
    pub owner: u32,
    pub pid: u32,
    pub flags: u32,
    pub lock_type: u32,
    pub start: u32,
    pub end: u32,
    pub ret: u32,
}

/// Offsets of the syscall tracepoints the programs read (`fd` on enter, `ret` on exit).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallTpOffsets {
    pub fcntl_fd: u32,
    pub fcntl_cmd: u32,
    pub flock_fd: u32,
}

/// Everything the programs need to know about this kernel, in one global so that a
/// single `override_global` call configures them. `valid` is 1 once userspace filled it:
/// the programs do nothing while it is 0, so a mis-loaded object cannot record garbage.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    pub posix: LockTpOffsets,
    pub flock: LockTpOffsets,
    pub syscalls: SyscallTpOffsets,
    pub valid: u32,
}

impl KernelLayout {
    pub const ZERO: KernelLayout = KernelLayout {
        posix: LockTpOffsets::ZERO,
        flock: LockTpOffsets::ZERO,
        syscalls: SyscallTpOffsets {
            fcntl_fd: 0,
            fcntl_cmd: 0,
            flock_fd: 0,
        },
        valid: 0,
    };
}

impl LockTpOffsets {
    pub const ZERO: LockTpOffsets = LockTpOffsets {
        i_ino: 0,
        s_dev: 0,
        blocker: 0,
        owner: 0,
        pid: 0,
        flags: 0,
        lock_type: 0,
        start: 0,
        end: 0,
        ret: 0,
    };
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for KernelLayout {}
