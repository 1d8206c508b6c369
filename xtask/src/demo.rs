//! `cargo xtask demo`: the main job on real programs. A cgroup runs sqlite3 inside
//! an open write transaction (POSIX byte-range locks), flock(1) holding a lock and a
//! second flock(1) blocked behind it, and the headline: a process holding a write
//! lease that another process's open() is breaking. `ckpt-user locks --cgroup` shows
//! the live table twice, a second apart (the waiter's time counts up, the lease's
//! counts down); `ckpt-user dump` checkpoints the cgroup with the break's remaining
//! time, and `inspect` shows the image. The workload is killed and restored twice:
//! with the exact remaining time (the lease is revoked that long after the release)
//! and with `--lease-time holder`, what CRIU does (the whole lease-break-time again);
//! each revocation is measured by the restored holder itself and printed.

use std::{
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{is_root, sh, workspace};

const PIN_DIR: &str = "/sys/fs/bpf/ckpt-demo";
const CGROUP: &str = "ckpt-demo";

/// The lease-break-time the demo breaks its lease with (seconds): short enough to
/// watch, long enough to checkpoint in the middle of the break.
const LEASE_BREAK_TIME_S: u64 = 6;
const SYSCTL: &str = "/proc/sys/fs/lease-break-time";

/// Kills the workload, removes the cgroup, puts the lease-break-time back and stops
/// the agent, whatever happened.
struct Cleanup {
    agent: Option<Child>,
    cgroup: Option<PathBuf>,
    children: Vec<Child>,
    lease_break_time: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.kill_workload();
        if let Some(cg) = &self.cgroup {
            let _ = std::fs::remove_dir(cg);
        }
        if let Some(v) = self.lease_break_time.take() {
            let _ = std::fs::write(SYSCTL, v);
        }
        if let Some(mut a) = self.agent.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &a.id().to_string()])
                .status();
            let _ = a.wait();
        }
    }
}

impl Cleanup {
    /// Kills every process of the cgroup (started or restored) and waits until it
    /// is empty.
    fn kill_workload(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        let Some(cg) = &self.cgroup else { return };
        for _ in 0..250 {
            let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                return;
            }
            for pid in procs.lines() {
                let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A binary built by the demo.
fn bin(name: &str) -> PathBuf {
    workspace().join("target/release").join(name)
}

fn lease_demo() -> PathBuf {
    workspace().join("target/release/examples/lease_demo")
}

/// The cgroup2 mount if there is one (hybrid or pure v2), else v1's freezer.
fn cgroup_root() -> Result<PathBuf> {
    for root in [
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/freezer",
    ] {
        if Path::new(root).join("cgroup.procs").exists() {
            return Ok(PathBuf::from(root));
        }
    }
    bail!("no cgroup hierarchy found under /sys/fs/cgroup")
}

/// Starts `cmd` inside the cgroup: a shell moves itself in, then execs the program
/// (so the child's pid is the program's). It inherits nothing but stdio: cargo's
/// jobserver pipe, open in this process, would otherwise be in the image too.
fn spawn_in(cg: &Path, cmd: &str) -> Result<Child> {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec {cmd}",
            cg.display()
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: close_range is async-signal-safe; only fds above stdio are closed.
    unsafe {
        c.pre_exec(|| {
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.spawn().with_context(|| format!("starting {cmd}"))
}

fn ckpt_user(args: &[&str]) -> Command {
    let mut c = Command::new(bin("ckpt-user"));
    c.args(["--pin-dir", PIN_DIR]).args(args);
    c
}

/// The processes of the workload, by role, as their pids in the image.
struct Workload {
    sqlite: u32,
    flock_holder: u32,
    flock_waiter: u32,
    lease_holder: u32,
    lease_breaker: u32,
    leased: PathBuf,
}

pub fn run() -> Result<()> {
    if !is_root() {
        bail!("the demo loads eBPF programs and creates a cgroup: run it as root");
    }
    println!("demo: building ckpt and the lease demo's programs (release)");
    sh(Command::new("cargo").current_dir(workspace()).args([
        "build",
        "--release",
        "-p",
        "ckpt-user",
        "--bins",
        "--example",
        "lease_demo",
    ]))?;

    let mut cleanup = Cleanup {
        agent: None,
        cgroup: None,
        children: Vec::new(),
        lease_break_time: None,
    };
    start_agent(&mut cleanup)?;
    let cg = cgroup_root()?.join(CGROUP);
    std::fs::create_dir_all(&cg).with_context(|| format!("creating {}", cg.display()))?;
    cleanup.cgroup = Some(cg.clone());
    let data = std::env::temp_dir().join("ckpt-demo");
    std::fs::create_dir_all(&data)?;
    let saved = std::fs::read_to_string(SYSCTL).context("reading fs.lease-break-time")?;
    cleanup.lease_break_time = Some(saved.clone());
    std::fs::write(SYSCTL, LEASE_BREAK_TIME_S.to_string())
        .context("setting fs.lease-break-time")?;
    println!(
        "demo: fs.lease-break-time set to {LEASE_BREAK_TIME_S} s for the demo (it was {}; put back at the end)",
        saved.trim()
    );

    let w = start_workload(&mut cleanup, &cg, &data)?;
    for round in 1..=2 {
        println!(
            "\n$ ckpt-user locks --cgroup {CGROUP}    # view {round}: the waiter's time counts up, the lease's break counts down"
        );
        sh(&mut ckpt_user(&["locks", "--cgroup", CGROUP]))?;
        if round == 1 {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let image = data.join("ckpt-demo.img");
    let _ = std::fs::remove_file(&image);
    println!(
        "\n$ ckpt-user dump {CGROUP} -o {}    # freeze, checkpoint, thaw",
        image.display()
    );
    sh(ckpt_user(&["dump", CGROUP, "-o"]).arg(&image))?;
    let at_dump_ms = show_image(&image)?;

    println!("\n# kill the workload, as a crash or a migration would");
    cleanup.kill_workload();
    let exact = restore_and_time(&cg, &image, &w, &data, "exact")?;
    println!(
        "\n$ ckpt-user locks --cgroup {CGROUP}    # the restored processes hold the same locks"
    );
    sh(&mut ckpt_user(&["locks", "--cgroup", CGROUP]))?;
    let exact_ms = exact.wait_revoked()?;
    println!(
        "  restored holder: lease revoked {exact_ms:.1} ms after the release ({:.1} ms were planned)",
        exact.planned_ms
    );

    println!(
        "\n# the same image restored as CRIU restores a lease being broken: --lease-time holder"
    );
    cleanup.kill_workload();
    let criu = restore_and_time(&cg, &image, &w, &data, "holder")?;
    let criu_ms = criu.wait_revoked()?;
    println!("  restored holder: lease revoked {criu_ms:.1} ms after the release");

    println!("\n== the headline: a lease being broken, checkpointed and restored");
    println!("  left at the checkpoint:                     {at_dump_ms:>8.1} ms");
    println!("  ckpt-user restore (exact):        revoked {exact_ms:>8.1} ms after the release");
    println!(
        "  --lease-time holder (as CRIU):    revoked {criu_ms:>8.1} ms after the release (the whole {LEASE_BREAK_TIME_S} s again)"
    );
    println!("\ndemo: done; cleaning up");
    Ok(())
}

fn start_agent(cleanup: &mut Cleanup) -> Result<()> {
    let log = std::env::temp_dir().join("ckpt-demo-agent.log");
    println!(
        "demo: starting ckpt-agent (pins under {PIN_DIR}, log {})",
        log.display()
    );
    cleanup.agent = Some(
        Command::new(bin("ckpt-agent"))
            .args(["--pin-dir", PIN_DIR, "--unpin"])
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)?.contains("deleted-but-open files scanned") {
        if Instant::now() > deadline {
            bail!(
                "ckpt-agent did not start: {}",
                std::fs::read_to_string(&log)?
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn start_workload(cleanup: &mut Cleanup, cg: &Path, data: &Path) -> Result<Workload> {
    let db = data.join("app.db");
    let journal = data.join("journal.lock");
    let leased = data.join("leased.dat");
    let _ = std::fs::remove_file(data.join("app.db-journal"));
    std::fs::write(&leased, "shared data\n")?;
    println!("demo: workload in cgroup {}", cg.display());
    println!(
        "  sqlite3 {} inside BEGIN EXCLUSIVE (POSIX byte-range locks)",
        db.display()
    );
    let mut sqlite = spawn_in(cg, &format!("sqlite3 {}", db.display()))?;
    sqlite.stdin.as_mut().unwrap().write_all(
        b"CREATE TABLE IF NOT EXISTS t(x);\nBEGIN EXCLUSIVE;\nINSERT INTO t VALUES(1);\n",
    )?;
    let mut spawned = |c: Child| {
        let pid = c.id();
        cleanup.children.push(c);
        pid
    };
    let sqlite = spawned(sqlite);
    println!(
        "  flock -x {} holding it, and a second flock blocked behind it",
        journal.display()
    );
    let flock_holder = spawned(spawn_in(
        cg,
        &format!("flock -x {} sleep 600", journal.display()),
    )?);
    std::thread::sleep(Duration::from_millis(200));
    let flock_waiter = spawned(spawn_in(
        cg,
        &format!("flock -x {} true", journal.display()),
    )?);
    println!(
        "  lease_demo hold {}: a write lease; lease_demo open: a writer whose open() breaks it",
        leased.display()
    );
    let lease_holder = spawned(spawn_in(
        cg,
        &format!("{} hold {}", lease_demo().display(), leased.display()),
    )?);
    wait_until("the lease to be taken", || proc_locks_has("LEASE"))?;
    let lease_breaker = spawned(spawn_in(
        cg,
        &format!("{} open {}", lease_demo().display(), leased.display()),
    )?);
    wait_until("the lease to be breaking", || proc_locks_has("BREAKING"))?;
    std::thread::sleep(Duration::from_secs(1));
    Ok(Workload {
        sqlite,
        flock_holder,
        flock_waiter,
        lease_holder,
        lease_breaker,
        leased,
    })
}

fn proc_locks_has(word: &str) -> bool {
    std::fs::read_to_string("/proc/locks").is_ok_and(|t| t.contains(word))
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Shows the image; returns the break's remaining time it recorded (ms).
fn show_image(image: &Path) -> Result<f64> {
    println!("\n$ ckpt-user inspect {}", image.display());
    sh(Command::new(bin("ckpt-user")).arg("inspect").arg(image))?;
    println!(
        "\n$ ckpt-user inspect {} --tree | grep -E '^(locks|waiters|leases)/'",
        image.display()
    );
    let tree = Command::new(bin("ckpt-user"))
        .arg("inspect")
        .arg(image)
        .arg("--tree")
        .output()?;
    for line in String::from_utf8_lossy(&tree.stdout).lines().filter(|l| {
        l.starts_with("locks/") || l.starts_with("waiters/") || l.starts_with("leases/")
    }) {
        println!("{line}");
    }
    let json = Command::new(bin("ckpt-user"))
        .arg("inspect")
        .arg(image)
        .arg("--json")
        .output()?;
    let v: serde_json::Value =
        serde_json::from_slice(&json.stdout).context("inspect --json is not JSON")?;
    let ns = v["leases"][0]["remaining_ns"]
        .as_f64()
        .context("the image has no lease with a remaining time")?;
    println!(
        "  the lease's break had {:.1} ms left when the cgroup was frozen",
        ns / 1e6
    );
    Ok(ns / 1e6)
}

/// A restore under way: when it released the processes, what it planned, and where
/// the restored holder says when its lease goes.
struct Restored {
    released_ns: u64,
    planned_ms: f64,
    holder_log: PathBuf,
}

impl Restored {
    /// Milliseconds from the release to the revocation the restored holder saw.
    fn wait_revoked(&self) -> Result<f64> {
        let deadline =
            Instant::now() + Duration::from_secs(LEASE_BREAK_TIME_S) + Duration::from_secs(10);
        loop {
            let log = std::fs::read_to_string(&self.holder_log).unwrap_or_default();
            if let Some(ns) = log
                .lines()
                .find_map(|l| l.strip_prefix("revoked ")?.trim().parse::<u64>().ok())
            {
                return Ok((ns as f64 - self.released_ns as f64) / 1e6);
            }
            if Instant::now() > deadline {
                bail!("the restored holder never saw its lease revoked: {log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Restores the image under `policy`: the lease holder and breaker run lease_demo
/// again (the holder watching its restored lease, the breaker re-opening the file),
/// the others `sleep`, so what they hold is only what the restore put back (a
/// restarted flock(1) would take its lock again by itself).
fn restore_and_time(
    cg: &Path,
    image: &Path,
    w: &Workload,
    data: &Path,
    policy: &str,
) -> Result<Restored> {
    let holder_log = data.join(format!("holder-{policy}.log"));
    let report = data.join(format!("restore-{policy}.json"));
    let _ = std::fs::remove_file(&holder_log);
    let leased = w.leased.display();
    let prog = lease_demo();
    let prog = prog.display();
    let mut execs = vec![
        format!(
            "{}=exec {prog} watch {leased} > {}",
            w.lease_holder,
            holder_log.display()
        ),
        format!("{}=exec {prog} open {leased} > /dev/null", w.lease_breaker),
    ];
    for pid in [w.sqlite, w.flock_holder, w.flock_waiter] {
        execs.push(format!("{pid}=exec sleep 600"));
    }
    let mut cmd = ckpt_user(&["restore"]);
    cmd.arg(image).args([
        "--cgroup",
        CGROUP,
        "--skip-unsupported",
        "--keep-cloexec",
        "--lease-time",
        policy,
        "--json",
    ]);
    let mut shown = format!(
        "ckpt-user restore {} --cgroup {CGROUP} --skip-unsupported --keep-cloexec --lease-time {policy} --json",
        image.display()
    );
    for e in &execs {
        cmd.arg("--exec-cmd").arg(e);
        shown.push_str(&format!(" --exec-cmd '{e}'"));
    }
    println!("\n$ {shown} > {}", report.display());
    // The report goes to a file: the restored processes inherit restore's stdout, and
    // a pipe would not reach its end while they run.
    sh(cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&report)?))?;
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)
        .context("the restore's report is not JSON")?;
    let released_ns = v["released_monotonic_ns"]
        .as_u64()
        .context("the restore's report has no release time")?;
    let planned_ms = v["leases"][0]["remaining_ns"].as_f64().unwrap_or(0.0) / 1e6;
    println!("  restored {} processes into {}; the lease's break is planned {planned_ms:.1} ms after their release", v["processes"].as_array().map_or(0, Vec::len), cg.display());
    Ok(Restored {
        released_ns,
        planned_ms,
        holder_log,
    })
}
