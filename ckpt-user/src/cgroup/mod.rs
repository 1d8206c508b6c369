//! Cgroups, v1 and v2: resolving a user's `<cgroup>` argument and listing its processes.
//!
//! `<cgroup>` may be a full path (`/sys/fs/cgroup/unified/job`) or a path relative to a
//! cgroup mount (`job`, `/job`): it is looked up in the cgroup2 mount first, then in each
//! v1 hierarchy (hybrid hosts mount both). `freeze`: freezing one for a dump, and
//! thawing it whatever happens.

pub mod freeze;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

/// A cgroup2 or cgroup v1 mount point, from /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMount {
    pub path: PathBuf,
    pub v2: bool,
    /// v1 controllers (e.g. ["freezer"]).
    pub controllers: Vec<String>,
}

/// Parses mountinfo text and returns cgroup mounts, cgroup2 first. By hand, not with
/// procfs: its MountInfo keeps the `\040` escapes in mount points and the options in a
/// HashMap, which loses the controllers' order.
pub fn parse_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    let mut out: Vec<CgroupMount> = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut r = right.split_whitespace();
            let fstype = r.next()?;
            let _source = r.next()?;
            let opts = r.next().unwrap_or("");
            let mount_point = left.split_whitespace().nth(4)?;
            let v2 = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            let controllers = if v2 {
                Vec::new()
            } else {
                opts.split(',')
                    .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('='))
                    .map(str::to_string)
                    .collect()
            };
            Some(CgroupMount {
                path: PathBuf::from(mount_point.replace("\\040", " ")),
                v2,
                controllers,
            })
        })
        .collect();
    out.sort_by_key(|m| !m.v2);
    out
}

pub fn mounts() -> Result<Vec<CgroupMount>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    Ok(parse_mounts(&text))
}

/// Resolves a user-given cgroup to a directory holding `cgroup.procs`.
pub fn resolve(arg: &str) -> Result<PathBuf> {
    let mounts = mounts()?;
    let p = Path::new(arg);
    if p.is_absolute() && mounts.iter().any(|m| p.starts_with(&m.path)) {
        if p.join("cgroup.procs").exists() {
            return Ok(p.to_path_buf());
        }
        bail!("cgroup {arg} does not exist");
    }
    let rel = arg.trim_start_matches('/');
    for m in &mounts {
        let candidate = m.path.join(rel);
        if candidate.join("cgroup.procs").exists() {
            return Ok(candidate);
        }
    }
    bail!(
        "cgroup {arg} does not exist (looked under {})",
        mounts
            .iter()
            .map(|m| m.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Every process in the cgroup and its descendants.
pub fn pids(dir: &Path) -> Result<BTreeSet<u32>> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let procs = std::fs::read_to_string(d.join("cgroup.procs"))
            .with_context(|| format!("reading {}", d.join("cgroup.procs").display()))?;
        out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        for e in std::fs::read_dir(&d)?.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_mountinfo_lists_cgroup2_first_with_v1_controllers() {
        let text = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
35 30 0:31 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
36 30 0:32 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
";
        let m = parse_mounts(text);
        assert_eq!(m.len(), 3);
        assert!(m[0].v2);
        assert_eq!(m[0].path, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(m[1].controllers, vec!["freezer".to_string()]);
        assert_eq!(m[2].controllers, vec!["xattr".to_string()]);
    }
}
