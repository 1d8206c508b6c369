//! Tracepoint `format` files and the [`KernelLayout`] derived from them.
//!
//! Field names changed across kernels (6.1: `fl_owner`, `fl_flags`, `fl_type`,
//! `fl_pid`, `fl_blocker`; 6.9+: `owner`, `flags`, `type`, `pid`, `blocker`), so each
//! logical field lists the names it may have, newest first.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context as _, Result};
use ckpt_common::files::LOCK_SPAN;
use ckpt_common::offsets::{
    BreakTpOffsets, DeletedTpOffsets, FileIterOffsets, KernelLayout, LeaseStructOffsets,
    LeaseTpOffsets, LockListOffsets, TaskIterOffsets,
};

use super::btf::Btf;
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
    Ok(LeaseTpOffsets {
        fl: f.offset(&["fl"], 8)?,
        i_ino: f.offset(&["i_ino"], 8)?,
        s_dev: f.offset(&["s_dev"], 4)?,
        owner: f.offset(&["owner", "fl_owner"], 8)?,
        flags: f.offset(&["flags", "fl_flags"], 4)?,
        lease_type: f.offset(&["type", "fl_type"], 1)?,
        break_time: f.offset(&["break_time", "fl_break_time"], 8)?,
        downgrade_time: f.offset(&["downgrade_time", "fl_downgrade_time"], 8)?,
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

/// Offsets inside the kernel's lease object, from BTF: `struct file_lease` (6.9+) or
/// `struct file_lock` (before 6.9).
pub fn lease_struct_offsets(btf: &Btf) -> Result<LeaseStructOffsets> {
    let s = if btf.has_struct("file_lease") {
        // Its common part must sit where a file_lock's does: lock_list_offsets
        // serves both.
        if btf.offset_of("file_lease", "c")? != btf.offset_of("file_lock", "c")? {
            bail!("struct file_lease and struct file_lock start differently");
        }
        "file_lease"
    } else {
        "file_lock"
    };
    Ok(LeaseStructOffsets {
        break_time: btf.offset_of(s, "fl_break_time")?,
        downgrade_time: btf.offset_of(s, "fl_downgrade_time")?,
    })
}

/// Offsets of an inode's lock lists and of the fields every lock has, from BTF: 6.9+
/// keeps them in `c` (struct file_lock_core), 6.1 in struct file_lock as `fl_*`.
pub fn lock_list_offsets(btf: &Btf, lease: &LeaseStructOffsets) -> Result<LockListOffsets> {
    let common = |name: &str| -> Result<u32> {
        if btf.has_struct("file_lock_core") {
            btf.offset_of("file_lock", &format!("c.flc_{name}"))
        } else {
            btf.offset_of("file_lock", &format!("fl_{name}"))
        }
    };
    let o = LockListOffsets {
        inode_flctx: btf.offset_of("inode", "i_flctx")?,
        ctx_posix: btf.offset_of("file_lock_context", "flc_posix")?,
        ctx_flock: btf.offset_of("file_lock_context", "flc_flock")?,
        ctx_lease: btf.offset_of("file_lock_context", "flc_lease")?,
        list: common("list")?,
        file: common("file")?,
        owner: common("owner")?,
        flags: common("flags")?,
        lock_type: common("type")?,
        pid: common("pid")?,
        blocker: common("blocker")?,
        blocked_requests: common("blocked_requests")?,
        blocked_member: common("blocked_member")?,
        start: btf.offset_of("file_lock", "fl_start")?,
        end: btf.offset_of("file_lock", "fl_end")?,
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

/// Offsets for the task_file iterator, from BTF. Inode timestamps moved twice: a
/// `struct timespec64 i_mtime` (6.1), `__i_mtime`/`__i_ctime` (6.6-6.10), then
/// separate `i_mtime_sec`/`i_mtime_nsec` fields (6.11+).
pub fn file_iter_offsets(btf: &Btf) -> Result<FileIterOffsets> {
    let first = |s: &str, names: &[&str]| -> Result<u32> {
        names
            .iter()
            .find_map(|n| btf.offset_of(s, n).ok())
            .ok_or_else(|| anyhow!("struct {s} has none of the members {names:?}"))
    };
    let (mtime_sec, mtime_nsec, ctime_sec, ctime_nsec) = if btf.has_member("inode", "i_mtime_sec") {
        (
            btf.offset_of("inode", "i_mtime_sec")?,
            btf.offset_of("inode", "i_mtime_nsec")?,
            btf.offset_of("inode", "i_ctime_sec")?,
            btf.offset_of("inode", "i_ctime_nsec")?,
        )
    } else {
        let m = first("inode", &["i_mtime", "__i_mtime"])?;
        let c = first("inode", &["i_ctime", "__i_ctime"])?;
        let nsec = btf.offset_of("timespec64", "tv_nsec")?;
        (m, m + nsec, c, c + nsec)
    };
    let mount_mnt = btf.offset_of("mount", "mnt")?;
    let mount_id = btf.offset_of("mount", "mnt_id")?;
    Ok(FileIterOffsets {
        task_tgid: btf.offset_of("task_struct", "tgid")?,
        task_files: btf.offset_of("task_struct", "files")?,
        files_fdt: btf.offset_of("files_struct", "fdt")?,
        fdt_close_on_exec: btf.offset_of("fdtable", "close_on_exec")?,
        file_pos: btf.offset_of("file", "f_pos")?,
        file_flags: btf.offset_of("file", "f_flags")?,
        file_mode: btf.offset_of("file", "f_mode")?,
        file_inode: btf.offset_of("file", "f_inode")?,
        file_path: btf.offset_of("file", "f_path")?,
        file_mnt: btf.offset_of("file", "f_path.mnt")?,
        file_owner: btf.offset_of("file", "f_owner")?,
        owner_is_ptr: u32::from(btf.is_pointer("file", "f_owner")?),
        fown_pid: btf.offset_of("fown_struct", "pid")?,
        fown_pid_type: btf.offset_of("fown_struct", "pid_type")?,
        fown_signum: btf.offset_of("fown_struct", "signum")?,
        pid_nr: btf.offset_of("pid", "numbers")? + btf.offset_of("upid", "nr")?,
        vfsmount_mnt_id: mount_id as i32 - mount_mnt as i32,
        inode_ino: btf.offset_of("inode", "i_ino")?,
        inode_sb: btf.offset_of("inode", "i_sb")?,
        inode_mode: btf.offset_of("inode", "i_mode")?,
        inode_nlink: btf.offset_of("inode", "i_nlink")?,
        inode_size: btf.offset_of("inode", "i_size")?,
        inode_blocks: btf.offset_of("inode", "i_blocks")?,
        inode_generation: btf.offset_of("inode", "i_generation")?,
        inode_mtime_sec: mtime_sec,
        inode_mtime_nsec: mtime_nsec,
        inode_ctime_sec: ctime_sec,
        inode_ctime_nsec: ctime_nsec,
        inode_state: btf.offset_of("inode", "i_state")?,
        // An enumerator since 6.13 (and renumbered since); before that a #define of
        // 1 << 10 that BTF does not carry.
        i_linkable: btf.enumerator("I_LINKABLE").map_or(1 << 10, |v| v as u32),
        sb_dev: btf.offset_of("super_block", "s_dev")?,
    })
}

pub fn task_iter_offsets(btf: &Btf) -> Result<TaskIterOffsets> {
    let pwd = btf.offset_of("fs_struct", "pwd")?;
    Ok(TaskIterOffsets {
        real_parent: btf.offset_of("task_struct", "real_parent")?,
        real_cred: btf.offset_of("task_struct", "real_cred")?,
        self_exec_id: btf.offset_of("task_struct", "self_exec_id")?,
        comm: btf.offset_of("task_struct", "comm")?,
        exit_state: btf.offset_of("task_struct", "exit_state")?,
        flags: btf.offset_of("task_struct", "flags")?,
        fs: btf.offset_of("task_struct", "fs")?,
        fs_pwd_mnt: pwd + btf.offset_of("path", "mnt")?,
        fs_pwd_dentry: pwd + btf.offset_of("path", "dentry")?,
        cred_uid: btf.offset_of("cred", "uid")?,
        cred_euid: btf.offset_of("cred", "euid")?,
        cred_gid: btf.offset_of("cred", "gid")?,
        cred_egid: btf.offset_of("cred", "egid")?,
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
    let optional = |event: &str, field: &str| -> Result<u32> {
        match Format::read("syscalls", event) {
            Ok(f) => f
                .offset(&[field], 8)
                .with_context(|| format!("syscalls:{event}")),
            Err(_) => Ok(0),
        }
    };
    let mut exit_ret = None;
    for event in DELETED_EXITS {
        let Ok(f) = Format::read("syscalls", event) else {
            continue;
        };
        let off = f
            .offset(&["ret"], 8)
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
        close_fd: Format::read("syscalls", "sys_enter_close")?.offset(&["fd"], 8)?,
        openat_flags: Format::read("syscalls", "sys_enter_openat")?.offset(&["flags"], 8)?,
        open_flags: optional("sys_enter_open", "flags")?,
        openat2_how: optional("sys_enter_openat2", "how")?,
        exit_ret: exit_ret.ok_or_else(|| anyhow!("no syscall exit tracepoint found"))?,
        fdt_fd: btf.offset_of("fdtable", "fd")?,
        fdt_max_fds: btf.offset_of("fdtable", "max_fds")?,
        vma_start: btf.offset_of("vm_area_struct", "vm_start")?,
        vma_end: btf.offset_of("vm_area_struct", "vm_end")?,
        vma_file: btf.offset_of("vm_area_struct", "vm_file")?,
    })
}

/// Reads this kernel's format files and BTF and builds the layout the programs need.
pub fn resolve_layout() -> Result<KernelLayout> {
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
            conflict_lease: conflict.offset(&["lease"], 8)?,
            conflict_breaker: conflict.offset(&["breaker"], 8)?,
            conflict_b_type: conflict.offset(&["b_fl_type"], 1)?,
            conflict: conflict.offset(&["conflict"], 1)?,
            signal_sig: signal.offset(&["sig"], 4)?,
            signal_pid: signal.offset(&["pid"], 4)?,
            signal_result: signal.offset(&["result"], 4)?,
            deliver_handler: deliver.offset(&["sa_handler"], 8)?,
            deliver_flags: deliver.offset(&["sa_flags"], 8)?,
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
}
