//! Tracepoint field and kernel struct offsets, resolved in userspace from tracefs
//! `format` files and kernel BTF at load time and handed to the programs as read-only
//! globals (`EbpfLoader::override_global`). Field names and offsets differ between
//! kernels (6.1 `fl_owner` vs 6.9+ `owner`), so nothing here is hard-coded.

/// Offsets for the deleted-file triggers: syscall tracepoint fields (tracefs) and the
/// fd table's array (BTF), to tell whether the fd being closed is a deleted file.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeletedTpOffsets {
    pub close_fd: u32,
    pub openat_flags: u32,
    pub open_flags: u32,
    /// `how` of sys_enter_openat2 (a user pointer to struct open_how, flags first).
    pub openat2_how: u32,
    /// `ret` of the sys_exit_* events (one layout for all; checked at load time).
    pub exit_ret: u32,
    pub fdt_fd: u32,
    pub fdt_max_fds: u32,
    pub vma_start: u32,
    pub vma_end: u32,
    pub vma_file: u32,
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
    /// signal:signal_deliver's `sa_handler` and `sa_flags`.
    pub deliver_handler: u32,
    pub deliver_flags: u32,
}

/// Offsets inside the kernel's lease object (struct file_lease on 6.9+, struct
/// file_lock before), resolved from BTF. Read at break time, under flc_lock, to learn
/// the exact break deadline the kernel set. Its owner, flags, type and pid are where
/// any lock has them ([`LockListOffsets`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseStructOffsets {
    pub break_time: u32,
    pub downgrade_time: u32,
}

/// An inode's lock lists (struct file_lock_context) and the fields every lock in
/// them has: the common part, which starts both struct file_lock and struct
/// file_lease on 6.9+ (`c`), and the fields of struct file_lock before. From BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockListOffsets {
    pub inode_flctx: u32,
    pub ctx_posix: u32,
    pub ctx_flock: u32,
    pub ctx_lease: u32,
    /// The list node inside a lock.
    pub list: u32,
    pub file: u32,
    pub owner: u32,
    pub flags: u32,
    pub lock_type: u32,
    pub pid: u32,
    /// The lock a waiting request is blocked on.
    pub blocker: u32,
    /// `flc_blocked_requests` (the requests blocked on a lock) and
    /// `flc_blocked_member` (a blocked request's link in its blocker's list).
    pub blocked_requests: u32,
    pub blocked_member: u32,
    /// Byte range (struct file_lock only).
    pub start: u32,
    pub end: u32,
}

/// Offsets for the task_file iterator (BTF): what /proc/PID/fd, fdinfo and fstat tell
/// about an fd, read from the kernel's structs in one pass.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileIterOffsets {
    pub task_tgid: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_close_on_exec: u32,
    pub file_pos: u32,
    pub file_flags: u32,
    pub file_mode: u32,
    pub file_inode: u32,
    pub file_path: u32,
    /// `f_path.mnt` inside struct file.
    pub file_mnt: u32,
    pub file_owner: u32,
    /// 1 when `file.f_owner` is a pointer (6.12+), 0 when it is embedded.
    pub owner_is_ptr: u32,
    pub fown_pid: u32,
    pub fown_pid_type: u32,
    pub fown_signum: u32,
    /// `numbers[0].nr` inside struct pid.
    pub pid_nr: u32,
    /// `mnt_id` of struct mount, relative to its embedded struct vfsmount.
    pub vfsmount_mnt_id: i32,
    pub inode_ino: u32,
    pub inode_sb: u32,
    pub inode_mode: u32,
    pub inode_nlink: u32,
    pub inode_size: u32,
    pub inode_blocks: u32,
    pub inode_generation: u32,
    pub inode_mtime_sec: u32,
    pub inode_mtime_nsec: u32,
    pub inode_ctime_sec: u32,
    pub inode_ctime_nsec: u32,
    /// `i_state`, and the value of its `I_LINKABLE` flag on this kernel.
    pub inode_state: u32,
    pub i_linkable: u32,
    pub sb_dev: u32,
}

/// Offsets for the per-process record of the task_file iterator (BTF): what
/// /proc/PID/status, comm and cwd would tell, plus the identities that show whether a
/// process changed since a read before freezing (exec, credentials, cwd).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskIterOffsets {
    pub real_parent: u32,
    pub real_cred: u32,
    pub self_exec_id: u32,
    pub comm: u32,
    pub exit_state: u32,
    pub flags: u32,
    pub fs: u32,
    /// `pwd.mnt` and `pwd.dentry` inside struct fs_struct.
    pub fs_pwd_mnt: u32,
    pub fs_pwd_dentry: u32,
    pub cred_uid: u32,
    pub cred_euid: u32,
    pub cred_gid: u32,
    pub cred_egid: u32,
}

/// Everything the programs need to know about this kernel, in one global so that a
/// single `override_global` call configures them. `valid` is 1 once userspace filled it:
/// the programs do nothing while it is 0, so a mis-loaded object cannot record garbage.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    pub lease: LeaseTpOffsets,
    pub brk: BreakTpOffsets,
    pub lease_struct: LeaseStructOffsets,
    pub lock_lists: LockListOffsets,
    pub files: FileIterOffsets,
    pub tasks: TaskIterOffsets,
    pub deleted: DeletedTpOffsets,
    /// 1 with `ckpt-agent --hold-times`: the lock programs note when locks are taken.
    pub hold_times: u32,
    pub valid: u32,
}

impl KernelLayout {
    /// Every offset 0 (and `valid` 0): the eBPF object's initial value, which the
    /// loader overrides with this kernel's layout.
    // SAFETY: the struct is repr(C) integers only, for which all-zero bytes are valid.
    pub const ZERO: KernelLayout = unsafe { core::mem::zeroed() };
}

#[cfg(feature = "user")]
// SAFETY: repr(C) plain data; any bytes are a valid value.
unsafe impl aya::Pod for KernelLayout {}
