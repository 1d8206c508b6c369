//! `ckpt-user restore`: real processes dumped, killed and restored, then checked
//! against the kernel's own views (/proc/PID/fdinfo, /proc/locks, kcmp, stat).

use std::{
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    time::Duration,
};

use ckpt_tests::*;
use serde_json::Value;

fn fd_of(reply: &str) -> i32 {
    reply.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn same_description(pid1: u32, fd1: i32, pid2: u32, fd2: i32) -> bool {
    // SAFETY: plain syscall (KCMP_FILE = 0).
    unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, 0, fd1 as u64, fd2 as u64) == 0 }
}

fn ppid(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Lines of /proc/locks about `path`'s inode (held locks and leases, not waiters).
fn proc_locks_on(path_ino: u64) -> Vec<String> {
    // Read twice and merged: /proc/locks comes a page at a time from a global list,
    // and a line can be skipped when other tests' processes change their locks
    // between two pages.
    let mut out: Vec<String> = Vec::new();
    for _ in 0..2 {
        for l in std::fs::read_to_string("/proc/locks")
            .unwrap()
            .lines()
            .filter(|l| !l.contains("->") && l.contains(&format!(":{path_ino} ")))
        {
            let l = l.split_whitespace().skip(1).collect::<Vec<_>>().join(" ");
            if !out.contains(&l) {
                out.push(l);
            }
        }
    }
    out
}

/// `--exec-cmd` value: process `pid` runs `sleep` instead of its program.
fn sleep_instead(pid: u32) -> String {
    format!("{pid}=exec sleep 600")
}

/// What each test starts from: a running agent, a scratch directory, and the cgroup
/// whose processes are checkpointed.
struct Scene {
    agent: Agent,
    dir: Scratch,
    cg: Cgroup,
}

impl Scene {
    fn new() -> Scene {
        require_root();
        Scene {
            agent: Agent::start(),
            dir: Scratch::new(),
            cg: Cgroup::new(false),
        }
    }
}

/// Dumps `cg` into `dir`/img (the dump must succeed) and returns the image's path.
fn checkpoint(agent: &Agent, cg: &Cgroup, dir: &Scratch) -> String {
    let img = dir.file("img");
    let (code, _, err) = agent.dump(&cg.path, &img, &[]);
    assert_eq!(code, 0, "{err}");
    img
}

/// `ckpt-user restore IMG --skip-unsupported --cgroup INTO EXTRA...`: (code, stdout,
/// stderr). --skip-unsupported: the test harness may pass stray pipes down to the
/// lockers.
fn restore_into(img: &str, into: &Cgroup, extra: &[&str]) -> (i32, String, String) {
    let cg = into.path.display().to_string();
    let mut args = vec![img, "--skip-unsupported", "--cgroup", &cg];
    args.extend_from_slice(extra);
    run_restore(&args)
}

/// Restores `img` into `into` and returns the JSON report (the restore must succeed).
fn restore(img: &str, into: &Cgroup, extra: &[&str]) -> Value {
    let (code, out, err) = restore_into(img, into, &[&["--json"], extra].concat());
    assert_eq!(code, 0, "restore failed: {err}");
    serde_json::from_str(&out).unwrap()
}

/// Restores `img` into `into` (it must succeed) and returns what it said on stderr.
fn restore_said(img: &str, into: &Cgroup, extra: &[&str]) -> String {
    let (code, _, err) = restore_into(img, into, extra);
    assert_eq!(code, 0, "restore failed: {err}");
    err
}

#[test]
fn fds_offsets_flags_sharing_and_every_lock_kind_come_back() {
    let Scene { agent, dir, cg } = Scene::new();
    let (a, b, c) = (dir.file("a"), dir.file("b"), dir.file("c"));
    let mut p = cg.locker();
    let fa = fd_of(&p.cmd(&format!("open a {a}")));
    p.cmd("pwrite a 0 hello-world");
    p.cmd("seek a 5");
    // Close-on-exec is kept, so the program's exec closes it, as the kernel would.
    let d = dir.file("d");
    let fd_cloexec = fd_of(&p.cmd(&format!("open d {d}")));
    p.cmd("cloexec d");
    p.cmd("posix a w 0 9");
    p.cmd("posix a r 20 0");
    let fb = fd_of(&p.cmd(&format!("open b {b}")));
    p.cmd("ofd b r 20 10");
    p.cmd("setsig b 10");
    p.cmd(&format!("setown b {}", p.pid()));
    let fc = fd_of(&p.cmd(&format!("open c {c}")));
    p.cmd("flock c ex");
    let fc2 = fd_of(&p.cmd("dup c c2"));
    p.cmd(&format!("setfl c2 {}", libc::O_APPEND | libc::O_NONBLOCK));
    // A lease on a description the fork shares.
    let e = dir.file("e");
    let fe = fd_of(&p.cmd(&format!("openmode e {e} r")));
    p.cmd("lease e w");
    let child = p.fork() as u32;
    let old = p.pid();
    let before = (fdinfo(old, fa), fdinfo(old, fb), fdinfo(old, fc));

    let img = checkpoint(&agent, &cg, &dir);
    p.kill();

    let into = Cgroup::new(false);
    let sock = dir.file("sock");
    let report = restore(
        &img,
        &into,
        &[
            "--exec-cmd",
            &format!("{old}=exec {} --listen {sock}", bin("locker").display()),
            "--exec-cmd",
            &sleep_instead(child),
        ],
    );
    let (np, nc) = (new_pid(&report, old), new_pid(&report, child));
    let mut r = RemoteLocker::connect(&sock);
    r.cmd(&format!("adopt a {fa}"));
    assert_eq!(ppid(nc), np, "the child is the restored parent's child");
    // SAFETY: plain syscalls.
    let (gp, gc) = unsafe { (libc::getpgid(np as i32), libc::getpgid(nc as i32)) };
    assert_eq!(gp, gc, "one process group for the restored tree");
    let mut got = cgroup_pids(&into);
    got.sort_unstable();
    let mut want = vec![np, nc];
    want.sort_unstable();
    assert_eq!(got, want);

    // Same numbers, offsets, flags (O_CLOEXEC included) and contents.
    assert_eq!((fdinfo(np, fa), fdinfo(np, fb), fdinfo(np, fc)), before);
    assert_eq!(fdinfo(np, fc2), fdinfo(np, fc));
    // (the number may be reused by the program, but not for that file)
    for pid in [np, nc] {
        let now = std::fs::read_link(format!("/proc/{pid}/fd/{fd_cloexec}"));
        assert!(
            now.map_or(true, |l| l != std::path::Path::new(&d)),
            "close-on-exec fd survived in {pid}"
        );
    }
    assert_eq!(
        std::fs::read_link(format!("/proc/{np}/fd/{fb}")).unwrap(),
        std::path::PathBuf::from(&b)
    );
    // Shared descriptions are shared again: dup in one process, fork across two.
    assert!(same_description(np, fc, np, fc2));
    assert!(same_description(np, fc, nc, fc));
    assert!(same_description(np, fb, nc, fb));
    assert!(!same_description(np, fa, np, fb));

    // Locks, as the kernel shows them: POSIX ones owned by the restored process.
    let ino = |p: &str| std::fs::metadata(p).unwrap().ino();
    let on_a = proc_locks_on(ino(&a));
    assert_eq!(on_a.len(), 2, "{on_a:?}");
    assert!(
        on_a.iter()
            .any(|l| l.starts_with(&format!("POSIX ADVISORY WRITE {np} ")) && l.ends_with(" 0 8")),
        "{on_a:?}"
    );
    assert!(on_a.iter().any(|l| l.starts_with(&format!("POSIX ADVISORY READ {np} ")) && l.ends_with(" 20 EOF")), "{on_a:?}");
    let on_b = proc_locks_on(ino(&b));
    assert!(
        on_b.len() == 1
            && on_b[0].starts_with("OFDLCK ADVISORY READ -1 ")
            && on_b[0].ends_with(" 20 29"),
        "{on_b:?}"
    );
    let on_e = proc_locks_on(ino(&e));
    assert!(
        on_e.len() == 1 && on_e[0].starts_with(&format!("LEASE ACTIVE WRITE {np} ")),
        "{on_e:?}"
    );
    assert!(same_description(np, fe, nc, fe));
    let on_c = proc_locks_on(ino(&c));
    assert!(
        on_c.len() == 1 && on_c[0].starts_with(&format!("FLOCK ADVISORY WRITE {np} ")),
        "{on_c:?}"
    );

    // The restored process really owns its POSIX lock: it can release it.
    r.cmd("posix a u 0 9");
    assert_eq!(proc_locks_on(ino(&a)).len(), 1);

    // And a second dump of the restored processes says what the first said.
    let again = dir.file("img2");
    let (code, _, err) = agent.dump(&into.path, &again, &[]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = ckpt_user(&["inspect", &again, "--json"]);
    assert_eq!(code, 0);
    let image: Value = serde_json::from_str(&out).unwrap();
    // F_SETSIG and F_SETOWN (the owner's pid translated) came back on b.
    let file_b = image["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == b.as_str())
        .unwrap();
    assert_eq!(file_b["sig"], 10);
    assert_eq!(file_b["owner"], serde_json::json!([1, np]));
    let kinds: Vec<(String, String)> = image["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["kind"].as_str().unwrap().into(),
                l["type"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(kinds.contains(&("ofd".into(), "read".into())), "{kinds:?}");
    assert!(
        kinds.contains(&("flock".into(), "write".into())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("posix".into(), "read".into())),
        "{kinds:?}"
    );
}

#[test]
fn deleted_files_come_back_unlinked_with_their_holes_as_one_inode() {
    let Scene { agent, dir, cg } = Scene::new();
    let g = dir.file("ghost");
    let mut p = cg.locker();
    let fg = fd_of(&p.cmd(&format!("sparse g {g} 4194304")));
    p.cmd("pwrite g 100 marker");
    p.cmd("seek g 12345");
    let fg2 = fd_of(&p.cmd(&format!("open g2 {g}")));
    p.cmd(&format!("unlink {g}"));
    let child = p.fork() as u32;
    let old = p.pid();
    let bytes = std::fs::read(format!("/proc/{old}/fd/{fg}")).unwrap();

    let img = checkpoint(&agent, &cg, &dir);
    p.kill();

    let into = Cgroup::new(false);
    let report = restore(
        &img,
        &into,
        &[
            "--exec-cmd",
            &sleep_instead(old),
            "--exec-cmd",
            &sleep_instead(child),
        ],
    );
    assert_eq!(report["ghosts"], 1);
    let (np, nc) = (new_pid(&report, old), new_pid(&report, child));
    let link = |pid: u32, fd: i32| format!("/proc/{pid}/fd/{fd}");
    // Nameless (O_TMPFILE), in the directory it was deleted from.
    let target = std::fs::read_link(link(np, fg)).unwrap();
    assert_eq!(target.parent(), Some(dir.0.as_path()), "{target:?}");
    assert!(target.display().to_string().ends_with(" (deleted)"));
    let md = std::fs::metadata(link(np, fg)).unwrap();
    assert_eq!((md.nlink(), md.len()), (0, 4194304));
    assert!(
        md.blocks() * 512 < 1 << 20,
        "the hole stayed a hole: {} blocks",
        md.blocks()
    );
    assert_eq!(std::fs::read(link(np, fg)).unwrap(), bytes);
    // Two descriptions of one inode, and the fork's copy shares the first.
    assert_eq!(std::fs::metadata(link(np, fg2)).unwrap().ino(), md.ino());
    assert!(!same_description(np, fg, np, fg2));
    assert!(same_description(np, fg, nc, fg));
    assert_eq!(fdinfo(np, fg).0, 12345);
    assert!(!std::path::Path::new(&g).exists());
    drop(into);

    // Elsewhere with --ghost-dir.
    let ghosts = Scratch::new();
    let into = Cgroup::new(false);
    let gd = ghosts.0.display().to_string();
    let report = restore(
        &img,
        &into,
        &[
            "--ghost-dir",
            &gd,
            "--exec-cmd",
            &sleep_instead(old),
            "--exec-cmd",
            &sleep_instead(child),
        ],
    );
    let np = new_pid(&report, old);
    assert_eq!(
        std::fs::read_link(link(np, fg)).unwrap().parent(),
        Some(ghosts.0.as_path())
    );
    assert_eq!(std::fs::read(link(np, fg)).unwrap(), bytes);
    assert_eq!(std::fs::read_dir(&ghosts.0).unwrap().count(), 0);
    let left: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.iter().all(|n| !n.to_string_lossy().contains("ghost")),
        "{left:?}"
    );
}

#[test]
fn a_posix_waiter_blocks_again_behind_the_restored_holder() {
    let Scene { agent, dir, cg } = Scene::new();
    let f = dir.file("f");
    let mut h = cg.locker();
    h.cmd(&format!("open f {f}"));
    h.cmd("posix f w 0 9");
    let mut w = cg.locker();
    let fw = fd_of(&w.cmd(&format!("open f {f}")));
    w.send("posix f w 0 9 wait");
    wait_for(Duration::from_secs(5), "the waiter to block", || {
        std::fs::read_to_string("/proc/locks")
            .unwrap()
            .contains("->")
            .then_some(())
    });
    let img = checkpoint(&agent, &cg, &dir);
    let (old_h, old_w) = (h.pid(), w.pid());
    drop((h, w));

    let into = Cgroup::new(false);
    let (sh, sw) = (dir.file("sh"), dir.file("sw"));
    let locker = bin("locker").display().to_string();
    let report = restore(
        &img,
        &into,
        &[
            "--exec-cmd",
            &format!("{old_h}=exec {locker} --listen {sh}"),
            "--exec-cmd",
            &format!("{old_w}=exec {locker} --listen {sw}"),
        ],
    );
    let (nh, nw) = (new_pid(&report, old_h), new_pid(&report, old_w));
    let mut rh = RemoteLocker::connect(&sh);
    let mut rw = RemoteLocker::connect(&sw);
    rh.cmd("adopt f 3");
    rw.cmd(&format!("adopt f {fw}"));
    // The restored waiter's program asks again and blocks behind the restored holder.
    rw.send("posix f w 0 9 wait");
    wait_for(
        Duration::from_secs(5),
        "the restored waiter to block",
        || {
            std::fs::read_to_string("/proc/locks")
                .unwrap()
                .lines()
                .any(|l| l.contains("->") && l.contains(&format!(" {nw} ")))
                .then_some(())
        },
    );
    let ino = std::fs::metadata(&f).unwrap().ino();
    assert!(proc_locks_on(ino)[0].starts_with(&format!("POSIX ADVISORY WRITE {nh} ")));
    rh.cmd("posix f u 0 9");
    assert_eq!(rw.reply(), "ok");
}

/// How a lease was broken before the checkpoint.
#[derive(Clone, Copy)]
enum Break {
    /// A write lease broken by an open for writing.
    WriteByWriter,
    /// A read lease broken by an open for writing.
    ReadByWriter,
    /// A write lease downgraded by an open for reading.
    WriteByReader,
}

/// CLOCK_MONOTONIC and the kernel's jiffies, read back to back (for failure output).
fn kernel_clocks() -> String {
    let mono = mono_ns();
    let jiffies = std::fs::read_to_string("/proc/timer_list")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("jiffies: ").map(str::to_string))
        .unwrap_or_default();
    format!("monotonic {mono} ns, jiffies {jiffies}")
}

/// What ckpt-agent does while a lease scenario is restored.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AgentDuring {
    /// Runs: the restore reads each break back from its lease table.
    Running,
    /// Is stopped (SIGSTOP): the break's event waits in the ring, where the restore
    /// finds it (an agent far behind, as under TCG).
    Paused,
    /// Is gone: the restore times its breaks itself.
    Gone,
}

/// The seed scenario: P1 holds a lease, P2's open blocks on it; the checkpoint is made
/// when about 3 s of a 5 s lease-break-time remain; both are killed and restored.
/// `agent` says what the agent does during the restore.
/// Returns (planned remaining from the report, measured revocation after the release,
/// the image's remaining time), all in ms.
fn lease_scenario(
    how: Break,
    policy: &str,
    breaker_in_image: bool,
    during: AgentDuring,
) -> (f64, f64, f64) {
    let Scene { agent, dir, cg } = Scene::new();
    let mut agent = Some(agent);
    let other = Cgroup::new(false);
    let f = dir.file("leased");
    std::fs::write(&f, "data").unwrap();
    let sysctl = LeaseBreakTime::set(5);
    let mut h = cg.locker();
    let (mode, lease, breaker_mode) = match how {
        Break::WriteByWriter => ("r", "w", "w"),
        Break::ReadByWriter => ("r", "r", "w"),
        Break::WriteByReader => ("r", "w", "r"),
    };
    let fh = fd_of(&h.cmd(&format!("openmode f {f} {mode}")));
    h.cmd(&format!("lease f {lease}"));
    let mut b = if breaker_in_image {
        cg.locker()
    } else {
        other.locker()
    };
    b.send(&format!("openmode x {f} {breaker_mode}"));
    wait_for_breaking_lease(&f);
    std::thread::sleep(Duration::from_secs(2));
    let img = checkpoint(agent.as_ref().unwrap(), &cg, &dir);
    let old_h = h.pid();
    let old_b = b.pid();
    drop((h, b));
    let (_, out, _) = ckpt_user(&["inspect", &img, "--json"]);
    let image: Value = serde_json::from_str(&out).unwrap();
    let in_image = image["leases"][0]["remaining_ns"].as_i64().unwrap() as f64 / 1e6;
    assert!(
        (1000.0..3500.0).contains(&in_image),
        "{in_image} ms left at the dump"
    );
    let before = std::fs::read_to_string("/proc/sys/fs/lease-break-time").unwrap();

    let into = Cgroup::new(false);
    let sock = dir.file("sock");
    let exec_h = format!("{old_h}=exec {} --listen {sock}", bin("locker").display());
    let exec_b = sleep_instead(old_b);
    let mut args = vec!["--lease-time", policy, "--exec-cmd", &exec_h];
    if breaker_in_image {
        args.extend(["--exec-cmd", &exec_b]);
    }
    if during == AgentDuring::Gone {
        agent = None;
    }
    let pins = agent.as_ref().map(|a| a.pin_dir.display().to_string());
    if let Some(p) = &pins {
        args.extend(["--pin-dir", p]);
    }
    let paused = agent
        .as_ref()
        .filter(|_| during == AgentDuring::Paused)
        .and_then(|a| a.child.as_ref())
        .map(|c| c.id() as i32);
    // SAFETY: stopping and continuing our own child.
    if let Some(pid) = paused {
        // SAFETY: stopping our own child.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    }
    let report = restore(&img, &into, &args);
    if let Some(pid) = paused {
        // SAFETY: continuing our own child.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    }
    // For a failure's story: the deadline as restore planned it, and as the agent
    // reads the kernel's lease object now, with what the kernel clock says.
    let agent_view: Vec<Value> = agent
        .as_ref()
        .map(|a| a.locks(&[]))
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r["kind"] == "lease" && r["path"] == f.as_str())
        .map(|r| serde_json::json!({"pid": r["pid"], "state": r["state"], "break_deadline_monotonic_ns": r["break_deadline_monotonic_ns"], "break_deadline_jiffies": r["break_deadline_jiffies"]}))
        .collect();
    eprintln!(
        "restore planned {} with warnings {}; agent now: {agent_view:?}; {}",
        report["leases"],
        report["warnings"],
        kernel_clocks()
    );
    if let Some(l) = report["leases"].as_array().unwrap().first() {
        if l["deadline_monotonic_ns"].is_u64() {
            // Read back from the kernel's lease, agent or not.
            assert_eq!(l["deadline_source"], "tracer", "{report}");
        }
    }
    let released = report["released_monotonic_ns"].as_u64().unwrap();
    // Already revoked when the restore returns (what `breaker` promises)?
    let ino = std::fs::metadata(&f).unwrap().ino();
    let gone_at_release = !proc_locks_on(ino).iter().any(|l| l.starts_with("LEASE"));
    assert_eq!(
        std::fs::read_to_string("/proc/sys/fs/lease-break-time").unwrap(),
        before,
        "the sysctl is put back"
    );
    let mut r = RemoteLocker::connect(&sock);
    r.cmd(&format!("adopt f {fh}"));
    let done = match how {
        Break::WriteByReader => "ACTIVE",
        _ => "gone",
    };
    let at: u64 = r.cmd(&format!("pollproc f {done} 10000"))[3..]
        .parse()
        .unwrap();
    // The holder had been sent its break signal before the checkpoint: not again.
    assert_eq!(r.cmd("sigcount"), "ok 0");
    let planned = report["leases"]
        .as_array()
        .unwrap()
        .first()
        .and_then(|l| l["remaining_ns"].as_u64())
        .map_or(0.0, |ns| ns as f64 / 1e6);
    let measured = if gone_at_release {
        0.0
    } else {
        (at as f64 - released as f64) / 1e6
    };
    // Held to here: tests that change the sysctl take turns through this guard.
    drop(sysctl);
    eprintln!(
        "lease {policy}: image {in_image:.1} ms left, planned {planned:.1} ms, revoked after {measured:.1} ms (deadline from {})",
        report["leases"][0]["deadline_source"]
    );
    (planned, measured, in_image)
}

/// The issue's tolerance around the deadline: 20 ms.
const TOLERANCE_MS: f64 = 20.0;

/// How late a process may see a deadline it waits on in `two_deadlines`: it runs when
/// the scheduler lets it, which on a loaded TCG VM is tens of ms after the kernel
/// acted (the deadlines themselves are checked against `TOLERANCE_MS`).
const SEEN_LATE_MS: f64 = 100.0;

#[test]
fn a_breaking_lease_is_revoked_exactly_when_it_had_left() {
    require_root();
    for how in [
        Break::WriteByWriter,
        Break::ReadByWriter,
        Break::WriteByReader,
    ] {
        let (planned, measured, in_image) =
            lease_scenario(how, "exact", true, AgentDuring::Running);
        assert!(
            (planned - in_image).abs() < 1.0,
            "planned {planned} ms, image {in_image} ms"
        );
        assert!(
            (measured - in_image).abs() <= TOLERANCE_MS,
            "revoked {measured:.1} ms after the release, {in_image:.1} ms expected"
        );
    }
}

#[test]
fn lease_time_policies_holder_and_breaker() {
    require_root();
    let (_, measured, _) =
        lease_scenario(Break::WriteByWriter, "holder", true, AgentDuring::Running);
    assert!(
        (measured - 5000.0).abs() <= TOLERANCE_MS,
        "holder: revoked after {measured:.1} ms"
    );
    let (_, measured, _) =
        lease_scenario(Break::WriteByWriter, "breaker", true, AgentDuring::Running);
    // 0.0: already revoked when the restore returned.
    assert!(measured == 0.0, "breaker: revoked after {measured:.1} ms");
    // Without the agent: the restore times the break itself.
    let (_, measured, in_image) =
        lease_scenario(Break::WriteByWriter, "+1", true, AgentDuring::Gone);
    assert!(
        (measured - in_image - 1000.0).abs() <= TOLERANCE_MS,
        "+1: revoked after {measured:.1} ms, image had {in_image:.1}"
    );
}

#[test]
fn a_lease_broken_from_outside_completes_on_time_with_only_its_holder_restored() {
    require_root();
    // With the agent stopped: the break is read from the ring.
    let (_, measured, in_image) =
        lease_scenario(Break::WriteByWriter, "exact", false, AgentDuring::Paused);
    assert!(
        (measured - in_image).abs() <= TOLERANCE_MS,
        "revoked {measured:.1} ms after the release, {in_image:.1} ms expected"
    );
}

/// What `two_deadlines` measured, in ms: the time left in the image for the downgrade
/// and the unlock, and when a reader started after the restore got through, counted
/// from the release (a writer's is checked there).
struct TwoDeadlines {
    downgrade: f64,
    unlock: f64,
    /// When the reader's open was asked for.
    read_sent: f64,
    read_at: f64,
}

/// A write lease being downgraded (a reader waits) that a writer broke to unlock
/// `writer_after` later has two deadlines in the kernel: at the first it becomes a read
/// lease and readers get through, at the second it goes. Dumped `dump_after` after the
/// writer came, restored, and timed with a new reader and a new writer. `holder_open`:
/// the holder's locker command that opens the file as `f`.
fn two_deadlines(holder_open: &str, writer_after: Duration, dump_after: Duration) -> TwoDeadlines {
    let Scene { agent, dir, cg } = Scene::new();
    let outside = Cgroup::new(false);
    let f = dir.file("leased");
    let sysctl = LeaseBreakTime::set(5);
    let mut h = cg.locker();
    let fh = fd_of(&h.cmd(&holder_open.replace("PATH", &f)));
    h.cmd("lease f w");
    let mut reader = outside.locker();
    reader.send(&format!("openmode x {f} r"));
    wait_for_breaking_lease(&f);
    std::thread::sleep(writer_after);
    let mut writer = outside.locker();
    writer.send(&format!("openmode y {f} w"));
    wait_for_lease_breaking_to(&f, "UNLCK");
    std::thread::sleep(dump_after);
    let img = checkpoint(&agent, &cg, &dir);
    let old_h = h.pid();
    drop((h, reader, writer));
    let (_, out, _) = ckpt_user(&["inspect", &img, "--json"]);
    let image: Value = serde_json::from_str(&out).unwrap();
    let lease = &image["leases"][0];
    let unlock = lease["remaining_ns"].as_f64().unwrap() / 1e6;
    let downgrade = lease["downgrade_remaining_ns"].as_f64().unwrap() / 1e6;

    // Started before the restore: a process's start can take most of a second on a
    // loaded VM, which would look like a wait.
    let mut reader = outside.locker();
    let mut writer = outside.locker();
    let into = Cgroup::new(false);
    let sock = dir.file("sock");
    let exec_h = format!("{old_h}=exec {} --listen {sock}", bin("locker").display());
    let pins = agent.pin_dir.display().to_string();
    let report = restore(&img, &into, &["--exec-cmd", &exec_h, "--pin-dir", &pins]);
    let released = report["released_monotonic_ns"].as_u64().unwrap();
    let planned = report["leases"][0]["downgrade_remaining_ns"]
        .as_f64()
        .unwrap_or_else(|| panic!("no downgrade planned: {report}"))
        / 1e6;
    assert!((planned - downgrade.max(1.0)).abs() < 1.0, "{report}");
    // The holder looks at its lease (F_GETLEASE) until it is gone: the kernel acts on
    // a deadline at a lease check after it, and this one makes the downgrade happen
    // at its deadline (a reader blocked behind an unlock pending sleeps until the
    // unlock deadline).
    let mut r = RemoteLocker::connect(&sock);
    r.cmd(&format!("adopt f {fh}"));
    r.send("pollproc f gone 10000");
    let read_sent = (mono_ns() as f64 - released as f64) / 1e6;
    reader.send(&format!("openmode x {f} r"));
    writer.send(&format!("openmode y {f} w"));
    let when = |reply: String| -> f64 {
        assert!(reply.starts_with("ok"), "{reply}");
        // "ok FD MONO" from an open, "ok MONO" from pollproc.
        let mono: u64 = reply.split_whitespace().last().unwrap().parse().unwrap();
        (mono as f64 - released as f64) / 1e6
    };
    let read_at = when(reader.reply());
    let write_at = when(writer.reply());
    // The holder's own look at the lease times the unlock (a blocked writer's wake-up
    // comes on its timer, later under load).
    let gone_at = when(r.reply());
    assert_eq!(r.cmd("sigcount"), "ok 0", "no second SIGIO");
    drop(sysctl);
    eprintln!(
        "downgrade: {downgrade:.1} ms left, a reader sent at {read_sent:.1} through {read_at:.1} ms after the release; unlock: {unlock:.1} ms left, gone {gone_at:.1} ms after it, writers through at {write_at:.1}"
    );
    // The unlock deadline as the restore set it, read back: where the image had it.
    let set = report["leases"][0]["remaining_ns"].as_f64().unwrap() / 1e6;
    assert!(
        (set - unlock).abs() <= TOLERANCE_MS,
        "the unlock was set {set:.1} ms after the release, {unlock:.1} ms expected"
    );
    // Seen by the holder: never before it, and after it by no more than the time a
    // loaded VM takes to run the holder's next look (25 ms once on CI's 6.12 VM).
    assert!(
        (unlock - TOLERANCE_MS..=unlock + SEEN_LATE_MS).contains(&gone_at),
        "the lease went {gone_at:.1} ms after the release, {unlock:.1} ms expected"
    );
    assert!(write_at >= gone_at - TOLERANCE_MS, "{write_at:.1} ms");
    TwoDeadlines {
        downgrade,
        unlock,
        read_sent,
        read_at,
    }
}

/// Both deadlines kept: a new reader gets through when the downgrade had left, a new
/// writer when the unlock had.
#[test]
fn a_downgrade_and_an_unlock_pending_on_one_lease_both_keep_their_time() {
    let t = two_deadlines(
        "openmode f PATH r",
        Duration::from_secs(1),
        Duration::from_millis(300),
    );
    assert!(
        (500.0..t.unlock - 500.0).contains(&t.downgrade),
        "downgrade {:.1} ms, unlock {:.1} ms",
        t.downgrade,
        t.unlock
    );
    // Set where the image had it (checked in `two_deadlines`); seen by a blocked
    // reader never before it, and late by no more than its wake-up on a loaded VM.
    assert!(
        (t.downgrade - TOLERANCE_MS..=t.downgrade + SEEN_LATE_MS).contains(&t.read_at),
        "a reader got through {:.1} ms after the release, {:.1} ms expected",
        t.read_at,
        t.downgrade
    );
}

/// A downgrade overdue at the dump (nothing looked at the lease between its deadline
/// and the dump, so the kernel had not acted on it), on a holder that has the file open
/// for reading and writing: restored as a break due just after the release (the
/// kernel refuses a read lease to a holder open for writing, so F_SETLEASE cannot do
/// it), the unlock on time.
#[test]
fn an_overdue_downgrade_is_made_just_after_the_release_even_for_a_read_write_holder() {
    let t = two_deadlines(
        "open f PATH",
        Duration::from_secs(3),
        Duration::from_millis(2500),
    );
    assert!(
        t.downgrade < 0.0,
        "overdue at the dump: {:.1} ms",
        t.downgrade
    );
    // Not held back until the unlock (or a failed restore: F_SETLEASE to read is
    // refused for this holder): asked for well before it, and through without a wait.
    assert!(
        t.read_sent < t.unlock - 500.0,
        "the reader was sent {:.1} ms after the release, too near the unlock ({:.1}) to tell",
        t.read_sent,
        t.unlock
    );
    assert!(
        t.read_at - t.read_sent < 300.0,
        "a reader sent {:.1} ms after the release got through at {:.1}, the unlock {:.1}",
        t.read_sent,
        t.read_at,
        t.unlock
    );
}

/// Files a failed restore might leave: the scratch directory's names.
fn names(dir: &Scratch) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Restores `img` expecting a refusal that names `what`; checks nothing was left.
fn refused(img: &str, dir: &Scratch, what: &str, extra: &[&str]) {
    let into = Cgroup::new(false);
    let before = names(dir);
    let (code, out, err) = restore_into(img, &into, extra);
    assert_ne!(code, 0, "restore should have failed: {out}");
    assert!(err.contains(what), "expected {what:?} in: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(cgroup_pids(&into).is_empty(), "processes left behind");
    assert_eq!(names(dir), before, "files left behind");
}

#[test]
fn refusals_leave_nothing_behind() {
    let Scene { agent, dir, cg } = Scene::new();
    let f = dir.file("f");
    std::fs::write(&f, "original").unwrap();
    let g = dir.file("g");
    let mut p = cg.locker();
    p.cmd(&format!("open f {f}"));
    p.cmd("posix f w 0 0");
    p.cmd(&format!("open g {g}"));
    p.cmd("pwrite g 0 ghostly");
    p.cmd(&format!("unlink {g}"));
    let img = checkpoint(&agent, &cg, &dir);
    let hashed = dir.file("hashed");
    let (code, _, err) = agent.dump(&cg.path, &hashed, &["--hash"]);
    assert_eq!(code, 0, "{err}");
    let old = p.pid();
    let exec = sleep_instead(old);

    // The original still holds its lock: the restore fails midway, in the helper,
    // after the deleted file was recreated; everything is undone.
    refused(&img, &dir, "conflicting lock", &["--exec-cmd", &exec]);
    p.kill();

    // Images that are not whole.
    let bytes = std::fs::read(&img).unwrap();
    let bad = dir.file("bad");
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0xff;
    std::fs::write(&bad, &flipped).unwrap();
    refused(&bad, &dir, "corrupt", &[]);
    std::fs::write(&bad, &bytes[..bytes.len() - 100]).unwrap();
    refused(&bad, &dir, "corrupt or truncated", &[]);
    let mut newer = bytes.clone();
    newer[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&bad, &newer).unwrap();
    refused(&bad, &dir, "newer", &[]);
    std::fs::remove_file(&bad).unwrap();

    // Same size and mtime, other bytes: only the SHA-256 (dump --hash) tells.
    let orig = std::fs::metadata(&f).unwrap();
    let keep_mtime = |path: &str| {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_times(std::fs::FileTimes::new().set_modified(orig.modified().unwrap()))
            .unwrap();
    };
    std::fs::write(&f, "ORIGINAL").unwrap();
    keep_mtime(&f);
    refused(
        &hashed,
        &dir,
        "contents changed (SHA-256 differs)",
        &["--exec-cmd", &exec],
    );
    std::fs::write(&f, "original").unwrap();
    keep_mtime(&f);

    // A changed file, named with what changed; --force restores anyway, and says so.
    std::fs::write(&f, "original+").unwrap();
    refused(
        &img,
        &dir,
        "size changed from 8 to 9 bytes",
        &["--exec-cmd", &exec],
    );
    let into = Cgroup::new(false);
    let err = restore_said(&img, &into, &["--force", "--exec-cmd", &exec]);
    assert!(
        err.contains("warning: --force") && err.contains("size changed"),
        "{err}"
    );
    drop(into);

    // Another file under the same name, same size and times: still refused.
    std::fs::remove_file(&f).unwrap();
    std::fs::write(&f, "original").unwrap();
    keep_mtime(&f);
    refused(
        &img,
        &dir,
        "now names a different file",
        &["--exec-cmd", &exec],
    );

    // A file that is gone.
    std::fs::remove_file(&f).unwrap();
    refused(&img, &dir, "missing", &["--exec-cmd", &exec]);
}

/// A process whose fd numbers the restoring ckpt-user cannot reach under its hard
/// open-file limit is refused before anything is made, in one line that names the
/// limit and how to raise it; under a limit that fits, the fd comes back at its number.
#[test]
fn fd_numbers_beyond_the_hard_open_file_limit_are_refused_up_front() {
    let Scene { agent, dir, cg } = Scene::new();
    let f = dir.file("f");
    let mut p = cg.locker();
    p.cmd(&format!("open f {f}"));
    assert_eq!(p.cmd("dup2 f high 900"), "ok 900");
    p.cmd("close f");
    let img = checkpoint(&agent, &cg, &dir);
    let old = p.pid();
    p.kill();
    let exec = sleep_instead(old);

    let into = Cgroup::new(false);
    let mut limited = ckpt_user_cmd();
    limited
        .arg("restore")
        .arg(&img)
        .args(["--skip-unsupported", "--exec-cmd", &exec, "--cgroup"])
        .arg(&into.path)
        .stdin(std::process::Stdio::null());
    // SAFETY: setrlimit is async-signal-safe; lowering a limit needs no privilege.
    unsafe {
        limited.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 512,
                rlim_max: 512,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = limited.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "restore under a 512 fd limit: {err}");
    assert!(
        err.contains("up to fd 900") && err.contains("RLIMIT_NOFILE 512"),
        "{err}"
    );
    assert!(err.contains("ulimit -Hn"), "says how to raise it: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        cgroup_pids(&into).is_empty(),
        "processes made before refusing"
    );

    let report = restore(&img, &into, &["--exec-cmd", &exec]);
    let pid = new_pid(&report, old);
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/fd/900")).unwrap(),
        std::path::PathBuf::from(&f)
    );
}

/// `report=$(ckpt-user restore IMG --json)` returns while the restored processes run:
/// standard fds that were pipes get /dev/null by default (ckpt-user's own only where
/// it is a terminal); `--stdio inherit` passes ckpt-user's own on, `--stdio DIR`
/// appends output to DIR/PID.stdout.
#[test]
fn restore_stdio_lets_a_command_substitution_return() {
    use std::io::Read as _;
    let Scene { agent, dir, cg } = Scene::new();
    // The locker's stdin and stdout are pipes to this test.
    let mut p = cg.locker();
    let f = dir.file("f");
    p.cmd(&format!("open f {f}"));
    p.cmd("posix f w 0 0");
    let img = checkpoint(&agent, &cg, &dir);
    let old = p.pid();
    p.kill();
    let exec = sleep_instead(old);
    let fd_target = |pid: u32, fd: i32| {
        std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .map(|t| t.display().to_string())
            .unwrap_or_default()
    };

    // As $(...) runs it: stdout a pipe, read to its end.
    let into = Cgroup::new(false);
    let mut child = ckpt_user_cmd()
        .arg("restore")
        .arg(&img)
        .args([
            "--skip-unsupported",
            "--json",
            "--exec-cmd",
            &exec,
            "--cgroup",
        ])
        .arg(&into.path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    let Ok(report) = rx.recv_timeout(Duration::from_secs(60)) else {
        drop(into);
        panic!("restore's stdout still open 60 s later: the restored processes hold it");
    };
    assert!(child.wait().unwrap().success(), "restore failed");
    let pid = new_pid(&serde_json::from_str(&report).unwrap(), old);
    assert_eq!(fd_target(pid, 0), "/dev/null");
    assert_eq!(fd_target(pid, 1), "/dev/null");
    drop(into);

    // inherit: ckpt-user's own stdout (a file here, removed with run_restore's
    // scratch directory by now) is passed on.
    let into = Cgroup::new(false);
    let pid = new_pid(
        &restore(&img, &into, &["--exec-cmd", &exec, "--stdio", "inherit"]),
        old,
    );
    let out = fd_target(pid, 1);
    assert!(
        out.ends_with("/out") || out.ends_with("/out (deleted)"),
        "{out}"
    );
    drop(into);

    // DIR: output appended to DIR/PID.stdout (PID as in the image), stdin /dev/null.
    let into = Cgroup::new(false);
    let logs = dir.0.join("logs");
    std::fs::create_dir(&logs).unwrap();
    let logs_arg = logs.display().to_string();
    let pid = new_pid(
        &restore(&img, &into, &["--exec-cmd", &exec, "--stdio", &logs_arg]),
        old,
    );
    assert_eq!(fd_target(pid, 0), "/dev/null");
    assert_eq!(fd_target(pid, 1), format!("{logs_arg}/{old}.stdout"));
    drop(into);

    // A DIR that is not one is refused before anything is made.
    refused(
        &img,
        &dir,
        "--stdio /nonexistent: not a directory",
        &["--exec-cmd", &exec, "--stdio", "/nonexistent"],
    );
}

#[test]
fn files_are_opened_with_the_restored_process_credentials() {
    let Scene { agent, dir, cg } = Scene::new();
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let f = dir.file("readable");
    std::fs::write(&f, "x").unwrap();
    std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let mut p = Locker::spawn_with(|c| {
        use std::os::unix::process::CommandExt as _;
        // stderr: the test's own may be a file nobody cannot open for writing.
        c.uid(65534).gid(65534).stderr(std::process::Stdio::null());
    });
    cg.add(p.pid());
    p.cmd(&format!("openmode f {f} r"));
    let img = checkpoint(&agent, &cg, &dir);
    let old = p.pid();
    p.kill();
    // Still the same file (chmod changes neither size nor mtime), but no longer
    // readable by the process: root must not open it on its behalf.
    std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let exec = sleep_instead(old);
    refused(
        &img,
        &dir,
        "as uid 65534: Permission denied",
        &["--exec-cmd", &exec],
    );
    // Readable again: restored, and running as that user.
    std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let into = Cgroup::new(false);
    let report = restore(&img, &into, &["--exec-cmd", &exec]);
    let np = new_pid(&report, old);
    let status = std::fs::read_to_string(format!("/proc/{np}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().skip(1).all(|u| u == "65534")),
        "{status}"
    );
}

#[test]
fn close_on_exec_fds_close_at_the_programs_exec_unless_kept() {
    let Scene { agent, dir, cg } = Scene::new();
    let f = dir.file("f");
    let mut p = cg.locker();
    let fd = fd_of(&p.cmd(&format!("open f {f}")));
    p.cmd("cloexec f");
    p.cmd("posix f w 0 1");
    let img = checkpoint(&agent, &cg, &dir);
    let old = p.pid();
    p.kill();
    let exec = sleep_instead(old);
    let ino = std::fs::metadata(&f).unwrap().ino();

    // As the kernel does: the exec closes the fd, and the lock goes with it; said.
    let into = Cgroup::new(false);
    let err = restore_said(&img, &into, &["--exec-cmd", &exec]);
    assert!(
        err.contains("close-on-exec fd; its program's exec releases it"),
        "{err}"
    );
    assert!(proc_locks_on(ino).is_empty());
    drop(into);

    // --keep-cloexec: the fd and its lock reach the program.
    let into = Cgroup::new(false);
    let report = restore(&img, &into, &["--keep-cloexec", "--exec-cmd", &exec]);
    let np = new_pid(&report, old);
    assert_eq!(fdinfo(np, fd).1 & libc::O_CLOEXEC as u64, 0);
    assert!(proc_locks_on(ino)[0].starts_with(&format!("POSIX ADVISORY WRITE {np} ")));
}

#[test]
fn the_recorded_command_line_runs_by_default_in_its_working_directory() {
    let Scene { agent, dir, cg } = Scene::new();
    let mut child = std::process::Command::new("sleep")
        .arg("600")
        .current_dir(&dir.0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    cg.add(child.id());
    let img = checkpoint(&agent, &cg, &dir);
    let old = child.id();
    child.kill().unwrap();
    child.wait().unwrap();
    let into = Cgroup::new(false);
    let report = restore(&img, &into, &[]);
    let np = new_pid(&report, old);
    assert_eq!(
        std::fs::read(format!("/proc/{np}/cmdline")).unwrap(),
        b"sleep\x00600\x00"
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{np}/cwd")).unwrap(),
        dir.0
    );
}

/// Issue 16, defect 6: what a restore killed while it had changed fs.lease-break-time
/// leaves is repaired by any ckpt command (here `inspect` of a missing image) and by
/// ckpt-agent at start, never while a restore holds the lock; a record that names a
/// value the sysctl does not hold (killed before the change, or the host's setting
/// changed since) repairs nothing and warns about nothing. Before the fix only a later
/// restore that itself broke a lease repaired it.
#[test]
fn a_leftover_lease_break_time_is_repaired_by_any_command_but_not_under_a_restore() {
    require_root();
    let _host = LeaseBreakTime::set(30);
    // A private lock file (CKPT_LEASE_BREAK_TIME_LOCK): no concurrent test's ckpt-user
    // repairs the planted records before the command under test.
    let dir = Scratch::new();
    let lock_file = dir.0.join("lease-break-time.lock");
    let record = |host: u32, a: u32, b: u32| format!("{host:>10} {a:>10} {b:>10}\n");
    let plant = |r: String| std::fs::write(&lock_file, r).unwrap();
    let set = |v: u32| std::fs::write("/proc/sys/fs/lease-break-time", v.to_string()).unwrap();
    let any_command = || {
        let out = ckpt_user_cmd()
            .env("CKPT_LEASE_BREAK_TIME_LOCK", &lock_file)
            .args(["inspect", "/nonexistent/ckpt-image"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    // A restore holds the lock (we do, as one would): left alone.
    plant(record(30, 30, 9));
    set(9);
    let held = std::fs::File::open(&lock_file).unwrap();
    // SAFETY: plain flock on our own fd.
    assert_eq!(
        // SAFETY: plain flock on our own fd.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), libc::LOCK_EX) },
        0
    );
    let err = any_command();
    assert_eq!(
        lease_break_time(),
        9,
        "repaired under a running restore: {err}"
    );
    drop(held);
    // The restore is gone: the next command repairs, once, and says so.
    let err = any_command();
    assert_eq!(lease_break_time(), 30, "{err}");
    assert!(
        err.contains("was killed") && err.contains("set it back to 30"),
        "{err}"
    );
    assert!(std::fs::read_to_string(&lock_file)
        .unwrap()
        .trim()
        .is_empty());
    assert!(!any_command().contains("was killed"));

    // Killed after writing the record, before changing the sysctl: no false warning.
    plant(record(30, 30, 9));
    let err = any_command();
    assert!(!err.contains("was killed"), "{err}");
    assert_eq!(lease_break_time(), 30);
    // A stale record (the host's value changed since): the host's setting stays.
    plant(record(45, 45, 46));
    let err = any_command();
    assert!(!err.contains("was killed"), "{err}");
    assert_eq!(lease_break_time(), 30);

    // ckpt-agent repairs at start (on a pin directory of its own).
    plant(record(30, 30, 9));
    set(9);
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", unique("repair")));
    let mut agent = std::process::Command::new(bin("ckpt-agent"))
        .arg("--pin-dir")
        .arg(&pins)
        .env("CKPT_LEASE_BREAK_TIME_LOCK", &lock_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let repaired = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        lease_break_time() == 30
    });
    let _ = agent.kill();
    let _ = agent.wait();
    remove_pins(&pins);
    assert!(repaired, "ckpt-agent did not repair it at start");
}

/// Issue 16, fault test for restore (and the root of the flaky
/// `lease_time_policies_holder_and_breaker`): SIGKILL at moments spread over restores
/// of two breaking leases (the sysctl holds the first break's value for ~0.5 s until
/// the second). After each kill the next command leaves fs.lease-break-time at the
/// host's value, warns exactly when the sysctl had been left changed, no helper is
/// left, and the lock file holds no record.
#[test]
fn sigkill_at_any_moment_of_a_restore_leaves_the_sysctl_right() {
    let Scene { agent, dir, cg } = Scene::new();
    let sysctl = LeaseBreakTime::set(7);
    let (f1, f2) = (dir.file("l1"), dir.file("l2"));
    let mut h = cg.locker();
    h.cmd(&format!("openmode a {f1} r"));
    h.cmd("lease a w");
    h.cmd(&format!("openmode b {f2} r"));
    h.cmd("lease b w");
    let breaking = || {
        std::fs::read_to_string("/proc/locks")
            .unwrap()
            .matches("BREAKING")
            .count()
    };
    let mut b1 = cg.locker();
    b1.send(&format!("openmode x {f1} w"));
    wait_for(Duration::from_secs(5), "the first break", || {
        (breaking() >= 1).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut b2 = cg.locker();
    b2.send(&format!("openmode x {f2} w"));
    wait_for(Duration::from_secs(5), "the second break", || {
        (breaking() >= 2).then_some(())
    });
    let img = checkpoint(&agent, &cg, &dir);
    let exec: Vec<String> = [h.pid(), b1.pid(), b2.pid()]
        .into_iter()
        .map(sleep_instead)
        .collect();
    drop((h, b1, b2));
    drop(sysctl);
    let _host = LeaseBreakTime::set(30);
    let pins = agent.pin_dir.display().to_string();
    // A private lock file: no concurrent test's ckpt-user repairs what a kill left
    // before this test's own command does (the sysctl itself is serialised by `_host`).
    let lock_file = dir.0.join("lease-break-time.lock");
    const KILLS: u32 = 16;
    let mut changed = 0;
    for i in 0..KILLS {
        let into = Cgroup::new(false);
        let mut cmd = ckpt_user_cmd();
        cmd.env("CKPT_LEASE_BREAK_TIME_LOCK", &lock_file);
        cmd.args([
            "--pin-dir",
            &pins,
            "restore",
            &img,
            "--skip-unsupported",
            "--cgroup",
        ])
        .arg(&into.path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        for e in &exec {
            cmd.args(["--exec-cmd", e]);
        }
        let mut r = cmd.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(
            u64::from(i) * 1000 / u64::from(KILLS),
        ));
        // SAFETY: our child.
        unsafe { libc::kill(r.id() as i32, libc::SIGKILL) };
        let _ = r.wait();
        let left = lease_break_time();
        let out = ckpt_user_cmd()
            .env("CKPT_LEASE_BREAK_TIME_LOCK", &lock_file)
            .args(["inspect", &img])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(lease_break_time(), 30, "kill {i}: left at {left}: {err}");
        assert_eq!(
            err.contains("was killed"),
            left != 30,
            "kill {i}: the sysctl was {left}; said: {err}"
        );
        changed += u32::from(left != 30);
        assert!(
            std::fs::read_to_string(&lock_file)
                .unwrap_or_default()
                .trim()
                .is_empty(),
            "kill {i}: a record is left"
        );
        wait_for(
            Duration::from_secs(5),
            "the restore's helpers to go",
            || {
                cgroup_pids(&into)
                    .iter()
                    .all(|p| {
                        std::fs::read_to_string(format!("/proc/{p}/comm"))
                            .map(|c| c.trim() != "ckpt-user")
                            .unwrap_or(true)
                    })
                    .then_some(())
            },
        );
    }
    assert!(changed > 0, "no kill landed while the sysctl was changed");
    eprintln!("{KILLS} kills, {changed} while the sysctl was changed");
}
