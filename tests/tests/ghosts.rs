//! Deleted, renamed and temporary files, in the cases CRIU's zdtm static tests restore
//! (unlink_fstat*, unlink_regular00, unlink_mmap*, memfd): real processes dumped,
//! killed and restored, each restored fd then checked from outside (stat, fdinfo,
//! /proc/PID/fd, F_GET_SEALS, linkat) on ext4, XFS, btrfs and tmpfs.

use std::{
    ffi::CString,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    time::Duration,
};

use ckpt_tests::*;
use serde_json::Value;

fn fd_of(reply: &str) -> i32 {
    reply.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn link(pid: u32, fd: i32) -> String {
    format!("/proc/{pid}/fd/{fd}")
}

/// pos and flags from /proc/PID/fdinfo/FD.
/// linkat(/proc/PID/fd/FD -> to, AT_SYMLINK_FOLLOW): whether the kernel lets the
/// nameless inode have a name (I_LINKABLE).
fn can_link(pid: u32, fd: i32, to: &Path) -> bool {
    let a = CString::new(link(pid, fd)).unwrap();
    let b = CString::new(to.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: plain syscall.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    r == 0
}

fn seals(pid: u32, fd: i32) -> i32 {
    let f = std::fs::File::open(link(pid, fd)).unwrap();
    // SAFETY: plain fcntl on our fd.
    unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&f), libc::F_GET_SEALS) }
}

fn restore(img: &str, extra: &[&str]) -> (Cgroup, Value) {
    let into = Cgroup::new(false);
    let cg = into.path.display().to_string();
    let mut args = vec![img, "--skip-unsupported", "--json", "--cgroup", &cg];
    args.extend_from_slice(extra);
    let (code, out, err) = run_restore(&args);
    assert_eq!(code, 0, "restore failed: {err}");
    (into, serde_json::from_str(&out).unwrap())
}

fn warnings(report: &Value) -> String {
    report["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A restored ghost shows as a "(deleted)" name in its old directory.
fn assert_ghost_target(fs: &str, pid: u32, fd: i32, dir: &Path) {
    let target = std::fs::read_link(link(pid, fd)).unwrap();
    let t = target.display().to_string();
    assert!(t.ends_with(" (deleted)"), "{fs}: fd {fd} -> {t}");
    assert_eq!(target.parent(), Some(dir), "{fs}: fd {fd} -> {t}");
}

/// A locker in `cg` whose stderr is not the test's: an image holding the test's log
/// file would fail the restore's check whenever the log grew in between.
fn quiet_locker(cg: &Cgroup) -> Locker {
    let p = Locker::spawn_with(|c| {
        c.stderr(std::process::Stdio::null());
    });
    cg.add(p.pid());
    p
}

/// Dumps `cg` with `agent` (it must succeed), then kills `p`: the image's path and
/// the directory holding it.
fn checkpoint_and_kill(agent: &Agent, cg: &Cgroup, p: &mut Locker) -> (Scratch, String) {
    let images = Scratch::new();
    let img = images.file("img");
    let (code, _, err) = agent.dump(&cg.path, &img, &[]);
    assert_eq!(code, 0, "{err}");
    p.kill();
    (images, img)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn deleted_renamed_and_temporary_files_on_every_filesystem() {
    require_root();
    let agent = Agent::start();
    let fss = Filesystems::new();
    let images = Scratch::new();
    for (fs, mnt) in &fss.mounts {
        let p_ = |n: &str| mnt.join(n).display().to_string();
        let cg = Cgroup::new(false);
        let mut p = quiet_locker(&cg);
        // 1: a deleted file given another owner and mode after the unlink.
        let owned = fd_of(&p.cmd(&format!("open o {}", p_("owned"))));
        p.cmd("pwrite o 0 owned-bytes");
        p.cmd(&format!("unlink {}", p_("owned")));
        p.cmd("fchown o 1 1");
        p.cmd("fchmod o 640");
        p.cmd("seek o 3");
        // 2: a deleted file whose old name is now another open file.
        let old = fd_of(&p.cmd(&format!("open r {}", p_("reused"))));
        p.cmd("pwrite r 0 old-bytes");
        p.cmd(&format!("unlink {}", p_("reused")));
        let new = fd_of(&p.cmd(&format!("open n {}", p_("reused"))));
        p.cmd("pwrite n 0 new");
        // 3: O_TMPFILE files, one linkable and one made with O_EXCL.
        let tmp = fd_of(&p.cmd(&format!("tmpfile t {}", mnt.display())));
        p.cmd("pwrite t 0 tmp-bytes");
        let excl = fd_of(&p.cmd(&format!("tmpfile x {} excl", mnt.display())));
        p.cmd("pwrite x 0 excl-bytes");
        // 6: set-id bits, kept only from an authenticated image.
        let setid = fd_of(&p.cmd(&format!("open s {}", p_("setid"))));
        p.cmd("pwrite s 0 setid");
        p.cmd("fchmod s 6755");
        p.cmd(&format!("unlink {}", p_("setid")));
        // 4: a name unlinked while another link remains, also from a removed directory.
        let linked = fd_of(&p.cmd(&format!("open l {}", p_("linked"))));
        p.cmd("pwrite l 0 linked");
        p.cmd(&format!("link {} {}", p_("linked"), p_("linked.keep")));
        p.cmd(&format!("unlink {}", p_("linked")));
        std::fs::create_dir_all(mnt.join("d/sub")).unwrap();
        let deep = fd_of(&p.cmd(&format!("open u {}", p_("d/sub/file"))));
        p.cmd("pwrite u 0 deep");
        p.cmd(&format!("link {} {}", p_("d/sub/file"), p_("d/file.up")));
        p.cmd(&format!("unlink {}", p_("d/sub/file")));
        std::fs::remove_dir(mnt.join("d/sub")).unwrap();
        // 8: a deleted file held only by a mapping.
        p.cmd(&format!("open m {}", p_("mapped")));
        p.cmd("pwrite m 0 mapped-bytes");
        p.cmd("mmap m");
        p.cmd("close m");
        p.cmd(&format!("unlink {}", p_("mapped")));
        // 9: a sealed memfd.
        let memfd = fd_of(&p.cmd("memfd f ckpt-test"));
        p.cmd("pwrite f 0 memfd-bytes");
        p.cmd("seal f 6");
        // Process memory, not a file: not in the image.
        p.cmd("anonshared 1048576");
        let pid = p.pid();
        let bytes_of = |fd: i32| std::fs::read(link(pid, fd)).unwrap();
        let before: Vec<(i32, Vec<u8>)> = [owned, old, tmp, excl, setid, memfd]
            .iter()
            .map(|&fd| (fd, bytes_of(fd)))
            .collect();
        let listing = names(mnt);

        let img = images.file(&format!("img-{fs}"));
        let (code, _, err) = agent.dump(&cg.path, &img, &[]);
        assert_eq!(code, 0, "{fs}: {err}");
        let (_, text, _) = ckpt_user(&["inspect", &img]);
        assert!(
            text.contains(&format!("deleted file {}", p_("mapped")))
                && text.contains(&format!("mapped by {pid} at")),
            "{fs}: inspect shows the mapped file: {text}"
        );
        assert!(text.contains("memfd /memfd:ckpt-test"), "{fs}: {text}");
        assert!(!text.contains("/dev/zero"), "{fs}: {text}");
        if *fs == "ext4" {
            // The /proc path (no iterators) finds the same deleted files, owners and
            // mappings; only whether an O_TMPFILE may be linked is beyond it.
            let slow = images.file("slow");
            let (code, _, err) = ckpt_user_env(
                &["dump", cg.path.to_str().unwrap(), "-o", &slow],
                &[("CKPT_PROC_ONLY", "1")],
            );
            assert_eq!(code, 0, "{err}");
            let ghosts = |img: &str| {
                let (_, out, _) = ckpt_user(&["inspect", img, "--json"]);
                let v: Value = serde_json::from_str(&out).unwrap();
                let mut g: Vec<Value> = v["ghosts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|g| {
                        let mut g = g.clone();
                        g["data_offset"] = 0.into();
                        g["linkable"] = false.into();
                        g
                    })
                    .collect();
                g.sort_by_key(|g| g["ino"].as_u64());
                g
            };
            assert_eq!(ghosts(&img), ghosts(&slow));
            std::fs::remove_file(&slow).unwrap();
        }
        p.kill();

        let (into, report) = restore(&img, &["--exec-cmd", &format!("{pid}=exec sleep 600")]);
        let np = new_pid(&report, pid);
        for (fd, bytes) in &before {
            assert_eq!(
                &std::fs::read(link(np, *fd)).unwrap(),
                bytes,
                "{fs}: fd {fd}"
            );
        }
        // 1
        let md = std::fs::metadata(link(np, owned)).unwrap();
        assert_eq!(
            (md.uid(), md.gid(), md.mode(), md.nlink()),
            (1, 1, 0o100640, 0),
            "{fs}: owner, mode and link count"
        );
        assert_eq!(fdinfo(np, owned).0, 3, "{fs}: offset");
        assert_ghost_target(fs, np, owned, mnt);
        // 2
        assert_eq!(std::fs::read(link(np, new)).unwrap(), b"new", "{fs}");
        assert_eq!(
            std::fs::metadata(link(np, new)).unwrap().ino(),
            std::fs::metadata(mnt.join("reused")).unwrap().ino(),
            "{fs}: the new file is the one at the path"
        );
        assert_eq!(std::fs::metadata(link(np, old)).unwrap().nlink(), 0, "{fs}");
        // 3
        let (_, flags) = fdinfo(np, tmp);
        assert_eq!(flags & libc::O_ACCMODE as u64, libc::O_RDWR as u64, "{fs}");
        assert_ghost_target(fs, np, tmp, mnt);
        assert!(can_link(np, tmp, &mnt.join("tmp.linked")), "{fs}: linkable");
        assert_eq!(std::fs::read(mnt.join("tmp.linked")).unwrap(), b"tmp-bytes");
        std::fs::remove_file(mnt.join("tmp.linked")).unwrap();
        assert!(
            !can_link(np, excl, &mnt.join("excl.linked")),
            "{fs}: O_EXCL stays unlinkable"
        );
        // 6
        assert_eq!(
            std::fs::metadata(link(np, setid)).unwrap().mode() & 0o7777,
            0o6755,
            "{fs}: an authenticated image keeps set-id bits"
        );
        // 4
        for (fd, other) in [(linked, "linked.keep"), (deep, "d/file.up")] {
            let md = std::fs::metadata(link(np, fd)).unwrap();
            assert_eq!(
                md.ino(),
                std::fs::metadata(mnt.join(other)).unwrap().ino(),
                "{fs}: fd {fd} is the inode {other} names"
            );
            assert_eq!(md.nlink(), 1, "{fs}");
        }
        // 8
        assert!(
            warnings(&report).contains(&format!("of deleted file {}", p_("mapped"))),
            "{fs}: {}",
            warnings(&report)
        );
        // 9
        assert_eq!(
            std::fs::read_link(link(np, memfd)).unwrap(),
            Path::new("/memfd:ckpt-test (deleted)"),
            "{fs}"
        );
        assert_eq!(seals(np, memfd), 6, "{fs}: seals");
        // Nothing new under any name where the files lived.
        assert_eq!(names(mnt), listing, "{fs}: no file left behind");
        drop(into);

        // An image that is not authenticated loses the set-id bits, and says so.
        let (into, report) = restore(
            &img,
            &[
                "--key",
                "/nonexistent/ckpt.key",
                "--trust-image",
                "--exec-cmd",
                &format!("{pid}=exec sleep 600"),
            ],
        );
        let np = new_pid(&report, pid);
        assert_eq!(
            std::fs::metadata(link(np, setid)).unwrap().mode() & 0o7777,
            0o755,
            "{fs}: no set-id bits from an untrusted image"
        );
        assert!(
            warnings(&report).contains("set-id bits 6000 dropped"),
            "{fs}"
        );
        drop(into);
        std::fs::remove_file(&img).unwrap();
    }
}

/// A root-owned file that a uid-65534 process had open read-only, deleted by root,
/// comes back owned by root, opened read-only by that process; nothing is created in
/// the directory it was in (not even for a moment: O_TMPFILE).
#[test]
fn a_root_file_a_user_held_comes_back_as_it_was() {
    require_root();
    let agent = Agent::start();
    // In /etc, where an image must never be able to put a file.
    let dir = std::path::PathBuf::from("/etc");
    let f = format!("/etc/probe-ckpt-ghost-{}", std::process::id());
    std::fs::write(&f, b"root bytes").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cg = Cgroup::new(false);
    let mut p = Locker::spawn_with(|c| {
        use std::os::unix::process::CommandExt as _;
        c.uid(65534).gid(65534).stderr(std::process::Stdio::null());
    });
    cg.add(p.pid());
    let fd = fd_of(&p.cmd(&format!("openmode f {f} r")));
    std::fs::remove_file(&f).unwrap();
    let listing = names(&dir);
    let pid = p.pid();
    let (_images, img) = checkpoint_and_kill(&agent, &cg, &mut p);
    let (_into, report) = restore(&img, &["--exec-cmd", &format!("{pid}=exec sleep 600")]);
    let np = new_pid(&report, pid);
    let md = std::fs::metadata(link(np, fd)).unwrap();
    assert_eq!((md.uid(), md.gid(), md.mode()), (0, 0, 0o100644));
    assert_eq!(fdinfo(np, fd).1 & libc::O_ACCMODE as u64, 0, "read-only");
    assert_eq!(std::fs::read(link(np, fd)).unwrap(), b"root bytes");
    assert_ghost_target("/etc", np, fd, &dir);
    let probes = |l: Vec<String>| -> Vec<String> {
        l.into_iter().filter(|n| n.contains("probe-ckpt")).collect()
    };
    assert_eq!(probes(names(&dir)), probes(listing));
}

/// SIGKILL of a restore at any moment, while it writes a large deleted file back,
/// leaves no file under any name.
#[test]
fn a_killed_restore_leaves_no_ghost_under_any_name() {
    require_root();
    let agent = Agent::start();
    let dir = Scratch::new();
    let cg = Cgroup::new(false);
    let mut p = quiet_locker(&cg);
    let g = dir.file("big");
    p.cmd(&format!("open g {g}"));
    // 32 MiB of data, so that writing it back takes a while.
    let chunk = "x".repeat(1 << 16);
    std::fs::write(&g, chunk.repeat(512)).unwrap();
    p.cmd(&format!("unlink {g}"));
    let pid = p.pid();
    let (_images, img) = checkpoint_and_kill(&agent, &cg, &mut p);
    let listing = names(&dir.0);
    // Kills spread over the time a whole restore takes.
    let (into, report) = restore(&img, &["--exec-cmd", &format!("{pid}=exec sleep 600")]);
    let whole_ms = report["total_ms"].as_f64().unwrap() as u64;
    drop(into);
    const KILLS: u64 = 8;
    for i in 0..KILLS {
        let into = Cgroup::new(false);
        let mut cmd = ckpt_user_cmd();
        cmd.args(["restore", &img, "--skip-unsupported", "--cgroup"])
            .arg(&into.path)
            .args(["--exec-cmd", &format!("{pid}=exec sleep 600")])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut r = cmd.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(i * whole_ms / KILLS));
        // SAFETY: our child.
        unsafe { libc::kill(r.id() as i32, libc::SIGKILL) };
        let _ = r.wait();
        assert_eq!(names(&dir.0), listing, "kill {i}: a file was left");
    }
}

/// The bytes of process `pid`'s fd `fd`, read through a pidfd_getfd dup with pread:
/// no open, so a write lease on it is not broken (an open would wait out the break).
fn pread_dup(pid: u32, fd: i32) -> Vec<u8> {
    // SAFETY: plain syscalls on fds this function owns.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) as i32;
        assert!(pidfd >= 0, "pidfd_open {pid}");
        let dup = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        assert!(dup >= 0, "pidfd_getfd {pid} {fd}");
        let mut buf = vec![0u8; 1 << 16];
        let n = libc::pread(dup, buf.as_mut_ptr().cast(), buf.len(), 0);
        assert!(n >= 0, "pread");
        buf.truncate(n as usize);
        libc::close(dup);
        libc::close(pidfd);
        buf
    }
}

/// The lease lines of process `pid`'s fd `fd` (its fdinfo).
fn leases_of(pid: u32, fd: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("LEASE"))
        .map(|l| {
            l.split_whitespace()
                .skip(2)
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// A deleted file under a write lease is read through its holder's own description
/// (any open of it would break the lease, and wait out the break): the dump neither
/// breaks the lease nor moves the holder's file position, and the restore brings
/// back the bytes and the lease. Held open only for writing, it cannot be read that
/// way: the dump says so and writes nothing.
#[test]
fn a_leased_deleted_file_is_dumped_without_breaking_its_lease() {
    require_root();
    let agent = Agent::start();
    let dir = Scratch::new();
    let cg = Cgroup::new(false);
    let mut p = quiet_locker(&cg);
    let path = dir.0.join("leased").display().to_string();
    let fd = fd_of(&p.cmd(&format!("open l {path}")));
    p.cmd("pwrite l 0 leased-bytes");
    p.cmd("lease l w");
    p.cmd(&format!("unlink {path}"));
    p.cmd("seek l 5");
    let pid = p.pid();
    assert_eq!(leases_of(pid, fd), ["LEASE ACTIVE WRITE"]);

    let images = Scratch::new();
    let img = images.file("img");
    let (code, _, err) = agent.dump(&cg.path, &img, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(p.cmd("sigcount"), "ok 0", "the dump broke the lease");
    assert_eq!(leases_of(pid, fd), ["LEASE ACTIVE WRITE"]);
    assert_eq!(fdinfo(pid, fd).0, 5, "the holder's position moved");
    p.kill();
    let (_into, report) = restore(&img, &["--exec-cmd", &format!("{pid}=exec sleep 600")]);
    let np = new_pid(&report, pid);
    assert_eq!(leases_of(np, fd), ["LEASE ACTIVE WRITE"]);
    assert_eq!(pread_dup(np, fd), b"leased-bytes");
    assert_eq!(fdinfo(np, fd).0, 5);
    assert_ghost_target("tmpfs", np, fd, &dir.0);

    // Open only for writing: refused, nothing written.
    let cg = Cgroup::new(false);
    let mut w = quiet_locker(&cg);
    let path = dir.0.join("write-only").display().to_string();
    std::fs::write(&path, "x").unwrap();
    w.cmd(&format!("openmode l {path} w"));
    w.cmd("lease l w");
    w.cmd(&format!("unlink {path}"));
    let images = Scratch::new();
    let img = images.file("img");
    std::fs::remove_file(&img).unwrap();
    let (code, _, err) = agent.dump(&cg.path, &img, &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("is leased and not open for reading") && err.trim().lines().count() == 1,
        "{err}"
    );
    assert!(!Path::new(&img).exists());
    assert_eq!(w.cmd("sigcount"), "ok 0");
}
