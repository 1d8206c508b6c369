//! Freezing a cgroup for the dump and — whatever happens — thawing it again and
//! leaving no temporary image behind.
//!
//! v2: `cgroup.freeze` and the `frozen` key of `cgroup.events`; v1: the freezer
//! controller's `freezer.state`. Before anything is created (the temporary image
//! included), a [`Watchdog`] process is started outside the cgroup (`ckpt-user
//! __watchdog`, its own process group so a terminal's Ctrl-C does not reach it). It
//! reads lines from a pipe: `thawed` (we thawed the cgroup ourselves), then `done` (the
//! image was renamed into place, or we removed the temporary ourselves). End of file
//! before `done` means we died (SIGINT, SIGTERM, panic, even SIGKILL): the watchdog
//! thaws the cgroup unless told `thawed`, and removes the temporary image if it exists.

use std::{
    collections::BTreeSet,
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
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

/// The dump's guardian process (see the module's doc). Dropping it without
/// [`Watchdog::done`] also says `done` (our own clean-up ran: drops run in reverse
/// order, so declare it before the writer and the freeze); only a dumper that dies
/// without unwinding leaves the watchdog to clean up.
pub struct Watchdog {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl Watchdog {
    /// Starts the watchdog for `freezer`'s cgroup and the temporary image `temp`
    /// (which need not exist yet).
    pub fn start(freezer: &Freezer, temp: &Path) -> Result<Watchdog> {
        let (file, _, thaw) = freezer.control();
        let mut child = Command::new(std::env::current_exe()?)
            .arg("__watchdog")
            .arg(&file)
            .arg(thaw)
            .arg(temp)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the thaw watchdog")?;
        let pipe = child.stdin.take();
        Ok(Watchdog { child, pipe })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn say(&mut self, what: &str) {
        if let Some(p) = &mut self.pipe {
            let _ = writeln!(p, "{what}");
        }
    }

    /// We thawed the cgroup: the watchdog must not thaw it later (it may have been
    /// frozen again by someone else by then).
    pub fn thawed(&mut self) {
        self.say("thawed");
    }

    /// The image is in place (or its temporary removed): nothing is left to clean.
    pub fn done(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        self.say("done");
        self.pipe = None;
        let _ = self.child.wait();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The processes `pid` descends from (itself first), up to and including pid 1.
pub fn lineage(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut at = pid;
    while at > 1 && out.len() < 4096 {
        let Ok(ppid) = procfs::process::Process::new(at as i32)
            .and_then(|p| p.stat())
            .map(|s| s.ppid.max(0) as u32)
        else {
            break;
        };
        if ppid == 0 {
            break;
        }
        out.push(ppid);
        at = ppid;
    }
    out
}

/// Refuses to freeze a cgroup that holds this dump, one of its ancestors (a frozen
/// parent shell or sudo would hang the session that waits for it) or its watchdog.
pub fn refuse_self_freeze(dir: &Path, pids: &BTreeSet<u32>, watchdog: Option<u32>) -> Result<()> {
    let me = std::process::id();
    for (i, pid) in lineage(me).into_iter().enumerate() {
        if pids.contains(&pid) {
            let who = if i == 0 {
                format!("this ckpt-user (pid {pid})")
            } else {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                format!("its ancestor process {pid} ({})", comm.trim())
            };
            bail!(
                "cgroup {} contains {who}: the dump would freeze itself; run ckpt-user dump from outside the cgroup",
                dir.display()
            );
        }
    }
    if let Some(w) = watchdog.filter(|w| pids.contains(w)) {
        bail!(
            "cgroup {} contains the dump's watchdog (pid {w}); nothing was frozen",
            dir.display()
        );
    }
    Ok(())
}

/// A frozen cgroup. Thawed by [`Frozen::thaw`], on drop, or by the watchdog.
pub struct Frozen {
    freezer: Freezer,
    thawed: bool,
    pub since: Instant,
    /// CLOCK_MONOTONIC when the cgroup was frozen.
    pub monotonic_ns: u64,
    /// From the freeze request until every task was frozen (the first tasks stop
    /// this much before the window starts).
    pub freezing: Duration,
}

impl Frozen {
    /// Freezes and waits until every task is frozen (a [`Watchdog`] must be running).
    pub fn freeze(freezer: Freezer, timeout: Duration) -> Result<Frozen> {
        let (file, freeze, _) = freezer.control();
        let mut frozen = Frozen {
            freezer,
            thawed: false,
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
        self.thawed = true;
        self.freezer.thaw()?;
        Ok(took)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.thawed {
            let _ = self.freezer.thaw();
        }
    }
}

/// What the watchdog must still do when its pipe ends: (thaw, remove the temporary).
pub fn watchdog_duties(lines: &str) -> (bool, bool) {
    let mut thaw = true;
    for l in lines.lines().map(str::trim) {
        match l {
            "thawed" => thaw = false,
            "done" => return (false, false),
            _ => {}
        }
    }
    (thaw, true)
}

/// `ckpt-user __watchdog FILE THAW TEMP`: thaw and clean up unless told "done".
pub fn watchdog_main(file: &Path, thaw: &str, temp: &Path) -> ! {
    // SAFETY: ignoring signals in a single-threaded process.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    let mut lines = String::new();
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
        lines.push_str(&line);
        if line.trim() == "done" {
            break;
        }
        line.clear();
    }
    let (thaw_it, remove) = watchdog_duties(&lines);
    let mut did = Vec::new();
    if thaw_it && std::fs::write(file, thaw).is_ok() {
        did.push(format!("thawed {}", file.display()));
    }
    if remove && std::fs::remove_file(temp).is_ok() {
        did.push(format!("removed {}", temp.display()));
    }
    if !did.is_empty() {
        eprintln!("ckpt-user: dump interrupted: {}", did.join(" and "));
    }
    std::process::exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_cleans_up_unless_told_done() {
        assert_eq!(watchdog_duties(""), (true, true));
        // Killed after the thaw, while writing: only the temporary is left to remove.
        assert_eq!(watchdog_duties("thawed\n"), (false, true));
        assert_eq!(watchdog_duties("thawed\ndone\n"), (false, false));
        assert_eq!(watchdog_duties("done\n"), (false, false));
    }

    #[test]
    fn our_lineage_starts_with_us_and_ends_at_init() {
        let l = lineage(std::process::id());
        assert_eq!(l[0], std::process::id());
        assert!(l.len() >= 2);
        assert!(l.contains(&nix::unistd::getppid().as_raw().try_into().unwrap()));
    }
}
