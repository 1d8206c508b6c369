//! `ckpt-user dump <cgroup> -o IMAGE`: freeze, collect, thaw, write.
//!
//! The orchestrator; each kernel object's part is with the object, like CRIU's
//! cr-dump.c calling file-lock.c and files-reg.c: `cgroup::freeze` (the cgroup),
//! `task::dump` (processes), `fd::dump` (fds and open file descriptions), `lock::dump`
//! (locks, leases, waiters), `ghost::dump` (deleted-but-open files). The image is
//! written by `image::writer`.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    io::IsTerminal as _,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::{
    cgroup::{
        self,
        freeze::{self, Freezer, Frozen, Watchdog},
    },
    fd::{
        dump::{self as fd_dump, FoundFd},
        table::{self as fd_table, FdTable},
        validate as fd_validate,
    },
    ghost::dump as ghost_dump,
    image::{
        format::{FileKind, Fingerprint, Ghost, Image},
        writer::ImageWriter,
    },
    lock::{
        dump as lock_dump,
        kernel::{self, KLock},
        proc_locks, HeldKind, KernelDev,
    },
    sys::pidfd,
    task::dump as task_dump,
    tracer::{
        history::History,
        iters::{unavailable_hint, Iters, Prog},
        pins::PinDir,
    },
};

pub struct Options {
    pub cgroup: String,
    pub output: PathBuf,
    pub pins: PinDir,
    /// The key that authenticates the image (created on first use).
    pub key: PathBuf,
    /// Run while frozen, with CKPT_IMAGE_ID and CKPT_CGROUP set (e.g. a filesystem
    /// snapshot).
    pub snapshot_cmd: Option<String>,
    /// Largest amount of data (bytes, holes excluded) of one deleted file.
    pub ghost_limit: u64,
    /// Record a SHA-256 of every regular file for the restore-time check.
    pub hash: bool,
    pub freeze_timeout: Duration,
    /// Print how long each phase took (stderr).
    pub timings: bool,
}

/// Phase durations, printed with --timings.
struct Phases {
    on: bool,
    last: Instant,
}

impl Phases {
    fn say(&self, what: &str) {
        if self.on {
            eprintln!("ckpt-user:   {what}");
        }
    }

    fn mark(&mut self, what: &str) {
        if self.on {
            eprintln!(
                "ckpt-user: {what}: {:.2} ms",
                self.last.elapsed().as_secs_f64() * 1e3
            );
        }
        self.last = Instant::now();
    }
}

/// The fd tables as read inside the frozen window.
enum FdsRead {
    /// From the agent's iterator: records, plus the few reads they still needed.
    Iter {
        table: fd_table::TableRead,
        late: fd_dump::LateReads,
    },
    /// From /proc, one fd at a time, grouped into descriptions with kcmp.
    Proc {
        fds: Vec<fd_dump::FoundFd>,
        desc_of: Vec<u32>,
        files: Vec<crate::image::format::OpenFile>,
    },
}

/// What `dump` reports (stdout, or JSON with --json).
#[derive(Debug, Serialize)]
pub struct Report {
    pub image: String,
    pub id: String,
    pub source: String,
    /// Where the fd tables came from: "iterator" (the task_file iterator) or "proc"
    /// (/proc/PID/fd and fdinfo, one fd at a time).
    pub fd_tables: String,
    /// From every task frozen until the thaw.
    pub frozen_ms: f64,
    /// From the freeze request until every task was frozen.
    pub freezing_ms: f64,
    pub total_ms: f64,
    pub processes: usize,
    pub fds: usize,
    pub files: usize,
    pub locks: usize,
    pub leases: usize,
    pub waiters: usize,
    pub ghosts: usize,
    pub missing: Vec<String>,
}

/// What a dump cannot know without the iterators (not root, or Linux before 6.1).
const MISSING_WITHOUT_ITERATORS: &[&str] = &[
    "lease break deadlines (remaining time)",
    "lease types before a break",
];

/// What a dump cannot know without ckpt-agent's records (the kernel forgets it).
const MISSING_WITHOUT_AGENT: &[&str] = &[
    "when lease breaks started and the lease-break-time in force",
    "whether lease holders were signalled, and breakers that did not block",
    "when waiters started waiting",
];

fn image_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{:x}-{:x}", t.as_nanos(), std::process::id())
}

/// Whether pread works on a description with these open flags: open for reading, not
/// O_PATH (access mode 0 with it) and not O_DIRECT (which wants aligned buffers).
fn preadable(flags: u32) -> bool {
    let mode = flags & libc::O_ACCMODE as u32;
    (mode == libc::O_RDONLY as u32 || mode == libc::O_RDWR as u32)
        && flags & (libc::O_PATH | libc::O_DIRECT) as u32 == 0
}

/// A description of the dumped tree open for reading on `f`'s file: for a leased
/// file, the only way to read it that neither breaks the lease nor waits on a break.
fn readable_twin<'a>(fds: &'a [FoundFd], f: &FoundFd) -> Option<&'a FoundFd> {
    fds.iter()
        .find(|r| (r.dev, r.ino) == (f.dev, f.ino) && preadable(r.info.flags))
}

/// The SHA-256 of the file behind `f`: through a new open of /proc/PID/fd/N, or, for a
/// leased file, through a pidfd_getfd dup of a readable description of the dumped tree
/// (`through`): no open(), so the lease is not broken, and pread leaves the shared
/// file position alone.
fn sha256_of(f: &FoundFd, through: Option<&FoundFd>) -> Result<String> {
    let file = match through {
        Some(r) => std::fs::File::from(
            pidfd::pidfd_open(r.pid)
                .and_then(|p| pidfd::pidfd_getfd(&p, r.fd))
                .with_context(|| format!("hashing {} through process {}", r.path, r.pid))?,
        ),
        None => {
            let link = format!("/proc/{}/fd/{}", f.pid, f.fd);
            std::fs::File::open(&link).with_context(|| format!("hashing through {link}"))?
        }
    };
    fd_validate::sha256(&file).with_context(|| format!("hashing {}", f.path))
}

/// Refuses an fd no restore could open again, rather than write an image that can
/// never work: a directory removed while open (its path names nothing now, or
/// another directory). Checked on what was read in the frozen window.
fn refuse_unrestorable(fds: &[FoundFd]) -> Result<()> {
    if let Some(f) = fds
        .iter()
        .find(|f| f.kind() == FileKind::Directory && (f.unlinked || f.nlink == 0))
    {
        bail!(
            "process {} fd {} is directory {} removed while open: no restore could open it again, so no image was written (close the fd, or recreate the directory, and dump again)",
            f.pid,
            f.fd,
            f.path
        );
    }
    if let Some(f) = fds.iter().find(|f| f.name_gone() && f.handle.is_none()) {
        bail!(
            "process {} fd {} is {}, whose name was removed while another link keeps it, on a filesystem without file handles: no restore could find it again, so no image was written",
            f.pid,
            f.fd,
            f.path
        );
    }
    Ok(())
}

/// While frozen: deleted files mapped into memory. One held only by a mapping has no
/// fd, but its bytes are the process's too (CRIU dumps them as well); one also held
/// through an fd gets its mappings listed.
fn add_mapped_ghosts(
    iters: Option<&Iters>,
    pids: &BTreeSet<u32>,
    leased: &HashSet<(KernelDev, u64)>,
    limit: u64,
    sources: &mut Vec<ghost_dump::Source>,
) -> Result<()> {
    let maps = match iters {
        Some(i) => ghost_dump::mappings_from_scan(
            &crate::ghost::scan::parse(&i.read_all(Prog::DeletedMaps)?)?,
            pids,
        ),
        None => {
            let mut all = Vec::new();
            for &pid in pids {
                all.extend(ghost_dump::mappings_from_proc(pid)?);
            }
            all
        }
    };
    // Process memory and files with a name left are skipped before anything else is
    // read: shared anonymous memory is common.
    let shmem = ghost_dump::internal_shmem_dev();
    let mut kept = Vec::new();
    for m in maps {
        let link = m.link();
        let md = std::fs::metadata(&link)
            .with_context(|| format!("reading mapped deleted file {link}"))?;
        if md.nlink() != 0 || !md.is_file() {
            continue;
        }
        let path = std::fs::read_link(&link)
            .map(|p| crate::procinfo::split_deleted(&p.display().to_string()).0)
            .unwrap_or_default();
        if !ghost_dump::is_process_memory(&path, md.dev(), shmem) {
            kept.push((m, md, path));
        }
    }
    let described = ghost_dump::describe(&kept.iter().map(|k| k.0.clone()).collect::<Vec<_>>());
    for ((m, md, path), described) in kept.into_iter().zip(described) {
        let link = m.link();
        let dev = KernelDev::from_st_dev(md.dev());
        if let Some(s) = sources
            .iter_mut()
            .find(|s| s.plan.ghost.ino == md.ino() && s.plan.ghost.dev == dev)
        {
            s.plan.ghost.maps.push(described);
            continue;
        }
        if leased.contains(&(dev, md.ino())) {
            bail!("deleted file {path} is leased and held only by a mapping: reading it would break the lease");
        }
        sources.push(ghost_dump::prepare(
            ghost_dump::Plan {
                through: ghost_dump::Through::Link(link),
                ghost: Ghost {
                    dev,
                    ino: md.ino(),
                    path,
                    maps: vec![described],
                    ..Ghost::default()
                },
            },
            limit,
        )?);
    }
    Ok(())
}

/// `dump`, in its phases: select the cgroup, open the readers, prescan (before the
/// freeze: what takes long), freeze, read the frozen tasks, read contents that must be
/// read frozen (deleted files, hashes), thaw, assemble the image, write it.
pub fn run(opts: &Options) -> Result<Report> {
    let t0 = Instant::now();
    stop_signals_default();
    crate::sys::raise_open_file_limit();
    let target = select(opts)?;
    let iters = open_iters(opts);
    let mut readers = Readers::on(iters.as_ref());
    let pre = prescan(opts, &target, &mut readers)?;

    let id = image_id();
    // The watchdog first, so that it covers the temporary image from its creation to
    // its rename; declared before the writer and the freeze, it is dropped after them.
    let mut watchdog = Watchdog::start(
        &target.freezer,
        &crate::image::writer::temp_path(&opts.output),
    )?;
    let mut writer = ImageWriter::create(&opts.output, &target.key)?;
    let mut phase = Phases {
        on: opts.timings,
        last: Instant::now(),
    };
    freeze::refuse_self_freeze(
        &target.dir,
        &cgroup::pids(&target.dir)?,
        Some(watchdog.pid()),
    )?;
    let frozen = Frozen::freeze(target.freezer.clone(), opts.freeze_timeout)?;
    let (frozen_ns, freezing) = (frozen.monotonic_ns, frozen.freezing);
    phase.mark("freeze");

    // ---- frozen from here: kernel reads only; assembly waits for the thaw ----
    let read = read_frozen(opts, &target, &mut readers, &pre, &id, &mut phase)?;
    let mut contents = read_contents(opts, &readers, &read, &pre, &mut writer)?;
    phase.mark("deleted files and hashes");
    let frozen_for = frozen.thaw()?;
    watchdog.thawed();
    // ---- thawed ----

    contents.copy_cloned(&mut writer)?;
    let image = assemble(
        Frame {
            id: &id,
            cgroup: &target.dir,
            frozen_monotonic_ns: frozen_ns,
            frozen_for,
            hz: target.hz,
            with_iters: readers.iters.is_some(),
        },
        read,
        &pre,
        contents,
    )?;
    let fds = image.processes.iter().map(|p| p.fds.len()).sum();
    let path = writer.finish(&image)?;
    // Only now: a kill before the rename leaves the watchdog to remove the temporary.
    watchdog.done();
    Ok(Report {
        image: path.display().to_string(),
        id,
        source: image.source.clone(),
        fd_tables: if readers.table.is_some() {
            "iterator"
        } else {
            "proc"
        }
        .into(),
        frozen_ms: frozen_for.as_secs_f64() * 1e3,
        freezing_ms: freezing.as_secs_f64() * 1e3,
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
        processes: image.processes.len(),
        fds,
        files: image.files.len(),
        locks: image.locks.len(),
        leases: image.leases.len(),
        waiters: image.waiters.len(),
        ghosts: image.ghosts.len(),
        missing: image.missing,
    })
}

/// SIGINT and SIGTERM stop a dump (the watchdog thaws and cleans up), even when they
/// were inherited ignored, as a non-interactive shell's background jobs and some CI
/// runners start their commands.
fn stop_signals_default() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for s in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the default disposition, set before any threads exist.
        let _ = unsafe { signal(s, SigHandler::SigDfl) };
    }
}

/// What is dumped, and with what.
struct Target {
    dir: PathBuf,
    freezer: Freezer,
    key: crate::image::key::HostKey,
    hz: u32,
}

/// Phase 1: the cgroup, which must not be empty nor hold the caller, its freezer,
/// the key that will authenticate the image, the kernel's HZ.
fn select(opts: &Options) -> Result<Target> {
    let dir = cgroup::resolve(&opts.cgroup)?;
    let members = cgroup::pids(&dir)?;
    if members.is_empty() {
        bail!("cgroup {} is empty: nothing to dump", dir.display());
    }
    freeze::refuse_self_freeze(&dir, &members, None)?;
    let freezer = Freezer::for_cgroup(&dir)?;
    let key = crate::image::key::HostKey::load_or_create(&opts.key)?;
    let hz = crate::sys::hz::kernel_hz().context("finding the kernel's HZ")?;
    Ok(Target {
        dir,
        freezer,
        key,
        hz,
    })
}

/// The iterators, and the fd-table reader built on them (None: /proc is read).
struct Readers<'a> {
    iters: Option<&'a Iters>,
    table: Option<FdTable<'a>>,
}

impl<'a> Readers<'a> {
    fn on(iters: Option<&'a Iters>) -> Readers<'a> {
        let table = iters.and_then(|i| match FdTable::open(i) {
            Ok(t) => Some(t),
            Err(why) => {
                eprintln!("ckpt-user: {why:#}; reading fd tables from /proc");
                None
            }
        });
        Readers { iters, table }
    }
}

/// Phase 2: the iterators read the fd tables, lock lists and blocked requests: loaded
/// here, agent or not. CKPT_PROC_ONLY=1 takes the path of a kernel before 6.1 or a
/// caller without root.
fn open_iters(opts: &Options) -> Option<Iters> {
    let loaded = if std::env::var_os("CKPT_PROC_ONLY").is_some() {
        Err(anyhow::anyhow!("CKPT_PROC_ONLY is set"))
    } else {
        Iters::open(
            &opts.pins,
            &[
                Prog::TaskFiles,
                Prog::TaskFilesPaths,
                Prog::LockTable,
                Prog::LockTableMaps,
                Prog::DeletedMaps,
            ],
        )
    };
    match loaded {
        Ok(i) => Some(i),
        Err(e) => {
            eprintln!(
                "ckpt-user: {}; dumping from /proc alone: the image will lack {}",
                unavailable_hint(&e),
                MISSING_WITHOUT_ITERATORS.join(", ")
            );
            None
        }
    }
}

/// What is learnt before the freeze.
struct Prescanned {
    /// The cgroup's processes at the prescan.
    before: BTreeSet<u32>,
    /// What the fd-table iterator cannot tell (stat device, file handles).
    files: fd_dump::Prescan,
    /// The blocked requests, just before the freeze.
    blocked: Vec<KLock>,
    history: Option<History>,
}

/// Phase 3: what takes long is learnt before the freeze. Freezing interrupts blocked
/// lock calls (they restart after the thaw): the waiters are recorded as the kernel's
/// trees hold them just before (after the prescan, which takes a while), then the
/// agent's records, which name every request just read.
fn prescan(opts: &Options, target: &Target, readers: &mut Readers<'_>) -> Result<Prescanned> {
    let before: BTreeSet<u32> = cgroup::pids(&target.dir)?;
    let files = match &mut readers.table {
        Some(t) => fd_dump::prescan(&before, t)?,
        None => Default::default(),
    };
    let blocked: Vec<KLock> = match &readers.iters {
        Some(i) => kernel::read(i)?.blocked,
        None => proc_locks::read()?
            .iter()
            .filter(|p| p.blocked && p.lock_type.is_some())
            .filter_map(|p| kernel::from_proc_line(Default::default(), p))
            .collect(),
    };
    let history = History::read(&opts.pins).unwrap_or_else(|e| {
        eprintln!("ckpt-user: warning: ckpt-agent's records cannot be read ({e:#})");
        None
    });
    if history.is_none() {
        eprintln!(
            "ckpt-user: ckpt-agent is not running: the image will lack {}",
            MISSING_WITHOUT_AGENT.join(", ")
        );
    }
    Ok(Prescanned {
        before,
        files,
        blocked,
        history,
    })
}

/// What was read while frozen.
struct FrozenRead {
    pids: BTreeSet<u32>,
    processes: Vec<crate::image::format::Process>,
    fds: FdsRead,
}

/// Phase 4 (frozen): the snapshot command, then the fd tables and processes, one
/// reader per CPU, each also doing its processes' late reads.
fn read_frozen(
    opts: &Options,
    target: &Target,
    readers: &mut Readers<'_>,
    pre: &Prescanned,
    id: &str,
    phase: &mut Phases,
) -> Result<FrozenRead> {
    let pids: BTreeSet<u32> = cgroup::pids(&target.dir)?;
    if pids.is_empty() {
        bail!(
            "every process of cgroup {} exited before the dump",
            target.dir.display()
        );
    }
    if let Some(cmd) = &opts.snapshot_cmd {
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .env("CKPT_IMAGE_ID", id)
            .env("CKPT_CGROUP", &target.dir)
            .status()
            .context("running --snapshot-cmd")?;
        if !status.success() {
            bail!("--snapshot-cmd failed ({status})");
        }
    }
    // Processes that joined since the prescan need their paths now.
    let wanted: Vec<(u32, bool)> = pids
        .iter()
        .map(|&p| (p, !pre.before.contains(&p)))
        .collect();
    if let Some(t) = &mut readers.table {
        t.prepare(pids.difference(&pre.before).copied(), true)?;
    }
    let table_read = match &readers.table {
        Some(t) => {
            let (read, lates, ()) = t.read_then(
                &wanted,
                // After its read: a process killed since the freeze is refused
                // (see `task::dump::still_alive`), before its exit can tear what was read.
                |p| {
                    task_dump::still_alive(p.pid)?;
                    fd_dump::late_reads(&p.fds, &pids, &pre.files)
                },
                || (),
            )?;
            Some((read, lates))
        }
        None => None,
    };
    phase.mark("fd tables");
    let mut processes = Vec::new();
    let fds = match table_read {
        Some((read, lates)) => {
            let mut late = fd_dump::LateReads::default();
            for l in lates {
                late.merge(l);
            }
            let (opened, long) = late.counts();
            phase.say(&format!(
                "late reads: {opened} fds opened since the prescan, {long} with lock lists too long to walk"
            ));
            for &pid in &pids {
                // From the window's process record; a process killed meanwhile (no
                // record) is read from /proc, which catches it.
                processes.push(task_dump::from_record(
                    pid,
                    read.task(pid),
                    pre.files.processes.get(&pid),
                )?);
            }
            FdsRead::Iter { table: read, late }
        }
        None => {
            let mut fds = Vec::new();
            for &pid in &pids {
                processes.push(task_dump::read(pid)?);
                fds.extend(fd_dump::scan(pid)?);
                task_dump::still_alive(pid)?;
            }
            phase.mark("fd tables (/proc)");
            let (desc_of, files) = fd_dump::descriptions(&fds)?;
            FdsRead::Proc {
                fds,
                desc_of,
                files,
            }
        }
    };
    phase.mark("processes and descriptions");
    Ok(FrozenRead {
        pids,
        processes,
        fds,
    })
}

/// Contents read while frozen: deleted files (those a snapshot cannot clone are
/// copied now), and hashes with --hash.
struct Contents {
    sources: Vec<ghost_dump::Source>,
    ghosts: Vec<Ghost>,
    hashes: HashMap<(KernelDev, u64), String>,
    progress: Option<ProgressBar>,
}

impl Contents {
    /// Phase 6 (thawed): the deleted files that were cloned at the freeze.
    fn copy_cloned(&mut self, writer: &mut ImageWriter) -> Result<()> {
        for s in self.sources.iter().filter(|s| s.cloned) {
            self.ghosts
                .push(ghost_dump::copy(s, writer, self.progress.as_ref())?);
        }
        if let Some(p) = self.progress.take() {
            p.finish_and_clear();
        }
        Ok(())
    }
}

/// Inodes with a lease: reading them would break it.
fn leased(fds: &[FoundFd]) -> HashSet<(KernelDev, u64)> {
    fds.iter()
        .filter(|f| f.info.locks.iter().any(|l| l.kind == Some(HeldKind::Lease)))
        .map(|f| (f.dev, f.ino))
        .collect()
}

/// Phase 5 (frozen): what must be read before the thaw.
fn read_contents(
    opts: &Options,
    readers: &Readers<'_>,
    read: &FrozenRead,
    pre: &Prescanned,
    writer: &mut ImageWriter,
) -> Result<Contents> {
    let needed_now;
    let content_fds: &[FoundFd] = match &read.fds {
        FdsRead::Proc { fds, .. } => fds,
        FdsRead::Iter { table, late } => {
            needed_now = fd_dump::assemble(
                table
                    .fds()
                    .filter(|e| opts.hash || fd_dump::is_ghost_record(e)),
                &read.pids,
                &pre.files,
                late,
            );
            &needed_now
        }
    };
    let leased = leased(content_fds);
    let mut sources = Vec::new();
    let mut seen = HashSet::new();
    for f in content_fds {
        if !f.is_ghost() || !seen.insert((f.dev, f.ino)) {
            continue;
        }
        // A leased one is read through a holder's own description: an open of it
        // would break the lease.
        let through = if leased.contains(&(f.dev, f.ino)) {
            let Some(r) = readable_twin(content_fds, f) else {
                bail!(
                    "deleted file {} is leased and not open for reading: reading it would break the lease",
                    f.path
                );
            };
            ghost_dump::Through::Dup {
                pid: r.pid,
                fd: r.fd,
            }
        } else {
            ghost_dump::Through::Link(format!("/proc/{}/fd/{}", f.pid, f.fd))
        };
        sources.push(ghost_dump::prepare(
            ghost_dump::Plan {
                through,
                ghost: Ghost {
                    dev: f.dev,
                    ino: f.ino,
                    path: f.path.clone(),
                    size: f.size,
                    mode: f.mode,
                    // Unknown through /proc: not linkable, the safe side.
                    linkable: f.linkable.unwrap_or(false),
                    ..Ghost::default()
                },
            },
            opts.ghost_limit,
        )?);
    }
    add_mapped_ghosts(
        readers.iters,
        &read.pids,
        &leased,
        opts.ghost_limit,
        &mut sources,
    )?;
    let total_ghost: u64 = sources
        .iter()
        .flat_map(|s| &s.plan.ghost.extents)
        .map(|e| e.1)
        .sum();
    let progress = (std::io::stdout().is_terminal() && total_ghost > 16 << 20).then(|| {
        let p = ProgressBar::new(total_ghost);
        p.set_style(ProgressStyle::with_template("{msg} {bar:40} {bytes}/{total_bytes}").unwrap());
        p.set_message("deleted files");
        p
    });
    let mut ghosts = Vec::new();
    for s in sources.iter().filter(|s| !s.cloned) {
        ghosts.push(ghost_dump::copy(s, writer, progress.as_ref())?);
    }
    let mut hashes: HashMap<(KernelDev, u64), String> = HashMap::new();
    if opts.hash {
        for f in content_fds
            .iter()
            .filter(|f| f.kind() == FileKind::Regular && !f.is_ghost())
        {
            if hashes.contains_key(&(f.dev, f.ino)) {
                continue;
            }
            let through = if leased.contains(&(f.dev, f.ino)) {
                let readable = readable_twin(content_fds, f);
                if readable.is_none() {
                    bail!(
                        "cannot hash {}: it is leased and not open for reading, and opening it to read would break the lease",
                        f.path
                    );
                }
                readable
            } else {
                None
            };
            hashes.insert((f.dev, f.ino), sha256_of(f, through)?);
        }
    }
    Ok(Contents {
        sources,
        ghosts,
        hashes,
        progress,
    })
}

/// The image's frame: its identity and the freeze it describes.
struct Frame<'a> {
    id: &'a str,
    cgroup: &'a std::path::Path,
    frozen_monotonic_ns: u64,
    frozen_for: Duration,
    hz: u32,
    with_iters: bool,
}

/// Each fd onto its process (by index, not a search per fd).
fn attach_fds(processes: &mut [crate::image::format::Process], fds: &[FoundFd], desc_of: &[u32]) {
    let index: HashMap<u32, usize> = processes
        .iter()
        .enumerate()
        .map(|(i, p)| (p.pid, i))
        .collect();
    for (i, f) in fds.iter().enumerate() {
        let p = &mut processes[index[&f.pid]];
        p.fds.push(crate::image::format::Fd {
            fd: f.fd,
            file: desc_of[i],
            cloexec: fd_dump::cloexec(f),
        });
    }
}

/// Fingerprints of regular files (not deleted ones), one per inode, as they were at
/// the freeze: what restore checks before touching anything.
fn fingerprints(fds: &[FoundFd], hashes: &HashMap<(KernelDev, u64), String>) -> Vec<Fingerprint> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for f in fds
        .iter()
        .filter(|f| f.kind() == FileKind::Regular && !f.is_ghost())
    {
        if !seen.insert((f.dev, f.ino)) {
            continue;
        }
        out.push(Fingerprint {
            path: f.path.clone(),
            dev: f.dev,
            ino: f.ino,
            size: f.size,
            mtime_ns: f.mtime_ns,
            ctime_ns: f.ctime_ns,
            handle: f.handle.clone(),
            sha256: hashes.get(&(f.dev, f.ino)).cloned(),
            unlinked: f.name_gone(),
        });
    }
    out
}

/// What the image lacks, by what was missing at the dump.
fn missing(with_iters: bool, with_agent: bool) -> Vec<String> {
    (!with_iters)
        .then_some(MISSING_WITHOUT_ITERATORS)
        .into_iter()
        .chain((!with_agent).then_some(MISSING_WITHOUT_AGENT))
        .flatten()
        .map(std::string::ToString::to_string)
        .collect()
}

/// Phase 7 (thawed): the image, from what was read. Refuses what restore could not
/// bring back.
fn assemble(frame: Frame, read: FrozenRead, pre: &Prescanned, contents: Contents) -> Result<Image> {
    let FrozenRead {
        pids,
        mut processes,
        fds,
    } = read;
    let (all_fds, desc_of, files) = match fds {
        FdsRead::Proc {
            fds,
            desc_of,
            files,
        } => (fds, desc_of, files),
        FdsRead::Iter { table, late } => {
            let fds = fd_dump::assemble(table.fds(), &pids, &pre.files, &late);
            let (desc_of, files) = fd_dump::descriptions_by_file(&fds);
            (fds, desc_of, files)
        }
    };
    refuse_unrestorable(&all_fds)?;
    attach_fds(&mut processes, &all_fds, &desc_of);
    let collected = lock_dump::collect(
        &all_fds,
        &desc_of,
        &pids,
        &pre.blocked,
        pre.history.as_ref(),
        frame.frozen_monotonic_ns,
        frame.hz,
    )?;
    Ok(Image {
        id: frame.id.to_string(),
        created_unix_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64,
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        cgroup: frame.cgroup.display().to_string(),
        frozen_monotonic_ns: frame.frozen_monotonic_ns,
        frozen_ns: frame.frozen_for.as_nanos() as u64,
        source: if frame.with_iters { "kernel" } else { "proc" }.into(),
        missing: missing(frame.with_iters, pre.history.is_some()),
        processes,
        files,
        locks: collected.locks,
        waiters: collected.waiters,
        leases: collected.leases,
        ghosts: contents.ghosts,
        fingerprints: fingerprints(&all_fds, &contents.hashes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{image::format::Process, lock::proc_locks::ProcLock};

    fn found(pid: u32, fd: i32, ino: u64, mode: u32, nlink: u64) -> FoundFd {
        FoundFd::for_test(pid, fd, ino, mode, nlink)
    }

    const REG: u32 = libc::S_IFREG | 0o644;

    #[test]
    fn fds_go_to_their_process_with_their_description_and_cloexec() {
        let mut procs = vec![
            Process {
                pid: 10,
                ..Process::default()
            },
            Process {
                pid: 20,
                ..Process::default()
            },
        ];
        let mut a = found(20, 3, 1, REG, 1);
        a.info.flags = fd_dump::O_CLOEXEC;
        let fds = [a, found(10, 4, 2, REG, 1), found(20, 5, 1, REG, 1)];
        attach_fds(&mut procs, &fds, &[0, 1, 0]);
        let got = |p: &Process| -> Vec<(i32, u32, bool)> {
            p.fds.iter().map(|f| (f.fd, f.file, f.cloexec)).collect()
        };
        assert_eq!(got(&procs[0]), vec![(4, 1, false)]);
        assert_eq!(got(&procs[1]), vec![(3, 0, true), (5, 0, false)]);
    }

    #[test]
    fn one_fingerprint_per_regular_inode_and_none_for_deleted_or_other_files() {
        let fds = [
            found(1, 3, 1, REG, 1),
            found(2, 3, 1, REG, 1), // the same inode through another process
            found(1, 4, 2, REG, 0), // deleted: its contents are in a ghost
            found(1, 5, 3, libc::S_IFIFO | 0o600, 1),
            found(1, 6, 4, REG, 2),
        ];
        let hashes = HashMap::from([((KernelDev::new(8, 1), 4), "ab".to_string())]);
        let fp = fingerprints(&fds, &hashes);
        let inos: Vec<(u64, Option<&str>)> =
            fp.iter().map(|f| (f.ino, f.sha256.as_deref())).collect();
        assert_eq!(inos, vec![(1, None), (4, Some("ab"))]);
    }

    #[test]
    fn leased_inodes_and_what_an_image_lacks() {
        let mut l = found(1, 3, 7, REG, 1);
        l.info.locks.push(ProcLock {
            id: 1,
            blocked: false,
            kind: Some(HeldKind::Lease),
            state: "ACTIVE".into(),
            lock_type: None,
            pid: 1,
            dev: KernelDev::new(8, 1),
            ino: 7,
            range: crate::lock::LockRange::WHOLE,
        });
        let set = leased(&[l, found(1, 4, 8, REG, 1)]);
        assert_eq!(set, HashSet::from([(KernelDev::new(8, 1), 7)]));
        assert!(missing(true, true).is_empty());
        assert_eq!(missing(true, false).len(), MISSING_WITHOUT_AGENT.len());
        assert_eq!(
            missing(false, false).len(),
            MISSING_WITHOUT_ITERATORS.len() + MISSING_WITHOUT_AGENT.len()
        );
    }

    #[test]
    fn only_descriptions_open_for_reading_and_not_direct_are_read_with_pread() {
        let f = |v: i32| v as u32;
        assert!(preadable(f(libc::O_RDONLY)));
        assert!(preadable(f(libc::O_RDWR | libc::O_APPEND)));
        assert!(!preadable(f(libc::O_WRONLY)));
        assert!(!preadable(f(libc::O_PATH)));
        assert!(!preadable(f(libc::O_RDWR | libc::O_DIRECT)));
        assert!(!preadable(3));
    }
}
