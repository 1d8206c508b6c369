//! Tracepoint `format` files, and the [`KernelLayout`] the programs get: each offset
//! bound to its entry in `layouts`, the one table of where the kernel keeps what (the
//! names a field has had across kernels, newest first).

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context as _, Result};
use ckpt_common::files::LOCK_SPAN;
use ckpt_common::offsets::{
    BreakTpOffsets, DeletedTpOffsets, FileIterOffsets, KernelLayout, LeaseStructOffsets,
    LeaseTpOffsets, LockListOffsets, TaskIterOffsets,
};

use super::{btf::Btf, layouts};
use crate::sys::mounts::event_dir;

/// A field of a tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// Parsed `format` file: field name -> offset and size.
#[derive(Clone, Debug, Default)]
pub struct Format {
    pub fields: HashMap<String, Field>,
}

impl Format {
    pub fn parse(text: &str) -> Result<Format> {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            let Some(rest) = line.strip_prefix("field:") else {
                continue;
            };
            let mut decl = "";
            let mut offset = None;
            let mut size = None;
            for part in rest.split(';') {
                let part = part.trim();
                if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.parse().ok();
                } else if decl.is_empty() {
                    decl = part;
                }
            }
            // "unsigned long i_ino" / "char comm[16]": the name is the last word.
            let name = decl
                .rsplit(|c: char| c.is_whitespace() || c == '*')
                .next()
                .unwrap_or("")
                .split('[')
                .next()
                .unwrap_or("");
            match (offset, size) {
                (Some(offset), Some(size)) if !name.is_empty() => {
                    fields.insert(name.to_string(), Field { offset, size });
                }
                _ => bail!("malformed field line: {line}"),
            }
        }
        if fields.is_empty() {
            bail!("no fields");
        }
        Ok(Format { fields })
    }

    pub fn read(category: &str, name: &str) -> Result<Format> {
        let path = event_dir(category, name).join("format");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("tracepoint {category}:{name} not available ({path:?})"))?;
        Format::parse(&text).with_context(|| format!("parsing {path:?}"))
    }

    /// Offset of the first of `names` present, checking its size.
    pub fn offset(&self, names: &[&str], size: u32) -> Result<u32> {
        for n in names {
            if let Some(f) = self.fields.get(*n) {
                if f.size != size {
                    bail!("field {n} has size {} (expected {size})", f.size);
                }
                return Ok(f.offset);
            }
        }
        Err(anyhow!("none of the fields {names:?} present"))
    }
}

/// Offsets of the filelock_lease event class.
pub fn lease_offsets(f: &Format) -> Result<LeaseTpOffsets> {
    use layouts::lease::tp;
    Ok(LeaseTpOffsets {
        fl: tp::FL.offset(f)?,
        i_ino: tp::I_INO.offset(f)?,
        s_dev: tp::S_DEV.offset(f)?,
        owner: tp::OWNER.offset(f)?,
        flags: tp::FLAGS.offset(f)?,
        lease_type: tp::TYPE.offset(f)?,
        break_time: tp::BREAK_TIME.offset(f)?,
        downgrade_time: tp::DOWNGRADE_TIME.offset(f)?,
    })
}

/// The lease tracepoints that share the filelock_lease class; the programs use one set
/// of offsets for all of them, so they must agree.
const LEASE_CLASS: &[&str] = &[
    "generic_delete_lease",
    "break_lease_noblock",
    "break_lease_block",
    "break_lease_unblock",
    "time_out_leases",
];

/// Offsets inside the kernel's lease object, from BTF.
pub fn lease_struct_offsets(btf: &Btf) -> Result<LeaseStructOffsets> {
    // A struct file_lease's common part must sit where a file_lock's does:
    // lock_list_offsets serves both.
    if btf.has_struct("file_lease")
        && btf.offset_of("file_lease", "c")? != btf.offset_of("file_lock", "c")?
    {
        bail!("struct file_lease and struct file_lock start differently");
    }
    Ok(LeaseStructOffsets {
        break_time: layouts::lease::BREAK_TIME.offset(btf)?,
        downgrade_time: layouts::lease::DOWNGRADE_TIME.offset(btf)?,
    })
}

/// Offsets of an inode's lock lists and of the fields every lock has, from BTF.
pub fn lock_list_offsets(btf: &Btf, lease: &LeaseStructOffsets) -> Result<LockListOffsets> {
    use layouts::lock as l;
    let o = LockListOffsets {
        inode_flctx: l::INODE_FLCTX.offset(btf)?,
        ctx_posix: l::CTX_POSIX.offset(btf)?,
        ctx_flock: l::CTX_FLOCK.offset(btf)?,
        ctx_lease: l::CTX_LEASE.offset(btf)?,
        list: l::LIST.offset(btf)?,
        file: l::FILE.offset(btf)?,
        owner: l::OWNER.offset(btf)?,
        flags: l::FLAGS.offset(btf)?,
        lock_type: l::TYPE.offset(btf)?,
        pid: l::PID.offset(btf)?,
        blocker: l::BLOCKER.offset(btf)?,
        blocked_requests: l::BLOCKED_REQUESTS.offset(btf)?,
        blocked_member: l::BLOCKED_MEMBER.offset(btf)?,
        start: l::START.offset(btf)?,
        end: l::END.offset(btf)?,
    };
    check_spans(&o, lease)?;
    Ok(o)
}

/// The lock walks read a lock's first `LOCK_SPAN` bytes at once and take the fields
/// from that copy.
fn check_spans(o: &LockListOffsets, lease: &LeaseStructOffsets) -> Result<()> {
    let lock_end = [
        (o.list, 16),
        (o.blocker, 8),
        (o.blocked_requests, 16),
        (o.blocked_member, 16),
        (lease.break_time, 8),
        (lease.downgrade_time, 8),
        (o.file, 8),
        (o.owner, 8),
        (o.flags, 4),
        (o.lock_type, 1),
        (o.pid, 4),
        (o.start, 8),
        (o.end, 8),
    ]
    .iter()
    .map(|(off, size)| off + size)
    .max()
    .unwrap_or(0);
    if lock_end as usize > LOCK_SPAN {
        bail!(
            "struct file_lock fields end at byte {lock_end} (> {LOCK_SPAN}): raise \
             LOCK_SPAN in ckpt-common/src/files.rs"
        );
    }
    Ok(())
}

/// Offsets for the task_file iterator, from BTF.
pub fn file_iter_offsets(btf: &Btf) -> Result<FileIterOffsets> {
    use layouts::{file as f, inode as i};
    let mount_mnt = f::MOUNT_MNT.offset(btf)?;
    let mount_id = f::MOUNT_ID.offset(btf)?;
    Ok(FileIterOffsets {
        task_tgid: f::TASK_TGID.offset(btf)?,
        task_files: f::TASK_FILES.offset(btf)?,
        files_fdt: f::FILES_FDT.offset(btf)?,
        fdt_close_on_exec: f::FDT_CLOSE_ON_EXEC.offset(btf)?,
        file_pos: f::POS.offset(btf)?,
        file_flags: f::FLAGS.offset(btf)?,
        file_mode: f::MODE.offset(btf)?,
        file_inode: f::INODE.offset(btf)?,
        file_path: f::PATH.offset(btf)?,
        file_mnt: f::MNT.offset(btf)?,
        file_owner: f::OWNER.offset(btf)?,
        owner_is_ptr: u32::from(f::OWNER.is_pointer(btf)?),
        fown_pid: f::FOWN_PID.offset(btf)?,
        fown_pid_type: f::FOWN_PID_TYPE.offset(btf)?,
        fown_signum: f::FOWN_SIGNUM.offset(btf)?,
        pid_nr: f::PID_NUMBERS.offset(btf)? + f::UPID_NR.offset(btf)?,
        vfsmount_mnt_id: mount_id as i32 - mount_mnt as i32,
        inode_ino: i::INO.offset(btf)?,
        inode_sb: i::SB.offset(btf)?,
        inode_mode: i::MODE.offset(btf)?,
        inode_nlink: i::NLINK.offset(btf)?,
        inode_size: i::SIZE.offset(btf)?,
        inode_blocks: i::BLOCKS.offset(btf)?,
        inode_generation: i::GENERATION.offset(btf)?,
        inode_mtime_sec: i::MTIME_SEC.offset(btf)?,
        inode_mtime_nsec: i::MTIME_NSEC.offset(btf)?,
        inode_ctime_sec: i::CTIME_SEC.offset(btf)?,
        inode_ctime_nsec: i::CTIME_NSEC.offset(btf)?,
        inode_state: i::STATE.offset(btf)?,
        i_linkable: btf
            .enumerator("I_LINKABLE")
            .map_or(i::I_LINKABLE_BEFORE_6_13, |v| v as u32),
        sb_dev: i::SB_DEV.offset(btf)?,
    })
}

pub fn task_iter_offsets(btf: &Btf) -> Result<TaskIterOffsets> {
    use layouts::task as t;
    Ok(TaskIterOffsets {
        real_parent: t::REAL_PARENT.offset(btf)?,
        real_cred: t::REAL_CRED.offset(btf)?,
        self_exec_id: t::SELF_EXEC_ID.offset(btf)?,
        comm: t::COMM.offset(btf)?,
        exit_state: t::EXIT_STATE.offset(btf)?,
        flags: t::FLAGS.offset(btf)?,
        fs: t::FS.offset(btf)?,
        fs_pwd_mnt: t::FS_PWD_MNT.offset(btf)?,
        fs_pwd_dentry: t::FS_PWD_DENTRY.offset(btf)?,
        cred_uid: t::CRED_UID.offset(btf)?,
        cred_euid: t::CRED_EUID.offset(btf)?,
        cred_gid: t::CRED_GID.offset(btf)?,
        cred_egid: t::CRED_EGID.offset(btf)?,
    })
}

/// The syscall exits the deleted-file triggers watch (`tracer::loader` attaches those
/// this kernel has).
pub const DELETED_EXITS: &[&str] = &[
    "sys_exit_unlink",
    "sys_exit_unlinkat",
    "sys_exit_rename",
    "sys_exit_renameat",
    "sys_exit_renameat2",
    "sys_exit_link",
    "sys_exit_linkat",
    "sys_exit_openat",
    "sys_exit_open",
    "sys_exit_openat2",
    "sys_exit_close",
    "sys_exit_dup",
    "sys_exit_dup2",
    "sys_exit_dup3",
    "sys_exit_close_range",
    "sys_exit_munmap",
    "sys_exit_fcntl",
];

/// Offsets for the deleted-file triggers and scans. Optional syscalls (no `open` on
/// some architectures) read as 0: their programs are not attached.
pub fn deleted_offsets(btf: &Btf) -> Result<DeletedTpOffsets> {
    use layouts::{file as f, syscalls as sc};
    let optional = |event: &str, field: &layouts::TpField| -> Result<u32> {
        match Format::read("syscalls", event) {
            Ok(fmt) => field
                .offset(&fmt)
                .with_context(|| format!("syscalls:{event}")),
            Err(_) => Ok(0),
        }
    };
    let mut exit_ret = None;
    for event in DELETED_EXITS {
        let Ok(fmt) = Format::read("syscalls", event) else {
            continue;
        };
        let off = sc::RET
            .offset(&fmt)
            .with_context(|| format!("syscalls:{event}"))?;
        match exit_ret {
            None => exit_ret = Some(off),
            Some(o) if o != off => {
                bail!("syscalls:{event}: ret at {off}, not {o} as in the others")
            }
            _ => {}
        }
    }
    Ok(DeletedTpOffsets {
        close_fd: sc::FD.offset(&Format::read("syscalls", "sys_enter_close")?)?,
        openat_flags: sc::FLAGS.offset(&Format::read("syscalls", "sys_enter_openat")?)?,
        open_flags: optional("sys_enter_open", &sc::FLAGS)?,
        openat2_how: optional("sys_enter_openat2", &sc::HOW)?,
        exit_ret: exit_ret.ok_or_else(|| anyhow!("no syscall exit tracepoint found"))?,
        fdt_fd: f::FDT_FD.offset(btf)?,
        fdt_max_fds: f::FDT_MAX_FDS.offset(btf)?,
        vma_start: f::VMA_START.offset(btf)?,
        vma_end: f::VMA_END.offset(btf)?,
        vma_file: f::VMA_FILE.offset(btf)?,
    })
}

/// Reads this kernel's format files and BTF and builds the layout the programs need.
pub fn resolve_layout() -> Result<KernelLayout> {
    use layouts::{lease::conflict as c, signal as sg};
    let mut lease = None;
    for name in LEASE_CLASS {
        let o = lease_offsets(&Format::read("filelock", name)?)
            .with_context(|| format!("filelock:{name}"))?;
        match lease {
            None => lease = Some(o),
            Some(first) if first != o => {
                bail!("filelock:{name} differs from the other lease tracepoints")
            }
            _ => {}
        }
    }
    let conflict = Format::read("filelock", "leases_conflict")?;
    let signal = Format::read("signal", "signal_generate")?;
    let deliver = Format::read("signal", "signal_deliver")?;
    let btf = Btf::from_sys_fs()?;
    let lease_struct = lease_struct_offsets(&btf).context("lease struct offsets from BTF")?;
    Ok(KernelLayout {
        lease: lease.expect("LEASE_CLASS is not empty"),
        brk: BreakTpOffsets {
            conflict_lease: c::LEASE.offset(&conflict)?,
            conflict_breaker: c::BREAKER.offset(&conflict)?,
            conflict_b_type: c::BREAKER_TYPE.offset(&conflict)?,
            conflict: c::CONFLICT.offset(&conflict)?,
            signal_sig: sg::SIG.offset(&signal)?,
            signal_pid: sg::PID.offset(&signal)?,
            signal_result: sg::RESULT.offset(&signal)?,
            deliver_handler: sg::HANDLER.offset(&deliver)?,
            deliver_flags: sg::FLAGS.offset(&deliver)?,
        },
        lease_struct,
        lock_lists: lock_list_offsets(&btf, &lease_struct).context("lock list offsets from BTF")?,
        files: file_iter_offsets(&btf).context("file offsets from BTF")?,
        tasks: task_iter_offsets(&btf).context("task offsets from BTF")?,
        deleted: deleted_offsets(&btf).context("deleted-file trigger offsets")?,
        hold_times: 0,
        valid: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 6.18's filelock_lease class.
    const NEW: &str = "name: generic_delete_lease
ID: 1
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:struct file_lease * fl;\toffset:8;\tsize:8;\tsigned:0;
\tfield:unsigned long i_ino;\toffset:16;\tsize:8;\tsigned:0;
\tfield:dev_t s_dev;\toffset:24;\tsize:4;\tsigned:0;
\tfield:struct file_lock_core * blocker;\toffset:32;\tsize:8;\tsigned:0;
\tfield:fl_owner_t owner;\toffset:40;\tsize:8;\tsigned:0;
\tfield:unsigned int flags;\toffset:48;\tsize:4;\tsigned:0;
\tfield:unsigned char type;\toffset:52;\tsize:1;\tsigned:0;
\tfield:unsigned long break_time;\toffset:56;\tsize:8;\tsigned:0;
\tfield:unsigned long downgrade_time;\toffset:64;\tsize:8;\tsigned:0;

print fmt: \"fl=%p\"
";

    /// 6.1's names (fl_ prefixes).
    const OLD: &str = "format:
\tfield:struct file_lock * fl;\toffset:8;\tsize:8;\tsigned:0;
\tfield:unsigned long i_ino;\toffset:16;\tsize:8;\tsigned:0;
\tfield:dev_t s_dev;\toffset:24;\tsize:4;\tsigned:0;
\tfield:struct file_lock * fl_blocker;\toffset:32;\tsize:8;\tsigned:0;
\tfield:fl_owner_t fl_owner;\toffset:40;\tsize:8;\tsigned:0;
\tfield:unsigned int fl_flags;\toffset:48;\tsize:4;\tsigned:0;
\tfield:unsigned char fl_type;\toffset:52;\tsize:1;\tsigned:0;
\tfield:unsigned long fl_break_time;\toffset:56;\tsize:8;\tsigned:0;
\tfield:unsigned long fl_downgrade_time;\toffset:64;\tsize:8;\tsigned:0;
";

    #[test]
    fn resolves_both_naming_generations_to_the_same_offsets() {
        let new = lease_offsets(&Format::parse(NEW).unwrap()).unwrap();
        let old = lease_offsets(&Format::parse(OLD).unwrap()).unwrap();
        assert_eq!(new, old);
        assert_eq!(new.owner, 40);
        assert_eq!(new.lease_type, 52);
        assert_eq!(new.downgrade_time, 64);
    }

    #[test]
    fn missing_or_resized_field_is_an_error() {
        let f = Format::parse(&NEW.replace("downgrade_time", "other")).unwrap();
        assert!(lease_offsets(&f).is_err());
        let f = Format::parse(&NEW.replace(
            "size:4;\tsigned:0;\n\tfield:unsigned char",
            "size:8;\tsigned:0;\n\tfield:unsigned char",
        ))
        .unwrap();
        assert!(lease_offsets(&f).is_err());
    }

    #[test]
    fn array_fields_are_named_without_brackets() {
        let f = Format::parse("\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n").unwrap();
        assert_eq!(f.offset(&["comm"], 16).unwrap(), 8);
    }

    /// The table's struct members all resolve on the kernel this runs on (its BTF is
    /// world-readable), to a consistent layout.
    #[test]
    fn every_member_in_the_layout_table_resolves_on_this_kernel() {
        let btf = Btf::from_sys_fs().expect("this kernel's BTF");
        let lease = lease_struct_offsets(&btf).unwrap();
        let locks = lock_list_offsets(&btf, &lease).unwrap();
        let files = file_iter_offsets(&btf).unwrap();
        let tasks = task_iter_offsets(&btf).unwrap();
        assert!(locks.end > locks.start);
        assert!(lease.downgrade_time > lease.break_time);
        assert!(files.inode_mtime_nsec > files.inode_mtime_sec);
        assert!(files.inode_ctime_nsec > files.inode_ctime_sec);
        assert_ne!(tasks.cred_euid, tasks.cred_uid);
        assert_ne!(tasks.fs_pwd_dentry, tasks.fs_pwd_mnt);
    }
}
