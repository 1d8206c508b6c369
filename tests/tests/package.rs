//! The Debian package that `cargo xtask test` builds (CKPT_DEB): what it holds, its
//! own binaries run through a lock view, a dump and a restore, its agent's readiness
//! notification, its systemd unit checked by systemd-analyze, and a real dpkg install
//! and removal into a throwaway root (never this machine's own). Host only: the VMs
//! have no dpkg.

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use ckpt_tests::*;
use serde_json::Value;

fn deb() -> PathBuf {
    PathBuf::from(
        std::env::var_os("CKPT_DEB").expect(
            "CKPT_DEB is not set: run through `cargo xtask test`, which builds the package",
        ),
    )
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The package unpacked (dpkg-deb -x) under `dir`.
fn unpacked(dir: &Scratch) -> PathBuf {
    let root = dir.0.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(deb()).arg(&root));
    root
}

const FILES: &[&str] = &[
    "./usr/bin/ckpt-user",
    "./usr/bin/ckpt-agent",
    "./lib/systemd/system/ckpt-agent.service",
    "./usr/share/man/man1/ckpt-user.1.gz",
    "./usr/share/man/man1/ckpt-user-restore.1.gz",
    "./usr/share/man/man1/ckpt-user-check.1.gz",
    "./usr/share/man/man1/ckpt-agent.1.gz",
    "./usr/share/bash-completion/completions/ckpt-user",
    "./usr/share/bash-completion/completions/ckpt-agent",
    "./usr/share/zsh/vendor-completions/_ckpt-user",
    "./usr/share/fish/vendor_completions.d/ckpt-user.fish",
    "./usr/share/doc/ckpt/copyright",
];

#[test]
fn the_package_holds_binaries_unit_man_pages_and_completions() {
    let list = run(Command::new("dpkg-deb").arg("-c").arg(deb()));
    for f in FILES {
        assert!(
            list.lines().any(|l| l.ends_with(f)),
            "{f} missing from the package:\n{list}"
        );
    }
    assert!(
        !list.contains("__docs") && !list.contains("watchdog"),
        "{list}"
    );
    let name = run(Command::new("dpkg-deb").arg("-f").arg(deb()).arg("Package"));
    assert_eq!(name.trim(), "ckpt");

    let dir = Scratch::new();
    let root = unpacked(&dir);
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/ckpt-agent.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecStart=/usr/bin/ckpt-agent",
        "Restart=on-failure",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} not in:\n{unit}");
    }
    // A man page a person can read, and a completion that names the subcommands.
    let man = run(Command::new("zcat").arg(root.join("usr/share/man/man1/ckpt-user-restore.1.gz")));
    assert!(
        man.contains("lease\\-time") || man.contains("lease-time"),
        "{man}"
    );
    let bash =
        std::fs::read_to_string(root.join("usr/share/bash-completion/completions/ckpt-user"))
            .unwrap();
    assert!(bash.contains("restore") && bash.contains("check"), "{bash}");

    // systemd is not PID 1 here: systemd-analyze checks the unit's syntax and that its
    // program is executable (ExecStart pointed at the unpacked binary for that).
    let verify = dir.0.join("verify");
    std::fs::create_dir(&verify).unwrap();
    let copy = verify.join("ckpt-agent.service");
    std::fs::write(
        &copy,
        unit.replace(
            "ExecStart=/usr/bin/ckpt-agent",
            &format!("ExecStart={}", root.join("usr/bin/ckpt-agent").display()),
        ),
    )
    .unwrap();
    // --man=no: the Documentation= pages are checked in the package above, not
    // looked up on this machine.
    match Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
    {
        Ok(out) => assert!(
            out.status.success() && out.stderr.is_empty(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!("systemd-analyze not available ({e}): the unit was not verified"),
    }
}

#[test]
fn the_packaged_binaries_show_locks_dump_and_restore() {
    require_root();
    let dir = Scratch::new();
    let root = unpacked(&dir);
    let user = root.join("usr/bin/ckpt-user");
    let agent_bin = root.join("usr/bin/ckpt-agent");
    let user_cmd = || {
        let mut c = Command::new(&user);
        c.env("CKPT_IMAGE_KEY", test_key());
        c
    };
    assert!(run(user_cmd().arg("--version")).starts_with("ckpt-user "));

    // The agent, as systemd would start it: READY=1 once its maps are pinned.
    let notify = dir.0.join("notify");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let pin = PathBuf::from("/sys/fs/bpf").join(unique("ckpt-pkg"));
    let log = dir.0.join("agent.log");
    let mut agent = Command::new(&agent_bin)
        .arg("--pin-dir")
        .arg(&pin)
        .arg("--unpin")
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).unwrap_or_else(|e| {
        let _ = agent.kill();
        panic!(
            "no readiness notification ({e}): {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    assert!(
        std::fs::read_dir(pin.join("maps")).unwrap().count() > 0,
        "READY=1 before the maps were pinned"
    );

    let cg = Cgroup::new(false);
    let f = dir.file("locked");
    let mut p = cg.locker();
    p.cmd(&format!("open f {f}"));
    p.cmd("posix f w 0 10");
    let pid = p.pid();
    let rows: Value = serde_json::from_str(&run(user_cmd().arg("--pin-dir").arg(&pin).args([
        "locks",
        "--json",
        "--pid",
        &pid.to_string(),
    ])))
    .unwrap();
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["pid"] == pid && r["path"] == f.as_str() && r["end"] == 9),
        "{rows}"
    );

    let img = dir.file("img");
    run(user_cmd()
        .arg("--pin-dir")
        .arg(&pin)
        .arg("dump")
        .arg(&cg.path)
        .args(["-o", &img]));
    p.kill();
    let into = Cgroup::new(false);
    let report: Value = serde_json::from_str(&run(user_cmd()
        .arg("--pin-dir")
        .arg(&pin)
        .args(["restore", &img, "--skip-unsupported", "--json", "--cgroup"])
        .arg(&into.path)
        .args(["--exec-cmd", &format!("{pid}=exec sleep 600")])
        .stdin(Stdio::null())))
    .unwrap();
    let new = report["processes"][0]["pid"].as_u64().unwrap();
    let ino = {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(&f).unwrap().ino()
    };
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    assert!(
        locks
            .lines()
            .any(|l| l.contains(&format!(" {new} ")) && l.contains(&format!(":{ino} 0 9"))),
        "the restored process {new} holds no lock 0-9 on inode {ino}:\n{locks}"
    );

    // SAFETY: our child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    assert!(agent.wait().unwrap().success());
    assert!(!pin.exists(), "--unpin left {}", pin.display());
}

#[test]
fn dpkg_installs_and_removes_it_cleanly_in_a_throwaway_root() {
    require_root();
    let dir = Scratch::new();
    let root = dir.0.join("root");
    for d in ["var/lib/dpkg/updates", "var/lib/dpkg/info"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for f in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        std::fs::write(root.join(f), "").unwrap();
    }
    let dpkg = |args: &[&str]| {
        let mut c = Command::new("dpkg");
        c.arg(format!("--root={}", root.display()))
            .arg("--log=/dev/null")
            // The throwaway root's database has no libc6.
            .arg("--force-depends")
            .args(args);
        c
    };
    run(dpkg(&["-i"]).arg(deb()));
    for f in FILES {
        assert!(root.join(f).exists(), "{f} not installed");
    }
    let listed = run(&mut dpkg(&["-L", "ckpt"]));
    assert!(listed.contains("/usr/bin/ckpt-agent"), "{listed}");
    run(&mut dpkg(&["-r", "ckpt"]));
    let left: Vec<String> = walk(&root)
        .into_iter()
        .filter(|p| {
            !p.starts_with("var/lib/dpkg") && p != Path::new("var/lib") && p != Path::new("var")
        })
        .map(|p| p.display().to_string())
        .collect();
    assert!(left.is_empty(), "left after dpkg -r: {left:?}");
}

/// Every path under `root`, relative to it.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().to_path_buf());
            if e.file_type().unwrap().is_dir() {
                todo.push(p);
            }
        }
    }
    out
}
