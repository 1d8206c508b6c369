//! `ckpt-agent --metrics`: the endpoint parses as OpenMetrics, its values agree with
//! `ckpt-user locks` for a known workload, and a wait of known length lands in its
//! bucket.

use std::time::{Duration, Instant};

use ckpt_tests::*;

/// GET http://127.0.0.1:PORT/PATH: (status line, content type, body).
fn get(port: u16, path: &str) -> (String, String, String) {
    let reply = http_get(port, path).expect("the metrics endpoint");
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_string();
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("content-type:")
                .then(|| l[13..].trim().to_string())
        })
        .unwrap_or_default();
    (status, ctype, body.to_string())
}

/// The value of the sample `name{labels}` (labels as written, in order).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn metrics_parse_agree_with_locks_and_bucket_a_wait() {
    require_root();
    let port = free_port();
    let cg = Cgroup::new(false);
    let cg_label = cg.path.display().to_string();
    let pins = std::path::PathBuf::from("/sys/fs/bpf").join(unique("ckpt-test"));
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::start_on(&pins, &["--metrics", &addr, "--metrics-cgroup", &cg_label]);
    let dir = Scratch::new();
    let (a, b) = (dir.file("a"), dir.file("b"));
    let mut p1 = cg.locker();
    p1.cmd(&format!("open a {a}"));
    p1.cmd("posix a w 0 10");
    p1.cmd("posix a r 20 5");
    p1.cmd(&format!("open b {b}"));
    p1.cmd("flock b ex");
    let mut p2 = cg.locker();
    p2.cmd(&format!("open a {a}"));
    p2.send("posix a w 0 10 wait");
    let (_, before, _) = get(port, "/metrics");
    let bucket = |t: &str, le: &str| {
        sample(t, &format!("ckpt_wait_seconds_bucket{{le=\"{le}\"}}")).unwrap_or(0.0)
    };
    let waiting = wait_for(Duration::from_secs(5), "the waiter in the metrics", || {
        let (status, ctype, body) = get(port, "/metrics");
        assert!(status.contains("200"), "{status}");
        assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
        let n = sample(
            &body,
            &format!("ckpt_cgroup_waiters{{cgroup=\"{cg_label}\"}}"),
        )?;
        (n == 1.0).then_some(body)
    });
    // It parses as OpenMetrics.
    openmetrics_parser::openmetrics::parse_openmetrics(&waiting)
        .unwrap_or_else(|e| panic!("not OpenMetrics: {e:?}\n{waiting}"));
    assert!(waiting.contains("ckpt_build_info{version=\""), "{waiting}");
    // The cgroup's locks, as `locks` counts them.
    let rows = agent.locks(&["--cgroup", &cg_label]);
    let held = rows.iter().filter(|r| r["pid"] == p1.pid()).count() as f64;
    assert_eq!(held, 3.0);
    assert_eq!(
        sample(
            &waiting,
            &format!("ckpt_cgroup_locks{{cgroup=\"{cg_label}\"}}")
        ),
        Some(held),
        "{waiting}"
    );
    for (kind, ty) in [("posix", "write"), ("posix", "read"), ("flock", "write")] {
        let n = sample(
            &waiting,
            &format!("ckpt_locks{{kind=\"{kind}\",type=\"{ty}\"}}"),
        );
        assert!(n.is_some_and(|n| n >= 1.0), "{kind} {ty}: {waiting}");
    }

    // A wait of about 3 s: in the (2.5, 5] bucket.
    std::thread::sleep(Duration::from_millis(3000));
    p1.cmd("posix a u 0 10");
    assert_eq!(p2.reply(), "ok");
    let after = wait_for(Duration::from_secs(5), "the wait's end", || {
        let (_, _, body) = get(port, "/metrics");
        (bucket(&body, "5.0") > bucket(&before, "5.0")).then_some(body)
    });
    assert!(
        bucket(&after, "5.0") - bucket(&after, "2.5")
            > bucket(&before, "5.0") - bucket(&before, "2.5"),
        "a 3 s wait is counted between 2.5 and 5 s:\n{after}"
    );
    let (status, _, _) = get(port, "/nothing");
    assert!(status.contains("404"), "{status}");
}

/// Waits far shorter than the agent's 100 ms look are all counted, each in its
/// bucket: the tracer keeps the histogram itself.
#[test]
fn short_waits_between_two_looks_are_all_counted() {
    require_root();
    let port = free_port();
    let pins = std::path::PathBuf::from("/sys/fs/bpf").join(unique("ckpt-test"));
    let addr = format!("127.0.0.1:{port}");
    let _agent = Agent::start_on(&pins, &["--metrics", &addr]);
    let dir = Scratch::new();
    let a = dir.file("a");
    let mut p1 = Locker::spawn();
    let mut p2 = Locker::spawn();
    p1.cmd(&format!("open a {a}"));
    p2.cmd(&format!("open a {a}"));
    let metric = |t: &str, s: &str| sample(t, s).unwrap_or(0.0);
    let (_, _, before) = get(port, "/metrics");
    const N: usize = 6;
    // Each wait: at least `hold` (from when p2 is seen blocked to p1's unlock), at
    // most from p2's request to its reply.
    let hold = Duration::from_millis(20);
    let mut bounds = Vec::new();
    for _ in 0..N {
        p1.cmd("posix a w 0 10");
        let asked = Instant::now();
        p2.send("posix a w 0 10 wait");
        let blocked = wait_blocked_on_lock(p2.pid());
        std::thread::sleep(hold.saturating_sub(blocked.elapsed()));
        p1.cmd("posix a u 0 10");
        assert_eq!(p2.reply(), "ok");
        bounds.push((hold.as_secs_f64(), asked.elapsed().as_secs_f64()));
        p2.cmd("posix a u 0 10");
    }
    let after = wait_for(Duration::from_secs(5), "the waits in the histogram", || {
        let (_, _, body) = get(port, "/metrics");
        (metric(&body, "ckpt_wait_seconds_count") - metric(&before, "ckpt_wait_seconds_count")
            >= N as f64)
            .then_some(body)
    });
    let delta = |s: &str| metric(&after, s) - metric(&before, s);
    let lower: f64 = bounds.iter().map(|b| b.0).sum();
    assert!(
        delta("ckpt_wait_seconds_sum") >= lower,
        "the {N} waits last at least {lower} s in all: {bounds:?}\n{after}"
    );
    // Buckets (cumulative): a wait whose bounds fall in one bucket is counted there.
    let les = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0];
    for (i, le) in les.iter().enumerate() {
        let below = if i == 0 { 0.0 } else { les[i - 1] };
        let sure = bounds
            .iter()
            .filter(|(lo, hi)| *lo > below && *hi <= *le)
            .count() as f64;
        let key = |le: f64| format!("ckpt_wait_seconds_bucket{{le=\"{le:?}\"}}");
        let in_bucket = delta(&key(*le)) - if i == 0 { 0.0 } else { delta(&key(below)) };
        assert!(
            in_bucket >= sure,
            "{sure} waits in ({below}, {le}]: {bounds:?}\n{after}"
        );
    }
    eprintln!("short waits (s, lower and upper bounds): {bounds:?}");
}
