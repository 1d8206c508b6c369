//! `ckpt-user check`: what this kernel and host support, one line per requirement, as
//! `criu check` does. Each probe does the real thing (loads and attaches every program,
//! makes and removes a cgroup, calls pidfd_getfd) and undoes it: nothing is left
//! pinned or changed, except tracefs and bpffs, which it mounts where missing as every
//! ckpt command does.
//!
//! A requirement is `Required` when a dump and a restore of a cgroup with ckpt-agent
//! running cannot work without it; `Extra` when only something beside them is lost
//! (the exit status is non-zero only when a required one is missing).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::Serialize;

use crate::{
    cgroup,
    sys::{mounts, pidfd},
    tracer::{
        iters::{Iters, Prog},
        loader,
    },
};

/// How much a requirement matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Need {
    Required,
    Extra,
}

/// One line of the check.
#[derive(Clone, Debug, Serialize)]
pub struct Item {
    pub name: String,
    pub ok: bool,
    pub need: Need,
    /// What was found (a version, a mode, a path), or why it failed.
    pub detail: String,
    /// What is lost without it.
    pub needed_for: &'static str,
}

/// Every check, in the order printed.
pub fn run() -> Vec<Item> {
    let mut items = Vec::new();
    let mut add = |name: &str, need: Need, needed_for: &'static str, r: Result<String>| {
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(e) => (false, format!("{e:#}")),
        };
        items.push(Item {
            name: name.to_string(),
            ok,
            need,
            detail,
            needed_for,
        });
    };
    use Need::{Extra, Required};
    add(
        "root",
        Required,
        "loading eBPF programs, freezing cgroups, restoring as other users",
        root(),
    );
    add(
        "kernel BTF",
        Required,
        "every eBPF program (struct layouts are read from it at load time)",
        btf(),
    );
    add(
        "lockdown",
        Required,
        "reading kernel memory from eBPF (refused in confidentiality mode)",
        lockdown(),
    );
    add(
        "bpffs",
        Required,
        "ckpt-agent's pinned maps and programs",
        mounted(mounts::BPFFS, mounts::ensure_bpffs),
    );
    add(
        "tracefs",
        Required,
        "ckpt-agent's tracepoints (their formats are read from it)",
        mounted(mounts::TRACEFS, mounts::ensure_tracefs),
    );
    add(
        "cgroup freezer",
        Required,
        "dump (a cgroup is frozen while it is read)",
        freezer(),
    );
    add(
        "pidfd_getfd",
        Required,
        "dump (an fd's description borrowed without open(), so no lease break)",
        pidfd_getfd(),
    );
    add(
        "fs.lease-break-time",
        Required,
        "restoring a lease that was being broken with its remaining time",
        lease_break_time(),
    );
    for (name, r) in agent_programs() {
        add(
            &format!("tracepoint {name}"),
            Required,
            "ckpt-agent (wait starts, lease breaks)",
            r,
        );
    }
    for (prog, need, needed_for) in [
        (
            Prog::TaskFiles,
            Extra,
            "a dump's fd tables read in the frozen window (without it, /proc: slower)",
        ),
        (
            Prog::TaskFilesPaths,
            Extra,
            "a dump's paths read by the iterator (without it, /proc)",
        ),
        (
            Prog::LockTable,
            Extra,
            "locks with owners, waiters and lease deadlines (without it, /proc/locks)",
        ),
        (
            Prog::LockTableMaps,
            Extra,
            "locks held only through a memory mapping",
        ),
        (Prog::DeletedFds, Extra, "`ckpt-user deleted`"),
        (
            Prog::DeletedMaps,
            Extra,
            "`ckpt-user deleted`: files held only by a mapping",
        ),
    ] {
        add(
            &format!("iterator {}", prog.name()),
            need,
            needed_for,
            Iters::load(&[prog]).map(|_| "loads".to_string()),
        );
    }
    items
}

/// Whether a dump and a restore with an agent can work: every required item is there.
pub fn usable(items: &[Item]) -> bool {
    items.iter().all(|i| i.ok || i.need == Need::Extra)
}

/// The human form: one line per item, then a verdict.
pub fn render(items: &[Item]) -> String {
    let mut out = String::new();
    for i in items {
        let status = match (i.ok, i.need) {
            (true, _) => "ok",
            (false, Need::Required) => "MISSING",
            (false, Need::Extra) => "missing",
        };
        out.push_str(&format!("{status:<8} {:<34} {}", i.name, i.detail));
        if !i.ok {
            out.push_str(&format!(" (needed for {})", i.needed_for));
        }
        out.push('\n');
    }
    let missing_extras = items.iter().filter(|i| !i.ok).count();
    out.push_str(if usable(items) {
        if missing_extras == 0 {
            "dump and restore with ckpt-agent work here\n"
        } else {
            "dump and restore with ckpt-agent work here, without the extras marked missing\n"
        }
    } else {
        "dump and restore with ckpt-agent cannot work here: see MISSING above\n"
    });
    out
}

fn root() -> Result<String> {
    let uid = nix::unistd::geteuid();
    if !uid.is_root() {
        bail!("running as uid {uid}");
    }
    Ok("uid 0".into())
}

fn btf() -> Result<String> {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    let md = std::fs::metadata(path).with_context(|| {
        format!(
            "{}: the kernel was built without CONFIG_DEBUG_INFO_BTF",
            path.display()
        )
    })?;
    Ok(format!("{} ({} KiB)", path.display(), md.len() / 1024))
}

/// The kernel lockdown mode: none and integrity allow eBPF to read kernel memory,
/// confidentiality does not.
fn lockdown() -> Result<String> {
    let Some(text) = lockdown_text()? else {
        // No lockdown LSM: nothing is locked down.
        return Ok("no lockdown LSM".into());
    };
    let mode = selected(&text).unwrap_or("none").to_string();
    if mode == "confidentiality" {
        bail!("mode confidentiality");
    }
    Ok(format!("mode {mode}"))
}

/// /sys/kernel/security/lockdown, None without the lockdown LSM. Where securityfs is
/// not mounted, a child mounts it in a private mount namespace of its own and reads
/// it there, so the host's mounts stay as they are.
fn lockdown_text() -> Result<Option<String>> {
    use std::io::Read as _;

    use nix::{
        mount::{mount, MsFlags},
        sched::{unshare, CloneFlags},
        unistd::{fork, ForkResult},
    };
    const PATH: &str = "/sys/kernel/security/lockdown";
    const SECURITYFS: &str = "/sys/kernel/security";
    if let Ok(t) = std::fs::read_to_string(PATH) {
        return Ok(Some(t));
    }
    let (r, w) = nix::unistd::pipe()?;
    // SAFETY: `check` runs on one thread; the child makes a few syscalls and exits.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(r);
            let text = (|| -> Option<String> {
                unshare(CloneFlags::CLONE_NEWNS).ok()?;
                mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&str>,
                )
                .ok()?;
                mount(
                    Some("securityfs"),
                    SECURITYFS,
                    Some("securityfs"),
                    MsFlags::empty(),
                    None::<&str>,
                )
                .ok()?;
                std::fs::read_to_string(PATH).ok()
            })();
            let _ = nix::unistd::write(&w, text.unwrap_or_default().as_bytes());
            // SAFETY: leaving the child without running the parent's exit handlers.
            unsafe { libc::_exit(0) };
        }
        ForkResult::Parent { child } => {
            drop(w);
            let mut text = String::new();
            std::fs::File::from(r).read_to_string(&mut text)?;
            nix::sys::wait::waitpid(child, None)?;
            Ok((!text.is_empty()).then_some(text))
        }
    }
}

/// The bracketed word of a sysfs choice list ("none [integrity] confidentiality").
fn selected(list: &str) -> Option<&str> {
    let start = list.find('[')? + 1;
    let end = start + list[start..].find(']')?;
    Some(&list[start..end])
}

/// A pseudo filesystem: mounted already, or mountable (ckpt mounts it when missing;
/// the check leaves a mount it made, as the agent would).
fn mounted(path: &str, ensure: fn() -> Result<bool>) -> Result<String> {
    Ok(if ensure()? {
        format!("{path} (was not mounted: mounted it, as ckpt does)")
    } else {
        path.to_string()
    })
}

/// A freezer for a new cgroup: cgroup.freeze in a cgroup2 child, or the v1 freezer.
fn freezer() -> Result<String> {
    let mounts = cgroup::mounts()?;
    if let Some(v2) = mounts.iter().find(|m| m.v2) {
        let probe = v2.path.join(format!("ckpt-check-{}", std::process::id()));
        let made = std::fs::create_dir(&probe);
        let freeze = probe.join("cgroup.freeze").exists();
        if made.is_ok() {
            let _ = std::fs::remove_dir(&probe);
        }
        if freeze {
            return Ok(format!("cgroup2 cgroup.freeze ({})", v2.path.display()));
        }
    }
    if let Some(v1) = mounts
        .iter()
        .find(|m| !m.v2 && m.controllers.iter().any(|c| c == "freezer"))
    {
        return Ok(format!("cgroup v1 freezer ({})", v1.path.display()));
    }
    bail!("no cgroup2 cgroup.freeze (Linux 5.2+) and no cgroup v1 freezer mounted")
}

fn pidfd_getfd() -> Result<String> {
    let me = pidfd::pidfd_open(std::process::id())?;
    // The pidfd's own number: an fd this process surely has.
    pidfd::pidfd_getfd(&me, std::os::fd::AsRawFd::as_raw_fd(&me))?;
    Ok("pidfd_open and pidfd_getfd work".into())
}

fn lease_break_time() -> Result<String> {
    let path = PathBuf::from("/proc/sys/fs/lease-break-time");
    let v =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    // Writable is what a restore needs; the value is not changed here.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| anyhow!("{} is not writable: {e}", path.display()))?;
    Ok(format!("{} s, writable", v.trim()))
}

/// Loads and attaches each of ckpt-agent's default programs, then detaches them.
fn agent_programs() -> Vec<(String, Result<String>)> {
    match loader::probe() {
        Ok(each) => each
            .into_iter()
            .map(|(name, r)| (name, r.map(|()| "loads and attaches".to_string())))
            .collect(),
        Err(e) => vec![("(all)".to_string(), Err(e))],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_selected_mode_is_the_bracketed_one() {
        assert_eq!(
            selected("none [integrity] confidentiality\n"),
            Some("integrity")
        );
        assert_eq!(selected("[none] integrity"), Some("none"));
        assert_eq!(selected("none"), None);
    }

    #[test]
    fn only_required_items_decide() {
        let item = |ok, need| Item {
            name: "x".into(),
            ok,
            need,
            detail: String::new(),
            needed_for: "y",
        };
        assert!(usable(&[
            item(true, Need::Required),
            item(false, Need::Extra)
        ]));
        assert!(!usable(&[
            item(false, Need::Required),
            item(true, Need::Extra)
        ]));
        let text = render(&[item(false, Need::Extra)]);
        assert!(text.contains("missing  x"), "{text}");
        assert!(
            text.ends_with("without the extras marked missing\n"),
            "{text}"
        );
    }
}
