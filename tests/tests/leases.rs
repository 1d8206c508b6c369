//! Leases against the kernel: the tracer's break deadline equals the kernel's own
//! (read from a private tracefs instance) to the jiffy, revocation lands on it, and
//! every break shape and holder reaction is followed. Lease tests change the global
//! lease-break-time sysctl, so they run one at a time (LeaseBreakTime).

use std::time::Duration;

use ckpt_tests::*;
use serde_json::Value;

fn lease_row(agent: &Agent, path: &str) -> Option<Value> {
    let (dev, ino) = dev_ino(path);
    agent
        .locks(&[])
        .into_iter()
        .find(|r| r["kind"] == "lease" && r["inode"] == ino && r["dev"] == dev.as_str())
}

fn wait_state(agent: &Agent, path: &str, state: &str) -> Value {
    wait_for(Duration::from_secs(5), &format!("lease {state}"), || {
        lease_row(agent, path).filter(|r| r["state"] == state)
    })
}

/// A holder with a lease of `kind` ("r" or "w") on a fresh file. The fd is read-only:
/// the kernel grants a write lease on it too, and refuses a read lease (and so a
/// downgrade) while anyone, the holder included, has the file open for writing.
fn holder(dir: &Scratch, name: &str, kind: &str) -> (Locker, String) {
    let f = dir.file(name);
    let mut h = Locker::spawn();
    h.cmd(&format!("openmode x {f} r"));
    h.cmd(&format!("lease x {kind}"));
    (h, f)
}

/// Milliseconds between the moment the kernel acted (seen by the holder) and the
/// deadline ckpt reported.
fn offset_ms(seen: &str, row: &Value) -> f64 {
    let t: u64 = seen[3..].parse().unwrap();
    let deadline = row["break_deadline_monotonic_ns"].as_u64().unwrap();
    (t as i64 - deadline as i64) as f64 / 1e6
}

#[test]
fn write_lease_broken_by_writer_deadline_is_the_kernels_and_revocation_hits_it() {
    let _sysctl = LeaseBreakTime::set(2);
    let agent = Agent::start();
    let trace = TraceInstance::new("filelock/time_out_leases");
    let dir = Scratch::new();
    let (mut h, f) = holder(&dir, "w-by-w", "w");
    let active = wait_state(&agent, &f, "active");
    assert_eq!(active["type"], "write");
    assert_eq!(active["target_type"], "write");
    assert!(active["remaining_ms"].is_null());
    assert_eq!(active["origin"], "kernel");

    let mut breaker = Locker::spawn();
    breaker.send(&format!("openmode y {f} w"));
    // The kernel marks the lease breaking before the breaker blocks (and its wait is
    // recorded): wait for both.
    let row = wait_for(Duration::from_secs(5), "the breaker blocked", || {
        lease_row(&agent, &f).filter(|r| {
            r["state"] == "breaking"
                && r["waiters"]
                    .as_array()
                    .is_some_and(|w| w.iter().any(|w| w["pid"] == breaker.pid()))
        })
    });
    assert_eq!(row["type"], "write", "pre-break type");
    assert_eq!(row["target_type"], "unlock");
    assert_eq!(row["notified"], true);
    assert_eq!(row["signal"], libc::SIGIO);
    assert_eq!(row["lease_break_time_s"], 2);
    assert_eq!(row["breakers"][0]["pid"], breaker.pid());
    assert_eq!(row["breakers"][0]["type"], "write");
    assert_eq!(row["breakers"][0]["nonblock"], false);
    let w = &row["waiters"].as_array().unwrap();
    assert!(
        w.iter()
            .any(|w| w["pid"] == breaker.pid() && w["kind"] == "lease"),
        "{w:?}"
    );
    let first = row["remaining_ms"].as_i64().unwrap();
    assert!(first > 0 && first <= 2000, "{first}");
    std::thread::sleep(Duration::from_millis(300));
    let later = lease_row(&agent, &f).unwrap()["remaining_ms"]
        .as_i64()
        .unwrap();
    assert!(first - later >= 250, "counts down: {first} -> {later}");

    // The kernel's own deadline: F_GETLEASE runs time_out_leases, which traces it.
    assert_eq!(
        h.cmd("getlease x"),
        "ok u",
        "F_GETLEASE shows the target type"
    );
    let kernel: Vec<u64> = trace.values(dev_ino(&f).1, "fl_break_time");
    let ours = row["break_deadline_jiffies"].as_u64().unwrap();
    assert!(
        kernel.contains(&ours),
        "kernel fl_break_time {kernel:?} vs ckpt {ours}"
    );

    // Revocation, seen by the holder (F_GETLEASE makes the kernel time the lease out
    // as soon as its deadline has passed), lands on the reported deadline.
    let off = offset_ms(&h.cmd("pollproc x gone 5000"), &row);
    eprintln!("revocation {off:+.1} ms from the reported deadline");
    assert!(
        off.abs() <= 20.0,
        "revoked {off:.1} ms from the reported deadline"
    );
    assert!(breaker.reply().starts_with("ok"));
    wait_for(Duration::from_secs(3), "lease gone", || {
        lease_row(&agent, &f).is_none().then_some(())
    });
}

#[test]
fn read_lease_broken_by_writer() {
    let _sysctl = LeaseBreakTime::set(3);
    let agent = Agent::start();
    let dir = Scratch::new();
    let (mut h, f) = holder(&dir, "r-by-w", "r");
    let mut breaker = Locker::spawn();
    breaker.send(&format!("openmode y {f} w"));
    let row = wait_state(&agent, &f, "breaking");
    assert_eq!(
        (row["type"].as_str(), row["target_type"].as_str()),
        (Some("read"), Some("unlock"))
    );
    assert_eq!(row["lease_break_time_s"], 3);
    // The holder gives up early: the breaker proceeds at once, the lease is gone.
    let t0 = mono_ns();
    h.cmd("lease x u");
    assert!(breaker.reply().starts_with("ok"));
    assert!(mono_ns() - t0 < 1_000_000_000);
    wait_for(Duration::from_secs(3), "lease gone", || {
        lease_row(&agent, &f).is_none().then_some(())
    });
}

#[test]
fn write_lease_broken_by_reader_downgrades_on_time() {
    let _sysctl = LeaseBreakTime::set(2);
    let agent = Agent::start();
    let trace = TraceInstance::new("filelock/time_out_leases");
    let dir = Scratch::new();
    let (mut h, f) = holder(&dir, "w-by-r", "w");
    let mut breaker = Locker::spawn();
    breaker.send(&format!("openmode y {f} r"));
    let row = wait_state(&agent, &f, "breaking");
    assert_eq!(
        (row["type"].as_str(), row["target_type"].as_str()),
        (Some("write"), Some("read"))
    );
    assert_eq!(h.cmd("getlease x"), "ok r");
    let ours = row["break_deadline_jiffies"].as_u64().unwrap();
    let kernel = trace.values(dev_ino(&f).1, "fl_downgrade_time");
    assert!(
        kernel.contains(&ours),
        "kernel fl_downgrade_time {kernel:?} vs ckpt {ours}"
    );
    // F_GETLEASE returns F_RDLCK during the break (its target) and after; the holder
    // watches /proc/locks for the lease turning ACTIVE again.
    let off = offset_ms(&h.cmd("pollproc x ACTIVE 5000"), &row);
    eprintln!("downgrade {off:+.1} ms from the reported deadline");
    assert!(
        off.abs() <= 20.0,
        "downgraded {off:.1} ms from the reported deadline"
    );
    let active = wait_state(&agent, &f, "active");
    assert_eq!(active["type"], "read");
    assert!(breaker.reply().starts_with("ok"));
}

#[test]
fn holder_downgrade_completes_a_downgrade_break() {
    let _sysctl = LeaseBreakTime::set(5);
    let agent = Agent::start();
    let dir = Scratch::new();
    let (mut h, f) = holder(&dir, "downgrade", "w");
    let mut breaker = Locker::spawn();
    breaker.send(&format!("openmode y {f} r"));
    wait_state(&agent, &f, "breaking");
    h.cmd("lease x r");
    assert!(breaker.reply().starts_with("ok"));
    let row = wait_state(&agent, &f, "active");
    assert_eq!(row["type"], "read");
}

#[test]
fn closing_the_holders_fd_during_a_break_removes_the_lease() {
    let _sysctl = LeaseBreakTime::set(5);
    let agent = Agent::start();
    let dir = Scratch::new();
    let (mut h, f) = holder(&dir, "close", "w");
    let mut breaker = Locker::spawn();
    breaker.send(&format!("openmode y {f} w"));
    wait_state(&agent, &f, "breaking");
    h.cmd("close x");
    assert!(breaker.reply().starts_with("ok"));
    wait_for(Duration::from_secs(3), "lease gone", || {
        lease_row(&agent, &f).is_none().then_some(())
    });
}

#[test]
fn several_breakers_and_an_o_nonblock_one() {
    let _sysctl = LeaseBreakTime::set(5);
    let agent = Agent::start();
    let dir = Scratch::new();
    let (mut h, f) = holder(&dir, "many", "w");
    let mut nb = Locker::spawn();
    assert_eq!(
        nb.try_cmd(&format!("openmode n {f} w nb")),
        format!("err {}", libc::EWOULDBLOCK)
    );
    let row = wait_state(&agent, &f, "breaking");
    assert_eq!(row["breakers"][0]["nonblock"], true);
    assert!(
        row["waiters"].as_array().unwrap().is_empty(),
        "an O_NONBLOCK breaker does not wait"
    );
    let deadline = row["break_deadline_jiffies"].clone();

    let mut b1 = Locker::spawn();
    let mut b2 = Locker::spawn();
    b1.send(&format!("openmode y {f} w"));
    b2.send(&format!("openmode y {f} w"));
    let row = wait_for(Duration::from_secs(5), "three breakers", || {
        lease_row(&agent, &f)
            .filter(|r| r["breakers_total"] == 3 && r["waiters"].as_array().unwrap().len() == 2)
    });
    assert_eq!(
        row["break_deadline_jiffies"], deadline,
        "joining breakers do not move the deadline"
    );
    let mut pids: Vec<u64> = row["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(
        pids[0],
        u64::from(nb.pid()),
        "the first breaker stays first"
    );
    pids[1..].sort();
    let mut later = [u64::from(b1.pid()), u64::from(b2.pid())];
    later.sort();
    assert_eq!(
        pids[1..],
        later[..],
        "b1 and b2 race each other; both are listed"
    );
    h.cmd("lease x u");
    assert!(b1.reply().starts_with("ok") && b2.reply().starts_with("ok"));
}

#[test]
fn a_lease_shared_by_fork_lives_until_the_last_holder_closes() {
    let _sysctl = LeaseBreakTime::set(5);
    let agent = Agent::start();
    let dir = Scratch::new();
    let (mut h, f) = holder(&dir, "fork", "w");
    let child = h.fork();
    h.cmd("close x");
    std::thread::sleep(Duration::from_millis(700)); // past one agent reconciliation
    let row = lease_row(&agent, &f).expect("the child still holds the description");
    assert_eq!(row["pid"], h.pid(), "the lease keeps its creator's pid");
    let mut breaker = Locker::spawn();
    breaker.send(&format!("openmode y {f} w"));
    let row = wait_state(&agent, &f, "breaking");
    assert_eq!(row["notified"], true);
    // SAFETY: our grandchild.
    unsafe { libc::kill(child, libc::SIGKILL) };
    assert!(breaker.reply().starts_with("ok"));
    wait_for(Duration::from_secs(3), "lease gone", || {
        lease_row(&agent, &f).is_none().then_some(())
    });
}

#[test]
fn f_setsig_signal_is_reported() {
    let _sysctl = LeaseBreakTime::set(5);
    let agent = Agent::start();
    let dir = Scratch::new();
    let (mut h, f) = holder(&dir, "setsig", "w");
    h.cmd(&format!("setsig x {}", libc::SIGUSR2));
    let mut breaker = Locker::spawn();
    breaker.send(&format!("openmode y {f} w"));
    let row = wait_state(&agent, &f, "breaking");
    assert_eq!(row["signal"], libc::SIGUSR2);
    h.cmd("lease x u");
    assert!(breaker.reply().starts_with("ok"));
}

#[test]
fn leases_taken_before_the_agent_are_read_from_the_kernel() {
    let _sysctl = LeaseBreakTime::set(5);
    let dir = Scratch::new();
    let (mut h, f) = holder(&dir, "before", "r");
    let agent = Agent::start();
    let row = wait_state(&agent, &f, "active");
    assert_eq!(row["origin"], "kernel");
    assert_eq!(row["type"], "read");
    h.cmd("lease x u");
    wait_for(Duration::from_secs(3), "lease gone", || {
        lease_row(&agent, &f).is_none().then_some(())
    });
}

#[test]
fn truncate_breaks_a_read_lease_like_a_writer() {
    let _sysctl = LeaseBreakTime::set(5);
    let agent = Agent::start();
    let dir = Scratch::new();
    let (mut h, f) = holder(&dir, "truncate", "r");
    let mut t = Locker::spawn();
    t.send(&format!("truncate {f} 10"));
    let row = wait_state(&agent, &f, "breaking");
    assert_eq!(
        (row["type"].as_str(), row["target_type"].as_str()),
        (Some("read"), Some("unlock"))
    );
    assert_eq!(row["breakers"][0]["pid"], t.pid());
    assert_eq!(row["breakers"][0]["type"], "write");
    h.cmd("lease x u");
    assert!(t.reply().starts_with("ok"));
    assert_eq!(std::fs::metadata(&f).unwrap().len(), 10);
}
