//! filelock:posix_lock_inode and filelock:flock_lock_inode.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext};
use aya_log_ebpf::warn;
use ckpt_common::{
    counters::Counter,
    lock::{
        fl_flags, fl_type, EventSource, LockEvent, SyscallCtx, Waiter, FILE_LOCK_DEFERRED,
        NOT_OBSERVED,
    },
    offsets::LockTpOffsets,
};

use crate::maps::{count, current_ids, kread, layout, ready, LOCK_EVENTS, SYSCALL_CTX, WAITERS};

/// FL_ACCESS requests only test for conflicts; they never change lock state.
const FL_ACCESS: u32 = 8;

#[tracepoint]
pub fn posix_lock_inode(ctx: TracePointContext) -> u32 {
    if ready() {
        let _ = handle(&ctx, &layout!(posix), EventSource::Posix);
    }
    0
}

#[tracepoint]
pub fn flock_lock_inode(ctx: TracePointContext) -> u32 {
    if ready() {
        let _ = handle(&ctx, &layout!(flock), EventSource::Flock);
    }
    0
}

#[inline(always)]
fn read<T>(ctx: &TracePointContext, off: u32) -> Result<T, i32> {
    // SAFETY: offsets come from this kernel's tracefs format file.
    unsafe { ctx.read_at::<T>(off as usize) }
}

fn handle(ctx: &TracePointContext, off: &LockTpOffsets, source: EventSource) -> Result<(), i32> {
    count(Counter::EventsSeen);
    let ret: i32 = read(ctx, off.ret)?;
    let flags: u32 = read(ctx, off.flags)?;
    // A refused or deferred POSIX request changes nothing. A refused or deferred flock
    // *conversion* has already dropped the old lock, so flock events always go out.
    // (A blocked waiter is removed at syscall exit, whatever the outcome.)
    if flags & FL_ACCESS != 0 || (ret < 0 && source == EventSource::Posix) {
        return Ok(());
    }
    let (tgid, tid) = current_ids();
    let sc = SYSCALL_CTX.get_ptr_mut(&tid);
    let (fd, waited) = match sc {
        // SAFETY: value of our own map, plain data.
        Some(p) => unsafe { ((*p).fd, (*p).waited != 0) },
        // Not inside a traced fcntl/flock (close, exit), or the call began before
        // tracing did.
        None => (-1, true),
    };
    let ino: u64 = read(ctx, off.i_ino)?;
    let dev: u32 = read(ctx, off.s_dev)?;
    let owner: u64 = read(ctx, off.owner)?;
    let start: i64 = read(ctx, off.start)?;
    let end: i64 = read(ctx, off.end)?;
    let lock_type: u8 = read(ctx, off.lock_type)?;
    let now = unsafe { bpf_ktime_get_ns() };

    if ret == FILE_LOCK_DEFERRED {
        // Keep the first blocking time across the kernel's retries of the same request.
        let since = match WAITERS.get_ptr(&tid) {
            Some(p) => unsafe { (*p).since_ns },
            None => now,
        };
        let waiter = Waiter {
            since_ns: since,
            ino,
            owner,
            blocker: read(ctx, off.blocker)?,
            start,
            end,
            dev,
            tgid,
            tid,
            flags,
            fd,
            lock_type,
            _pad: [0; 3],
        };
        if WAITERS.insert(&tid, &waiter, 0).is_err() {
            count(Counter::WaitersFull);
            warn!(
                ctx,
                "WAITERS full: waiter tid {} on inode {} not recorded", tid, ino
            );
        }
        // Syscall exit removes the waiter, whatever ends the wait: tell it there is one
        // (a call that began before tracing did gets a context now).
        match sc {
            // SAFETY: value of our own map, plain data, this thread's own entry.
            Some(p) => unsafe { (*p).waited = 1 },
            None => {
                let entry = SyscallCtx {
                    fd: -1,
                    waited: 1,
                    ..Default::default()
                };
                if SYSCALL_CTX.insert(&tid, &entry, 0).is_err() {
                    count(Counter::SyscallCtxFull);
                }
            }
        }
        if source == EventSource::Posix {
            return Ok(());
        }
    }

    // Granted: this thread no longer waits.
    if ret == 0 && flags & fl_flags::FL_SLEEP != 0 && waited {
        let _ = WAITERS.remove(&tid);
    }
    let pid: u32 = read(ctx, off.pid)?;
    match LOCK_EVENTS.reserve::<LockEvent>(0) {
        Some(mut entry) => {
            // Read after the reserve: an event later in the ring than another one on
            // the same description observes a list at least as new as that one's.
            let observed = if source == EventSource::Flock {
                observe_flock(ctx, off, owner)
            } else {
                Observed::NONE
            };
            entry.write(LockEvent {
                tag: ckpt_common::tag::LOCK,
                observed_pid: observed.pid,
                ts_ns: now,
                ino,
                owner,
                start,
                end,
                dev,
                pid,
                tgid,
                fd,
                flags,
                ret,
                source: source as u8,
                lock_type,
                observed: observed.lock_type,
                _pad: [0; 5],
            });
            entry.submit(0);
            count(Counter::EventsEmitted);
        }
        None => {
            count(Counter::RingBufFull);
            warn!(ctx, "LOCK_EVENTS full: lock event on inode {} lost", ino);
        }
    }
    Ok(())
}

/// Locks looked at in one inode's flock list before giving up.
const FLOCK_LIST_MAX: usize = 32;

/// A description's flock lock as read from the inode's list.
struct Observed {
    lock_type: u8,
    pid: u32,
}

impl Observed {
    const NONE: Observed = Observed {
        lock_type: NOT_OBSERVED,
        pid: 0,
    };
    const UNLOCKED: Observed = Observed {
        lock_type: fl_type::F_UNLCK,
        pid: 0,
    };
}

/// The flock lock that description `owner` holds now (type and pid), from the inode's
/// flock list (read after the kernel released it: a later change may show, never an
/// earlier state). Events of tasks sharing one description can reach the ring out of
/// order; an observation taken after each event's own change makes the last one right.
fn observe_flock(ctx: &TracePointContext, off: &LockTpOffsets, owner: u64) -> Observed {
    let lock_file = layout!(lock_lists.file);
    if lock_file == 0 {
        return Observed::NONE;
    }
    let Ok(req) = read::<u64>(ctx, off.fl) else {
        return Observed::NONE;
    };
    let Ok(file) = kread::<u64>(req, lock_file) else {
        return Observed::NONE;
    };
    let Ok(inode) = kread::<u64>(file, layout!(files.file_inode)) else {
        return Observed::NONE;
    };
    let Ok(flctx) = kread::<u64>(inode, layout!(lock_lists.inode_flctx)) else {
        return Observed::NONE;
    };
    if flctx == 0 {
        return Observed::UNLOCKED;
    }
    let head = flctx + layout!(lock_lists.ctx_flock) as u64;
    let Ok(mut node) = kread::<u64>(head, 0) else {
        return Observed::NONE;
    };
    for _ in 0..FLOCK_LIST_MAX {
        if node == head || node == 0 {
            return Observed::UNLOCKED;
        }
        let lock = node - layout!(lock_lists.list) as u64;
        if kread::<u64>(lock, lock_file) == Ok(owner) {
            let lock_type = kread::<u8>(lock, layout!(lock_lists.lock_type));
            let pid = kread::<u32>(lock, layout!(lock_lists.pid));
            return match (lock_type, pid) {
                (Ok(lock_type), Ok(pid)) => Observed { lock_type, pid },
                _ => Observed::NONE,
            };
        }
        match kread::<u64>(node, 0) {
            Ok(next) => node = next,
            Err(_) => return Observed::NONE,
        }
    }
    Observed::NONE
}
