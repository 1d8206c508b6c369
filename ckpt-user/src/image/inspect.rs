//! `ckpt-user inspect`: a summary, everything as JSON, or a grep-able tree
//! (`task-PID/fds/N/path: ...`, `locks/I/...`, `leases/I/...`, `files/I/...`).

use std::fmt::Write as _;

use super::format::{Image, LockType, OpenFile};

/// The open file an index names; an image is input like any other, and a dangling
/// index is shown, not trusted (restore refuses such an image, see `plan`).
fn file(img: &Image, i: u32) -> Result<&OpenFile, String> {
    img.files
        .get(i as usize)
        .ok_or_else(|| format!("<file {i}: not in the image>"))
}

fn path_of(img: &Image, i: u32) -> String {
    file(img, i).map_or_else(|e| e, |f| f.path.clone())
}

fn ty(t: Option<LockType>) -> &'static str {
    t.map_or("unlock", LockType::name)
}

fn ms(ns: i64) -> String {
    format!("{:.1} ms", ns as f64 / 1e6)
}

pub fn summary(img: &Image) -> String {
    let mut s = String::new();
    let fds: usize = img.processes.iter().map(|p| p.fds.len()).sum();
    let _ = writeln!(s, "image {}  cgroup {}", img.id, img.cgroup);
    let _ = writeln!(
        s,
        "kernel {}  host {}  source {}",
        img.kernel, img.hostname, img.source
    );
    let _ = writeln!(s, "frozen for {}", ms(img.frozen_ns as i64));
    if !img.missing.is_empty() {
        let _ = writeln!(s, "missing (no agent): {}", img.missing.join("; "));
    }
    let _ = writeln!(
        s,
        "{} processes, {} fds, {} open files, {} locks, {} waiters, {} leases, {} deleted files",
        img.processes.len(),
        fds,
        img.files.len(),
        img.locks.len(),
        img.waiters.len(),
        img.leases.len(),
        img.ghosts.len()
    );
    for p in &img.processes {
        let _ = writeln!(
            s,
            "  {} {} ({} fds): {}",
            p.pid,
            p.comm,
            p.fds.len(),
            p.cmdline.join(" ")
        );
    }
    for g in &img.ghosts {
        let stored: u64 = g.extents.iter().map(|e| e.1).sum();
        let owner = match (g.uid, g.gid) {
            (Some(u), Some(gid)) => format!(", owner {u}:{gid}"),
            _ => String::new(),
        };
        let what = if g.memfd.is_some() {
            "memfd"
        } else {
            "deleted file"
        };
        let _ = writeln!(
            s,
            "  {what} {} ({} bytes, {stored} stored, mode {:o}{owner}{})",
            g.path,
            g.size,
            g.mode & 0o7777,
            if g.linkable { ", linkable" } else { "" }
        );
        for m in &g.maps {
            let _ = writeln!(
                s,
                "    mapped by {} at {:x}-{:x} {} (not mapped back by a spawn-mode restore)",
                m.pid, m.start, m.end, m.perms
            );
        }
    }
    for l in &img.leases {
        let state = if l.breaking {
            let left = l.remaining_ns.map(ms).unwrap_or_else(|| "?".into());
            let downgrade = l
                .downgrade_remaining_ns
                .map_or(String::new(), |d| format!(", downgraded in {}", ms(d)));
            format!(
                "breaking -> {} ({left} left{downgrade}, notified {})",
                ty(l.target_type),
                l.notified
            )
        } else {
            "active".into()
        };
        let _ = writeln!(
            s,
            "  lease {} on {} by {}: {state}",
            ty(l.lease_type),
            path_of(img, l.file),
            l.pid
        );
    }
    s
}

pub fn tree(img: &Image) -> String {
    let mut s = String::new();
    let mut line = |k: String, v: String| {
        let _ = writeln!(s, "{k}: {v}");
    };
    line("image/id".into(), img.id.clone());
    line("image/cgroup".into(), img.cgroup.clone());
    line("image/source".into(), img.source.clone());
    line("image/frozen_ns".into(), img.frozen_ns.to_string());
    for p in &img.processes {
        let t = format!("task-{}", p.pid);
        line(format!("{t}/comm"), p.comm.clone());
        line(format!("{t}/ppid"), p.ppid.to_string());
        line(format!("{t}/cmdline"), p.cmdline.join(" "));
        line(format!("{t}/uid"), p.uid.to_string());
        for fd in &p.fds {
            let d = format!("{t}/fds/{}", fd.fd);
            match file(img, fd.file) {
                Ok(f) => {
                    line(format!("{d}/path"), f.path.clone());
                    line(format!("{d}/pos"), f.pos.to_string());
                    line(format!("{d}/flags"), format!("{:#o}", f.flags));
                    line(format!("{d}/cloexec"), fd.cloexec.to_string());
                    line(format!("{d}/file"), f.id.to_string());
                }
                Err(missing) => {
                    line(format!("{d}/path"), missing);
                    line(format!("{d}/cloexec"), fd.cloexec.to_string());
                    line(format!("{d}/file"), fd.file.to_string());
                }
            }
        }
    }
    for f in &img.files {
        let d = format!("files/{}", f.id);
        line(format!("{d}/path"), f.path.clone());
        line(format!("{d}/dev_ino"), format!("{}:{}", f.dev, f.ino));
        line(format!("{d}/deleted"), f.deleted.to_string());
        let holders: Vec<String> = f
            .holders
            .iter()
            .map(|(p, fd)| format!("{p}:{fd}"))
            .collect();
        line(format!("{d}/holders"), holders.join(","));
    }
    for (i, l) in img.locks.iter().enumerate() {
        let d = format!("locks/{i}");
        line(format!("{d}/kind"), l.kind.name().to_string());
        line(format!("{d}/type"), ty(Some(l.lock_type)).into());
        line(
            format!("{d}/range"),
            crate::lock::range_label(l.start, l.end),
        );
        line(format!("{d}/pid"), l.pid.to_string());
        line(format!("{d}/file"), l.file.to_string());
    }
    for (i, l) in img.leases.iter().enumerate() {
        let d = format!("leases/{i}");
        line(format!("{d}/file"), l.file.to_string());
        line(format!("{d}/type"), ty(l.lease_type).into());
        line(format!("{d}/breaking"), l.breaking.to_string());
        if l.breaking {
            line(format!("{d}/target_type"), ty(l.target_type).into());
            if let Some(r) = l.remaining_ns {
                line(format!("{d}/remaining_ns"), r.to_string());
            }
            line(format!("{d}/notified"), l.notified.to_string());
        }
    }
    for (i, w) in img.waiters.iter().enumerate() {
        line(
            format!("waiters/{i}"),
            format!(
                "{} {} {} on {}:{}",
                w.pid,
                w.kind,
                ty(Some(w.lock_type)),
                w.dev,
                w.ino
            ),
        );
    }
    for (i, g) in img.ghosts.iter().enumerate() {
        let d = format!("ghosts/{i}");
        line(format!("{d}/path"), g.path.clone());
        line(format!("{d}/size"), g.size.to_string());
        line(format!("{d}/extents"), format!("{:?}", g.extents));
        line(format!("{d}/mode"), format!("{:o}", g.mode));
        if let (Some(u), Some(gid)) = (g.uid, g.gid) {
            line(format!("{d}/owner"), format!("{u}:{gid}"));
        }
        line(format!("{d}/linkable"), g.linkable.to_string());
        if let Some(m) = &g.memfd {
            line(
                format!("{d}/memfd"),
                format!("{} seals {:#x}", m.name, m.seals),
            );
        }
        for m in &g.maps {
            line(
                format!("{d}/maps/{}", m.pid),
                format!("{:x}-{:x} {} @{:#x}", m.start, m.end, m.perms, m.offset),
            );
        }
    }
    s
}
