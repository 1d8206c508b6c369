//! `ckpt-user graph`: real processes blocked on each other across lock kinds, and the
//! cycles the graph finds (a deadlock, none once it is broken, a stall through a
//! lease break).

use std::time::Duration;

use ckpt_tests::*;
use serde_json::Value;

/// Whether every process in `pids` has a blocked request in /proc/locks (its "->"
/// lines name the requester's pid; other tests' requests do not count).
fn all_blocked(pids: &[u32]) -> bool {
    let text = std::fs::read_to_string("/proc/locks").unwrap();
    pids.iter().all(|p| {
        text.lines()
            .any(|l| l.contains("->") && l.split_whitespace().any(|w| w == p.to_string()))
    })
}

/// `ckpt-user graph ARGS` on `agent`'s pins: (exit code, stdout).
fn graph(agent: &Agent, args: &[&str]) -> (i32, String) {
    let pins = agent.pin_dir.display().to_string();
    let mut all = vec!["--pin-dir", &pins, "graph"];
    all.extend_from_slice(args);
    let (code, out, err) = ckpt_user(&all);
    assert!(code == 0 || code == 3, "graph failed ({code}): {err}");
    (code, out)
}

fn graph_json(agent: &Agent, pid: u32) -> (i32, Value) {
    let p = pid.to_string();
    let (code, out) = graph(agent, &["--format", "json", "--pid", &p]);
    (code, serde_json::from_str(&out).unwrap())
}

#[test]
fn a_deadlock_across_flock_and_posix_is_found_and_a_chain_is_not_one() {
    require_root();
    let agent = Agent::start();
    let dir = Scratch::new();
    let cg = Cgroup::new(false);
    let (a, b, c) = (dir.file("a"), dir.file("b"), dir.file("c"));
    let mut p1 = cg.locker();
    let mut p2 = cg.locker();
    let mut p3 = cg.locker();
    p1.cmd(&format!("open a {a}"));
    p1.cmd("posix a w 0 10");
    p2.cmd(&format!("open b {b}"));
    p2.cmd("flock b ex");
    p3.cmd(&format!("open c {c}"));
    p3.cmd("posix c w 0 10");
    // 1 waits for 2's flock, 2 for 3's POSIX lock, 3 for 1's: the kernel's EDEADLK
    // check follows POSIX waits only, so it lets the cycle close.
    p1.cmd(&format!("open b2 {b}"));
    p1.send("flock b2 ex");
    p2.cmd(&format!("open c2 {c}"));
    p2.send("posix c2 w 0 10 wait");
    p3.cmd(&format!("open a2 {a}"));
    p3.send("posix a2 w 0 10 wait");
    let (q1, q2, q3) = (p1.pid(), p2.pid(), p3.pid());
    wait_for(Duration::from_secs(5), "three blocked requests", || {
        all_blocked(&[q1, q2, q3]).then_some(())
    });

    let (code, g) = graph_json(&agent, p1.pid());
    assert_eq!(code, 3, "exit status 3: a deadlock: {g}");
    assert_eq!(g["deadlock"], true);
    let cycles = g["cycles"].as_array().unwrap();
    assert_eq!(cycles.len(), 1, "{g}");
    assert_eq!(cycles[0]["kind"], "deadlock");
    let steps = cycles[0]["steps"].as_array().unwrap();
    let pids: Vec<u64> = steps.iter().map(|s| s["pid"].as_u64().unwrap()).collect();
    let mut sorted = pids.clone();
    sorted.sort();
    let mut want = vec![
        u64::from(p1.pid()),
        u64::from(p2.pid()),
        u64::from(p3.pid()),
    ];
    want.sort();
    assert_eq!(sorted, want, "{g}");
    // Each step waits on a lock the next step holds, and the kinds are the ones taken.
    let locks = g["locks"].as_array().unwrap();
    for (i, s) in steps.iter().enumerate() {
        let next = pids[(i + 1) % pids.len()];
        let l = &locks[s["lock"].as_u64().unwrap() as usize];
        assert!(
            l["holders"].as_array().unwrap().contains(&next.into()),
            "{l} is held by {next}"
        );
    }
    let kinds: Vec<&str> = steps
        .iter()
        .map(|s| {
            locks[s["lock"].as_u64().unwrap() as usize]["kind"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "flock").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "posix").count(),
        2,
        "{kinds:?}"
    );
    let cgroup = cg.path.display().to_string();
    let (_, text) = graph(&agent, &["--cgroup", &cgroup]);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.starts_with("deadlock: "), "{text}");
    for p in [p1.pid(), p2.pid(), p3.pid()] {
        assert!(text.contains(&p.to_string()), "{text}");
    }
    let (_, dot) = graph(&agent, &["--format", "dot", "--cgroup", &cgroup]);
    assert!(
        dot.starts_with("digraph") && dot.contains("color=red"),
        "{dot}"
    );
    // `locks` marks the three rows.
    let rows = agent.locks(&["--pid", &p1.pid().to_string()]);
    let marked: Vec<&Value> = rows.iter().filter(|r| r["deadlock"] == true).collect();
    assert!(marked.len() >= 2, "rows of p1's cycle are marked: {rows:?}");

    // Killing 3 breaks the cycle: 2 gets its lock and runs; 1 still waits for 2's
    // flock, a chain that is no cycle.
    p3.kill();
    assert_eq!(p2.reply(), "ok");
    let (code, g) = graph_json(&agent, p1.pid());
    assert_eq!(code, 0, "{g}");
    assert_eq!(g["deadlock"], false);
    assert!(g["cycles"].as_array().unwrap().is_empty(), "{g}");
    assert!(
        g["waits"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["pid"] == p1.pid()),
        "1 still waits: {g}"
    );
    let (_, text) = graph(&agent, &["--pid", &p1.pid().to_string()]);
    assert!(text.starts_with("no deadlock"), "{text}");
}

#[test]
fn a_cycle_through_a_lease_break_is_a_stall_with_its_end() {
    require_root();
    let agent = Agent::start();
    let _sysctl = LeaseBreakTime::set(30);
    let dir = Scratch::new();
    let cg = Cgroup::new(false);
    let (leased, locked) = (dir.file("leased"), dir.file("locked"));
    std::fs::write(&leased, b"x").unwrap();
    let mut h = cg.locker();
    let mut b = cg.locker();
    h.cmd(&format!("openmode l {leased} r"));
    h.cmd("lease l w");
    // Its break signal is SIGWINCH, ignored: it does not interrupt the wait below.
    h.cmd("setsig l 28");
    b.cmd(&format!("open x {locked}"));
    b.cmd("posix x w 0 1");
    // The holder waits for the breaker's lock; the breaker waits in open() for the
    // holder's lease to be given up or to time out.
    h.cmd(&format!("open x2 {locked}"));
    h.send("posix x2 w 0 1 wait");
    b.send(&format!("openmode y {leased} w"));
    let (qh, qb) = (h.pid(), b.pid());
    wait_for(Duration::from_secs(5), "two blocked requests", || {
        all_blocked(&[qh, qb]).then_some(())
    });
    let (code, g) = graph_json(&agent, h.pid());
    assert_eq!(code, 0, "a stall is no deadlock: {g}");
    let cycles = g["cycles"].as_array().unwrap();
    assert_eq!(cycles.len(), 1, "{g}");
    assert_eq!(cycles[0]["kind"], "stall");
    let ends = cycles[0]["ends_in_ms"].as_i64().unwrap();
    assert!((0..=30_000).contains(&ends), "ends in {ends} ms");
    let (_, text) = graph(&agent, &["--pid", &h.pid().to_string()]);
    assert!(text.starts_with("stall, ends in "), "{text}");
}
