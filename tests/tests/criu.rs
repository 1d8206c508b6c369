//! CRIU itself, which the CRIU plugin (#18) builds on. VM matrix only: Debian
//! bookworm's CRIU 3.17.1 does not start on the 6.18 host ("vdso: Failed to fill
//! self vdso symtable"), so these tests are ignored by a plain `cargo test` and the
//! VMs' init runs them with `--include-ignored`.

use std::{os::unix::fs::OpenOptionsExt as _, process::Command};

use ckpt_tests::*;

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

/// A directory holding ckpt's plugin as CRIU's `--libdir` (CRIU loads every `*.so`).
fn plugin_dir(scratch: &Scratch) -> std::path::PathBuf {
    let dir = scratch.0.join("criu-lib");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(bin("libckpt_criu_plugin.so"), dir.join("ckpt.so")).unwrap();
    dir
}

/// `criu dump` of one process, killed after it (CRIU's default); the log on failure.
fn criu_dump(
    pid: u32,
    images: &std::path::Path,
    libdir: &std::path::Path,
    pins: Option<&std::path::Path>,
) -> std::process::Output {
    std::fs::create_dir_all(images).unwrap();
    let out = Command::new("criu")
        .args([
            "dump",
            "-t",
            &pid.to_string(),
            "--file-locks",
            "--file-validation",
            "filesize",
            "-v4",
            "-o",
            "dump.log",
        ])
        .arg("-D")
        .arg(images)
        .arg("-L")
        .arg(libdir)
        // Where the plugin finds ckpt-agent's records.
        .envs(pins.map(|p| ("CKPT_PIN_DIR", p)))
        .output()
        .expect("running criu");
    if !out.status.success() {
        let log = std::fs::read_to_string(images.join("dump.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "criu dump failed: {}\n{}\nlog (last lines, newest first):\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail.join("\n")
        );
    }
    out
}

/// A lease holder alone (see `alone`).
fn spawn_holder(path: &std::path::Path, t: &str) -> std::process::Child {
    let mut cmd = Command::new(bin("locker"));
    cmd.arg("--hold-lease").arg(path).arg(t);
    alone(cmd)
}

/// Starts `cmd` in its own session with its stdio on /dev/null: nothing CRIU would
/// have to dump outside the tree.
fn alone(mut cmd: Command) -> std::process::Child {
    use std::os::unix::process::CommandExt as _;
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd.spawn().unwrap()
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
