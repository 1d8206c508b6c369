//! Observability: `ckpt-user locks` against util-linux `lslocks`, and `ckpt-user
//! deleted` against `lsof +L1`, with 10,000 processes holding 10 locks and 10 fds each
//! (one of them a deleted file).

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{fmt, start_agent_with, stats, stop, Ctx, Worker};

const PIN_DIR: &str = "/sys/fs/bpf/ckpt-bench-views";
const PROCESSES: usize = 10_000;
const FILES: usize = 10;
/// Where the bench's agent serves its metrics.
const METRICS: &str = "127.0.0.1:19477";
/// A pin dir no agent serves.
const NO_AGENT: &str = "/sys/fs/bpf/ckpt-bench-views-no-agent";

/// What the agent's background deleted-file table can promise here (see `run`).
const MAX_AGE_MS: &str = "10000";

/// Wall-clock ms of one command (its output discarded), or its exit status and stderr:
/// a failure is reported, never hidden.
fn time_ms(cmd: &mut Command) -> Result<Result<f64, String>> {
    let t0 = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        return Ok(Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(Ok(ms))
}

/// A `ckpt-user` command on the bench's pins (`pins` None: a pin dir no agent
/// serves, so the command loads its iterators itself).
fn ckpt_user(ctx: &Ctx, pins: Option<&str>, args: &[&str]) -> Command {
    let mut c = Command::new(ctx.bins.join("ckpt-user"));
    c.args(["--pin-dir", pins.unwrap_or(NO_AGENT)]).args(args);
    c
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// The views section's body.
pub fn run(ctx: &Ctx) -> Result<String> {
    let agent = start_agent_with(&ctx.bins, PIN_DIR, &["--metrics", METRICS])?;
    let data = std::env::temp_dir().join("ckpt-bench-views");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data)?;
    let result = (|| -> Result<String> {
        let mut workers = Vec::new();
        for i in 0..PROCESSES {
            let mut w = Worker::spawn(&ctx.bins.join("locker"), None)?;
            let dir = data.join(i.to_string());
            std::fs::create_dir_all(&dir)?;
            // Its own fds' table, not one the size of ours (see the locker); before
            // its locks, which belong to the table they were taken through.
            w.cmd("compactfds")?;
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
        let agent = Some(PIN_DIR);
        let metrics_url = format!("http://{METRICS}/metrics");
        let queries: [(&str, Command, Command); 6] = [
            (
                "locks: `ckpt-user locks --json` vs `lslocks --json`",
                ckpt_user(ctx, agent, &["locks", "--json"]),
                cmd("lslocks", &["--json"]),
            ),
            (
                "locks, no agent (ckpt-user loads its iterators)",
                ckpt_user(ctx, None, &["locks", "--json"]),
                cmd("lslocks", &["--json"]),
            ),
            (
                "top: one refresh (`ckpt-user top --batch`: locks, wait-for graph, deleted files) vs `lslocks`",
                ckpt_user(ctx, agent, &["top", "--batch"]),
                cmd("lslocks", &[]),
            ),
            (
                "metrics: one scrape of `ckpt-agent --metrics` (curl) vs `lslocks --json` (what textfile exporters run)",
                cmd("curl", &["-sf", &metrics_url]),
                cmd("lslocks", &["--json"]),
            ),
            (
                "deleted files: `ckpt-user deleted --json` (a scan at call) vs `lsof +L1`",
                ckpt_user(ctx, agent, &["deleted", "--json"]),
                cmd("lsof", &["+L1"]),
            ),
            (
                "deleted files, `--max-age 10000` (the agent's background table)",
                ckpt_user(ctx, agent, &["deleted", "--json", "--max-age", MAX_AGE_MS]),
                cmd("lsof", &["+L1"]),
            ),
        ];
        let mut table = String::from(
            "| query | ckpt-user (ms) | alternative (ms) | alternative ÷ ckpt | failed runs (ckpt-user / alternative) |\n|---|---|---|---|---|\n",
        );
        let mut failures = Vec::new();
        for (label, mut ours, mut theirs) in queries {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let (mut fa, mut fb) = (0, 0);
            // A run's time, or its failure counted and kept.
            let mut timed = |c: &mut Command, times: &mut Vec<f64>, failed: &mut usize| {
                match time_ms(c)? {
                    Ok(ms) => times.push(ms),
                    Err(e) => {
                        *failed += 1;
                        eprintln!("bench: {e}");
                        failures.push(e);
                    }
                }
                anyhow::Ok(())
            };
            for _ in 0..ctx.runs {
                timed(&mut ours, &mut a, &mut fa)?;
                // lsof exits 1 when it finds nothing; it finds the files here.
                timed(&mut theirs, &mut b, &mut fb)?;
            }
            let (a, b) = (stats(a), stats(b));
            let row = format!(
                "| {label} | {} | {} | {:.0}x | {fa} / {fb} |",
                fmt(&a),
                fmt(&b),
                b.median / a.median.max(1e-9)
            );
            println!("{row}");
            table.push_str(&row);
            table.push('\n');
        }
        // A table older than asked for means a scan was timed, not the table.
        let out = ckpt_user(ctx, agent, &["deleted", "--json", "--max-age", MAX_AGE_MS])
            .stdout(Stdio::null())
            .output()?;
        let said = String::from_utf8_lossy(&out.stderr);
        if said.contains("scanning now") {
            failures.push(format!(
                "`--max-age {MAX_AGE_MS}` scanned instead of reading the agent's table: {}",
                said.trim()
            ));
        }
        for f in failures.iter().take(3) {
            table.push_str(&format!("\nFailed: `{}`\n", f.replace('`', "'")));
        }
        table.push_str(&walk_floor(ctx.runs)?);
        drop(workers);
        Ok(table)
    })();
    stop(agent);
    let _ = std::fs::remove_dir_all(&data);
    let table = result?;
    Ok(format!(
        "{PROCESSES} processes, each holding {FILES} files open with {FILES} POSIX locks, one of the files deleted ({} locks, {PROCESSES} deleted files), plus whatever else the host runs. Each worker's fd table is sized to its own fds (the locker's `compactfds`): inherited from this harness, which holds a pipe to each, the later workers' tables had up to 16,384 slots, which every fd walk scans (the kernel's `fget_task_next` looks at each empty slot; it was a third of `ckpt-user locks`'s CPU, 0.47 s instead of 0.38 s for the whole call, measured 2026-12-05). Wall time of the whole command, process start included; a failed run is counted and its stderr kept below the table.\n\n{table}\n`ckpt-user locks` reads the kernel's lock lists through the `lock_table` iterator (ckpt-agent's pinned one, or its own loaded for the call: the load and the verifier add the difference), one pass over every fd table and one over every mapping, side by side, and then each lock's path from the same pass; `lslocks` parses /proc/locks, which the kernel makes in O(locks²) (it walks the list from the start for each page read: 4 s of CPU at 100,000 locks), and looks up each holder in /proc. `ckpt-user deleted` scans every fd and mapping at the call (exact at call time, sizes included); with `--max-age MS` it takes ckpt-agent's background table if it is at most that old (the agent rescans at most once a second, and no more than 5 % of a CPU allows: here a scan takes ~0.15 s, so every ~3 s, which is why this row asks for 10 s); `lsof +L1` stats every fd of every process.\n",
        PROCESSES * FILES
    ))
}

/// The kernel's walk alone: empty iterators over every fd and every mapping, read side
/// by side as `ckpt-user locks` reads its own (ckpt-user's `walk_floor` example).
fn walk_floor(runs: usize) -> Result<String> {
    let floor = super::build_example("ckpt-user", "walk_floor")?;
    let mut times = Vec::new();
    for _ in 0..runs {
        let out = Command::new(&floor).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let ms = text
            .trim()
            .strip_prefix("walk_ms=")
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| {
                format!(
                    "walk_floor said {text:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        times.push(ms);
    }
    let line = format!(
        "\nThe floor of any reader of the fd tables: empty iterator programs over every fd and every mapping on the same host, read side by side (`walk_floor`; loading not counted): {} ms.\n",
        fmt(&stats(times))
    );
    println!("{}", line.trim());
    Ok(line)
}
