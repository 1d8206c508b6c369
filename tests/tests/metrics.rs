//! `ckpt-agent --metrics`: the endpoint parses as OpenMetrics, its values agree with
//! `ckpt-user locks` for a known workload, and a wait of known length lands in its
//! bucket.

use std::time::Duration;

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
