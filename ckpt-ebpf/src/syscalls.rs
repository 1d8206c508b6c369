//! fcntl()/flock() context per thread: the fd a lock request came through, and the end
//! of a blocked wait (granted, interrupted by a signal, or failed) at syscall exit.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use ckpt_common::{counters::Counter, lock::SyscallCtx};

use crate::maps::{count, current_ids, layout, SYSCALL_CTX, WAITERS};

fn remember(ctx: &TracePointContext, fd_off: u32, cmd_off: Option<u32>) {
    let (_, tid) = current_ids();
    // SAFETY: offsets come from this kernel's tracefs format file.
    let fd: u64 = unsafe { ctx.read_at(fd_off as usize) }.unwrap_or(u64::MAX);
    let cmd: u64 = match cmd_off {
        Some(off) => unsafe { ctx.read_at(off as usize) }.unwrap_or(0),
        None => 0,
    };
    let entry = SyscallCtx {
        fd: fd as i32,
        cmd: cmd as u32,
    };
    if SYSCALL_CTX.insert(&tid, &entry, 0).is_err() {
        count(Counter::SyscallCtxFull);
    }
}

fn forget() {
    let (_, tid) = current_ids();
    let _ = SYSCALL_CTX.remove(&tid);
    let _ = WAITERS.remove(&tid);
}

#[tracepoint]
pub fn sys_enter_fcntl(ctx: TracePointContext) -> u32 {
    let l = layout();
    if l.valid != 0 {
        remember(&ctx, l.syscalls.fcntl_fd, Some(l.syscalls.fcntl_cmd));
    }
    0
}

#[tracepoint]
pub fn sys_enter_flock(ctx: TracePointContext) -> u32 {
    let l = layout();
    if l.valid != 0 {
        remember(&ctx, l.syscalls.flock_fd, None);
    }
    0
}

#[tracepoint]
pub fn sys_exit_fcntl(_ctx: TracePointContext) -> u32 {
    forget();
    0
}

#[tracepoint]
pub fn sys_exit_flock(_ctx: TracePointContext) -> u32 {
    forget();
    0
}

/// A thread killed while blocked may never reach syscall exit tracing; drop its state.
#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    forget();
    0
}
