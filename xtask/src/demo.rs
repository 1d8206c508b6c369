//! `cargo xtask demo`: the main job on real programs. A cgroup runs sqlite3 inside
//! an open write transaction (POSIX byte-range locks), flock(1) holding a lock and a
//! second flock(1) blocked behind it. ckpt-agent traces them; `ckpt-user locks --cgroup`
//! shows the live table twice, a second apart, so the waiter's blocked time visibly
//! counts up; then `ckpt-user dump` checkpoints the cgroup and `inspect` shows the image.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{is_root, sh, workspace};

const PIN_DIR: &str = "/sys/fs/bpf/ckpt-demo";
const CGROUP: &str = "ckpt-demo";

/// Kills the workload, removes the cgroup and stops the agent, whatever happened.
struct Cleanup {
    agent: Option<Child>,
    cgroup: Option<PathBuf>,
    children: Vec<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(cg) = &self.cgroup {
            if let Ok(procs) = std::fs::read_to_string(cg.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
            }
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(cg) = &self.cgroup {
            std::thread::sleep(Duration::from_millis(200));
            let _ = std::fs::remove_dir(cg);
        }
        if let Some(mut a) = self.agent.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &a.id().to_string()])
                .status();
            let _ = a.wait();
        }
    }
}

/// A binary built by the demo.
fn bin(name: &str) -> PathBuf {
    workspace().join("target/release").join(name)
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

/// Starts `cmd` inside the cgroup: a shell moves itself in, then execs the program.
fn spawn_in(cg: &Path, cmd: &str) -> Result<Child> {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec {cmd}",
            cg.display()
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {cmd}"))
}

pub fn run() -> Result<()> {
    if !is_root() {
        bail!("the demo loads eBPF programs and creates a cgroup: run it as root");
    }
    println!("demo: building ckpt (release)");
    sh(Command::new("cargo").current_dir(workspace()).args([
        "build",
        "--release",
        "-p",
        "ckpt-user",
    ]))?;

    let mut cleanup = Cleanup {
        agent: None,
        cgroup: None,
        children: Vec::new(),
    };
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

    let cg = cgroup_root()?.join(CGROUP);
    std::fs::create_dir_all(&cg).with_context(|| format!("creating {}", cg.display()))?;
    cleanup.cgroup = Some(cg.clone());
    let data = std::env::temp_dir().join("ckpt-demo");
    std::fs::create_dir_all(&data)?;
    let db = data.join("app.db");
    let journal = data.join("journal.lock");
    let _ = std::fs::remove_file(data.join("app.db-journal"));
    println!("demo: workload in cgroup {}", cg.display());

    println!(
        "  sqlite3 {} inside BEGIN EXCLUSIVE (POSIX byte-range locks)",
        db.display()
    );
    let mut sqlite = spawn_in(&cg, &format!("sqlite3 {}", db.display()))?;
    sqlite.stdin.as_mut().unwrap().write_all(
        b"CREATE TABLE IF NOT EXISTS t(x);\nBEGIN EXCLUSIVE;\nINSERT INTO t VALUES(1);\n",
    )?;
    cleanup.children.push(sqlite);
    println!(
        "  flock -x {} holding it, and a second flock blocked behind it",
        journal.display()
    );
    cleanup.children.push(spawn_in(
        &cg,
        &format!("flock -x {} sleep 600", journal.display()),
    )?);
    std::thread::sleep(Duration::from_millis(200));
    cleanup.children.push(spawn_in(
        &cg,
        &format!("flock -x {} true", journal.display()),
    )?);
    std::thread::sleep(Duration::from_secs(1));

    for round in 1..=2 {
        println!("\n$ ckpt-user locks --cgroup {CGROUP}    # view {round}");
        sh(Command::new(bin("ckpt-user")).args([
            "--pin-dir",
            PIN_DIR,
            "locks",
            "--cgroup",
            CGROUP,
        ]))?;
        std::thread::sleep(Duration::from_secs(1));
    }
    let image = data.join("ckpt-demo.img");
    let _ = std::fs::remove_file(&image);
    println!(
        "\n$ ckpt-user dump {CGROUP} -o {}    # freeze, checkpoint, thaw",
        image.display()
    );
    sh(Command::new(bin("ckpt-user"))
        .args(["--pin-dir", PIN_DIR, "dump", CGROUP, "-o"])
        .arg(&image))?;
    println!("\n$ ckpt-user inspect {}", image.display());
    sh(Command::new(bin("ckpt-user")).arg("inspect").arg(&image))?;
    println!(
        "\n$ ckpt-user inspect {} --tree | grep -E '^(locks|waiters)/'",
        image.display()
    );
    let tree = Command::new(bin("ckpt-user"))
        .arg("inspect")
        .arg(&image)
        .arg("--tree")
        .output()?;
    for line in String::from_utf8_lossy(&tree.stdout)
        .lines()
        .filter(|l| l.starts_with("locks/") || l.starts_with("waiters/"))
    {
        println!("{line}");
    }
    restore(
        &mut cleanup,
        &cg,
        &image,
        &String::from_utf8_lossy(&tree.stdout),
    )?;
    println!("\ndemo: done; cleaning up");
    Ok(())
}

/// Kills the workload, then restores it from the image: the restored processes run
/// `sleep` instead of their programs, so what `locks` shows is only what the restore
/// put back (a restarted flock(1) would take its lock again by itself).
fn restore(cleanup: &mut Cleanup, cg: &Path, image: &Path, tree: &str) -> Result<()> {
    println!("\n# kill the workload, as a crash or a migration would");
    for c in &mut cleanup.children {
        let _ = c.kill();
        let _ = c.wait();
    }
    cleanup.children.clear();
    for _ in 0..100 {
        let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            break;
        }
        for pid in procs.lines() {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut pids: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.strip_prefix("task-")?.split('/').next())
        .collect();
    pids.dedup();
    let mut cmd = Command::new(bin("ckpt-user"));
    cmd.arg("restore").arg(image).args([
        "--cgroup",
        CGROUP,
        "--skip-unsupported",
        "--keep-cloexec",
    ]);
    let mut shown = format!(
        "ckpt-user restore {} --cgroup {CGROUP} --skip-unsupported --keep-cloexec",
        image.display()
    );
    for pid in &pids {
        cmd.arg("--exec-cmd").arg(format!("{pid}=exec sleep 600"));
        shown.push_str(&format!(" --exec-cmd '{pid}=exec sleep 600'"));
    }
    println!("\n$ {shown}");
    // The restored processes inherit its stdout and stderr (where the workload had
    // pipes): a captured pipe would never reach end of file, so they are passed on.
    sh(cmd.stdin(std::process::Stdio::null()))?;
    println!(
        "\n$ ckpt-user locks --cgroup {CGROUP}    # the restored processes hold the same locks"
    );
    sh(Command::new(bin("ckpt-user")).args(["--pin-dir", PIN_DIR, "locks", "--cgroup", CGROUP]))
}
