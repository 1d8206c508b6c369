//! `ckpt-agent`: owns the programs and maps, replays lock and lease events into the
//! tables readers use, reconciles with /proc/locks, and runs until SIGINT/SIGTERM.

pub mod deleted_table;
pub mod instance;
pub mod lease_table;
pub mod lock_table;
pub mod reconcile;
pub mod stats;

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use aya::maps::{Map, MapData, PerCpuArray};
use ckpt_common::{
    counters::{AgentStat, Counter},
    names,
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};
use tracing::{debug, info, warn};

use crate::{
    locks::proc_locks::{self, ProcLock},
    sys::hz::kernel_hz,
    tracer::{
        loader,
        pins::PinDir,
        ring::{Event, RingConsumer},
    },
};
use deleted_table::DeletedTable;
use lease_table::LeaseTable;
use lock_table::LockTable;
use stats::Stats;

pub struct Options {
    pub pins: PinDir,
    /// Remove every pin on exit (tracing stops).
    pub unpin: bool,
    /// Capacity of the lock table (default: `capacity::LOCKS`).
    pub max_locks: Option<u32>,
}

fn take<T: TryFrom<Map, Error = aya::maps::MapError>>(
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

/// Everything the agent writes: the two tables and the statistics.
pub struct State {
    pub stats: Stats,
    pub locks: LockTable,
    pub leases: LeaseTable,
}

impl State {
    /// Applies one ring record at ring position `pos` (in memory; see [`State::flush`]).
    fn apply(&mut self, bytes: &[u8], pos: u64) {
        match Event::decode(bytes) {
            Some(Event::Lock(ev)) => self.locks.apply(&ev, pos),
            Some(Event::Lease(ev)) => {
                debug!(?ev, "lease event");
                self.leases.apply(&ev);
            }
            None => warn!(len = bytes.len(), "unknown ring record ignored"),
        }
    }

    /// Writes both tables under the seqlock, then the counters. Without changes the
    /// sequence number stays: a reader's earlier copy is then known to be exact.
    fn flush(&mut self) -> Result<()> {
        let (locks, leases) = (&mut self.locks, &mut self.leases);
        let full = if locks.has_staged() || leases.has_staged() {
            self.stats
                .under_seqlock(|| Ok(locks.write_staged()? + leases.write_staged()?))?
        } else {
            0
        };
        self.stats.add(AgentStat::LocksFull, full)?;
        let applied = std::mem::take(&mut self.locks.applied);
        let reconciled = std::mem::take(&mut self.locks.reconciled);
        self.stats.add(AgentStat::EventsApplied, applied)?;
        self.stats.add(AgentStat::Reconciled, reconciled)
    }
}

/// /proc/locks, read for the agent's half-second checks within a CPU budget. The
/// kernel restarts its walk of every lock for each page a read returns, so a read
/// costs O(locks²): 4 s of CPU at 100,000 locks, where checking every half second
/// kept the agent at 100% of a CPU and its events waiting.
struct ProcLocksBudget {
    /// No read before this.
    next: Instant,
}

impl ProcLocksBudget {
    /// At most 1/SHARE of the agent's time goes to reading /proc/locks.
    const SHARE: u32 = 20;

    fn new() -> ProcLocksBudget {
        ProcLocksBudget {
            next: Instant::now(),
        }
    }

    /// /proc/locks now, or None while the last read's cost is not yet paid off.
    fn read(&mut self) -> Result<Option<Vec<ProcLock>>> {
        let t0 = Instant::now();
        if t0 < self.next {
            return Ok(None);
        }
        let procs = proc_locks::read()?;
        let took = t0.elapsed();
        let pause = took * (Self::SHARE - 1);
        self.next = Instant::now() + pause;
        if took > Duration::from_millis(100) {
            debug!(
                ms = took.as_millis() as u64,
                locks = procs.len(),
                "/proc/locks is slow to read: next check in {} s",
                pause.as_secs()
            );
        }
        Ok(Some(procs))
    }
}

/// Events arriving this soon after the last drain are a stream ...
const STREAM: Duration = Duration::from_millis(5);
/// ... and are applied in batches this far apart. Readers that wait for the agent
/// (`LiveMaps::barrier`, inside a dump's frozen window) wait up to this much longer
/// while other processes lock a lot.
const GATHER: Duration = Duration::from_millis(1);

pub async fn run(opts: Options) -> Result<()> {
    // First, so that SIGINT/SIGTERM during start-up also end in a clean exit.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let _instance = instance::InstanceLock::acquire(&opts.pins)?;
    let hz = kernel_hz().context("finding the kernel's HZ")?;
    let loader::Loaded { mut ebpf, adopted } = loader::load_and_attach(&opts.pins, opts.max_locks)?;
    info!(
        pin_dir = %opts.pins.root().display(),
        adopted,
        hz,
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
    let mut state = State {
        stats: Stats::new(take(&mut ebpf, names::AGENT_STATS)?),
        locks: LockTable::open(take(&mut ebpf, names::LOCKS)?)?,
        leases: LeaseTable::open(take(&mut ebpf, names::LEASES)?, hz)?,
    };

    if !adopted {
        let n = reconcile::import_proc_locks(&mut state.locks)?;
        info!(
            imported = n,
            "reconciled with /proc/locks: locks taken before tracing started"
        );
    } else {
        info!(
            locks = state.locks.len(),
            leases = state.leases.len(),
            "re-adopted lock table"
        );
    }
    // Events queued while no agent ran are in the ring already: apply them, then
    // let /proc/locks say which leases still exist.
    let mut ring = readable(ring)?;
    drain(ring.get_mut(), &mut state)?;
    state.leases.reconcile(&proc_locks::read()?);
    state.flush()?;

    let mut deleted = DeletedTable::open(
        take(&mut ebpf, names::FILE_TRIGGERS)?,
        take(&mut ebpf, names::DELETED)?,
        take(&mut ebpf, names::HOLDERS)?,
        take(&mut ebpf, names::DELETED_SCAN)?,
        (
            opts.pins.links_dir().join(names::DELETED_FDS),
            opts.pins.links_dir().join(names::DELETED_MAPS),
        ),
    )?;
    deleted.refresh()?;
    info!(holders = deleted.len(), "deleted-but-open files scanned");
    // Looks for triggers this often (rescans are rate-limited in DeletedTable).
    let mut deleted_tick = tokio::time::interval(Duration::from_millis(5));
    deleted_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut suspects = std::collections::HashSet::new();
    let mut proc_locks_budget = ProcLocksBudget::new();
    let mut drops_seen = state.stats.get(AgentStat::RingBufFullSeen)?;
    let mut last_drain = Instant::now();
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                // Cleared before draining: the ring notifies only an event that finds
                // the agent caught up, so a notification cleared after the last read
                // would be lost until the half-second tick (seen under TCG: a restore
                // waited 40 ms in vain for one event).
                guard.clear_ready();
                // Under a stream of events, let them gather: the kernel wakes the agent
                // only for an event that finds it caught up, so one wakeup and one write
                // per changed lock serve a whole batch (a lock and its unlock in one
                // batch cost no write at all). A lone event is applied at once.
                if last_drain.elapsed() < STREAM {
                    tokio::time::sleep(GATHER).await;
                }
                drain(guard.get_inner_mut(), &mut state)?;
                last_drain = Instant::now();
            }
            guard = logger.readable_mut() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = tick.tick() => {
                // Safety net for a wakeup lost to a record that was busy when we looked.
                drain(ring.get_mut(), &mut state)?;
                let drops = counter_total(&counters, Counter::RingBufFull)?;
                if drops > drops_seen {
                    warn!(lost = drops - drops_seen, "lock events were lost (ring buffer full): resynchronising from /proc/locks");
                    state.locks.clear();
                    reconcile::import_proc_locks(&mut state.locks)?;
                    drops_seen = drops;
                    state.stats.set(AgentStat::RingBufFullSeen, drops)?;
                }
                // Reconciled locks not yet adopted, and leases (closing a lease's last
                // fd has no tracepoint): /proc/locks tells what is gone.
                let (locks, leases) = (state.locks.has_reconciled(), !state.leases.is_empty());
                if locks || leases {
                    if let Some(procs) = proc_locks_budget.read()? {
                        if locks {
                            reconcile::verify(&mut state.locks, &procs, &mut suspects);
                        }
                        if leases {
                            state.leases.reconcile(&procs);
                        }
                    }
                }
                state.flush()?;
                for c in [Counter::WaitersFull, Counter::BreakCtxFull, Counter::BreakLeasesOverflow] {
                    let n = counter_total(&counters, c)?;
                    if n > 0 {
                        warn!(count = n, counter = c.name(), "tracer map overflow: some state is missing");
                    }
                }
            }
            _ = deleted_tick.tick() => {
                deleted.refresh()?;
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
/// moves past it) only after the tables hold its effect: a reader that waits for the
/// consumer to reach the producer sees every change made before it looked, and an agent
/// killed mid-batch leaves the batch for its successor.
fn drain(ring: &mut RingConsumer, state: &mut State) -> Result<()> {
    loop {
        let pos = ring.read(|bytes, at| state.apply(bytes, at));
        if pos == ring.position() {
            return Ok(());
        }
        state.flush()?;
        ring.commit(pos);
        // Descriptions used by several tasks at once: their events may be out of
        // order (see lock_table::SharedOwners); read their true state back.
        if state.locks.resync_shared(ring.producer()) {
            state.flush()?;
        }
    }
}
