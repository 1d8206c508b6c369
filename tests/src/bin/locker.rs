//! Test helper: takes file locks on command, one line per command on stdin, one reply
//! line per command on stdout ("ok ..." or "err <errno>"). Used by the integration
//! tests to drive real processes into every lock state.
//!
//! `locker --hold-lease PATH r|w` instead opens PATH (read-only for a read lease,
//! read-write for a write one), takes the lease on fd 3 and waits for signals forever:
//! a lease holder with no pipe or socket to anyone, which CRIU can dump.
//! `locker --hold-lease PATH r|w LOG` keeps running instead, once a millisecond.
//! Once it has been sent SIGIO (a break began) it probes the lease with an open that
//! conflicts with it (which also makes the kernel time out a lease past its
//! deadline). It appends "MONO_NS STATE SIGIOS" to LOG when the state (active: not
//! broken yet; held: breaking; gone: revoked or downgraded) or the count of SIGIOs
//! changes, and "MONO_NS gap MS REALTIME_NS" when it did not run for more than 50 ms
//! or CLOCK_REALTIME moved against CLOCK_MONOTONIC (a freeze, a restore: the first
//! line after a restore is the instant it resumed). CRIU restores a tree into a time
//! namespace whose CLOCK_MONOTONIC goes on from the dump, so only the realtime stamp
//! relates that line to a clock outside.
//! `locker --break PATH r|w LOG` opens PATH for reading or writing, blocking on any
//! lease break, appends "MONO_NS opened" to LOG when the open returns, and waits.
//! `locker --in-pidns CMD ARGS...` runs CMD as the init of a new pid namespace and
//! exits with it (a container's tree, for CRIU).
//! `locker --hold-all DIR` holds one of each in DIR and waits (for CRIU round trips):
//! a POSIX write lock on bytes 0-9 of `posix`, an OFD read lock from byte 5 to EOF
//! of `ofd`, an exclusive flock on `flock` shared with a forked child, a read lease on
//! `lease`, and `deleted`, holding "ghost", open and unlinked; the child waits for a
//! POSIX write lock on bytes 0-9 of `posix` (a blocked waiter). Writes DIR/ready
//! when all is taken but the child's wait.
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
//!   openmode NAME PATH r|w [nb] open O_RDONLY/O_WRONLY (O_NONBLOCK); may block on a
//!                              lease break; replies "ok FD MONO_NS" when it returns
//!   lease NAME r|w|u           fcntl F_SETLEASE
//!   getlease NAME              fcntl F_GETLEASE; replies "ok r|w|u"
//!   pollease NAME r|w|u MS     polls F_GETLEASE until it returns that type; replies
//!                              "ok MONO_NS" (CLOCK_MONOTONIC when it did)
//!   pollproc NAME ACTIVE|gone MS  calls F_GETLEASE (which makes the kernel time out
//!                              leases past their deadline) until the fd's fdinfo
//!                              shows its lease ACTIVE, or no lease; "ok MONO_NS"
//!   truncate PATH LEN          truncate(2) (breaks leases like an open for writing)
//!   setsig NAME SIG            fcntl F_SETSIG
//!   pwrite NAME OFF TEXT       pwrite TEXT at OFF
//!   seek NAME OFF              lseek to OFF
//!   unlink PATH                unlink
//!   bulk DIR NFILES NLOCKS     opens NFILES files in DIR and takes NLOCKS separate
//!                              POSIX write locks spread over them (for benchmarks)
//!   mmap NAME                  maps the whole file (shared, read-only) and keeps the
//!                              mapping; replies "ok START_HEX"
//!   link OLD NEW / rename OLD NEW   link(2) / rename(2)
//!   tmpfile NAME DIR           open(DIR, O_TMPFILE | O_RDWR)
//!   sparse NAME PATH SIZE      creates PATH of SIZE bytes with 4 KiB of data at each
//!                              end and a hole between
//!   delchurn DIR N             N rounds of: create, write, unlink; some kept open,
//!                              some mapped, some closed (a deleted-files workload)
//!   borrow NAME PID FD         pidfd_getfd: takes a copy of another process's fd
//!   delnoise DIR               from now on, a thread keeps creating, unlinking and
//!                              closing files in DIR (background churn)
//!   openloop DIR MS            from now on, a thread opens (and keeps open) a new
//!                              file in DIR every MS ms
//!   churn PATH MS              from now on, a thread takes and releases a POSIX lock
//!                              on PATH every MS ms (lock traffic for benchmarks)
//!   seqlock PATH               from now on, a thread moves a 1-byte POSIX write lock
//!                              without pause over PID * 2^32 + 2, 4, 6 ... (churn test)
//!   adopt NAME FD              names an fd the process already has (after a restore)
//!   sigpending SIG             replies "ok 1" if SIG is pending (blocked), "ok 0" if not
//!   sigcount                   how many SIGIOs the process has handled
//!   unblock SIG                unblocks SIG (its handler runs if it was pending)
//!   setfl NAME FLAGS           fcntl F_SETFL (decimal flags)
//!   cloexec NAME               sets FD_CLOEXEC
//!   setown NAME PID            fcntl F_SETOWN
//!   exit
//! With `--listen PATH` the commands come over one connection to a Unix socket at PATH
//! instead of stdin (a restored locker has the test's old pipes, or none).
//! A blocking command replies when it returns. SIGUSR1 interrupts it (no SA_RESTART),
//! so a test can make a waiter give up.
// A test helper whose every command is a raw system call on its own fds, named
// by the command itself: one SAFETY line per call would repeat the command.
#![allow(clippy::undocumented_unsafe_blocks)]
use std::{
    collections::HashMap,
    ffi::CString,
    io::{BufRead, Write},
};

static SIGIO_SEEN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

extern "C" fn on_usr1(sig: i32) {
    if sig == libc::SIGIO {
        SIGIO_SEEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn mono_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall into a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn real_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn lease_letter(t: i32) -> &'static str {
    match t {
        libc::F_RDLCK => "r",
        libc::F_WRLCK => "w",
        _ => "u",
    }
}

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
    // SAFETY: installing no-op handlers without SA_RESTART. SIGIO (and SIGUSR2 for
    // F_SETSIG) is what a lease holder is sent when its lease is broken.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr1 as extern "C" fn(i32) as usize;
        for sig in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGIO] {
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    let args: Vec<String> = std::env::args().collect();
    match args.as_slice() {
        [_, flag, path, t] if flag == "--hold-lease" => return hold_lease(path, t, None),
        [_, flag, path, t, log] if flag == "--hold-lease" => return hold_lease(path, t, Some(log)),
        [_, flag, path, t, log] if flag == "--break" => return break_lease(path, t, log),
        [_, flag, dir] if flag == "--hold-all" => return hold_all(dir),
        [_, flag, cmd @ ..] if flag == "--in-pidns" && !cmd.is_empty() => return in_pidns(cmd),
        _ => {}
    }
    if let [_, flag, path] = args.as_slice() {
        if flag == "--listen" {
            let _ = std::fs::remove_file(path);
            let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
            let (conn, _) = listener.accept().unwrap();
            let input = std::io::BufReader::new(conn.try_clone().unwrap());
            return serve(input, conn);
        }
    }
    serve(std::io::stdin().lock(), std::io::stdout());
}

fn hold_lease(path: &str, t: &str, log: Option<&str>) {
    let p = CString::new(path).unwrap();
    let mode = if t == "r" {
        libc::O_RDONLY
    } else {
        libc::O_RDWR
    };
    let fd = unsafe { libc::open(p.as_ptr(), mode) };
    assert!(fd >= 0, "open {path}: errno {}", errno());
    let r = unsafe { libc::fcntl(fd, libc::F_SETLEASE, i32::from(lock_type(t))) };
    assert_eq!(r, 0, "F_SETLEASE: errno {}", errno());
    let Some(log) = log else { wait_forever() };
    let mut out = append_to(log);
    // The probe: an open that conflicts with the lease, O_NONBLOCK. While a break to
    // unlock (or a downgrade) is pending it starts nothing new and fails with
    // EWOULDBLOCK; once the kernel has revoked (or downgraded) the lease it succeeds.
    // Before the first break it would start one, so it waits for the first SIGIO. No
    // fd stays open across the loop (a /proc file held at a dump would be dumped).
    let probe_mode = if t == "r" {
        libc::O_WRONLY
    } else {
        libc::O_RDONLY
    };
    let offset = |mono: u64| real_ns() as i64 - mono as i64;
    let (mut last, mut prev) = (String::new(), mono_ns());
    let mut prev_offset = offset(prev);
    loop {
        let now = mono_ns();
        let off = offset(now);
        if now - prev > 50_000_000 || (off - prev_offset).abs() > 50_000_000 {
            let _ = writeln!(
                out,
                "{now} gap {} {}",
                (now - prev) / 1_000_000,
                now as i64 + off
            );
        }
        (prev, prev_offset) = (now, off);
        let sigios = SIGIO_SEEN.load(std::sync::atomic::Ordering::Relaxed);
        let state = if sigios == 0 {
            "active"
        } else {
            let r = unsafe { libc::open(p.as_ptr(), probe_mode | libc::O_NONBLOCK) };
            if r >= 0 {
                unsafe { libc::close(r) };
                "gone"
            } else {
                "held"
            }
        };
        let seen = format!("{state} {sigios}");
        if seen != last {
            let _ = writeln!(out, "{} {seen}", mono_ns());
            last = seen;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn in_pidns(cmd: &[String]) {
    assert_eq!(
        unsafe { libc::unshare(libc::CLONE_NEWPID) },
        0,
        "unshare: errno {}",
        errno()
    );
    match unsafe { libc::fork() } {
        0 => {
            // Its own session: CRIU refuses a tree whose session leader is outside
            // its pid namespace.
            unsafe { libc::setsid() };
            let args: Vec<CString> = cmd
                .iter()
                .map(|a| CString::new(a.as_str()).unwrap())
                .collect();
            let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
            argv.push(std::ptr::null());
            unsafe { libc::execvp(argv[0], argv.as_ptr()) };
            panic!("exec {}: errno {}", cmd[0], errno());
        }
        child => {
            assert!(child > 0, "fork: errno {}", errno());
            let mut status = 0;
            unsafe { libc::waitpid(child, &mut status, 0) };
            std::process::exit(libc::WEXITSTATUS(status));
        }
    }
}

fn hold_all(dir: &str) {
    let open = |name: &str, flags: i32| {
        let p = CString::new(format!("{dir}/{name}")).unwrap();
        let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CREAT, 0o644) };
        assert!(fd >= 0, "open {name}: errno {}", errno());
        fd
    };
    let range_lock = |fd: i32, cmd: i32, t: i16, start: i64, len: i64| {
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = t;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = start;
        fl.l_len = len;
        let r = unsafe { libc::fcntl(fd, cmd, &fl) };
        assert_eq!(r, 0, "lock: errno {}", errno());
    };
    let posix = open("posix", libc::O_RDWR);
    range_lock(posix, libc::F_SETLK, libc::F_WRLCK as i16, 0, 10);
    let ofd = open("ofd", libc::O_RDWR);
    range_lock(ofd, libc::F_OFD_SETLK, libc::F_RDLCK as i16, 5, 0);
    let flock = open("flock", libc::O_RDWR);
    assert_eq!(unsafe { libc::flock(flock, libc::LOCK_EX) }, 0);
    let lease = open("lease", libc::O_RDONLY);
    assert_eq!(
        unsafe { libc::fcntl(lease, libc::F_SETLEASE, libc::F_RDLCK) },
        0
    );
    let deleted = open("deleted", libc::O_RDWR);
    assert_eq!(
        unsafe { libc::write(deleted, b"ghost".as_ptr().cast(), 5) },
        5
    );
    let p = CString::new(format!("{dir}/deleted")).unwrap();
    assert_eq!(unsafe { libc::unlink(p.as_ptr()) }, 0);
    match unsafe { libc::fork() } {
        0 => {
            // Its own POSIX lock request: it conflicts with the parent's and waits.
            let mine = open("posix", libc::O_RDWR);
            range_lock(mine, libc::F_SETLKW, libc::F_WRLCK as i16, 0, 10);
            wait_forever()
        }
        child => assert!(child > 0, "fork: errno {}", errno()),
    }
    std::fs::write(format!("{dir}/ready"), "").unwrap();
    wait_forever()
}

/// A log file `path`, appended to.
fn append_to(path: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .unwrap()
}

/// Waits for signals until killed.
fn wait_forever() -> ! {
    loop {
        unsafe { libc::pause() };
    }
}

fn break_lease(path: &str, t: &str, log: &str) {
    let mut out = append_to(log);
    let p = CString::new(path).unwrap();
    let mode = if t == "r" {
        libc::O_RDONLY
    } else {
        libc::O_WRONLY
    };
    // Restarted by the kernel after a freeze or a restore (SIGIO has no SA_RESTART
    // here, but a freeze is no signal delivery).
    let fd = unsafe { libc::open(p.as_ptr(), mode) };
    let _ = writeln!(out, "{} opened {fd} {}", mono_ns(), errno());
    wait_forever()
}

fn serve(input: impl BufRead, mut out: impl Write) {
    let mut fds: HashMap<String, i32> = HashMap::new();
    for line in input.lines() {
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
            // A process's fd table keeps the size it had at fork across exec, and the
            // kernel's fd walk (task_file iterators, /proc/PID/fd) scans every slot: a
            // harness holding 20,000 pipes gives its workers 16,384-slot tables. This
            // resizes the table to this process's own fds: unshare(CLONE_FILES) copies
            // it at that size, but only while it is shared, so a thread shares it for
            // the moment of the call. POSIX locks belong to the table they were taken
            // through: those taken before are released with the old table.
            ["compactfds"] => {
                let (done, wait) = std::sync::mpsc::channel::<()>();
                let sharer = std::thread::spawn(move || {
                    let _ = wait.recv();
                });
                let r = unsafe { libc::unshare(libc::CLONE_FILES) };
                let e = errno();
                drop(done);
                sharer.join().unwrap();
                if r < 0 {
                    format!("err {e}")
                } else {
                    "ok".into()
                }
            }
            ["dup2", name, new, num] => {
                let r = unsafe { libc::dup2(fd(name), num.parse().unwrap()) };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    fds.insert(new.to_string(), r);
                    format!("ok {r}")
                }
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
                0 => wait_forever(),
                pid => format!("ok {pid}"),
            },
            ["pid"] => format!("ok {}", std::process::id()),
            ["openmode", name, path, mode, rest @ ..] => {
                let p = CString::new(*path).unwrap();
                let mut flags = if *mode == "r" {
                    libc::O_RDONLY
                } else {
                    libc::O_WRONLY
                };
                if rest.first() == Some(&"nb") {
                    flags |= libc::O_NONBLOCK;
                }
                let r = unsafe { libc::open(p.as_ptr(), flags) };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    fds.insert(name.to_string(), r);
                    format!("ok {r} {}", mono_ns())
                }
            }
            ["lease", name, t] => {
                let r = unsafe { libc::fcntl(fd(name), libc::F_SETLEASE, i32::from(lock_type(t))) };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    "ok".into()
                }
            }
            ["getlease", name] => {
                let r = unsafe { libc::fcntl(fd(name), libc::F_GETLEASE) };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    format!("ok {}", lease_letter(r))
                }
            }
            ["pollease", name, t, ms] => {
                let want = i32::from(lock_type(t));
                let deadline = mono_ns() + ms.parse::<u64>().unwrap() * 1_000_000;
                loop {
                    let r = unsafe { libc::fcntl(fd(name), libc::F_GETLEASE) };
                    let now = mono_ns();
                    if r == want {
                        break format!("ok {now}");
                    }
                    if r < 0 || now > deadline {
                        break format!("err timeout {}", lease_letter(r));
                    }
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
            ["pollproc", name, want, ms] => {
                let deadline = mono_ns() + ms.parse::<u64>().unwrap() * 1_000_000;
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                unsafe { libc::fstat(fd(name), &mut st) };
                let tag = format!(":{} ", st.st_ino);
                loop {
                    unsafe { libc::fcntl(fd(name), libc::F_GETLEASE) };
                    let now = mono_ns();
                    // This fd's own lock lines, which the kernel prints under the
                    // inode's lock: /proc/locks is read a page at a time from a
                    // global list, and a line can be skipped when other processes
                    // change their locks between two pages (seen as a lease "gone"
                    // 2.4 s early in a VM while other tests ran).
                    let locks = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd(name)))
                        .unwrap_or_default();
                    let line = locks
                        .lines()
                        .find(|l| l.contains("LEASE") && !l.contains("->") && l.contains(&tag));
                    let done = match (*want, line) {
                        ("gone", None) => true,
                        ("gone", Some(_)) => false,
                        (state, Some(l)) => l.contains(state),
                        (_, None) => false,
                    };
                    if done {
                        break format!("ok {now}");
                    }
                    if now > deadline {
                        break "err timeout".to_string();
                    }
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
            ["truncate", path, len] => {
                let p = CString::new(*path).unwrap();
                let r = unsafe { libc::truncate(p.as_ptr(), len.parse().unwrap()) };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    format!("ok {}", mono_ns())
                }
            }
            ["pwrite", name, off, text] => {
                let r = unsafe {
                    libc::pwrite(
                        fd(name),
                        text.as_ptr().cast(),
                        text.len(),
                        off.parse().unwrap(),
                    )
                };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    "ok".into()
                }
            }
            ["seek", name, off] => {
                let r = unsafe { libc::lseek(fd(name), off.parse().unwrap(), libc::SEEK_SET) };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    "ok".into()
                }
            }
            ["anonshared", len] => {
                // Shared anonymous memory: a "/dev/zero (deleted)" mapping.
                let len: usize = len.parse().unwrap();
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if p == libc::MAP_FAILED {
                    format!("err {}", errno())
                } else {
                    unsafe { std::ptr::write_bytes(p as *mut u8, 0x5a, len) };
                    format!("ok {:x}", p as usize)
                }
            }
            ["mmap", name] => {
                let f = fd(name);
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                unsafe { libc::fstat(f, &mut st) };
                let len = (st.st_size as usize).max(4096);
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_READ,
                        libc::MAP_SHARED,
                        f,
                        0,
                    )
                };
                if p == libc::MAP_FAILED {
                    format!("err {}", errno())
                } else {
                    format!("ok {:x}", p as usize)
                }
            }
            [op @ ("link" | "rename"), old, new] => {
                let (a, b) = (CString::new(*old).unwrap(), CString::new(*new).unwrap());
                let r = unsafe {
                    if *op == "link" {
                        libc::link(a.as_ptr(), b.as_ptr())
                    } else {
                        libc::rename(a.as_ptr(), b.as_ptr())
                    }
                };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    "ok".into()
                }
            }
            ["tmpfile", name, dir, rest @ ..] => {
                let p = CString::new(*dir).unwrap();
                let excl = if rest == ["excl"] { libc::O_EXCL } else { 0 };
                let r =
                    unsafe { libc::open(p.as_ptr(), libc::O_TMPFILE | libc::O_RDWR | excl, 0o600) };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    fds.insert(name.to_string(), r);
                    format!("ok {r}")
                }
            }
            ["fchown", name, uid, gid] => {
                let r =
                    unsafe { libc::fchown(fd(name), uid.parse().unwrap(), gid.parse().unwrap()) };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    "ok".into()
                }
            }
            ["fchmod", name, mode] => {
                let r = unsafe { libc::fchmod(fd(name), u32::from_str_radix(mode, 8).unwrap()) };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    "ok".into()
                }
            }
            ["memfd", name, mname] => {
                let p = CString::new(*mname).unwrap();
                let r = unsafe { libc::memfd_create(p.as_ptr(), libc::MFD_ALLOW_SEALING) };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    fds.insert(name.to_string(), r);
                    format!("ok {r}")
                }
            }
            ["seal", name, seals] => {
                let seals = i32::from_str_radix(seals, 16).unwrap();
                let r = unsafe { libc::fcntl(fd(name), libc::F_ADD_SEALS, seals) };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    "ok".into()
                }
            }
            ["sparse", name, path, size] => {
                let size: i64 = size.parse().unwrap();
                let p = CString::new(*path).unwrap();
                let r = unsafe { libc::open(p.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644) };
                let data = [0x5au8; 4096];
                if r < 0
                    || unsafe { libc::pwrite(r, data.as_ptr().cast(), 4096, 0) } != 4096
                    || unsafe { libc::pwrite(r, data.as_ptr().cast(), 4096, size - 4096) } != 4096
                {
                    format!("err {}", errno())
                } else {
                    fds.insert(name.to_string(), r);
                    format!("ok {r}")
                }
            }
            ["delchurn", dir, n] => {
                let n: usize = n.parse().unwrap();
                for i in 0..n {
                    let path = format!("{dir}/churn-{}-{i}", std::process::id());
                    let p = CString::new(path).unwrap();
                    let f = unsafe { libc::open(p.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644) };
                    if f < 0 {
                        continue;
                    }
                    let data = [1u8; 4096];
                    unsafe { libc::pwrite(f, data.as_ptr().cast(), 4096, 0) };
                    if i % 7 == 3 {
                        // Mapped, then the fd closed: a mapping-only holder.
                        unsafe {
                            libc::mmap(
                                std::ptr::null_mut(),
                                4096,
                                libc::PROT_READ,
                                libc::MAP_SHARED,
                                f,
                                0,
                            )
                        };
                    }
                    if i % 2 == 0 {
                        unsafe { libc::unlink(p.as_ptr()) };
                    }
                    if i % 3 != 0 {
                        unsafe { libc::close(f) };
                    }
                }
                "ok".into()
            }
            ["unlink", path] => {
                let p = CString::new(*path).unwrap();
                let r = unsafe { libc::unlink(p.as_ptr()) };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    "ok".into()
                }
            }
            ["bulk", dir, nfiles, nlocks] => {
                let nfiles: usize = nfiles.parse().unwrap();
                let nlocks: usize = nlocks.parse().unwrap();
                let mut opened = Vec::new();
                for i in 0..nfiles {
                    let p = CString::new(format!("{dir}/f-{}-{i}", std::process::id())).unwrap();
                    let r = unsafe { libc::open(p.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644) };
                    if r < 0 {
                        break;
                    }
                    opened.push(r);
                }
                let mut taken = 0;
                for i in 0..nlocks {
                    let Some(&f) = opened.get(i % opened.len().max(1)) else {
                        break;
                    };
                    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
                    fl.l_type = libc::F_WRLCK as i16;
                    fl.l_whence = libc::SEEK_SET as i16;
                    // Separate ranges (a gap between them) so that they do not merge.
                    fl.l_start = (i / opened.len().max(1)) as i64 * 2;
                    fl.l_len = 1;
                    if unsafe { libc::fcntl(f, libc::F_SETLK, &fl) } == 0 {
                        taken += 1;
                    }
                }
                if opened.len() == nfiles && taken == nlocks {
                    "ok".to_string()
                } else {
                    format!("err opened {} locked {taken}", opened.len())
                }
            }
            ["borrow", name, pid, fd] => {
                let pidfd =
                    unsafe { libc::syscall(libc::SYS_pidfd_open, pid.parse::<i32>().unwrap(), 0) };
                let r = if pidfd < 0 {
                    -1
                } else {
                    unsafe {
                        libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd.parse::<i32>().unwrap(), 0)
                    }
                };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    unsafe { libc::close(pidfd as i32) };
                    fds.insert(name.to_string(), r as i32);
                    format!("ok {r}")
                }
            }
            ["delnoise", dir] => {
                let dir = dir.to_string();
                std::thread::spawn(move || {
                    for i in 0u64.. {
                        let p = CString::new(format!("{dir}/noise-{}", i % 64)).unwrap();
                        let f =
                            unsafe { libc::open(p.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644) };
                        unsafe { libc::unlink(p.as_ptr()) };
                        if f >= 0 {
                            std::thread::sleep(std::time::Duration::from_micros(200));
                            unsafe { libc::close(f) };
                        }
                    }
                });
                "ok".into()
            }
            ["openloop", dir, ms] => {
                let ms: u64 = ms.parse().unwrap();
                let dir = dir.to_string();
                std::thread::spawn(move || {
                    for i in 0.. {
                        let p = CString::new(format!("{dir}/o-{i}")).unwrap();
                        unsafe { libc::open(p.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644) };
                        std::thread::sleep(std::time::Duration::from_millis(ms));
                    }
                });
                "ok".into()
            }
            ["churn", path, ms] => {
                let ms: u64 = ms.parse().unwrap();
                let p = CString::new(*path).unwrap();
                let f = unsafe { libc::open(p.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644) };
                if f < 0 {
                    format!("err {}", errno())
                } else {
                    std::thread::spawn(move || loop {
                        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
                        fl.l_whence = libc::SEEK_SET as i16;
                        fl.l_len = 1;
                        for t in [libc::F_WRLCK, libc::F_UNLCK] {
                            fl.l_type = t as i16;
                            unsafe { libc::fcntl(f, libc::F_SETLK, &fl) };
                        }
                        std::thread::sleep(std::time::Duration::from_millis(ms));
                    });
                    "ok".into()
                }
            }
            ["seqlock", path] => {
                let p = CString::new(*path).unwrap();
                let f = unsafe { libc::open(p.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644) };
                if f < 0 {
                    format!("err {}", errno())
                } else {
                    let base = i64::from(std::process::id()) << 32;
                    std::thread::spawn(move || {
                        let set = |t: i32, at: i64| {
                            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
                            fl.l_whence = libc::SEEK_SET as i16;
                            fl.l_type = t as i16;
                            fl.l_start = at;
                            fl.l_len = 1;
                            unsafe { libc::fcntl(f, libc::F_SETLK, &fl) };
                        };
                        let mut seq = 0i64;
                        loop {
                            seq = (seq + 2) & 0xffff_fffe;
                            set(libc::F_WRLCK, base + seq);
                            set(libc::F_UNLCK, base + ((seq - 2) & 0xffff_fffe));
                        }
                    });
                    "ok".into()
                }
            }
            ["setsig", name, sig] => {
                let r = unsafe {
                    libc::fcntl(
                        fd(name),
                        10, /* F_SETSIG */
                        sig.parse::<i32>().unwrap(),
                    )
                };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    "ok".into()
                }
            }
            ["adopt", name, num] => {
                let n: i32 = num.parse().unwrap();
                if unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
                    format!("err {}", errno())
                } else {
                    fds.insert(name.to_string(), n);
                    "ok".into()
                }
            }
            ["sigcount"] => format!(
                "ok {}",
                SIGIO_SEEN.load(std::sync::atomic::Ordering::Relaxed)
            ),
            ["sigpending", sig] => {
                let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
                unsafe { libc::sigpending(&mut set) };
                let on = unsafe { libc::sigismember(&set, sig.parse().unwrap()) };
                format!("ok {on}")
            }
            ["unblock", sig] => {
                let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
                unsafe {
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, sig.parse().unwrap());
                    libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                }
                "ok".into()
            }
            ["setfl", name, flags] => {
                let r =
                    unsafe { libc::fcntl(fd(name), libc::F_SETFL, flags.parse::<i32>().unwrap()) };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    "ok".into()
                }
            }
            ["cloexec", name] => {
                unsafe { libc::fcntl(fd(name), libc::F_SETFD, libc::FD_CLOEXEC) };
                "ok".into()
            }
            ["setown", name, pid] => {
                let r =
                    unsafe { libc::fcntl(fd(name), libc::F_SETOWN, pid.parse::<i32>().unwrap()) };
                if r < 0 {
                    format!("err {}", errno())
                } else {
                    "ok".into()
                }
            }
            ["exit"] => break,
            _ => "err bad-command".into(),
        };
        writeln!(out, "{reply}").unwrap();
        out.flush().unwrap();
    }
}
