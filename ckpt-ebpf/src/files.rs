//! The task_file iterator: one record per fd of the process a link is aimed at, with
//! what /proc/PID/fd (path), fdinfo (pos, flags, mnt_id) and fstat (inode facts)
//! would tell, plus the kernel identities /proc hides: the open file description and
//! the fd table, which are the owners of OFD/flock and POSIX locks. The session's
//! first fd is preceded by a record of the process itself (status, comm, cwd
//! identity).
//!
//! The agent only loads and pins the two programs (with and without `d_path`, the
//! costly part); `ckpt-user dump` creates one link per process (Linux 6.1+ iterator
//! parameters) and reads them in parallel while the cgroup is frozen, instead of four
//! /proc reads and a pidfd_getfd per fd. BPF iterators are tracing programs that,
//! unlike fentry, load on our hosts (see TOOLCHAIN.md).

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{helpers::generated::bpf_seq_write, macros::map, maps::PerCpuArray};
use ckpt_common::files::{tag, FdScratch, FD_RECORD_SIZE, PATH_MAX, TASK_RECORD_SIZE};

use crate::{
    helpers::{field, file_path, kread, layout, ready},
    iter::IterMeta,
};

const O_CLOEXEC: u32 = 0o2000000;

/// Room for one record and its path (too big for the 512-byte stack). Iterators run
/// with migration disabled, so a per-CPU slot is ours for the whole call.
#[map]
pub static FD_SCRATCH: PerCpuArray<FdScratch> = PerCpuArray::with_max_entries(1, 0);

/// `struct bpf_iter__task_file`: every argument takes an 8-byte slot.
#[repr(C)]
pub struct TaskFileCtx {
    pub meta: *const IterMeta,
    pub task: u64,
    pub fd: u32,
    pub _pad: u32,
    pub file: *const u8,
}

/// Every field but the path: for files whose path is already known.
#[unsafe(link_section = "iter/task_file")]
#[unsafe(no_mangle)]
pub extern "C" fn task_files(ctx: *const TaskFileCtx) -> i32 {
    if ready() {
        let _ = emit(ctx, false);
    }
    0
}

/// Every field and the path (`d_path`).
#[unsafe(link_section = "iter/task_file")]
#[unsafe(no_mangle)]
pub extern "C" fn task_files_paths(ctx: *const TaskFileCtx) -> i32 {
    if ready() {
        let _ = emit(ctx, true);
    }
    0
}

/// Writes `len` bytes at `data` to the session's output.
#[inline(always)]
pub fn write(seq: *mut c_void, data: *const c_void, len: u32) {
    // SAFETY: `seq` is the session's; callers pass `len` bytes of their scratch.
    unsafe { bpf_seq_write(seq as *mut _, data, len) };
}

/// The process's own record, read with probe reads: once per process, not per fd.
#[inline(always)]
pub fn emit_task(
    seq: *mut c_void,
    scratch: *mut FdScratch,
    task: u64,
    tgid: u32,
) -> Result<(), i32> {
    // SAFETY: per-CPU slot, exclusively ours for this call.
    let t = unsafe { &mut (*scratch).task };
    t.tag = tag::TASK;
    t.tgid = tgid;
    let parent: u64 = kread(task, layout!(tasks.real_parent))?;
    t.ppid = kread(parent, layout!(files.task_tgid))?;
    let cred: u64 = kread(task, layout!(tasks.real_cred))?;
    t.cred = cred;
    t.uid = kread(cred, layout!(tasks.cred_uid))?;
    t.euid = kread(cred, layout!(tasks.cred_euid))?;
    t.gid = kread(cred, layout!(tasks.cred_gid))?;
    t.egid = kread(cred, layout!(tasks.cred_egid))?;
    t.flags = kread(task, layout!(tasks.flags))?;
    t.exit_state = kread(task, layout!(tasks.exit_state))?;
    t.exec_id = kread(task, layout!(tasks.self_exec_id))?;
    t.comm = kread(task, layout!(tasks.comm))?;
    let fs: u64 = kread(task, layout!(tasks.fs))?;
    t.pwd_mnt = 0;
    t.pwd_dentry = 0;
    if fs != 0 {
        t.pwd_mnt = kread(fs, layout!(tasks.fs_pwd_mnt))?;
        t.pwd_dentry = kread(fs, layout!(tasks.fs_pwd_dentry))?;
    }
    write(seq, t as *const _ as *const c_void, TASK_RECORD_SIZE as u32);
    Ok(())
}

#[inline(always)]
fn emit(ctx: *const TaskFileCtx, with_path: bool) -> Result<(), i32> {
    // SAFETY: the kernel passes a valid context; fields are read one at a time with
    // their own sizes, as the verifier requires.
    let (file, task, fd) = unsafe {
        (
            read_volatile(&(*ctx).file),
            read_volatile(&(*ctx).task),
            read_volatile(&(*ctx).fd),
        )
    };
    // The last call of a session has no task and no file.
    if file.is_null() || task == 0 {
        return Ok(());
    }
    let tgid: u32 = field(task, layout!(files.task_tgid));
    let scratch = FD_SCRATCH.get_ptr_mut(0).ok_or(-1i32)?;
    // SAFETY: meta and seq are the kernel's for this session.
    let (seq, first) = unsafe {
        let meta = read_volatile(&(*ctx).meta);
        (
            read_volatile(&(*meta).seq),
            read_volatile(&(*meta).seq_num) == 0,
        )
    };
    if first {
        emit_task(seq, scratch, task, tgid)?;
    }
    // SAFETY: per-CPU slot, exclusively ours for this call.
    let r = unsafe { &mut (*scratch).record };
    let f = file as u64;
    r.tag = tag::FD;
    r.tgid = tgid;
    r.fd = fd;
    r.file = f;

    let files: u64 = field(task, layout!(files.task_files));
    r.files = files;
    let fdt: u64 = field(files, layout!(files.files_fdt));
    let cloexec: u64 = field(fdt, layout!(files.fdt_close_on_exec));
    // A variable index: not a verifier-checked field load.
    let word: u64 = kread(cloexec, (fd / 64) * 8)?;
    let flags: u32 = field(f, layout!(files.file_flags));
    r.flags = if (word >> (fd % 64)) & 1 != 0 {
        flags | O_CLOEXEC
    } else {
        flags
    };
    r.pos = field(f, layout!(files.file_pos));
    r.f_mode = field(f, layout!(files.file_mode));

    let mnt: u64 = field(f, layout!(files.file_mnt));
    // struct mount lies before its vfsmount: a negative offset, probe-read.
    r.mnt_id = kread(
        (mnt as i64 + layout!(files.vfsmount_mnt_id) as i64) as u64,
        0,
    )?;

    // F_GETOWN_EX / F_GETSIG: embedded before 6.12, allocated on first use since.
    let fown = if layout!(files.owner_is_ptr) != 0 {
        field::<u64>(f, layout!(files.file_owner))
    } else {
        f + layout!(files.file_owner) as u64
    };
    r.owner_pid = 0;
    r.owner_type = 0;
    r.signum = 0;
    if fown != 0 {
        let pid: u64 = field(fown, layout!(files.fown_pid));
        if pid != 0 {
            // `numbers[0]` of a flexible array: probe-read.
            r.owner_pid = kread(pid, layout!(files.pid_nr))?;
            r.owner_type = field(fown, layout!(files.fown_pid_type));
        }
        r.signum = field(fown, layout!(files.fown_signum));
    }

    let inode: u64 = field(f, layout!(files.file_inode));
    r.ino = field(inode, layout!(files.inode_ino));
    r.i_mode = field::<u16>(inode, layout!(files.inode_mode)) as u32;
    r.nlink = field(inode, layout!(files.inode_nlink));
    r.linkable =
        (field::<u32>(inode, layout!(files.inode_state)) & layout!(files.i_linkable) != 0) as u32;
    r.size = field(inode, layout!(files.inode_size));
    r.blocks = field(inode, layout!(files.inode_blocks));
    r.generation = field(inode, layout!(files.inode_generation));
    r.mtime_sec = field(inode, layout!(files.inode_mtime_sec));
    r.ctime_sec = field(inode, layout!(files.inode_ctime_sec));
    // The top bits of the nanoseconds may carry flags (multigrain ctime, 6.13+).
    r.mtime_nsec = field::<u32>(inode, layout!(files.inode_mtime_nsec)) & 0x3fff_ffff;
    r.ctime_nsec = field::<u32>(inode, layout!(files.inode_ctime_nsec)) & 0x3fff_ffff;
    let sb: u64 = field(inode, layout!(files.inode_sb));
    r.s_dev = field(sb, layout!(files.sb_dev));

    r.path_len = 0;
    if with_path {
        // SAFETY: the scratch's path buffer, PATH_MAX bytes.
        r.path_len = file_path(file, unsafe { (*scratch).path.as_mut_ptr() });
    }
    // Read back and masked so that older verifiers (6.1, 6.12) see the bound: LLVM
    // drops a mask on a value it knows is in range, and they cannot follow why.
    // SAFETY: our own scratch.
    let len =
        FD_RECORD_SIZE as u32 + (unsafe { read_volatile(&r.path_len) } & (PATH_MAX as u32 - 1));
    write(seq, scratch as *const c_void, len);

    // The fd's lock lines, from the inode's lists (what fdinfo prints). Frozen holders
    // cannot change them; the walk is bounded, and cut short it says so.
    crate::lock_walk::walk(seq, scratch, inode, f, files)?;
    Ok(())
}
