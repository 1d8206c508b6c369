//! `ckpt-user restore IMAGE`: the processes of an image back, each with its files,
//! locks and leases, then running its program.
//!
//! In order, and nothing is touched before the first two pass:
//! The orchestrator; each kernel object's part is with the object:
//! 1. `plan`: the image is read (checksum, version) and turned into what each process
//!    must hold; a malformed image is refused here.
//! 2. `fd::validate`: every file is checked against its fingerprint.
//! 3. `ghost::restore`: deleted files are recreated; `fd::open`: every open file
//!    description is opened once, with its holder's credentials.
//! 4. `task::spawn`: the process tree is forked; each process takes its fds,
//!    credentials, locks and leases, and waits.
//! 5. `fd::owners`: signal owners and signals set again; `lease::restore`: leases that
//!    were being broken are broken again on a schedule, so that each is revoked when
//!    the policy says, counted from the release (`lease::schedule`; the kernel's
//!    deadlines are read back, `lease::kernel_deadline`).
//! 6. Release: every process executes its program at the same instant.
//!
//! Any failure kills every process spawned, removes every file created and puts
//! fs.lease-break-time back: all or nothing.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use crate::{
    cgroup,
    fd::{open, owners, validate},
    ghost::restore as ghost,
    image::{
        key::HostKey,
        reader::{Auth, ImageReader},
    },
    lease::{
        restore::{self as leases, LeaseReport},
        schedule::LeaseTime,
    },
    plan::{self, PlanOptions, Source},
    task::spawn,
    tracer::pins::PinDir,
};

pub struct Options {
    pub image: PathBuf,
    /// Old pid -> shell command run instead of the recorded command line.
    pub exec_cmds: HashMap<u32, String>,
    pub ghost_dir: Option<PathBuf>,
    pub lease_time: LeaseTime,
    pub force: bool,
    pub skip_unsupported: bool,
    pub keep_cloexec: bool,
    /// A cgroup to put the restored processes in.
    pub cgroup: Option<String>,
    /// Where ckpt-agent pinned its maps: when it runs, lease deadlines are read back
    /// from the kernel (`kernel_deadline`).
    pub pins: PinDir,
    /// The host key images must be MAC'd with.
    pub key: PathBuf,
    /// Restore an image that does not authenticate (with a warning).
    pub trust_image: bool,
    /// What restored processes get on stdin, stdout and stderr where those were
    /// pipes, sockets or terminals.
    pub stdio: spawn::Stdio,
}

#[derive(Debug, Serialize)]
pub struct RestoredProcess {
    pub old_pid: u32,
    pub pid: u32,
    pub old_ppid: u32,
    pub command: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub image: String,
    pub processes: Vec<RestoredProcess>,
    pub fds: usize,
    pub files: usize,
    pub locks: usize,
    pub leases: Vec<LeaseReport>,
    pub ghosts: usize,
    pub lease_time: String,
    /// CLOCK_MONOTONIC when the processes were released; lease deadlines count from it.
    pub released_monotonic_ns: u64,
    pub total_ms: f64,
    pub warnings: Vec<String>,
}

static CANCEL: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    CANCEL.store(true, Ordering::Relaxed);
}

/// SIGINT/SIGTERM/SIGHUP stop the restore at its next step (which then undoes
/// everything).
fn catch_signals() {
    use nix::sys::signal::Signal;
    crate::sys::on_signals(
        &[Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP],
        on_signal,
    );
}

fn check_cancel() -> Result<()> {
    if CANCEL.load(Ordering::Relaxed) {
        bail!("interrupted; nothing was restored");
    }
    Ok(())
}

/// Opens the image and refuses it unless its MAC verifies with the host key (or
/// `--trust-image`, which becomes a warning): restoring an image runs its processes as
/// their recorded users, so only this host's (or a key-sharing host's) dumps are taken.
fn open_authenticated(opts: &Options, warnings: &mut Vec<String>) -> Result<ImageReader> {
    let name = opts.image.display();
    let key = match HostKey::load(&opts.key) {
        Ok(k) => Some(k),
        Err(_) if opts.trust_image => None,
        Err(e) => bail!(
            "cannot authenticate {name}: {e:#}; nothing was restored (copy the dumping host's key there, see README \"Threat model\", or --trust-image)"
        ),
    };
    let reader = ImageReader::open(&opts.image, key.as_ref())?;
    let why = match &reader.auth {
        Auth::Verified { .. } => return Ok(reader),
        Auth::Unsigned => "it is a format 1 image, which carries no MAC".to_string(),
        Auth::OtherKey {
            image_key,
            host_key,
        } => format!(
            "it was made with key {image_key}, and this host's key ({}) is {host_key}",
            opts.key.display()
        ),
        Auth::Forged { .. } => {
            "its MAC does not match this host's key: it was altered or forged".to_string()
        }
        Auth::NotChecked { .. } => "no host key could be read".to_string(),
    };
    if !opts.trust_image {
        bail!("{name} is not authenticated: {why}; nothing was restored (--trust-image restores an image you trust)");
    }
    warnings.push(format!(
        "--trust-image: {name} is not authenticated ({why}); restored as asked"
    ));
    Ok(reader)
}

/// The mappings of deleted files: their bytes are in the image, but a restored
/// process runs its program afresh and maps nothing of the old one.
fn unmapped(image: &crate::image::format::Image) -> impl Iterator<Item = String> + '_ {
    image.ghosts.iter().flat_map(|g| {
        g.maps.iter().map(move |m| {
            format!(
                "process {} mapping {:x}-{:x} of deleted file {} ({} bytes) is kept in the image, but not mapped back (spawn mode)",
                m.pid, m.start, m.end, g.path, g.size
            )
        })
    })
}

/// Every deleted file the plan opens, recreated once (nameless: see `ghost`); the
/// image's set-id bits only when it is authenticated.
fn recreate_ghosts(
    reader: &ImageReader,
    plan: &plan::Plan,
    opts: &Options,
    trust: ghost::Trust,
    warnings: &mut Vec<String>,
) -> Result<HashMap<usize, ghost::Recreated>> {
    let mut ghosts = HashMap::new();
    for fp in plan.files.values() {
        if let Source::Ghost(g) = fp.source {
            if let std::collections::hash_map::Entry::Vacant(e) = ghosts.entry(g) {
                check_cancel()?;
                let (made, said) = ghost::recreate(
                    reader,
                    &reader.image.ghosts[g],
                    &plan.procs[fp.opener].creds,
                    opts.ghost_dir.as_deref(),
                    trust,
                )?;
                warnings.extend(said);
                e.insert(made);
            }
        }
    }
    Ok(ghosts)
}

/// `restore`, in its phases: validate the image (authenticated, well-formed: the
/// plan), check the options and every file against its fingerprint, then, with
/// nothing touched before, prepare (deleted files recreated, descriptions opened),
/// spawn the tree, settle signal owners and lease breaks, and release.
pub fn run(opts: &Options) -> Result<Report> {
    let started = Instant::now();
    let mut warnings = Vec::new();
    let reader = open_authenticated(opts, &mut warnings)?;
    let trust = ghost::Trust {
        keep_set_id: matches!(reader.auth, Auth::Verified { .. }),
    };
    let image = &reader.image;
    let plan = plan::build(
        image,
        &PlanOptions {
            exec_cmds: &opts.exec_cmds,
            skip_unsupported: opts.skip_unsupported,
            keep_cloexec: opts.keep_cloexec,
        },
    )?;
    check_options(opts)?;
    let cgroup_procs = match &opts.cgroup {
        Some(cg) => Some(cgroup::resolve(cg)?.join("cgroup.procs")),
        None => None,
    };
    let checked = validate::check(image, opts.force)?;
    warnings.extend(plan_warnings(image, &plan, &checked));

    // ---- from here on, every step is undone on failure ----
    catch_signals();
    let nofile_soft = fd_limits(&plan)?;
    let ghosts = recreate_ghosts(&reader, &plan, opts, trust, &mut warnings)?;
    let files = open::descriptions(image, &plan, &ghosts, &checked)?;
    // The recreated files' own fds (open for writing, to fill them) would count as
    // other opens against a lease on them: their descriptions now keep them.
    let ghosts = {
        let n = ghosts.len();
        drop(ghosts);
        n
    };
    check_cancel()?;
    let tree = spawn::spawn(
        &spawn::Setup {
            image,
            plan: &plan,
            files: &files,
            stdio: &opts.stdio,
            cgroup_procs,
            nofile_soft,
        },
        &CANCEL,
        Duration::from_secs(60),
    )?;
    let pids: HashMap<u32, u32> = plan
        .procs
        .iter()
        .zip(&tree.pids)
        .map(|(p, &new)| (p.old_pid, new))
        .collect();
    let owners = owners::Owners {
        pids: &pids,
        pgid: tree.pgid,
    };
    warnings.extend(owners.restore(image, &plan, &files)?);
    let (released, lease_reports) = leases::restore(
        image,
        &plan,
        &files,
        &owners,
        leases::Deadlines {
            policy: opts.lease_time,
            pins: &opts.pins,
        },
        &CANCEL,
        &mut warnings,
    )?;
    tree.release(Duration::from_secs(30))
        .context("releasing the restored processes")?;
    drop(files);

    Ok(Report {
        image: opts.image.display().to_string(),
        processes: restored_processes(image, &plan, &pids),
        fds: plan.procs.iter().map(|p| p.fds.len()).sum(),
        files: plan.files.len(),
        locks: plan.procs.iter().map(|p| p.locks.len()).sum(),
        leases: lease_reports,
        ghosts,
        lease_time: opts.lease_time.to_string(),
        released_monotonic_ns: released,
        total_ms: started.elapsed().as_secs_f64() * 1e3,
        warnings,
    })
}

/// Options that name directories must name directories.
fn check_options(opts: &Options) -> Result<()> {
    if let Some(d) = &opts.ghost_dir {
        if !d.is_dir() {
            bail!("--ghost-dir {}: not a directory", d.display());
        }
    }
    if let spawn::Stdio::Dir(d) = &opts.stdio {
        if !d.is_dir() {
            bail!(
                "--stdio {}: not a directory (nor auto, inherit or null)",
                d.display()
            );
        }
    }
    Ok(())
}

/// What the restore will say it could not do as the image had it: differences
/// accepted with --force, fds left closed, locks and leases a program's exec
/// releases, mappings of deleted files.
fn plan_warnings(
    image: &crate::image::format::Image,
    plan: &plan::Plan,
    checked: &validate::Checked,
) -> Vec<String> {
    let mut out = checked.warnings.clone();
    for (pid, fd, what) in &plan.skipped {
        out.push(format!(
            "process {pid} fd {fd} ({what}) left closed (--skip-unsupported)"
        ));
    }
    out.extend(plan.released_by_exec.iter().cloned());
    out.extend(unmapped(image));
    out
}

/// Raises the open-file limit for the restore itself and refuses fd numbers beyond
/// the hard limit; the soft limit the restored processes get back.
fn fd_limits(plan: &plan::Plan) -> Result<u64> {
    use nix::sys::resource::{getrlimit, Resource};
    let nofile_soft = getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    crate::sys::raise_open_file_limit();
    let (_, nofile_hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    plan.check_fd_limit(nofile_hard)?;
    Ok(nofile_soft)
}

/// Each restored process: its old and new pid, its old parent, what it runs.
fn restored_processes(
    image: &crate::image::format::Image,
    plan: &plan::Plan,
    pids: &HashMap<u32, u32>,
) -> Vec<RestoredProcess> {
    let ppid_of: HashMap<u32, u32> = image.processes.iter().map(|p| (p.pid, p.ppid)).collect();
    plan.procs
        .iter()
        .map(|p| RestoredProcess {
            old_pid: p.old_pid,
            pid: pids[&p.old_pid],
            old_ppid: ppid_of[&p.old_pid],
            command: p.exec.argv(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::format::{Ghost, GhostMap, Image, Process};

    fn image() -> Image {
        let p = |pid, ppid| Process {
            pid,
            ppid,
            comm: "x".into(),
            cmdline: vec!["/bin/x".into(), "-y".into()],
            cwd: "/".into(),
            ..Default::default()
        };
        Image {
            processes: vec![p(20, 10), p(10, 1)],
            ghosts: vec![Ghost {
                path: "/tmp/gone".into(),
                size: 4096,
                maps: vec![GhostMap {
                    pid: 20,
                    start: 0x1000,
                    end: 0x2000,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn plan_of(image: &Image) -> plan::Plan {
        let none = HashMap::new();
        plan::build(
            image,
            &PlanOptions {
                exec_cmds: &none,
                skip_unsupported: false,
                keep_cloexec: false,
            },
        )
        .unwrap()
    }

    #[test]
    fn restored_processes_pair_old_and_new_pids_in_tree_order() {
        let image = image();
        let plan = plan_of(&image);
        let pids = HashMap::from([(10, 110), (20, 120)]);
        let got: Vec<(u32, u32, u32)> = restored_processes(&image, &plan, &pids)
            .iter()
            .map(|p| (p.old_pid, p.pid, p.old_ppid))
            .collect();
        assert_eq!(got, vec![(10, 110, 1), (20, 120, 10)]);
    }

    #[test]
    fn warnings_say_what_the_restore_cannot_bring_back() {
        let image = image();
        let mut plan = plan_of(&image);
        plan.skipped.push((20, 7, "socket:[1]".into()));
        let checked = validate::Checked {
            identities: HashMap::new(),
            by_handle: HashMap::new(),
            warnings: vec!["/etc/x changed (--force)".into()],
        };
        let w = plan_warnings(&image, &plan, &checked);
        assert_eq!(w.len(), 3, "{w:?}");
        assert_eq!(w[0], "/etc/x changed (--force)");
        assert!(w[1].contains("fd 7 (socket:[1]) left closed"), "{w:?}");
        assert!(
            w[2].contains("mapping 1000-2000 of deleted file /tmp/gone"),
            "{w:?}"
        );
    }
}
