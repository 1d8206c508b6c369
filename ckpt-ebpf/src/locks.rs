//! What the kernel forgets about lock requests, from the filelock:posix_lock_inode and
//! filelock:flock_lock_inode BTF tracepoints (the kernel's own arguments: inode,
//! request, result): when a blocked request began to wait (`WAITS`), and, opt-in
//! (`ckpt-agent --hold-times`), when a lock was taken (`HOLDS`).
//!
//! Both fire on every lock call, so the common case must cost next to nothing: an
//! uncontended call is one test of the result and one of the `WAITING` gate (an
//! array slot, which the verifier turns into a plain load), then return. Held locks
//! themselves are not copied anywhere: readers walk the kernel's lists.

use aya_ebpf::{bindings::BPF_NOEXIST, macros::btf_tracepoint, programs::BtfTracePointContext};
use ckpt_common::{
    capacity,
    counters::Counter,
    files::LOCK_SPAN,
    lock::{
        fl_flags, fl_type, wait_end, wait_hist, HoldStart, WaitEnd, WaitStart, FILE_LOCK_DEFERRED,
        WAIT_BUCKETS_NS,
    },
};

use crate::{
    helpers::{at, current_ids, field, kcopy, kread, layout, now_ns, ready},
    maps::{count, HOLDS, WAITING, WAITS, WAIT_CARRY, WAIT_ENDS, WAIT_END_SEQ, WAIT_HIST},
};

#[btf_tracepoint(function = "posix_lock_inode")]
pub fn posix_lock_inode(ctx: BtfTracePointContext) -> i32 {
    on_lock(&ctx, false);
    0
}

#[btf_tracepoint(function = "flock_lock_inode")]
pub fn flock_lock_inode(ctx: BtfTracePointContext) -> i32 {
    on_lock(&ctx, true);
    0
}

/// `(struct inode *inode, struct file_lock *request, int ret)`, as both tracepoints
/// are declared (the `filelock_lock` class).
#[inline(always)]
fn on_lock(ctx: &BtfTracePointContext, flock: bool) {
    let ret = ctx.arg::<u64>(2) as i32;
    if ret == FILE_LOCK_DEFERRED {
        if ready() {
            deferred(ctx);
        }
        return;
    }
    if waiting() != 0 {
        settled(ctx);
    }
    if ret == 0 && layout!(hold_times) != 0 {
        held(ctx, flock);
    }
}

/// Threads with an entry in `WAITS` (an estimate that never undercounts for long:
/// it gates the lookup that ends a wait).
#[inline(always)]
fn waiting() -> u64 {
    match WAITING.get_ptr(0) {
        // SAFETY: an array slot of our own map.
        Some(p) => unsafe { core::ptr::read_volatile(p) },
        None => 1,
    }
}

#[inline(always)]
fn add_waiting(delta: u64) {
    if let Some(p) = WAITING.get_ptr_mut(0) {
        // SAFETY: an array slot of our own map, shared by every CPU: an atomic add
        // (BPF_XADD; the bpf target offers no `AtomicU64::fetch_add`).
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                p, delta,
            )
        };
    }
}

/// Records (or keeps) thread `tid`'s wait start.
#[inline(always)]
pub fn note_wait(tid: u32, w: &WaitStart) {
    match WAITS.get_ptr_mut(&tid) {
        // SAFETY: value of our own map; only thread `tid` writes its entry.
        Some(p) => unsafe {
            if (*p).request == w.request {
                // The kernel's own retry of the same request (woken, not granted).
                return;
            }
            if (*p).same_request(w) {
                // A restart after an interruption (freeze, stop, SA_RESTART handler):
                // the same wait, on a newly allocated request.
                (*p).request = w.request;
                return;
            }
            *p = *w;
        },
        None => {
            let w = &carried(tid, w);
            if WAITS.insert(&tid, w, BPF_NOEXIST as u64).is_ok() {
                add_waiting(1);
            } else {
                count(Counter::WaitsFull);
            }
        }
    }
}

/// `w`, or, when a restore carried this thread's wait over (`WAIT_CARRY`), `w` with
/// the carried start. The carry is used once, matching or not.
#[inline(always)]
fn carried(tid: u32, w: &WaitStart) -> WaitStart {
    let mut out = *w;
    // SAFETY: value of our own map, plain data, copied.
    if let Some(c) = unsafe { WAIT_CARRY.get(&tid) }.copied() {
        let _ = WAIT_CARRY.remove(&tid);
        if c.carries(w) {
            out.since_ns = c.since_ns;
        }
    }
    out
}

/// Drops thread `tid`'s wait start (its wait ended without a restart, `how` is a
/// `wait_end` value), and keeps the end for readers: in the `WAIT_ENDS` ring and,
/// unless the wait may go on (`UNBLOCKED`), in the wait-time histogram.
#[inline(always)]
pub fn end_wait(tid: u32, how: u8) {
    // SAFETY: value of our own map, plain data, copied.
    let Some(w) = WAITS.get_ptr(&tid).map(|p| unsafe { *p }) else {
        return;
    };
    if WAITS.remove(&tid).is_err() {
        return;
    }
    add_waiting(u64::MAX);
    let now = now_ns();
    if how != wait_end::UNBLOCKED {
        observe(now.saturating_sub(w.since_ns));
    }
    let Some(seq) = WAIT_END_SEQ.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, no concurrent writer on this CPU.
    let i = unsafe {
        let i = *seq;
        *seq = i + 1;
        i
    };
    if let Some(slot) = WAIT_ENDS.get_ptr_mut((i & (capacity::WAIT_ENDS as u64 - 1)) as u32) {
        // SAFETY: a slot of our own map. A reader may copy it while it is written: it
        // reads twice and checks `seq` (see `WaitEnd`).
        unsafe {
            *slot = WaitEnd {
                seq: i + 1,
                ended_ns: now,
                wait: w,
                tid,
                how,
                _pad: [0; 3],
            }
        };
    }
}

/// Counts one wait of `ns` in this CPU's histogram.
#[inline(always)]
fn observe(ns: u64) {
    let mut bucket = WAIT_BUCKETS_NS.len() as u32;
    for (i, bound) in WAIT_BUCKETS_NS.iter().enumerate() {
        if ns <= *bound {
            bucket = i as u32;
            break;
        }
    }
    for (slot, add) in [(bucket, 1), (wait_hist::SUM_NS, ns), (wait_hist::COUNT, 1)] {
        if let Some(p) = WAIT_HIST.get_ptr_mut(slot) {
            // SAFETY: per-CPU slot, no concurrent writer on this CPU.
            unsafe { *p += add };
        }
    }
}

fn deferred(ctx: &BtfTracePointContext) {
    let inode: u64 = ctx.arg(0);
    let req: u64 = ctx.arg(1);
    // Never NULL, but the verifier may take them for nullable.
    if inode == 0 || req == 0 {
        return;
    }
    count(Counter::Deferred);
    let (tgid, tid) = current_ids();
    let sb: u64 = field(inode, layout!(files.inode_sb));
    let w = WaitStart {
        since_ns: now_ns(),
        request: req,
        owner: field(req, layout!(lock_lists.owner)),
        ino: field(inode, layout!(files.inode_ino)),
        start: field(req, layout!(lock_lists.start)),
        end: field(req, layout!(lock_lists.end)),
        dev: field(sb, layout!(files.sb_dev)),
        tgid,
        flags: field(req, layout!(lock_lists.flags)),
        lock_type: field(req, layout!(lock_lists.lock_type)),
        _pad: [0; 3],
    };
    note_wait(tid, &w);
}

/// A request came back from the kernel granted or refused: if it is the one this
/// thread was waiting with, the wait is over.
fn settled(ctx: &BtfTracePointContext) {
    let ret = ctx.arg::<u64>(2) as i32;
    let req: u64 = ctx.arg(1);
    if req == 0 || field::<u32>(req, layout!(lock_lists.flags)) & fl_flags::FL_SLEEP == 0 {
        return;
    }
    let (_, tid) = current_ids();
    // SAFETY: value of our own map, plain data.
    if let Some(p) = WAITS.get_ptr(&tid) {
        if unsafe { (*p).request } == req {
            end_wait(
                tid,
                if ret == 0 {
                    wait_end::GRANTED
                } else {
                    wait_end::REFUSED
                },
            );
        }
    }
}

/// Locks looked at in one list to find the one a granted request made or extended.
const HOLD_LIST_MAX: usize = 16;

/// `--hold-times`: notes when the lock a granted request left in the inode's list
/// was first seen (a merged or extended lock keeps its first time). Walks the list,
/// which costs on every lock call: opt-in.
fn held(ctx: &BtfTracePointContext, flock: bool) {
    let inode: u64 = ctx.arg(0);
    let req: u64 = ctx.arg(1);
    if inode == 0 || req == 0 {
        return;
    }
    let flags: u32 = field(req, layout!(lock_lists.flags));
    let lock_type: u8 = field(req, layout!(lock_lists.lock_type));
    if flags & fl_flags::FL_ACCESS != 0 || lock_type == fl_type::F_UNLCK {
        return;
    }
    let owner: u64 = field(req, layout!(lock_lists.owner));
    let start: i64 = field(req, layout!(lock_lists.start));
    let flctx: u64 = field(inode, layout!(lock_lists.inode_flctx));
    if flctx == 0 {
        return;
    }
    let head = flctx
        + if flock {
            layout!(lock_lists.ctx_flock)
        } else {
            layout!(lock_lists.ctx_posix)
        } as u64;
    let Ok(mut node) = kread::<u64>(head, 0) else {
        return;
    };
    // Not zeroed: the copy fills it (zeroing 192 bytes costs a memset call).
    let mut lock = core::mem::MaybeUninit::<[u64; LOCK_SPAN / 8]>::uninit();
    let buf = lock.as_mut_ptr() as *mut u8;
    for _ in 0..HOLD_LIST_MAX {
        if node == head || node == 0 {
            return;
        }
        let l = node - layout!(lock_lists.list) as u64;
        if kcopy(l, buf, LOCK_SPAN).is_err() {
            return;
        }
        if at::<u64>(buf, layout!(lock_lists.owner)) == owner
            && (flock
                || (at::<i64>(buf, layout!(lock_lists.start)) <= start
                    && at::<i64>(buf, layout!(lock_lists.end)) >= start))
        {
            let h = HoldStart {
                since_ns: now_ns(),
                owner,
            };
            if HOLDS.insert(&l, &h, BPF_NOEXIST as u64).is_err() {
                // Present (kept: its first time), or the map is full.
                // SAFETY: value of our own map.
                match HOLDS.get_ptr_mut(&l) {
                    Some(p) if unsafe { (*p).owner } != owner => unsafe { *p = h },
                    Some(_) => {}
                    None => count(Counter::HoldsFull),
                }
            }
            return;
        }
        node = at(buf, layout!(lock_lists.list));
    }
}
