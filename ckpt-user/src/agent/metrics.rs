//! `ckpt-agent --metrics ADDR` / `--metrics-textfile PATH`: Prometheus metrics, encoded
//! by prometheus-client (OpenMetrics text).
//!
//! Gauges (locks, waiters, leases breaking, deleted files) are read from the kernel's
//! lists when collected (a scrape, or each textfile write), like `ckpt-user locks`.
//! The wait-time histogram is the tracer's own (every wait end it sees, however short),
//! plus the ends it cannot see, which `Watch::tick` finds every 100 ms from the agent's
//! loop (a wait left without a kernel event, a lease breaker's), with lease breaks that
//! began (by target). Labels are bounded: kind, type, target, map, and a cgroup only
//! from `--metrics-cgroup`.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use ckpt_common::{
    counters::Counter as TracerCounter,
    lock::{fl_type, WAIT_BUCKETS_NS},
};
use prometheus_client::{
    encoding::{text::encode, EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, MetricType, TypedMetric},
    registry::Registry,
};

use crate::{
    ghost,
    lock::{view::live_rows, HeldKind, LockType},
    tracer::{
        history::{self, BreakTracker, History, WaitFollower},
        pins::PinDir,
    },
};

type Labels = Vec<(&'static str, String)>;

/// Values of the `target` label of lease breaks.
const TARGETS: [&str; 2] = ["unlock", "read"];

/// Waits per bucket (the last is +Inf), their sum in ns, their number.
#[derive(Clone, Debug, Default, PartialEq)]
struct Hist {
    buckets: Vec<u64>,
    sum_ns: u64,
    count: u64,
}

impl Hist {
    fn observe(&mut self, ns: u64) {
        self.buckets.resize(WAIT_BUCKETS_NS.len() + 1, 0);
        let i = WAIT_BUCKETS_NS
            .iter()
            .position(|b| ns <= *b)
            .unwrap_or(WAIT_BUCKETS_NS.len());
        self.buckets[i] += 1;
        self.sum_ns += ns;
        self.count += 1;
    }

    fn plus(&self, o: &Hist) -> Hist {
        let n = WAIT_BUCKETS_NS.len() + 1;
        Hist {
            buckets: (0..n)
                .map(|i| {
                    self.buckets.get(i).copied().unwrap_or(0)
                        + o.buckets.get(i).copied().unwrap_or(0)
                })
                .collect(),
            sum_ns: self.sum_ns + o.sum_ns,
            count: self.count + o.count,
        }
    }
}

/// `ckpt_wait_seconds`: the tracer's in-kernel histogram (read at each collection)
/// plus the ends only the agent sees. prometheus-client's own Histogram cannot take
/// counts made elsewhere, so this metric encodes itself.
#[derive(Clone, Debug, Default)]
struct WaitHistogram {
    /// (the tracer's, the agent's).
    parts: Arc<Mutex<(Hist, Hist)>>,
}

impl WaitHistogram {
    fn set_tracer(&self, h: Hist) {
        self.parts.lock().expect("not poisoned").0 = h;
    }

    fn observe(&self, ns: u64) {
        self.parts.lock().expect("not poisoned").1.observe(ns);
    }

    fn total(&self) -> Hist {
        let p = self.parts.lock().expect("not poisoned");
        p.0.plus(&p.1)
    }
}

impl TypedMetric for WaitHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for WaitHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = self.total();
        let buckets: Vec<(f64, u64)> = WAIT_BUCKETS_NS
            .iter()
            .map(|ns| *ns as f64 / 1e9)
            .chain([f64::MAX]) // +Inf to the encoder
            .zip(h.buckets.iter().copied())
            .collect();
        encoder.encode_histogram::<NoLabelSet>(h.sum_ns as f64 / 1e9, h.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Every metric, shared by the agent's loop and the server thread.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    locks: Family<Labels, Gauge>,
    waiters: Family<Labels, Gauge>,
    breaking: Family<Labels, Gauge>,
    cgroup_locks: Family<Labels, Gauge>,
    cgroup_waiters: Family<Labels, Gauge>,
    deleted_files: Gauge,
    deleted_bytes: Gauge,
    waits: WaitHistogram,
    breaks: Family<Labels, Counter>,
    lost: Family<Labels, Counter>,
    /// Cgroups given with --metrics-cgroup (label values as given).
    cgroups: Arc<Vec<String>>,
}

impl Metrics {
    pub fn new(cgroups: Vec<String>) -> Metrics {
        let mut r = Registry::default();
        let build = Family::<Labels, Gauge>::default();
        build
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])
            .set(1);
        // A gauge named *_info (not an OpenMetrics info type, which node_exporter's
        // textfile parser refuses).
        r.register("ckpt_build_info", "ckpt's version", build);
        let m = Metrics {
            registry: Arc::new(Registry::default()),
            locks: Family::default(),
            waiters: Family::default(),
            breaking: Family::default(),
            cgroup_locks: Family::default(),
            cgroup_waiters: Family::default(),
            deleted_files: Gauge::default(),
            deleted_bytes: Gauge::default(),
            waits: WaitHistogram::default(),
            breaks: Family::default(),
            lost: Family::default(),
            cgroups: Arc::new(cgroups),
        };
        r.register(
            "ckpt_locks",
            "Locks and leases held, by kind (posix, ofd, flock, lease) and type",
            m.locks.clone(),
        );
        r.register(
            "ckpt_waiters",
            "Blocked lock requests and lease breakers, by kind",
            m.waiters.clone(),
        );
        r.register(
            "ckpt_leases_breaking",
            "Leases being broken, by target (unlock or read)",
            m.breaking.clone(),
        );
        r.register(
            "ckpt_cgroup_locks",
            "Locks and leases held by processes of a --metrics-cgroup",
            m.cgroup_locks.clone(),
        );
        r.register(
            "ckpt_cgroup_waiters",
            "Blocked requests of processes of a --metrics-cgroup",
            m.cgroup_waiters.clone(),
        );
        r.register(
            "ckpt_deleted_files",
            "Deleted-but-open regular files",
            m.deleted_files.clone(),
        );
        // The unit is in the name (no UNIT metadata: some parsers refuse it on a
        // histogram).
        r.register(
            "ckpt_deleted_bytes",
            "Disk (or memory) that deleted-but-open files keep allocated",
            m.deleted_bytes.clone(),
        );
        r.register(
            "ckpt_wait_seconds",
            "How long lock and lease waits that ended had waited (an end with no kernel event counts when seen, up to 100 ms late)",
            m.waits.clone(),
        );
        r.register(
            "ckpt_lease_breaks",
            "Lease breaks that began, by target (unlock or read)",
            m.breaks.clone(),
        );
        r.register(
            "ckpt_lost_events",
            "Tracer records lost because a map was full, by map",
            m.lost.clone(),
        );
        for target in TARGETS {
            let _ = m
                .breaks
                .get_or_create(&vec![("target", target.to_string())]);
        }
        Metrics {
            registry: Arc::new(r),
            ..m
        }
    }

    /// Reads the gauges from the kernel's lists and the deleted-file table, and the
    /// tracer's wait-time histogram.
    pub fn collect(&self, pins: &PinDir) -> Result<()> {
        let (buckets, sum_ns, count) = history::tracer_wait_histogram(pins)?;
        self.waits.set_tracer(Hist {
            buckets,
            sum_ns,
            count,
        });
        let (rows, _) = live_rows(pins)?;
        let mut locks: HashMap<Labels, i64> = HashMap::new();
        let mut waiters: HashMap<Labels, i64> = HashMap::new();
        let mut breaking: HashMap<Labels, i64> = HashMap::new();
        // A waiter listed under several conflicting locks is one request.
        let mut requests = BTreeSet::new();
        for r in &rows {
            let t = r.lock_type.map_or("unknown", LockType::name).to_string();
            *locks
                .entry(vec![("kind", r.kind.to_string()), ("type", t)])
                .or_default() += 1;
            if let Some(l) = r.lease.as_ref().filter(|l| l.state == "breaking") {
                *breaking
                    .entry(vec![("target", l.target_type.to_string())])
                    .or_default() += 1;
            }
            for w in &r.waiters {
                if requests.insert((w.pid, w.tid, w.kind, w.start, w.end, w.lock_type)) {
                    *waiters
                        .entry(vec![("kind", w.kind.to_string())])
                        .or_default() += 1;
                }
            }
        }
        for (family, values) in [
            (&self.locks, locks),
            (&self.waiters, waiters),
            (&self.breaking, breaking),
        ] {
            family.clear();
            for (labels, n) in values {
                family.get_or_create(&labels).set(n);
            }
        }
        // Every known series is listed, at 0 when there is none (so that a rate or an
        // alert sees it from the start).
        for kind in HeldKind::ALL {
            for ty in LockType::ALL {
                let _ = self.locks.get_or_create(&vec![
                    ("kind", kind.to_string()),
                    ("type", ty.name().to_string()),
                ]);
            }
            let _ = self
                .waiters
                .get_or_create(&vec![("kind", kind.to_string())]);
        }
        for target in TARGETS {
            let _ = self
                .breaking
                .get_or_create(&vec![("target", target.to_string())]);
        }
        self.cgroup_locks.clear();
        self.cgroup_waiters.clear();
        for cg in self.cgroups.iter() {
            let pids = crate::cgroup::resolve(cg).and_then(|d| crate::cgroup::pids(&d))?;
            let label = vec![("cgroup", cg.clone())];
            let held = rows
                .iter()
                .filter(|r| r.pid.is_some_and(|p| pids.contains(&p)))
                .count();
            let waiting: BTreeSet<_> = rows
                .iter()
                .flat_map(|r| &r.waiters)
                .filter(|w| pids.contains(&w.pid))
                .map(|w| (w.pid, w.tid, w.start, w.end))
                .collect();
            self.cgroup_locks.get_or_create(&label).set(held as i64);
            self.cgroup_waiters
                .get_or_create(&label)
                .set(waiting.len() as i64);
        }
        let (entries, _, source) = ghost::view::entries(pins, Some(Duration::from_secs(60)))?;
        let mut files = ghost::view::group(&entries, |_| true);
        ghost::view::refresh_sizes(&mut files, source);
        self.deleted_files.set(files.len() as i64);
        self.deleted_bytes
            .set(files.iter().map(|f| f.bytes).sum::<u64>() as i64);
        Ok(())
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> Result<String> {
        let mut out = String::new();
        encode(&mut out, &self.registry).context("encoding metrics")?;
        Ok(out)
    }

    /// Collects, then writes the textfile atomically: a temporary name that
    /// node_exporter's textfile collector ignores (not ending in .prom), then a rename.
    pub fn write_textfile(&self, pins: &PinDir, path: &Path) -> Result<()> {
        self.collect(pins)?;
        let text = self.encode()?;
        let tmp = PathBuf::from(format!("{}.tmp-{}", path.display(), std::process::id()));
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    }
}

/// What `tick` remembers between two looks at the tracer's maps.
#[derive(Default)]
pub struct Watch {
    /// Opened at the first tick (the agent's maps exist by then).
    waits: Option<WaitFollower>,
    breaks: BreakTracker,
    lost: HashMap<&'static str, u64>,
}

impl Watch {
    /// One look at the tracer's maps: waits that ended and the tracer's histogram
    /// does not have go into the agent's part (at the time they are seen gone), breaks
    /// that began into their counter.
    pub fn tick(
        &mut self,
        m: &Metrics,
        pins: &PinDir,
        counters: &aya::maps::PerCpuArray<aya::maps::MapData, u64>,
        now_ns: u64,
    ) -> Result<()> {
        let Some(h) = History::read(pins)? else {
            return Ok(());
        };
        if let Some(w) = &mut self.waits {
            for e in w
                .look(&h, now_ns)?
                .ended
                .iter()
                .filter(|e| !e.in_tracer_histogram())
            {
                m.waits.observe(e.at_ns.saturating_sub(e.wait.since_ns));
            }
        }

        let fresh = self.breaks.fresh(&h);
        // The first look finds breaks from before this agent: not counted.
        for lease in fresh.iter().filter(|_| self.waits.is_some()) {
            let r = &h.breaks[lease];
            // The first breaker decides: a writer's break leads to unlock, a reader's
            // (of a write lease) to read.
            let target = match r.breakers.first().filter(|_| r.n_breakers > 0) {
                Some(b) if b.breaker_type == fl_type::F_RDLCK => "read",
                Some(_) => "unlock",
                None => "unknown",
            };
            m.breaks
                .get_or_create(&vec![("target", target.to_string())])
                .inc();
        }
        if self.waits.is_none() {
            // Wait ends from now on.
            self.waits = Some(WaitFollower::open(pins)?);
        }

        for (c, map) in TracerCounter::LOSSES {
            let n = crate::agent::counter_total(counters, c)?;
            let seen = self.lost.entry(map).or_default();
            if n > *seen {
                m.lost
                    .get_or_create(&vec![("map", map.to_string())])
                    .inc_by(n - *seen);
                *seen = n;
            } else {
                // Listed at 0 from the start.
                let _ = m.lost.get_or_create(&vec![("map", map.to_string())]);
            }
        }
        Ok(())
    }
}

/// Serves GET /metrics on `addr` from a thread of its own (each scrape reads the
/// kernel's lists: slow at 100,000 locks, so never on the agent's loop).
pub fn serve(addr: &str, m: Metrics, pins: PinDir) -> Result<()> {
    let server =
        tiny_http::Server::http(addr).map_err(|e| anyhow::anyhow!("--metrics {addr}: {e}"))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            // One scrape at a time: requests are taken in turn.
            for req in server.incoming_requests() {
                let reply = if req.url() != "/metrics" {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                } else {
                    match m.collect(&pins).and_then(|_| m.encode()) {
                        Ok(text) => tiny_http::Response::from_string(text).with_header(
                            tiny_http::Header::from_bytes(
                                &b"Content-Type"[..],
                                &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
                            )
                            .expect("a valid header"),
                        ),
                        Err(e) => tiny_http::Response::from_string(format!("{e:#}\n"))
                            .with_status_code(500),
                    }
                };
                let _ = req.respond(reply);
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions_and_counters_start_at_zero() {
        let text = Metrics::new(Vec::new()).encode().unwrap();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(name.starts_with("ckpt_"), "{line}");
            if let Some(family) = name.strip_suffix("_total") {
                assert!(
                    text.contains(&format!("# TYPE {family} counter")),
                    "_total on counters only: {line}"
                );
            }
        }
        assert!(text.contains("ckpt_lease_breaks_total{target=\"unlock\"} 0"));
        assert!(text.contains("ckpt_wait_seconds_bucket{le=\"2.5\"} 0"));
        assert!(text.contains("ckpt_wait_seconds_bucket{le=\"+Inf\"} 0"));
        assert!(text.contains("ckpt_build_info{version=\""));
        assert!(!text.contains("pid=") && !text.contains("path="));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn the_wait_histogram_adds_the_tracer_s_and_the_agent_s_counts() {
        let m = Metrics::new(Vec::new());
        let mut t = Hist::default();
        t.observe(40_000_000); // 40 ms: le 0.05
        t.observe(40_000_000);
        m.waits.set_tracer(t);
        m.waits.observe(2_000_000_000); // 2 s: le 2.5
        let text = m.encode().unwrap();
        assert!(
            text.contains("ckpt_wait_seconds_bucket{le=\"0.01\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("ckpt_wait_seconds_bucket{le=\"0.05\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("ckpt_wait_seconds_bucket{le=\"1.0\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("ckpt_wait_seconds_bucket{le=\"2.5\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("ckpt_wait_seconds_bucket{le=\"+Inf\"} 3"),
            "{text}"
        );
        assert!(text.contains("ckpt_wait_seconds_count 3"), "{text}");
        assert!(text.contains("ckpt_wait_seconds_sum 2.08"), "{text}");
    }
}
