//! Conversions between the model's types and the pinned map's records.

use ckpt_common::lock::{
    EventSource, LockEvent, LockKey, LockKind, LockRecord, Origin, NOT_OBSERVED,
};

use super::{
    model::{FlockHeld, HeldLock, Request},
    KernelDev, LockType,
};

pub fn key_of(dev: KernelDev, ino: u64, l: &HeldLock) -> LockKey {
    LockKey {
        dev: dev.0,
        kind: l.kind as u8,
        _pad: [0; 3],
        ino,
        owner: l.owner,
        start: l.start,
    }
}

pub fn record_of(l: &HeldLock) -> LockRecord {
    LockRecord {
        end: l.end,
        since_ns: l.since_ns,
        pid: l.pid,
        fd: l.fd,
        lock_type: l.lock_type.to_fl_type(),
        origin: l.origin as u8,
        _pad: [0; 6],
    }
}

/// Inverse of `key_of`/`record_of`; `None` for entries this version cannot read.
pub fn held_of(k: &LockKey, r: &LockRecord) -> Option<HeldLock> {
    Some(HeldLock {
        kind: LockKind::from_u8(k.kind)?,
        owner: k.owner,
        start: k.start,
        end: r.end,
        lock_type: LockType::from_fl_type(r.lock_type)?,
        pid: r.pid,
        fd: r.fd,
        since_ns: r.since_ns,
        origin: if r.origin == Origin::Reconciled as u8 {
            Origin::Reconciled
        } else {
            Origin::Traced
        },
    })
}

/// Turns a raw event into a model request; `None` for events that are not locks.
pub fn request_of(ev: &LockEvent) -> Option<Request> {
    let kind = match ev.source {
        s if s == EventSource::Flock as u8 => LockKind::Flock,
        s if s == EventSource::Posix as u8 => match LockKind::from_fl_flags(ev.flags)? {
            LockKind::Flock => return None,
            k => k,
        },
        _ => return None,
    };
    Some(Request {
        kind,
        owner: ev.owner,
        start: ev.start,
        end: ev.end,
        lock_type: LockType::from_fl_type(ev.lock_type),
        pid: ev.pid,
        fd: ev.fd,
        ts_ns: ev.ts_ns,
        ret: ev.ret,
        observed: (kind == LockKind::Flock && ev.observed != NOT_OBSERVED).then(|| {
            LockType::from_fl_type(ev.observed).map(|lock_type| FlockHeld {
                lock_type,
                pid: ev.observed_pid,
            })
        }),
    })
}
