//! `ckpt-user dump` and `inspect` against real frozen processes: the image matches what
//! the kernel shows, field by field, and every failure leaves the cgroup thawed and no
//! image (or a complete one) under the final name.

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use ckpt_tests::*;
use serde_json::Value;

fn inspect_json(img: &str) -> Value {
    let (code, out, err) = ckpt_user(&["inspect", img, "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// fdinfo flags of pid's fd, without O_CLOEXEC.
fn fdinfo_flags(pid: u32, fd: i32) -> u64 {
    fdinfo(pid, fd).1 & !0o2000000
}

fn fd_of(locker: &mut Locker, cmd: &str) -> i32 {
    locker
        .cmd(cmd)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// The file (description) object a process's fd refers to.
fn file_of(img: &Value, pid: u32, fd: i32) -> &Value {
    let p = img["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap();
    let f = p["fds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["fd"] == fd)
        .unwrap();
    &img["files"][f["file"].as_u64().unwrap() as usize]
}

/// No file but `keep` left in `dir` (no image, no temporary).
fn only(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

#[test]
fn image_matches_the_kernel_field_by_field() {
    let _sysctl = LeaseBreakTime::set(30);
    let agent = Agent::start();
    let cg = Cgroup::new(false);
    let dir = Scratch::new();
    let (f1, f2, f3, leased) = (
        dir.file("posix"),
        dir.file("ofd"),
        dir.file("flock"),
        dir.file("leased"),
    );
    let ghost = dir.0.join("ghost").display().to_string();

    let mut p = cg.locker();
    let fd_a = fd_of(&mut p, &format!("open a {f1}"));
    p.cmd("posix a w 0 10");
    p.cmd("seek a 7");
    let fd_o = fd_of(&mut p, &format!("open o {f2}"));
    p.cmd("ofd o r 5 5");
    let fd_fl = fd_of(&mut p, &format!("open fl {f3}"));
    p.cmd("flock fl ex");
    let fd_g = fd_of(&mut p, &format!("open g {ghost}"));
    p.cmd("pwrite g 0 head");
    p.cmd("pwrite g 1048576 tail");
    p.cmd(&format!("unlink {ghost}"));
    let fd_l = fd_of(&mut p, &format!("openmode l {leased} r"));
    p.cmd("lease l w");
    let child = p.fork() as u32; // shares every description, in the same cgroup

    let mut q = cg.locker();
    q.cmd(&format!("open a {f1}"));
    q.send("posix a w 0 1 wait");
    let mut r = cg.locker();
    r.send(&format!("openmode y {leased} w"));
    wait_for(Duration::from_secs(5), "waiter and lease break", || {
        let rows = agent.locks(&[]);
        let waiting = rows.iter().any(|r| {
            r["waiters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w["pid"] == q.pid())
        });
        let breaking = rows
            .iter()
            .any(|r| r["kind"] == "lease" && r["state"] == "breaking");
        (waiting && breaking).then_some(())
    });

    let img = dir.0.join("img").display().to_string();
    let (code, out, err) = agent.dump(&cg.path, &img, &["--json"]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert!(!cg.frozen(), "thawed after the dump");
    eprintln!(
        "frozen {} ms, total {} ms",
        report["frozen_ms"], report["total_ms"]
    );
    assert_eq!(std::fs::metadata(&img).unwrap().mode() & 0o777, 0o600);

    let image = inspect_json(&img);
    assert_eq!(image["source"], "kernel");
    assert!(image["missing"].as_array().unwrap().is_empty());
    let pids: BTreeSet<u64> = image["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(
        pids,
        [p.pid(), child, q.pid(), r.pid()]
            .iter()
            .map(|&x| u64::from(x))
            .collect()
    );
    let proc_p = image["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["pid"] == p.pid())
        .unwrap();
    assert_eq!(
        proc_p["cmdline"][0].as_str().unwrap(),
        bin("locker").to_str().unwrap()
    );

    // fds: path, position, flags, shared descriptions.
    let a = file_of(&image, p.pid(), fd_a);
    assert_eq!(a["path"], f1.as_str());
    assert_eq!(a["pos"], 7);
    assert_eq!(a["flags"].as_u64().unwrap(), fdinfo_flags(p.pid(), fd_a));
    assert_eq!(a["ino"], dev_ino(&f1).1);
    assert!(a["handle"].is_array(), "file handle recorded");
    let fl = file_of(&image, p.pid(), fd_fl);
    assert_eq!(
        fl,
        file_of(&image, child, fd_fl),
        "fork-shared description is one object"
    );
    let holders: BTreeSet<(u64, i64)> = fl["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h[0].as_u64().unwrap(), h[1].as_i64().unwrap()))
        .collect();
    assert!(
        holders.contains(&(u64::from(p.pid()), i64::from(fd_fl)))
            && holders.contains(&(u64::from(child), i64::from(fd_fl)))
    );
    assert_ne!(
        file_of(&image, q.pid(), 3)["id"],
        a["id"],
        "q opened f1 separately"
    );

    // Locks, each on the right description.
    let locks = image["locks"].as_array().unwrap();
    let find = |kind: &str| {
        locks
            .iter()
            .filter(|l| l["kind"] == kind)
            .collect::<Vec<_>>()
    };
    let posix = find("posix");
    assert_eq!(posix.len(), 1, "{locks:?}");
    assert_eq!(
        (
            posix[0]["type"].as_str(),
            posix[0]["start"].as_i64(),
            posix[0]["end"].as_i64()
        ),
        (Some("write"), Some(0), Some(9))
    );
    assert_eq!(posix[0]["pid"], p.pid());
    assert_eq!(posix[0]["file"], a["id"]);
    let ofd = find("ofd");
    assert_eq!(
        (ofd.len(), ofd[0]["start"].as_i64(), ofd[0]["end"].as_i64()),
        (1, Some(5), Some(9))
    );
    assert_eq!(ofd[0]["file"], file_of(&image, p.pid(), fd_o)["id"]);
    let flock = find("flock");
    assert_eq!(flock.len(), 1, "one flock for the shared description");
    assert_eq!(flock[0]["file"], fl["id"]);

    // Waiters as they were when frozen.
    let waiters = image["waiters"].as_array().unwrap();
    let wq = waiters
        .iter()
        .find(|w| w["pid"] == q.pid())
        .expect("POSIX waiter");
    assert_eq!(
        (
            wq["kind"].as_str(),
            wq["start"].as_i64(),
            wq["end"].as_i64()
        ),
        (Some("posix"), Some(0), Some(0))
    );
    assert!(wq["waited_ns"].as_u64().unwrap() > 0);
    let wr = waiters
        .iter()
        .find(|w| w["pid"] == r.pid())
        .expect("lease breaker waiting");
    assert_eq!(wr["kind"], "lease");

    // The lease in break, with its remaining time at the freeze.
    let lease = &image["leases"][0];
    assert_eq!(lease["file"], file_of(&image, p.pid(), fd_l)["id"]);
    assert_eq!(
        (lease["type"].as_str(), lease["breaking"].as_bool()),
        (Some("write"), Some(true))
    );
    assert!(lease["target_type"].is_null(), "target unlock");
    let left = lease["remaining_ns"].as_i64().unwrap();
    assert!(left > 25_000_000_000 && left <= 30_000_000_000, "{left}");
    assert_eq!(lease["notified"], true);
    assert_eq!(lease["lease_break_time_s"], 30);
    assert_eq!(lease["breakers"][0]["pid"], r.pid());

    // The deleted file: holes kept, bytes exact.
    let g = &image["ghosts"][0];
    assert_eq!(g["size"], 1048580);
    assert!(file_of(&image, p.pid(), fd_g)["deleted"].as_bool().unwrap());
    let extents = ghost_extents(g);
    let stored: u64 = extents.iter().map(|e| e.1).sum();
    assert!(stored < 1 << 20, "sparse: {extents:?}");
    assert_eq!(extents[0].0, 0);
    assert_eq!(ghost_bytes(&img, g, 0, 4).as_deref(), Some(&b"head"[..]));
    assert_eq!(
        ghost_bytes(&img, g, 1048576, 4).as_deref(),
        Some(&b"tail"[..])
    );

    // Fingerprints of the regular files.
    let fp = image["fingerprints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == f1.as_str())
        .unwrap();
    let md = std::fs::metadata(&f1).unwrap();
    assert_eq!(fp["size"], md.size());
    assert_eq!(
        fp["mtime_ns"].as_i64().unwrap(),
        md.mtime() * 1_000_000_000 + md.mtime_nsec()
    );

    // The tree view names the same things.
    let (code, tree, _) = ckpt_user(&["inspect", &img, "--tree"]);
    assert_eq!(code, 0);
    assert!(
        tree.contains(&format!("task-{}/fds/{fd_a}/path: {f1}", p.pid())),
        "{tree}"
    );
    assert!(tree.contains(&format!("task-{}/fds/{fd_a}/pos: 7", p.pid())));
    assert!(tree.contains("leases/0/breaking: true"));

    // The agent's fd-table iterator and the /proc path, one fd at a time, see the same
    // processes, fds, descriptions, locks, leases, deleted files and fingerprints.
    assert_eq!(report["fd_tables"], "iterator", "{out}");
    let slow = dir.0.join("slow").display().to_string();
    let nowhere = format!("/sys/fs/bpf/{}", unique("none"));
    let (code, out, err) = ckpt_user_env(
        &[
            "--pin-dir",
            &nowhere,
            "dump",
            cg.path.to_str().unwrap(),
            "-o",
            &slow,
            "--json",
        ],
        &[("CKPT_PROC_ONLY", "1")],
    );
    assert_eq!(code, 0, "{err}");
    let slow_report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(slow_report["fd_tables"], "proc");
    assert_eq!(comparable(&image), comparable(&inspect_json(&slow)));
    p.cmd("lease l u");
}

/// What an image says about the kernel's state, without ids, timings and what only
/// the agent knows: descriptions are named by their holders.
fn comparable(image: &Value) -> Value {
    let holders = |id: &Value| -> Value {
        let f = image["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["id"] == *id)
            .unwrap();
        f["holders"].clone()
    };
    // Each list as a set of normalised entries (order and ids do not matter).
    let set = |key: &str, norm: &dyn Fn(&Value) -> Value| -> BTreeSet<String> {
        image[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| norm(v).to_string())
            .collect()
    };
    let without = |field: &'static str| {
        move |v: &Value| {
            let mut v = v.clone();
            v.as_object_mut().unwrap().remove(field);
            v
        }
    };
    let fds: BTreeSet<String> = image["processes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["fds"].as_array().unwrap().iter().map(|fd| {
                serde_json::json!([p["pid"], fd["fd"], fd["cloexec"], holders(&fd["file"])])
                    .to_string()
            })
        })
        .collect();
    // Standard streams are shared with the test harness, which may write to them
    // between the two dumps: their size, offset and times are not compared.
    let stdio: BTreeSet<u64> = image["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            f["holders"]
                .as_array()
                .unwrap()
                .iter()
                .all(|h| h[1].as_i64().unwrap() <= 2)
        })
        .map(|f| f["ino"].as_u64().unwrap())
        .collect();
    let unless_stdio = |v: &Value| -> Value {
        if stdio.contains(&v["ino"].as_u64().unwrap_or(0)) {
            serde_json::json!(["stdio", v["ino"]])
        } else {
            v.clone()
        }
    };
    serde_json::json!({
        "processes": set("processes", &without("fds")),
        "files": set("files", &|f| unless_stdio(&without("id")(f))),
        "fds": fds,
        "locks": set("locks", &|l| {
            let mut l = l.clone();
            l["file"] = holders(&l["file"]);
            if l["kind"] == "ofd" {
                // The kernel does not tell who created an OFD lock; the agent does.
                l["pid"] = Value::Null;
            }
            l
        }),
        "leases": set("leases", &|l| {
            serde_json::json!([holders(&l["file"]), l["pid"], l["breaking"], l["target_type"]])
        }),
        "ghosts": set("ghosts", &|g| {
            serde_json::json!([g["dev"], g["ino"], g["path"], g["size"], g["extents"]])
        }),
        "fingerprints": set("fingerprints", &unless_stdio),
    })
}

#[test]
fn without_an_agent_the_image_says_what_it_lacks() {
    let cg = Cgroup::new(false);
    let dir = Scratch::new();
    let f = dir.file("x");
    let mut p = cg.locker();
    p.cmd(&format!("open a {f}"));
    p.cmd("posix a r 0 0");
    let img = dir.0.join("img").display().to_string();
    let nowhere = format!("/sys/fs/bpf/{}", unique("none"));
    // What a kernel before 6.1, or a dump without root, gets.
    let (code, _, err) = ckpt_user_env(
        &["--pin-dir", &nowhere, "dump", &cg.name, "-o", &img],
        &[("CKPT_PROC_ONLY", "1")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("not running") && err.contains("lease break deadlines"),
        "{err}"
    );
    let image = inspect_json(&img);
    assert_eq!(image["source"], "proc");
    assert!(!image["missing"].as_array().unwrap().is_empty());
    assert_eq!(image["locks"].as_array().unwrap().len(), 1);
    let (_, summary, _) = ckpt_user(&["inspect", &img]);
    assert!(summary.contains("missing (no agent)"), "{summary}");
}

/// Another process takes a lock every millisecond while the dump reads the kernel's
/// lists: the dumped processes' own locks must come out exact, every time.
#[test]
fn lock_traffic_elsewhere_does_not_disturb_the_dump() {
    let agent = Agent::start();
    let cg = Cgroup::new(false);
    let dir = Scratch::new();
    let mut outside = Locker::spawn();
    outside.cmd(&format!("churn {} 1", dir.file("busy")));
    let mut p = cg.locker();
    for (i, kind) in ["posix", "ofd"].iter().enumerate() {
        p.cmd(&format!("open f{i} {}", dir.file(&format!("f{i}"))));
        p.cmd(&format!("{kind} f{i} w 0 10"));
        p.cmd(&format!("{kind} f{i} r 20 10"));
    }
    p.cmd(&format!("open g {}", dir.file("g")));
    p.cmd("flock g sh");
    for run in 0..3 {
        let img = dir.0.join(format!("img{run}")).display().to_string();
        let (code, _, err) = agent.dump(&cg.path, &img, &["--timings"]);
        assert_eq!(code, 0, "{err}");
        assert!(!cg.frozen());
        let image = inspect_json(&img);
        let mut got: Vec<(String, String, i64)> = image["locks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["kind"].as_str().unwrap().to_string(),
                    l["type"].as_str().unwrap_or("").to_string(),
                    l["start"].as_i64().unwrap_or(0),
                )
            })
            .collect();
        got.sort();
        assert_eq!(got.len(), 5, "{image}");
        assert!(
            got.iter().filter(|l| l.0 == "posix").count() == 2
                && got.iter().filter(|l| l.0 == "ofd").count() == 2
                && got.iter().filter(|l| l.0 == "flock").count() == 1,
            "{got:?}"
        );
    }
}

/// More locks through one fd than the iterator writes for it in the kernel: that fd's
/// lock lines come from fdinfo instead, and every lock is in the image.
#[test]
fn long_lock_lists_are_read_from_fdinfo() {
    let agent = Agent::start();
    let cg = Cgroup::new(false);
    let dir = Scratch::new();
    let mut p = cg.locker();
    // Separate POSIX locks on one file, more than a walk writes for one fd.
    let n = ckpt_common::files::LOCK_LINES_PER_FD as i64 + 28;
    p.cmd(&format!("bulk {} 1 {n}", dir.0.display()));
    let img = dir.0.join("img").display().to_string();
    let (code, out, err) = agent.dump(&cg.path, &img, &["--timings", "--json"]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["fd_tables"], "iterator", "{out}");
    assert!(
        err.contains("1 with lock lists too long to walk"),
        "the fdinfo fallback was not taken: {err}"
    );
    let image = inspect_json(&img);
    let locks = image["locks"].as_array().unwrap();
    assert_eq!(locks.len() as i64, n, "{image}");
    let starts: BTreeSet<i64> = locks.iter().map(|l| l["start"].as_i64().unwrap()).collect();
    assert_eq!(starts, (0..n).map(|i| i * 2).collect());
}

/// Files opened between the prescan and the freeze are looked at inside the window:
/// each dumped fd still names the file the process has open at that number.
#[test]
fn fds_opened_while_the_dump_prepares_are_read_inside_the_window() {
    let agent = Agent::start();
    let cg = Cgroup::new(false);
    let dir = Scratch::new();
    let mut p = cg.locker();
    let pid = p.pid();
    p.cmd(&format!("openloop {} 1", dir.0.display()));
    let mut late = 0;
    for run in 0..5 {
        let img = dir.0.join(format!("img{run}")).display().to_string();
        let (code, _, err) = agent.dump(&cg.path, &img, &["--timings"]);
        assert_eq!(code, 0, "{err}");
        let opened: usize = err
            .lines()
            .find_map(|l| l.split("late reads: ").nth(1))
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no late-read count: {err}"));
        late += opened;
        let image = inspect_json(&img);
        let proc_ = image["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["pid"] == pid)
            .unwrap();
        for fd in proc_["fds"].as_array().unwrap() {
            let n = fd["fd"].as_i64().unwrap();
            let file = file_of(&image, pid, n as i32);
            let link = std::fs::read_link(format!("/proc/{pid}/fd/{n}")).unwrap();
            assert_eq!(file["path"], link.display().to_string(), "fd {n}");
            let md = std::fs::metadata(format!("/proc/{pid}/fd/{n}")).unwrap();
            assert_eq!(file["ino"], md.ino(), "fd {n}");
        }
    }
    assert!(
        late > 0,
        "no fd was opened between a prescan and its freeze"
    );
}

#[test]
fn v1_freezer_cgroups_are_dumped_too() {
    if !Path::new("/sys/fs/cgroup/freezer/cgroup.procs").exists() {
        eprintln!("no v1 freezer hierarchy on this host: covered by the v2 tests");
        return;
    }
    let agent = Agent::start();
    let cg = Cgroup::new(true);
    let dir = Scratch::new();
    let f = dir.file("x");
    let mut p = cg.locker();
    p.cmd(&format!("open a {f}"));
    p.cmd("flock a ex");
    let img = dir.0.join("img").display().to_string();
    let (code, _, err) = agent.dump(&cg.path, &img, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!cg.frozen());
    assert_eq!(inspect_json(&img)["locks"][0]["kind"], "flock");
}

fn expect_failure(args: &[&str], want: &str) -> String {
    let (code, _, err) = ckpt_user(args);
    assert_ne!(code, 0, "must fail: {args:?}");
    assert!(err.contains(want), "stderr should mention {want:?}: {err}");
    one_error_line(&err);
    err
}

/// A refusal says why in exactly one error line (notes may come before it).
fn one_error_line(err: &str) {
    let errors = err
        .lines()
        .filter(|l| l.starts_with("ckpt-user: error:"))
        .count();
    assert_eq!(errors, 1, "one error line: {err}");
}

#[test]
fn refusals_leave_the_cgroup_thawed_and_no_image() {
    let cg = Cgroup::new(false);
    let dir = Scratch::new();
    let img = dir.0.join("img").display().to_string();
    let nowhere = format!("/sys/fs/bpf/{}", unique("none"));
    expect_failure(
        &[
            "--pin-dir",
            &nowhere,
            "dump",
            "no-such-cgroup-xyz",
            "-o",
            &img,
        ],
        "no-such-cgroup-xyz",
    );
    expect_failure(
        &["--pin-dir", &nowhere, "dump", &cg.name, "-o", &img],
        "empty",
    );

    // A process killed while frozen.
    let f = dir.file("x");
    let mut p = cg.locker();
    p.cmd(&format!("open a {f}"));
    let victim = cg.locker();
    let kill = format!("kill -9 {}", victim.pid());
    let (code, _, err) = ckpt_user(&[
        "--pin-dir",
        &nowhere,
        "dump",
        &cg.name,
        "-o",
        &img,
        "--snapshot-cmd",
        &kill,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("exited during the dump"), "{err}");
    assert!(!cg.frozen());
    assert_eq!(only(&dir.0, &["x"]), Vec::<String>::new());

    // A deleted file above --ghost-limit.
    let ghost = dir.0.join("ghost").display().to_string();
    p.cmd(&format!("open g {ghost}"));
    p.cmd("pwrite g 0 0123456789abcdef0123456789abcdef");
    p.cmd(&format!("unlink {ghost}"));
    expect_failure(
        &[
            "--pin-dir",
            &nowhere,
            "dump",
            &cg.name,
            "-o",
            &img,
            "--ghost-limit",
            "16",
        ],
        "--ghost-limit",
    );
    assert!(!cg.frozen());
    assert_eq!(only(&dir.0, &["x"]), Vec::<String>::new());
}

/// An fd on a directory removed while open (CRIU's rmdir_open) can never be restored:
/// dump refuses it in one line, through the iterators and through /proc alike, and
/// leaves the cgroup thawed and no image.
#[test]
fn an_fd_on_a_removed_directory_is_refused() {
    let cg = Cgroup::new(false);
    let dir = Scratch::new();
    let gone = dir.0.join("gone");
    std::fs::create_dir(&gone).unwrap();
    let mut p = cg.locker();
    p.cmd(&format!("openmode d {} r", gone.display()));
    let img = dir.0.join("img").display().to_string();
    let nowhere = format!("/sys/fs/bpf/{}", unique("none"));
    let args = ["--pin-dir", &nowhere, "dump", &cg.name, "-o", &img];
    // Still there: dumped.
    let (code, _, err) = ckpt_user(&args);
    assert_eq!(code, 0, "{err}");
    std::fs::remove_file(&img).unwrap();
    std::fs::remove_dir(&gone).unwrap();
    for env in [&[][..], &[("CKPT_PROC_ONLY", "1")][..]] {
        let (code, _, err) = ckpt_user_env(&args, env);
        assert_ne!(code, 0, "{env:?}: a removed directory was dumped");
        assert!(
            err.contains(&format!(
                "is directory {} removed while open",
                gone.display()
            )),
            "{env:?}: {err}"
        );
        one_error_line(&err);
        assert!(!cg.frozen());
        assert_eq!(
            only(&dir.0, &[]),
            Vec::<String>::new(),
            "no image, no temporary"
        );
    }
}

#[test]
fn disk_full_for_the_image_fails_cleanly() {
    let cg = Cgroup::new(false);
    let dir = Scratch::new();
    let small = dir.0.join("small");
    std::fs::create_dir(&small).unwrap();
    assert!(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap()
        .success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _u = Unmount(small.clone());
    let ghost = dir.0.join("ghost").display().to_string();
    let mut p = cg.locker();
    p.cmd(&format!("open g {ghost}"));
    for i in 0..32 {
        p.cmd(&format!("pwrite g {} {}", i * 8192, "x".repeat(4000)));
    }
    p.cmd(&format!("unlink {ghost}"));
    let img = small.join("img").display().to_string();
    let nowhere = format!("/sys/fs/bpf/{}", unique("none"));
    expect_failure(
        &["--pin-dir", &nowhere, "dump", &cg.name, "-o", &img],
        "No space left",
    );
    assert!(!cg.frozen());
    assert_eq!(
        only(&small, &[]),
        Vec::<String>::new(),
        "no image and no temporary file"
    );
}

/// ckpt-user killed (SIGKILL, SIGINT) while the cgroup is frozen: the watchdog thaws
/// it and removes the temporary image.
#[test]
fn killing_ckpt_user_mid_dump_thaws_the_cgroup() {
    for sig in [libc::SIGKILL, libc::SIGINT, libc::SIGTERM] {
        let cg = Cgroup::new(false);
        let dir = Scratch::new();
        let f = dir.file("x");
        let mut p = cg.locker();
        p.cmd(&format!("open a {f}"));
        p.cmd("posix a w 0 0");
        let img = dir.0.join("img");
        let nowhere = format!("/sys/fs/bpf/{}", unique("none"));
        let mut dump = ckpt_user_cmd()
            .args(["--pin-dir", &nowhere, "dump", &cg.name, "-o"])
            .arg(&img)
            .args(["--snapshot-cmd", "sleep 30"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(Duration::from_secs(10), "the cgroup to freeze", || {
            cg.frozen().then_some(())
        });
        // SAFETY: our child.
        unsafe { libc::kill(dump.id() as i32, sig) };
        let _ = dump.wait();
        wait_for(Duration::from_secs(5), "the watchdog to thaw", || {
            (!cg.frozen()).then_some(())
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !only(&dir.0, &["x"]).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "signal {sig}: still there after 5 s: {:?}",
                only(&dir.0, &["x"])
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!img.exists());
        assert_eq!(
            p.cmd("pid"),
            format!("ok {}", p.pid()),
            "the workload runs again"
        );
    }
}

#[test]
fn corrupt_images_are_refused() {
    let cg = Cgroup::new(false);
    let dir = Scratch::new();
    let f = dir.file("x");
    let mut p = cg.locker();
    p.cmd(&format!("open a {f}"));
    let img = dir.0.join("img").display().to_string();
    let nowhere = format!("/sys/fs/bpf/{}", unique("none"));
    assert_eq!(
        ckpt_user(&["--pin-dir", &nowhere, "dump", &cg.name, "-o", &img]).0,
        0
    );
    let mut bytes = std::fs::read(&img).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&img, &bytes).unwrap();
    expect_failure(&["inspect", &img], "checksum");
    std::fs::write(&img, &bytes[..bytes.len() / 3]).unwrap();
    expect_failure(&["inspect", &img], "image");
}

/// Temporary images (`.NAME.tmp-PID`) in `dir`.
fn temporaries(dir: &Path) -> Vec<String> {
    only(dir, &[])
        .into_iter()
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

/// Processes whose command line mentions `needle` (a dump's watchdog names its
/// temporary image).
fn processes_naming(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Issue 16, defect 4 (and the fault test for dump): SIGKILL at moments spread over a
/// whole dump — before the freeze, inside the window, after the thaw while the image is
/// written, fsync'd and renamed. Afterwards nothing is left: no temporary image, no
/// watchdog, the cgroup thawed and running; the image is either absent or whole.
/// Before the fix the watchdog was told "done" at the thaw, so kills during the write
/// left `.img.tmp-PID` behind.
#[test]
fn sigkill_at_any_moment_of_a_dump_leaves_nothing_behind() {
    let cg = Cgroup::new(false);
    let dir = Scratch::new();
    let f = dir.file("x");
    let mut p = cg.locker();
    p.cmd(&format!("open a {f}"));
    p.cmd("posix a w 0 0");
    // A deleted file of 24 MiB: its contents make the write and fsync after the thaw
    // last long enough for kills to land there.
    let ghost = dir.0.join("ghost");
    std::fs::write(
        &ghost,
        (0..24u32 << 20)
            .map(|i| ((i * 7) >> 3) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    p.cmd(&format!("open g {}", ghost.display()));
    p.cmd(&format!("unlink {}", ghost.display()));
    let img = dir.0.join("img");
    let nowhere = format!("/sys/fs/bpf/{}", unique("none"));
    let dump = || {
        ckpt_user_cmd()
            .args(["--pin-dir", &nowhere, "dump", &cg.name, "-o"])
            .arg(&img)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let t = std::time::Instant::now();
    assert!(dump().wait().unwrap().success());
    let whole = t.elapsed();
    std::fs::remove_file(&img).unwrap();
    const KILLS: u32 = 24;
    let mut complete = 0;
    for i in 0..KILLS {
        // Spread over the dump's whole length, a little past it.
        let at = whole.mul_f64(f64::from(i) / f64::from(KILLS) * 1.1);
        let mut d = dump();
        std::thread::sleep(at);
        // SAFETY: our child.
        unsafe { libc::kill(d.id() as i32, libc::SIGKILL) };
        let _ = d.wait();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let tmp = temporaries(&dir.0);
            let watchdogs = processes_naming(".img.tmp-");
            if tmp.is_empty() && watchdogs.is_empty() && !cg.frozen() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "kill {i} ({at:?} into a {whole:?} dump): left behind: {tmp:?}, watchdogs {watchdogs:?}, frozen {}",
                cg.frozen()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if img.exists() {
            // Killed after the rename: the image is whole.
            let (code, _, err) = ckpt_user(&["inspect", img.to_str().unwrap()]);
            assert_eq!(
                code, 0,
                "kill {i}: a partial image under the final name: {err}"
            );
            complete += 1;
            std::fs::remove_file(&img).unwrap();
        }
        assert_eq!(p.cmd("pid"), format!("ok {}", p.pid()), "the workload runs");
    }
    eprintln!("{KILLS} kills over {whole:?}: {complete} after the rename");
}

/// Issue 16, defect 5: a dump run from inside the cgroup it dumps (or from a process
/// whose ancestor is inside) is refused with one line before anything is frozen or
/// created. Before the fix the dump froze itself and its watchdog for good.
#[test]
fn a_dump_of_its_own_cgroup_is_refused() {
    let cg = Cgroup::new(false);
    let outside = Cgroup::new(false);
    let dir = Scratch::new();
    let f = dir.file("x");
    let mut p = cg.locker();
    p.cmd(&format!("open a {f}"));
    let img = dir.0.join("img");
    let user = bin("ckpt-user");
    let procs = cg.path.join("cgroup.procs");
    let away = outside.path.join("cgroup.procs");
    for (what, script) in [
        (
            "this ckpt-user",
            format!(
                "echo $$ > {procs:?} && exec {user:?} dump {} -o {img:?}",
                cg.name
            ),
        ),
        (
            // The shell stays in the cgroup; the dump itself runs outside it.
            "its ancestor process",
            format!(
                "echo $$ > {procs:?} && sh -c 'echo $$ > {away:?} && exec {user:?} dump {} -o {img:?}'; exit $?",
                cg.name
            ),
        ),
    ] {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .env("CKPT_IMAGE_KEY", test_key())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if std::time::Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let Some(status) = status else {
            // It froze itself: thaw so that the test can clean up, then fail.
            let _ = std::fs::write(cg.path.join("cgroup.freeze"), "0");
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: the dump froze itself (frozen: {})", cg.frozen());
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{what}: dumped its own cgroup");
        assert!(
            err.contains(&format!("contains {what}")) && err.contains("would freeze itself"),
            "{what}: {err}"
        );
        one_error_line(&err);
        assert!(!cg.frozen());
        assert!(temporaries(&dir.0).is_empty() && !img.exists());
    }
    assert_eq!(p.cmd("pid"), format!("ok {}", p.pid()));
}

/// Issue 16 (`refusals_leave_the_cgroup_thawed_and_no_image` under load): a process
/// killed inside the frozen window was alive at the freeze, but its exit can tear
/// what the dump reads, so the dump refuses it — every time, whether the kernel has
/// let it exit yet or not (a v1 freezer keeps a killed task until the thaw, which made
/// the old check miss it every time), with the agent's iterator or from /proc.
#[test]
fn a_process_killed_while_frozen_is_refused_every_time() {
    let agent = Agent::start();
    let nowhere = format!("/sys/fs/bpf/{}", unique("none"));
    // The VM kernels have no v1 freezer hierarchy.
    let v1_too = Path::new("/sys/fs/cgroup/freezer/cgroup.procs").exists();
    for v1 in [true, false].into_iter().filter(|v| !v || v1_too) {
        for pins in [agent.pin_dir.to_str().unwrap(), nowhere.as_str()] {
            for round in 0..3 {
                let cg = Cgroup::new(v1);
                let dir = Scratch::new();
                let f = dir.file("x");
                let mut p = cg.locker();
                p.cmd(&format!("open a {f}"));
                let victim = cg.locker();
                let img = dir.0.join("img").display().to_string();
                let kill = format!("kill -9 {}", victim.pid());
                let (code, _, err) = ckpt_user(&[
                    "--pin-dir",
                    pins,
                    "dump",
                    &cg.name,
                    "-o",
                    &img,
                    "--snapshot-cmd",
                    &kill,
                ]);
                let case = format!("v1 {v1}, pins {pins}, round {round}");
                assert_ne!(code, 0, "{case}: dumped a process killed while frozen");
                assert!(err.contains("exited during the dump"), "{case}: {err}");
                assert!(!cg.frozen(), "{case}");
                assert_eq!(only(&dir.0, &["x"]), Vec::<String>::new(), "{case}");
            }
        }
    }
}

/// `dump --hash` of a file whose lease is being broken: read through a dup of the
/// holder's description, so no open of the dump's waits on the break or starts
/// another, and the holder's file position stays where it was. A file leased and open
/// only for writing cannot be read without an open: refused in one line.
#[test]
fn hashing_a_breaking_leased_file_opens_nothing_and_moves_no_position() {
    require_root();
    let agent = Agent::start();
    let _sysctl = LeaseBreakTime::set(30);
    let dir = Scratch::new();
    let cg = Cgroup::new(false);
    let outside = Cgroup::new(false);
    let f = dir.file("leased");
    std::fs::write(&f, "leased contents").unwrap();
    let mut h = cg.locker();
    let fd = fd_of(&mut h, &format!("openmode f {f} r"));
    h.cmd("seek f 7");
    h.cmd("lease f w");
    let mut breaker = outside.locker();
    breaker.send(&format!("openmode x {f} w"));
    wait_for_breaking_lease(&f);
    let img = dir.file("img");
    let started = std::time::Instant::now();
    let (code, _, err) = agent.dump(&cg.path, &img, &["--hash"]);
    assert_eq!(code, 0, "{err}");
    // An open for reading would have waited for the break's 30 s.
    assert!(started.elapsed() < Duration::from_secs(15), "{err}");
    let image = inspect_json(&img);
    let fp = image["fingerprints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["path"] == f.as_str())
        .unwrap();
    // sha256("leased contents")
    assert_eq!(
        fp["sha256"],
        "5a2b7711c1343ea2695db9ace5aadcc53ffedc3c7650ea87b2629b5132656208"
    );
    assert_eq!(fdinfo(h.pid(), fd).0, 7, "the holder's position");
    let id = proc_locks_id(&f);
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    assert!(
        locks
            .lines()
            .any(|l| l.contains("BREAKING") && l.split_whitespace().any(|w| w == id)),
        "the lease is still breaking, on its first break: {locks}"
    );
    drop(breaker);
    h.kill();

    let g = dir.file("written");
    std::fs::write(&g, "x").unwrap();
    let mut w = cg.locker();
    w.cmd(&format!("openmode g {g} w"));
    w.cmd("lease g w");
    let img2 = dir.0.join("img2").display().to_string();
    let (code, _, err) = agent.dump(&cg.path, &img2, &["--hash"]);
    assert_ne!(code, 0);
    one_error_line(&err);
    assert!(err.contains("not open for reading"), "{err}");
    assert!(!Path::new(&img2).exists());
}
