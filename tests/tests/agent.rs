//! ckpt-agent's life cycle (restart, single instance, pins) and the lock table read
//! from the kernel: without an agent, without root, under churn, and in agreement
//! with /proc/locks under load.

use std::{
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use ckpt_tests::*;
use serde_json::Value;

fn rows_on(agent: &Agent, path: &str) -> Vec<Value> {
    let ids = file_ids(&[path]);
    agent
        .locks(&[])
        .into_iter()
        .filter(|r| row_on(r, &ids))
        .collect()
}

/// Tests that do not run beside the stress-ng test. stress-ng's processes come and go
/// by the thousand: a /proc/locks reader that picks rows by pid would see them exit and
/// their pids reused (a flock or OFD lock is listed under the pid that took it). And
/// its flood overflows the ring of an agent starting or restarting beside it (116,967
/// events lost in one agent's first 400 ms in a CI run), which then resynchronises from
/// /proc/locks, a file the kernel cannot list consistently while thousands of locks
/// churn: tests of exact state across a start or a restart would test that overload.
static STRESS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn restart_after_kill9_loses_nothing_but_history() {
    let _alone = STRESS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let pin = PathBuf::from("/sys/fs/bpf").join(unique("ckpt-restart"));
    let dir = Scratch::new();
    let (f1, f2, f3) = (dir.file("1"), dir.file("2"), dir.file("3"));
    let ino = file_ids(&[&f1, &f2, &f3]);

    let mut first = Agent::start_on(&pin, &[]);
    let mut a = Locker::spawn();
    a.cmd(&format!("open x {f1}"));
    a.cmd("posix x w 0 10");
    let mut w = Locker::spawn();
    w.cmd(&format!("open x {f1}"));
    w.send("posix x w 0 1 wait");
    let since = wait_for(Duration::from_secs(5), "waiter", || {
        rows_on(&first, &f1)
            .first()
            .and_then(|r| r["waiters"][0]["since_monotonic_ns"].as_u64())
    });
    first.kill9();

    // While no agent runs: two locks taken.
    a.cmd(&format!("open y {f2}"));
    a.cmd("flock y ex");
    a.cmd(&format!("open z {f3}"));
    a.cmd("ofd z r 100 0");

    let second = Agent::start_on(&pin, &[]);
    assert!(
        second.log_text().contains("re-adopting pinned maps"),
        "{}",
        second.log_text()
    );
    for f in [&f1, &f2, &f3] {
        let rows = rows_on(&second, f);
        assert_eq!(rows.len(), 1, "{f}: {rows:?}");
        assert_eq!(rows[0]["origin"], "kernel");
        assert!(rows[0]["owner"].is_string());
    }
    // The wait's record, pinned, survived the restart.
    assert_eq!(
        rows_on(&second, &f1)[0]["waiters"][0]["since_monotonic_ns"],
        since
    );
    assert_agrees(&second, Some(&ino));
    a.cmd("posix x u 0 0");
    assert_eq!(w.reply(), "ok");
}

#[test]
fn a_second_agent_on_the_same_pins_is_refused() {
    let agent = Agent::start();
    let out = Command::new(bin("ckpt-agent"))
        .arg("--pin-dir")
        .arg(&agent.pin_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already running") && err.contains(&agent.pid().to_string()),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn sigterm_keeps_pins_and_unpin_removes_them() {
    let pin = PathBuf::from("/sys/fs/bpf").join(unique("ckpt-term"));
    let mut agent = Agent::start_on(&pin, &[]);
    assert_eq!(agent.terminate(), Some(0));
    assert!(pin.join("maps/WAITS").exists() && pin.join("links/posix_lock_inode").exists());
    drop(agent);

    let mut agent = Agent::start_on(&pin, &["--unpin"]);
    assert_eq!(agent.terminate(), Some(0));
    assert!(!pin.exists(), "--unpin left {}", pin.display());
}

/// The kernel is the table: without an agent, `ckpt-user locks` loads the iterators
/// itself and shows every lock with its owner, and waiters (without their waiting
/// time, which only the agent's tracer records).
#[test]
fn without_an_agent_locks_and_waiters_are_exact() {
    let _alone = STRESS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = Scratch::new();
    let (f1, f2, f3) = (dir.file("1"), dir.file("2"), dir.file("3"));
    let ino = file_ids(&[&f1, &f2, &f3]);
    let mut a = Locker::spawn();
    a.cmd(&format!("open x {f1}"));
    a.cmd("posix x w 0 10");
    a.cmd(&format!("open y {f2}"));
    a.cmd("flock y sh");
    a.cmd(&format!("open z {f3}"));
    a.cmd("ofd z w 5 5");
    let mut w = Locker::spawn();
    w.cmd(&format!("open x {f1}"));
    w.send("posix x r 5 1 wait");
    let nowhere = PathBuf::from("/sys/fs/bpf").join(unique("ckpt-none"));
    let rows = wait_for(Duration::from_secs(5), "waiter", || {
        let (rows, _) = ckpt_locks(&nowhere, &["--pid", &a.pid().to_string()]);
        rows.iter()
            .any(|r| r["waiters"].as_array().is_some_and(|w| !w.is_empty()))
            .then_some(rows)
    });
    assert_eq!(rows.len(), 3, "{rows:?}");
    for r in &rows {
        assert_eq!(r["source"], "kernel");
        assert_eq!(r["pid"], a.pid());
        assert!(r["owner"].is_string() && r["fd"].is_i64(), "{r}");
    }
    let waiter = rows
        .iter()
        .find_map(|r| r["waiters"].as_array().filter(|w| !w.is_empty()))
        .unwrap();
    assert_eq!(waiter[0]["pid"], w.pid());
    assert!(waiter[0]["waiting_ms"].is_null());
    assert_agrees_at(&nowhere, |s| ino.contains(&(s.3.clone(), s.4)));
    a.cmd("posix x u 0 0");
    assert_eq!(w.reply(), "ok");
}

#[test]
fn without_root_locks_falls_back_to_proc_and_says_so() {
    let _alone = STRESS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = Scratch::new();
    let f = dir.file("fallback");
    let mut a = Locker::spawn();
    a.cmd(&format!("open x {f}"));
    a.cmd("posix x r 0 10");
    let out = Command::new(bin("ckpt-user"))
        .args(["locks", "--json", "--pid", &a.pid().to_string()])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("needs root") && stderr.contains("/proc/locks"),
        "{stderr}"
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["source"], "proc");
    assert_eq!(rows[0]["pid"], a.pid());
}

/// While lockers run un-stopped, each taking ranges that encode its pid and a
/// sequence number, no read of the table returns a row that is not self-consistent:
/// recycled lock memory read mid-change is caught by the walk's checks.
#[test]
fn churn_never_yields_an_inconsistent_row() {
    let _alone = STRESS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = Scratch::new();
    let f = dir.file("churn");
    let ids = file_ids(&[&f]);
    let mut lockers: Vec<Locker> = (0..3).map(|_| Locker::spawn()).collect();
    for l in &mut lockers {
        l.cmd(&format!("seqlock {f}"));
    }
    let pids: Vec<u32> = lockers.iter().map(ckpt_tests::Locker::pid).collect();
    // Reads through the agent's pinned iterators: the same walk as without an agent
    // (`without_an_agent_locks_and_waiters_are_exact` covers the self-loaded one), but
    // without 200 program loads, which take seconds each in a TCG guest.
    let agent = Agent::start();
    let mut seen = 0;
    for _ in 0..200 {
        let (rows, _) = ckpt_locks(&agent.pin_dir, &[]);
        for r in rows.iter().filter(|r| row_on(r, &ids)) {
            seen += 1;
            let pid = r["pid"].as_u64().unwrap() as u32;
            let start = r["start"].as_i64().unwrap();
            let seq = start & 0xffff_ffff;
            // locker `seqlock`: write locks of 1 byte at pid * 2^32 + seq, seq even.
            assert!(pids.contains(&pid), "a lock of an unknown pid: {r}");
            assert_eq!(start >> 32, i64::from(pid), "range not of its pid: {r}");
            assert_eq!(seq % 2, 0, "a sequence number the pid never took: {r}");
            assert_eq!(r["end"].as_i64(), Some(start), "one byte: {r}");
            assert_eq!(r["type"], "write", "{r}");
            assert_eq!(r["kind"], "posix", "{r}");
        }
    }
    assert!(seen > 0, "no lock seen: the test proves nothing");
    for mut l in lockers {
        l.kill();
    }
}

/// stress-ng's lock stressors on their own tmpfs, stopped at random points: the table
/// must equal /proc/locks exactly every time, waiters included; halfway, the agent is
/// killed with SIGKILL and restarted under the flood, and the very next check holds.
#[test]
fn agrees_with_proc_locks_under_stress_ng() {
    let _alone = STRESS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let pin = PathBuf::from("/sys/fs/bpf").join(unique("ckpt-stress"));
    let mut agent = Agent::start_on(&pin, &[]);
    let dir = Scratch::new();
    let mnt = dir.0.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(ok.success());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let st_dev = {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&mnt).unwrap();
        format!("{}:{}", libc::major(m.dev()), libc::minor(m.dev()))
    };

    let mut stress = Command::new("stress-ng")
        .args([
            "--fcntl",
            "2",
            "--flock",
            "2",
            "--lockofd",
            "2",
            "--lockf",
            "2",
            "--timeout",
            "20s",
            "--temp-path",
        ])
        .arg(&mnt)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("stress-ng (apt install stress-ng; `cargo xtask setup` does it)");
    let pgid = stress.id() as i32;
    std::thread::sleep(Duration::from_millis(800));
    let mut seed = u64::from(std::process::id());
    let mut checked_locks = 0;
    let mut checked_waiters = 0;
    for round in 0..8 {
        if round == 4 {
            agent.kill9();
            agent = Agent::start_on(&pin, &[]);
        }
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(100 + (seed >> 33) % 400));
        // SAFETY: signalling our own process group.
        unsafe { libc::kill(-pgid, libc::SIGSTOP) };
        std::thread::sleep(Duration::from_millis(100));
        assert_agrees_on(&agent, |s| s.3 == st_dev);
        checked_locks += proc_shapes().iter().filter(|s| s.3 == st_dev).count();
        checked_waiters += proc_waiter_shapes()
            .iter()
            .filter(|s| s.3 == st_dev)
            .count();
        // SAFETY: signalling our own stress-ng process group.
        unsafe { libc::kill(-pgid, libc::SIGCONT) };
    }
    // SAFETY: as above.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = stress.wait();
    assert!(
        checked_locks > 0,
        "stress-ng never held a lock when stopped: test proves nothing"
    );
    eprintln!("checked {checked_locks} locks and {checked_waiters} waiters");
    let log = agent.log_text();
    assert!(!log.contains("map full"), "records were lost: {log}");
}
