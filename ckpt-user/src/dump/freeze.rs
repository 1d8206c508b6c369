//! Freezing a cgroup for the dump and — whatever happens — thawing it again.
//!
//! v2: `cgroup.freeze` and the `frozen` key of `cgroup.events`; v1: the freezer
//! controller's `freezer.state`. Before freezing, a watchdog process is started outside
//! the cgroup (`ckpt-user __watchdog`, its own process group so a terminal's Ctrl-C
//! does not reach it). It waits on a pipe from us: "done" means we thawed; end of file
//! without it means we died (SIGINT, SIGTERM, panic, even SIGKILL), and the watchdog
//! thaws the cgroup and removes the half-written image.

use std::{
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::cgroup;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Freezer {
    /// cgroup2: the cgroup directory.
    V2(PathBuf),
    /// cgroup v1 freezer hierarchy: the freezer cgroup directory.
    V1(PathBuf),
}

impl Freezer {
    /// The freezer for a cgroup directory: its own cgroup.freeze (v2) or freezer.state
    /// (v1 freezer hierarchy); for a v1 cgroup of another controller, the freezer
    /// cgroup at the same path.
    pub fn for_cgroup(dir: &Path) -> Result<Freezer> {
        if dir.join("cgroup.freeze").exists() {
            return Ok(Freezer::V2(dir.to_path_buf()));
        }
        if dir.join("freezer.state").exists() {
            return Ok(Freezer::V1(dir.to_path_buf()));
        }
        for m in cgroup::mounts()? {
            if let Ok(rel) = dir.strip_prefix(&m.path) {
                for f in cgroup::mounts()? {
                    let candidate = f.path.join(rel);
                    if f.controllers.iter().any(|c| c == "freezer")
                        && candidate.join("freezer.state").exists()
                    {
                        return Ok(Freezer::V1(candidate));
                    }
                }
            }
        }
        bail!(
            "cgroup {} cannot be frozen: no cgroup.freeze (v2) or freezer.state (v1)",
            dir.display()
        )
    }

    /// The file to write and the values that freeze and thaw.
    fn control(&self) -> (PathBuf, &'static str, &'static str) {
        match self {
            Freezer::V2(d) => (d.join("cgroup.freeze"), "1", "0"),
            Freezer::V1(d) => (d.join("freezer.state"), "FROZEN", "THAWED"),
        }
    }

    fn is_frozen(&self) -> Result<bool> {
        Ok(match self {
            Freezer::V2(d) => std::fs::read_to_string(d.join("cgroup.events"))?
                .lines()
                .any(|l| l.trim() == "frozen 1"),
            Freezer::V1(d) => std::fs::read_to_string(d.join("freezer.state"))?.trim() == "FROZEN",
        })
    }

    pub fn thaw(&self) -> Result<()> {
        let (file, _, thaw) = self.control();
        std::fs::write(&file, thaw).with_context(|| format!("thawing ({})", file.display()))
    }
}

/// A frozen cgroup. Thawed by [`Frozen::thaw`], on drop, or by the watchdog.
pub struct Frozen {
    freezer: Freezer,
    watchdog: Option<Child>,
    pub since: Instant,
    /// CLOCK_MONOTONIC when the cgroup was frozen.
    pub monotonic_ns: u64,
    /// From the freeze request until every task was frozen (the first tasks stop
    /// this much before the window starts).
    pub freezing: Duration,
}

impl Frozen {
    /// Starts the watchdog, freezes, and waits until every task is frozen.
    /// `temp_image` is removed by the watchdog if we die.
    pub fn freeze(freezer: Freezer, temp_image: &Path, timeout: Duration) -> Result<Frozen> {
        let (file, freeze, thaw) = freezer.control();
        let watchdog = Command::new(std::env::current_exe()?)
            .arg("__watchdog")
            .arg(&file)
            .arg(thaw)
            .arg(temp_image)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the thaw watchdog")?;
        let mut frozen = Frozen {
            freezer,
            watchdog: Some(watchdog),
            since: Instant::now(),
            monotonic_ns: 0,
            freezing: Duration::ZERO,
        };
        std::fs::write(&file, freeze).with_context(|| format!("freezing ({})", file.display()))?;
        let start = Instant::now();
        while !frozen.freezer.is_frozen()? {
            if start.elapsed() > timeout {
                bail!("cgroup did not freeze within {timeout:?}");
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        frozen.since = Instant::now();
        frozen.freezing = start.elapsed();
        frozen.monotonic_ns = crate::sys::monotonic_ns();
        Ok(frozen)
    }

    /// Thaws and returns how long the cgroup was frozen.
    pub fn thaw(mut self) -> Result<Duration> {
        let took = self.since.elapsed();
        self.freezer.thaw()?;
        self.release_watchdog();
        Ok(took)
    }

    fn release_watchdog(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            if let Some(mut stdin) = w.stdin.take() {
                let _ = stdin.write_all(b"done\n");
            }
            let _ = w.wait();
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if self.watchdog.is_some() {
            let _ = self.freezer.thaw();
            self.release_watchdog();
        }
    }
}

/// `ckpt-user __watchdog FILE THAW TEMP`: thaw and clean up unless told "done".
pub fn watchdog_main(file: &Path, thaw: &str, temp: &Path) -> ! {
    // SAFETY: ignoring signals in a single-threaded process.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    if line.trim() != "done" {
        let _ = std::fs::write(file, thaw);
        let _ = std::fs::remove_file(temp);
        eprintln!(
            "ckpt-user: dump interrupted: thawed {} and removed {}",
            file.display(),
            temp.display()
        );
    }
    std::process::exit(0)
}
