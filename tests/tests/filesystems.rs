//! The tracer, `locks` and `dump` on every filesystem: ext4, XFS, btrfs and tmpfs
//! (btrfs reports a per-subvolume device in stat() but the superblock's in /proc/locks
//! and tracepoints; XFS and btrfs can reflink deleted files while frozen).

use ckpt_tests::*;
use serde_json::Value;

#[test]
fn locks_and_deleted_files_on_every_filesystem() {
    let agent = Agent::start();
    let fss = Filesystems::new();
    for (fs, mnt) in &fss.mounts {
        let cg = Cgroup::new(false);
        let f = mnt.join("locked").display().to_string();
        std::fs::write(&f, b"x").unwrap();
        let ghost = mnt.join("ghost").display().to_string();
        let mut p = cg.locker();
        p.cmd(&format!("open a {f}"));
        p.cmd("posix a w 0 10");
        p.cmd("ofd a r 20 5");
        p.cmd(&format!("open g {ghost}"));
        p.cmd("pwrite g 0 head");
        p.cmd("pwrite g 4194304 tail");
        p.cmd(&format!("unlink {ghost}"));

        // The live table, with paths resolved, agrees with the kernel.
        let rows: Vec<Value> = agent
            .locks(&["--pid", &p.pid().to_string()])
            .into_iter()
            .filter(|r| r["path"] == f.as_str())
            .collect();
        assert_eq!(rows.len(), 2, "{fs}: {rows:?}");
        assert_agrees_on(&agent, |s| s.2 == Some(i64::from(p.pid())) || s.0 == "ofd");

        // The dump places both locks and keeps the deleted file's holes and bytes.
        let img = mnt.join("img").display().to_string();
        let (code, _, err) = agent.dump(&cg.path, &img, &[]);
        assert_eq!(code, 0, "{fs}: {err}");
        let (_, out, _) = ckpt_user(&["inspect", &img, "--json"]);
        let image: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            image["locks"].as_array().unwrap().len(),
            2,
            "{fs}: {}",
            image["locks"]
        );
        let g = &image["ghosts"][0];
        assert_eq!(g["size"], 4194308, "{fs}");
        let extents = ghost_extents(g);
        let stored: u64 = extents.iter().map(|e| e.1).sum();
        assert!(stored < 1 << 20, "{fs}: holes kept: {extents:?}");
        let head = ghost_bytes(&img, g, 0, 4);
        let tail = ghost_bytes(&img, g, 4194304, 4);
        assert_eq!(
            (head.as_deref(), tail.as_deref()),
            (Some(&b"head"[..]), Some(&b"tail"[..])),
            "{fs}: contents at both ends"
        );
        std::fs::remove_file(&img).unwrap();
    }
}
