//! fcntl()/flock() context per thread: the fd a lock request came through, and the end
//! of a blocked wait (granted, interrupted by a signal, or failed) at syscall exit.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use ckpt_common::{
    counters::Counter,
    lease::{LeaseEvent, LeaseWhat, F_SETLEASE},
    lock::{fl_type, SyscallCtx},
    tag,
};

use crate::maps::{
    count, current_ids, jiffies, layout, now_ns, ready, BREAK_CTX, LOCK_EVENTS, SYSCALL_CTX,
    WAITERS,
};

const F_DUPFD: u32 = 0;
const F_DUPFD_CLOEXEC: u32 = 1030;
// Lock requests (uapi asm-generic/fcntl.h): the 64-bit forms are what 32-bit callers
// use, the OFD forms take open-file-description locks.
const F_SETLK: u32 = 6;
const F_SETLKW: u32 = 7;
const F_SETLK64: u32 = 13;
const F_SETLKW64: u32 = 14;
const F_OFD_SETLK: u32 = 37;
const F_OFD_SETLKW: u32 = 38;

/// The fcntl commands whose exit or whose lock events need the call's context: lock
/// requests, F_SETLEASE, and the dups that make a deleted file's holder change. Every
/// other command (most of what a program calls fcntl for) costs no map operation.
#[inline(always)]
fn traced_cmd(cmd: u32) -> bool {
    matches!(
        cmd,
        F_SETLK
            | F_SETLKW
            | F_SETLK64
            | F_SETLKW64
            | F_OFD_SETLK
            | F_OFD_SETLKW
            | F_SETLEASE
            | F_DUPFD
            | F_DUPFD_CLOEXEC
    )
}

fn read_u64(ctx: &TracePointContext, off: u32) -> u64 {
    // SAFETY: offsets come from this kernel's tracefs format file.
    unsafe { ctx.read_at::<u64>(off as usize) }.unwrap_or(0)
}

/// The context of the traced fcntl()/flock() call thread `tid` is in, if any.
#[inline(always)]
pub fn call_ctx(tid: u32) -> Option<*mut SyscallCtx> {
    let p = SYSCALL_CTX.get_ptr_mut(&tid)?;
    // SAFETY: value of our own map, plain data; only thread `tid` writes its entry.
    (unsafe { (*p).active } != 0).then_some(p)
}

/// Makes `entry` the context of thread `tid`'s call: stored in place over the entry of
/// its last call when it has one (a lookup and a store, where an insert and a delete
/// per call cost ~350 ns more), inserted otherwise.
#[inline(always)]
pub fn set_call_ctx(tid: u32, entry: &SyscallCtx) {
    match SYSCALL_CTX.get_ptr_mut(&tid) {
        // SAFETY: as in `call_ctx`.
        Some(p) => unsafe { *p = *entry },
        None => {
            if SYSCALL_CTX.insert(&tid, entry, 0).is_err() {
                count(Counter::SyscallCtxFull);
            }
        }
    }
}

fn begin_call(fd: u64, cmd: u32, arg: u64) {
    let (_, tid) = current_ids();
    match SYSCALL_CTX.get_ptr_mut(&tid) {
        // Field by field: building a whole entry costs a memset call per syscall. The
        // lease fields are meaningful only with `lease_dev` set.
        // SAFETY: as in `call_ctx`.
        Some(p) => unsafe {
            (*p).fd = fd as i32;
            (*p).cmd = cmd;
            (*p).arg = arg;
            (*p).lease_dev = 0;
            (*p).waited = 0;
            (*p).active = 1;
        },
        None => set_call_ctx(
            tid,
            &SyscallCtx {
                fd: fd as i32,
                cmd,
                arg,
                active: 1,
                ..Default::default()
            },
        ),
    }
}

/// Ends thread `tid`'s call: its context, if it was in a traced call, now kept inactive;
/// and its waiter, if it recorded one, dropped.
fn end_call(tid: u32) -> Option<SyscallCtx> {
    let p = call_ctx(tid)?;
    // SAFETY: as in `call_ctx`.
    let sc = unsafe {
        (*p).active = 0;
        *p
    };
    if sc.waited != 0 {
        let _ = WAITERS.remove(&tid);
    }
    Some(sc)
}

#[tracepoint]
pub fn sys_enter_fcntl(ctx: TracePointContext) -> u32 {
    if ready() {
        let o = layout!(syscalls);
        let cmd = read_u64(&ctx, o.fcntl_cmd) as u32;
        if traced_cmd(cmd) {
            begin_call(read_u64(&ctx, o.fcntl_fd), cmd, read_u64(&ctx, o.fcntl_arg));
        }
    }
    0
}

#[tracepoint]
pub fn sys_enter_flock(ctx: TracePointContext) -> u32 {
    if ready() {
        begin_call(read_u64(&ctx, layout!(syscalls).flock_fd), 0, 0);
    }
    0
}

/// A successful F_SETLEASE becomes a lease event: generic_add_lease or
/// generic_delete_lease named the lease during the call, the return value says
/// whether the kernel kept the change.
#[tracepoint]
pub fn sys_exit_fcntl(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    // No context: a command not traced, nothing to undo.
    let Some(sc) = end_call(tid) else {
        return 0;
    };
    if ready() {
        let ret = read_u64(&ctx, layout!(syscalls).fcntl_ret) as i64;
        if (sc.cmd == F_DUPFD || sc.cmd == F_DUPFD_CLOEXEC) && ret >= 0 {
            crate::deleted::holder_changed();
        }
        if sc.cmd == F_SETLEASE && ret == 0 && sc.lease_dev != 0 {
            let what = if sc.arg as u8 == fl_type::F_UNLCK {
                LeaseWhat::Released
            } else {
                LeaseWhat::Set
            };
            emit_lease(&LeaseEvent {
                tag: tag::LEASE,
                what: what as u32,
                ts_ns: now_ns(),
                jiffies: jiffies(),
                ino: sc.lease_ino,
                owner: sc.lease_owner,
                dev: sc.lease_dev,
                pid: tgid,
                tgid,
                tid,
                fd: sc.fd,
                lease_type: sc.arg as u8,
                ..Default::default()
            });
        }
    }
    0
}

pub fn emit_lease(ev: &LeaseEvent) {
    emit_lease_with(|e| *e = *ev);
}

/// Reserves a zeroed lease event in the ring, lets `fill` write it in place (no copy
/// on the 512-byte BPF stack, which 6.1's verifier counts strictly), and submits it.
#[inline(always)]
pub fn emit_lease_with(fill: impl FnOnce(&mut LeaseEvent)) {
    match LOCK_EVENTS.reserve::<LeaseEvent>(0) {
        Some(mut entry) => {
            let ev = entry.as_mut_ptr();
            // SAFETY: `ev` points at a reserved ring record of the right size.
            unsafe {
                core::ptr::write_bytes(ev, 0, 1);
                fill(&mut *ev);
            }
            entry.submit(0);
            count(Counter::EventsEmitted);
        }
        None => count(Counter::RingBufFull),
    }
}

#[tracepoint]
pub fn sys_exit_flock(_ctx: TracePointContext) -> u32 {
    let (_, tid) = current_ids();
    end_call(tid);
    0
}

/// A thread killed while blocked may never reach syscall exit tracing; drop its state.
#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let (_, tid) = current_ids();
    let _ = SYSCALL_CTX.remove(&tid);
    let _ = WAITERS.remove(&tid);
    if ready() {
        crate::deleted::on_exit();
    }
    let _ = BREAK_CTX.remove(&tid);
    0
}
