//! The tracepoint programs' maps, shared with userspace. Pinned by name so that a
//! restarted agent re-adopts them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use ckpt_common::{
    capacity,
    counters::Counter,
    lease::{BreakCtx, BreakRecord},
    lock::{wait_hist, HoldStart, WaitCarry, WaitEnd, WaitStart},
};

/// When each blocked thread began to wait (see `WaitStart`).
#[map]
pub static WAITS: HashMap<u32, WaitStart> = HashMap::pinned(capacity::WAITS, 0);

/// Waits a restore carries over, by the restored thread (see `WaitCarry`).
#[map]
pub static WAIT_CARRY: HashMap<u32, WaitCarry> = HashMap::pinned(capacity::WAIT_CARRY, 0);

/// Slot 0: about how many entries `WAITS` has (the lock programs' gate).
#[map]
pub static WAITING: Array<u64> = Array::pinned(1, 0);

/// Waits that ended: a ring of `capacity::WAIT_ENDS` slots per CPU (see `WaitEnd`).
/// Per CPU because the bpf target's atomics cannot return the old value (BPF_FETCH
/// needs cpu v3), so no shared index can be claimed; and a per-CPU ring costs no
/// cache-line bouncing.
#[map]
pub static WAIT_ENDS: PerCpuArray<WaitEnd> = PerCpuArray::pinned(capacity::WAIT_ENDS, 0);

/// Slot 0, per CPU: how many wait ends this CPU recorded.
#[map]
pub static WAIT_END_SEQ: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// How long waits that ended had waited: a histogram per CPU (see `wait_hist`), so
/// that no wait escapes it however short, whatever a reader's interval.
#[map]
pub static WAIT_HIST: PerCpuArray<u64> = PerCpuArray::pinned(wait_hist::SLOTS, 0);

#[map]
pub static BREAK_CTX: HashMap<u32, BreakCtx> = HashMap::pinned(capacity::BREAK_CTX, 0);

/// Lease breaks by lease address. LRU: records of leases long gone make room.
#[map]
pub static BREAKS: LruHashMap<u64, BreakRecord> = LruHashMap::pinned(capacity::BREAKS, 0);

/// `--hold-times`: when each held lock object was first seen, by address.
#[map]
pub static HOLDS: LruHashMap<u64, HoldStart> = LruHashMap::pinned(capacity::HOLDS, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}
