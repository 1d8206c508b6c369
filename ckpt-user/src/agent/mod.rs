//! `ckpt-agent`: owns the programs and maps, replays lock events into the lock table,
//! reconciles with /proc/locks, and keeps running until SIGINT/SIGTERM.

pub mod instance;
pub mod reconcile;
pub mod table;

use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::maps::{Array, Map, MapData, PerCpuArray};
use ckpt_common::{
    counters::{AgentStat, Counter},
    lock::LockEvent,
    names,
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};
use tracing::{info, warn};

use crate::tracer::{loader, pins::PinDir, ring::RingConsumer};
use table::LockTable;

pub struct Options {
    pub pins: PinDir,
    /// Remove every pin on exit (tracing stops).
    pub unpin: bool,
    /// Capacity of the lock table (default: `capacity::LOCKS`).
    pub max_locks: Option<u32>,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut aya::Ebpf,
    name: &str,
) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from object"))?;
    T::try_from(map).with_context(|| format!("opening map {name}"))
}

/// Registers a map-backed fd for readiness. The fd is owned by `inner`, which the
/// AsyncFd owns for its whole life, so it cannot be closed while registered.
fn readable<T: std::os::fd::AsRawFd>(inner: T) -> Result<AsyncFd<T>> {
    // SAFETY: see above.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("registering fd with tokio: {e}"))
}

/// Sum of a per-CPU counter.
pub fn counter_total(counters: &PerCpuArray<MapData, u64>, c: Counter) -> Result<u64> {
    Ok(counters.get(&(c as u32), 0)?.iter().sum())
}

pub async fn run(opts: Options) -> Result<()> {
    let _instance = instance::InstanceLock::acquire(&opts.pins)?;
    let loader::Loaded { mut ebpf, adopted } = loader::load_and_attach(&opts.pins, opts.max_locks)?;
    info!(
        pin_dir = %opts.pins.root().display(),
        adopted,
        "programs attached{}",
        if adopted { "; re-adopting pinned maps" } else { "" }
    );

    let logger = aya_log::EbpfLogger::init(&mut ebpf).context("initialising aya-log")?;
    let mut logger = readable(logger)?;

    let ring = match ebpf.take_map(names::LOCK_EVENTS) {
        Some(Map::RingBuf(data)) => RingConsumer::open(data)?,
        _ => anyhow::bail!("map {} missing or not a ring buffer", names::LOCK_EVENTS),
    };
    let counters: PerCpuArray<MapData, u64> = take(&mut ebpf, names::COUNTERS)?;
    let stats: Array<MapData, u64> = take(&mut ebpf, names::AGENT_STATS)?;
    let mut table = LockTable::open(take(&mut ebpf, names::LOCKS)?, stats)?;

    if !adopted {
        let n = reconcile::import_proc_locks(&mut table)?;
        table.flush()?;
        info!(
            imported = n,
            "reconciled with /proc/locks: locks taken before tracing started"
        );
    } else {
        info!(locks = table.len(), "re-adopted lock table");
    }

    let mut ring = readable(ring)?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut drops_seen = table.stat(AgentStat::RingBufFullSeen)?;
    // Events queued while no agent ran are in the ring already: drain them first.
    drain(ring.get_mut(), &mut table)?;

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut table)?;
                guard.clear_ready();
            }
            guard = logger.readable_mut() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = tick.tick() => {
                let drops = counter_total(&counters, Counter::RingBufFull)?;
                if drops > drops_seen {
                    warn!(lost = drops - drops_seen, "lock events were lost (ring buffer full): resynchronising from /proc/locks");
                    drain(ring.get_mut(), &mut table)?;
                    table.clear();
                    reconcile::import_proc_locks(&mut table)?;
                    table.flush()?;
                    drops_seen = drops;
                    table.set_stat(AgentStat::RingBufFullSeen, drops)?;
                }
                if table.has_reconciled() {
                    reconcile::verify(&mut table)?;
                    table.flush()?;
                }
                // Safety net for a wakeup lost to a record that was busy when we looked.
                drain(ring.get_mut(), &mut table)?;
                let full = counter_total(&counters, Counter::WaitersFull)?;
                if full > 0 {
                    warn!(count = full, "WAITERS map was full: some blocked waiters are missing");
                }
            }
            _ = sigint.recv() => { info!("SIGINT: exiting"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: exiting"); break; }
        }
    }

    if opts.unpin {
        opts.pins
            .remove_all()
            .with_context(|| format!("removing pins under {}", opts.pins.root().display()))?;
        info!("pins removed; tracing stops");
    } else {
        info!(pin_dir = %opts.pins.root().display(), "pins kept: tracing continues, a new agent will re-adopt");
    }
    Ok(())
}

/// Applies every queued event. A batch is acknowledged (the ring's consumer position
/// moves past it) only after the lock table holds its effect: a reader that waits for
/// the consumer to reach the producer sees every lock change made before it looked, and
/// an agent killed mid-batch leaves the batch for its successor.
fn drain(ring: &mut RingConsumer, table: &mut LockTable) -> Result<()> {
    loop {
        let t0 = std::time::Instant::now();
        let mut n = 0u64;
        let pos = ring.read(|bytes| {
            n += 1;
            if bytes.len() < std::mem::size_of::<LockEvent>() {
                warn!(len = bytes.len(), "short lock event ignored");
                return;
            }
            // SAFETY: the program writes a whole LockEvent; read_unaligned copes with
            // the ring's 8-byte alignment.
            let ev = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const LockEvent) };
            table.apply(&ev);
        });
        if pos == ring.position() {
            return Ok(());
        }
        let t1 = std::time::Instant::now();
        table.flush()?;
        ring.commit(pos);
        tracing::debug!(
            events = n,
            apply_us = (t1 - t0).as_micros() as u64,
            flush_us = t1.elapsed().as_micros() as u64,
            "batch"
        );
    }
}
