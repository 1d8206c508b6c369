//! The live lock table against the kernel: every lock kind and transition, lock for
//! lock against /proc/locks. Root, real kernel, real processes.

use std::{collections::BTreeSet, time::Duration};

use ckpt_tests::*;
use serde_json::Value;

fn on(rows: Vec<Value>, path: &str) -> Vec<Value> {
    let (dev, ino) = dev_ino(path);
    rows.into_iter()
        .filter(|r| r["inode"] == ino && r["dev"] == dev.as_str())
        .collect()
}

fn ranges(rows: &[Value]) -> Vec<(String, i64, i64)> {
    let mut v: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r["type"].as_str().unwrap().to_string(),
                r["start"].as_i64().unwrap(),
                r["end"].as_i64().unwrap(),
            )
        })
        .collect();
    v.sort_by_key(|x| x.1);
    v
}

fn rw(t: &str, s: i64, e: i64) -> (String, i64, i64) {
    (t.to_string(), s, e)
}

#[test]
fn posix_split_merge_upgrade_downgrade() {
    let agent = Agent::start();
    let dir = Scratch::new();
    let f = dir.file("posix");
    let ino = file_ids(&[&f]);
    let mut p = Locker::spawn();
    p.cmd(&format!("open a {f}"));

    p.cmd("posix a w 0 100");
    assert_eq!(ranges(&on(agent.locks(&[]), &f)), vec![rw("write", 0, 99)]);
    p.cmd("posix a u 10 10"); // unlock in the middle: split
    assert_eq!(
        ranges(&on(agent.locks(&[]), &f)),
        vec![rw("write", 0, 9), rw("write", 20, 99)]
    );
    assert_agrees(&agent, Some(&ino));
    p.cmd("posix a r 10 10"); // fill the hole with a read lock: three ranges
    assert_eq!(
        ranges(&on(agent.locks(&[]), &f)),
        vec![rw("write", 0, 9), rw("read", 10, 19), rw("write", 20, 99)]
    );
    p.cmd("posix a w 10 10"); // upgrade the middle: merges back into one
    assert_eq!(ranges(&on(agent.locks(&[]), &f)), vec![rw("write", 0, 99)]);
    p.cmd("posix a r 0 0"); // downgrade to EOF from 0
    assert_eq!(
        ranges(&on(agent.locks(&[]), &f)),
        vec![rw("read", 0, i64::MAX)]
    );
    assert_agrees(&agent, Some(&ino));
    p.cmd("posix a w 200 0"); // upgrade the tail
    p.cmd("posix a r 100 50"); // no-op inside a read range
    assert_eq!(
        ranges(&on(agent.locks(&[]), &f)),
        vec![rw("read", 0, 199), rw("write", 200, i64::MAX)]
    );
    assert_agrees(&agent, Some(&ino));
    p.cmd("posix a u 0 0");
    assert!(on(agent.locks(&[]), &f).is_empty());

    // Fields of a row.
    p.cmd("posix a w 5 5");
    let rows = on(agent.locks(&[]), &f);
    let r = &rows[0];
    assert_eq!(r["kind"], "posix");
    assert_eq!(r["pid"], p.pid());
    assert_eq!(r["command"], "locker");
    assert_eq!(r["path"], f.as_str());
    assert_eq!(r["origin"], "kernel");
    assert_eq!(r["source"], "kernel");
    assert!(r["owner"].is_string());
    assert!(r["fd"].is_number());
    assert_eq!(r["eof"], false);
    assert!(r["waiters"].as_array().unwrap().is_empty());
}

#[test]
fn closing_any_fd_drops_posix_locks_and_exit_drops_everything() {
    let agent = Agent::start();
    let dir = Scratch::new();
    let (f, g) = (dir.file("a"), dir.file("b"));
    let ino = file_ids(&[&f, &g]);
    let mut p = Locker::spawn();
    p.cmd(&format!("open a {f}"));
    p.cmd(&format!("open a2 {f}"));
    p.cmd("posix a w 0 10");
    p.cmd("posix a r 20 10");
    // POSIX semantics: closing *another* fd of the same file releases the locks.
    p.cmd("close a2");
    assert!(on(agent.locks(&[]), &f).is_empty());
    assert_agrees(&agent, Some(&ino));

    p.cmd(&format!("open b {g}"));
    p.cmd("posix a w 0 10");
    p.cmd("ofd b r 0 10");
    p.cmd("flock b ex");
    assert_eq!(
        agent.locks(&[]).iter().filter(|r| row_on(r, &ino)).count(),
        3
    );
    p.kill();
    let left: Vec<Value> = agent
        .locks(&[])
        .into_iter()
        .filter(|r| row_on(r, &ino))
        .collect();
    assert!(left.is_empty(), "locks survived process exit: {left:?}");
    assert_agrees(&agent, Some(&ino));
}

#[test]
fn ofd_locks_belong_to_open_file_descriptions() {
    let agent = Agent::start();
    let dir = Scratch::new();
    let f = dir.file("ofd");
    let ino = file_ids(&[&f]);
    let mut p = Locker::spawn();
    p.cmd(&format!("open a {f}"));
    p.cmd(&format!("open b {f}"));
    p.cmd("ofd a r 0 10");
    p.cmd("ofd b r 5 10");
    // Two descriptions of one process conflict with each other for OFD locks.
    assert_eq!(p.try_cmd("ofd b w 0 1"), format!("err {}", libc::EAGAIN));
    let rows = on(agent.locks(&[]), &f);
    assert_eq!(rows.len(), 2);
    assert_ne!(
        rows[0]["owner"], rows[1]["owner"],
        "one owner per open file description"
    );
    assert!(rows
        .iter()
        .all(|r| r["kind"] == "ofd" && r["pid"] == p.pid()));
    assert_agrees(&agent, Some(&ino));
    // A dup shares the description: unlocking through it unlocks a's lock.
    p.cmd("dup a a2");
    p.cmd("ofd a2 u 0 0");
    assert_eq!(ranges(&on(agent.locks(&[]), &f)), vec![rw("read", 5, 14)]);
    // OFD locks survive closing another fd of the file (unlike POSIX locks)...
    p.cmd("close a");
    p.cmd("close a2");
    assert_eq!(on(agent.locks(&[]), &f).len(), 1);
    // ...and go with the last close of their own description.
    p.cmd("close b");
    assert!(on(agent.locks(&[]), &f).is_empty());
    assert_agrees(&agent, Some(&ino));
}

#[test]
fn flock_shared_by_fork_is_one_lock_until_the_last_holder_goes() {
    let agent = Agent::start();
    let dir = Scratch::new();
    let f = dir.file("flock");
    let ino = file_ids(&[&f]);
    let mut p = Locker::spawn();
    p.cmd(&format!("open a {f}"));
    p.cmd("flock a sh");
    p.cmd("flock a ex"); // upgrade
    let child = p.fork();
    let rows = on(agent.locks(&[]), &f);
    assert_eq!(
        rows.len(),
        1,
        "a fork-shared description holds one lock: {rows:?}"
    );
    assert_eq!(rows[0]["type"], "write");
    let owner = rows[0]["owner"].clone();
    p.cmd("close a"); // the child still holds the description
    let rows = on(agent.locks(&[]), &f);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["owner"], owner);
    assert_agrees(&agent, Some(&ino));
    // SAFETY: our grandchild.
    unsafe { libc::kill(child, libc::SIGKILL) };
    wait_for(
        Duration::from_secs(5),
        "lock release at the last close",
        || on(agent.locks(&[]), &f).is_empty().then_some(()),
    );
    assert_agrees(&agent, Some(&ino));
}

#[test]
fn failed_flock_conversion_drops_the_old_lock_like_the_kernel() {
    let agent = Agent::start();
    let dir = Scratch::new();
    let f = dir.file("conv");
    let ino = file_ids(&[&f]);
    let mut a = Locker::spawn();
    let mut b = Locker::spawn();
    a.cmd(&format!("open x {f}"));
    b.cmd(&format!("open x {f}"));
    a.cmd("flock x sh");
    b.cmd("flock x sh");
    assert_eq!(a.try_cmd("flock x ex nb"), format!("err {}", libc::EAGAIN));
    // The kernel released a's shared lock before failing the conversion.
    let rows = on(agent.locks(&[]), &f);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["pid"], b.pid());
    assert_agrees(&agent, Some(&ino));
}

#[test]
fn two_processes_on_one_file() {
    let agent = Agent::start();
    let dir = Scratch::new();
    let f = dir.file("shared");
    let ino = file_ids(&[&f]);
    let mut a = Locker::spawn();
    let mut b = Locker::spawn();
    a.cmd(&format!("open x {f}"));
    b.cmd(&format!("open x {f}"));
    a.cmd("posix x r 0 100");
    b.cmd("posix x r 50 100");
    assert_eq!(b.try_cmd("posix x w 0 10"), format!("err {}", libc::EAGAIN));
    let rows = on(agent.locks(&[]), &f);
    let pids: BTreeSet<u64> = rows.iter().map(|r| r["pid"].as_u64().unwrap()).collect();
    assert_eq!(
        pids,
        BTreeSet::from([u64::from(a.pid()), u64::from(b.pid())])
    );
    assert_ne!(rows[0]["owner"], rows[1]["owner"]);
    assert_agrees(&agent, Some(&ino));
    // --pid filter
    let only_b = on(agent.locks(&["--pid", &b.pid().to_string()]), &f);
    assert_eq!(only_b.len(), 1);
    assert_eq!(only_b[0]["pid"], b.pid());
}

/// Waits until `pid` shows up as a waiter on a lock of `path`; returns that lock's row.
fn waited_on(agent: &Agent, path: &str, pid: u32) -> Value {
    wait_for(Duration::from_secs(5), "waiter to appear", || {
        on(agent.locks(&[]), path).into_iter().find(|r| {
            r["waiters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w["pid"] == pid)
        })
    })
}

#[test]
fn blocked_posix_waiter_is_shown_then_granted() {
    let agent = Agent::start();
    let dir = Scratch::new();
    let f = dir.file("wait");
    let ino = file_ids(&[&f]);
    let mut holder = Locker::spawn();
    let mut waiter = Locker::spawn();
    holder.cmd(&format!("open x {f}"));
    waiter.cmd(&format!("open x {f}"));
    holder.cmd("posix x w 0 100");
    waiter.send("posix x w 50 10 wait");
    let row = waited_on(&agent, &f, waiter.pid());
    assert_eq!(row["pid"], holder.pid());
    let w = &row["waiters"][0];
    assert_eq!(
        (w["kind"].as_str(), w["type"].as_str()),
        (Some("posix"), Some("write"))
    );
    assert_eq!(
        (w["start"].as_i64(), w["end"].as_i64()),
        (Some(50), Some(59))
    );
    let first = w["waiting_ms"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let later = waited_on(&agent, &f, waiter.pid())["waiters"][0]["waiting_ms"]
        .as_u64()
        .unwrap();
    assert!(
        later >= first + 250,
        "waiting time counts up ({first} -> {later})"
    );
    // The table as text shows the waiter too.
    let text = std::process::Command::new(bin("ckpt-user"))
        .args([
            "--pin-dir",
            agent.pin_dir.to_str().unwrap(),
            "locks",
            "--pid",
            &holder.pid().to_string(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("WAITERS") && text.contains(&format!("{}(", waiter.pid())),
        "{text}"
    );

    holder.cmd("posix x u 0 0");
    assert_eq!(waiter.reply(), "ok");
    let rows = on(agent.locks(&[]), &f);
    assert_eq!(ranges(&rows), vec![rw("write", 50, 59)]);
    assert_eq!(rows[0]["pid"], waiter.pid());
    assert!(rows[0]["waiters"].as_array().unwrap().is_empty());
    assert_agrees(&agent, Some(&ino));
}

#[test]
fn waiters_that_give_up_on_a_signal_are_removed() {
    let agent = Agent::start();
    let dir = Scratch::new();
    let f = dir.file("giveup");
    let g = dir.file("giveup-ofd");
    let mut holder = Locker::spawn();
    holder.cmd(&format!("open x {f}"));
    holder.cmd("posix x w 0 0");
    holder.cmd(&format!("open y {g}"));
    holder.cmd("ofd y r 0 0");
    // flock and POSIX locks do not interact: the same file serves both.
    holder.cmd(&format!("open z {f}"));
    holder.cmd("flock z ex");

    for (kind, path, req) in [
        ("posix", &f, "posix x w 0 1 wait"),
        ("ofd", &g, "ofd x w 0 1 wait"),
        ("flock", &f, "flock x ex"),
    ] {
        let f = path.as_str();
        let mut waiter = Locker::spawn();
        waiter.cmd(&format!("open x {f}"));
        waiter.send(req);
        let row = waited_on(&agent, f, waiter.pid());
        let w = row["waiters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["pid"] == waiter.pid())
            .unwrap()
            .clone();
        assert_eq!(w["kind"], kind);
        waiter.signal(libc::SIGUSR1);
        assert_eq!(waiter.reply(), format!("err {}", libc::EINTR));
        let still = on(agent.locks(&[]), f).into_iter().any(|r| {
            r["waiters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w["pid"] == waiter.pid())
        });
        assert!(!still, "{kind} waiter still listed after giving up");
    }
}

#[test]
fn cgroup_filter_v2_and_v1() {
    let agent = Agent::start();
    let dir = Scratch::new();
    let f = dir.file("cg");
    let mut inside = Locker::spawn();
    let mut outside = Locker::spawn();
    inside.cmd(&format!("open x {f}"));
    outside.cmd(&format!("open x {f}"));
    inside.cmd("posix x r 0 10");
    outside.cmd("posix x r 0 10");
    let roots: Vec<String> = [
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/freezer",
    ]
    .iter()
    .filter(|r| std::path::Path::new(r).join("cgroup.procs").exists())
    .map(std::string::ToString::to_string)
    .collect();
    assert!(!roots.is_empty(), "no cgroup hierarchy found");
    for root in roots {
        let name = unique("ckpt-cg");
        let cg = format!("{root}/{name}");
        std::fs::create_dir(&cg).unwrap();
        std::fs::write(format!("{cg}/cgroup.procs"), inside.pid().to_string()).unwrap();
        // Full path and a path relative to the mount both work.
        for arg in [cg.clone(), name.clone()] {
            if arg == name
                && root.ends_with("freezer")
                && std::path::Path::new("/sys/fs/cgroup/unified").exists()
            {
                continue; // a relative name resolves in cgroup2 first
            }
            let rows = on(agent.locks(&["--cgroup", &arg]), &f);
            assert_eq!(rows.len(), 1, "cgroup {arg}: {rows:?}");
            assert_eq!(rows[0]["pid"], inside.pid());
        }
        // Move it back out, then remove the cgroup.
        std::fs::write(format!("{root}/cgroup.procs"), inside.pid().to_string()).unwrap();
        std::fs::remove_dir(&cg).unwrap();
    }
    let out = std::process::Command::new(bin("ckpt-user"))
        .args([
            "--pin-dir",
            agent.pin_dir.to_str().unwrap(),
            "locks",
            "--cgroup",
            "no-such-cgroup-xyz",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such-cgroup-xyz") && err.lines().count() == 1,
        "{err}"
    );
}

/// The kernel restarts a wait interrupted by a stop (or a freeze) on a new request:
/// the wait keeps its start time. A wait abandoned on a signal (EINTR) ends, and the
/// next one of the same request starts afresh.
#[test]
fn a_restarted_wait_keeps_its_start_and_an_abandoned_one_ends() {
    let agent = Agent::start();
    let dir = Scratch::new();
    let f = dir.file("restart");
    let mut holder = Locker::spawn();
    holder.cmd(&format!("open x {f}"));
    holder.cmd("posix x w 0 0");
    let mut waiter = Locker::spawn();
    waiter.cmd(&format!("open x {f}"));
    // When the agent says the wait began (CLOCK_MONOTONIC): compared with the test's
    // own clock, so that a slow machine (a TCG guest) cannot fake either outcome.
    let since = |agent: &Agent, pid: u32| -> u64 {
        waited_on(agent, &f, pid)["waiters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["pid"] == pid)
            .unwrap()["since_monotonic_ns"]
            .as_u64()
            .expect("the agent knows when the wait began")
    };
    let before = mono_ns();
    waiter.send("posix x w 0 1 wait");
    let first = since(&agent, waiter.pid());
    assert!(first >= before, "{first} < {before}");
    std::thread::sleep(Duration::from_millis(300));
    waiter.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(300));
    waiter.signal(libc::SIGCONT);
    // Back in the kernel's tree on a new request, with the first start.
    wait_for(Duration::from_secs(10), "the restarted wait", || {
        let rows = on(agent.locks(&[]), &f);
        let w = rows
            .iter()
            .flat_map(|r| r["waiters"].as_array().unwrap().clone())
            .find(|w| w["pid"] == waiter.pid())?;
        let state =
            std::fs::read_to_string(format!("/proc/{}/stat", waiter.pid())).unwrap_or_default();
        // Stopped ('T') tasks are not in the tree: wait until it runs again.
        (!state.contains(") T ")).then_some(())?;
        assert_eq!(
            w["since_monotonic_ns"].as_u64(),
            Some(first),
            "the restarted wait kept its start: {w}"
        );
        Some(())
    });

    waiter.signal(libc::SIGUSR1);
    assert_eq!(waiter.reply(), format!("err {}", libc::EINTR));
    let abandoned = mono_ns();
    waiter.send("posix x w 0 1 wait");
    let fresh = since(&agent, waiter.pid());
    assert!(
        fresh >= abandoned,
        "a new wait starts afresh: {fresh} < {abandoned}"
    );
    holder.cmd("posix x u 0 0");
    assert_eq!(waiter.reply(), "ok");
}

/// More lockers on one file than the walk once read (64 steps): every reader's lock
/// comes from the kernel's lists with the blocked writer behind it. One fd holding
/// more locks than a walk writes gets them from fdinfo, said in one line, and the
/// read does not fail (one fd's lines must fit the kernel's buffer for an object).
#[test]
fn a_crowded_file_shows_every_locker_and_its_waiter() {
    use ckpt_common::files::LOCK_LINES_PER_FD;
    const READERS: usize = 150;
    let agent = Agent::start();
    let dir = Scratch::new();
    let f = dir.file("crowded");
    let ino = file_ids(&[&f]);
    let mut readers: Vec<Locker> = (0..READERS).map(|_| Locker::spawn()).collect();
    for (i, r) in readers.iter_mut().enumerate() {
        r.cmd(&format!("open x {f}"));
        r.cmd(&format!("posix x r {} 1", i * 2));
    }
    let mut writer = Locker::spawn();
    writer.cmd(&format!("open x {f}"));
    writer.send("posix x w 0 0 wait");
    let rows = wait_for(
        Duration::from_secs(10),
        "the writer's wait behind every reader",
        || {
            let rows = on(agent.locks(&[]), &f);
            let behind = |r: &Value| {
                r["waiters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|w| w["pid"] == writer.pid())
            };
            (rows.len() == READERS && rows.iter().all(behind)).then_some(rows)
        },
    );
    assert!(
        rows.iter().all(|r| r["origin"] == "kernel"),
        "{:?}",
        rows.iter()
            .map(|r| r["origin"].to_string())
            .collect::<BTreeSet<_>>()
    );
    assert_agrees(&agent, Some(&ino));
    drop(readers);
    assert_eq!(writer.reply(), "ok");
    drop(writer);

    let many = LOCK_LINES_PER_FD + 10;
    let mut holder = Locker::spawn();
    holder.cmd(&format!("bulk {} 1 {many}", dir.0.display()));
    let (rows, notes) = ckpt_locks(&agent.pin_dir, &["--pid", &holder.pid().to_string()]);
    assert_eq!(rows.len(), many, "{notes}");
    assert!(rows.iter().all(|r| r["origin"] == "fdinfo"));
    assert!(
        notes.contains("1 fds have more locks and waiters than a walk reads")
            && notes.trim().lines().count() == 1,
        "{notes}"
    );
}
