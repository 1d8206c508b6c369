//! A checkpoint carried to another node: dumped in a VM on one kernel, restored in a VM
//! on the other (6.12 -> 6.1), with the workload's files copied the way `rsync -t`
//! copies them (same paths, sizes, mtimes and bytes; other inodes, on another
//! filesystem, under another hostname).
//!
//! Two ways: ckpt's spawn mode (`dump` -> `restore`), and CRIU with ckpt's plugin
//! (`criu_dump` -> `criu_restore`), where a breaking lease must keep its time too.
//!
//! `cargo xtask test` boots the two VMs in turn on one disk both attach (/dev/vda): the
//! init script runs the tests named `*dump` in the first and `*restore` in the second
//! (CKPT_MIGRATE=dump|restore). Ignored everywhere else: they need that disk and a
//! fresh node each.

use std::{
    path::{Path, PathBuf},
    sync::Once,
    time::{Duration, SystemTime},
};

use ckpt_tests::{criu::*, *};
use serde_json::{json, Value};

/// The disk both VMs attach.
const DISK: &str = "/dev/vda";
/// Where it is mounted: the image, the copy of the files, and what the dump side tells
/// the restore side.
const CARRY: &str = "/mnt/carry";
/// Each node's own filesystem for the workload's files (a tmpfs).
const DATA: &str = "/srv/node-data";
/// The breaking lease's lease-break-time and how long it breaks before the dump.
const BREAK_TIME_S: u32 = 5;
const BROKEN_FOR: Duration = Duration::from_secs(2);
/// The issue's tolerance around the deadline.
const TOLERANCE_MS: f64 = 20.0;

/// Mounts the shared disk at CARRY, once the kernel has made its node (virtio_blk
/// probes it in the background after the module loads).
fn mount_disk() {
    wait_for(Duration::from_secs(20), "the shared disk's node", || {
        Path::new(DISK).exists().then_some(())
    });
    std::fs::create_dir_all(CARRY).unwrap();
    sh(&format!("mount {DISK} {CARRY}"));
}

fn mount_tmpfs(at: &str) {
    std::fs::create_dir_all(at).unwrap();
    sh(&format!("mount -t tmpfs node-data {at}"));
}

/// The first node, once for its tests: the shared disk made and mounted, and the
/// node's own filesystem for the workloads.
fn first_node() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        wait_for(Duration::from_secs(20), "the shared disk's node", || {
            Path::new(DISK).exists().then_some(())
        });
        sh(&format!("mkfs.ext4 -q -F {DISK}"));
        mount_disk();
        mount_tmpfs(DATA);
    });
}

/// The second node, once for its tests: the shared disk mounted, an empty filesystem
/// of its own.
fn second_node() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        mount_disk();
        mount_tmpfs(DATA);
    });
}

/// Everything on the shared disk before the VM powers off.
fn flush() {
    // SAFETY: plain sync(2).
    unsafe { libc::sync() };
}

/// What `rsync -rt` keeps: the tree `from` into `to`, each file with its mtime.
fn copy_keeping_mtimes(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_keeping_mtimes(&e.path(), &dst);
            continue;
        }
        std::fs::copy(e.path(), &dst).unwrap();
        let mtime = e.metadata().unwrap().modified().unwrap();
        set_mtime(&dst, mtime);
    }
}

fn set_mtime(path: &Path, mtime: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_times(std::fs::FileTimes::new().set_modified(mtime))
        .unwrap();
}

fn fd_of(reply: &str) -> i32 {
    reply.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// /proc/locks lines on the file at `path`, with the pid and device left out (both
/// differ between the nodes): "POSIX ADVISORY WRITE 0 9".
fn locks_on(path: &str) -> Vec<String> {
    let id = proc_locks_id(path);
    let mut out: Vec<String> = std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter(|l| !l.contains("->"))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let at = w.iter().position(|x| *x == id)?;
            Some(format!("{} {} {}", w[1..4].join(" "), w[at + 1], w[at + 2]))
        })
        .collect();
    out.sort();
    out
}

/// The files of the workload, by name in DATA.
const FILES: &[&str] = &["leased", "posix", "ofd", "flocked"];

#[test]
#[ignore = "run by `cargo xtask test` in the first VM of the migration (CKPT_MIGRATE=dump)"]
fn dump() {
    require_root();
    first_node();
    let agent = Agent::start();
    let sysctl = LeaseBreakTime::set(BREAK_TIME_S);
    let cg = Cgroup::new(false);
    let path = |name: &str| format!("{DATA}/{name}");
    for (i, name) in FILES.iter().enumerate() {
        std::fs::write(path(name), format!("{name} {}", "x".repeat(i * 100))).unwrap();
    }
    std::fs::write(path("ghost"), "deleted but open").unwrap();

    let mut h = cg.locker();
    let leased_fd = fd_of(&h.cmd(&format!("openmode l {} r", path("leased"))));
    h.cmd("lease l w");
    h.cmd(&format!("open p {}", path("posix")));
    h.cmd("posix p w 0 10");
    h.cmd(&format!("open o {}", path("ofd")));
    h.cmd("ofd o r 5 5");
    h.cmd(&format!("open f {}", path("flocked")));
    h.cmd("flock f sh");
    let ghost_fd = fd_of(&h.cmd(&format!("open g {}", path("ghost"))));
    h.cmd(&format!("unlink {}", path("ghost")));
    let mut b = cg.locker();
    b.send(&format!("openmode x {} w", path("leased")));
    wait_for_breaking_lease(&path("leased"));
    std::thread::sleep(BROKEN_FOR);
    let locks: Value = FILES
        .iter()
        .map(|n| (n.to_string(), json!(locks_on(&path(n)))))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let img = format!("{CARRY}/img");
    let (code, _, err) = agent.dump(&cg.path, &img, &["--hash"]);
    assert_eq!(code, 0, "{err}");
    drop(sysctl);
    // The workload stops before its files are copied (README): reading the leased file
    // would wait on its break.
    let (holder, breaker) = (h.pid(), b.pid());
    drop((h, b));

    // The image key goes along (README: give both nodes the same key), and the node's
    // files, as rsync -t would carry them.
    std::fs::copy(test_key(), format!("{CARRY}/image.key")).unwrap();
    copy_keeping_mtimes(Path::new(DATA), &Path::new(CARRY).join("data"));
    let told = json!({
        "hostname": std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim(),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim(),
        "holder": holder,
        "breaker": breaker,
        "leased_fd": leased_fd,
        "ghost_fd": ghost_fd,
        "locks": locks,
    });
    std::fs::write(format!("{CARRY}/told.json"), told.to_string()).unwrap();
    eprintln!("migration: dumped {told}");
    flush();
}

#[test]
#[ignore = "run by `cargo xtask test` in the second VM of the migration (CKPT_MIGRATE=restore)"]
fn restore() {
    require_root();
    second_node();
    let told: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{CARRY}/told.json")).unwrap())
            .unwrap();
    let here = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(told["kernel"], here.trim(), "restored on the other kernel");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_ne!(told["hostname"], host.trim(), "restored on another node");
    let img = format!("{CARRY}/img");
    let carried = Path::new(CARRY).join("data");
    let path = |name: &str| format!("{DATA}/{name}");
    let _agent = Agent::start();
    let into = Cgroup::new(false);
    let dir = Scratch::new();
    let sock = dir.file("sock");
    let _ = std::fs::remove_file(&sock);
    let exec_h = format!(
        "{}=exec {} --listen {sock}",
        told["holder"],
        bin("locker").display()
    );
    let exec_b = format!("{}=exec sleep 600", told["breaker"]);
    let cg = into.path.display().to_string();
    let args = [
        img.as_str(),
        "--skip-unsupported",
        "--cgroup",
        &cg,
        "--exec-cmd",
        &exec_h,
        "--exec-cmd",
        &exec_b,
        "--json",
    ];

    // Without the dumping node's key: refused, nothing touched.
    copy_keeping_mtimes(&carried, Path::new(DATA));
    let (code, _, err) = run_restore(&args);
    assert_ne!(code, 0, "an image signed with another node's key");
    assert!(err.contains("cannot authenticate"), "{err}");
    assert!(cgroup_pids(&into).is_empty(), "nothing was restored");
    std::fs::create_dir_all(test_key().parent().unwrap()).unwrap();
    std::fs::copy(format!("{CARRY}/image.key"), test_key()).unwrap();

    // A copy whose bytes differ at the same size and mtime: only the SHA-256 tells,
    // and the restore refuses it, naming the file.
    copy_keeping_mtimes(&carried, Path::new(DATA));
    let posix = Path::new(DATA).join("posix");
    let kept = std::fs::metadata(&posix).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&posix).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(&posix, &bytes).unwrap();
    set_mtime(&posix, kept);
    let (code, _, err) = run_restore(&args);
    assert_ne!(code, 0, "a changed file must stop the restore");
    assert!(
        err.contains(&path("posix")) && err.contains("SHA-256"),
        "{err}"
    );
    assert!(cgroup_pids(&into).is_empty(), "nothing was restored");

    // The faithful copy: accepted by size, mtime and SHA-256 on other inodes.
    copy_keeping_mtimes(&carried, Path::new(DATA));
    let (_, out, _) = ckpt_user(&["inspect", &img, "--json"]);
    let image: Value = serde_json::from_str(&out).unwrap();
    let in_image = image["leases"][0]["remaining_ns"].as_f64().unwrap() / 1e6;
    let sysctl = LeaseBreakTime::set(45);
    let (code, out, err) = run_restore(&args);
    assert_eq!(code, 0, "restore failed: {err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let released = report["released_monotonic_ns"].as_u64().unwrap();
    let planned = report["leases"][0]["remaining_ns"].as_f64().unwrap() / 1e6;
    assert!(
        (planned - in_image).abs() < 1.0,
        "planned {planned} ms, image {in_image} ms"
    );

    // Every lock as it was on the first node, on the copied files.
    for name in FILES {
        let now = locks_on(&path(name));
        let then: Vec<String> = told["locks"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        // The lease is breaking on both nodes; the rest must match exactly.
        assert_eq!(now, then, "{name}: locks on the first node, then here");
    }

    // The breaking lease is revoked when it had left, counted from the release.
    let mut r = RemoteLocker::connect(&sock);
    r.cmd(&format!("adopt l {}", told["leased_fd"]));
    let at: u64 = r.cmd("pollproc l gone 10000")[3..].parse().unwrap();
    let measured = (at as f64 - released as f64) / 1e6;
    assert_eq!(r.cmd("sigcount"), "ok 0", "no second SIGIO");
    drop(sysctl);
    eprintln!(
        "migration {} -> {}: image {in_image:.1} ms left, revoked {measured:.1} ms after the release",
        told["kernel"].as_str().unwrap(),
        here.trim()
    );
    assert!(
        (measured - in_image).abs() <= TOLERANCE_MS,
        "revoked {measured:.1} ms after the release, {in_image:.1} ms expected"
    );

    // The deleted file: open, unlinked, with its bytes.
    let holder = cgroup_pids(&into)
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .contains("--listen")
        })
        .expect("the restored holder");
    let link = format!("/proc/{holder}/fd/{}", told["ghost_fd"]);
    let target = std::fs::read_link(&link).unwrap();
    assert!(
        target.to_string_lossy().ends_with("(deleted)"),
        "{}",
        target.display()
    );
    assert_eq!(std::fs::read_to_string(&link).unwrap(), "deleted but open");
}

/// The seed scenario's files on each node (same path on both).
fn criu_dir() -> PathBuf {
    Path::new(DATA).join("criu")
}

/// The seed scenario in its own pid namespace (CRIU restores its pids there, whatever
/// the second node's own pids are), dumped through CRIU with ckpt's plugin when about
/// 3 s of a 10 s lease-break-time remain.
#[test]
#[ignore = "run by `cargo xtask test` in the first VM of the migration (CKPT_MIGRATE=dump)"]
fn criu_dump() {
    require_root();
    first_node();
    let (_lbt, _scratch, plugin) = criu_test(Some(10));
    std::fs::create_dir_all(criu_dir()).unwrap();
    let here = Scratch(criu_dir());
    let mut seed = Seed::start_in(&here, "seed", "w", "w", true);
    let broke = wait_for(Duration::from_secs(10), "the break", || seed.break_seen());
    std::thread::sleep(Duration::from_nanos(
        (broke + 7_000_000_000).saturating_sub(mono_ns()),
    ));
    ckpt_tests::criu::criu_dump(seed.root, &seed.images, &plugin, None);
    seed.reap();
    let (left, _, _) = seed.recorded();
    copy_keeping_mtimes(&criu_dir(), &Path::new(CARRY).join("criu"));
    let told = json!({
        "left_ns": left,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim(),
    });
    std::fs::write(format!("{CARRY}/criu-told.json"), told.to_string()).unwrap();
    eprintln!(
        "migration through CRIU: dumped with {:.1} ms left",
        left as f64 / 1e6
    );
    flush();
}

/// CRIU restores the tree carried from the first node, with ckpt's plugin: the lease
/// is revoked the recorded time after the resume, the breaker gets through with it,
/// and the holder gets no second SIGIO.
#[test]
#[ignore = "run by `cargo xtask test` in the second VM of the migration (CKPT_MIGRATE=restore)"]
fn criu_restore() {
    require_root();
    second_node();
    let (_lbt, _scratch, plugin) = criu_test(Some(10));
    let told: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{CARRY}/criu-told.json")).unwrap())
            .unwrap();
    let left = told["left_ns"].as_i64().unwrap();
    copy_keeping_mtimes(&Path::new(CARRY).join("criu"), &criu_dir());
    let files = SeedFiles::at(&criu_dir(), "seed");
    let since = real_ns();
    ckpt_tests::criu::criu_restore(&files.images, &plugin);
    std::thread::sleep(Duration::from_nanos(left.max(0) as u64 + 500_000_000));
    files.kill_restored();
    let (resumed, revoked, _) = files.after_restore(since);
    eprintln!(
        "migration through CRIU {} -> {}: {:.1} ms left at the dump, revoked {} after the resume",
        told["kernel"].as_str().unwrap(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap()
            .trim(),
        left as f64 / 1e6,
        revoked.map_or("never".into(), |r| format!(
            "{:.1} ms",
            (r as f64 - resumed as f64) / 1e6
        ))
    );
    files.assert_kept_its_time(since, left);
}
