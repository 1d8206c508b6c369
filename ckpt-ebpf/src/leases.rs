//! Lease tracepoints: F_SETLEASE (generic_add_lease/generic_delete_lease, completed at
//! sys_exit_fcntl), breaks (leases_conflict -> signal_generate -> break_lease_*), and
//! time-outs (time_out_leases).
//!
//! A break, as fs/locks.c __break_lease runs it in the breaker's task: for each lease,
//! leases_conflict(lease, breaker) fires, then the kernel sets the pending flag and the
//! deadline and calls lm_break, which signals the holder (signal_generate). Then, still
//! under flc_lock, break_lease_noblock (O_NONBLOCK) or break_lease_block fires. At that
//! point each lease recorded in BREAK_CTX is read directly (offsets from BTF), so the
//! deadline reported is the kernel's own value, to the jiffy.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use ckpt_common::{
    counters::Counter,
    lease::{BreakCtx, LeaseEvent, LeaseWhat, MAX_BREAK_LEASES},
    lock::{fl_flags, fl_type, Waiter},
    tag,
};

use crate::{
    maps::{count, current_ids, jiffies, kread, layout, now_ns, ready, BREAK_CTX, WAITERS},
    syscalls::{call_ctx, emit_lease, emit_lease_with},
};

/// A break attempt's context older than this is from an earlier attempt.
const BREAK_CTX_TTL_NS: u64 = 50_000_000;

#[inline(always)]
fn tp<T>(ctx: &TracePointContext, off: u32) -> Result<T, i32> {
    // SAFETY: offsets come from this kernel's tracefs format file.
    unsafe { ctx.read_at::<T>(off as usize) }
}

/// Remembers the lease named during an F_SETLEASE call, for sys_exit_fcntl.
fn note_setlease(dev: u32, ino: u64, owner: u64) {
    let (_, tid) = current_ids();
    if let Some(p) = call_ctx(tid) {
        // SAFETY: value of our own map.
        unsafe {
            (*p).lease_dev = dev;
            (*p).lease_ino = ino;
            (*p).lease_owner = owner;
        }
    }
}

#[tracepoint]
pub fn generic_add_lease(ctx: TracePointContext) -> u32 {
    if ready() {
        let o = layout!(add_lease);
        if let (Ok(dev), Ok(ino), Ok(owner)) = (
            tp::<u32>(&ctx, o.s_dev),
            tp::<u64>(&ctx, o.i_ino),
            tp::<u64>(&ctx, o.owner),
        ) {
            note_setlease(dev, ino, owner);
        }
    }
    0
}

#[tracepoint]
pub fn generic_delete_lease(ctx: TracePointContext) -> u32 {
    if ready() {
        let o = layout!(lease);
        // fl is the lease being removed, or NULL when the caller had none.
        if let (Ok(fl), Ok(dev), Ok(ino), Ok(owner)) = (
            tp::<u64>(&ctx, o.fl),
            tp::<u32>(&ctx, o.s_dev),
            tp::<u64>(&ctx, o.i_ino),
            tp::<u64>(&ctx, o.owner),
        ) {
            if fl != 0 {
                note_setlease(dev, ino, owner);
            }
        }
    }
    0
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

/// The break is set up: report every lease this breaker conflicted with, as the kernel
/// now has it, and record a blocking breaker as a waiter. The context is read through
/// its map pointer and events are written in place: 6.1's verifier refuses this
/// program if it copies them onto the stack.
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
    for i in 0..MAX_BREAK_LEASES {
        if i >= n {
            break;
        }
        let lease = unsafe { (*p).leases[i] };
        let signal = unsafe { (*p).signals[i] };
        let signal_result = unsafe { (*p).signal_results[i] };
        emit_lease_with(|ev| {
            let s = layout!(lease_struct);
            ev.tag = tag::LEASE;
            ev.what = LeaseWhat::Breaking as u32;
            ev.ts_ns = now;
            ev.jiffies = j;
            ev.ino = ino;
            ev.owner = kread(lease, layout!(lock_lists.owner)).unwrap_or(0);
            ev.break_time = kread(lease, s.break_time).unwrap_or(0);
            ev.downgrade_time = kread(lease, s.downgrade_time).unwrap_or(0);
            ev.dev = dev;
            ev.pid = kread::<i32>(lease, layout!(lock_lists.pid)).unwrap_or(0) as u32;
            ev.tgid = tgid;
            ev.tid = tid;
            ev.fd = -1;
            ev.flags = kread(lease, layout!(lock_lists.flags)).unwrap_or(0);
            ev.lease_type = kread(lease, layout!(lock_lists.lock_type)).unwrap_or(fl_type::F_UNLCK);
            ev.breaker_type = breaker_type;
            ev.nonblock = nonblock as u8;
            ev.signal = signal;
            ev.signal_result = signal_result;
        });
    }
    // A restart of the wait re-collects the leases still in the way.
    let first = unsafe { (*p).block_since_ns };
    let since = if first != 0 { first } else { now };
    unsafe {
        (*p).n = 0;
        if !nonblock {
            (*p).block_since_ns = since;
        }
    }
    if !nonblock {
        let w = Waiter {
            since_ns: since,
            ino,
            owner: breaker,
            blocker: 0,
            start: 0,
            end: i64::MAX,
            dev,
            tgid,
            tid,
            flags: fl_flags::FL_LEASE,
            fd: -1,
            lock_type: breaker_type,
            _pad: [0; 3],
        };
        if WAITERS.insert(&tid, &w, 0).is_err() {
            count(Counter::WaitersFull);
        }
    }
    Ok(())
}

/// The wait ended (lease gone, timed out, or a signal). If leases still conflict the
/// kernel blocks again and break_lease_block re-adds the waiter with its first start.
#[tracepoint]
pub fn break_lease_unblock(_ctx: TracePointContext) -> u32 {
    let (_, tid) = current_ids();
    let _ = WAITERS.remove(&tid);
    0
}

#[tracepoint]
pub fn time_out_leases(ctx: TracePointContext) -> u32 {
    if ready() {
        let _ = on_time_out(&ctx);
    }
    0
}

/// `past_time(t)`: the kernel's `t && time_after(jiffies, t)`.
#[inline(always)]
fn past(t: u64, now: u64) -> bool {
    t != 0 && (t.wrapping_sub(now) as i64) < 0
}

fn on_time_out(ctx: &TracePointContext) -> Result<(), i32> {
    let o = layout!(lease);
    let break_time: u64 = tp(ctx, o.break_time)?;
    let downgrade_time: u64 = tp(ctx, o.downgrade_time)?;
    let j = jiffies();
    let to = if past(break_time, j) {
        fl_type::F_UNLCK
    } else if past(downgrade_time, j) {
        fl_type::F_RDLCK
    } else {
        return Ok(());
    };
    let (tgid, tid) = current_ids();
    emit_lease(&LeaseEvent {
        tag: tag::LEASE,
        what: LeaseWhat::TimedOut as u32,
        ts_ns: now_ns(),
        jiffies: j,
        ino: tp(ctx, o.i_ino)?,
        owner: tp(ctx, o.owner)?,
        break_time,
        downgrade_time,
        dev: tp(ctx, o.s_dev)?,
        tgid,
        tid,
        fd: -1,
        flags: tp(ctx, o.flags)?,
        lease_type: to,
        ..Default::default()
    });
    Ok(())
}
