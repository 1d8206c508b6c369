//! Test helper: takes file locks on command, one line per command on stdin, one reply
//! line per command on stdout ("ok ..." or "err <errno>"). Used by the integration
//! tests to drive real processes into every lock state.
//!
//! Commands:
//!   open NAME PATH             open (create) read-write; NAME names the fd
//!   dup NAME NEW               dup the fd
//!   posix NAME r|w|u START LEN [wait]   fcntl F_SETLK (F_SETLKW with "wait")
//!   ofd NAME r|w|u START LEN [wait]     fcntl F_OFD_SETLK(W)
//!   flock NAME sh|ex|un [nb]            flock (LOCK_NB with "nb")
//!   close NAME
//!   fork                       child keeps every fd and sleeps; replies "ok CHILDPID"
//!   pid                        replies "ok PID"
//!   exit
//! A blocking command replies when it returns. SIGUSR1 interrupts it (no SA_RESTART),
//! so a test can make a waiter give up.
use std::{
    collections::HashMap,
    ffi::CString,
    io::{BufRead, Write},
};

extern "C" fn on_usr1(_: i32) {}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn lock_type(s: &str) -> i16 {
    match s {
        "r" => libc::F_RDLCK as i16,
        "w" => libc::F_WRLCK as i16,
        _ => libc::F_UNLCK as i16,
    }
}

fn main() {
    // SAFETY: installing a no-op handler without SA_RESTART.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr1 as extern "C" fn(i32) as usize;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
    let mut fds: HashMap<String, i32> = HashMap::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let w: Vec<&str> = line.split_whitespace().collect();
        let fd = |n: &str| *fds.get(n).expect("unknown fd name");
        let reply = match w.as_slice() {
            ["open", name, path] => {
                let p = CString::new(*path).unwrap();
                // SAFETY: plain syscall.
                let r = unsafe { libc::open(p.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644) };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    fds.insert(name.to_string(), r);
                    format!("ok {r}")
                }
            }
            ["dup", name, new] => {
                let r = unsafe { libc::dup(fd(name)) };
                fds.insert(new.to_string(), r);
                format!("ok {r}")
            }
            [kind @ ("posix" | "ofd"), name, t, start, len, rest @ ..] => {
                let mut fl: libc::flock = unsafe { std::mem::zeroed() };
                fl.l_type = lock_type(t);
                fl.l_whence = libc::SEEK_SET as i16;
                fl.l_start = start.parse().unwrap();
                fl.l_len = len.parse().unwrap();
                let wait = rest.first() == Some(&"wait");
                let cmd = match (*kind, wait) {
                    ("posix", false) => libc::F_SETLK,
                    ("posix", true) => libc::F_SETLKW,
                    (_, false) => libc::F_OFD_SETLK,
                    (_, true) => libc::F_OFD_SETLKW,
                };
                let r = unsafe { libc::fcntl(fd(name), cmd, &fl) };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    "ok".into()
                }
            }
            ["flock", name, op, rest @ ..] => {
                let mut op = match *op {
                    "sh" => libc::LOCK_SH,
                    "ex" => libc::LOCK_EX,
                    _ => libc::LOCK_UN,
                };
                if rest.first() == Some(&"nb") {
                    op |= libc::LOCK_NB;
                }
                let r = unsafe { libc::flock(fd(name), op) };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    "ok".into()
                }
            }
            ["close", name] => {
                let r = unsafe { libc::close(fds.remove(*name).expect("unknown fd name")) };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    "ok".into()
                }
            }
            ["fork"] => match unsafe { libc::fork() } {
                0 => loop {
                    unsafe { libc::pause() };
                },
                pid => format!("ok {pid}"),
            },
            ["pid"] => format!("ok {}", std::process::id()),
            ["exit"] => break,
            _ => "err bad-command".into(),
        };
        writeln!(out, "{reply}").unwrap();
        out.flush().unwrap();
    }
}
