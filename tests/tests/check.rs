//! `ckpt-user check`: every requirement found on this kernel (host, 6.1, 6.12), and a
//! clear refusal where a dump and a restore cannot work.

use std::{os::unix::process::CommandExt as _, process::Command};

use ckpt_tests::*;
use serde_json::Value;

#[test]
fn check_finds_every_requirement_on_this_kernel() {
    require_root();
    let (code, out, err) = ckpt_user(&["check", "--json"]);
    // The values, for whoever reads the test log (and the closing note).
    eprintln!("{out}");
    assert_eq!(code, 0, "{err}\n{out}");
    let items: Vec<Value> = serde_json::from_str(&out).unwrap();
    let named = |n: &str| {
        items
            .iter()
            .find(|i| i["name"] == n)
            .unwrap_or_else(|| panic!("no item {n}: {out}"))
    };
    for n in [
        "root",
        "kernel BTF",
        "lockdown",
        "bpffs",
        "tracefs",
        "cgroup freezer",
        "pidfd_getfd",
        "fs.lease-break-time",
        "tracepoint posix_lock_inode (BTF)",
        "tracepoint flock_lock_inode (BTF)",
        "tracepoint filelock:break_lease_block",
        "tracepoint sched:sched_process_exit",
        "iterator task_files",
        "iterator lock_table",
        "iterator lock_table_maps",
        "iterator deleted_fds",
    ] {
        let i = named(n);
        assert_eq!(i["ok"], true, "{n}: {i}");
        assert!(i["need"] == "required" || i["need"] == "extra", "{i}");
    }
    // Nothing is left pinned by the probe.
    let pins: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ckpt-check-"))
        .collect();
    assert!(pins.is_empty(), "left behind: {pins:?}");

    // The human form ends with the verdict.
    let (code, text, _) = ckpt_user(&["check"]);
    assert_eq!(code, 0);
    assert!(
        text.trim_end()
            .ends_with("dump and restore with ckpt-agent work here"),
        "{text}"
    );
}

#[test]
fn check_as_another_user_says_what_is_missing_and_fails() {
    let out = Command::new(bin("ckpt-user"))
        .arg("check")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("MISSING  root"), "{stdout}");
    assert!(
        stdout.contains("cannot work here: see MISSING above"),
        "{stdout}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("cannot work here: missing root"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
