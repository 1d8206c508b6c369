//! Tracer overhead: lock-heavy workloads with no tracer, with ckpt-agent attached, with
//! a bpftrace script on the same lock tracepoints doing a comparable map update, and
//! with empty bpftrace programs on every tracepoint ckpt attaches (the floor: what the
//! tracepoints alone cost, whatever a program does). The modes alternate within each
//! run, so that the host's drift hits them alike.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{start_agent, stats, stop, Ctx};

const PIN_DIR: &str = "/sys/fs/bpf/ckpt-bench-tracer";
const SECONDS: u32 = 3;
/// Transactions of the sqlite3 workload (one INSERT each): about a second untraced.
const SQLITE_TX: usize = 20_000;
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

/// The bpftrace scripts of the two bpftrace modes.
struct Scripts {
    comparable: String,
    floor: String,
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
        .map(|n| n.to_string())
        .with_context(|| format!("{event} has none of {names:?}"))
}

/// A bpftrace script on ckpt's lock and lease tracepoints, updating a map per event
/// as ckpt's programs do (field names differ between kernels: read them).
fn bpftrace_script() -> Result<String> {
    let owner = field("filelock/posix_lock_inode", &["owner", "fl_owner"])?;
    let ty = field("filelock/posix_lock_inode", &["type", "fl_type"])?;
    let lease_owner = field("filelock/generic_add_lease", &["owner", "fl_owner"])?;
    let lease_ty = field("filelock/generic_add_lease", &["type", "fl_type"])?;
    Ok(format!(
        "tracepoint:filelock:posix_lock_inode, tracepoint:filelock:flock_lock_inode \
         {{ if (args->ret == 0) {{ @locks[args->s_dev, args->i_ino, args->{owner}, args->fl_start] = args->{ty}; }} }}\n\
         tracepoint:filelock:generic_add_lease, tracepoint:filelock:generic_delete_lease, \
         tracepoint:filelock:break_lease_block, tracepoint:filelock:break_lease_noblock, \
         tracepoint:filelock:break_lease_unblock, tracepoint:filelock:time_out_leases \
         {{ @leases[args->s_dev, args->i_ino, args->{lease_owner}] = args->{lease_ty}; }}\n\
         tracepoint:syscalls:sys_enter_fcntl, tracepoint:syscalls:sys_enter_flock {{ @ctx[tid] = args->fd; }}\n\
         tracepoint:syscalls:sys_exit_fcntl, tracepoint:syscalls:sys_exit_flock {{ delete(@ctx[tid]); }}\n"
    ))
}

/// The tracepoints (category:name) ckpt-agent attaches here: its pinned links are
/// named after its programs, which are named after their tracepoints.
fn ckpt_tracepoints(ctx: &Ctx) -> Result<Vec<String>> {
    let agent = start_agent(&ctx.bins, PIN_DIR)?;
    let names: Vec<String> = std::fs::read_dir(format!("{PIN_DIR}/links"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    stop(agent);
    let mut out = Vec::new();
    for name in names {
        let category = std::fs::read_dir("/sys/kernel/tracing/events")?
            .flatten()
            .find(|c| c.path().join(&name).is_dir());
        // Iterator links (deleted-file scans) are not tracepoints.
        if let Some(c) = category {
            out.push(format!("{}:{name}", c.file_name().to_string_lossy()));
        }
    }
    if out.len() < 10 {
        bail!("found only {out:?} among ckpt-agent's links under {PIN_DIR}/links");
    }
    out.sort();
    Ok(out)
}

/// Empty programs on `tracepoints`.
fn floor_script(tracepoints: &[String]) -> String {
    let probes: Vec<String> = tracepoints
        .iter()
        .map(|t| format!("tracepoint:{t}"))
        .collect();
    format!("{} {{ }}\n", probes.join(", "))
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
        Mode::Floor => Some(start_bpftrace(&scripts.floor)?),
    })
}

fn halt(mode: Mode, child: Option<Child>) {
    match (mode, child) {
        (Mode::Bpftrace | Mode::Floor, Some(mut c)) => {
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
    let pid = child.as_ref().map(|c| c.id()).unwrap_or(0);
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

/// The tracer section's body.
pub fn run(ctx: &Ctx) -> Result<String> {
    let tracepoints = ckpt_tracepoints(ctx)?;
    let scripts = Scripts {
        comparable: bpftrace_script()?,
        floor: floor_script(&tracepoints),
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
    let ckpt_ns = per_event_ns(Mode::Ckpt, ctx, &scripts)?;
    let bt_ns = per_event_ns(Mode::Bpftrace, ctx, &scripts)?;
    Ok(format!(
        "Throughput of lock-heavy workloads (higher is better) with no tracer, with ckpt-agent attached (all its programs: locks, leases, deleted-file triggers; the agent applying events), and with bpftrace ({}) on the same lock and lease tracepoints plus fcntl/flock entry and exit, updating a map per event; and with empty bpftrace programs on the {} tracepoints ckpt-agent attaches ({}), which is the floor for any tracer that watches them as classic tracepoints. ckpt-agent attaches the two that fire on every lock call, filelock:posix_lock_inode and filelock:flock_lock_inode, as BTF tracepoints (the kernel's arguments, no record to fill, fields read by plain loads), which bpftrace 0.17 cannot do (no raw tracepoints, and fentry is refused here), so on those ckpt can run below this floor. Each stress-ng figure is a {SECONDS} s run of two instances; --lease is not a measure of a tracer's cost: untraced, its runs alone range from about 1,400 to over 60,000 ops/s (whether its breakers wait out a lease break is a scheduling race), so its ratios are noise; sqlite3 inserts {SQLITE_TX} rows, one per transaction, into a database on tmpfs (on disk, fsync jitter hid the tracer's cost).\n\n{table}\nCost per tracepoint hit, during stress-ng --fcntl (programs' run time from kernel.bpf_stats_enabled, plus the tracer process's CPU time, divided by program runs): ckpt {ckpt_ns:.0} ns, bpftrace {bt_ns:.0} ns.\n",
        output_version(),
        tracepoints.len(),
        tracepoints.join(", ")
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
