//! Where this kernel keeps each field ckpt's programs read: one table, by kernel
//! object, of struct members (resolved through BTF) and tracepoint record fields
//! (resolved through tracefs `format` files). Each entry lists every name the field
//! has had, newest kernel first; the first present wins. A new kernel layout is a new
//! name in an entry here; `format` binds the entries to the offsets the programs get.

use anyhow::{anyhow, Result};

use super::{btf::Btf, format::Format};

/// A member of a kernel struct: the first of `structs` this kernel has, and in it the
/// first of `paths` present (a dotted path goes into nested structs).
pub struct Member {
    pub structs: &'static [&'static str],
    pub paths: &'static [&'static str],
}

impl Member {
    const fn of(strukt: &'static [&'static str], paths: &'static [&'static str]) -> Member {
        Member {
            structs: strukt,
            paths,
        }
    }

    /// Its byte offset on this kernel.
    pub fn offset(&self, btf: &Btf) -> Result<u32> {
        let s = self
            .structs
            .iter()
            .find(|s| btf.has_struct(s))
            .ok_or_else(|| anyhow!("the kernel has none of the structs {:?}", self.structs))?;
        self.paths
            .iter()
            .find_map(|p| btf.offset_of(s, p).ok())
            .ok_or_else(|| anyhow!("struct {s} has none of the members {:?}", self.paths))
    }

    /// Whether it is a pointer on this kernel (the first path present).
    pub fn is_pointer(&self, btf: &Btf) -> Result<bool> {
        let s = self
            .structs
            .iter()
            .find(|s| btf.has_struct(s))
            .ok_or_else(|| anyhow!("the kernel has none of the structs {:?}", self.structs))?;
        let p = self
            .paths
            .iter()
            .find(|p| btf.has_member(s, p))
            .ok_or_else(|| anyhow!("struct {s} has none of the members {:?}", self.paths))?;
        btf.is_pointer(s, p)
    }
}

/// A field of a tracepoint record: the names it has had, newest first, and its size.
pub struct TpField {
    pub names: &'static [&'static str],
    pub size: u32,
}

impl TpField {
    const fn of(names: &'static [&'static str], size: u32) -> TpField {
        TpField { names, size }
    }

    pub fn offset(&self, f: &Format) -> Result<u32> {
        f.offset(self.names, self.size)
    }
}

/// File locks (struct file_lock) and an inode's lock lists. 6.9 moved the common part
/// into `c`, a struct file_lock_core with `flc_*` members; before, `fl_*` in
/// file_lock itself.
pub mod lock {
    use super::Member;

    const LOCK: &[&str] = &["file_lock"];
    pub const LIST: Member = Member::of(LOCK, &["c.flc_list", "fl_list"]);
    pub const FILE: Member = Member::of(LOCK, &["c.flc_file", "fl_file"]);
    pub const OWNER: Member = Member::of(LOCK, &["c.flc_owner", "fl_owner"]);
    pub const FLAGS: Member = Member::of(LOCK, &["c.flc_flags", "fl_flags"]);
    pub const TYPE: Member = Member::of(LOCK, &["c.flc_type", "fl_type"]);
    pub const PID: Member = Member::of(LOCK, &["c.flc_pid", "fl_pid"]);
    pub const BLOCKER: Member = Member::of(LOCK, &["c.flc_blocker", "fl_blocker"]);
    pub const BLOCKED_REQUESTS: Member =
        Member::of(LOCK, &["c.flc_blocked_requests", "fl_blocked_requests"]);
    pub const BLOCKED_MEMBER: Member =
        Member::of(LOCK, &["c.flc_blocked_member", "fl_blocked_member"]);
    pub const START: Member = Member::of(LOCK, &["fl_start"]);
    pub const END: Member = Member::of(LOCK, &["fl_end"]);
    pub const INODE_FLCTX: Member = Member::of(&["inode"], &["i_flctx"]);
    pub const CTX_POSIX: Member = Member::of(&["file_lock_context"], &["flc_posix"]);
    pub const CTX_FLOCK: Member = Member::of(&["file_lock_context"], &["flc_flock"]);
    pub const CTX_LEASE: Member = Member::of(&["file_lock_context"], &["flc_lease"]);
}

/// Leases: a struct file_lease of their own since 6.9 (its common part where a
/// file_lock's is), a struct file_lock before.
pub mod lease {
    use super::{Member, TpField};

    const LEASE: &[&str] = &["file_lease", "file_lock"];
    pub const BREAK_TIME: Member = Member::of(LEASE, &["fl_break_time"]);
    pub const DOWNGRADE_TIME: Member = Member::of(LEASE, &["fl_downgrade_time"]);

    /// The filelock_lease tracepoint class: 6.9 dropped the `fl_` prefixes.
    pub mod tp {
        use super::TpField;

        pub const FL: TpField = TpField::of(&["fl"], 8);
        pub const I_INO: TpField = TpField::of(&["i_ino"], 8);
        pub const S_DEV: TpField = TpField::of(&["s_dev"], 4);
        pub const OWNER: TpField = TpField::of(&["owner", "fl_owner"], 8);
        pub const FLAGS: TpField = TpField::of(&["flags", "fl_flags"], 4);
        pub const TYPE: TpField = TpField::of(&["type", "fl_type"], 1);
        pub const BREAK_TIME: TpField = TpField::of(&["break_time", "fl_break_time"], 8);
        pub const DOWNGRADE_TIME: TpField =
            TpField::of(&["downgrade_time", "fl_downgrade_time"], 8);
    }

    /// filelock:leases_conflict.
    pub mod conflict {
        use super::TpField;

        pub const LEASE: TpField = TpField::of(&["lease"], 8);
        pub const BREAKER: TpField = TpField::of(&["breaker"], 8);
        pub const BREAKER_TYPE: TpField = TpField::of(&["b_fl_type"], 1);
        pub const CONFLICT: TpField = TpField::of(&["conflict"], 1);
    }
}

/// signal:signal_generate and signal:signal_deliver (lease break notices, and the end
/// of a wait a handler interrupts).
pub mod signal {
    use super::TpField;

    pub const SIG: TpField = TpField::of(&["sig"], 4);
    pub const PID: TpField = TpField::of(&["pid"], 4);
    pub const RESULT: TpField = TpField::of(&["result"], 4);
    pub const HANDLER: TpField = TpField::of(&["sa_handler"], 8);
    pub const FLAGS: TpField = TpField::of(&["sa_flags"], 8);
}

/// Open files as the task_file iterator reads them: the task, its fd table, the file,
/// its mount, inode and superblock.
pub mod file {
    use super::Member;

    pub const TASK_TGID: Member = Member::of(&["task_struct"], &["tgid"]);
    pub const TASK_FILES: Member = Member::of(&["task_struct"], &["files"]);
    pub const FILES_FDT: Member = Member::of(&["files_struct"], &["fdt"]);
    pub const FDT_CLOSE_ON_EXEC: Member = Member::of(&["fdtable"], &["close_on_exec"]);
    pub const FDT_FD: Member = Member::of(&["fdtable"], &["fd"]);
    pub const FDT_MAX_FDS: Member = Member::of(&["fdtable"], &["max_fds"]);
    pub const POS: Member = Member::of(&["file"], &["f_pos"]);
    pub const FLAGS: Member = Member::of(&["file"], &["f_flags"]);
    pub const MODE: Member = Member::of(&["file"], &["f_mode"]);
    pub const INODE: Member = Member::of(&["file"], &["f_inode"]);
    pub const PATH: Member = Member::of(&["file"], &["f_path"]);
    pub const MNT: Member = Member::of(&["file"], &["f_path.mnt"]);
    /// Embedded before 6.12, a pointer since (`fown_struct *`).
    pub const OWNER: Member = Member::of(&["file"], &["f_owner"]);
    pub const FOWN_PID: Member = Member::of(&["fown_struct"], &["pid"]);
    pub const FOWN_PID_TYPE: Member = Member::of(&["fown_struct"], &["pid_type"]);
    pub const FOWN_SIGNUM: Member = Member::of(&["fown_struct"], &["signum"]);
    pub const PID_NUMBERS: Member = Member::of(&["pid"], &["numbers"]);
    pub const UPID_NR: Member = Member::of(&["upid"], &["nr"]);
    pub const MOUNT_MNT: Member = Member::of(&["mount"], &["mnt"]);
    pub const MOUNT_ID: Member = Member::of(&["mount"], &["mnt_id"]);
    pub const VMA_START: Member = Member::of(&["vm_area_struct"], &["vm_start"]);
    pub const VMA_END: Member = Member::of(&["vm_area_struct"], &["vm_end"]);
    pub const VMA_FILE: Member = Member::of(&["vm_area_struct"], &["vm_file"]);
}

/// Inodes and superblocks. Timestamps moved twice: `i_mtime_sec`/`i_mtime_nsec`
/// (6.11+), a `struct timespec64 __i_mtime` (6.6-6.10), `i_mtime` (6.1).
pub mod inode {
    use super::Member;

    const INODE: &[&str] = &["inode"];
    pub const INO: Member = Member::of(INODE, &["i_ino"]);
    pub const SB: Member = Member::of(INODE, &["i_sb"]);
    pub const MODE: Member = Member::of(INODE, &["i_mode"]);
    pub const NLINK: Member = Member::of(INODE, &["i_nlink"]);
    pub const SIZE: Member = Member::of(INODE, &["i_size"]);
    pub const BLOCKS: Member = Member::of(INODE, &["i_blocks"]);
    pub const GENERATION: Member = Member::of(INODE, &["i_generation"]);
    pub const STATE: Member = Member::of(INODE, &["i_state"]);
    pub const MTIME_SEC: Member = Member::of(
        INODE,
        &["i_mtime_sec", "__i_mtime.tv_sec", "i_mtime.tv_sec"],
    );
    pub const MTIME_NSEC: Member = Member::of(
        INODE,
        &["i_mtime_nsec", "__i_mtime.tv_nsec", "i_mtime.tv_nsec"],
    );
    pub const CTIME_SEC: Member = Member::of(
        INODE,
        &["i_ctime_sec", "__i_ctime.tv_sec", "i_ctime.tv_sec"],
    );
    pub const CTIME_NSEC: Member = Member::of(
        INODE,
        &["i_ctime_nsec", "__i_ctime.tv_nsec", "i_ctime.tv_nsec"],
    );
    pub const SB_DEV: Member = Member::of(&["super_block"], &["s_dev"]);
    /// `I_LINKABLE`: a BTF enumerator since 6.13 (and renumbered since), before that a
    /// #define BTF does not carry, of this value.
    pub const I_LINKABLE_BEFORE_6_13: u32 = 1 << 10;
}

/// Tasks, as dump reads them: parent, credentials, exec generation, working directory.
pub mod task {
    use super::Member;

    const TASK: &[&str] = &["task_struct"];
    pub const REAL_PARENT: Member = Member::of(TASK, &["real_parent"]);
    pub const REAL_CRED: Member = Member::of(TASK, &["real_cred"]);
    pub const SELF_EXEC_ID: Member = Member::of(TASK, &["self_exec_id"]);
    pub const COMM: Member = Member::of(TASK, &["comm"]);
    pub const EXIT_STATE: Member = Member::of(TASK, &["exit_state"]);
    pub const FLAGS: Member = Member::of(TASK, &["flags"]);
    pub const FS: Member = Member::of(TASK, &["fs"]);
    pub const FS_PWD_MNT: Member = Member::of(&["fs_struct"], &["pwd.mnt"]);
    pub const FS_PWD_DENTRY: Member = Member::of(&["fs_struct"], &["pwd.dentry"]);
    pub const CRED_UID: Member = Member::of(&["cred"], &["uid"]);
    pub const CRED_EUID: Member = Member::of(&["cred"], &["euid"]);
    pub const CRED_GID: Member = Member::of(&["cred"], &["gid"]);
    pub const CRED_EGID: Member = Member::of(&["cred"], &["egid"]);
}

/// The syscall tracepoints of `ckpt-agent --exact-deleted`'s triggers.
pub mod syscalls {
    use super::TpField;

    pub const FD: TpField = TpField::of(&["fd"], 8);
    pub const FLAGS: TpField = TpField::of(&["flags"], 8);
    pub const HOW: TpField = TpField::of(&["how"], 8);
    pub const RET: TpField = TpField::of(&["ret"], 8);
}
