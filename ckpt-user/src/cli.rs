//! Command-line front ends of both binaries. Errors end as one line on stderr and a
//! non-zero exit (see `report`).

use std::{
    collections::BTreeSet,
    io::{IsTerminal as _, Write},
    path::PathBuf,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

use crate::{
    cgroup, dump,
    ghost::view as deleted,
    image::{
        inspect,
        key::{self, HostKey},
        reader::ImageReader,
    },
    lease::{restore as leases, schedule::LeaseTime, snapshot},
    lock::{
        graph,
        view::{filter, live_rows, render_table, PidFilter},
    },
    restore,
    task::spawn,
    tracer::pins::{PinDir, DEFAULT_PIN_DIR},
    view::{events, top},
};

#[derive(Parser, Debug)]
#[command(
    name = "ckpt-agent",
    version,
    about = "Loads ckpt's eBPF tracer of rare lock events (wait starts, lease breaks) and pins its maps"
)]
pub struct AgentArgs {
    /// bpffs directory for pinned programs, links and maps.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Remove all pins on exit (tracing stops). By default pins are kept so that tracing
    /// continues and a restarted agent loses nothing.
    #[arg(long)]
    pub unpin: bool,
    /// Also record when each lock is taken (`held_ms` in `ckpt-user locks`). Costs a
    /// walk of the inode's lock list on every granted lock call.
    #[arg(long)]
    pub hold_times: bool,
    /// Track deleted-but-open files exactly (`unlinked_at`): attaches syscall
    /// tracepoints, which slow every syscall of every task on the host.
    #[arg(long)]
    pub exact_deleted: bool,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics, e.g.
    /// 127.0.0.1:9477. Off by default. Each scrape reads the kernel's lock lists.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Write the metrics to PATH (for node_exporter's textfile collector) every
    /// --metrics-interval seconds, atomically.
    #[arg(long, value_name = "PATH")]
    pub metrics_textfile: Option<PathBuf>,
    #[arg(long, value_name = "SECONDS", default_value_t = 15)]
    pub metrics_interval: u64,
    /// Also count locks and waiters of this cgroup (label `cgroup`); repeatable.
    #[arg(long = "metrics-cgroup", value_name = "CG")]
    pub metrics_cgroups: Vec<String>,
}

#[derive(Parser, Debug)]
#[command(
    name = "ckpt-user",
    version,
    about = "Live file-lock state of Linux processes"
)]
pub struct UserArgs {
    /// bpffs directory where ckpt-agent pinned its maps.
    #[arg(long, global = true, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Key that authenticates images (dump MACs with it, creating it on first use;
    /// restore verifies with it). Default: $CKPT_IMAGE_KEY, else /var/lib/ckpt/image.key.
    #[arg(long, global = true, value_name = "PATH")]
    pub key: Option<PathBuf>,
    #[command(subcommand)]
    pub command: UserCommand,
}

/// Which processes a live view shows, and how.
#[derive(clap::Args, Debug)]
pub struct Selection {
    /// Only processes of this cgroup and its descendants (v1 or v2; a path under a
    /// cgroup mount or a full path).
    #[arg(long)]
    cgroup: Option<String>,
    /// Only this process.
    #[arg(long)]
    pid: Option<u32>,
    /// One JSON array on stdout.
    #[arg(long)]
    json: bool,
}

/// How `graph` prints.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphFormat {
    /// One line per cycle.
    Text,
    Json,
    /// Graphviz.
    Dot,
}

/// `graph`'s exit status when a deadlock exists (1 is an error, 2 a usage error).
pub const EXIT_DEADLOCK: i32 = 3;

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// What this kernel and host support, one line per requirement (like `criu
    /// check`); exit status 1 when a dump and a restore with ckpt-agent cannot work.
    /// JSON: [{name, ok, need ("required" or "extra"), detail, needed_for}].
    Check {
        #[arg(long)]
        json: bool,
    },
    /// Live lock table: POSIX, OFD and flock locks with their waiters (rows held or
    /// waited on by the selected processes).
    Locks {
        #[command(flatten)]
        select: Selection,
    },
    /// A live full-screen view: contended locks (longest wait first) with holders and
    /// waiters, leases being broken counting down, deleted-but-open files by pinned
    /// bytes, the agent's health. Keys: q quit, space freeze, s sort, f filter.
    Top {
        /// Only processes of this cgroup and its descendants.
        #[arg(long)]
        cgroup: Option<String>,
        /// Only this process.
        #[arg(long)]
        pid: Option<u32>,
        /// Seconds between reads of the tables (the screen counts in between).
        #[arg(short, long, default_value_t = 2.0, value_name = "SECONDS")]
        delay: f64,
        /// Read once and print the screen's content as text (no terminal needed).
        #[arg(short, long)]
        batch: bool,
    },
    /// Contention as it happens, one line per event (wait began, wait ended and how,
    /// lease break began, lease break ended and how, deadlock found), until
    /// interrupted. Needs ckpt-agent (its records are the source).
    Events {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// The wait-for graph: who waits on which lock held by whom, across POSIX, OFD and
    /// flock locks and lease breaks, with every cycle. Exit status 3 when a deadlock
    /// exists (a cycle nothing in it can end; one through a lease break is a stall,
    /// which ends at the break's deadline), 0 otherwise.
    Graph {
        /// Only cycles and waits that involve processes of this cgroup.
        #[arg(long)]
        cgroup: Option<String>,
        /// Only cycles and waits that involve this process.
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long, value_enum, default_value_t = GraphFormat::Text)]
        format: GraphFormat,
    },
    /// Deleted-but-open files: who holds them and what they pin (like `lsof +L1`, plus
    /// mmap-only holders), from a scan at the call. JSON: dev, inode, path, size,
    /// blocks, bytes, nlink, unlinked_at, first_seen, holders (each {pid, fd} or
    /// {pid, mapping}).
    Deleted {
        #[command(flatten)]
        select: Selection,
        /// Answer from ckpt-agent's background table if its last scan is at most this
        /// many milliseconds old (no scan of its own), else scan now.
        #[arg(long, value_name = "MS")]
        max_age: Option<u64>,
    },
    /// Checkpoint the file state of every process in a cgroup into one image file.
    Dump {
        /// The cgroup (v1 or v2): a full path or a path under a cgroup mount.
        cgroup: String,
        /// Image file to write (atomically; mode 0600).
        #[arg(short, long)]
        output: PathBuf,
        /// Command run (with sh -c) while the cgroup is frozen, with CKPT_IMAGE_ID and
        /// CKPT_CGROUP in its environment: e.g. a filesystem snapshot.
        #[arg(long)]
        snapshot_cmd: Option<String>,
        /// Most data (holes excluded) one deleted-but-open file may hold; a larger one
        /// stops the dump. Suffixes K, M, G.
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        ghost_limit: u64,
        /// Also record a SHA-256 of every open regular file (checked at restore).
        #[arg(long)]
        hash: bool,
        /// How long to wait for the cgroup to freeze, in seconds.
        #[arg(long, default_value_t = 10)]
        freeze_timeout: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Print how long each phase took (stderr).
        #[arg(long)]
        timings: bool,
    },
    /// Restore an image: its processes again (new pids, same tree), each with its fds,
    /// locks and leases, running its recorded command line. All or nothing.
    Restore {
        image: PathBuf,
        /// Run CMD (with /bin/sh -c; start it with `exec` to keep the pid) instead of
        /// process PID's recorded command line. Repeatable.
        #[arg(long = "exec-cmd", value_name = "PID=CMD", value_parser = parse_exec_cmd)]
        exec_cmd: Vec<(u32, String)>,
        /// Where to recreate deleted-but-open files (default: next to their old path).
        #[arg(long)]
        ghost_dir: Option<PathBuf>,
        /// Time left to leases that were being broken: exact (what they had left),
        /// holder (the whole lease-break-time again), breaker (revoked at once), or
        /// +N / -N seconds on top of exact.
        #[arg(long, default_value = "exact", value_parser = clap::value_parser!(LeaseTime))]
        lease_time: LeaseTime,
        /// Restore even if files changed since the dump (every change is still printed).
        #[arg(long)]
        force: bool,
        /// Leave fds that cannot be reopened by path (sockets, pipes) closed instead of
        /// refusing; stdin, stdout and stderr get what --stdio says.
        #[arg(long)]
        skip_unsupported: bool,
        /// What restored processes get on stdin, stdout and stderr where those were
        /// pipes, sockets or terminals: auto (ckpt-user's own where it is a terminal,
        /// /dev/null otherwise, so `$(ckpt-user restore ...)` returns), inherit
        /// (ckpt-user's own), null, or a directory DIR (output appended to
        /// DIR/PID.stdout and DIR/PID.stderr, PID as in the image; stdin /dev/null).
        #[arg(long, default_value = "auto", value_name = "auto|inherit|null|DIR")]
        stdio: spawn::Stdio,
        /// Restore close-on-exec fds without the flag, so that they (and the locks and
        /// leases on them) reach the program, which is started by an exec.
        #[arg(long)]
        keep_cloexec: bool,
        /// Put the restored processes into this cgroup (a path under a cgroup mount or
        /// a full path).
        #[arg(long)]
        cgroup: Option<String>,
        /// Restore an image even if its MAC does not verify with this host's key (an
        /// image made elsewhere, or before images carried a MAC): restoring an image
        /// runs its processes as their recorded users, so only for images you trust.
        #[arg(long)]
        trust_image: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show an image: a summary, everything as JSON, or a grep-able tree.
    Inspect {
        image: PathBuf,
        #[arg(long, conflicts_with = "tree")]
        json: bool,
        #[arg(long)]
        tree: bool,
    },
    /// Internal: writes man pages and shell completions under DIR (see docs.rs).
    #[command(name = "__docs", hide = true)]
    Docs { dir: PathBuf },
    /// Internal: thaws a cgroup if the dump that started it dies (see cgroup/freeze.rs).
    #[command(name = "__watchdog", hide = true)]
    Watchdog {
        file: PathBuf,
        thaw: String,
        temp: PathBuf,
    },
}

/// "1234=exec prog --flag" -> (1234, "exec prog --flag").
fn parse_exec_cmd(s: &str) -> Result<(u32, String), String> {
    let (pid, cmd) = s
        .split_once('=')
        .ok_or_else(|| format!("expected PID=CMD, got {s:?}"))?;
    let pid = pid
        .trim()
        .parse()
        .map_err(|_| format!("not a pid: {pid:?}"))?;
    if cmd.trim().is_empty() {
        return Err(format!("empty command for pid {pid}"));
    }
    Ok((pid, cmd.to_string()))
}

/// "64M", "1G", "4096" -> bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("not a size: {s} (use e.g. 4096, 64K, 64M, 1G)"))
}

pub(crate) fn pid_filter(cgroup_arg: Option<&str>, pid: Option<u32>) -> Result<PidFilter> {
    let mut set: Option<BTreeSet<u32>> = None;
    if let Some(cg) = cgroup_arg {
        set = Some(cgroup::pids(&cgroup::resolve(cg)?)?);
    }
    if let Some(pid) = pid {
        set = Some(match set {
            Some(s) => s.into_iter().filter(|p| *p == pid).collect(),
            None => BTreeSet::from([pid]),
        });
    }
    Ok(set)
}

/// JSON for a person on a terminal (indented), compact for a program reading a pipe
/// or file: indentation doubled the size of `locks --json` at 100,000 rows (38 MB)
/// and its share of the time.
fn write_json(out: &mut impl Write, value: &impl serde::Serialize) -> serde_json::Result<()> {
    if std::io::stdout().is_terminal() {
        serde_json::to_writer_pretty(out, value)
    } else {
        serde_json::to_writer(out, value)
    }
}

pub fn run_user(args: UserArgs) -> Result<()> {
    // Whatever the command: a restore killed while it had changed fs.lease-break-time
    // is repaired by the next ckpt command (unless a restore holds the lock now).
    if !matches!(args.command, UserCommand::Watchdog { .. }) {
        if let Some(w) = leases::repair_lease_break_time() {
            eprintln!("ckpt-user: warning: {w}");
        }
    }
    let pins = PinDir::new(args.pin_dir);
    let key_path = key::key_path(args.key.as_deref());
    match args.command {
        UserCommand::Deleted { select, max_age } => cmd_deleted(&pins, select, max_age),
        UserCommand::Docs { dir } => crate::docs::write(&dir),
        UserCommand::Check { json } => cmd_check(json),
        UserCommand::Events { json } => events::run(&pins, json, &mut std::io::stdout().lock()),
        UserCommand::Top {
            cgroup,
            pid,
            delay,
            batch,
        } => cmd_top(pins, cgroup, pid, delay, batch),
        UserCommand::Graph {
            cgroup,
            pid,
            format,
        } => cmd_graph(&pins, cgroup, pid, format),
        UserCommand::Locks { select } => cmd_locks(&pins, select),
        UserCommand::Dump {
            cgroup,
            output,
            snapshot_cmd,
            ghost_limit,
            hash,
            freeze_timeout,
            json,
            timings,
        } => {
            let report = dump::run(&dump::Options {
                cgroup,
                output,
                pins,
                key: key_path,
                snapshot_cmd,
                ghost_limit,
                hash,
                freeze_timeout: std::time::Duration::from_secs(freeze_timeout),
                timings,
            })?;
            emit(json, &report, || dump_summary(&report))
        }
        UserCommand::Restore {
            image,
            exec_cmd,
            ghost_dir,
            lease_time,
            force,
            skip_unsupported,
            keep_cloexec,
            cgroup,
            trust_image,
            json,
            stdio,
        } => {
            let report = restore::run(&restore::Options {
                image,
                exec_cmds: exec_cmd.into_iter().collect(),
                ghost_dir,
                lease_time,
                force,
                skip_unsupported,
                keep_cloexec,
                cgroup,
                pins,
                key: key_path,
                trust_image,
                stdio,
            })?;
            for w in &report.warnings {
                eprintln!("ckpt-user: warning: {w}");
            }
            emit(json, &report, || restore_summary(&report))
        }
        UserCommand::Inspect { image, json, tree } => cmd_inspect(&key_path, &image, json, tree),
        UserCommand::Watchdog { file, thaw, temp } => {
            crate::cgroup::freeze::watchdog_main(&file, &thaw, &temp)
        }
    }
}

/// Writes `value` as one JSON document, or `text()`, to stdout, buffered (pretty JSON
/// of 10,000 rows was 180,000 line-sized writes).
fn emit<T: serde::Serialize>(json: bool, value: &T, text: impl FnOnce() -> String) -> Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if json {
        write_json(&mut out, value)?;
        writeln!(out)?;
    } else {
        out.write_all(text().as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

/// `emit` for a long list: compact JSON made on every CPU (serde_json's one thread
/// took 50 ms of `locks --json` at 100,000 rows), the same bytes as `emit`'s.
fn emit_list<T: serde::Serialize + Sync>(
    json: bool,
    items: &[T],
    text: impl FnOnce() -> String,
) -> Result<()> {
    if !json || std::io::stdout().is_terminal() || items.len() < PARALLEL_JSON_MIN {
        return emit(json, &items, text);
    }
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let parts = json_array_parts(items, threads);
    // Straight to fd 1: stdout's line buffering would scan every byte for a newline.
    let stdout = std::io::stdout().lock();
    let mut out = std::fs::File::from(std::os::fd::AsFd::as_fd(&stdout).try_clone_to_owned()?);
    for part in parts {
        out.write_all(&part?)?;
    }
    out.write_all(b"\n")?;
    Ok(())
}

/// Below this many items one thread is as quick.
const PARALLEL_JSON_MIN: usize = 4096;

/// A JSON array of `items`, compact, in pieces made on up to `threads` threads: the
/// concatenation is what `serde_json::to_vec(items)` gives.
fn json_array_parts<T: serde::Serialize + Sync>(
    items: &[T],
    threads: usize,
) -> Vec<serde_json::Result<Vec<u8>>> {
    let chunk = items.len().div_ceil(threads.max(1)).max(1);
    let mut parts: Vec<serde_json::Result<Vec<u8>>> = std::thread::scope(|s| {
        let workers: Vec<_> = items
            .chunks(chunk)
            .enumerate()
            .map(|(n, c)| {
                let work = move || -> serde_json::Result<Vec<u8>> {
                    let mut buf = Vec::with_capacity(c.len() * 256);
                    buf.push(if n == 0 { b'[' } else { b',' });
                    for (i, item) in c.iter().enumerate() {
                        if i > 0 {
                            buf.push(b',');
                        }
                        serde_json::to_writer(&mut buf, item)?;
                    }
                    Ok(buf)
                };
                // A thread that cannot be made (a pids limit): this part here.
                std::thread::Builder::new()
                    .spawn_scoped(s, work)
                    .map_err(|_| work)
            })
            .collect();
        workers
            .into_iter()
            .map(|w| match w {
                Ok(t) => t.join().expect("a JSON thread panicked"),
                Err(work) => work(),
            })
            .collect()
    });
    if parts.is_empty() {
        parts.push(Ok(b"[".to_vec()));
    }
    parts.push(Ok(b"]".to_vec()));
    parts
}

fn say_notes(notes: &[String]) {
    for n in notes {
        eprintln!("ckpt-user: {n}");
    }
}

fn cmd_deleted(pins: &PinDir, select: Selection, max_age: Option<u64>) -> Result<()> {
    let pids = pid_filter(select.cgroup.as_deref(), select.pid)?;
    let (entries, notes, source) =
        deleted::entries(pins, max_age.map(std::time::Duration::from_millis))?;
    say_notes(&notes);
    let mut files = deleted::group(&entries, |p| {
        pids.as_ref().is_none_or(|set| set.contains(&p))
    });
    deleted::refresh_sizes(&mut files, source);
    emit(select.json, &files, || deleted::render(&files))
}

fn cmd_check(json: bool) -> Result<()> {
    let items = crate::check::run();
    emit(json, &items, || crate::check::render(&items))?;
    if !crate::check::usable(&items) {
        let missing: Vec<&str> = items
            .iter()
            .filter(|i| !i.ok && i.need == crate::check::Need::Required)
            .map(|i| i.name.as_str())
            .collect();
        bail!(
            "dump and restore with ckpt-agent cannot work here: missing {}",
            missing.join(", ")
        );
    }
    Ok(())
}

fn cmd_top(
    pins: PinDir,
    cgroup: Option<String>,
    pid: Option<u32>,
    delay: f64,
    batch: bool,
) -> Result<()> {
    if !(0.1..=3600.0).contains(&delay) {
        bail!("-d {delay}: give between 0.1 and 3600 seconds");
    }
    let opts = top::Options {
        pins,
        cgroup,
        pid,
        delay: std::time::Duration::from_secs_f64(delay),
    };
    if batch {
        let mut out = std::io::stdout().lock();
        out.write_all(top::batch(&opts)?.as_bytes())?;
        return Ok(());
    }
    top::run(opts)
}

/// Exits with EXIT_DEADLOCK when a deadlock exists (for cron jobs and tests).
fn cmd_graph(
    pins: &PinDir,
    cgroup: Option<String>,
    pid: Option<u32>,
    format: GraphFormat,
) -> Result<()> {
    let pids = pid_filter(cgroup.as_deref(), pid)?;
    let (rows, notes) = live_rows(pins)?;
    say_notes(&notes);
    let mut a = graph::analyse(&rows, graph::threads_of);
    if let Some(p) = &pids {
        graph::select(&mut a, &rows, p);
    }
    match format {
        GraphFormat::Text => emit(false, &(), || graph::render_text(&rows, &a))?,
        GraphFormat::Dot => emit(false, &(), || graph::render_dot(&rows, &a))?,
        GraphFormat::Json => emit(true, &graph::to_json(&rows, &a), String::new)?,
    }
    if graph::has_deadlock(&a) {
        std::process::exit(EXIT_DEADLOCK);
    }
    Ok(())
}

fn cmd_locks(pins: &PinDir, select: Selection) -> Result<()> {
    let pids = pid_filter(select.cgroup.as_deref(), select.pid)?;
    let (mut rows, notes) = live_rows(pins)?;
    say_notes(&notes);
    // On every row, before the filter: a cycle may pass outside the selection.
    if rows.iter().any(|r| !r.waiters.is_empty()) {
        let a = graph::analyse(&rows, graph::threads_of);
        graph::mark(&mut rows, &a);
    }
    let rows = filter(rows, &pids);
    emit_list(select.json, &rows, || render_table(&rows))?;
    // The process ends here: freeing 100,000 rows one by one would only delay it.
    std::mem::forget(rows);
    Ok(())
}

fn cmd_inspect(
    key_path: &std::path::Path,
    image: &std::path::Path,
    json: bool,
    tree: bool,
) -> Result<()> {
    // A CRIU image directory (its sidecar, then in text its restore report when
    // there is one), or either file ckpt's CRIU plugin wrote in one.
    let named = |name: &str| image.file_name() == Some(std::ffi::OsStr::new(name));
    let read = |path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))
    };
    let report_of = |path: &std::path::Path| -> Result<snapshot::RestoreReport> {
        snapshot::RestoreReport::parse(&read(path)?)
            .with_context(|| format!("{} is not a ckpt restore report", path.display()))
    };
    if named(snapshot::REPORT) {
        let r = report_of(image)?;
        return emit(json, &r, || r.render());
    }
    let sidecar = if image.is_dir() {
        Some(image.join(snapshot::SIDECAR))
    } else {
        named(snapshot::SIDECAR).then(|| image.to_path_buf())
    };
    if let Some(path) = sidecar {
        let s = snapshot::LeaseSidecar::parse(&read(&path)?)
            .with_context(|| format!("{} is not a ckpt lease sidecar", path.display()))?;
        let report = image.join(snapshot::REPORT);
        let restored = if image.is_dir() && report.exists() {
            Some(report_of(&report)?)
        } else {
            None
        };
        return emit(json, &s, || {
            let mut text = snapshot::render(&s);
            if let Some(r) = &restored {
                text.push_str(&r.render());
            }
            text
        });
    }
    // The MAC is reported, never required: inspect reads any image, and a key it
    // cannot read (not root, none yet) only means "not checked".
    let host_key = HostKey::load(key_path).ok();
    let r = ImageReader::open(image, host_key.as_ref())?;
    let auth = format!("authentication: {}", r.auth.describe());
    if json {
        // stdout stays one JSON document (the image's schema).
        eprintln!("ckpt-user: {auth}");
    }
    emit(json, &r.image, || {
        if tree {
            format!("image/{auth}\n{}", inspect::tree(&r.image))
        } else {
            format!("{}{auth}\n", inspect::summary(&r.image))
        }
    })
}

/// One line for a person: what a dump saved and how long the cgroup stayed frozen.
fn dump_summary(r: &dump::Report) -> String {
    format!(
        "{}: {} processes, {} fds, {} locks, {} leases, {} waiters, {} deleted files; frozen {:.2} ms (after {:.2} ms freezing), total {:.1} ms (locks from {}, fd tables from {})\n",
        r.image,
        r.processes,
        r.fds,
        r.locks,
        r.leases,
        r.waiters,
        r.ghosts,
        r.frozen_ms,
        r.freezing_ms,
        r.total_ms,
        r.source,
        r.fd_tables
    )
}

/// What a restore brought back, and when each lease being broken is revoked.
fn restore_summary(r: &restore::Report) -> String {
    let pids: Vec<String> = r
        .processes
        .iter()
        .map(|p| format!("{}->{}", p.old_pid, p.pid))
        .collect();
    let mut out = format!(
        "{}: restored {} processes ({}), {} fds, {} locks, {} leases, {} deleted files in {:.1} ms\n",
        r.image,
        r.processes.len(),
        pids.join(" "),
        r.fds,
        r.locks,
        r.leases.len(),
        r.ghosts,
        r.total_ms
    );
    for l in r.leases.iter().filter(|l| l.breaking) {
        let downgrade = l.downgrade_remaining_ns.map_or(String::new(), |d| {
            format!("downgraded {:.3} s and ", d as f64 / 1e9)
        });
        out.push_str(&format!(
            "  lease on {} (pid {}): {downgrade}revoked {:.3} s after the release ({})\n",
            l.path,
            l.pid,
            l.remaining_ns.unwrap_or(0) as f64 / 1e9,
            r.lease_time
        ));
    }
    out
}

/// Prints `err` as one line and returns the exit code.
pub fn report(prog: &str, err: &anyhow::Error) -> i32 {
    eprintln!("{prog}: error: {err:#}");
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_made_on_several_threads_is_the_json_of_one() {
        #[derive(serde::Serialize)]
        struct Row {
            n: usize,
            s: String,
        }
        for len in [0, 1, 2, 3, 7, 100] {
            let rows: Vec<Row> = (0..len)
                .map(|n| Row {
                    n,
                    s: format!("\"{n}\"\n"),
                })
                .collect();
            for threads in [1, 2, 3, 8] {
                let joined: Vec<u8> = json_array_parts(&rows, threads)
                    .into_iter()
                    .flat_map(|p| p.unwrap())
                    .collect();
                assert_eq!(
                    joined,
                    serde_json::to_vec(&rows).unwrap(),
                    "{len} rows on {threads} threads"
                );
            }
        }
    }
}
