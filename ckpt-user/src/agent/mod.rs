//! `ckpt-agent`: loads and pins the tracepoint programs that record what the kernel
//! forgets (wait starts, lease breaks, opt-in hold times), keeps the deleted-file
//! table fresh in the background, and runs until SIGINT/SIGTERM.
//!
//! It keeps no copy of the lock table: readers walk the kernel's lists. So a restart
//! loses nothing but history, by construction, and the pinned maps keep even that.

pub mod instance;
pub mod metrics;

use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::maps::{Map, MapData, PerCpuArray};
use ckpt_common::{counters::Counter, names};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::ghost::table::DeletedTable;
use crate::tracer::{
    iters::{Iters, Prog},
    loader::{self, Tracing},
    pins::PinDir,
};

pub struct Options {
    pub pins: PinDir,
    /// Remove every pin on exit (tracing stops).
    pub unpin: bool,
    pub tracing: Tracing,
    pub metrics: MetricsOptions,
}

/// `--metrics*`: where the metrics go (neither: none are kept).
pub struct MetricsOptions {
    pub addr: Option<String>,
    pub textfile: Option<std::path::PathBuf>,
    pub interval: Duration,
    pub cgroups: Vec<String>,
}

/// Starts the metrics server and textfile writer, if asked for.
fn start_metrics(opts: &Options) -> Result<Option<metrics::Metrics>> {
    let o = &opts.metrics;
    if o.addr.is_none() && o.textfile.is_none() {
        return Ok(None);
    }
    let m = metrics::Metrics::new(o.cgroups.clone());
    if let Some(addr) = &o.addr {
        metrics::serve(addr, m.clone(), opts.pins.clone())?;
        info!(%addr, "serving metrics at /metrics");
    }
    if let Some(path) = o.textfile.clone() {
        let (m, pins, every) = (m.clone(), opts.pins.clone(), o.interval);
        // Its own thread: a write reads the kernel's lists, slow on a big host.
        std::thread::Builder::new()
            .name("metrics-textfile".into())
            .spawn(move || loop {
                if let Err(e) = m.write_textfile(&pins, &path) {
                    warn!(error = %format!("{e:#}"), "metrics textfile not written");
                }
                std::thread::sleep(every);
            })?;
    }
    Ok(Some(m))
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

/// Sum of a per-CPU counter.
pub fn counter_total(counters: &PerCpuArray<MapData, u64>, c: Counter) -> Result<u64> {
    Ok(counters.get(&(c as u32), 0)?.iter().sum())
}

pub async fn run(opts: Options) -> Result<()> {
    // First, so that SIGINT/SIGTERM during start-up also end in a clean exit.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let _instance = instance::InstanceLock::acquire(&opts.pins)?;
    let Tracer {
        mut ebpf,
        counters,
        iters,
    } = attach(&opts)?;
    let deleted = open_deleted(&mut ebpf, &iters, &opts)?;
    notify(sd_notify::NotifyState::Ready);
    let metrics = start_metrics(&opts)?;
    tokio::select! {
        served = serve(&opts, &counters, deleted, metrics) => served?,
        _ = sigint.recv() => info!("SIGINT: exiting"),
        _ = sigterm.recv() => info!("SIGTERM: exiting"),
    }
    notify(sd_notify::NotifyState::Stopping);
    leave(&opts)
}

/// What the agent holds while it serves: its programs (attached, maps pinned), their
/// loss counters, and the pinned iterators.
struct Tracer {
    /// Its programs and links (the deleted-file table takes its maps).
    ebpf: aya::Ebpf,
    counters: PerCpuArray<MapData, u64>,
    iters: Iters,
}

/// Loads and attaches the tracepoint programs (re-adopting pinned maps), and loads
/// and pins the iterators for readers.
fn attach(opts: &Options) -> Result<Tracer> {
    let loader::Loaded { mut ebpf, adopted } = loader::load_and_attach(&opts.pins, opts.tracing)?;
    info!(
        pin_dir = %opts.pins.root().display(),
        adopted,
        hold_times = opts.tracing.hold_times,
        exact_deleted = opts.tracing.exact_deleted,
        "programs attached{}",
        if adopted { "; re-adopting pinned maps" } else { "" }
    );
    let counters = take(&mut ebpf, names::COUNTERS)?;
    let iters = Iters::load(&Prog::ALL)?;
    iters.pin(&opts.pins)?;
    Ok(Tracer {
        ebpf,
        counters,
        iters,
    })
}

/// The deleted-file table, made once before the agent says it is ready.
fn open_deleted<'a>(
    ebpf: &mut aya::Ebpf,
    iters: &'a Iters,
    opts: &Options,
) -> Result<DeletedTable<'a>> {
    let mut deleted = DeletedTable::open(
        take(ebpf, names::FILE_TRIGGERS)?,
        take(ebpf, names::DELETED)?,
        take(ebpf, names::HOLDERS)?,
        take(ebpf, names::DELETED_SCAN)?,
        iters,
        opts.tracing.exact_deleted,
    )?;
    deleted.refresh()?;
    info!(holders = deleted.len(), "deleted-but-open files scanned");
    Ok(deleted)
}

/// systemd Type=notify (nothing without NOTIFY_SOCKET).
fn notify(state: sd_notify::NotifyState) {
    if let Err(e) = sd_notify::notify(false, &[state]) {
        warn!(error = %e, "systemd notification failed");
    }
}

/// The agent's work until it is stopped (returns only on an error): the deleted-file
/// table kept fresh, lost records reported, and the metrics fed.
async fn serve(
    opts: &Options,
    counters: &PerCpuArray<MapData, u64>,
    mut deleted: DeletedTable<'_>,
    metrics: Option<metrics::Metrics>,
) -> Result<()> {
    // Looks for triggers this often (rescans are rate-limited in DeletedTable).
    let mut deleted_tick = tokio::time::interval(Duration::from_millis(5));
    deleted_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut reported = [0u64; Counter::LOSSES.len()];
    // Waits that ended and breaks that began, for the metrics: the tracer's small
    // maps looked at 10 times a second (only with --metrics*).
    let mut watch = metrics::Watch::default();
    let mut watch_tick = tokio::time::interval(Duration::from_millis(100));
    watch_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = watch_tick.tick(), if metrics.is_some() => {
                if let Some(m) = &metrics {
                    if let Err(e) = watch.tick(m, &opts.pins, counters, crate::sys::monotonic_ns()) {
                        warn!(error = %format!("{e:#}"), "metrics: the tracer's maps could not be read");
                    }
                }
            }
            _ = tick.tick() => {
                let mut totals = [0u64; Counter::LOSSES.len()];
                for (t, (c, _)) in totals.iter_mut().zip(Counter::LOSSES) {
                    *t = counter_total(counters, c)?;
                }
                for (c, n) in new_losses(&totals, &mut reported) {
                    warn!(count = n, counter = c.name(), "tracer map full: some records are missing");
                }
            }
            _ = deleted_tick.tick() => {
                deleted.refresh()?;
            }
        }
    }
}

/// The loss counters that grew since last reported (`totals` in `Counter::LOSSES`
/// order), by how much; `reported` moves up to `totals`.
fn new_losses(totals: &[u64], reported: &mut [u64]) -> Vec<(Counter, u64)> {
    let mut grew = Vec::new();
    for ((&n, seen), (c, _)) in totals.iter().zip(reported.iter_mut()).zip(Counter::LOSSES) {
        if n > *seen {
            grew.push((c, n - *seen));
            *seen = n;
        }
    }
    grew
}

/// On the way out: the pins removed with --unpin, else kept for the next agent.
fn leave(opts: &Options) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_is_reported_once_by_how_much_it_grew() {
        let n = Counter::LOSSES.len();
        let mut reported = vec![0u64; n];
        assert!(new_losses(&vec![0; n], &mut reported).is_empty());
        let mut totals = vec![0u64; n];
        totals[0] = 5;
        assert_eq!(
            new_losses(&totals, &mut reported),
            vec![(Counter::LOSSES[0].0, 5)]
        );
        assert!(
            new_losses(&totals, &mut reported).is_empty(),
            "reported once"
        );
        totals[0] = 7;
        totals[n - 1] = 1;
        assert_eq!(
            new_losses(&totals, &mut reported),
            vec![(Counter::LOSSES[0].0, 2), (Counter::LOSSES[n - 1].0, 1)]
        );
    }
}
