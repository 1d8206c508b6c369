//! Tracepoint field offsets, resolved in userspace from tracefs `format` files at load
//! time and handed to the programs as read-only globals (`EbpfLoader::override_global`).
//! Field names and offsets differ between kernels (6.1 `fl_owner` vs 6.9+ `owner`), so
//! nothing here is hard-coded.

/// Offsets of the `filelock:filelock_lock` event class (posix_lock_inode,
/// flock_lock_inode, fcntl_setlk, locks_remove_posix).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockTpOffsets {
    /// The request (struct file_lock *).
    pub fl: u32,
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

/// Offsets of the syscall tracepoints the programs read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallTpOffsets {
    pub fcntl_fd: u32,
    pub fcntl_cmd: u32,
    pub fcntl_arg: u32,
    pub flock_fd: u32,
    /// `ret` of sys_exit_fcntl.
    pub fcntl_ret: u32,
}

/// Offsets of the `filelock:filelock_lease` event class (generic_delete_lease,
/// break_lease_noblock/block/unblock, time_out_leases).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseTpOffsets {
    pub fl: u32,
    pub i_ino: u32,
    pub s_dev: u32,
    pub owner: u32,
    pub flags: u32,
    pub lease_type: u32,
    pub break_time: u32,
    pub downgrade_time: u32,
}

/// Offsets of filelock:generic_add_lease.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddLeaseTpOffsets {
    pub i_ino: u32,
    pub s_dev: u32,
    pub owner: u32,
    pub flags: u32,
    pub lease_type: u32,
}

/// Offsets of filelock:leases_conflict and signal:signal_generate.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakTpOffsets {
    pub conflict_lease: u32,
    pub conflict_breaker: u32,
    pub conflict_b_type: u32,
    pub conflict: u32,
    pub signal_sig: u32,
    pub signal_pid: u32,
    pub signal_result: u32,
}

/// Offsets inside the kernel's lease object (struct file_lease on 6.9+, struct
/// file_lock before), resolved from BTF. Read at break time, under flc_lock, to learn
/// the exact break deadline the kernel set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseStructOffsets {
    pub owner: u32,
    pub flags: u32,
    pub lease_type: u32,
    pub pid: u32,
    pub break_time: u32,
    pub downgrade_time: u32,
}

/// Offsets for reading an inode's flock list from a lock request (BTF): request ->
/// file -> inode -> lock context -> flc_flock list of locks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlockListOffsets {
    pub req_file: u32,
    pub file_inode: u32,
    pub inode_flctx: u32,
    pub ctx_flock: u32,
    /// The list node inside a lock, and the lock's file and type.
    pub lock_list: u32,
    pub lock_file: u32,
    pub lock_type: u32,
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
    pub lease: LeaseTpOffsets,
    pub add_lease: AddLeaseTpOffsets,
    pub brk: BreakTpOffsets,
    pub lease_struct: LeaseStructOffsets,
    pub flock_list: FlockListOffsets,
    pub valid: u32,
}

impl KernelLayout {
    pub const ZERO: KernelLayout = KernelLayout {
        posix: LockTpOffsets::ZERO,
        flock: LockTpOffsets::ZERO,
        syscalls: SyscallTpOffsets {
            fcntl_fd: 0,
            fcntl_cmd: 0,
            fcntl_arg: 0,
            flock_fd: 0,
            fcntl_ret: 0,
        },
        lease: LeaseTpOffsets {
            fl: 0,
            i_ino: 0,
            s_dev: 0,
            owner: 0,
            flags: 0,
            lease_type: 0,
            break_time: 0,
            downgrade_time: 0,
        },
        add_lease: AddLeaseTpOffsets {
            i_ino: 0,
            s_dev: 0,
            owner: 0,
            flags: 0,
            lease_type: 0,
        },
        brk: BreakTpOffsets {
            conflict_lease: 0,
            conflict_breaker: 0,
            conflict_b_type: 0,
            conflict: 0,
            signal_sig: 0,
            signal_pid: 0,
            signal_result: 0,
        },
        lease_struct: LeaseStructOffsets {
            owner: 0,
            flags: 0,
            lease_type: 0,
            pid: 0,
            break_time: 0,
            downgrade_time: 0,
        },
        flock_list: FlockListOffsets {
            req_file: 0,
            file_inode: 0,
            inode_flctx: 0,
            ctx_flock: 0,
            lock_list: 0,
            lock_file: 0,
            lock_type: 0,
        },
        valid: 0,
    };
}

impl LockTpOffsets {
    pub const ZERO: LockTpOffsets = LockTpOffsets {
        fl: 0,
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
