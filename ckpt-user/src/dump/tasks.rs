//! Per-process facts: parent, command line, working directory, credentials.

use anyhow::{bail, Context as _, Result};

use crate::image::format::Process;

/// `Uid:`/`Gid:` lines: real, effective, saved, filesystem.
fn ids(status: &str, key: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Fails if `pid` exited (or became a zombie) since it was read.
pub fn still_alive(pid: u32) -> Result<()> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} exited during the dump"))?;
    alive_in(pid, &status)
}

/// The same check on a `status` text already read.
fn alive_in(pid: u32, status: &str) -> Result<()> {
    let state = status
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .unwrap_or("")
        .trim();
    if state.starts_with('Z') || state.starts_with('X') {
        bail!("process {pid} exited during the dump");
    }
    Ok(())
}

/// Reads everything but the fds.
pub fn read(pid: u32) -> Result<Process> {
    let dir = format!("/proc/{pid}");
    let status = std::fs::read_to_string(format!("{dir}/status"))
        .with_context(|| format!("process {pid} exited during the dump"))?;
    // A zombie (killed while frozen) still has /proc entries, but no files.
    alive_in(pid, &status)?;
    let uid = ids(&status, "Uid:");
    let gid = ids(&status, "Gid:");
    let cmdline = std::fs::read(format!("{dir}/cmdline")).unwrap_or_default();
    Ok(Process {
        pid,
        ppid: ids(&status, "PPid:").first().copied().unwrap_or(0),
        comm: std::fs::read_to_string(format!("{dir}/comm"))
            .unwrap_or_default()
            .trim_end()
            .to_string(),
        cmdline: cmdline
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
        cwd: std::fs::read_link(format!("{dir}/cwd"))
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        uid: uid.first().copied().unwrap_or(0),
        euid: uid.get(1).copied().unwrap_or(0),
        gid: gid.first().copied().unwrap_or(0),
        egid: gid.get(1).copied().unwrap_or(0),
        groups: ids(&status, "Groups:"),
        fds: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_ids() {
        let s = "Name:\tx\nPPid:\t1\nUid:\t1000\t1001\t1000\t1000\nGid:\t50\t50\t50\t50\nGroups:\t4 24 27 \n";
        assert_eq!(ids(s, "Uid:"), vec![1000, 1001, 1000, 1000]);
        assert_eq!(ids(s, "PPid:"), vec![1]);
        assert_eq!(ids(s, "Groups:"), vec![4, 24, 27]);
        assert!(ids("Groups:\n", "Groups:").is_empty());
    }
}
