//! The programs of `cargo xtask demo`'s lease part: a lease holder and a breaker, real
//! processes that print what the kernel tells them, with CLOCK_MONOTONIC times so the
//! demo can say when a restored lease was revoked.
//!
//! - `lease_demo hold PATH`: opens PATH read-only, takes a write lease, ignores the
//!   break signal (SIGIO would kill it) and waits.
//! - `lease_demo watch PATH`: what the holder runs once restored: finds its fd on PATH
//!   and prints `revoked NS` the moment the kernel no longer lists its lease.
//! - `lease_demo open PATH`: opens PATH for writing, which blocks while a lease on it
//!   is being broken, then prints `opened NS` and waits.

use std::{
    io::Write as _,
    os::fd::{AsRawFd as _, RawFd},
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use nix::{
    sys::signal::{signal, SigHandler, Signal},
    time::{clock_gettime, ClockId},
};

fn main() {
    if let Err(e) = run() {
        eprintln!("lease_demo: {e:#}");
        std::process::exit(1);
    }
}

fn now_ns() -> u64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, path] = args.as_slice() else {
        bail!("usage: lease_demo hold|watch|open PATH");
    };
    // SAFETY: SIG_IGN installs no handler code.
    unsafe { signal(Signal::SIGIO, SigHandler::SigIgn) }?;
    match mode.as_str() {
        "hold" => {
            let f = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
            set_write_lease(f.as_raw_fd())?;
            say(&format!(
                "holding a write lease on {path} (fd {})",
                f.as_raw_fd()
            ));
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        "watch" => {
            let fd = fd_on(Path::new(path))?;
            say(&format!("restored holder: lease on fd {fd}"));
            wait_revoked(fd);
            say(&format!("revoked {}", now_ns()));
            Ok(())
        }
        "open" => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("opening {path} for writing"))?;
            say(&format!("opened {}", now_ns()));
            // Keeps it open, as a writer would.
            let _writer = f;
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        _ => bail!("usage: lease_demo hold|watch|open PATH"),
    }
}

/// F_SETLEASE through libc: nix 0.29 has no lease commands.
fn set_write_lease(fd: RawFd) -> Result<()> {
    // SAFETY: fcntl on an fd we own, with an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK) } < 0 {
        return Err(std::io::Error::last_os_error()).context("F_SETLEASE");
    }
    Ok(())
}

/// This process's fd on `path` (a restored holder gets its fd back at the number it
/// had, which its program does not know).
fn fd_on(path: &Path) -> Result<RawFd> {
    for e in std::fs::read_dir("/proc/self/fd")?.flatten() {
        if std::fs::read_link(e.path()).is_ok_and(|t| t == path) {
            if let Ok(fd) = e.file_name().to_string_lossy().parse() {
                return Ok(fd);
            }
        }
    }
    bail!("no fd on {} in this process", path.display())
}

/// Returns once fd's file has no lease. F_GETLEASE makes the kernel expire a lease
/// whose break deadline has passed (its `time_out_leases`), so the end is seen at the
/// deadline rather than when the blocked breaker's timer next fires; /proc's fdinfo
/// says whether the lease is still listed (F_GETLEASE already shows the break's
/// target, F_UNLCK, during the break).
fn wait_revoked(fd: RawFd) {
    let fdinfo = format!("/proc/self/fdinfo/{fd}");
    loop {
        // SAFETY: fcntl on our own fd.
        unsafe { libc::fcntl(fd, libc::F_GETLEASE) };
        let listed = std::fs::read_to_string(&fdinfo)
            .map(|t| t.lines().any(|l| l.contains("LEASE")))
            .unwrap_or(false);
        if !listed {
            return;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}
