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
    let loader::Loaded { mut ebpf, adopted } = loader::load_and_attach(&opts.pins, opts.tracing)?;
    info!(
        pin_dir = %opts.pins.root().display(),
        adopted,
        hold_times = opts.tracing.hold_times,
        exact_deleted = opts.tracing.exact_deleted,
        "programs attached{}",
        if adopted { "; re-adopting pinned maps" } else { "" }
    );
    let counters: PerCpuArray<MapData, u64> = take(&mut ebpf, names::COUNTERS)?;
    let iters = Iters::load(&Prog::ALL)?;
    iters.pin(&opts.pins)?;
    let mut deleted = DeletedTable::open(
        take(&mut ebpf, names::FILE_TRIGGERS)?,
        take(&mut ebpf, names::DELETED)?,
        take(&mut ebpf, names::HOLDERS)?,
        take(&mut ebpf, names::DELETED_SCAN)?,
        &iters,
        opts.tracing.exact_deleted,
    )?;
    deleted.refresh()?;
    info!(holders = deleted.len(), "deleted-but-open files scanned");
    // Serving: programs attached, iterators pinned, the deleted-file table made.
    // (systemd Type=notify; nothing without NOTIFY_SOCKET.)
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        warn!(error = %e, "readiness notification failed");
    }
    // Looks for triggers this often (rescans are rate-limited in DeletedTable).
    let mut deleted_tick = tokio::time::interval(Duration::from_millis(5));
    deleted_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut reported = [0u64; Counter::LOSSES.len()];
    let metrics = start_metrics(&opts)?;
    // Waits that ended and breaks that began, for the metrics: the tracer's small
    // maps looked at 10 times a second (only with --metrics*).
    let mut watch = metrics::Watch::default();
    let mut watch_tick = tokio::time::interval(Duration::from_millis(100));
    watch_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = watch_tick.tick(), if metrics.is_some() => {
                if let Some(m) = &metrics {
                    if let Err(e) = watch.tick(m, &opts.pins, &counters, crate::sys::monotonic_ns()) {
                        warn!(error = %format!("{e:#}"), "metrics: the tracer's maps could not be read");
                    }
                }
            }
            _ = tick.tick() => {
                for (i, (c, _)) in Counter::LOSSES.iter().enumerate() {
                    let n = counter_total(&counters, *c)?;
                    if n > reported[i] {
                        warn!(count = n - reported[i], counter = c.name(), "tracer map full: some records are missing");
                        reported[i] = n;
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

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
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
