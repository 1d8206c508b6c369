//! `ckpt-user events --json`: waits and their ends in order (granted, interrupted), a
//! lease break and its release, and a deadlock, from real processes.

use std::{
    io::BufRead as _,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use ckpt_tests::*;
use serde_json::Value;

/// `ckpt-user events --json`, its lines collected on a thread.
struct Events {
    child: std::process::Child,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Events {
    fn start(agent: &Agent) -> Events {
        let mut child = Command::new(bin("ckpt-user"))
            .arg("--pin-dir")
            .arg(&agent.pin_dir)
            .args(["events", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                let _ = tx.send(serde_json::from_str(&l).unwrap());
            }
        });
        Events {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for an event for which `f` holds; returns it.
    fn expect(&mut self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        if let Some(e) = self.seen.iter().find(|e| f(e)) {
            return e.clone();
        }
        while let Ok(e) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(e.clone());
            if f(&e) {
                return e;
            }
        }
        panic!("no event {what}; seen: {:#?}", self.seen);
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn is(e: &Value, event: &str, pid: u32) -> bool {
    e["event"] == event && e["pid"] == pid
}

#[test]
fn waits_breaks_and_a_deadlock_are_reported_in_order() {
    require_root();
    let agent = Agent::start();
    let _sysctl = LeaseBreakTime::set(30);
    let dir = Scratch::new();
    let cg = Cgroup::new(false);
    let mut ev = Events::start(&agent);
    std::thread::sleep(Duration::from_millis(300));
    let (a, b) = (dir.file("a"), dir.file("b"));

    // A POSIX wait that is granted.
    let mut p1 = cg.locker();
    let mut p2 = cg.locker();
    p1.cmd(&format!("open a {a}"));
    p1.cmd("posix a w 0 10");
    p2.cmd(&format!("open a {a}"));
    p2.send("posix a w 0 10 wait");
    let began = ev.expect("wait_began of p2", |e| is(e, "wait_began", p2.pid()));
    assert_eq!(began["kind"], "posix");
    assert_eq!(began["type"], "write");
    assert_eq!(began["path"], a.as_str());
    std::thread::sleep(Duration::from_millis(500));
    p1.cmd("posix a u 0 10");
    assert_eq!(p2.reply(), "ok");
    let ended = ev.expect("wait_ended of p2", |e| is(e, "wait_ended", p2.pid()));
    assert_eq!(ended["how"], "granted", "{ended}");
    assert!(ended["after_ms"].as_u64().unwrap() >= 500, "{ended}");
    assert!(ended["monotonic_ns"].as_u64() > began["monotonic_ns"].as_u64());

    // A wait far shorter than the 100 ms between two looks: both ends, exact.
    p2.cmd("posix a u 0 10");
    p1.cmd("posix a w 0 10");
    let asked = Instant::now();
    p2.send("posix a w 0 10 wait");
    let blocked = wait_blocked_on_lock(p2.pid());
    std::thread::sleep(Duration::from_millis(20).saturating_sub(blocked.elapsed()));
    p1.cmd("posix a u 0 10");
    assert_eq!(p2.reply(), "ok");
    let upper = asked.elapsed().as_millis() as u64;
    let at = |e: &Value| e["monotonic_ns"].as_u64().unwrap();
    let began2 = ev.expect("the short wait's start", |e| {
        is(e, "wait_began", p2.pid()) && at(e) > at(&ended)
    });
    let ended2 = ev.expect("the short wait's end", |e| {
        is(e, "wait_ended", p2.pid()) && at(e) > at(&began2)
    });
    assert_eq!(ended2["how"], "granted", "{ended2}");
    let ms = ended2["after_ms"].as_u64().unwrap();
    assert!(
        (20..=upper).contains(&ms),
        "20 <= {ms} <= {upper}: {ended2}"
    );
    assert_eq!(
        (at(&ended2) - at(&began2)) / 1_000_000,
        ms,
        "{began2} {ended2}"
    );
    p2.cmd("posix a u 0 10");

    // An flock wait interrupted by a signal: no kernel event for its end.
    let mut p3 = cg.locker();
    p1.cmd(&format!("open b {b}"));
    p1.cmd("flock b ex");
    p3.cmd(&format!("open b {b}"));
    p3.send("flock b ex");
    ev.expect("wait_began of p3", |e| is(e, "wait_began", p3.pid()));
    // SAFETY: signalling our own child (its SIGUSR1 handler has no SA_RESTART).
    unsafe { libc::kill(p3.pid() as i32, libc::SIGUSR1) };
    assert!(p3.reply().starts_with("err"));
    let ended = ev.expect("wait_ended of p3", |e| is(e, "wait_ended", p3.pid()));
    assert_eq!(ended["how"], "interrupted", "{ended}");

    // A lease break, ended by the holder's release.
    let leased = dir.file("leased");
    let mut holder = cg.locker();
    let mut breaker = cg.locker();
    holder.cmd(&format!("openmode l {leased} r"));
    holder.cmd("lease l w");
    breaker.send(&format!("openmode y {leased} w"));
    let broke = ev.expect("lease_break_began", |e| {
        is(e, "lease_break_began", holder.pid())
    });
    assert_eq!(broke["breakers"], serde_json::json!([breaker.pid()]));
    holder.cmd("lease l u");
    let over = ev.expect("lease_break_ended", |e| {
        is(e, "lease_break_ended", holder.pid())
    });
    assert_eq!(over["how"], "released", "{over}");
    // The breaker's wait, woken by the release.
    let woke = ev.expect("the breaker's wait_ended", |e| {
        is(e, "wait_ended", breaker.pid())
    });
    assert_eq!(woke["how"], "unblocked", "{woke}");
    assert_eq!(woke["kind"], "lease", "{woke}");
    assert!(breaker.reply().starts_with("ok"));

    // A deadlock across flock and POSIX.
    let (c, d) = (dir.file("c"), dir.file("d"));
    let mut p4 = cg.locker();
    let mut p5 = cg.locker();
    p4.cmd(&format!("open c {c}"));
    p4.cmd("posix c w 0 1");
    p5.cmd(&format!("open d {d}"));
    p5.cmd("flock d ex");
    p4.cmd(&format!("open d2 {d}"));
    p4.send("flock d2 ex");
    p5.cmd(&format!("open c2 {c}"));
    p5.send("posix c2 w 0 1 wait");
    let dl = ev.expect("deadlock", |e| {
        e["event"] == "deadlock"
            && e["cycle"]
                .as_array()
                .is_some_and(|c| c.contains(&p4.pid().into()) && c.contains(&p5.pid().into()))
    });
    assert_eq!(dl["cycle"].as_array().unwrap().len(), 2, "{dl}");
}
