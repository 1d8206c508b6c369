//! Support for the integration tests: real agents, real lock-holding processes, and an
//! independent reading of /proc/locks to compare against.
//!
//! Every test runs as root against the live kernel and starts its own agent on its own
//! pin directory, so tests can run in parallel.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod criu;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

/// Directory holding ckpt-agent, ckpt-user and locker (set by `cargo xtask test`).
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("CKPT_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release"));
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built (run `cargo xtask test`)",
        p.display()
    );
    p
}

/// The image key the tests dump and restore with (`CKPT_IMAGE_KEY`): never a host's
/// real key (/var/lib/ckpt/image.key), and created by the first dump, so the suite
/// passes from a fresh clone where no key exists.
pub fn test_key() -> PathBuf {
    std::env::temp_dir().join("ckpt-tests").join("image.key")
}

/// `ckpt-user`, with the tests' image key.
pub fn ckpt_user_cmd() -> Command {
    let mut c = Command::new(bin("ckpt-user"));
    c.env("CKPT_IMAGE_KEY", test_key());
    c
}

pub fn require_root() {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    assert_eq!(uid, 0, "integration tests must run as root");
}

/// Polls `f` until it returns Some, or panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls (every millisecond, for up to 10 s) until process `pid` sleeps inside
/// fcntl(2) or flock(2), i.e. is blocked on a lock; returns when it saw it.
pub fn wait_blocked_on_lock(pid: u32) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
        let nr = syscall.split(' ').next().unwrap_or("");
        // x86-64: fcntl 72, flock 73.
        if (nr == "72" || nr == "73") && state == Some(Some('S')) {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "{pid} never blocked on a lock");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        let p = std::env::temp_dir().join(unique("ckpt-test"));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn file(&self, name: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, vec![b'x'; 4096]).unwrap();
        p.display().to_string()
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How /proc/locks names the file at `path`: "maj:min:inode", the device in hex.
pub fn proc_locks_id(path: &str) -> String {
    let md = std::fs::metadata(path).unwrap();
    format!(
        "{:02x}:{:02x}:{}",
        libc::major(md.dev()),
        libc::minor(md.dev()),
        md.ino()
    )
}

/// Waits until the lease on the file at `path` is being broken.
pub fn wait_for_breaking_lease(path: &str) {
    let id = proc_locks_id(path);
    wait_for(Duration::from_secs(5), "the lease to be breaking", || {
        std::fs::read_to_string("/proc/locks")
            .unwrap()
            .lines()
            .any(|l| l.contains("BREAKING") && l.split_whitespace().any(|w| w == id))
            .then_some(())
    });
}

/// Waits until /proc/locks shows the lease on the file at `path` breaking to `target`
/// (READ: a downgrade, UNLCK: removal).
pub fn wait_for_lease_breaking_to(path: &str, target: &str) {
    let id = proc_locks_id(path);
    wait_for(Duration::from_secs(15), "the lease's break", || {
        std::fs::read_to_string("/proc/locks")
            .unwrap()
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .any(|w| w.get(2..4) == Some(&["BREAKING", target][..]) && w.contains(&id.as_str()))
            .then_some(())
    });
}

/// `sh -c CMD`, which must succeed.
pub fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (dev "maj:min", inode) of a path, as ckpt-user prints them.
pub fn dev_ino(path: &str) -> (String, u64) {
    let m = std::fs::metadata(path).unwrap();
    (
        format!("{}:{}", libc::major(m.dev()), libc::minor(m.dev())),
        m.ino(),
    )
}

/// A running ckpt-agent on its own pin directory.
pub struct Agent {
    pub child: Option<Child>,
    pub pin_dir: PathBuf,
    pub log: PathBuf,
    /// Remove the pins on drop (not after kill -9: they must survive it).
    pub owns_pins: bool,
}

impl Agent {
    pub fn start() -> Agent {
        Agent::start_on(&PathBuf::from("/sys/fs/bpf").join(unique("ckpt-test")), &[])
    }

    /// Starts an agent on `pin_dir` and waits until it serves (instance lock held and
    /// maps pinned).
    pub fn start_on(pin_dir: &Path, extra: &[&str]) -> Agent {
        require_root();
        let log = std::env::temp_dir().join(format!("{}.log", unique("ckpt-agent")));
        let child = Command::new(bin("ckpt-agent"))
            .arg("--pin-dir")
            .arg(pin_dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawning ckpt-agent");
        let mut agent = Agent {
            child: Some(child),
            pin_dir: pin_dir.to_path_buf(),
            log,
            owns_pins: true,
        };
        wait_for(Duration::from_secs(30), "agent start", || {
            if let Some(status) = agent.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited early ({status}): {}", agent.log_text());
            }
            agent
                .log_text()
                .contains("deleted-but-open files scanned")
                .then_some(())
        });
        agent
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGKILL: no cleanup at all, pins stay.
    pub fn kill9(&mut self) {
        self.owns_pins = false;
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap().code()
    }

    /// `ckpt-user dump CGROUP -o IMAGE EXTRA...` against this agent: (code, stdout, stderr).
    pub fn dump(&self, cgroup: &Path, image: &str, extra: &[&str]) -> (i32, String, String) {
        let mut args = vec![
            "--pin-dir",
            self.pin_dir.to_str().unwrap(),
            "dump",
            cgroup.to_str().unwrap(),
            "-o",
            image,
        ];
        args.extend_from_slice(extra);
        ckpt_user(&args)
    }

    /// `ckpt-user locks --json` against this agent.
    pub fn locks(&self, args: &[&str]) -> Vec<Value> {
        let (v, _) = ckpt_locks(&self.pin_dir, args);
        v
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.owns_pins {
            remove_pins(&self.pin_dir);
        }
    }
}

pub fn remove_pins(pin_dir: &Path) {
    let _ = std::fs::remove_dir_all(pin_dir);
}

/// Runs `ckpt-user locks --json` and returns (rows, stderr).
pub fn ckpt_locks(pin_dir: &Path, args: &[&str]) -> (Vec<Value>, String) {
    let out = ckpt_user_cmd()
        .arg("--pin-dir")
        .arg(pin_dir)
        .arg("locks")
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "ckpt-user locks failed: {stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("ckpt-user locks --json is JSON");
    (v.as_array().expect("a JSON array").clone(), stderr)
}

/// A process that takes locks on command (see src/bin/locker.rs).
pub struct Locker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub forks: Vec<i32>,
}

impl Locker {
    pub fn spawn() -> Locker {
        Locker::spawn_with(|_| {})
    }

    pub fn spawn_with(setup: impl FnOnce(&mut Command)) -> Locker {
        let mut cmd = Command::new(bin("locker"));
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        setup(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Locker {
            child,
            stdin,
            stdout,
            forks: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a command without waiting for its reply (for blocking requests).
    pub fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
    }

    pub fn reply(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    /// Sends a command and returns its reply.
    pub fn try_cmd(&mut self, cmd: &str) -> String {
        self.send(cmd);
        self.reply()
    }

    /// Sends a command that must succeed.
    pub fn cmd(&mut self, cmd: &str) -> String {
        let r = self.try_cmd(cmd);
        assert!(r.starts_with("ok"), "locker `{cmd}` failed: {r}");
        r
    }

    pub fn fork(&mut self) -> i32 {
        let pid: i32 = self.cmd("fork")[3..].parse().unwrap();
        self.forks.push(pid);
        pid
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn kill(&mut self) {
        for f in self.forks.drain(..) {
            // SAFETY: killing and reaping our own children.
            unsafe { libc::kill(f, libc::SIGKILL) };
            // SAFETY: as above.
            unsafe { libc::waitpid(f, std::ptr::null_mut(), 0) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Locker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A held lock reduced to what both ckpt and /proc/locks can tell:
/// (kind, type, pid or None for OFD, dev, inode, start, end).
pub type Shape = (String, String, Option<i64>, String, u64, i64, i64);

/// Independent reading of /proc/locks: held locks, or with `blocked` the "->" rows.
fn proc_rows(blocked: bool) -> Vec<Shape> {
    let text = std::fs::read_to_string("/proc/locks").unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let mut t: Vec<&str> = line.split_whitespace().collect();
        let is_blocked = t.get(1) == Some(&"->");
        if is_blocked {
            t.remove(1);
        }
        if t.len() < 8 || is_blocked != blocked {
            continue;
        }
        let kind = match t[1] {
            "POSIX" => "posix",
            "OFDLCK" => "ofd",
            "FLOCK" => "flock",
            _ => continue,
        };
        let ty = match t[3] {
            "READ" => "read",
            "WRITE" => "write",
            _ => continue,
        };
        let pid: i64 = t[4].parse().unwrap();
        let d: Vec<&str> = t[5].split(':').collect();
        let dev = format!(
            "{}:{}",
            u32::from_str_radix(d[0], 16).unwrap(),
            u32::from_str_radix(d[1], 16).unwrap()
        );
        let ino: u64 = d[2].parse().unwrap();
        let start: i64 = t[6].parse().unwrap();
        let end: i64 = if t[7] == "EOF" {
            i64::MAX
        } else {
            t[7].parse().unwrap()
        };
        out.push((
            kind.into(),
            ty.into(),
            (kind != "ofd").then_some(pid),
            dev,
            ino,
            start,
            end,
        ));
    }
    out.sort();
    if blocked {
        // One request may show once per lock it hangs under only in our view: compare
        // the sets.
        out.dedup();
    }
    out
}

/// Held POSIX, OFD and flock locks in /proc/locks.
pub fn proc_shapes() -> Vec<Shape> {
    proc_rows(false)
}

/// Blocked requests in /proc/locks (the "->" rows), as a set.
pub fn proc_waiter_shapes() -> Vec<Shape> {
    proc_rows(true)
}

/// The blocked requests of `rows` (each waiter is listed under every lock it
/// conflicts with), as a set of shapes on their lock's file.
pub fn waiter_shapes(rows: &[Value]) -> Vec<Shape> {
    let mut v: Vec<Shape> = rows
        .iter()
        .flat_map(|r| {
            r["waiters"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|w| {
                    let kind = w["kind"].as_str()?.to_string();
                    (kind != "lease").then(|| {
                        (
                            kind.clone(),
                            w["type"].as_str().unwrap().to_string(),
                            if kind == "ofd" {
                                None
                            } else {
                                w["pid"].as_i64()
                            },
                            r["dev"].as_str().unwrap().to_string(),
                            r["inode"].as_u64().unwrap(),
                            w["start"].as_i64().unwrap(),
                            w["end"].as_i64().unwrap(),
                        )
                    })
                })
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

pub fn row_shape(r: &Value) -> Shape {
    let kind = r["kind"].as_str().unwrap().to_string();
    (
        kind.clone(),
        r["type"].as_str().unwrap().to_string(),
        if kind == "ofd" {
            None
        } else {
            r["pid"].as_i64()
        },
        r["dev"].as_str().unwrap().to_string(),
        r["inode"].as_u64().unwrap(),
        r["start"].as_i64().unwrap(),
        r["end"].as_i64().unwrap(),
    )
}

pub fn shapes(rows: &[Value]) -> Vec<Shape> {
    let mut v: Vec<Shape> = rows.iter().map(row_shape).collect();
    v.sort();
    v
}

/// Files as (dev "maj:min", inode): inode numbers alone repeat across filesystems.
pub type FileIds = BTreeSet<(String, u64)>;

/// The (dev, inode) of each path.
pub fn file_ids(paths: &[&str]) -> FileIds {
    paths.iter().map(|p| dev_ino(p)).collect()
}

/// Whether a JSON row is about one of `ids`.
pub fn row_on(r: &Value, ids: &FileIds) -> bool {
    ids.contains(&(
        r["dev"].as_str().unwrap_or("").to_string(),
        r["inode"].as_u64().unwrap_or(0),
    ))
}

/// Asserts that the agent's table and /proc/locks agree lock for lock on `files`
/// (all files when None). /proc/locks is read before and after the agent's table
/// and the check is retried while the kernel's state is moving.
pub fn assert_agrees(agent: &Agent, files: Option<&FileIds>) {
    assert_agrees_on(agent, |s| {
        files.is_none_or(|f| f.contains(&(s.3.clone(), s.4)))
    });
}

/// Like `assert_agrees`, for the locks `keep` selects: the held locks (kind, type,
/// range, inode, pid; OFD locks show pid -1 in /proc/locks) and the set of blocked
/// requests (the "->" rows, whatever their place in a tree) must be equal.
pub fn assert_agrees_on(agent: &Agent, keep: impl Fn(&Shape) -> bool) {
    assert_agrees_at(&agent.pin_dir, keep);
}

/// `assert_agrees_on` for `ckpt-user locks` with pin directory `pins` (an agent's, or
/// one where none runs).
pub fn assert_agrees_at(pins: &Path, keep: impl Fn(&Shape) -> bool) {
    let pick = |v: Vec<Shape>| v.into_iter().filter(|s| keep(s)).collect::<Vec<_>>();
    let mut last = None;
    for _ in 0..20 {
        let before = (pick(proc_shapes()), pick(proc_waiter_shapes()));
        let rows = ckpt_locks(pins, &[]).0;
        let ours = (pick(shapes(&rows)), pick(waiter_shapes(&rows)));
        let after = (pick(proc_shapes()), pick(proc_waiter_shapes()));
        if before != after {
            continue;
        }
        if ours == before {
            return;
        }
        last = Some((ours, before));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ours, kernel) = last.expect("kernel lock state never settled");
    let diff = |a: &[Shape], b: &[Shape]| -> Vec<Shape> {
        a.iter().filter(|s| !b.contains(s)).cloned().collect()
    };
    panic!(
        "ckpt-user locks disagrees with /proc/locks\nheld, missing: {:#?}\nheld, only ours: {:#?}\nwaiters, missing: {:#?}\nwaiters, only ours: {:#?}",
        diff(&kernel.0, &ours.0),
        diff(&ours.0, &kernel.0),
        diff(&kernel.1, &ours.1),
        diff(&ours.1, &kernel.1)
    );
}

/// Sets /proc/sys/fs/lease-break-time for one test and restores it afterwards. Tests
/// that change it are serialised through this guard (they share one process).
pub struct LeaseBreakTime {
    old: String,
    _serial: std::sync::MutexGuard<'static, ()>,
}

static LEASE_SYSCTL: std::sync::Mutex<()> = std::sync::Mutex::new(());
const LEASE_BREAK_TIME: &str = "/proc/sys/fs/lease-break-time";

/// The lock ckpt-user's restores take turns through to change the sysctl.
pub const LEASE_BREAK_TIME_LOCK: &str = "/run/ckpt/lease-break-time.lock";

/// Runs `f` holding the restores' lock, so that a test's change of the sysctl never
/// lands inside another process's restore (which would take it for the host's value).
fn with_restore_lock<T>(f: impl FnOnce() -> T) -> T {
    let _ = std::fs::create_dir_all("/run/ckpt");
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(LEASE_BREAK_TIME_LOCK)
        .ok();
    // SAFETY: plain flock on our own fd; released when it is closed.
    if let Some(l) = &lock {
        // SAFETY: plain flock on our own fd; released when it is closed.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(l), libc::LOCK_EX) };
    }
    let r = f();
    drop(lock);
    r
}

impl LeaseBreakTime {
    pub fn set(secs: u32) -> LeaseBreakTime {
        let serial = LEASE_SYSCTL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = with_restore_lock(|| {
            let old = std::fs::read_to_string(LEASE_BREAK_TIME).unwrap();
            std::fs::write(LEASE_BREAK_TIME, secs.to_string()).unwrap();
            old
        });
        LeaseBreakTime {
            old,
            _serial: serial,
        }
    }
}

impl Drop for LeaseBreakTime {
    fn drop(&mut self) {
        with_restore_lock(|| {
            let _ = std::fs::write(LEASE_BREAK_TIME, self.old.trim());
        });
    }
}

/// fs.lease-break-time now.
pub fn lease_break_time() -> u32 {
    std::fs::read_to_string(LEASE_BREAK_TIME)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A private tracefs instance with one event enabled: the kernel's own record of what
/// it did, to compare ckpt's view against.
pub struct TraceInstance {
    dir: PathBuf,
    event: String,
}

impl TraceInstance {
    /// `event` like "filelock/time_out_leases".
    pub fn new(event: &str) -> TraceInstance {
        let root = Path::new("/sys/kernel/tracing");
        if !root.join("instances").exists() {
            let _ = Command::new("mount")
                .args(["-t", "tracefs", "nodev"])
                .arg(root)
                .status();
        }
        let dir = root.join("instances").join(unique("ckpt-test"));
        std::fs::create_dir(&dir).expect("creating a tracefs instance");
        std::fs::write(dir.join("events").join(event).join("enable"), "1").unwrap();
        TraceInstance {
            dir,
            event: event.to_string(),
        }
    }

    /// The trace text so far.
    pub fn text(&self) -> String {
        std::fs::read_to_string(self.dir.join("trace")).unwrap()
    }

    /// Every value of `field=` in lines mentioning `ino=0x<ino>`.
    pub fn values(&self, ino: u64, field: &str) -> Vec<u64> {
        let ino_tag = format!("ino=0x{ino:x} ");
        let key = format!("{field}=");
        self.text()
            .lines()
            .filter(|l| l.contains(&ino_tag))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(&key))
                    .and_then(|v| v.parse().ok())
            })
            .collect()
    }
}

impl Drop for TraceInstance {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.dir.join("events").join(&self.event).join("enable"),
            "0",
        );
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// CLOCK_MONOTONIC now (the clock of ckpt's `*_monotonic_ns` fields).
pub fn mono_ns() -> u64 {
    // SAFETY: an all-zero timespec is valid.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall into a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A cgroup for a test: cgroup2 when available (`v1` picks the v1 freezer hierarchy),
/// thawed and removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
    pub name: String,
}

impl Cgroup {
    pub fn new(v1: bool) -> Cgroup {
        let roots: &[&str] = if v1 {
            &["/sys/fs/cgroup/freezer"]
        } else {
            &["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        };
        let root = roots
            .iter()
            .find(|r| {
                Path::new(r).join("cgroup.procs").exists()
                    && (v1 || !Path::new(r).join("freezer.state").exists())
            })
            .expect("no suitable cgroup hierarchy");
        let name = unique("ckpt-cg");
        let path = Path::new(root).join(&name);
        std::fs::create_dir(&path).unwrap();
        Cgroup { path, name }
    }

    pub fn add(&self, pid: u32) {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string()).unwrap();
    }

    /// Whether the cgroup is frozen right now.
    pub fn frozen(&self) -> bool {
        if let Ok(e) = std::fs::read_to_string(self.path.join("cgroup.events")) {
            return e.lines().any(|l| l.trim() == "frozen 1");
        }
        std::fs::read_to_string(self.path.join("freezer.state"))
            .unwrap_or_default()
            .trim()
            != "THAWED"
    }

    /// Lockers started inside the cgroup.
    pub fn locker(&self) -> Locker {
        let l = Locker::spawn();
        self.add(l.pid());
        l
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.freeze"), "0");
        let _ = std::fs::write(self.path.join("freezer.state"), "THAWED");
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
                // SAFETY: killing the test's own processes in its own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs `ckpt-user ARGS` and returns (exit code, stdout, stderr).
pub fn ckpt_user(args: &[&str]) -> (i32, String, String) {
    ckpt_user_env(args, &[])
}

/// `ckpt_user` with extra environment variables.
pub fn ckpt_user_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = ckpt_user_cmd()
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Scratch filesystems for tests that must hold on every filesystem: ext4, XFS and
/// btrfs on loop-mounted image files, and a tmpfs. Unmounted and removed on drop.
pub struct Filesystems {
    pub mounts: Vec<(&'static str, PathBuf)>,
    _dir: Scratch,
}

impl Filesystems {
    pub fn new() -> Filesystems {
        let dir = Scratch::new();
        let mut mounts = Vec::new();
        for (fs, mkfs) in [
            ("ext4", &["mkfs.ext4", "-q", "-F"][..]),
            ("xfs", &["mkfs.xfs", "-q", "-f"][..]),
            ("btrfs", &["mkfs.btrfs", "-q", "-f"][..]),
            ("tmpfs", &[][..]),
        ] {
            let mnt = dir.0.join(fs);
            std::fs::create_dir(&mnt).unwrap();
            let ok = if fs == "tmpfs" {
                Command::new("mount")
                    .args(["-t", "tmpfs", "tmpfs"])
                    .arg(&mnt)
                    .status()
                    .unwrap()
                    .success()
            } else {
                let img = dir.0.join(format!("{fs}.img"));
                // XFS wants at least 300 MiB; the file is sparse.
                std::fs::File::create(&img)
                    .unwrap()
                    .set_len(320 << 20)
                    .unwrap();
                let made = Command::new(mkfs[0])
                    .args(&mkfs[1..])
                    .arg(&img)
                    .stdout(Stdio::null())
                    .status()
                    .unwrap_or_else(|e| panic!("{}: {e} (cargo xtask setup installs it)", mkfs[0]))
                    .success();
                made && Command::new("mount")
                    .args(["-o", "loop"])
                    .arg(&img)
                    .arg(&mnt)
                    .status()
                    .unwrap()
                    .success()
            };
            assert!(ok, "cannot make and mount a {fs} filesystem");
            mounts.push((fs, mnt));
        }
        Filesystems { mounts, _dir: dir }
    }
}

impl Default for Filesystems {
    fn default() -> Self {
        Filesystems::new()
    }
}

impl Drop for Filesystems {
    fn drop(&mut self) {
        for (_, m) in &self.mounts {
            let _ = Command::new("umount").arg(m).status();
        }
    }
}

/// The (offset, length) data extents of a deleted file's `ghosts[i]` JSON entry.
pub fn ghost_extents(ghost: &Value) -> Vec<(u64, u64)> {
    ghost["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_u64().unwrap(), e[1].as_u64().unwrap()))
        .collect()
}

/// `len` bytes at offset `at` of a deleted file stored in image file `img`, from its
/// `ghosts[i]` JSON entry (extents are stored back to back from `data_offset`). None if
/// no stored extent covers them (a hole).
pub fn ghost_bytes(img: &str, ghost: &Value, at: u64, len: usize) -> Option<Vec<u8>> {
    let bytes = std::fs::read(img).unwrap();
    let mut stored = ghost["data_offset"].as_u64().unwrap() as usize;
    for (off, elen) in ghost_extents(ghost) {
        if off <= at && at + len as u64 <= off + elen {
            let i = stored + (at - off) as usize;
            return Some(bytes[i..i + len].to_vec());
        }
        stored += elen as usize;
    }
    None
}

/// A locker restored by `ckpt-user restore` and started with `locker --listen PATH`:
/// driven over its socket like a `Locker` over its pipes.
pub struct RemoteLocker {
    out: std::os::unix::net::UnixStream,
    input: BufReader<std::os::unix::net::UnixStream>,
}

impl RemoteLocker {
    /// Connects to the locker listening at `path` (waiting for it to start).
    pub fn connect(path: &str) -> RemoteLocker {
        let out = wait_for(
            Duration::from_secs(10),
            "the restored locker to listen",
            || std::os::unix::net::UnixStream::connect(path).ok(),
        );
        let input = BufReader::new(out.try_clone().unwrap());
        RemoteLocker { out, input }
    }

    pub fn send(&mut self, cmd: &str) {
        writeln!(self.out, "{cmd}").unwrap();
        self.out.flush().unwrap();
    }

    pub fn reply(&mut self) -> String {
        let mut line = String::new();
        self.input.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    pub fn cmd(&mut self, cmd: &str) -> String {
        self.send(cmd);
        let r = self.reply();
        assert!(r.starts_with("ok"), "restored locker `{cmd}` failed: {r}");
        r
    }
}

/// Runs `ckpt-user restore ARGS` with stdin from /dev/null and stdout/stderr in files
/// (the restored processes inherit them, so pipes would never reach end of file).
/// Returns (exit code, stdout, stderr).
pub fn run_restore(args: &[&str]) -> (i32, String, String) {
    let dir = Scratch::new();
    let out = std::fs::File::create(dir.0.join("out")).unwrap();
    let err = std::fs::File::create(dir.0.join("err")).unwrap();
    let status = ckpt_user_cmd()
        .arg("restore")
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .unwrap();
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(dir.0.join("out")).unwrap(),
        std::fs::read_to_string(dir.0.join("err")).unwrap(),
    )
}

/// The pids in a cgroup right now.
pub fn cgroup_pids(cg: &Cgroup) -> Vec<u32> {
    std::fs::read_to_string(cg.path.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

/// (pos, flags) from /proc/PID/fdinfo/FD.
pub fn fdinfo(pid: u32, fd: i32) -> (u64, u64) {
    let t = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
    let field = |name: &str| {
        t.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap()
    };
    (
        field("pos:").parse().unwrap(),
        u64::from_str_radix(&field("flags:"), 8).unwrap(),
    )
}

/// The new pid of image process `old` in a restore's JSON report.
pub fn new_pid(report: &serde_json::Value, old: u32) -> u32 {
    report["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["old_pid"] == old)
        .unwrap()["pid"]
        .as_u64()
        .unwrap() as u32
}

/// A free TCP port on the loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET http://127.0.0.1:PORT/PATH: the whole reply (status line, headers, body), or
/// None when nothing listens.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    Some(reply)
}
