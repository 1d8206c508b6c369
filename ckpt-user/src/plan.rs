//! What each restored process must hold, worked out from the image alone (no system
//! calls), so that a malformed image is refused before anything is touched.
//!
//! The restore opens every open file description once, in ckpt-user itself, then forks
//! the process tree; every helper inherits all descriptions and keeps the ones its
//! process had, at their numbers. Sharing (dup, fork) therefore comes back for free:
//! one description, many fds. Locks are taken by the process that owned them (POSIX)
//! or that created them (OFD, flock), leases by the process that set them.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{bail, Result};

use crate::{
    image::format::{FileKind, Image, Lease, LockKind, LockType, OpenFile},
    lock::LockRange,
};

/// The credentials a restored process runs with, and opens its files with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
    pub groups: Vec<u32>,
}

/// What a restored process runs once everything is in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exec {
    /// The recorded command line (argv[0] looked up in PATH when it has no '/').
    Recorded(Vec<String>),
    /// `--exec-cmd PID=CMD`: run with `/bin/sh -c CMD`.
    Shell(String),
}

impl Exec {
    pub fn argv(&self) -> Vec<String> {
        match self {
            Exec::Recorded(argv) => argv.clone(),
            Exec::Shell(cmd) => vec!["/bin/sh".into(), "-c".into(), cmd.clone()],
        }
    }
}

/// Where an fd of a restored process comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdSource {
    /// An open file description of the image (index into `Image::files`).
    File(u32),
    /// A standard fd that was a pipe, socket or terminal with no path to reopen:
    /// ckpt-user restore's own fd with that number is passed on.
    Inherit(i32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdPlan {
    pub fd: i32,
    pub source: FdSource,
    pub cloexec: bool,
}

/// A lock a process takes (non-blocking) once its fds are in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockOp {
    pub kind: LockKind,
    pub lock_type: LockType,
    pub range: LockRange,
    /// The fd (in the restored process) it is taken through.
    pub fd: i32,
}

/// A lease a process sets on one of its fds (F_SETLEASE) before it is released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseOp {
    /// Index into `Image::leases`.
    pub lease: usize,
    pub fd: i32,
    pub lease_type: LockType,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcPlan {
    pub old_pid: u32,
    pub parent: Option<usize>,
    pub children: Vec<usize>,
    pub exec: Exec,
    pub cwd: String,
    pub creds: Creds,
    pub fds: Vec<FdPlan>,
    pub locks: Vec<LockOp>,
    pub leases: Vec<LeaseOp>,
    /// O_ASYNC is set through the process's own fd (the kernel records the fd number).
    pub async_fds: Vec<i32>,
    /// Signals kept blocked into the program: a lease break signal the holder had not
    /// yet been sent stays pending until the program unblocks it.
    pub block_signals: Vec<i32>,
}

/// How a description is opened again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// By its path.
    Path(String),
    /// A deleted file: its recreated copy (index into `Image::ghosts`).
    Ghost(usize),
    /// A file whose name is gone but another link keeps it: found by file handle.
    Handle,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilePlan {
    pub file: u32,
    pub source: Source,
    /// Index into `procs` of the process whose credentials open it (its first holder).
    pub opener: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Parents before children.
    pub procs: Vec<ProcPlan>,
    pub roots: Vec<usize>,
    /// Descriptions to open, by image file index.
    pub files: BTreeMap<u32, FilePlan>,
    /// fds left closed with --skip-unsupported: (pid, fd, what it was).
    pub skipped: Vec<(u32, i32, String)>,
    /// Locks and leases that the programs' own exec will release, because they ride on
    /// close-on-exec fds (as the kernel would have done had the original executed).
    pub released_by_exec: Vec<String>,
}

/// fds a restoring helper holds besides the descriptions: stdio, its control pipes,
/// the image and what the runtime opens (a generous bound: the check below must not
/// pass a plan that then fails half-way).
const HELPER_FDS: usize = 32;

impl Plan {
    /// Refuses, before anything is made, a plan whose fd numbers a helper cannot reach
    /// under the hard open-file limit `hard`: each places its fds by first moving every
    /// source above all numbers in play (`spawn::arrange_fds`), so it needs its highest
    /// fd (or ckpt-user's own descriptors) plus one number per fd.
    pub fn check_fd_limit(&self, hard: u64) -> Result<()> {
        for p in &self.procs {
            let Some(highest) = p.fds.iter().map(|d| d.fd).max() else {
                continue;
            };
            let base = (highest.max(0) as u64 + 1).max((self.files.len() + HELPER_FDS) as u64);
            let needed = base + p.fds.len() as u64;
            if needed > hard {
                bail!(
                    "process {}'s fds (up to fd {highest}, {} of them) need {needed} fd numbers, above this ckpt-user's hard open-file limit (RLIMIT_NOFILE {hard}): raise it, as root, to at least {needed} (`ulimit -Hn {needed}` in the shell that restores, LimitNOFILE= for a unit; fs.nr_open caps it) and restore again",
                    p.old_pid,
                    p.fds.len()
                );
            }
        }
        Ok(())
    }
}

pub struct PlanOptions<'a> {
    pub exec_cmds: &'a HashMap<u32, String>,
    pub skip_unsupported: bool,
    /// Clear close-on-exec so that those fds (and their locks) reach the program.
    pub keep_cloexec: bool,
}

/// Can a description be opened again by its path?
fn reopenable(f: &OpenFile) -> bool {
    f.path.starts_with('/')
        && matches!(
            f.kind,
            FileKind::Regular | FileKind::Directory | FileKind::CharDevice | FileKind::BlockDevice
        )
}

/// The signal a lease break sends to the description's owner.
pub fn break_signal(f: &OpenFile) -> i32 {
    if f.sig == 0 {
        libc::SIGIO
    } else {
        f.sig
    }
}

/// The lease type to set again: its type before the break; if the image does not know
/// it, a downgrade means it was a write lease, and so does an unknown unlock (only a
/// write lease can be broken by both readers and writers).
pub fn lease_type_to_set(l: &Lease) -> LockType {
    match (l.lease_type, l.breaking, l.target_type) {
        (Some(t), _, _) => t,
        (None, false, Some(t)) => t,
        _ => LockType::Write,
    }
}

/// The plan of a restore, in its phases: the process tree, each process with its
/// fds; every description once; the locks and leases, each given to the process that
/// takes it back; then what a program's exec will release, and O_ASYNC.
pub fn build(image: &Image, opts: &PlanOptions) -> Result<Plan> {
    let index = process_index(image, opts)?;
    let order = tree_order(image, &index)?;
    let slot: HashMap<u32, usize> = order
        .iter()
        .enumerate()
        .map(|(i, (p, _))| (*p, i))
        .collect();
    let mut plan = Plan::default();
    plan_processes(image, opts, &index, &order, &slot, &mut plan)?;
    plan_descriptions(image, &mut plan)?;
    let cx = Placing { image, slot: &slot };
    plan_locks(&cx, &mut plan)?;
    plan_leases(&cx, &mut plan)?;
    plan.released_by_exec = released_by_exec(image, &plan);
    for &file in plan.files.keys() {
        if image.files[file as usize].flags & libc::O_ASYNC as u32 != 0 {
            if let Some((proc, fd)) = cx.taker(&plan.procs, u32::MAX, file) {
                plan.procs[proc].async_fds.push(fd);
            }
        }
    }
    Ok(plan)
}

/// An open file index the image refers to, checked.
fn check_file(image: &Image, what: &str, i: u32) -> Result<()> {
    let n = image.files.len();
    if i as usize >= n {
        bail!("image is corrupt: {what} refers to open file {i}, but there are {n}");
    }
    Ok(())
}

/// Pid -> index in `image.processes`; refuses duplicate pids, an empty image and an
/// --exec-cmd for a process the image does not have.
fn process_index(image: &Image, opts: &PlanOptions) -> Result<HashMap<u32, usize>> {
    let index: HashMap<u32, usize> = image
        .processes
        .iter()
        .enumerate()
        .map(|(i, p)| (p.pid, i))
        .collect();
    if index.len() != image.processes.len() {
        bail!("image is corrupt: a pid appears twice");
    }
    if image.processes.is_empty() {
        bail!("the image holds no processes");
    }
    for pid in opts.exec_cmds.keys() {
        if !index.contains_key(pid) {
            bail!("--exec-cmd {pid}=...: the image has no process {pid}");
        }
    }
    Ok(index)
}

/// Tree order: parents before children, siblings in pid order; (pid, parent pid).
fn tree_order(image: &Image, index: &HashMap<u32, usize>) -> Result<Vec<(u32, Option<u32>)>> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut roots = Vec::new();
    for p in &image.processes {
        if p.ppid != p.pid && index.contains_key(&p.ppid) {
            children.entry(p.ppid).or_default().push(p.pid);
        } else {
            roots.push(p.pid);
        }
    }
    roots.sort_unstable();
    let mut order: Vec<(u32, Option<u32>)> = Vec::new();
    let mut stack: Vec<(u32, Option<u32>)> = roots.iter().rev().map(|&p| (p, None)).collect();
    while let Some((pid, parent)) = stack.pop() {
        order.push((pid, parent));
        let mut kids = children.remove(&pid).unwrap_or_default();
        kids.sort_unstable();
        stack.extend(kids.into_iter().rev().map(|k| (k, Some(pid))));
    }
    if order.len() != image.processes.len() {
        bail!("image is corrupt: its parent links form a cycle");
    }
    Ok(order)
}

/// Each process in tree order, with its program, credentials and fds.
fn plan_processes(
    image: &Image,
    opts: &PlanOptions,
    index: &HashMap<u32, usize>,
    order: &[(u32, Option<u32>)],
    slot: &HashMap<u32, usize>,
    plan: &mut Plan,
) -> Result<()> {
    for (pid, parent) in order {
        let p = &image.processes[index[pid]];
        let exec = match opts.exec_cmds.get(pid) {
            Some(cmd) => Exec::Shell(cmd.clone()),
            None if p.cmdline.is_empty() || p.cmdline[0].is_empty() => bail!(
                "process {pid} ({}) has no command line to run; give one with --exec-cmd {pid}=CMD",
                p.comm
            ),
            None => Exec::Recorded(p.cmdline.clone()),
        };
        let mut fds = Vec::new();
        let mut seen = HashSet::new();
        for fd in &p.fds {
            check_file(image, &format!("fd {} of process {pid}", fd.fd), fd.file)?;
            if fd.fd < 0 || !seen.insert(fd.fd) {
                bail!("image is corrupt: process {pid} has fd {} twice", fd.fd);
            }
            let f = &image.files[fd.file as usize];
            let source = if f.deleted || reopenable(f) {
                FdSource::File(fd.file)
            } else if fd.fd <= 2 {
                FdSource::Inherit(fd.fd)
            } else if opts.skip_unsupported {
                plan.skipped.push((*pid, fd.fd, f.path.clone()));
                continue;
            } else {
                bail!(
                    "process {pid} fd {} is {} ({:?}): only files with a path can be opened again (--skip-unsupported leaves such fds closed)",
                    fd.fd, f.path, f.kind
                );
            };
            fds.push(FdPlan {
                fd: fd.fd,
                source,
                cloexec: fd.cloexec && !opts.keep_cloexec,
            });
        }
        plan.procs.push(ProcPlan {
            old_pid: *pid,
            parent: parent.map(|pp| slot[&pp]),
            children: Vec::new(),
            exec,
            cwd: p.cwd.clone(),
            creds: Creds {
                uid: p.uid,
                euid: p.euid,
                gid: p.gid,
                egid: p.egid,
                groups: p.groups.clone(),
            },
            fds,
            locks: Vec::new(),
            leases: Vec::new(),
            async_fds: Vec::new(),
            block_signals: Vec::new(),
        });
    }
    for i in 0..plan.procs.len() {
        match plan.procs[i].parent {
            Some(parent) => plan.procs[parent].children.push(i),
            None => plan.roots.push(i),
        }
    }
    Ok(())
}

/// Every description once, opened with its first holder's credentials: a deleted
/// file from its saved contents, a name unlinked while another link remains by its
/// handle, any other by its path.
fn plan_descriptions(image: &Image, plan: &mut Plan) -> Result<()> {
    for (i, p) in plan.procs.iter().enumerate() {
        for fd in &p.fds {
            let FdSource::File(file) = fd.source else {
                continue;
            };
            if plan.files.contains_key(&file) {
                continue;
            }
            let f = &image.files[file as usize];
            let source = if f.deleted {
                let Some(g) = image
                    .ghosts
                    .iter()
                    .position(|g| g.dev == f.dev && g.ino == f.ino)
                else {
                    bail!(
                        "image is corrupt: deleted file {} has no saved contents",
                        f.path
                    );
                };
                Source::Ghost(g)
            } else if f.unlinked {
                Source::Handle
            } else {
                Source::Path(f.path.clone())
            };
            plan.files.insert(
                file,
                FilePlan {
                    file,
                    source,
                    opener: i,
                },
            );
        }
    }
    Ok(())
}

/// Finding the process and fd that take a lock or lease back.
struct Placing<'a> {
    image: &'a Image,
    /// Old pid -> index in the plan's processes.
    slot: &'a HashMap<u32, usize>,
}

impl Placing<'_> {
    /// Which fd of a process refers to a description (or, for POSIX locks, to the
    /// same inode: the lock belongs to the process, not to the description).
    fn fd_for(&self, procs: &[ProcPlan], proc: usize, file: u32) -> Option<i32> {
        let f = &self.image.files[file as usize];
        let fds = &procs[proc].fds;
        fds.iter()
            .find(|d| d.source == FdSource::File(file))
            .or_else(|| {
                fds.iter().find(|d| match d.source {
                    FdSource::File(o) => {
                        let o = &self.image.files[o as usize];
                        o.dev == f.dev && o.ino == f.ino
                    }
                    FdSource::Inherit(_) => false,
                })
            })
            .map(|d| d.fd)
    }

    /// The process that takes an OFD/flock lock or a lease: its recorded owner if it
    /// holds the description, else the description's first holder.
    fn taker(&self, procs: &[ProcPlan], pid: u32, file: u32) -> Option<(usize, i32)> {
        if let Some(&i) = self.slot.get(&pid) {
            if let Some(fd) = procs[i]
                .fds
                .iter()
                .find(|d| d.source == FdSource::File(file))
            {
                return Some((i, fd.fd));
            }
        }
        procs.iter().enumerate().find_map(|(i, p)| {
            p.fds
                .iter()
                .find(|d| d.source == FdSource::File(file))
                .map(|d| (i, d.fd))
        })
    }
}

/// Each lock to the process that takes it back: a POSIX lock to its owner, through
/// an fd on the inode; an OFD or flock lock to a holder of its description (one
/// flock per description, however many holders listed it).
fn plan_locks(cx: &Placing, plan: &mut Plan) -> Result<()> {
    let image = cx.image;
    let mut flocked = HashSet::new();
    for l in &image.locks {
        check_file(image, "a lock", l.file)?;
        let path = &image.files[l.file as usize].path;
        let Some(range) = LockRange::new(l.start, l.end) else {
            bail!(
                "image is corrupt: a lock on {path} has the range {}-{}",
                l.start,
                l.end
            );
        };
        let (proc, fd) = match l.kind {
            LockKind::Posix => {
                let Some(&proc) = cx.slot.get(&l.pid) else {
                    bail!("image is corrupt: POSIX lock on {path} owned by process {} which it does not hold", l.pid);
                };
                let Some(fd) = cx.fd_for(&plan.procs, proc, l.file) else {
                    bail!(
                        "image is corrupt: process {} holds a POSIX lock on {path} but no fd on it",
                        l.pid
                    );
                };
                (proc, fd)
            }
            LockKind::Ofd | LockKind::Flock => {
                if l.kind == LockKind::Flock && !flocked.insert(l.file) {
                    continue;
                }
                let Some(at) = cx.taker(&plan.procs, l.pid, l.file) else {
                    bail!(
                        "image is corrupt: a lock on {path} is on a description no process holds"
                    );
                };
                at
            }
        };
        plan.procs[proc].locks.push(LockOp {
            kind: l.kind,
            lock_type: l.lock_type,
            range,
            fd,
        });
    }
    Ok(())
}

/// Each lease to a holder of its description. The break signal goes to the
/// description's owner; one not yet sent before the checkpoint is sent again and
/// must wait, blocked, for the program.
fn plan_leases(cx: &Placing, plan: &mut Plan) -> Result<()> {
    let image = cx.image;
    for (i, l) in image.leases.iter().enumerate() {
        check_file(image, "a lease", l.file)?;
        let f = &image.files[l.file as usize];
        let Some((proc, fd)) = cx.taker(&plan.procs, l.pid, l.file) else {
            bail!(
                "image is corrupt: a lease on {} is on a description no process holds",
                f.path
            );
        };
        plan.procs[proc].leases.push(LeaseOp {
            lease: i,
            fd,
            lease_type: lease_type_to_set(l),
        });
        if l.breaking && !l.notified {
            if let Some(&owner) = f
                .owner
                .and_then(|(_, pid)| u32::try_from(pid).ok())
                .and_then(|pid| cx.slot.get(&pid))
            {
                let sig = break_signal(f);
                if !plan.procs[owner].block_signals.contains(&sig) {
                    plan.procs[owner].block_signals.push(sig);
                }
            }
        }
    }
    Ok(())
}

/// What the programs' exec will release, said as warnings: a POSIX lock goes when its
/// process closes any fd on the inode; an OFD or flock lock or a lease when the last
/// fd on its description closes.
fn released_by_exec(image: &Image, plan: &Plan) -> Vec<String> {
    let mut out = Vec::new();
    let cloexec_only = |file: u32| {
        plan.procs
            .iter()
            .flat_map(|p| &p.fds)
            .all(|d| d.source != FdSource::File(file) || d.cloexec)
    };
    for p in &plan.procs {
        for l in &p.locks {
            let Some(FdSource::File(file)) = p.fds.iter().find(|d| d.fd == l.fd).map(|d| d.source)
            else {
                continue;
            };
            let f = &image.files[file as usize];
            let lost = match l.kind {
                LockKind::Posix => p.fds.iter().any(|d| {
                    d.cloexec
                        && matches!(d.source, FdSource::File(o)
                            if image.files[o as usize].dev == f.dev && image.files[o as usize].ino == f.ino)
                }),
                _ => cloexec_only(file),
            };
            if lost {
                out.push(format!(
                    "process {}: its {} lock on {} rides on a close-on-exec fd; its program's exec releases it",
                    p.old_pid, l.kind.name(), f.path
                ));
            }
        }
        for l in &p.leases {
            let file = image.leases[l.lease].file;
            if cloexec_only(file) {
                out.push(format!(
                    "process {}: its lease on {} rides on close-on-exec fds; its program's exec releases it",
                    p.old_pid, image.files[file as usize].path
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::format::{Fd, Ghost, KernelDev, Lock, Process};

    fn proc(pid: u32, ppid: u32, fds: &[(i32, u32)]) -> Process {
        Process {
            pid,
            ppid,
            comm: "x".into(),
            cmdline: vec!["/bin/x".into()],
            cwd: "/".into(),
            fds: fds
                .iter()
                .map(|&(fd, file)| Fd {
                    fd,
                    file,
                    cloexec: false,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn file(id: u32, path: &str, kind: FileKind, ino: u64) -> OpenFile {
        OpenFile {
            id,
            path: path.into(),
            kind,
            dev: KernelDev::new(8, 1),
            ino,
            ..Default::default()
        }
    }

    fn opts() -> PlanOptions<'static> {
        static EMPTY: std::sync::OnceLock<HashMap<u32, String>> = std::sync::OnceLock::new();
        PlanOptions {
            exec_cmds: EMPTY.get_or_init(HashMap::new),
            skip_unsupported: false,
            keep_cloexec: false,
        }
    }

    #[test]
    fn fd_numbers_beyond_the_hard_open_file_limit_are_refused_before_anything_is_made() {
        let image = Image {
            processes: vec![proc(20, 1, &[(3, 0), (5000, 0)])],
            files: vec![file(0, "/a", FileKind::Regular, 10)],
            ..Default::default()
        };
        let plan = build(&image, &opts()).unwrap();
        // 5001 numbers up to fd 5000, then one more per fd to move it through.
        let err = plan.check_fd_limit(5002).unwrap_err().to_string();
        assert!(
            err.contains("process 20's fds (up to fd 5000, 2 of them) need 5003"),
            "{err}"
        );
        assert!(
            err.contains("RLIMIT_NOFILE 5002") && err.contains("ulimit -Hn 5003"),
            "{err}"
        );
        plan.check_fd_limit(5003).unwrap();
        // Low fds: ckpt-user's own descriptors set the base.
        let low = build(
            &Image {
                processes: vec![proc(20, 1, &[(3, 0)])],
                ..image.clone()
            },
            &opts(),
        )
        .unwrap();
        low.check_fd_limit(1024).unwrap();
        assert!(low.check_fd_limit(10).is_err());
    }

    #[test]
    fn parents_come_before_children_and_shared_files_open_once() {
        let image = Image {
            processes: vec![proc(30, 20, &[(3, 0)]), proc(20, 1, &[(3, 0), (4, 1)])],
            files: vec![
                file(0, "/a", FileKind::Regular, 10),
                file(1, "/b", FileKind::Regular, 11),
            ],
            ..Default::default()
        };
        let plan = build(&image, &opts()).unwrap();
        assert_eq!(plan.procs[0].old_pid, 20);
        assert_eq!(plan.procs[1].parent, Some(0));
        assert_eq!(plan.roots, vec![0]);
        assert_eq!(plan.procs[0].children, vec![1]);
        assert_eq!(plan.files.len(), 2);
        assert_eq!(plan.files[&0].opener, 0);
    }

    #[test]
    fn pipes_on_stdio_are_inherited_and_elsewhere_refused_unless_skipped() {
        let mut image = Image {
            processes: vec![proc(20, 1, &[(1, 0), (5, 0)])],
            files: vec![file(0, "pipe:[77]", FileKind::Fifo, 77)],
            ..Default::default()
        };
        let err = build(&image, &opts()).unwrap_err().to_string();
        assert!(err.contains("fd 5 is pipe:[77]"), "{err}");
        let cmds = HashMap::new();
        let plan = build(
            &image,
            &PlanOptions {
                exec_cmds: &cmds,
                skip_unsupported: true,
                keep_cloexec: false,
            },
        )
        .unwrap();
        assert_eq!(plan.procs[0].fds[0].source, FdSource::Inherit(1));
        assert_eq!(plan.skipped, vec![(20, 5, "pipe:[77]".to_string())]);
        image.processes[0].fds.truncate(1);
        assert!(build(&image, &opts()).unwrap().files.is_empty());
    }

    #[test]
    fn locks_go_to_their_owner_and_flock_is_taken_once() {
        let image = Image {
            processes: vec![
                proc(20, 1, &[(3, 0), (4, 1)]),
                proc(30, 20, &[(7, 0), (8, 2)]),
            ],
            files: vec![
                file(0, "/a", FileKind::Regular, 10),
                file(1, "/b", FileKind::Regular, 11),
                // Another description of /b's inode.
                file(2, "/b", FileKind::Regular, 11),
            ],
            locks: vec![
                lock(LockKind::Flock, 20, 0),
                lock(LockKind::Flock, 30, 0),
                lock(LockKind::Ofd, 30, 0),
                // Taken through description 1, which 30 does not hold: any fd on the
                // inode will do for a POSIX lock.
                lock(LockKind::Posix, 30, 1),
            ],
            ..Default::default()
        };
        let plan = build(&image, &opts()).unwrap();
        assert_eq!(plan.procs[0].locks.len(), 1);
        assert_eq!(plan.procs[0].locks[0].fd, 3);
        let kinds: Vec<_> = plan.procs[1].locks.iter().map(|l| (l.kind, l.fd)).collect();
        assert_eq!(kinds, vec![(LockKind::Ofd, 7), (LockKind::Posix, 8)]);
    }

    fn lock(kind: LockKind, pid: u32, file: u32) -> Lock {
        Lock {
            kind,
            lock_type: LockType::Write,
            start: 0,
            end: i64::MAX,
            pid,
            file,
            dev: KernelDev::new(8, 1),
            ino: 10,
        }
    }

    #[test]
    fn corrupt_references_are_refused() {
        let image = Image {
            processes: vec![proc(20, 1, &[(3, 4)])],
            files: vec![file(0, "/a", FileKind::Regular, 10)],
            ..Default::default()
        };
        let err = build(&image, &opts()).unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
        let image = Image {
            processes: vec![proc(20, 1, &[(3, 0)])],
            files: vec![OpenFile {
                deleted: true,
                ..file(0, "/gone", FileKind::Regular, 10)
            }],
            ghosts: vec![Ghost {
                dev: KernelDev::new(8, 1),
                ino: 99,
                ..Default::default()
            }],
            ..Default::default()
        };
        let err = build(&image, &opts()).unwrap_err().to_string();
        assert!(err.contains("no saved contents"), "{err}");
    }

    #[test]
    fn an_unsent_break_signal_is_blocked_in_the_owner() {
        let mut f = file(0, "/a", FileKind::Regular, 10);
        f.owner = Some((1, 20));
        f.sig = 0;
        let image = Image {
            processes: vec![proc(20, 1, &[(3, 0)])],
            files: vec![f],
            leases: vec![Lease {
                file: 0,
                pid: 20,
                lease_type: None,
                breaking: true,
                target_type: Some(LockType::Read),
                remaining_ns: Some(1),
                lease_break_time_s: Some(5),
                downgrade_remaining_ns: None,
                notified: false,
                signal: None,
                breakers: vec![],
            }],
            ..Default::default()
        };
        let plan = build(&image, &opts()).unwrap();
        assert_eq!(plan.procs[0].block_signals, vec![libc::SIGIO]);
        assert_eq!(plan.procs[0].leases[0].lease_type, LockType::Write);
    }

    #[test]
    fn the_tree_is_ordered_parents_first_siblings_by_pid_and_a_cycle_is_refused() {
        let mut image = Image {
            processes: vec![
                proc(30, 10, &[]),
                proc(10, 1, &[]),
                proc(20, 10, &[]),
                proc(5, 5, &[]),
            ],
            ..Default::default()
        };
        let index = process_index(&image, &opts()).unwrap();
        let order = tree_order(&image, &index).unwrap();
        assert_eq!(
            order,
            vec![(5, None), (10, None), (20, Some(10)), (30, Some(10))]
        );
        image.processes = vec![proc(10, 20, &[]), proc(20, 10, &[])];
        let index = process_index(&image, &opts()).unwrap();
        let err = tree_order(&image, &index).unwrap_err().to_string();
        assert!(err.contains("cycle"), "{err}");
    }
}
