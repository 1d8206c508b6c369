//! Tracer overhead: lock-heavy workloads with no tracer, with ckpt-agent attached, with
//! a bpftrace script on the same tracepoints recording what ckpt records, and with
//! empty programs on every tracepoint ckpt-agent attaches, each as the same kind (the
//! floor: what the tracepoints alone cost, whatever a program does; ckpt-user's
//! `tracepoint_floor` example). The modes alternate within each run, so that the
//! host's drift hits them alike. Then ckpt-agent's own CPU, idle and under a flood.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{start_agent, stats, stop, Ctx};

const PIN_DIR: &str = "/sys/fs/bpf/ckpt-bench-tracer";
const SECONDS: u32 = 3;
/// Transactions of the sqlite3 workload (one INSERT each): about 3 s untraced, long
/// enough that its run-to-run spread (about 20 % at 1 s) resolves 5 %.
const SQLITE_TX: usize = 50_000;
/// A tmpfs for the sqlite3 database: on disk, fsync jitter swamped the tracer's cost
/// (runs of one mode spread over 30%).
const SQLITE_DIR: &str = "/dev/shm/ckpt-bench-sqlite";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    None,
    Ckpt,
    Bpftrace,
    Floor,
}

const MODES: [Mode; 4] = [Mode::None, Mode::Ckpt, Mode::Bpftrace, Mode::Floor];

/// What the modes run: the bpftrace script and the floor's program.
struct Scripts {
    comparable: String,
    floor: PathBuf,
}

/// (label, stress-ng stressor or "sqlite3")
const WORKLOADS: &[(&str, &str)] = &[
    ("stress-ng --fcntl (bogo ops/s)", "fcntl"),
    ("stress-ng --flock (bogo ops/s)", "flock"),
    ("stress-ng --lockofd (bogo ops/s)", "lockofd"),
    ("stress-ng --lease (bogo ops/s)", "lease"),
    ("sqlite3, one INSERT per transaction (tx/s)", "sqlite3"),
];

/// Ops/s of one stress-ng stressor, two instances.
fn stress(stressor: &str) -> Result<f64> {
    let yaml = std::env::temp_dir().join("ckpt-bench-stress.yaml");
    let out = Command::new("stress-ng")
        .arg(format!("--{stressor}"))
        .arg("2")
        .arg("--timeout")
        .arg(format!("{SECONDS}s"))
        .arg("--metrics-brief")
        .arg("--yaml")
        .arg(&yaml)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running stress-ng")?;
    if !out.success() {
        bail!("stress-ng --{stressor} failed ({out})");
    }
    let text = std::fs::read_to_string(&yaml)?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("bogo-ops-per-second-real-time:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no bogo-ops rate in {}", yaml.display()))
}

/// Transactions per second of sqlite3 inserting one row per transaction (rollback
/// journal: POSIX locks on the database, a journal created and unlinked each time).
fn sqlite() -> Result<f64> {
    let dir = Path::new(SQLITE_DIR);
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut script = String::from("PRAGMA journal_mode=DELETE;\nCREATE TABLE t(x INTEGER);\n");
    for i in 0..SQLITE_TX {
        let _ = writeln!(script, "BEGIN; INSERT INTO t VALUES({i}); COMMIT;");
    }
    let input = dir.join("script.sql");
    std::fs::write(&input, script)?;
    let t0 = Instant::now();
    let status = Command::new("sqlite3")
        .arg(dir.join("bench.db"))
        .stdin(std::fs::File::open(&input)?)
        .stdout(Stdio::null())
        .status()
        .context("running sqlite3")?;
    let took = t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(dir);
    if !status.success() {
        bail!("sqlite3 failed ({status})");
    }
    Ok(SQLITE_TX as f64 / took)
}

fn workload(what: &str) -> Result<f64> {
    if what == "sqlite3" {
        sqlite()
    } else {
        stress(what)
    }
}

/// The first of `names` that the tracepoint's format has.
fn field(event: &str, names: &[&str]) -> Result<String> {
    let path = format!("/sys/kernel/tracing/events/{event}/format");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    names
        .iter()
        .find(|n| text.contains(&format!(" {n};")))
        .map(std::string::ToString::to_string)
        .with_context(|| format!("{event} has none of {names:?}"))
}

/// A bpftrace script recording what ckpt-agent records, on the same tracepoints as
/// classic ones: when a request starts to wait (FILE_LOCK_DEFERRED, 1) and when a
/// lease break starts (field names differ between kernels: read them).
fn bpftrace_script() -> Result<String> {
    let lease = field("filelock/break_lease_block", &["fl", "fl_blocker"])?;
    Ok(format!(
        "tracepoint:filelock:posix_lock_inode, tracepoint:filelock:flock_lock_inode \
         {{ if (args->ret == 1) {{ @wait[tid] = nsecs; }} }}\n\
         tracepoint:filelock:break_lease_block, tracepoint:filelock:break_lease_noblock \
         {{ @breaks[args->{lease}] = nsecs; }}\n\
         tracepoint:filelock:break_lease_unblock {{ delete(@wait[tid]); }}\n"
    ))
}

/// ckpt-agent's attached programs (its pinned links are named after them).
fn agent_links(ctx: &Ctx) -> Result<BTreeSet<String>> {
    let agent = start_agent(&ctx.bins, PIN_DIR)?;
    let names = std::fs::read_dir(format!("{PIN_DIR}/links"))
        .map(|d| {
            d.flatten()
                // Directories hold the iterators' links: not tracepoints.
                .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    stop(agent);
    Ok(names)
}

/// Starts the floor; returns it and what it attached ("program=kind/tracepoint").
fn start_floor(path: &Path) -> Result<(Child, Vec<String>)> {
    let mut child = Command::new(path)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", path.display()))?;
    let mut line = String::new();
    let stdout = child.stdout.take().context("floor stdout")?;
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    let Some(list) = line.trim().strip_prefix("attached: ") else {
        let _ = child.kill();
        let status = child.wait()?;
        bail!("the floor's programs did not attach ({status})");
    };
    Ok((child, list.split(' ').map(str::to_string).collect()))
}

fn start_bpftrace(script: &str) -> Result<Child> {
    let log = std::env::temp_dir().join("ckpt-bench-bpftrace.log");
    let mut child = Command::new("bpftrace")
        .arg("-e")
        .arg(script)
        .stdout(std::fs::File::create(&log)?)
        .stderr(Stdio::null())
        .spawn()
        .context("starting bpftrace (cargo xtask setup installs it)")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)?.contains("Attaching") {
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            bail!("bpftrace did not attach");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // "Attaching N probes..." comes before the last probe is attached.
    std::thread::sleep(Duration::from_millis(500));
    Ok(child)
}

fn start(mode: Mode, ctx: &Ctx, scripts: &Scripts) -> Result<Option<Child>> {
    Ok(match mode {
        Mode::None => None,
        Mode::Ckpt => Some(start_agent(&ctx.bins, PIN_DIR)?),
        Mode::Bpftrace => Some(start_bpftrace(&scripts.comparable)?),
        Mode::Floor => Some(start_floor(&scripts.floor)?.0),
    })
}

fn halt(mode: Mode, child: Option<Child>) {
    match (mode, child) {
        (Mode::Bpftrace, Some(mut c)) => {
            // SIGINT: bpftrace prints its maps and exits.
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
        (_, Some(c)) => stop(c),
        _ => {}
    }
}

/// CPU seconds (user + system) used so far by process `pid`.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// (run time ns, runs) summed over the BPF programs process `pid` holds (needs
/// kernel.bpf_stats_enabled=1).
fn prog_stats(pid: u32) -> (u64, u64) {
    let mut sum = (0, 0);
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return sum;
    };
    for e in dir.flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        if !text.contains("prog_type:") {
            continue;
        }
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        sum.0 += get("run_time_ns:");
        sum.1 += get("run_cnt:");
    }
    sum
}

/// Nanoseconds of tracer CPU (programs plus its process) per program run, over one
/// stress-ng --fcntl run.
fn per_event_ns(mode: Mode, ctx: &Ctx, scripts: &Scripts) -> Result<f64> {
    let child = start(mode, ctx, scripts)?;
    let pid = child.as_ref().map(std::process::Child::id).unwrap_or(0);
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
    let (p0, c0) = (prog_stats(pid), cpu_s(pid));
    let run = stress("fcntl");
    let (p1, c1) = (prog_stats(pid), cpu_s(pid));
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
    halt(mode, child);
    run?;
    let runs = p1.1.saturating_sub(p0.1).max(1);
    let ns = p1.0.saturating_sub(p0.0) as f64 + (c1 - c0) * 1e9;
    Ok(ns / runs as f64)
}

/// ckpt-agent's CPU (user + system, % of one CPU) over `seconds` idle, and over one
/// stress-ng --flock run (a lock flood: about 2 million lock calls a second here).
fn agent_cpu(ctx: &Ctx, seconds: u64) -> Result<(f64, f64)> {
    let agent = start_agent(&ctx.bins, PIN_DIR)?;
    let pid = agent.id();
    let measured = (|| -> Result<(f64, f64)> {
        let (c0, t0) = (cpu_s(pid), Instant::now());
        std::thread::sleep(Duration::from_secs(seconds));
        let idle = (cpu_s(pid) - c0) / t0.elapsed().as_secs_f64();
        let (c0, t0) = (cpu_s(pid), Instant::now());
        stress("flock")?;
        let flood = (cpu_s(pid) - c0) / t0.elapsed().as_secs_f64();
        Ok((100.0 * idle, 100.0 * flood))
    })();
    stop(agent);
    measured
}

/// The tracer section's body.
pub fn run(ctx: &Ctx) -> Result<String> {
    let floor = super::build_example("ckpt-user", "tracepoint_floor")?;
    // The floor must stand for exactly what the agent attaches.
    let (child, floor_progs) = start_floor(&floor)?;
    halt(Mode::Floor, Some(child));
    let floor_names: BTreeSet<String> = floor_progs
        .iter()
        .map(|p| p.split('=').next().unwrap_or(p).to_string())
        .collect();
    let agent_names = agent_links(ctx)?;
    if floor_names != agent_names {
        bail!("the floor attaches {floor_names:?}, ckpt-agent {agent_names:?}: make them agree (ckpt-user/examples/tracepoint_floor.rs)");
    }
    let scripts = Scripts {
        comparable: bpftrace_script()?,
        floor,
    };
    // results[workload][mode]
    let mut results = vec![vec![Vec::new(); MODES.len()]; WORKLOADS.len()];
    for r in 0..ctx.runs {
        for (m, &mode) in MODES.iter().enumerate() {
            let child = start(mode, ctx, &scripts)?;
            let measured = (|| -> Result<()> {
                for (w, (_, what)) in WORKLOADS.iter().enumerate() {
                    results[w][m].push(workload(what)?);
                }
                Ok(())
            })();
            halt(mode, child);
            measured?;
        }
        println!("bench: tracer run {}/{}", r + 1, ctx.runs);
    }
    let mut table = String::from(
        "| workload | no tracer | ckpt-agent | ckpt ÷ none | bpftrace | bpftrace ÷ none | empty programs (floor) | floor ÷ none |\n|---|---|---|---|---|---|---|---|\n",
    );
    for (w, (label, _)) in WORKLOADS.iter().enumerate() {
        let s: Vec<_> = results[w].iter().map(|v| stats(v.clone())).collect();
        let f = |s: &super::Stats| format!("{:.0} ({:.0}-{:.0})", s.median, s.min, s.max);
        let ratio = |i: usize| 100.0 * s[i].median / s[0].median.max(1e-9);
        let row = format!(
            "| {label} | {} | {} | {:.1}% | {} | {:.1}% | {} | {:.1}% |",
            f(&s[0]),
            f(&s[1]),
            ratio(1),
            f(&s[2]),
            ratio(2),
            f(&s[3]),
            ratio(3),
        );
        println!("{row}");
        table.push_str(&row);
        table.push('\n');
    }
    // Interleaved, three each: one run's figure moves by a few ns.
    let mut per_hit = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..3 {
        for (i, mode) in [Mode::Ckpt, Mode::Bpftrace, Mode::Floor]
            .into_iter()
            .enumerate()
        {
            per_hit[i].push(per_event_ns(mode, ctx, &scripts)?);
        }
    }
    let [ckpt_ns, bt_ns, floor_ns] = per_hit.map(|v| stats(v).median);
    let added_ns = ckpt_ns - floor_ns;
    const IDLE_S: u64 = 10;
    let (idle, flood) = agent_cpu(ctx, IDLE_S)?;
    println!("bench: agent CPU idle {idle:.2}%, under a flock flood {flood:.2}%");
    Ok(format!(
        "Throughput of lock-heavy workloads (higher is better) with no tracer; with ckpt-agent in its default configuration ({} programs: {}); with bpftrace ({}) recording what ckpt records on the same tracepoints as classic tracepoints (a map update when a request starts to wait, and when a lease break starts); and with empty programs on every tracepoint ckpt-agent attaches, each as the same kind (`tracepoint_floor`, checked against the agent's links: BTF tracepoints for the two that fire on every lock call, which bpftrace 0.17 cannot attach), which is the floor of any tracer on them. Each stress-ng figure is a {SECONDS} s run of two instances; --lease is not a measure of a tracer's cost: untraced, its runs alone range from about 1,400 to over 60,000 ops/s (whether its breakers wait out a lease break is a scheduling race), so its ratios are noise; sqlite3 inserts {SQLITE_TX} rows, one per transaction, into a database on tmpfs (on disk, fsync jitter hid the tracer's cost).\n\n{table}\nCost per tracepoint hit, during stress-ng --fcntl (programs' run time from kernel.bpf_stats_enabled, plus the tracer process's CPU time, divided by program runs; median of 3 interleaved runs each): ckpt {ckpt_ns:.1} ns, bpftrace {bt_ns:.1} ns, empty programs {floor_ns:.1} ns. Each includes the timing that bpf_stats itself adds to every run (the empty programs' figure is mostly that), so what ckpt adds to a lock call, its programs and its agent's own CPU spread over the calls, is the difference from the empty ones: {added_ns:.1} ns.\n\nckpt-agent's own CPU (user + system, of one CPU): {idle:.2} % idle ({IDLE_S} s), {flood:.2} % while stress-ng --flock floods the host with lock calls (its programs' time is in the lock callers' CPU, above). Idle, its work is the background deleted-file scan (once a second, paced to at most 5 % of a CPU).\n",
        floor_progs.len(),
        floor_progs.join(", "),
        output_version(),
    ))
}

fn output_version() -> String {
    Command::new("bpftrace")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
