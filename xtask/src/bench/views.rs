//! Observability: `ckpt-user locks` against util-linux `lslocks`, and `ckpt-user
//! deleted` against `lsof +L1`, with 10,000 processes holding 10 locks and 10 fds each
//! (one of them a deleted file).

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{fmt, start_agent, stats, stop, Ctx, Worker};

const PIN_DIR: &str = "/sys/fs/bpf/ckpt-bench-views";
const PROCESSES: usize = 10_000;
const FILES: usize = 10;

/// Wall-clock ms of one command (its output discarded).
fn time_ms(cmd: &mut Command) -> Result<f64> {
    let t0 = Instant::now();
    let status = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

/// The views section's body.
pub fn run(ctx: &Ctx) -> Result<String> {
    let agent = start_agent(&ctx.bins, PIN_DIR)?;
    let data = std::env::temp_dir().join("ckpt-bench-views");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data)?;
    let result = (|| -> Result<String> {
        let mut workers = Vec::new();
        for i in 0..PROCESSES {
            let mut w = Worker::spawn(&ctx.bins.join("locker"), None)?;
            let dir = data.join(i.to_string());
            std::fs::create_dir_all(&dir)?;
            w.cmd(&format!("bulk {} {FILES} {FILES}", dir.display()))?;
            // One of its files deleted while open.
            let first = std::fs::read_dir(&dir)?
                .flatten()
                .next()
                .context("no file made")?;
            std::fs::remove_file(first.path())?;
            w.silence();
            workers.push(w);
        }
        std::thread::sleep(Duration::from_millis(500));
        let user = ctx.bins.join("ckpt-user");
        let queries: [(&str, Command, Command); 2] = [
            (
                "locks: `ckpt-user locks --json` vs `lslocks --json`",
                {
                    let mut c = Command::new(&user);
                    c.args(["--pin-dir", PIN_DIR, "locks", "--json"]);
                    c
                },
                {
                    let mut c = Command::new("lslocks");
                    c.arg("--json");
                    c
                },
            ),
            (
                "deleted files: `ckpt-user deleted --json` vs `lsof +L1`",
                {
                    let mut c = Command::new(&user);
                    c.args(["--pin-dir", PIN_DIR, "deleted", "--json"]);
                    c
                },
                {
                    let mut c = Command::new("lsof");
                    c.arg("+L1");
                    c
                },
            ),
        ];
        let mut table =
            String::from("| query | ckpt-user (ms) | alternative (ms) | alternative ÷ ckpt |\n|---|---|---|---|\n");
        for (label, mut ours, mut theirs) in queries {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..ctx.runs {
                a.push(time_ms(&mut ours)?);
                // lsof exits 1 when it finds nothing; it finds the files here.
                b.push(time_ms(&mut theirs)?);
            }
            let (a, b) = (stats(a), stats(b));
            let row = format!(
                "| {label} | {} | {} | {:.0}x |",
                fmt(&a),
                fmt(&b),
                b.median / a.median.max(1e-9)
            );
            println!("{row}");
            table.push_str(&row);
            table.push('\n');
        }
        drop(workers);
        Ok(table)
    })();
    stop(agent);
    let _ = std::fs::remove_dir_all(&data);
    let table = result?;
    Ok(format!(
        "{PROCESSES} processes, each holding {FILES} files open with {FILES} POSIX locks, one of the files deleted ({} locks, {PROCESSES} deleted files), plus whatever else the host runs. Wall time of the whole command, process start included.\n\n{table}\n`ckpt-user locks` reads the agent's tables (after waiting for it to apply every event made before the call), then each lock's path from /proc/PID/fd (most of its time here), and /proc/locks only when there are leases, to keep those it still lists; `lslocks` parses /proc/locks, which the kernel makes in O(locks²) (it walks the list from the start for each page read: 4 s of CPU at 100,000 locks), and looks up each holder in /proc. `ckpt-user deleted` reads the agent's table; `lsof +L1` stats every fd of every process.\n",
        PROCESSES * FILES
    ))
}
