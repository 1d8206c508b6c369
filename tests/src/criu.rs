//! CRIU's side of the tests (tests/tests/criu.rs, and the migration through CRIU in
//! tests/tests/migrate.rs): running `criu dump` and `criu restore` with or without
//! ckpt's plugin, and the seed scenario (a lease holder and its blocked breaker) whose
//! logs tell when the lease was revoked after a restore.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::*;

/// A directory holding ckpt's plugin as CRIU's `--libdir` (CRIU loads every `*.so`).
pub fn plugin_dir(scratch: &Scratch) -> PathBuf {
    let dir = scratch.0.join("criu-lib");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(bin("libckpt_criu_plugin.so"), dir.join("ckpt.so")).unwrap();
    dir
}

/// `criu dump` of the tree of `pid`, killed after it (CRIU's default); the log on
/// failure. `libdir`: CRIU's plugin directory (an empty one: CRIU alone).
pub fn criu_dump(
    pid: u32,
    images: &Path,
    libdir: &Path,
    pins: Option<&Path>,
) -> std::process::Output {
    criu_dump_with(pid, images, libdir, pins, &[])
}

/// `criu_dump` with more of CRIU's options.
pub fn criu_dump_with(
    pid: u32,
    images: &Path,
    libdir: &Path,
    pins: Option<&Path>,
    extra: &[&str],
) -> std::process::Output {
    std::fs::create_dir_all(images).unwrap();
    let mut cmd = Command::new("criu");
    cmd.args([
        "dump",
        "-t",
        &pid.to_string(),
        "--file-locks",
        "--file-validation",
        "filesize",
    ])
    .args(extra);
    run_criu(cmd, images, libdir, pins, "dump")
}

/// `criu restore` of the images in `images`, detached (the tree runs on, under the
/// nearest subreaper).
pub fn criu_restore(images: &Path, libdir: &Path) -> std::process::Output {
    criu_restore_with(images, libdir, None)
}

/// `criu_restore`, the plugin finding ckpt-agent's pins at `pins`.
pub fn criu_restore_with(
    images: &Path,
    libdir: &Path,
    pins: Option<&Path>,
) -> std::process::Output {
    // CRIU does not overwrite a pidfile (a second restore of the same images).
    let _ = std::fs::remove_file(images.join("restored.pid"));
    let mut cmd = Command::new("criu");
    cmd.args(["restore", "--file-locks", "-d", "--pidfile"])
        .arg(images.join("restored.pid"));
    run_criu(cmd, images, libdir, pins, "restore")
}

pub fn run_criu(
    mut cmd: Command,
    images: &Path,
    libdir: &Path,
    pins: Option<&Path>,
    what: &str,
) -> std::process::Output {
    let log = format!("{what}.log");
    let out = cmd
        .args(["-v4", "-o", &log])
        .arg("-D")
        .arg(images)
        .arg("-L")
        .arg(libdir)
        // Where the plugin finds ckpt-agent's records.
        .envs(pins.map(|p| ("CKPT_PIN_DIR", p)))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running criu");
    eprintln!(
        "criu {what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        let log = std::fs::read_to_string(images.join(&log)).unwrap_or_default();
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .filter(|l| !l.starts_with("pie:"))
            .take(40)
            .collect();
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("Error")).collect();
        panic!(
            "criu {what} failed ({}): {}\n{}\nlog errors:\n{}\nlog (last lines, newest first):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            errors.join("\n"),
            tail.join("\n")
        );
    }
    out
}

/// Starts `cmd` in its own session with its stdio on /dev/null: nothing CRIU would
/// have to dump outside the tree.
pub fn alone(mut cmd: Command) -> std::process::Child {
    use std::os::unix::process::CommandExt as _;
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd.spawn().unwrap()
}

/// What a CRIU test sets up: root; this process as the subreaper (orphans of the
/// dumped trees come to it, which reaps them so that a restore finds their pids
/// free, and the detached restored trees too); fs.lease-break-time at `lbt` while
/// the guard lives; a scratch directory and a plugin directory in it.
pub fn criu_test(lbt: Option<u32>) -> (Option<LeaseBreakTime>, Scratch, PathBuf) {
    require_root();
    // SAFETY: plain prctl.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let guard = lbt.map(LeaseBreakTime::set);
    let scratch = Scratch::new();
    let plugin = plugin_dir(&scratch);
    (guard, scratch, plugin)
}

/// The seed scenario's shell script: `locker` holds a `lease` (r or w) on `file` and
/// logs to `holder_log`; once it has, a second `locker` opens `file` (`breaker`: r or
/// w) and logs to `breaker_log`.
pub fn seed_script(
    locker: &Path,
    file: &Path,
    lease: &str,
    breaker: &str,
    holder_log: &Path,
    breaker_log: &Path,
) -> String {
    format!(
        "{l} --hold-lease {f} {lease} {h} & while [ ! -s {h} ]; do sleep 0.01; done; {l} --break {f} {breaker} {b} & wait",
        l = locker.display(),
        f = file.display(),
        h = holder_log.display(),
        b = breaker_log.display()
    )
}

/// Where a seed scenario keeps its logs and CRIU's images, and what they tell: the
/// same paths on every node the scenario is carried to.
pub struct SeedFiles {
    pub holder_log: PathBuf,
    pub breaker_log: PathBuf,
    pub images: PathBuf,
}

/// One side of the seed scenario: a holder of a write lease that keeps running and
/// logging, and a breaker blocked in open(O_WRONLY), both children of one shell.
pub struct Seed {
    pub files: SeedFiles,
    /// Our child: the shell, or the wrapper that runs it in a new pid namespace.
    shell: std::process::Child,
    /// The tree's root (what is dumped): the shell.
    pub root: u32,
    pub pids: Vec<u32>,
}

/// A seed reads its logs and images as its files do (`seed.recorded()`).
impl std::ops::Deref for Seed {
    type Target = SeedFiles;
    fn deref(&self) -> &SeedFiles {
        &self.files
    }
}

impl Seed {
    /// `lease`: the holder's lease, r or w; `breaker`: the breaker's open, r or w.
    pub fn start(scratch: &Scratch, name: &str, lease: &str, breaker: &str) -> Seed {
        Seed::start_in(scratch, name, lease, breaker, false)
    }

    /// `start`, the tree in its own pid namespace (`pidns`: the shell is its init).
    pub fn start_in(
        scratch: &Scratch,
        name: &str,
        lease: &str,
        breaker: &str,
        pidns: bool,
    ) -> Seed {
        let file = PathBuf::from(scratch.file(&format!("{name}-leased")));
        let files = SeedFiles::at(&scratch.0, name);
        let (holder_log, breaker_log) = (&files.holder_log, &files.breaker_log);
        let locker = bin("locker");
        let script = seed_script(&locker, &file, lease, breaker, holder_log, breaker_log);
        let cmd = if pidns {
            let mut c = Command::new(&locker);
            c.args(["--in-pidns", "sh", "-c", &script]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            c
        };
        let shell = alone(cmd);
        let root = if pidns {
            wait_for(
                std::time::Duration::from_secs(10),
                "the namespace's init",
                || {
                    let c =
                        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", shell.id()))
                            .ok()?;
                    c.split_whitespace().next()?.parse().ok()
                },
            )
        } else {
            shell.id()
        };
        let mut seed = Seed {
            files,
            shell,
            root,
            pids: Vec::new(),
        };
        seed.pids = wait_for(
            std::time::Duration::from_secs(10),
            "the holder and breaker",
            || {
                let c = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", seed.root))
                    .ok()?;
                // The two lockers (not the shell's `sleep`s).
                let pids: Vec<u32> = c
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .filter(|p| {
                        std::fs::read_to_string(format!("/proc/{p}/comm"))
                            .is_ok_and(|c| c.trim() == "locker")
                    })
                    .collect();
                (pids.len() == 2).then_some(pids)
            },
        );
        seed
    }

    /// Reaps what the dump killed: the pids must be free for the restore.
    pub fn reap(&mut self) {
        let _ = self.shell.wait();
        reap(&self.pids);
    }

    /// Kills the tree, and the restored tree (CRIU's pidfile) if there is one.
    pub fn kill(&self) {
        for &pid in &self.pids {
            // SAFETY: plain kill of a process this test made.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        self.files.kill_restored();
    }
}

impl SeedFiles {
    /// The files of seed `name` in `dir`.
    pub fn at(dir: &Path, name: &str) -> SeedFiles {
        SeedFiles {
            holder_log: dir.join(format!("{name}-holder.log")),
            breaker_log: dir.join(format!("{name}-breaker.log")),
            images: dir.join(format!("{name}-images")),
        }
    }

    /// Kills the tree CRIU restored (its root: in a pid namespace, its death ends the
    /// others).
    pub fn kill_restored(&self) {
        let restored: Option<u32> = std::fs::read_to_string(self.images.join("restored.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok());
        if let Some(pid) = restored {
            // SAFETY: plain kill of a process this test restored.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }

    pub fn holder(&self) -> Vec<(u64, String)> {
        log_lines(&self.holder_log)
    }

    /// When the holder first saw its lease breaking (its SIGIO came with it).
    pub fn break_seen(&self) -> Option<u64> {
        self.holder()
            .into_iter()
            .find(|(_, l)| l.starts_with("held"))
            .map(|(t, _)| t)
    }

    /// After a restore that began at `since` (CLOCK_REALTIME): when the holder resumed,
    /// when it saw its lease gone, and the breaker's open returning, all in the restored
    /// tree's CLOCK_MONOTONIC (CRIU gives it a time namespace that goes on from the
    /// dump).
    pub fn after_restore(&self, since: u64) -> (u64, Option<u64>, Option<u64>) {
        let lines = self.holder();
        let resumed = lines
            .iter()
            .find(|(_, l)| {
                l.strip_prefix("gap ")
                    .and_then(|g| g.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .is_some_and(|real| real > since)
            })
            .map(|(t, _)| *t)
            .unwrap_or_else(|| panic!("the holder never resumed: {lines:?}"));
        let revoked = lines
            .iter()
            .find(|(t, l)| *t >= resumed && l.starts_with("gone"))
            .map(|(t, _)| *t);
        let opened = log_lines(&self.breaker_log)
            .into_iter()
            .find(|(_, l)| l.starts_with("opened"))
            .map(|(t, _)| t);
        (resumed, revoked, opened)
    }

    /// The sidecar's time left for the lease and its own type.
    pub fn recorded(&self) -> (i64, u64, serde_json::Value) {
        let text = std::fs::read_to_string(self.images.join("ckpt-leases.json"))
            .expect("the plugin wrote no sidecar");
        eprintln!("sidecar: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["errors"], serde_json::json!([]), "{text}");
        let l = &v["leases"][0];
        (
            l["remaining_ns"].as_i64().unwrap(),
            v["taken_monotonic_ns"].as_u64().unwrap(),
            l.clone(),
        )
    }

    /// How long after the plugin's resume instant (`resume_monotonic_ns` of
    /// ckpt-restore.json, on this host's clock) the holder first ran (`resumed`: its
    /// first line after the resume, whose realtime stamp relates the restored time
    /// namespace to this host). CRIU resumes the tree as soon as the plugin's last hook
    /// returns (its log: ~2 ms); when the holder then runs is the scheduler's: 8 to 25
    /// ms later under TCG, where one host thread runs every vCPU. So deadlines are
    /// checked from the plugin's instant, and this lag only bounded (asserted here).
    pub fn resume_lag(&self, resumed: u64, report: &serde_json::Value) -> i64 {
        let real_of_resume = self
            .holder()
            .iter()
            .find(|(t, _)| *t == resumed)
            .and_then(|(_, l)| l.split_whitespace().nth(2)?.parse::<i64>().ok())
            .expect("the holder's first line after the resume has its realtime stamp");
        let offset = real_ns() as i64 - mono_ns() as i64;
        let go = report["resume_monotonic_ns"]
            .as_i64()
            .expect("the report has the plugin's resume instant");
        let lag = real_of_resume - (go + offset);
        eprintln!(
            "the holder resumed {:.1} ms after the instant the plugin timed the break from",
            ms(lag)
        );
        assert!(
            (-5_000_000..=100_000_000).contains(&lag),
            "the holder first ran {:.1} ms after the plugin's resume instant",
            ms(lag)
        );
        lag
    }

    /// Restored through CRIU with the plugin (from `since`, CLOCK_REALTIME), `left`
    /// having been recorded: the plugin restored it as it was and checked it, the kernel
    /// revoked or downgraded it `left` after the plugin's resume instant (±20 ms; see
    /// `resume_lag`), the breaker got through with it, and the holder got no second
    /// SIGIO.
    pub fn assert_kept_its_time(&self, since: u64, left: i64) {
        let report_text = std::fs::read_to_string(self.images.join("ckpt-restore.json"))
            .expect("the plugin wrote no ckpt-restore.json");
        eprintln!("report: {report_text}");
        let report: serde_json::Value = serde_json::from_str(&report_text).unwrap();
        assert_eq!(report["errors"], serde_json::json!([]), "{report_text}");
        assert_eq!(
            report["differences"],
            serde_json::json!([]),
            "{report_text}"
        );
        assert_eq!(report["policy"], "exact");
        // inspect shows the sidecar and, after it, the restore.
        let (code, shown, err) = ckpt_user(&["inspect", self.images.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        assert!(
            shown.contains(
                "CRIU restore with the ckpt plugin (policy exact): 1 leases broken again"
            ) && shown.contains("s left at resume"),
            "{shown}"
        );
        assert!(
            !self.images.join("ckpt-filelocks.orig.img").exists(),
            "the dumped filelocks.img is back in place"
        );
        let (resumed, revoked, opened) = self.after_restore(since);
        eprintln!("holder: {:?}", self.holder());
        // CRIU's work after the plugin's last hook, seen from outside: the holder's
        // first realtime stamp after the resume against the plugin's instant.
        let lag = self.resume_lag(resumed, &report);
        let log = std::fs::read_to_string(self.images.join("restore.log")).unwrap_or_default();
        let from = log.find("ckpt CRIU plugin").unwrap_or(log.len());
        eprintln!(
            "restore.log from the plugin on:\n{}",
            &log[from.saturating_sub(200)..]
        );
        let revoked = revoked.expect("with the plugin, the lease's break never ended");
        let after = revoked as i64 - resumed as i64;
        eprintln!(
            "with the plugin: the break ended {:.1} ms after the resume; it had {:.1} ms left at the dump",
            ms(after),
            ms(left)
        );
        let from_go = lag + after;
        assert!(
            (from_go - left).abs() <= 20_000_000,
            "ended {:.1} ms after the plugin's resume instant ({:.1} after the holder first ran), {:.1} ms expected",
            ms(from_go),
            ms(after),
            ms(left)
        );
        let opened = opened.expect("the breaker never got through");
        assert!(
            (opened as i64 - revoked as i64).abs() <= 20_000_000,
            "the breaker got through at {opened}, the break ended at {revoked}"
        );
        // One SIGIO, at the original break; none from the restore.
        assert!(
            self.holder()
                .iter()
                .all(|(_, l)| l.starts_with("gap") || l.ends_with(" 1") || l.ends_with(" 0")),
            "{:?}",
            self.holder()
        );
    }
}

pub fn log_lines(path: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (t, rest) = l.split_once(' ')?;
            Some((t.parse().ok()?, rest.to_string()))
        })
        .collect()
}

pub fn real_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

pub fn ms(ns: i64) -> f64 {
    ns as f64 / 1e6
}

/// Reaps (as the subreaper) processes a dump or a test killed: their pids must be
/// free for the next restore.
pub fn reap(pids: &[u32]) {
    for &pid in pids {
        wait_for(
            std::time::Duration::from_secs(10),
            "a killed process to go",
            || {
                // SAFETY: reaping a child of this subreaper, if it is one.
                unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
                (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
            },
        );
    }
}
