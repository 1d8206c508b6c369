//! `cargo xtask bench`: what ckpt costs and how fast it is, side by side with the
//! alternatives, as medians (min-max) of interleaved runs, written to BENCHMARKS.md
//! (one section per part; `--only PART` rewrites just that section). A command, not a
//! test: a slow shared machine never fails anything here.

mod chart;
mod criu_plugin;
mod dump;
mod tracer;
mod views;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{build_release, is_root, output, workspace};

/// What every part gets.
pub struct Ctx {
    pub runs: usize,
    /// Release binaries: ckpt-agent, ckpt-user, locker.
    pub bins: PathBuf,
}

/// (part name, section title, runner)
type Part = (&'static str, &'static str, fn(&Ctx) -> Result<String>);

const PARTS: &[Part] = &[
    ("dump", "Dump: frozen window and total time", dump::run),
    (
        "tracer",
        "Tracer overhead: no tracer, ckpt-agent, bpftrace, empty programs",
        tracer::run,
    ),
    (
        "views",
        "Observability: ckpt-user vs lslocks and lsof",
        views::run,
    ),
    (
        "criu-plugin",
        "CRIU plugin: its work at the end of a dump",
        criu_plugin::run,
    ),
];

pub fn run(runs: usize, only: Option<&str>) -> Result<()> {
    if !is_root() {
        bail!("the benchmark loads eBPF programs and creates cgroups: run it as root");
    }
    if let Some(o) = only {
        if !PARTS.iter().any(|(n, ..)| *n == o) {
            bail!(
                "no bench part {o:?} (parts: {})",
                PARTS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
            );
        }
    }
    raise_fd_limit();
    let ctx = Ctx {
        runs,
        bins: build_release()?,
    };
    let path = workspace().join("BENCHMARKS.md");
    let mut sections = read_sections(&std::fs::read_to_string(&path).unwrap_or_default());
    for (name, title, part) in PARTS {
        if only.is_some_and(|o| o != *name) {
            continue;
        }
        println!("bench: {title}");
        // Parts run at different times with different counts: each says its own.
        let body = format!(
            "Median (min-max) of {runs} interleaved runs, {}.\n\n{}",
            today(),
            part(&ctx)?.trim_start()
        );
        match sections.iter_mut().find(|(t, _)| t == title) {
            Some(s) => s.1 = body,
            None => sections.push((title.to_string(), body)),
        }
    }
    // Sections in the order of PARTS, then any others kept as they were.
    sections.sort_by_key(|(t, _)| PARTS.iter().position(|p| p.1 == t).unwrap_or(usize::MAX));
    let kernel = output(Command::new("uname").arg("-r")).unwrap_or_default();
    let cpus = output(&mut Command::new("nproc")).unwrap_or_default();
    let mut doc = format!(
        "# ckpt benchmarks\n\nMachine: {} CPUs, Linux {}. Each section gives its number of runs and its date.\n",
        cpus.trim(),
        kernel.trim(),
    );
    for (title, body) in &sections {
        doc.push_str(&format!("\n## {title}\n\n{}", body.trim_start()));
        if !doc.ends_with('\n') {
            doc.push('\n');
        }
    }
    std::fs::write(&path, doc)?;
    println!("bench: wrote {}", path.display());
    Ok(())
}

fn today() -> String {
    output(Command::new("date").args(["-u", "+%Y-%m-%d"]))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `## title` sections of an existing BENCHMARKS.md.
fn read_sections(doc: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for block in doc.split("\n## ").skip(1) {
        let (title, body) = block.split_once('\n').unwrap_or((block, ""));
        out.push((title.trim().to_string(), body.to_string()));
    }
    out
}

/// A workload process (the tests' `locker`), in a cgroup or not.
pub struct Worker {
    pub child: Child,
    /// Started inside the measured cgroup.
    pub in_cgroup: bool,
    stdin: ChildStdin,
    /// None once `silence`d.
    stdout: Option<BufReader<ChildStdout>>,
}

impl Worker {
    pub fn spawn(locker: &Path, cgroup: Option<&Path>) -> Result<Worker> {
        let mut child = Command::new(locker)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a workload process")?;
        if let Some(cg) = cgroup {
            std::fs::write(cg.join("cgroup.procs"), child.id().to_string())?;
        }
        let stdin = child.stdin.take().unwrap();
        let stdout = Some(BufReader::new(child.stdout.take().unwrap()));
        Ok(Worker {
            child,
            in_cgroup: cgroup.is_some(),
            stdin,
            stdout,
        })
    }

    pub fn cmd(&mut self, c: &str) -> Result<()> {
        writeln!(self.stdin, "{c}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout
            .as_mut()
            .context("the workload's replies were closed")?
            .read_line(&mut line)?;
        if !line.starts_with("ok") {
            bail!("workload `{c}` failed: {line}");
        }
        Ok(())
    }

    /// Closes our end of its replies; it keeps running, waiting for commands that will
    /// not come. For benches with more workers than the fd limit (20,000 here, which
    /// root cannot raise without CAP_SYS_RESOURCE) allows two pipes each.
    pub fn silence(&mut self) {
        self.stdout = None;
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds one of `package`'s examples (the benches' floors and drivers); returns its
/// path.
pub fn build_example(package: &str, name: &str) -> Result<PathBuf> {
    crate::util::sh(Command::new("cargo").current_dir(workspace()).args([
        "build",
        "--release",
        "-p",
        package,
        "--example",
        name,
    ]))?;
    Ok(workspace().join("target/release/examples").join(name))
}

/// Starts ckpt-agent on `pin_dir` (pins removed on exit) and waits until it serves.
pub fn start_agent(bins: &Path, pin_dir: &str) -> Result<Child> {
    start_agent_with(bins, pin_dir, &[])
}

/// `start_agent` with more ckpt-agent arguments.
pub fn start_agent_with(bins: &Path, pin_dir: &str, extra: &[&str]) -> Result<Child> {
    let _ = std::fs::remove_dir_all(pin_dir);
    let log = std::env::temp_dir().join("ckpt-bench-agent.log");
    let mut agent = Command::new(bins.join("ckpt-agent"))
        .args(["--pin-dir", pin_dir, "--unpin"])
        .args(extra)
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)?.contains("deleted-but-open files scanned") {
        if Instant::now() > deadline || agent.try_wait()?.is_some() {
            let _ = agent.kill();
            bail!(
                "agent did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(agent)
}

/// SIGTERM, then wait: the agent removes its pins.
pub fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

fn raise_fd_limit() {
    // SAFETY: plain get/setrlimit on locals.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

pub fn cgroup_root() -> Result<PathBuf> {
    for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if Path::new(root).join("cgroup.procs").exists()
            && !Path::new(root).join("freezer.state").exists()
        {
            return Ok(PathBuf::from(root));
        }
    }
    bail!("no cgroup2 hierarchy")
}

pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Stats {
            median: 0.0,
            min: 0.0,
            max: 0.0,
        };
    }
    Stats {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

pub fn fmt(s: &Stats) -> String {
    format!("{:.2} ({:.2}-{:.2})", s.median, s.min, s.max)
}
