//! The restored process tree. ckpt-user forks one helper per root process; every
//! helper first forks its own children (so parent/child links are the image's), then
//! becomes its process: fds at their numbers, credentials, working directory, locks,
//! leases. It reports "ready" on a shared status pipe and waits on the release pipe.
//! Closing the release pipe lets every helper execute its program at the same instant:
//! no restored program runs before every process is restored.
//!
//! Helpers are forked from a single-threaded ckpt-user, so they may allocate. They never
//! return into ckpt-user's code: they report and `_exit`. Until they execute, they die
//! with their parent (PR_SET_PDEATHSIG), and they all share one new process group so
//! that a failed restore can kill them with one signal.

use std::{
    collections::BTreeMap,
    ffi::CString,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};
use nix::{
    errno::Errno,
    fcntl::{fcntl, FcntlArg, OFlag},
    sys::signal::{kill, killpg, Signal},
    unistd::{fork, setpgid, ForkResult, Pid},
};

use super::creds;
use crate::{
    image::format::{Image, LockKind, LockType},
    plan::{Exec, FdSource, LeaseOp, LockOp, Plan, ProcPlan},
};

/// Control pipes: helpers write to `status`, block reading `release`.
struct Control {
    status_r: OwnedFd,
    status_w: OwnedFd,
    release_r: OwnedFd,
    release_w: OwnedFd,
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

/// The restored tree while it is being set up; killed on drop unless released.
pub struct Tree {
    /// New pid of each process of the plan (0 until it reported).
    pub pids: Vec<u32>,
    pub pgid: i32,
    roots: Vec<i32>,
    status_r: OwnedFd,
    release_w: Option<OwnedFd>,
    released: bool,
}

impl Drop for Tree {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // Our own helpers: signalled, and the roots reaped.
        if self.pgid > 0 {
            let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
        }
        for &p in self.pids.iter().filter(|p| **p > 0) {
            let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
        }
        for &r in &self.roots {
            let _ = kill(Pid::from_raw(r), Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(Pid::from_raw(r), None);
        }
    }
}

/// Everything a helper needs, computed before the first fork.
/// What a restored process gets on a standard fd (0-2) that was a pipe, socket or
/// terminal in the image: something with no path to open again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stdio {
    /// ckpt-user restore's own fd of that number where it is a terminal, /dev/null
    /// otherwise: `report=$(ckpt-user restore ... --json)` returns while the
    /// restored processes run, and a restore typed at a terminal shows their output.
    Auto,
    /// ckpt-user restore's own fd of that number, whatever it is.
    Inherit,
    /// /dev/null.
    Null,
    /// Output appended to DIR/PID.stdout and DIR/PID.stderr (PID as in the image),
    /// /dev/null on stdin.
    Dir(PathBuf),
}

impl std::str::FromStr for Stdio {
    type Err = String;

    fn from_str(s: &str) -> Result<Stdio, String> {
        Ok(match s {
            "auto" => Stdio::Auto,
            "inherit" => Stdio::Inherit,
            "null" => Stdio::Null,
            "" => return Err("expected auto, inherit, null or a directory".into()),
            dir => Stdio::Dir(PathBuf::from(dir)),
        })
    }
}

pub struct Setup<'a> {
    pub image: &'a Image,
    pub plan: &'a Plan,
    pub files: &'a BTreeMap<u32, OwnedFd>,
    pub stdio: &'a Stdio,
    /// cgroup.procs of the cgroup to restore into.
    pub cgroup_procs: Option<PathBuf>,
    /// ckpt-user's soft RLIMIT_NOFILE before it raised it.
    pub nofile_soft: u64,
}

/// Forks the tree and waits until every process is ready (or one failed).
pub fn spawn(setup: &Setup, cancel: &AtomicBool, timeout: Duration) -> Result<Tree> {
    let ctl = {
        let (status_r, status_w) = pipe()?;
        let (release_r, release_w) = pipe()?;
        Control {
            status_r,
            status_w,
            release_r,
            release_w,
        }
    };
    let mut pgid = 0;
    let mut roots = Vec::new();
    for &root in &setup.plan.roots {
        // SAFETY: ckpt-user restore is single-threaded; the child never returns.
        match unsafe { fork() }.map_err(|e| anyhow!("fork: {e}"))? {
            ForkResult::Child => helper(setup, &ctl, root, Some(pgid)),
            ForkResult::Parent { child } => {
                if pgid == 0 {
                    pgid = child.as_raw();
                }
                // Also from this side, so the group exists before anyone signals it.
                let _ = setpgid(child, Pid::from_raw(pgid));
                roots.push(child.as_raw());
            }
        }
    }
    let Control {
        status_r,
        status_w,
        release_r,
        release_w,
    } = ctl;
    drop((status_w, release_r));
    let mut tree = Tree {
        pids: vec![0; setup.plan.procs.len()],
        pgid,
        roots,
        status_r,
        release_w: Some(release_w),
        released: false,
    };
    let deadline = Instant::now() + timeout;
    let mut ready = 0;
    let mut pending = String::new();
    while ready < tree.pids.len() {
        if cancel.load(Ordering::Relaxed) {
            bail!("interrupted; the restored processes were killed");
        }
        if Instant::now() > deadline {
            bail!("the restored processes were not ready after {timeout:?}");
        }
        let Some(lines) = read_lines(&tree.status_r, &mut pending)? else {
            let missing = tree.pids.iter().position(|p| *p == 0).unwrap_or(0);
            bail!(
                "the restored process for pid {} died while being set up",
                setup.plan.procs[missing].old_pid
            );
        };
        for line in lines {
            match parse_status(&line) {
                Some(('R', idx, rest)) if idx < tree.pids.len() => {
                    tree.pids[idx] = rest.parse().unwrap_or(0);
                    ready += 1;
                }
                Some((_, idx, rest)) if idx < tree.pids.len() => {
                    bail!("process {}: {rest}", setup.plan.procs[idx].old_pid)
                }
                _ => bail!("bad message from a restored process: {line:?}"),
            }
        }
    }
    Ok(tree)
}

impl Tree {
    /// Lets every process execute its program, then waits until each has (or one
    /// could not, in which case the whole tree is killed).
    pub fn release(mut self, timeout: Duration) -> Result<()> {
        drop(self.release_w.take());
        let deadline = Instant::now() + timeout;
        let mut pending = String::new();
        let mut failures = Vec::new();
        loop {
            if Instant::now() > deadline {
                bail!("the restored processes did not start their programs within {timeout:?}");
            }
            match read_lines(&self.status_r, &mut pending)? {
                None => break,
                Some(lines) => failures.extend(lines),
            }
        }
        if let Some(line) = failures.first() {
            let msg = match parse_status(line) {
                Some((_, _, rest)) => rest.to_string(),
                None => line.clone(),
            };
            bail!("a restored process could not start its program: {msg}; every restored process was killed");
        }
        self.released = true;
        // The roots are our children; once they run their programs they are on their
        // own (reparented to init when we exit).
        Ok(())
    }
}

/// "R 3 12345" -> ('R', 3, "12345").
fn parse_status(line: &str) -> Option<(char, usize, &str)> {
    let mut it = line.splitn(3, ' ');
    let tag = it.next()?.chars().next()?;
    let idx = it.next()?.parse().ok()?;
    Some((tag, idx, it.next().unwrap_or("")))
}

/// Whole lines read within 100 ms; None at end of file.
fn read_lines(fd: &OwnedFd, pending: &mut String) -> Result<Option<Vec<String>>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut pfd = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    // An error (EINTR) is a look with nothing to read.
    if poll(&mut pfd, PollTimeout::from(100u8)).unwrap_or(0) <= 0 {
        return Ok(Some(Vec::new()));
    }
    let mut buf = [0u8; 4096];
    let r = match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
        Ok(r) => r,
        Err(Errno::EINTR) => return Ok(Some(Vec::new())),
        Err(e) => bail!("reading the restored processes' status: {e}"),
    };
    if r == 0 {
        return Ok(None);
    }
    pending.push_str(&String::from_utf8_lossy(&buf[..r]));
    let mut out = Vec::new();
    while let Some(nl) = pending.find('\n') {
        out.push(pending[..nl].to_string());
        pending.drain(..=nl);
    }
    Ok(Some(out))
}

fn say(fd: RawFd, tag: char, idx: usize, msg: &str) {
    let mut line = format!("{tag} {idx} {}", msg.replace('\n', " "));
    line.truncate(3000);
    line.push('\n');
    // SAFETY: one write of less than PIPE_BUF bytes: atomic on a shared pipe.
    unsafe { libc::write(fd, line.as_ptr().cast(), line.len()) };
}

fn os_err(what: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{what}: {}", std::io::Error::last_os_error())
}

/// A helper process: becomes process `idx` of the plan, then its program.
/// `group`: for a root, the process group to join (0: start it); children inherit it.
fn helper(setup: &Setup, ctl: &Control, idx: usize, group: Option<i32>) -> ! {
    // The orchestrator's ends of the pipes are not ours (their OwnedFds are never
    // dropped here: a helper never returns).
    let _ = nix::unistd::close(ctl.status_r.as_raw_fd());
    let _ = nix::unistd::close(ctl.release_w.as_raw_fd());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the default disposition, in a single-threaded process.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
    }
    if let Some(pgid) = group {
        let _ = setpgid(Pid::from_raw(0), Pid::from_raw(pgid));
    }
    // Our control fds move above every fd number this process will use.
    let base = fd_base(setup, &setup.plan.procs[idx], ctl);
    let (status, release) = match (
        dup_high(ctl.status_w.as_raw_fd(), base),
        dup_high(ctl.release_r.as_raw_fd(), base),
    ) {
        (Ok(s), Ok(r)) => (s, r),
        (Err(e), _) | (_, Err(e)) => {
            say(ctl.status_w.as_raw_fd(), 'E', idx, &format!("{e:#}"));
            // SAFETY: leaving the helper without unwinding or atexit handlers (after fork).
            unsafe { libc::_exit(1) }
        }
    };
    match become_process(setup, ctl, idx, base) {
        Ok(exec) => {
            say(status, 'R', idx, &std::process::id().to_string());
            wait_release(release);
            // The program must not die with its parent.
            let _ = nix::sys::prctl::set_pdeathsig(None);
            let e = exec.run();
            say(status, 'X', idx, &format!("{}: {e}", exec.path.display()));
            // SAFETY: as above.
            unsafe { libc::_exit(127) }
        }
        Err(e) => {
            say(status, 'E', idx, &format!("{e:#}"));
            // SAFETY: as above.
            unsafe { libc::_exit(1) }
        }
    }
}

/// Reads our pipe until the orchestrator closes it.
fn wait_release(fd: RawFd) {
    let mut b = [0u8; 1];
    loop {
        match nix::unistd::read(fd, &mut b) {
            Ok(0) => return,
            Ok(_) | Err(Errno::EINTR) => {}
            // SAFETY: leaving the helper without unwinding or atexit handlers.
            Err(_) => unsafe { libc::_exit(1) },
        }
    }
}

fn die_with_parent() -> Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(|e| anyhow!("prctl(PR_SET_PDEATHSIG): {e}"))
}

/// The program a ready helper executes.
struct Program {
    path: PathBuf,
    argv: Vec<CString>,
}

impl Program {
    /// Executes the program with this process's environment; returns only on failure.
    fn run(&self) -> std::io::Error {
        let path = CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap_or_default();
        match nix::unistd::execv(&path, &self.argv) {
            Err(e) => e.into(),
            Ok(never) => match never {},
        }
    }
}

fn become_process(setup: &Setup, ctl: &Control, idx: usize, base: RawFd) -> Result<Program> {
    let p = &setup.plan.procs[idx];
    die_with_parent()?;
    if let Some(procs) = &setup.cgroup_procs {
        std::fs::write(procs, "0")
            .map_err(|e| anyhow!("joining cgroup {}: {e}", procs.display()))?;
    }
    for &child in &p.children {
        // SAFETY: we are single-threaded; the child never returns.
        if let ForkResult::Child = unsafe { fork() }.map_err(|e| anyhow!("fork: {e}"))? {
            helper(setup, ctl, child, None);
        }
    }
    arrange_fds(setup, p, base)?;
    creds::become_user(&p.creds)?;
    // Changing credentials cleared the parent-death signal.
    die_with_parent()?;
    std::env::set_current_dir(&p.cwd)
        .map_err(|e| anyhow!("cannot enter its working directory {}: {e}", p.cwd))?;
    for l in &p.locks {
        take_lock(setup, p, l)?;
    }
    for l in &p.leases {
        set_lease(setup, p, l)?;
    }
    for &fd in &p.async_fds {
        let fl = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
        fcntl(fd, FcntlArg::F_SETFL(fl | OFlag::O_ASYNC))
            .map_err(|e| anyhow!("setting O_ASYNC on fd {fd}: {e}"))?;
    }
    if !p.block_signals.is_empty() {
        // Raw: F_SETSIG may name a real-time signal, which nix's Signal cannot hold.
        // SAFETY: building and installing a signal mask for ourselves.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &s in &p.block_signals {
                libc::sigaddset(&mut set, s);
            }
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
    }
    // The program gets ckpt-user's own soft open-file limit back (it was raised to
    // open every description), or enough for its highest fd.
    let highest = p.fds.iter().map(|d| d.fd as u64 + 1).max().unwrap_or(0);
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        setup.nofile_soft.max(highest).min(hard),
        hard,
    )?;
    program(&p.exec)
}

fn path_of<'a>(setup: &'a Setup, p: &ProcPlan, fd: i32) -> &'a str {
    p.fds
        .iter()
        .find(|d| d.fd == fd)
        .and_then(|d| match d.source {
            FdSource::File(f) => Some(setup.image.files[f as usize].path.as_str()),
            FdSource::Inherit(_) => None,
        })
        .unwrap_or("?")
}

fn source_fd(setup: &Setup, stdio: &[RawFd; 3], s: FdSource) -> RawFd {
    match s {
        FdSource::File(f) => setup.files[&f].as_raw_fd(),
        FdSource::Inherit(n) => stdio[n as usize],
    }
}

/// The fds process `p` gets for its standard fds with no path (`Stdio`), opened
/// close-on-exec (only their copies at 0-2 reach the program). Opened here, before
/// the helper takes the process's credentials: where output goes is the choice of
/// whoever runs the restore.
fn stdio_fds(setup: &Setup, p: &ProcPlan) -> Result<[RawFd; 3]> {
    use nix::{fcntl::OFlag, sys::stat::Mode};
    let null = || {
        nix::fcntl::open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| anyhow!("opening /dev/null: {e}"))
    };
    let mut out = [0, 1, 2];
    for n in 0..3 {
        if !p.fds.iter().any(|d| d.source == FdSource::Inherit(n)) {
            continue;
        }
        out[n as usize] = match setup.stdio {
            Stdio::Inherit => n,
            Stdio::Auto if nix::unistd::isatty(n).unwrap_or(false) => n,
            Stdio::Auto | Stdio::Null => null()?,
            Stdio::Dir(_) if n == 0 => null()?,
            Stdio::Dir(dir) => {
                let path = dir.join(format!(
                    "{}.{}",
                    p.old_pid,
                    if n == 1 { "stdout" } else { "stderr" }
                ));
                nix::fcntl::open(
                    &path,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_APPEND
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| anyhow!("--stdio: opening {}: {e}", path.display()))?
            }
        };
    }
    Ok(out)
}

/// The lowest fd number above every number in play for process `p`.
fn fd_base(setup: &Setup, p: &ProcPlan, ctl: &Control) -> RawFd {
    p.fds
        .iter()
        .map(|d| d.fd)
        .chain(setup.files.values().map(std::os::fd::AsRawFd::as_raw_fd))
        .chain([2, ctl.status_w.as_raw_fd(), ctl.release_r.as_raw_fd()])
        .max()
        .unwrap_or(2)
        + 1
}

fn dup_high(fd: RawFd, base: RawFd) -> Result<RawFd> {
    let r = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(base));
    if let Err(e) = r {
        // EINVAL: `base` is at or above the open-file limit (`Plan::check_fd_limit`
        // refuses such plans up front; this names the limit should it still happen).
        let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(String::new(), |(soft, hard)| {
                format!(" (fd numbers from {base}; RLIMIT_NOFILE soft {soft}, hard {hard})")
            });
        return Err(anyhow!("moving fd {fd}{limit}: {e}"));
    }
    Ok(r?)
}

/// Puts every description at its fd number and closes everything else below `base`
/// (our control fds are above it). Sources are first moved above `base` too, so no
/// placement overwrites a source.
fn arrange_fds(setup: &Setup, p: &ProcPlan, base: RawFd) -> Result<()> {
    let stdio = stdio_fds(setup, p)?;
    let mut moved = Vec::with_capacity(p.fds.len());
    for d in &p.fds {
        moved.push(
            dup_high(source_fd(setup, &stdio, d.source), base)
                .map_err(|e| anyhow!("fd {} ({}): {e}", d.fd, path_of(setup, p, d.fd)))?,
        );
    }
    close_below(base)?;
    for (d, &m) in p.fds.iter().zip(&moved) {
        let flags = if d.cloexec {
            OFlag::O_CLOEXEC
        } else {
            OFlag::empty()
        };
        // `m` >= base > d.fd.
        nix::unistd::dup3(m, d.fd, flags).map_err(|e| anyhow!("placing fd {}: {e}", d.fd))?;
    }
    for m in moved {
        // The temporary duplicates this function made.
        let _ = nix::unistd::close(m);
    }
    Ok(())
}

/// Closes every fd below `base`.
fn close_below(base: RawFd) -> Result<()> {
    if base > 0 {
        // Raw: nix 0.29 has no close_range.
        // SAFETY: plain syscall on our own fd table.
        if unsafe { libc::syscall(libc::SYS_close_range, 0u32, (base - 1) as u32, 0) } < 0 {
            return Err(os_err("close_range"));
        }
    }
    Ok(())
}

fn take_lock(setup: &Setup, p: &ProcPlan, l: &LockOp) -> Result<()> {
    let what = || {
        let ty = l.lock_type.name();
        // The path as it is: lowercasing the whole line once changed it.
        format!(
            "{} {ty} lock on {} [{}]",
            l.kind.name(),
            path_of(setup, p, l.fd),
            l.range
        )
    };
    // Raw flock(2): nix's Flock owns its fd and unlocks on drop, and this lock must
    // stay with the process this helper becomes.
    // SAFETY: plain syscalls on our own fds.
    let r = unsafe {
        match l.kind {
            LockKind::Flock => libc::flock(
                l.fd,
                libc::LOCK_NB
                    | if l.lock_type == LockType::Write {
                        libc::LOCK_EX
                    } else {
                        libc::LOCK_SH
                    },
            ),
            LockKind::Posix | LockKind::Ofd => {
                let mut fl: libc::flock = std::mem::zeroed();
                fl.l_type = l.lock_type.fcntl_type() as i16;
                fl.l_whence = libc::SEEK_SET as i16;
                fl.l_start = l.range.start();
                fl.l_len = l.range.l_len();
                let cmd = if l.kind == LockKind::Posix {
                    libc::F_SETLK
                } else {
                    libc::F_OFD_SETLK
                };
                libc::fcntl(l.fd, cmd, &fl)
            }
        }
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
            bail!(
                "cannot take its {}: another process holds a conflicting lock (is the original still running?)",
                what()
            );
        }
        bail!("cannot take its {}: {e}", what());
    }
    Ok(())
}

fn set_lease(setup: &Setup, p: &ProcPlan, l: &LeaseOp) -> Result<()> {
    // Raw: nix has no F_SETLEASE.
    // SAFETY: plain fcntl on our own fd.
    if unsafe { libc::fcntl(l.fd, libc::F_SETLEASE, l.lease_type.fcntl_type()) } < 0 {
        let e = std::io::Error::last_os_error();
        let path = path_of(setup, p, l.fd);
        if e.raw_os_error() == Some(libc::EAGAIN) {
            bail!("cannot set its lease on {path}: the file is open elsewhere in a conflicting mode (is the original still running?)");
        }
        bail!("cannot set its lease on {path}: {e}");
    }
    Ok(())
}

/// The program to execute, checked now (as the restored user, in its working
/// directory) so that a missing program stops the restore before anything runs.
fn program(exec: &Exec) -> Result<Program> {
    let argv = exec.argv();
    let first = &argv[0];
    let path = if first.contains('/') {
        PathBuf::from(first)
    } else {
        std::env::var_os("PATH")
            .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into())
            .to_string_lossy()
            .split(':')
            .map(|d| Path::new(d).join(first))
            .find(|c| executable(c))
            .ok_or_else(|| anyhow!("program {first} not found in PATH"))?
    };
    if !executable(&path) {
        bail!(
            "cannot execute {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    let argv = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| anyhow!("its command line has a NUL byte"))?;
    Ok(Program { path, argv })
}

fn executable(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    use nix::{fcntl::AtFlags, unistd::AccessFlags};
    p.is_file()
        && nix::unistd::faccessat(None, c.as_c_str(), AccessFlags::X_OK, AtFlags::AT_EACCESS)
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_helper_s_status_line_and_the_stdio_choice_parse() {
        assert_eq!(parse_status("R 3 12345"), Some(('R', 3, "12345")));
        assert_eq!(
            parse_status("E 0 cannot take its lock: busy"),
            Some(('E', 0, "cannot take its lock: busy"))
        );
        assert_eq!(parse_status("R x"), None);
        assert_eq!(parse_status(""), None);
        assert_eq!("auto".parse::<Stdio>(), Ok(Stdio::Auto));
        assert_eq!("null".parse::<Stdio>(), Ok(Stdio::Null));
        assert_eq!(
            "/tmp/out".parse::<Stdio>(),
            Ok(Stdio::Dir(PathBuf::from("/tmp/out")))
        );
        assert!("".parse::<Stdio>().is_err());
    }
}
