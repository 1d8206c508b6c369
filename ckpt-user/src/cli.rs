//! Command-line front ends of both binaries. Errors end as one line on stderr and a
//! non-zero exit (see `report`).

use std::{collections::BTreeSet, io::Write as _, path::PathBuf};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

use crate::{
    cgroup,
    locks::proc_locks,
    tracer::pins::{PinDir, DEFAULT_PIN_DIR},
    view::{
        live::{LiveMaps, Unavailable},
        locks::{filter, from_agent, from_proc, render_table, PidFilter},
    },
};

#[derive(Parser, Debug)]
#[command(
    name = "ckpt-agent",
    version,
    about = "Loads ckpt's eBPF tracer, pins its maps and keeps the live lock table"
)]
pub struct AgentArgs {
    /// bpffs directory for pinned programs, links and maps.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Remove all pins on exit (tracing stops). By default pins are kept so that tracing
    /// continues and a restarted agent loses nothing.
    #[arg(long)]
    pub unpin: bool,
    /// Capacity of the lock table when it is first created (default 131072). A full
    /// table is counted, logged, and reported by `ckpt-user locks`.
    #[arg(long)]
    pub max_locks: Option<u32>,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, default_value = "info")]
    pub log_level: String,
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
    #[command(subcommand)]
    pub command: UserCommand,
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Live lock table: POSIX, OFD and flock locks with their waiters.
    Locks {
        /// Only locks held or waited on by processes of this cgroup (v1 or v2; a path
        /// under a cgroup mount or a full path).
        #[arg(long)]
        cgroup: Option<String>,
        /// Only locks held or waited on by this process.
        #[arg(long)]
        pid: Option<u32>,
        /// One JSON array on stdout.
        #[arg(long)]
        json: bool,
    },
}

fn pid_filter(cgroup_arg: Option<&str>, pid: Option<u32>) -> Result<PidFilter> {
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

pub fn run_user(args: UserArgs) -> Result<()> {
    let pins = PinDir::new(args.pin_dir);
    match args.command {
        UserCommand::Locks { cgroup, pid, json } => {
            let pids = pid_filter(cgroup.as_deref(), pid)?;
            let rows = match LiveMaps::open(&pins) {
                Ok(live) => {
                    for (what, n) in live.losses()? {
                        eprintln!("ckpt-user: warning: {n} lost ({what}); the table may be incomplete (see ckpt-agent's log)");
                    }
                    from_agent(&live)?
                }
                Err(why) => {
                    if let Unavailable::Maps(..) = why {
                        eprintln!("ckpt-user: warning: {why}");
                    } else {
                        eprintln!("ckpt-user: {why}; falling back to /proc/locks (no owners, ages or waiting times)");
                    }
                    from_proc(&proc_locks::read().context("reading /proc/locks")?)
                }
            };
            let rows = filter(rows, &pids);
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &rows)?;
                writeln!(out)?;
            } else {
                out.write_all(render_table(&rows).as_bytes())?;
            }
            Ok(())
        }
    }
}

/// Prints `err` as one line and returns the exit code.
pub fn report(prog: &str, err: &anyhow::Error) -> i32 {
    eprintln!("{prog}: error: {err:#}");
    1
}
