//! `ckpt-user deleted`: the agent's live table of deleted-but-open files, on ext4, XFS,
//! btrfs and tmpfs, against what the kernel shows through /proc (`lsof +L1` semantics
//! plus mapping-only holders).

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    time::Duration,
};

use ckpt_tests::*;
use serde_json::{json, Value};

/// `ckpt-user deleted --json` for these processes.
fn table(agent: &Agent, pids: &[u32]) -> Vec<Value> {
    let mut all = Vec::new();
    for pid in pids {
        let pin = agent.pin_dir.display().to_string();
        let (code, out, err) = ckpt_user(&[
            "--pin-dir",
            &pin,
            "deleted",
            "--json",
            "--pid",
            &pid.to_string(),
        ]);
        assert_eq!(code, 0, "{err}");
        let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
        all.extend(rows);
    }
    all
}

/// inode -> holders, from the table.
fn holders_by_inode(rows: &[Value]) -> BTreeMap<u64, BTreeSet<String>> {
    let mut out: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for r in rows {
        let set = out.entry(r["inode"].as_u64().unwrap()).or_default();
        for h in r["holders"].as_array().unwrap() {
            set.insert(h.to_string());
        }
    }
    out
}

/// inode -> holders, from /proc: fds of deleted regular files, and mappings of
/// processes that hold the inode through no fd. (Keyed by inode number alone, like
/// `holders_by_inode`: the same number on two filesystems merges on both sides.)
fn proc_scan(pids: &[u32]) -> BTreeMap<u64, BTreeSet<String>> {
    let mut out: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for &pid in pids {
        let mut with_fd = BTreeSet::new();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for e in dir.flatten() {
                let Ok(md) = std::fs::metadata(e.path()) else {
                    continue;
                };
                if md.is_file() && md.nlink() == 0 {
                    let fd: u32 = e.file_name().to_string_lossy().parse().unwrap();
                    with_fd.insert((md.dev(), md.ino()));
                    out.entry(md.ino())
                        .or_default()
                        .insert(json!({"pid": pid, "fd": fd}).to_string());
                }
            }
        }
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/map_files")) {
            for e in dir.flatten() {
                let Ok(md) = std::fs::metadata(e.path()) else {
                    continue;
                };
                if md.is_file() && md.nlink() == 0 && !with_fd.contains(&(md.dev(), md.ino())) {
                    let range = e.file_name().to_string_lossy().into_owned();
                    out.entry(md.ino())
                        .or_default()
                        .insert(json!({"pid": pid, "mapping": range}).to_string());
                }
            }
        }
    }
    out
}

fn row(rows: &[Value], ino: u64) -> Option<&Value> {
    rows.iter().find(|r| r["inode"] == ino)
}

fn ino_of(pid: u32, fd: &str) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
        .unwrap()
        .ino()
}

#[test]
fn deleted_files_on_every_filesystem() {
    let agent = Agent::start();
    let fss = Filesystems::new();
    for (fs, mnt) in &fss.mounts {
        let at = |n: &str| mnt.join(n).display().to_string();
        let mut p = Locker::spawn();
        let pid = p.pid();

        // Unlinked while open.
        let fd = p.cmd(&format!("open a {}", at("a")));
        let fd_a = fd.split_whitespace().nth(1).unwrap().to_string();
        p.cmd("pwrite a 0 hello");
        let ino_a = ino_of(pid, &fd_a);
        assert!(
            row(&table(&agent, &[pid]), ino_a).is_none(),
            "{fs}: not yet deleted"
        );
        p.cmd(&format!("unlink {}", at("a")));
        let rows = table(&agent, &[pid]);
        let r = row(&rows, ino_a).unwrap_or_else(|| panic!("{fs}: {rows:?}"));
        assert_eq!(r["path"], at("a"), "{fs}");
        assert_eq!(r["size"], 5, "{fs}");
        assert_eq!(r["nlink"], 0, "{fs}");
        // Without --exact-deleted no syscall is traced: the unlink time is unknown.
        assert!(r["unlinked_at"].is_null(), "{fs}: {r}");
        assert_eq!(
            r["holders"],
            json!([{"pid": pid, "fd": fd_a.parse::<u32>().unwrap()}]),
            "{fs}"
        );
        if *fs != "btrfs" {
            // btrfs: stat() shows the subvolume's device, the table the superblock's.
            let st = std::fs::metadata(mnt).unwrap().dev();
            assert_eq!(
                r["dev"],
                format!("{}:{}", libc::major(st), libc::minor(st)),
                "{fs}"
            );
        }

        // Unlinked while only mapped.
        p.cmd(&format!("open m {}", at("m")));
        p.cmd("pwrite m 0 mapped-bytes");
        let start = p
            .cmd("mmap m")
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string();
        let ino_m = std::fs::metadata(at("m")).unwrap().ino();
        p.cmd("close m");
        p.cmd(&format!("unlink {}", at("m")));
        let rows = table(&agent, &[pid]);
        let r = row(&rows, ino_m).unwrap_or_else(|| panic!("{fs}: mapped: {rows:?}"));
        let holders = r["holders"].as_array().unwrap();
        assert_eq!(holders.len(), 1, "{fs}: {r}");
        assert_eq!(holders[0]["pid"], pid);
        assert!(
            holders[0]["mapping"].as_str().unwrap().starts_with(&start),
            "{fs}: {r}"
        );
        assert_eq!(r["path"], at("m"), "{fs}");

        // Two hard links: deleted only when both are gone.
        p.cmd(&format!("open h {}", at("h1")));
        p.cmd(&format!("link {} {}", at("h1"), at("h2")));
        let ino_h = std::fs::metadata(at("h1")).unwrap().ino();
        p.cmd(&format!("unlink {}", at("h1")));
        assert!(
            row(&table(&agent, &[pid]), ino_h).is_none(),
            "{fs}: one link left"
        );
        p.cmd(&format!("unlink {}", at("h2")));
        assert!(
            row(&table(&agent, &[pid]), ino_h).is_some(),
            "{fs}: both links gone"
        );

        // Open, unlink, fork, the parent closes: the child holds it alone.
        p.cmd(&format!("open f {}", at("f")));
        let ino_f = std::fs::metadata(at("f")).unwrap().ino();
        p.cmd(&format!("unlink {}", at("f")));
        let child = p.fork() as u32;
        let both = holders_by_inode(&table(&agent, &[pid, child]));
        let pids_f: BTreeSet<u64> = both[&ino_f]
            .iter()
            .map(|h| {
                serde_json::from_str::<Value>(h).unwrap()["pid"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            pids_f,
            BTreeSet::from([u64::from(pid), u64::from(child)]),
            "{fs}: after fork"
        );
        p.cmd("close f");
        let rows = table(&agent, &[pid, child]);
        let r = row(&rows, ino_f).unwrap();
        assert!(
            r["holders"]
                .as_array()
                .unwrap()
                .iter()
                .all(|h| h["pid"] == child),
            "{fs}: the parent closed: {r}"
        );

        // Renamed over while open: the name now names another file.
        p.cmd(&format!("open r {}", at("r")));
        p.cmd("pwrite r 0 old-content");
        let ino_r = std::fs::metadata(at("r")).unwrap().ino();
        std::fs::write(at("r2"), b"new").unwrap();
        p.cmd(&format!("rename {} {}", at("r2"), at("r")));
        let rows = table(&agent, &[pid]);
        let r = row(&rows, ino_r).unwrap_or_else(|| panic!("{fs}: renamed over: {rows:?}"));
        assert_eq!(r["path"], at("r"), "{fs}");
        assert_ne!(std::fs::metadata(at("r")).unwrap().ino(), ino_r);

        // O_TMPFILE: deleted from birth.
        let tfd = p.cmd(&format!("tmpfile t {}", mnt.display()));
        let ino_t = ino_of(pid, tfd.split_whitespace().nth(1).unwrap());
        assert!(
            row(&table(&agent, &[pid]), ino_t).is_some(),
            "{fs}: O_TMPFILE"
        );

        // A sparse 1 GiB file with data at both ends pins little.
        p.cmd(&format!("sparse s {} {}", at("s"), 1u64 << 30));
        let ino_s = std::fs::metadata(at("s")).unwrap().ino();
        p.cmd(&format!("unlink {}", at("s")));
        let rows = table(&agent, &[pid]);
        let r = row(&rows, ino_s).unwrap();
        assert_eq!(r["size"], 1u64 << 30, "{fs}");
        let bytes = r["bytes"].as_u64().unwrap();
        assert!(
            (8192..64 << 20).contains(&bytes),
            "{fs}: {bytes} bytes pinned"
        );

        // Everything agrees with /proc, then the holders go and so do the entries.
        assert_eq!(
            holders_by_inode(&table(&agent, &[pid, child])),
            proc_scan(&[pid, child]),
            "{fs}"
        );
        let all = [ino_a, ino_m, ino_h, ino_f, ino_r, ino_t, ino_s];
        drop(p);
        let _ = std::process::Command::new("kill")
            .args(["-9", &child.to_string()])
            .status();
        wait_for(std::time::Duration::from_secs(5), "holders gone", || {
            let rows = table(&agent, &[pid, child]);
            all.iter().all(|i| row(&rows, *i).is_none()).then_some(())
        });
    }
}

/// `--cgroup` keeps the holders in that cgroup; without --json a table says what is
/// pinned.
#[test]
fn the_cgroup_filter_and_the_table() {
    let agent = Agent::start();
    let dir = Scratch::new();
    let cg = Cgroup::new(false);
    let mut inside = cg.locker();
    let mut outside = Locker::spawn();
    for (l, name) in [(&mut inside, "in"), (&mut outside, "out")] {
        l.cmd(&format!("open x {}", dir.file(name)));
        l.cmd("pwrite x 0 pinned-bytes");
        l.cmd(&format!("unlink {}", dir.file(name)));
    }
    let pin = agent.pin_dir.display().to_string();
    let (code, out, err) =
        ckpt_user(&["--pin-dir", &pin, "deleted", "--json", "--cgroup", &cg.name]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["path"], dir.file("in"));
    assert_eq!(rows[0]["holders"][0]["pid"], inside.pid());
    let (code, out, err) = ckpt_user(&[
        "--pin-dir",
        &pin,
        "deleted",
        "--pid",
        &outside.pid().to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&dir.file("out")) && !out.contains(&dir.file("in")),
        "{out}"
    );
    assert!(out.contains(&format!("{}/fd", outside.pid())), "{out}");
    assert!(out.contains("1 deleted files pin"), "{out}");
}

/// A holder made in a way no trigger watches (pidfd_getfd here; SCM_RIGHTS and
/// reopening /proc/PID/fd/N are alike) is found by the agent's periodic rescan.
#[test]
fn unwatched_new_holders_are_found_by_the_periodic_rescan() {
    let agent = Agent::start();
    let dir = Scratch::new();
    let mut a = Locker::spawn();
    let fd = a.cmd(&format!("open x {}", dir.file("x")));
    let fd = fd.split_whitespace().nth(1).unwrap().to_string();
    a.cmd(&format!("unlink {}", dir.file("x")));
    let mut b = Locker::spawn();
    b.cmd(&format!("borrow y {} {fd}", a.pid()));
    let ino = ino_of(a.pid(), &fd);
    wait_for(
        std::time::Duration::from_secs(5),
        "the borrower listed",
        || {
            let rows = table(&agent, &[b.pid()]);
            row(&rows, ino).map(|_| ())
        },
    );
}

/// A workload creates, writes, maps and unlinks thousands of files; after each round
/// the table agrees with a /proc scan, holder for holder, while another process keeps
/// unlinking files.
#[test]
fn the_table_agrees_with_a_proc_scan_under_a_workload() {
    let agent = Agent::start();
    let fss = Filesystems::new();
    let mut workers: Vec<Locker> = (0..3).map(|_| Locker::spawn()).collect();
    let pids: Vec<u32> = workers.iter().map(ckpt_tests::Locker::pid).collect();
    // Another process keeps creating and unlinking files all along: the agent keeps
    // rescanning while the compared processes are quiet.
    let mut noise = Locker::spawn();
    let noise_dir = fss.mounts[0].1.join("noise");
    std::fs::create_dir_all(&noise_dir).unwrap();
    noise.cmd(&format!("delnoise {}", noise_dir.display()));
    for round in 0..3 {
        for (i, w) in workers.iter_mut().enumerate() {
            let (_, mnt) = &fss.mounts[(round + i) % fss.mounts.len()];
            let dir = mnt.join(format!("w{i}-r{round}"));
            std::fs::create_dir_all(&dir).unwrap();
            w.cmd(&format!("delchurn {} 700", dir.display()));
        }
        let ours = holders_by_inode(&table(&agent, &pids));
        let kernel = proc_scan(&pids);
        assert!(!kernel.is_empty());
        assert_eq!(ours, kernel, "round {round}");
    }
    // No mapping-only holder was lost among thousands of fds.
    let maps = proc_scan(&pids)
        .values()
        .flatten()
        .filter(|h| h.contains("mapping"))
        .count();
    assert!(maps > 0);
}

/// `ckpt-agent --exact-deleted` traces the syscalls that change the set: its table
/// (`deleted --max-age`) knows when a file was unlinked; without it, when the agent
/// first saw it.
#[test]
fn exact_mode_knows_the_unlink_time_and_the_default_the_first_sighting() {
    for (extra, field) in [
        (&["--exact-deleted"][..], "unlinked_at"),
        (&[][..], "first_seen"),
    ] {
        let pin = std::path::PathBuf::from("/sys/fs/bpf").join(unique("ckpt-exact"));
        let agent = Agent::start_on(&pin, extra);
        let dir = Scratch::new();
        let f = dir.file("gone");
        let mut p = Locker::spawn();
        let fd = p.cmd(&format!("open a {f}"));
        let fd_a = fd.split_whitespace().nth(1).unwrap().to_string();
        let ino = ino_of(p.pid(), &fd_a);
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        p.cmd(&format!("unlink {f}"));
        let pin_s = pin.display().to_string();
        let r = wait_for(Duration::from_secs(10), field, || {
            let (code, out, err) = ckpt_user(&[
                "--pin-dir",
                &pin_s,
                "deleted",
                "--json",
                "--max-age",
                "60000",
            ]);
            assert_eq!(code, 0, "{err}");
            let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
            row(&rows, ino)
                .filter(|r| r[field].as_f64().is_some())
                .cloned()
        });
        let t = r[field].as_f64().unwrap();
        assert!(
            t >= before - 1.0 && t <= before + 5.0,
            "{field} {t} vs {before}: {r}"
        );
        if field == "first_seen" {
            assert!(r["unlinked_at"].is_null(), "{r}");
        }
        drop(agent);
    }
}

/// Without root, `deleted` says in one line that it needs root and what a user can
/// look at instead (issue 16, defect 7).
#[test]
fn without_root_deleted_says_it_needs_root() {
    use std::os::unix::process::CommandExt as _;
    let out = std::process::Command::new(bin("ckpt-user"))
        .args(["deleted", "--json"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("needs root") && err.contains("/proc/PID/fd") && !err.contains("agent"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
