//! Dump speed: frozen window and total time, agent-assisted vs /proc-only, for 1, 100
//! and 1,000 processes.

use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use anyhow::{bail, Result};

use super::{cgroup_root, fmt, start_agent, stats, stop, Ctx, Worker};

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

/// One dump's times, in ms.
struct Times {
    /// Every task frozen -> thaw (the report's frozen window).
    frozen: f64,
    /// Freeze request -> thaw: what the first task to stop sees.
    stopped: f64,
    total: f64,
}

/// One dump (the image is removed unless `keep`).
fn dump(bin: &Path, pins: &str, cgroup: &Path, image: &Path, keep: bool) -> Result<Times> {
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
    if !keep {
        let _ = std::fs::remove_file(image);
    }
    let ms = |k: &str| v[k].as_f64().unwrap_or(0.0);
    Ok(Times {
        frozen: ms("frozen_ms"),
        stopped: ms("frozen_ms") + ms("freezing_ms"),
        total: ms("total_ms"),
    })
}

/// One restore of `image` into `cgroup` (every process running `sleep`), in ms; the
/// restored processes are killed afterwards.
fn restore(bin: &Path, image: &Path, cgroup: &Path, pids: &[u32]) -> Result<f64> {
    std::fs::create_dir_all(cgroup)?;
    // The restored processes inherit stdout: a file, not a pipe that would stay open.
    let out_path = std::env::temp_dir().join("ckpt-bench-restore.json");
    let out = std::fs::File::create(&out_path)?;
    let mut cmd = Command::new(bin);
    cmd.arg("restore")
        .arg(image)
        .args(["--json", "--skip-unsupported", "--cgroup"])
        .arg(cgroup);
    for pid in pids {
        cmd.arg("--exec-cmd").arg(format!("{pid}=exec sleep 600"));
    }
    let status = cmd
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(std::process::Stdio::null())
        .status()?;
    let text = std::fs::read_to_string(&out_path)?;
    let _ = std::fs::remove_file(&out_path);
    for _ in 0..500 {
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            break;
        }
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: killing the processes this restore made.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_dir(cgroup);
    if !status.success() {
        bail!("restore failed ({status})");
    }
    let v: serde_json::Value = serde_json::from_str(&text)?;
    Ok(v["total_ms"].as_f64().unwrap_or(0.0))
}

/// The dump section's body.
pub fn run(ctx: &Ctx) -> Result<String> {
    let runs = ctx.runs;
    let user = ctx.bins.join("ckpt-user");
    let agent = start_agent(&ctx.bins, PIN_DIR)?;

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
    let mut curves: Vec<super::chart::Series> = [
        "frozen, agent",
        "frozen, /proc only",
        "total, agent",
        "total, /proc only",
    ]
    .iter()
    .map(|n| (n.to_string(), Vec::new()))
    .collect();
    let _ = writeln!(table, "| processes | fds | locks | frozen, agent (ms) | frozen, /proc only (ms) | frozen, /proc only ÷ agent | freeze request to thaw, agent (ms) | total, agent (ms) | total, /proc only (ms) | restore (ms) |");
    let _ = writeln!(table, "|---|---|---|---|---|---|---|---|---|---|");
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
                    let mut w = Worker::spawn(&ctx.bins.join("locker"), None)?;
                    w.cmd(&format!("churn {}/churn 1", data.display()))?;
                    workers.push(w);
                }
                for _ in 0..s.processes {
                    let mut w = Worker::spawn(&ctx.bins.join("locker"), Some(&cg))?;
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
                    let a = dump(&user, PIN_DIR, &cg, &image, false)?;
                    fa.push(a.frozen);
                    sa.push(a.stopped);
                    ta.push(a.total);
                    let p = dump(&user, "/sys/fs/bpf/ckpt-bench-none", &cg, &image, false)?;
                    fp.push(p.frozen);
                    tp.push(p.total);
                }
                Ok((stats(fa), stats(fp), stats(sa), stats(ta), stats(tp)))
            });
            // Restores of one agent image, once the workload is gone (its locks would
            // conflict with the restored ones).
            let kept = std::env::temp_dir().join("ckpt-bench-restore.img");
            let pids: Vec<u32> = workers
                .iter()
                .filter(|w| w.in_cgroup)
                .map(|w| w.child.id())
                .collect();
            let _ = std::fs::remove_file(&kept);
            let image = measured.and_then(|m| dump(&user, PIN_DIR, &cg, &kept, true).map(|_| m));
            drop(workers);
            let measured = image.and_then(|m| {
                let into =
                    cgroup_root()?.join(format!("ckpt-bench-restored-{}", std::process::id()));
                let mut r = Vec::new();
                for _ in 0..runs {
                    r.push(restore(&user, &kept, &into, &pids)?);
                }
                let _ = std::fs::remove_file(&kept);
                Ok((m, stats(r)))
            });
            std::thread::sleep(Duration::from_millis(300));
            let _ = std::fs::remove_dir(&cg);
            let _ = std::fs::remove_dir_all(&data);
            let ((fa, fp, sa, ta, tp), rs) = measured?;
            if !s.churn {
                let x = s.processes as f64;
                for (curve, v) in curves.iter_mut().zip([&fa, &fp, &ta, &tp]) {
                    curve.1.push((x, v.median));
                }
            }
            let row = format!(
                "| {}{} | {} | {} | {} | {} | {:.1}x | {} | {} | {} | {} |",
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
                fmt(&tp),
                fmt(&rs)
            );
            println!("{row}");
            let _ = writeln!(table, "{row}");
        }
        Ok(())
    })();
    stop(agent);
    result?;
    let png = crate::util::workspace().join("bench-dump.png");
    super::chart::scaling(
        &png,
        "ckpt-user dump: frozen window and total time (median)",
        "processes in the cgroup",
        "ms",
        &curves,
    )?;
    Ok(format!(
        "Each process holds its fds open with separate POSIX write locks spread over them. \"agent\": ckpt-agent running (fd tables from its task_file iterator, locks and leases from its maps, cross-checked with the lock lines the iterator walks); \"/proc only\": no agent (/proc/PID/fd, fdinfo, pidfd_getfd and kcmp per fd). Times in ms.\n\n{table}\n![dump scaling](bench-dump.png)\n\n\"frozen\" is the window from every task frozen to the thaw, as `ckpt-user dump` reports it; \"freeze request to thaw\" adds the time the kernel takes to freeze every task, which the first task to stop also spends stopped. \"+ lock traffic outside\": another process takes and releases a lock every millisecond, so the agent's tables have changed since the dump read them before freezing and are read again inside the window. \"restore\": `ckpt-user restore` of the agent image once the workload is killed, every process running `sleep` (`--exec-cmd`, through `sh -c`), from the start of the command to every program started (its report's `total_ms`); at 1,000 processes most of it is forking helpers that inherit every open description and executing 2,000 programs.\n\nWhere the frozen time goes with the agent (`ckpt-user dump --timings`, 100 processes / 10,000 fds): the fd tables, read through one iterator link per process on one thread per CPU, about 0.45 us of program time per fd (field loads checked by the verifier, one copy per lock) plus the kernel's own walk; fds whose file the prescan already knows need no other read. Processes come from the iterator's per-process record, checked against /proc reads made before freezing (exec, credentials, cwd). The agent's tables, read before freezing, are read again inside the window only if the agent changed them since (about 2 ms per 5,000 locks when it must). Paths, stat devices, file handles and /proc process facts are read before freezing; descriptions, lock cross-checks and fingerprints are assembled after the thaw, so the total time is longer than the /proc-only path's.\n"
    ))
}
