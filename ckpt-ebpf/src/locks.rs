//! The filelock:posix_lock_inode and filelock:flock_lock_inode tracepoints, as BTF
//! tracepoints: the programs get the kernel's own arguments (inode, request, result)
//! and read the request's fields with plain loads the verifier checks against BTF.
//! A classic tracepoint program first has the kernel fill in its record, then reads
//! each field through a helper call; at one event per lock call that was half the
//! tracer's cost.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};
use aya_log_ebpf::warn;
use ckpt_common::{
    counters::Counter,
    files::LOCK_SPAN,
    lock::{
        fl_flags, fl_type, EventSource, LockEvent, SyscallCtx, Waiter, FILE_LOCK_DEFERRED,
        NOT_OBSERVED,
    },
};

use crate::{
    maps::{at, count, current_ids, field, kcopy, kread, layout, ready, LOCK_EVENTS, WAITERS},
    syscalls::{call_ctx, set_call_ctx},
};

/// FL_ACCESS requests only test for conflicts; they never change lock state.
const FL_ACCESS: u32 = 8;

#[btf_tracepoint(function = "posix_lock_inode")]
pub fn posix_lock_inode(ctx: BtfTracePointContext) -> i32 {
    if ready() {
        let _ = handle(&ctx, EventSource::Posix);
    }
    0
}

#[btf_tracepoint(function = "flock_lock_inode")]
pub fn flock_lock_inode(ctx: BtfTracePointContext) -> i32 {
    if ready() {
        let _ = handle(&ctx, EventSource::Flock);
    }
    0
}

/// `(struct inode *inode, struct file_lock *request, int ret)`, as both tracepoints
/// are declared (the `filelock_lock` class).
fn handle(ctx: &BtfTracePointContext, source: EventSource) -> Result<(), i32> {
    count(Counter::EventsSeen);
    let inode: u64 = ctx.arg(0);
    let req: u64 = ctx.arg(1);
    let ret = ctx.arg::<u64>(2) as i32;
    // Never NULL, but the verifier may take them for nullable.
    if inode == 0 || req == 0 {
        return Err(0);
    }
    let flags: u32 = field(req, layout!(lock_lists.flags));
    // A refused or deferred POSIX request changes nothing. A refused or deferred flock
    // *conversion* has already dropped the old lock, so flock events always go out.
    // (A blocked waiter is removed at syscall exit, whatever the outcome.)
    if flags & FL_ACCESS != 0 || (ret < 0 && source == EventSource::Posix) {
        return Ok(());
    }
    let (tgid, tid) = current_ids();
    let sc = call_ctx(tid);
    let (fd, waited) = match sc {
        // SAFETY: value of our own map, plain data.
        Some(p) => unsafe { ((*p).fd, (*p).waited != 0) },
        // Not inside a traced fcntl/flock (close, exit), or the call began before
        // tracing did.
        None => (-1, true),
    };
    let ino: u64 = field(inode, layout!(files.inode_ino));
    let sb: u64 = field(inode, layout!(files.inode_sb));
    let dev: u32 = field(sb, layout!(files.sb_dev));
    let owner: u64 = field(req, layout!(lock_lists.owner));
    let start: i64 = field(req, layout!(lock_lists.start));
    let end: i64 = field(req, layout!(lock_lists.end));
    let lock_type: u8 = field(req, layout!(lock_lists.lock_type));
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
            blocker: field(req, layout!(lock_lists.blocker)),
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
                    active: 1,
                    ..Default::default()
                };
                set_call_ctx(tid, &entry);
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
    let pid: u32 = field(req, layout!(lock_lists.pid));
    match LOCK_EVENTS.reserve::<LockEvent>(0) {
        Some(mut entry) => {
            // Read after the reserve: an event later in the ring than another one on
            // the same description observes a list at least as new as that one's.
            let observed = if source == EventSource::Flock {
                observe_flock(inode, owner)
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
///
/// A flock request's owner is its file (`flock_make_lock`, `locks_remove_flock`): the
/// walk looks for the lock whose file `owner` is. Each lock is read in one copy: two
/// helper calls for a list of one lock, where one per field took eight.
fn observe_flock(inode: u64, owner: u64) -> Observed {
    let lock_file = layout!(lock_lists.file);
    if lock_file == 0 {
        return Observed::NONE;
    }
    let flctx: u64 = field(inode, layout!(lock_lists.inode_flctx));
    if flctx == 0 {
        return Observed::UNLOCKED;
    }
    let head = flctx + layout!(lock_lists.ctx_flock) as u64;
    let Ok(mut node) = kread::<u64>(head, 0) else {
        return Observed::NONE;
    };
    // Not zeroed: the copy fills it (zeroing 192 bytes took a memset subprogram call
    // per event).
    let mut lock = core::mem::MaybeUninit::<[u64; LOCK_SPAN / 8]>::uninit();
    let buf = lock.as_mut_ptr() as *mut u8;
    for _ in 0..FLOCK_LIST_MAX {
        if node == head || node == 0 {
            return Observed::UNLOCKED;
        }
        if kcopy(node - layout!(lock_lists.list) as u64, buf, LOCK_SPAN).is_err() {
            return Observed::NONE;
        }
        if at::<u64>(buf, lock_file) == owner {
            return Observed {
                lock_type: at(buf, layout!(lock_lists.lock_type)),
                pid: at(buf, layout!(lock_lists.pid)),
            };
        }
        node = at(buf, layout!(lock_lists.list));
    }
    Observed::NONE
}
