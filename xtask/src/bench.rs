//! `cargo xtask bench`: dump speed, agent-assisted vs /proc-only, interleaved runs,
//! median (min-max) of each; written to BENCHMARKS.md. A command, not a test: a slow
//! shared machine never fails anything here.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{build_release, is_root, output, workspace};

const PIN_DIR: &str = "/sys/fs/bpf/ckpt-bench";

struct Scenario {
    processes: usize,
    files_per: usize,
    locks_per: usize,
    /// A process outside the cgroup takes and releases a lock every millisecond, so
    /// that the agent's tables change between the dump's early read and the freeze
    /// and are read again inside the window (a busy host's case).
    churn: bool,
}

/// A workload process (the tests' `locker`), in the benchmark cgroup or not.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    fn spawn(locker: &Path, cgroup: Option<&Path>) -> Result<Worker> {
        let mut child = Command::new(locker)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a workload process")?;
        if let Some(cg) = cgroup {
            std::fs::write(cg.join("cgroup.procs"), child.id().to_string())?;
        }
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Ok(Worker {
            child,
            stdin,
            stdout,
        })
    }

    fn cmd(&mut self, c: &str) -> Result<()> {
        writeln!(self.stdin, "{c}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if !line.starts_with("ok") {
            bail!("workload `{c}` failed: {line}");
        }
        Ok(())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn raise_fd_limit() {
    // SAFETY: plain get/setrlimit on locals.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn cgroup_root() -> Result<PathBuf> {
    for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if Path::new(root).join("cgroup.procs").exists()
            && !Path::new(root).join("freezer.state").exists()
        {
            return Ok(PathBuf::from(root));
        }
    }
    bail!("no cgroup2 hierarchy")
}

struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.total_cmp(b));
    Stats {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

fn fmt(s: &Stats) -> String {
    format!("{:.2} ({:.2}-{:.2})", s.median, s.min, s.max)
}

/// One dump's times, in ms.
struct Times {
    /// Every task frozen -> thaw (the report's frozen window).
    frozen: f64,
    /// Freeze request -> thaw: what the first task to stop sees.
    stopped: f64,
    total: f64,
}

/// One dump.
fn dump(bin: &Path, pins: &str, cgroup: &Path, image: &Path) -> Result<Times> {
    let out = Command::new(bin)
        .args(["--pin-dir", pins, "dump"])
        .arg(cgroup)
        .arg("-o")
        .arg(image)
        .arg("--json")
        .output()?;
    if !out.status.success() {
        bail!("dump failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let _ = std::fs::remove_file(image);
    let ms = |k: &str| v[k].as_f64().unwrap_or(0.0);
    Ok(Times {
        frozen: ms("frozen_ms"),
        stopped: ms("frozen_ms") + ms("freezing_ms"),
        total: ms("total_ms"),
    })
}

pub fn run(runs: usize) -> Result<()> {
    if !is_root() {
        bail!("the benchmark loads eBPF programs and creates cgroups: run it as root");
    }
    raise_fd_limit();
    let bins = build_release()?;
    let user = bins.join("ckpt-user");

    let _ = std::fs::remove_dir_all(PIN_DIR);
    let log = std::env::temp_dir().join("ckpt-bench-agent.log");
    let mut agent = Command::new(bins.join("ckpt-agent"))
        .args(["--pin-dir", PIN_DIR, "--unpin"])
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)?.contains("reconciled with /proc/locks") {
        if Instant::now() > deadline {
            bail!("agent did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let scenarios = [
        Scenario {
            processes: 1,
            files_per: 10,
            locks_per: 10,
            churn: false,
        },
        Scenario {
            processes: 100,
            files_per: 100,
            locks_per: 50,
            churn: false,
        },
        Scenario {
            processes: 100,
            files_per: 100,
            locks_per: 50,
            churn: true,
        },
        Scenario {
            processes: 1000,
            files_per: 10,
            locks_per: 10,
            churn: false,
        },
    ];
    let mut table = String::new();
    let _ = writeln!(table, "| processes | fds | locks | frozen, agent (ms) | frozen, /proc only (ms) | frozen, /proc only ÷ agent | freeze request to thaw, agent (ms) | total, agent (ms) | total, /proc only (ms) |");
    let _ = writeln!(table, "|---|---|---|---|---|---|---|---|---|");
    let result = (|| -> Result<()> {
        for s in &scenarios {
            let cg = cgroup_root()?.join(format!("ckpt-bench-{}", std::process::id()));
            std::fs::create_dir_all(&cg)?;
            let data = std::env::temp_dir().join(format!("ckpt-bench-data-{}", s.processes));
            let _ = std::fs::remove_dir_all(&data);
            std::fs::create_dir_all(&data)?;
            let mut workers = Vec::new();
            let setup = (|| -> Result<()> {
                if s.churn {
                    let mut w = Worker::spawn(&bins.join("locker"), None)?;
                    w.cmd(&format!("churn {}/churn 1", data.display()))?;
                    workers.push(w);
                }
                for _ in 0..s.processes {
                    let mut w = Worker::spawn(&bins.join("locker"), Some(&cg))?;
                    w.cmd(&format!(
                        "bulk {} {} {}",
                        data.display(),
                        s.files_per,
                        s.locks_per
                    ))?;
                    workers.push(w);
                }
                Ok(())
            })();
            let measured = setup.and_then(|_| {
                let image = std::env::temp_dir().join("ckpt-bench.img");
                let (mut fa, mut fp, mut sa, mut ta, mut tp) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for _ in 0..runs {
                    let a = dump(&user, PIN_DIR, &cg, &image)?;
                    fa.push(a.frozen);
                    sa.push(a.stopped);
                    ta.push(a.total);
                    let p = dump(&user, "/sys/fs/bpf/ckpt-bench-none", &cg, &image)?;
                    fp.push(p.frozen);
                    tp.push(p.total);
                }
                Ok((stats(fa), stats(fp), stats(sa), stats(ta), stats(tp)))
            });
            drop(workers);
            std::thread::sleep(Duration::from_millis(300));
            let _ = std::fs::remove_dir(&cg);
            let _ = std::fs::remove_dir_all(&data);
            let (fa, fp, sa, ta, tp) = measured?;
            let row = format!(
                "| {}{} | {} | {} | {} | {} | {:.1}x | {} | {} | {} |",
                s.processes,
                if s.churn {
                    " (+ lock traffic outside)"
                } else {
                    ""
                },
                s.processes * s.files_per,
                s.processes * s.locks_per,
                fmt(&fa),
                fmt(&fp),
                fp.median / fa.median.max(1e-9),
                fmt(&sa),
                fmt(&ta),
                fmt(&tp)
            );
            println!("{row}");
            let _ = writeln!(table, "{row}");
        }
        Ok(())
    })();
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let _ = agent.wait();
    result?;

    let kernel = output(Command::new("uname").arg("-r")).unwrap_or_default();
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%d"])).unwrap_or_default();
    let cpus = output(&mut Command::new("nproc")).unwrap_or_default();
    let doc = format!(
        "# ckpt benchmarks\n\nMachine: {} CPUs, Linux {}, {}. Each figure: median (min-max) of {runs} interleaved runs, in ms.\n\n## Dump: frozen window and total time\n\nEach process holds its fds open with separate POSIX write locks spread over them. \"agent\": ckpt-agent running (fd tables from its task_file iterator, locks and leases from its maps, cross-checked with the lock lines the iterator walks); \"/proc only\": no agent (/proc/PID/fd, fdinfo, pidfd_getfd and kcmp per fd).\n\n{table}\n\"frozen\" is the window from every task frozen to the thaw, as `ckpt-user dump` reports it; \"freeze request to thaw\" adds the time the kernel takes to freeze every task, which the first task to stop also spends stopped. \"+ lock traffic outside\": another process takes and releases a lock every millisecond, so the agent's tables have changed since the dump read them before freezing and are read again inside the window.\n\nWhere the frozen time goes with the agent (`ckpt-user dump --timings`, 100 processes / 10,000 fds): the fd tables, read through one iterator link per process on one thread per CPU, about 0.45 us of program time per fd (field loads checked by the verifier, one copy per lock) plus the kernel's own walk; fds whose file the prescan already knows need no other read. Processes come from the iterator's per-process record, checked against /proc reads made before freezing (exec, credentials, cwd). The agent's tables, read before freezing, are read again inside the window only if the agent changed them since (about 2 ms per 5,000 locks when it must). Paths, stat devices, file handles and /proc process facts are read before freezing; descriptions, lock cross-checks and fingerprints are assembled after the thaw, so the total time is longer than the /proc-only path's.\n",
        cpus.trim(),
        kernel.trim(),
        date.trim()
    );
    std::fs::write(workspace().join("BENCHMARKS.md"), doc)?;
    println!("bench: wrote BENCHMARKS.md");
    Ok(())
}
