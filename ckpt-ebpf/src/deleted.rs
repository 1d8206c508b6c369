//! Deleted-but-open files. The scan iterators at the end (`deleted_fds`,
//! `deleted_maps`) list them; `ckpt-user deleted` runs them at call time, and the
//! agent in the background. Everything else here is the opt-in exact mode
//! (`ckpt-agent --exact-deleted`), which costs a syscall tracepoint on every task: the
//! set changes only through a few syscalls, so these programs bump a trigger generation
//! (`FILE_TRIGGERS`) whenever it may have changed — a successful unlink, rename or
//! link, an O_TMPFILE open, closing (or dup2-ing over) an fd of a deleted file, and
//! fork, exec, exit or munmap of a process known to hold one (`HOLDERS`, kept by the
//! agent). The agent then rescans with the two iterators below, which emit only
//! deleted regular files, and publishes the result in `DELETED`.
//!
//! New holders made in ways not watched here (SCM_RIGHTS, pidfd_getfd, reopening
//! /proc/PID/fd/N, open_by_handle_at) are found by the agent's periodic full rescan.
//!
//! Calls are triggered at their exit (the thread is noted in `PENDING` at entry), so
//! that a scan never runs before the change it was triggered by is done. Every hook is
//! a syscall or sched tracepoint: they work the same on any filesystem.

use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_probe_read_user},
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray},
    programs::TracePointContext,
};
use ckpt_common::{
    capacity,
    deleted::{scan, trigger, DeletedKey, DeletedValue},
};

use crate::helpers::{current_ids, kread, layout, now_ns, ready};

/// `trigger::*` slots, per CPU (the BPF target has no atomic add to share one):
/// readers sum the generations and take the latest unlink time.
#[map]
pub static FILE_TRIGGERS: PerCpuArray<u64> = PerCpuArray::pinned(trigger::COUNT, 0);

/// Threads inside a call that may change the set: tid -> 1 (unlink-like: stamps the
/// unlink time) or 2.
#[map]
static PENDING: HashMap<u32, u32> = HashMap::pinned(capacity::PENDING, 0);

/// Processes holding a deleted file. Written by the agent.
#[map]
pub static HOLDERS: HashMap<u32, u32> = HashMap::pinned(capacity::HOLDERS, 0);

/// The table. Written by the agent only.
#[map]
pub static DELETED: HashMap<DeletedKey, DeletedValue> = HashMap::pinned(capacity::DELETED, 0);

/// `scan::*` slots: the generation `DELETED` reflects (agent), the one a reader waits
/// for (ckpt-user).
#[map]
pub static DELETED_SCANS: Array<u64> = Array::pinned(scan::COUNT, 0);

const O_TMPFILE_BIT: u64 = 0o20000000;
const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const UNLINK: u32 = 1;
const OTHER: u32 = 2;

fn fire(unlink: bool) {
    if let Some(g) = FILE_TRIGGERS.get_ptr_mut(trigger::GEN) {
        // SAFETY: this CPU's slot; programs do not migrate while they run.
        unsafe { *g += 1 };
    }
    if unlink {
        if let Some(t) = FILE_TRIGGERS.get_ptr_mut(trigger::UNLINK_NS) {
            // SAFETY: as above.
            unsafe { *t = now_ns() };
        }
    }
}

fn arg(ctx: &TracePointContext, off: u32) -> u64 {
    // SAFETY: offsets come from this kernel's tracefs format files.
    unsafe { ctx.read_at::<u64>(off as usize) }.unwrap_or(0)
}

fn ret(ctx: &TracePointContext) -> i64 {
    arg(ctx, layout!(deleted.exit_ret)) as i64
}

fn pend(why: u32) {
    let (_, tid) = current_ids();
    // A full map loses the trigger; the next event rescans anyway.
    let _ = PENDING.insert(&tid, &why, 0);
}

/// At a pending call's exit: triggers when it succeeded.
fn settle(ok: bool) {
    let (_, tid) = current_ids();
    // SAFETY: value of our own map, plain data.
    let Some(why) = (unsafe { PENDING.get(&tid) }).copied() else {
        return;
    };
    let _ = PENDING.remove(&tid);
    if ok {
        fire(why == UNLINK);
    }
}

fn is_holder() -> bool {
    let (tgid, _) = current_ids();
    // SAFETY: value of our own map.
    unsafe { HOLDERS.get(&tgid) }.is_some()
}

/// Whether `fd` of the current process is a deleted regular file.
fn fd_is_deleted(fd: u64) -> Result<bool, i32> {
    // SAFETY: helper without preconditions.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = kread(task, layout!(files.task_files))?;
    let fdt: u64 = kread(files, layout!(files.files_fdt))?;
    let max: u32 = kread(fdt, layout!(deleted.fdt_max_fds))?;
    if fd >= max as u64 {
        return Ok(false);
    }
    let array: u64 = kread(fdt, layout!(deleted.fdt_fd))?;
    let file: u64 = kread(array, (fd * 8) as u32)?;
    if file == 0 {
        return Ok(false);
    }
    let inode: u64 = kread(file, layout!(files.file_inode))?;
    let nlink: u32 = kread(inode, layout!(files.inode_nlink))?;
    let mode = kread::<u16>(inode, layout!(files.inode_mode))? as u32;
    Ok(nlink == 0 && mode & S_IFMT == S_IFREG)
}

macro_rules! on_success {
    ($name:ident, $unlink:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            if ready() && ret(&ctx) == 0 {
                fire($unlink);
            }
            0
        }
    };
}

on_success!(sys_exit_unlink, true);
on_success!(sys_exit_unlinkat, true);
on_success!(sys_exit_rename, true);
on_success!(sys_exit_renameat, true);
on_success!(sys_exit_renameat2, true);
on_success!(sys_exit_link, false);
on_success!(sys_exit_linkat, false);

macro_rules! settle_at_exit {
    ($name:ident) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            if ready() {
                settle(ret(&ctx) >= 0);
            }
            0
        }
    };
}

settle_at_exit!(sys_exit_openat);
settle_at_exit!(sys_exit_open);
settle_at_exit!(sys_exit_openat2);
settle_at_exit!(sys_exit_close);
settle_at_exit!(sys_exit_dup);
settle_at_exit!(sys_exit_dup2);
settle_at_exit!(sys_exit_dup3);
settle_at_exit!(sys_exit_close_range);
settle_at_exit!(sys_exit_munmap);

#[tracepoint]
pub fn sys_enter_openat(ctx: TracePointContext) -> u32 {
    if ready() && arg(&ctx, layout!(deleted.openat_flags)) & O_TMPFILE_BIT != 0 {
        pend(UNLINK);
    }
    0
}

#[tracepoint]
pub fn sys_enter_open(ctx: TracePointContext) -> u32 {
    if ready() && arg(&ctx, layout!(deleted.open_flags)) & O_TMPFILE_BIT != 0 {
        pend(UNLINK);
    }
    0
}

#[tracepoint]
pub fn sys_enter_openat2(ctx: TracePointContext) -> u32 {
    if ready() {
        let how = arg(&ctx, layout!(deleted.openat2_how));
        // SAFETY: the helper checks the user address; `flags` leads struct open_how.
        let flags = unsafe { bpf_probe_read_user(how as *const u64) }.unwrap_or(0);
        if flags & O_TMPFILE_BIT != 0 {
            pend(UNLINK);
        }
    }
    0
}

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    if ready() && fd_is_deleted(arg(&ctx, layout!(deleted.close_fd))).unwrap_or(false) {
        pend(OTHER);
    }
    0
}

/// dup (a new holder fd), dup2/dup3 over an fd, close_range and munmap: only for
/// known holders (checking the
/// fds or mappings involved would cost every caller).
macro_rules! holder_call {
    ($name:ident) => {
        #[tracepoint]
        pub fn $name(_ctx: TracePointContext) -> u32 {
            if ready() && is_holder() {
                pend(OTHER);
            }
            0
        }
    };
}

holder_call!(sys_enter_dup);
holder_call!(sys_enter_dup2);
holder_call!(sys_enter_dup3);
holder_call!(sys_enter_close_range);
holder_call!(sys_enter_munmap);
holder_call!(sys_enter_fcntl);
settle_at_exit!(sys_exit_fcntl);

/// A holder forked (the child holds too) or exec'd (close-on-exec fds and the old
/// mappings are gone).
macro_rules! holder_event {
    ($name:ident) => {
        #[tracepoint]
        pub fn $name(_ctx: TracePointContext) -> u32 {
            if ready() && is_holder() {
                fire(false);
            }
            0
        }
    };
}

holder_event!(sched_process_fork);
holder_event!(sched_process_exec);

/// A holder exited: PF_EXITING is set by then, and the scans skip such tasks, so a
/// scan this triggers no longer counts the exiting process.
#[tracepoint]
pub fn deleted_exit(_ctx: TracePointContext) -> u32 {
    let (_, tid) = current_ids();
    let _ = PENDING.remove(&tid);
    if ready() && is_holder() {
        fire(false);
    }
    0
}
