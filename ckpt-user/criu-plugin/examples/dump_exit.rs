//! The plugin's work at the end of a CRIU dump, without CRIU (which does not start on
//! every kernel), for `cargo xtask bench --only criu-plugin`:
//!
//! - `dump_exit setup DIR PID...`: writes DIR/pstree.img naming the processes, and
//!   DIR/filelocks.img with a lease on fd 3 of each (as CRIU would for
//!   `locker --hold-lease`); `setup DIR --no-leases PID...` without leases.
//! - `dump_exit run DIR`: seizes the processes (ptrace, without stopping them, as
//!   CRIU holds them), then does what the plugin does in `exit(DUMP, 0)` (with the
//!   agent's pins from `$CKPT_PIN_DIR`), once; prints its wall-clock milliseconds.

use std::{os::fd::AsRawFd as _, time::Instant};

use anyhow::{bail, Context as _, Result};
use ckpt_criu_plugin::images::{
    image, records, FileLockEntry, PstreeEntry, FILE_LOCKS, FILE_LOCKS_MAGIC, PSTREE, PSTREE_MAGIC,
};
use nix::{sys::ptrace, unistd::Pid};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, dir, rest @ ..] if cmd == "setup" => {
            let leases = rest.first().map(String::as_str) != Some("--no-leases");
            let pids: Vec<u32> = rest
                .iter()
                .filter(|a| !a.starts_with("--"))
                .map(|p| p.parse().context("a pid"))
                .collect::<Result<_>>()?;
            let dir = std::path::Path::new(dir);
            std::fs::create_dir_all(dir)?;
            let tree: Vec<PstreeEntry> = pids
                .iter()
                .map(|&pid| PstreeEntry {
                    pid,
                    ppid: 1,
                    pgid: pid,
                    sid: pid,
                    threads: vec![pid],
                })
                .collect();
            std::fs::write(dir.join(PSTREE), image(PSTREE_MAGIC, &tree))?;
            let locks: Vec<FileLockEntry> = pids
                .iter()
                .filter(|_| leases)
                .map(|&pid| FileLockEntry {
                    flag: FileLockEntry::FL_LEASE,
                    r#type: FileLockEntry::F_WRLCK,
                    pid: pid as i32,
                    fd: 3,
                    start: 0,
                    len: 0,
                })
                .collect();
            std::fs::write(dir.join(FILE_LOCKS), image(FILE_LOCKS_MAGIC, &locks))?;
            Ok(())
        }
        [cmd, dir] if cmd == "run" => {
            // Seized as CRIU holds them (the plugin finds the tree as the processes
            // the process it runs in traces), not stopped.
            let tree: Vec<PstreeEntry> = records(
                Some(&std::fs::read(std::path::Path::new(dir).join(PSTREE))?),
                PSTREE_MAGIC,
            )?;
            for e in &tree {
                ptrace::seize(Pid::from_raw(e.pid as i32), ptrace::Options::empty())
                    .with_context(|| format!("seizing {}", e.pid))?;
            }
            let dir = std::fs::File::open(dir).with_context(|| format!("opening {dir}"))?;
            let t0 = Instant::now();
            ckpt_criu_plugin::dump::after_dump(dir.as_raw_fd())?;
            println!("{:.3}", t0.elapsed().as_secs_f64() * 1e3);
            Ok(())
        }
        _ => bail!("usage: dump_exit setup DIR [--no-leases] PID... | dump_exit run DIR"),
    }
}
