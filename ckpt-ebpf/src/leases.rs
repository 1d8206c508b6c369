//! What the kernel forgets about lease breaks: when one began, who broke it, whether
//! the holder was signalled (`BREAKS`, keyed by the lease's address), and when a
//! blocked breaker began to wait (`WAITS`). The lease itself (type, pending flags,
//! deadlines) is read from the kernel's lists by the iterators.
//!
//! A break, as fs/locks.c __break_lease runs it in the breaker's task: for each lease,
//! leases_conflict(lease, breaker) fires, then the kernel sets the pending flag and the
//! deadline and calls lm_break, which signals the holder (signal_generate). Then, still
//! under flc_lock, break_lease_noblock (O_NONBLOCK) or break_lease_block fires. At that
//! point each lease recorded in BREAK_CTX is read directly (offsets from BTF), so the
//! deadlines recorded are the kernel's own values, to the jiffy. All of these fire only
//! on lease breaks and signals: rare events.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use ckpt_common::{
    counters::Counter,
    lease::{BreakCtx, BreakRecord, Breaker, MAX_BREAKERS, MAX_BREAK_LEASES},
    lock::{fl_flags, wait_end, WaitStart},
};

use crate::{
    helpers::{current_ids, jiffies, kread, layout, now_ns, ready},
    locks::{end_wait, note_wait},
    maps::{count, BREAKS, BREAK_CTX, WAITING, WAITS},
};

/// A break attempt's context older than this is from an earlier attempt.
const BREAK_CTX_TTL_NS: u64 = 50_000_000;

#[inline(always)]
fn tp<T>(ctx: &TracePointContext, off: u32) -> Result<T, i32> {
    // SAFETY: offsets come from this kernel's tracefs format file.
    unsafe { ctx.read_at::<T>(off as usize) }
}

#[tracepoint]
pub fn leases_conflict(ctx: TracePointContext) -> u32 {
    if ready() {
        let _ = on_conflict(&ctx, &layout!(brk));
    }
    0
}

fn on_conflict(
    ctx: &TracePointContext,
    o: &ckpt_common::offsets::BreakTpOffsets,
) -> Result<(), i32> {
    let conflict: u8 = tp(ctx, o.conflict)?;
    if conflict == 0 {
        return Ok(());
    }
    let lease: u64 = tp(ctx, o.conflict_lease)?;
    let breaker: u64 = tp(ctx, o.conflict_breaker)?;
    let b_type: u8 = tp(ctx, o.conflict_b_type)?;
    let (_, tid) = current_ids();
    let now = now_ns();
    let fresh = BreakCtx {
        ts_ns: now,
        breaker,
        breaker_type: b_type,
        ..Default::default()
    };
    let p = match BREAK_CTX.get_ptr_mut(&tid) {
        // SAFETY: value of our own map.
        Some(p) if unsafe { (*p).breaker } == breaker => p,
        _ => {
            if BREAK_CTX.insert(&tid, &fresh, 0).is_err() {
                count(Counter::BreakCtxFull);
                return Ok(());
            }
            match BREAK_CTX.get_ptr_mut(&tid) {
                Some(p) => p,
                None => return Ok(()),
            }
        }
    };
    // SAFETY: value of our own map; indexes bounded by MAX_BREAK_LEASES.
    unsafe {
        (*p).ts_ns = now;
        let n = (*p).n as usize;
        for i in 0..MAX_BREAK_LEASES {
            if i < n && (*p).leases[i] == lease {
                return Ok(());
            }
        }
        if n < MAX_BREAK_LEASES {
            let i = n & (MAX_BREAK_LEASES - 1);
            (*p).leases[i] = lease;
            (*p).signals[i] = 0;
            (*p).signal_results[i] = 0;
            (*p).n = n as u32 + 1;
        } else {
            count(Counter::BreakLeasesOverflow);
        }
    }
    Ok(())
}

/// lm_break signals the holder from the breaker's task right after leases_conflict:
/// attribute the signal to the lease that conflicted last.
#[tracepoint]
pub fn signal_generate(ctx: TracePointContext) -> u32 {
    if !ready() {
        return 0;
    }
    let (_, tid) = current_ids();
    let Some(p) = BREAK_CTX.get_ptr_mut(&tid) else {
        return 0;
    };
    let o = layout!(brk);
    let (Ok(sig), Ok(result)) = (
        tp::<i32>(&ctx, o.signal_sig),
        tp::<i32>(&ctx, o.signal_result),
    ) else {
        return 0;
    };
    // SAFETY: value of our own map; index bounded.
    unsafe {
        if now_ns().wrapping_sub((*p).ts_ns) > BREAK_CTX_TTL_NS {
            return 0;
        }
        let n = (*p).n as usize;
        if (1..=MAX_BREAK_LEASES).contains(&n) {
            // Masked so that the verifier sees the bound on the register it indexes with.
            let i = (n - 1) & (MAX_BREAK_LEASES - 1);
            (*p).signals[i] = sig;
            (*p).signal_results[i] = result;
        }
    }
    0
}

#[tracepoint]
pub fn break_lease_noblock(ctx: TracePointContext) -> u32 {
    if ready() {
        let _ = on_break(&ctx, true);
    }
    0
}

#[tracepoint]
pub fn break_lease_block(ctx: TracePointContext) -> u32 {
    if ready() {
        let _ = on_break(&ctx, false);
    }
    0
}

/// The break is set up: record, for every lease this breaker conflicted with, the
/// break as the kernel now has it, and a blocking breaker's wait start. The context is
/// read through its map pointer: 6.1's verifier counts the stack strictly.
fn on_break(ctx: &TracePointContext, nonblock: bool) -> Result<(), i32> {
    let o = layout!(lease);
    let dev: u32 = tp(ctx, o.s_dev)?;
    let ino: u64 = tp(ctx, o.i_ino)?;
    let breaker: u64 = tp(ctx, o.fl)?;
    let (tgid, tid) = current_ids();
    let now = now_ns();
    let j = jiffies();
    let Some(p) = BREAK_CTX.get_ptr_mut(&tid) else {
        return Ok(());
    };
    // SAFETY (whole function): `p` is a value of our own map; indexes are bounded by
    // MAX_BREAK_LEASES.
    if unsafe { (*p).breaker } != breaker {
        return Ok(());
    }
    let n = unsafe { (*p).n } as usize;
    let breaker_type = unsafe { (*p).breaker_type };
    let me = Breaker {
        since_ns: now,
        pid: tgid,
        tid,
        breaker_type,
        nonblock: nonblock as u8,
        _pad: [0; 6],
    };
    for i in 0..MAX_BREAK_LEASES {
        if i >= n {
            break;
        }
        let lease = unsafe { (*p).leases[i] };
        let signal = unsafe { (*p).signals[i] };
        let signal_result = unsafe { (*p).signal_results[i] };
        record_break(lease, now, j, signal, signal_result, &me);
    }
    unsafe { (*p).n = 0 };
    if !nonblock {
        // A restart of the wait (after a lease timed out, or a signal) blocks again
        // on the same request: its first start was kept at the unblock.
        let first = unsafe { (*p).block_since_ns };
        let w = WaitStart {
            since_ns: if first != 0 { first } else { now },
            request: breaker,
            owner: kread(breaker, layout!(lock_lists.owner)).unwrap_or(0),
            ino,
            start: 0,
            end: i64::MAX,
            dev,
            tgid,
            flags: fl_flags::FL_LEASE,
            lock_type: breaker_type,
            _pad: [0; 3],
        };
        note_wait(tid, &w);
    }
    Ok(())
}

/// Adds this break to `BREAKS[lease]`: a new record when the lease starts breaking, the
/// same one (deadlines brought up to date, breaker added) when a break in progress is
/// joined or escalated (a writer on a lease being downgraded sets the unlock deadline
/// and keeps the downgrade one).
#[inline(always)]
fn record_break(lease: u64, now: u64, j: u64, signal: i32, signal_result: i32, me: &Breaker) {
    let s = layout!(lease_struct);
    let owner: u64 = kread(lease, layout!(lock_lists.owner)).unwrap_or(0);
    let break_time: u64 = kread(lease, s.break_time).unwrap_or(0);
    let downgrade_time: u64 = kread(lease, s.downgrade_time).unwrap_or(0);
    let notified = signal != 0 && signal_result == 0;
    if let Some(r) = BREAKS.get_ptr_mut(&lease) {
        // SAFETY: value of our own map; indexes bounded by MAX_BREAKERS.
        unsafe {
            let same_break = (*r).owner == owner
                && ((*r).break_time != 0 && (*r).break_time == break_time
                    || (*r).downgrade_time != 0 && (*r).downgrade_time == downgrade_time);
            if same_break {
                (*r).break_time = break_time;
                (*r).downgrade_time = downgrade_time;
                if notified && (*r).notified == 0 {
                    (*r).notified = 1;
                    (*r).signal = signal;
                }
                let k = (*r).n_breakers as usize;
                for i in 0..MAX_BREAKERS {
                    if i < k && (*r).breakers[i].tid == me.tid {
                        return;
                    }
                }
                if k < MAX_BREAKERS {
                    (*r).breakers[k & (MAX_BREAKERS - 1)] = *me;
                    (*r).n_breakers = k as u8 + 1;
                }
                (*r).breakers_total = (*r).breakers_total.saturating_add(1);
                return;
            }
        }
    }
    let mut rec = BreakRecord {
        started_ns: now,
        started_jiffies: j,
        break_time,
        downgrade_time,
        owner,
        signal: if notified { signal } else { 0 },
        notified: notified as u8,
        n_breakers: 1,
        breakers_total: 1,
        breakers: [Breaker::default(); MAX_BREAKERS],
    };
    rec.breakers[0] = *me;
    if BREAKS.insert(&lease, &rec, 0).is_err() {
        count(Counter::BreaksFull);
    } else {
        count(Counter::Breaks);
    }
}

/// The breaker's wait ended (lease gone, timed out, or a signal). If leases still
/// conflict the kernel blocks again on the same request and break_lease_block
/// records the wait again: its start is kept in BREAK_CTX meanwhile.
#[tracepoint]
pub fn break_lease_unblock(_ctx: TracePointContext) -> u32 {
    let (_, tid) = current_ids();
    if let Some(w) = WAITS.get_ptr(&tid) {
        if let Some(p) = BREAK_CTX.get_ptr_mut(&tid) {
            // SAFETY: values of our own maps.
            unsafe { (*p).block_since_ns = (*w).since_ns };
        }
        end_wait(tid, wait_end::UNBLOCKED);
    }
    0
}

/// `SIG_DFL`, `SIG_IGN`, and the `SA_RESTART` flag (uapi asm-generic/signal*.h).
const SIG_IGN: u64 = 1;
const SA_RESTART: u64 = 0x1000_0000;

/// A handler is about to run. Without SA_RESTART an interrupted lock wait returns
/// EINTR instead of restarting: the wait is over. With it, or with no handler (a
/// freeze, a stop, an ignored signal), the kernel restarts the call and the deferral
/// that follows keeps the wait's start. A fatal signal ends in sched_process_exit.
#[tracepoint]
pub fn signal_deliver(ctx: TracePointContext) -> u32 {
    if WAITING.get(0).copied().unwrap_or(1) == 0 || !ready() {
        return 0;
    }
    let (_, tid) = current_ids();
    if WAITS.get_ptr(&tid).is_none() {
        return 0;
    }
    let o = layout!(brk);
    let (Ok(handler), Ok(flags)) = (
        tp::<u64>(&ctx, o.deliver_handler),
        tp::<u64>(&ctx, o.deliver_flags),
    ) else {
        return 0;
    };
    if handler > SIG_IGN && flags & SA_RESTART == 0 {
        end_wait(tid, wait_end::INTERRUPTED);
        if let Some(p) = BREAK_CTX.get_ptr_mut(&tid) {
            // SAFETY: value of our own map.
            unsafe { (*p).block_since_ns = 0 };
        }
    }
    0
}

/// A thread killed while blocked never returns from its lock call.
#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let (_, tid) = current_ids();
    if WAITING.get(0).copied().unwrap_or(1) != 0 {
        end_wait(tid, wait_end::EXITED);
    }
    let _ = BREAK_CTX.remove(&tid);
    0
}
