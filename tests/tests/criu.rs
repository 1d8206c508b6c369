//! CRIU itself, which the CRIU plugin (#18) builds on. VM matrix only: Debian
//! bookworm's CRIU 3.17.1 does not start on the 6.18 host ("vdso: Failed to fill
//! self vdso symtable"), so these tests are ignored by a plain `cargo test` and the
//! VMs' init runs them with `--include-ignored`.

use std::{os::unix::fs::OpenOptionsExt as _, process::Command};

use ckpt_tests::{criu::*, *};

/// `criu check`: the kernel has what CRIU needs to dump and restore.
#[test]
#[ignore = "CRIU 3.17.1 does not start on the 6.18 host; runs in the VM matrix"]
fn criu_check_passes_on_this_kernel() {
    require_root();
    let out = Command::new("criu")
        .arg("check")
        .output()
        .expect("running criu (installed by cargo xtask setup, carried into the VMs)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "criu check failed: {text}");
    assert!(text.contains("Looks good"), "{text}");
}

/// A lease holder alone (see `alone`).
fn spawn_holder(path: &std::path::Path, t: &str) -> std::process::Child {
    let mut cmd = Command::new(bin("locker"));
    cmd.arg("--hold-lease").arg(path).arg(t);
    alone(cmd)
}

/// Waits until process `pid` shows a lease in its fdinfo.
fn wait_for_lease(pid: u32) {
    for _ in 0..500 {
        let held = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("LEASE")));
        if held {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("process {pid} took no lease");
}

/// The headline inside CRIU: a lease being broken is dumped with its own type, the
/// break's target and the exact time the kernel still gave it, which CRIU's
/// filelocks.img does not keep (it has the target type only).
#[test]
#[ignore = "CRIU 3.17.1 does not start on the 6.18 host; runs in the VM matrix"]
fn a_dump_keeps_the_time_a_breaking_lease_had_left() {
    require_root();
    let _lbt = LeaseBreakTime::set(30);
    // The agent adds what the kernel forgets: the break's start, the signal, breakers.
    let agent = Agent::start();
    let scratch = Scratch::new();
    let file = std::path::PathBuf::from(scratch.file("leased"));
    let mut holder = spawn_holder(&file, "w");
    let pid = holder.id();
    wait_for_lease(pid);
    // Break it without waiting: open(O_WRONLY|O_NONBLOCK) fails with EWOULDBLOCK and
    // starts the break (deadline: now + 30 s).
    let before_break = mono_ns();
    let r = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&file);
    let after_break = mono_ns();
    assert_eq!(
        r.err().and_then(|e| e.raw_os_error()),
        Some(libc::EWOULDBLOCK),
        "the break did not start"
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (_, before, _) = ckpt_user(&["locks", "--pid", &pid.to_string(), "--json"]);
    eprintln!("before the dump: {before}");
    let images = scratch.0.join("images");
    let dump_start = mono_ns();
    criu_dump(pid, &images, &plugin_dir(&scratch), Some(&agent.pin_dir));
    let dump_end = mono_ns();
    let _ = holder.kill();
    let _ = holder.wait();

    let text = std::fs::read_to_string(images.join("ckpt-leases.json"))
        .expect("the plugin wrote no ckpt-leases.json");
    eprintln!("{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let log = std::fs::read_to_string(images.join("dump.log")).unwrap_or_default();
    for l in log.lines().filter(|l| {
        let l = l.to_lowercase();
        l.contains("lock") || l.contains("lease") || l.contains("plugin")
    }) {
        eprintln!("dump.log: {l}");
    }
    assert_eq!(v["format"], "ckpt-criu-leases");
    assert_eq!(v["errors"], serde_json::json!([]), "{text}");
    let leases = v["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 1, "{text}");
    let l = &leases[0];
    assert_eq!(l["pid"], pid);
    assert_eq!(l["type"], "write", "its own type, not the target");
    assert_eq!(l["breaking"], true);
    assert_eq!(l["target_type"], serde_json::Value::Null, "to be removed");
    // The kernel's deadline is the break's start + 30 s, to a jiffy (at most 10 ms
    // here); the time left counts from an instant inside the dump.
    let taken = v["taken_monotonic_ns"].as_u64().unwrap();
    assert!(
        (dump_start..=dump_end).contains(&taken),
        "{taken} outside the dump"
    );
    let remaining = l["remaining_ns"].as_i64().unwrap();
    let deadline = taken as i64 + remaining;
    let (lo, hi) = (before_break + 30_000_000_000, after_break + 30_000_000_000);
    let jiffy = 10_000_000;
    assert!(
        deadline >= lo as i64 - jiffy && deadline <= hi as i64 + jiffy,
        "deadline {deadline} not within a jiffy of the break's start + 30 s ({lo}..{hi})"
    );
    // From the agent: the holder was sent SIGIO, and this test broke it without
    // waiting.
    assert_eq!(l["notified"], true, "{text}");
    assert_eq!(l["lease_break_time_s"], 30, "{text}");
    let started = l["break_started_monotonic_ns"].as_u64().unwrap();
    assert!((before_break..=after_break).contains(&started), "{text}");
    let me = std::process::id();
    assert!(
        l["breakers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["pid"] == me && b["write"] == true && b["nonblock"] == true),
        "{text}"
    );
    // inspect reads it, from the image directory.
    let (code, shown, err) = ckpt_user(&["inspect", images.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        shown.contains(&format!("pid {pid} fd 3"))
            && shown.contains("write lease, breaking to unlock")
            && shown.contains("holder signalled"),
        "{shown}"
    );
    let (code, as_json, err) = ckpt_user(&["inspect", "--json", images.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&as_json).unwrap(),
        v
    );
}

/// CRIU loads every plugin for every dump: one without leases is left alone.
#[test]
#[ignore = "CRIU 3.17.1 does not start on the 6.18 host; runs in the VM matrix"]
fn a_dump_without_leases_is_left_alone() {
    require_root();
    let scratch = Scratch::new();
    let mut cmd = Command::new("sleep");
    cmd.arg("600");
    let mut sleeper = alone(cmd);
    let images = scratch.0.join("images");
    criu_dump(sleeper.id(), &images, &plugin_dir(&scratch), None);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(images.join("pstree.img").exists());
    assert!(!images.join("ckpt-leases.json").exists());
}

/// The issue's seed scenario through CRIU, with CRIU alone and with CRIU + ckpt's
/// plugin side by side: a write lease being broken by a blocked open(O_WRONLY),
/// lease-break-time 10 s, dumped when about 3 s remain. CRIU alone breaks the lease
/// anew at restore, so the breaker waits the whole 10 s again; with the plugin the
/// kernel revokes the lease the recorded time after the processes resume, the
/// holder (its memory, pid and log intact) is not sent a second SIGIO, and the
/// blocked breaker wakes on the kernel's own timer.
#[test]
#[ignore = "CRIU 3.17.1 does not start on the 6.18 host; runs in the VM matrix"]
fn a_breaking_lease_keeps_its_time_through_criu_with_the_plugin_and_not_without() {
    let (_lbt, scratch, with_plugin) = criu_test(Some(10));
    let no_plugins = scratch.0.join("criu-lib-empty");
    std::fs::create_dir_all(&no_plugins).unwrap();
    let mut alone_side = Seed::start(&scratch, "criu", "w", "w");
    let mut ckpt_side = Seed::start(&scratch, "ckpt", "w", "w");
    let broke: Vec<u64> = [&alone_side, &ckpt_side]
        .iter()
        .map(|s| {
            wait_for(std::time::Duration::from_secs(10), "the break", || {
                s.break_seen()
            })
        })
        .collect();
    // Dump when about 3 s remain.
    let at = broke[0] + 7_000_000_000;
    std::thread::sleep(std::time::Duration::from_nanos(
        at.saturating_sub(mono_ns()),
    ));
    let dump_start = mono_ns();
    criu_dump(alone_side.root, &alone_side.images, &no_plugins, None);
    eprintln!(
        "CRIU's dump alone took {:.1} ms",
        ms((mono_ns() - dump_start) as i64)
    );
    let dump_start = mono_ns();
    criu_dump(ckpt_side.root, &ckpt_side.images, &with_plugin, None);
    let dump_end = mono_ns();
    eprintln!(
        "the plugin's dump took {:.1} ms",
        ms((dump_end - dump_start) as i64)
    );
    alone_side.reap();
    ckpt_side.reap();
    let (left, taken, _) = ckpt_side.recorded();
    // What the kernel had left at the dump's exit: 10 s from the break.
    let expected_left = (broke[1] + 10_000_000_000) as i64 - taken as i64;
    assert!(
        (left - expected_left).abs() < 20_000_000,
        "{left} ns recorded, {expected_left} expected from the holder's log"
    );

    // CRIU alone first (it breaks with the sysctl at 10 s), then with the plugin.
    let restore_alone = real_ns();
    criu_restore(&alone_side.images, &no_plugins);
    let restore_ckpt = real_ns();
    criu_restore(&ckpt_side.images, &with_plugin);
    std::thread::sleep(std::time::Duration::from_millis(10_500));
    let (a_resumed, a_revoked, a_opened) = alone_side.after_restore(restore_alone);
    eprintln!(
        "CRIU alone: resumed {a_resumed}, revoked {a_revoked:?}, breaker through {a_opened:?}; holder {:?}",
        alone_side.holder()
    );
    alone_side.kill();
    ckpt_side.kill();

    ckpt_side.assert_kept_its_time(restore_ckpt, left);
    // CRIU alone: the whole lease-break-time again (and, it breaks the lease from the
    // holder itself with SIGIO blocked, a second SIGIO at resume).
    eprintln!(
        "CRIU alone: SIGIOs by the end: {:?}",
        alone_side.holder().last()
    );
    let a_revoked = a_revoked.expect("CRIU alone: the lease was never revoked");
    let a_after = a_revoked as i64 - a_resumed as i64;
    eprintln!("CRIU alone: revoked {:.1} ms after the resume", ms(a_after));
    assert!(
        a_after > 9_000_000_000 && a_after < 10_600_000_000,
        "CRIU alone revoked it {:.1} ms after the resume",
        ms(a_after)
    );
    assert!(a_opened.is_some_and(|t| t >= a_revoked - 20_000_000));
}

/// The seed scenario's other two breaks through CRIU with the plugin: a read lease
/// broken by a writer, and a write lease downgraded by a reader (CRIU 3.17.1 alone
/// restores the first with a write lease, which its holder's read-only open cannot
/// take back, and both with the whole lease-break-time).
#[test]
#[ignore = "CRIU 3.17.1 does not start on the 6.18 host; runs in the VM matrix"]
fn read_lease_breaks_and_downgrades_keep_their_time_through_criu_with_the_plugin() {
    let (_lbt, scratch, with_plugin) = criu_test(Some(10));
    let mut sides = [
        Seed::start(&scratch, "read", "r", "w"),
        Seed::start(&scratch, "downgrade", "w", "r"),
    ];
    let broke = wait_for(std::time::Duration::from_secs(10), "the break", || {
        sides[0].break_seen()
    });
    for s in &sides {
        wait_for(std::time::Duration::from_secs(10), "the break", || {
            s.break_seen()
        });
    }
    let at = broke + 7_000_000_000;
    std::thread::sleep(std::time::Duration::from_nanos(
        at.saturating_sub(mono_ns()),
    ));
    for s in &sides {
        criu_dump(s.root, &s.images, &with_plugin, None);
    }
    let mut left = Vec::new();
    for (s, (ty, target)) in sides
        .iter_mut()
        .zip([("read", None), ("write", Some("read"))])
    {
        s.reap();
        let (l, _, lease) = s.recorded();
        assert_eq!(lease["type"], ty, "{lease}");
        assert_eq!(lease["target_type"].as_str(), target, "{lease}");
        left.push(l);
    }
    let mut since = Vec::new();
    for s in &sides {
        since.push(real_ns());
        criu_restore(&s.images, &with_plugin);
    }
    std::thread::sleep(std::time::Duration::from_millis(
        (*left.iter().max().unwrap() / 1_000_000 + 500) as u64,
    ));
    for s in &sides {
        s.kill();
    }
    for ((s, since), left) in sides.iter().zip(since).zip(left) {
        s.assert_kept_its_time(since, left);
    }
}

/// A container's tree: the seed scenario in its own pid namespace (CRIU's images
/// name its processes by their pids there), through CRIU with the plugin.
#[test]
#[ignore = "CRIU 3.17.1 does not start on the 6.18 host; runs in the VM matrix"]
fn a_tree_in_its_own_pid_namespace_keeps_its_lease_time_through_criu() {
    let (_lbt, scratch, with_plugin) = criu_test(Some(10));
    let mut side = Seed::start_in(&scratch, "pidns", "w", "w", true);
    let broke = wait_for(std::time::Duration::from_secs(10), "the break", || {
        side.break_seen()
    });
    std::thread::sleep(std::time::Duration::from_nanos(
        (broke + 7_000_000_000).saturating_sub(mono_ns()),
    ));
    criu_dump(side.root, &side.images, &with_plugin, None);
    side.reap();
    let (left, _, lease) = side.recorded();
    // Named as CRIU's images name it: the holder is the namespace's second process.
    assert_eq!(lease["pid"], 2, "{lease}");
    let since = real_ns();
    criu_restore(&side.images, &with_plugin);
    std::thread::sleep(std::time::Duration::from_nanos(
        left.max(0) as u64 + 500_000_000,
    ));
    side.kill();
    side.assert_kept_its_time(since, left);
}

/// A restore with a corrupt or a missing sidecar is CRIU's own: it still works, the
/// dumped filelocks.img is left as it was, and the plugin says what it could not do.
/// A restore that fails (the dumped process still runs: its pid is taken) leaves the
/// dumped filelocks.img in place too.
#[test]
#[ignore = "CRIU 3.17.1 does not start on the 6.18 host; runs in the VM matrix"]
fn a_corrupt_or_missing_sidecar_leaves_the_restore_to_criu() {
    let (_lbt, scratch, with_plugin) = criu_test(Some(30));
    let file = std::path::PathBuf::from(scratch.file("leased"));
    let mut holder = spawn_holder(&file, "w");
    let pid = holder.id();
    wait_for_lease(pid);
    let r = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&file);
    assert_eq!(
        r.err().and_then(|e| e.raw_os_error()),
        Some(libc::EWOULDBLOCK)
    );
    let images = scratch.0.join("images");
    criu_dump_with(pid, &images, &with_plugin, None, &["--leave-running"]);
    let dumped = std::fs::read(images.join("filelocks.img")).unwrap();
    let out = Command::new("criu")
        .args(["restore", "--file-locks", "-d", "-o", "failing.log", "-D"])
        .arg(&images)
        .arg("-L")
        .arg(&with_plugin)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the restore over a live pid succeeded"
    );
    assert_eq!(
        std::fs::read(images.join("filelocks.img")).unwrap(),
        dumped,
        "a failed restore left filelocks.img rewritten: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!images.join("ckpt-filelocks.orig.img").exists());
    let _ = holder.kill();
    let _ = holder.wait();
    let sidecar = images.join("ckpt-leases.json");
    for (case, said) in [
        ("corrupt", "ckpt-leases.json is unreadable"),
        ("missing", "no ckpt-leases.json"),
    ] {
        match case {
            "corrupt" => std::fs::write(&sidecar, "{\"format\": \"ckpt-criu-leases\", ").unwrap(),
            _ => std::fs::remove_file(&sidecar).unwrap(),
        }
        let out = criu_restore(&images, &with_plugin);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(said), "{case}: {err}");
        assert!(err.contains("CRIU breaks the 1 lease(s)"), "{case}: {err}");
        // CRIU's own restore: the lease is back and being broken again.
        let fdinfo = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/3")).unwrap();
        assert!(fdinfo.contains("LEASE  BREAKING"), "{case}: {fdinfo}");
        assert_eq!(std::fs::read(images.join("filelocks.img")).unwrap(), dumped);
        assert!(!images.join("ckpt-filelocks.orig.img").exists());
        assert!(!images.join("ckpt-restore.json").exists());
        // SAFETY: killing the process this test restored.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        wait_for(
            std::time::Duration::from_secs(10),
            "the restored holder to go",
            || {
                // SAFETY: reaping it (this process is the subreaper).
                unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
                (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
            },
        );
    }
}

/// Every lock kind through CRIU with the plugin, and the plugin's check of them: a
/// POSIX lock, an OFD lock, an flock shared with a forked child, a read lease, a
/// blocked POSIX waiter (its call restarts, and ckpt-agent keeps the time it had
/// waited) and a deleted-but-open file. Restored without `--file-locks` (CRIU then
/// restores no lock), the check names each one.
#[test]
#[ignore = "CRIU 3.17.1 does not start on the 6.18 host; runs in the VM matrix"]
fn every_lock_kind_round_trips_through_criu_and_the_plugin_checks_them() {
    let (_, scratch, with_plugin) = criu_test(None);
    // The agent keeps the waiter's start, which the sidecar records.
    let agent = Agent::start();
    let dir = scratch.0.join("files");
    std::fs::create_dir_all(&dir).unwrap();
    let started = mono_ns();
    let mut cmd = Command::new(bin("locker"));
    cmd.arg("--hold-all").arg(&dir);
    let mut root = alone(cmd);
    let pid = root.id();
    wait_for(std::time::Duration::from_secs(10), "the locks", || {
        dir.join("ready").exists().then_some(())
    });
    let child = wait_for(std::time::Duration::from_secs(10), "the waiter", || {
        let c = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        let child: u32 = c.split_whitespace().next()?.parse().ok()?;
        let locks = std::fs::read_to_string("/proc/locks").ok()?;
        locks
            .lines()
            .any(|l| l.contains("->") && l.contains(&format!(" {child} ")))
            .then_some(child)
    });
    let before = kernel_view(pid, child);
    eprintln!("before: {before:#?}");
    let images = scratch.0.join("images");
    let dump_start = mono_ns();
    criu_dump(pid, &images, &with_plugin, Some(&agent.pin_dir));
    let _ = root.wait();
    reap(&[pid, child]);
    // The waiter in the sidecar, with the time it had waited.
    let sidecar = std::fs::read_to_string(images.join("ckpt-leases.json")).unwrap();
    eprintln!("sidecar: {sidecar}");
    let sidecar: serde_json::Value = serde_json::from_str(&sidecar).unwrap();
    let w = &sidecar["waiters"][0];
    assert_eq!(
        (&w["pid"], &w["kind"], &w["type"], &w["start"], &w["end"]),
        (
            &serde_json::json!(child),
            &serde_json::json!("posix"),
            &serde_json::json!("write"),
            &serde_json::json!(0),
            &serde_json::json!(9)
        ),
        "{sidecar}"
    );
    let since = w["since_monotonic_ns"].as_u64().unwrap();
    assert!((started..dump_start).contains(&since), "{sidecar}");
    let (code, shown, err) = ckpt_user(&["inspect", images.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        shown.contains(&format!(
            "waiter pid {child} tid {child}: write POSIX lock on 0-9"
        )),
        "{shown}"
    );

    let restoring = mono_ns();
    criu_restore_with(&images, &with_plugin, Some(&agent.pin_dir));
    let restored = mono_ns();
    let after = kernel_view(pid, child);
    let report = std::fs::read_to_string(images.join("ckpt-restore.json")).unwrap();
    eprintln!("after: {after:#?}\nreport: {report}");
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["differences"], serde_json::json!([]));
    assert_eq!(report["errors"], serde_json::json!([]));
    assert_eq!(after, before, "the kernel's view after the restore");
    // The waiter's restarted call keeps the time it had waited: its start, handed to
    // the agent, is the resume less that time, and the agent shows it.
    let carried = &report["waiters"][0];
    assert_eq!(carried["waited_ns"], w["waited_ns"], "{report}");
    let carried_since = carried["since_monotonic_ns"].as_u64().unwrap();
    let waited = w["waited_ns"].as_u64().unwrap();
    assert!(
        (restoring - waited..restored - waited).contains(&carried_since),
        "{report}"
    );
    let shown = wait_for(
        std::time::Duration::from_secs(5),
        "the restarted wait in ckpt-agent",
        || {
            agent.locks(&[]).iter().find_map(|r| {
                r["waiters"]
                    .as_array()?
                    .iter()
                    .find(|x| x["pid"] == child)?["since_monotonic_ns"]
                    .as_u64()
            })
        },
    );
    assert_eq!(shown, carried_since, "{report}");
    for p in [pid, child] {
        // SAFETY: killing the processes this test restored.
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
    }
    reap(&[pid, child]);

    // Without --file-locks CRIU restores none; the check says which.
    let out = run_criu(
        {
            let mut c = Command::new("criu");
            c.args(["restore", "-d"]);
            c
        },
        &images,
        &with_plugin,
        None,
        "restore-without-locks",
    );
    let report = std::fs::read_to_string(images.join("ckpt-restore.json")).unwrap();
    for p in [pid, child] {
        // SAFETY: as above.
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
    }
    reap(&[pid, child]);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let differences: Vec<&str> = report["differences"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d.as_str())
        .collect();
    eprintln!("{}\n{differences:#?}", String::from_utf8_lossy(&out.stderr));
    for want in [
        "write POSIX lock on 0-9 was not restored",
        "read OFDLCK lock on 5-EOF was not restored",
        "write FLOCK lock on 0-EOF was not restored",
        "read lease was not restored",
    ] {
        assert!(
            differences.iter().any(|d| d.contains(want)),
            "{want}: {differences:#?}"
        );
    }
}

/// The locks, leases and waits the kernel shows for the two processes (pids
/// replaced by their role), and the deleted file's link and bytes.
fn kernel_view(pid: u32, child: u32) -> Vec<String> {
    let mut view: Vec<String> = std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let blocked = w.get(1) == Some(&"->");
            let w = if blocked { &w[2..] } else { &w[1..] };
            let who = match w.get(3)?.parse::<u32>().ok() {
                Some(p) if p == pid => "root",
                Some(p) if p == child => "child",
                // OFD locks name no process.
                _ if w[0] == "OFDLCK" => "ofd",
                _ => return None,
            };
            Some(format!(
                "{}{} {} {} {who} {} {}",
                if blocked { "-> " } else { "" },
                w[0],
                w[1],
                w[2],
                w[5],
                w[6]
            ))
        })
        .collect();
    view.sort();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let link = std::fs::read_link(fd.path()).unwrap_or_default();
        if link.to_string_lossy().ends_with("(deleted)") {
            let bytes = std::fs::read(fd.path()).unwrap_or_default();
            view.push(format!(
                "deleted {} {}",
                link.file_name().unwrap().to_string_lossy(),
                String::from_utf8_lossy(&bytes)
            ));
        }
    }
    view
}

/// A write lease being downgraded (a reader waits) that a writer then broke to unlock
/// has two deadlines: both kept through CRIU with the plugin. The holder probes its
/// lease every millisecond (an open is a lease check), so the kernel downgrades it at
/// the first deadline and the restored reader gets through then; the restored writer
/// gets through at the second.
#[test]
#[ignore = "CRIU 3.17.1 does not start on the 6.18 host; runs in the VM matrix"]
fn a_downgrade_and_an_unlock_pending_keep_their_times_through_criu() {
    let (_lbt, scratch, plugin) = criu_test(Some(10));
    let files = SeedFiles::at(&scratch.0, "two");
    let reader_log = scratch.0.join("two-reader.log");
    let file = scratch.file("two-leased");
    let script = format!(
        "{l} --hold-lease {file} w {h} & while [ ! -s {h} ]; do sleep 0.01; done; {l} --break {file} r {r} & sleep 1; {l} --break {file} w {w} & wait",
        l = bin("locker").display(),
        h = files.holder_log.display(),
        r = reader_log.display(),
        w = files.breaker_log.display()
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script]);
    let mut shell = alone(cmd);
    let root = shell.id();
    wait_for_lease_breaking_to(&file, "UNLCK");
    let broke = wait_for(std::time::Duration::from_secs(10), "the break", || {
        files.break_seen()
    });
    std::thread::sleep(std::time::Duration::from_nanos(
        (broke + 7_000_000_000).saturating_sub(mono_ns()),
    ));
    let pids: Vec<u32> = std::fs::read_to_string(format!("/proc/{root}/task/{root}/children"))
        .unwrap()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    criu_dump(root, &files.images, &plugin, None);
    let _ = shell.wait();
    reap(&pids);
    let (left, _, lease) = files.recorded();
    let down_left = lease["downgrade_remaining_ns"]
        .as_i64()
        .unwrap_or_else(|| panic!("no downgrade deadline in the sidecar: {lease}"));
    assert!(down_left < left - 500_000_000, "{lease}");

    let since = real_ns();
    criu_restore(&files.images, &plugin);
    std::thread::sleep(std::time::Duration::from_nanos(
        left.max(0) as u64 + 500_000_000,
    ));
    files.kill_restored();
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(files.images.join("ckpt-restore.json")).unwrap(),
    )
    .unwrap();
    eprintln!("report: {report}");
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");
    assert_eq!(report["differences"], serde_json::json!([]), "{report}");
    // The holder's probe succeeds once the lease is a read lease: its "gone".
    let (resumed, downgraded, written) = files.after_restore(since);
    let read = log_lines(&reader_log)
        .into_iter()
        .find(|(t, l)| *t >= resumed && l.starts_with("opened"))
        .map(|(t, _)| t);
    // Counted from the plugin's resume instant (see `resume_lag`).
    let lag = files.resume_lag(resumed, &report);
    let after = |t: Option<u64>, what: &str| -> i64 {
        t.unwrap_or_else(|| panic!("{what} never happened after the resume")) as i64
            - resumed as i64
            + lag
    };
    let (downgraded, read, written) = (
        after(downgraded, "the downgrade"),
        after(read, "the reader's open"),
        after(written, "the writer's open"),
    );
    eprintln!(
        "downgraded {:.1} ms after the plugin's resume instant ({:.1} recorded), reader through at {:.1}, writer at {:.1} ({:.1} recorded)",
        ms(downgraded),
        ms(down_left),
        ms(read),
        ms(written),
        ms(left)
    );
    for (what, got, want) in [
        ("downgraded", downgraded, down_left),
        ("the reader got through", read, down_left),
        ("the writer got through", written, left),
    ] {
        assert!(
            (got - want).abs() <= 20_000_000,
            "{what} {:.1} ms after the plugin's resume instant, {:.1} ms expected",
            ms(got),
            ms(want)
        );
    }
}

/// Where runc and CRIU run for the runc test: a tmpfs with the VM's directories bound
/// into it, moved over / in a mount namespace of their own (as switch_root does). The
/// VM's own root is the initramfs, which pivot_root cannot leave; and CRIU wants the
/// container's root to be its mount namespace's root as the kernel names it, which a
/// plain chroot into the tmpfs is not.
const RUNC_ROOT: &str = "/mnt/runc-root";
const CONTAINER: &str = "ckpt-seed";

/// Files the runc test puts in place, and what they held before (put back on drop).
const RUNC_FILES: [&str; 2] = ["/etc/criu/runc.conf", "/usr/lib/criu/ckpt.so"];

/// The runc test's root, its container and its CRIU configuration; all undone on drop.
struct RuncHost {
    before: Vec<Option<Vec<u8>>>,
}

impl RuncHost {
    fn new() -> RuncHost {
        std::fs::create_dir_all(RUNC_ROOT).unwrap();
        let host = RuncHost {
            before: RUNC_FILES.iter().map(|f| std::fs::read(f).ok()).collect(),
        };
        sh(&format!("mount -t tmpfs runc-root {RUNC_ROOT}"));
        for d in [
            "bin", "sbin", "usr", "lib", "lib64", "etc", "ckpt", "proc", "sys", "dev", "tmp", "run",
        ] {
            if std::path::Path::new("/").join(d).is_dir() {
                std::fs::create_dir_all(format!("{RUNC_ROOT}/{d}")).unwrap();
                sh(&format!("mount -o rbind /{d} {RUNC_ROOT}/{d}"));
            }
        }
        // What kubelet and CRI-O users are told to put there (README): runc hands the
        // file to CRIU.
        std::fs::create_dir_all("/etc/criu").unwrap();
        std::fs::write(
            "/etc/criu/runc.conf",
            "file-locks\nfile-validation filesize\n",
        )
        .unwrap();
        // CRIU under runc loads the plugins of its default directory.
        std::fs::create_dir_all("/usr/lib/criu").unwrap();
        std::fs::copy(bin("libckpt_criu_plugin.so"), "/usr/lib/criu/ckpt.so").unwrap();
        host
    }

    /// `runc ARGS` in the root; its output (it must succeed).
    fn runc(&self, args: &[&str]) -> String {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = Command::new("runc");
        cmd.args(args).stdin(std::process::Stdio::null());
        let root = std::ffi::CString::new(RUNC_ROOT).unwrap();
        // SAFETY: plain system calls, async-signal-safe, in the forked child.
        unsafe {
            cmd.pre_exec(move || {
                let ok = libc::unshare(libc::CLONE_NEWNS) == 0
                    && libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) == 0
                    && libc::chdir(root.as_ptr()) == 0
                    && libc::mount(
                        c".".as_ptr(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_MOVE,
                        std::ptr::null(),
                    ) == 0
                    && libc::chroot(c".".as_ptr()) == 0
                    && libc::chdir(c"/".as_ptr()) == 0;
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            })
        };
        let out = cmd.output().expect("running runc");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            let logs: Vec<String> = ["dump.log", "restore.log"]
                .iter()
                .filter_map(|l| std::fs::read_to_string(format!("{RUNC_ROOT}/images/{l}")).ok())
                .map(|t| {
                    t.lines()
                        .filter(|l| l.contains("Error"))
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .collect();
            panic!(
                "runc {args:?} failed ({}): {text}\nCRIU's errors:\n{}",
                out.status,
                logs.join("\n")
            );
        }
        text
    }
}

impl Drop for RuncHost {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| self.runc(&["delete", "--force", CONTAINER]));
        for (f, was) in RUNC_FILES.iter().zip(&self.before) {
            let _ = match was {
                Some(bytes) => std::fs::write(f, bytes),
                None => std::fs::remove_file(f),
            };
        }
        let _ = Command::new("umount").args(["-l", RUNC_ROOT]).status();
    }
}

/// runc drives CRIU, which loads the plugin from its default directory and its options
/// from /etc/criu/runc.conf, as under podman, CRI-O and the kubelet: the seed scenario
/// inside a container (its own pid and mount namespaces, its cgroup) keeps the
/// lease's time through `runc checkpoint` and `runc restore`.
#[test]
#[ignore = "CRIU 3.17.1 does not start on the 6.18 host; runs in the VM matrix"]
fn runc_checkpoint_and_restore_keep_a_breaking_lease_s_time() {
    let (_lbt, _scratch, _) = criu_test(Some(10));
    let host = RuncHost::new();
    let bundle = std::path::PathBuf::from(format!("{RUNC_ROOT}/bundle"));
    let rootfs = bundle.join("rootfs");
    for d in ["bin", "dev", "proc", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "sleep"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::copy(bin("locker"), rootfs.join("locker")).unwrap();
    std::fs::write(rootfs.join("leased"), "leased").unwrap();
    host.runc(&["spec", "--bundle", "/bundle"]);
    let config = bundle.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let script = seed_script(
        std::path::Path::new("/locker"),
        std::path::Path::new("/leased"),
        "w",
        "w",
        std::path::Path::new("/holder.log"),
        std::path::Path::new("/breaker.log"),
    );
    spec["process"]["terminal"] = false.into();
    // Its stdio on the container's own files: nothing outside it to dump.
    spec["process"]["args"] = serde_json::json!([
        "/bin/sh",
        "-c",
        format!("exec </dev/null >/out.log 2>&1; {script}")
    ]);
    spec["root"]["readonly"] = false.into();
    // The VM's network namespace (CRIU would need iptables to dump a new one); only
    // /proc and /dev mounted.
    let ns = spec["linux"]["namespaces"].as_array_mut().unwrap();
    ns.retain(|n| n["type"] != "network");
    let mounts = spec["mounts"].as_array_mut().unwrap();
    mounts.retain(|m| m["destination"] == "/proc" || m["destination"] == "/dev");
    let linux = spec["linux"].as_object_mut().unwrap();
    linux.remove("maskedPaths");
    linux.remove("readonlyPaths");
    std::fs::write(&config, spec.to_string()).unwrap();

    host.runc(&["run", "--detach", "--bundle", "/bundle", CONTAINER]);
    let files = SeedFiles {
        holder_log: rootfs.join("holder.log"),
        breaker_log: rootfs.join("breaker.log"),
        images: std::path::PathBuf::from(format!("{RUNC_ROOT}/images")),
    };
    let broke = wait_for(std::time::Duration::from_secs(10), "the break", || {
        files.break_seen()
    });
    std::thread::sleep(std::time::Duration::from_nanos(
        (broke + 7_000_000_000).saturating_sub(mono_ns()),
    ));
    host.runc(&["checkpoint", "--image-path", "/images", CONTAINER]);
    let (left, _, _) = files.recorded();
    let since = real_ns();
    host.runc(&[
        "restore",
        "--detach",
        "--image-path",
        "/images",
        "--bundle",
        "/bundle",
        CONTAINER,
    ]);
    std::thread::sleep(std::time::Duration::from_nanos(
        left.max(0) as u64 + 500_000_000,
    ));
    host.runc(&["kill", CONTAINER, "KILL"]);
    files.assert_kept_its_time(since, left);
}
