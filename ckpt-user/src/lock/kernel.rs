//! The lock table as the kernel holds it, read with the lock-table iterators
//! (ckpt-ebpf/src/lock_table.rs): every held lock and lease once, with the fd (or
//! mapping) it is held through, and every blocked request with what it waits behind.
//!
//! One kernel lock object is one row however many fds reach it (dup, fork): rows are
//! keyed by the object's address. Where the kernel walk could not vouch for a list
//! (it changed under the walk, or was too long), that fd is read again by itself, and
//! if it still cannot be walked, its held locks come from fdinfo, which the kernel
//! prints under the inode's `flc_lock` (without blocked requests or lease deadlines).

use std::{
    collections::{HashMap, HashSet},
    ops::Range,
    sync::Arc,
};

use anyhow::{bail, Result};
use ckpt_common::{
    files::{
        list, tag, FdRecord, LockLine, TaskRecord, FD_RECORD_SIZE, LOCK_LINE_SIZE, MAPPING_FD,
        PATH_MAX, TASK_RECORD_SIZE,
    },
    lock::{fl_flags, LockOwner},
};

use super::{proc_locks::ProcLock, HeldKind, KernelDev, LockKind, LockRange};
use crate::{
    fd::fdinfo::parse_fdinfo,
    tracer::iters::{Iters, Prog},
};

/// What a line is, from the list it came from and its flags; None for delegations
/// (NFS), which ckpt does not show, and markers.
pub fn held_kind(list_id: u32, flags: u32) -> Option<HeldKind> {
    match list_id {
        list::POSIX if flags & fl_flags::FL_OFDLCK != 0 => Some(HeldKind::Lock(LockKind::Ofd)),
        list::POSIX => Some(HeldKind::Lock(LockKind::Posix)),
        list::FLOCK => Some(HeldKind::Lock(LockKind::Flock)),
        list::LEASE if flags & fl_flags::FL_DELEG == 0 => Some(HeldKind::Lease),
        _ => None,
    }
}

/// Through what a process holds a lock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// None when held through a mapping.
    pub fd: Option<i32>,
    /// The mapping's start and end.
    pub mapping: Option<(u64, u64)>,
    pub path: Option<Arc<str>>,
}

/// A lease's deadlines, as the kernel had them when the line was read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseClock {
    pub break_time: u64,
    pub downgrade_time: u64,
    /// jiffies and CLOCK_MONOTONIC ns, read together with the line.
    pub jiffies: u64,
    pub now_ns: u64,
}

/// A held lock or lease, or a blocked request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KLock {
    pub kind: HeldKind,
    /// fl_type: for a lease being broken, the type it had before the break.
    pub lock_type: u8,
    pub flags: u32,
    /// fl_pid: the creator (the requester, for a blocked request).
    pub pid: i32,
    pub range: LockRange,
    pub dev: KernelDev,
    pub ino: u64,
    /// The kernel's owner identity (None from fdinfo).
    pub owner: Option<LockOwner>,
    /// The object's address (None from fdinfo).
    pub addr: Option<u64>,
    /// For a blocked request: the address of what it waits behind.
    pub blocker: Option<u64>,
    pub lease: Option<LeaseClock>,
    /// Held: the first fd (or mapping) seen holding it. Blocked: the requester's pid.
    pub holder: Holder,
}

/// The whole table.
#[derive(Debug, Default)]
pub struct KernelLocks {
    pub held: Vec<KLock>,
    pub blocked: Vec<KLock>,
    /// Command names from the iterator's process records (shared by their rows).
    pub comms: HashMap<u32, Arc<str>>,
    /// (pid, fd) whose held locks came from fdinfo: because their lists still
    /// changed under the walk when read again (`from_fdinfo`), or held more locks and
    /// waiters than a walk reads (`too_long`); and mappings that could not be read.
    /// Each is said to the reader.
    pub from_fdinfo: Vec<(u32, i32)>,
    pub too_long: Vec<(u32, i32)>,
    pub unread_mappings: usize,
    /// Lines with a range no lock has (a misread layout): not shown, but said.
    pub bad_ranges: usize,
    /// By held lock's address: every process that reaches it through an fd or a
    /// mapping (for OFD, flock and leases, every process sharing the description).
    pub reached_by: HashMap<u64, Vec<u32>>,
}

fn read_tag(buf: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(..4)?.try_into().ok()?))
}

/// Reads a plain-data record at the start of `buf`.
fn record<T: Copy>(buf: &[u8]) -> T {
    assert!(buf.len() >= std::mem::size_of::<T>());
    // SAFETY: T is plain data (#[repr(C)] integers) of at most buf.len() bytes; any
    // bit pattern is a valid value.
    unsafe { std::ptr::read_unaligned(buf.as_ptr() as *const T) }
}

fn comm_of(t: &TaskRecord) -> String {
    let end = t.comm.iter().position(|&b| b == 0).unwrap_or(t.comm.len());
    String::from_utf8_lossy(&t.comm[..end]).into_owned()
}

/// One fd (or mapping) record and its lines, as parsed.
#[derive(Debug)]
struct FdLines {
    rec: FdRecord,
    /// Shared by every lock held through this fd (one allocation per fd, not per row).
    path: Option<Arc<str>>,
    /// Its lines, in `Parsed::lines` (one vector for all fds: 100,000 small vectors
    /// were a tenth of the view's userspace time).
    lines: Range<usize>,
    /// Whether the walk reached the end of the lists.
    walk: Walk,
}

/// How an fd's walk of its lock lists ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Walk {
    #[default]
    Complete,
    /// A list changed under it (`list::UNSTABLE`): read again.
    Changed,
    /// More locks than a walk reads (`list::TRUNCATED`): only fdinfo has them all.
    TooLong,
}

/// Iterator output split into records.
#[derive(Debug, Default)]
struct Parsed {
    fds: Vec<FdLines>,
    lines: Vec<LockLine>,
    /// Lines from here on wait for the fd record that follows them, and how that
    /// fd's walk ended (its marker line comes before the record too).
    unclaimed: usize,
    walk: Walk,
}

/// Parses the whole records at the start of `buf` into `into` (an fd's lines come
/// before its record, and may be in an earlier piece); returns the bytes used. A
/// record cut by the end of `buf` is left for the next piece.
fn parse_some(buf: &[u8], comms: &mut HashMap<u32, Arc<str>>, into: &mut Parsed) -> Result<usize> {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let Some(tag) = read_tag(rest) else {
            return Ok(at);
        };
        let need = match tag {
            tag::TASK => TASK_RECORD_SIZE,
            tag::LOCK => LOCK_LINE_SIZE,
            tag::FD if rest.len() >= FD_RECORD_SIZE => {
                let len = record::<FdRecord>(rest).path_len as usize;
                if len > PATH_MAX {
                    bail!("lock-table iterator output garbled: a path of {len} bytes");
                }
                FD_RECORD_SIZE + len
            }
            tag::FD => FD_RECORD_SIZE,
            _ => bail!("lock-table iterator output garbled"),
        };
        if rest.len() < need {
            return Ok(at);
        }
        match tag {
            tag::TASK => {
                let t: TaskRecord = record(rest);
                comms.insert(t.tgid, comm_of(&t).into());
            }
            tag::FD => {
                let rec: FdRecord = record(rest);
                let raw = &rest[FD_RECORD_SIZE..need];
                let path = (!raw.is_empty()).then(|| {
                    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                    String::from_utf8_lossy(&raw[..end]).into()
                });
                into.fds.push(FdLines {
                    rec,
                    path,
                    lines: into.unclaimed..into.lines.len(),
                    walk: std::mem::take(&mut into.walk),
                });
                into.unclaimed = into.lines.len();
            }
            _ => {
                let line: LockLine = record(rest);
                match line.list {
                    list::UNSTABLE => into.walk = Walk::Changed,
                    list::TRUNCATED => into.walk = Walk::TooLong,
                    _ => into.lines.push(line),
                }
            }
        }
        at += need;
    }
}

/// After the last piece (`left`: bytes no whole record took): every line claimed by
/// its fd.
fn parse_end(left: usize, into: &Parsed) -> Result<()> {
    if left != 0 {
        bail!("lock-table iterator output truncated");
    }
    if into.unclaimed != into.lines.len() || into.walk != Walk::Complete {
        bail!("lock-table iterator output: lock lines without their fd");
    }
    Ok(())
}

/// Splits a whole lock-table iterator output into process names and fds with lines,
/// appended to `into`.
fn parse(buf: &[u8], comms: &mut HashMap<u32, Arc<str>>, into: &mut Parsed) -> Result<()> {
    into.unclaimed = into.lines.len();
    into.walk = Walk::Complete;
    let used = parse_some(buf, comms, into)?;
    parse_end(buf.len() - used, into)
}

/// An iterator's output parsed as it is read, piece by piece: a record cut between
/// two pieces waits in `carry` for the rest.
#[derive(Default)]
struct Stream {
    carry: Vec<u8>,
}

impl Stream {
    fn feed(
        &mut self,
        piece: &[u8],
        comms: &mut HashMap<u32, Arc<str>>,
        into: &mut Parsed,
    ) -> Result<()> {
        if self.carry.is_empty() {
            let used = parse_some(piece, comms, into)?;
            self.carry.extend_from_slice(&piece[used..]);
        } else {
            self.carry.extend_from_slice(piece);
            let used = parse_some(&self.carry, comms, into)?;
            self.carry.drain(..used);
        }
        Ok(())
    }

    fn end(self, into: &Parsed) -> Result<()> {
        parse_end(self.carry.len(), into)
    }
}

/// A line as a lock of the table (None for what ckpt does not show).
fn klock(fd: &FdLines, line: &LockLine) -> Option<KLock> {
    let kind = held_kind(line.list, line.flags)?;
    let r = &fd.rec;
    let holder = if r.fd == MAPPING_FD {
        Holder {
            pid: r.tgid,
            fd: None,
            mapping: Some((r.pos as u64, r.size as u64)),
            path: std::fs::read_link(format!(
                "/proc/{}/map_files/{:x}-{:x}",
                r.tgid, r.pos, r.size
            ))
            .ok()
            .map(|p| p.to_string_lossy().into()),
        }
    } else {
        Holder {
            pid: r.tgid,
            fd: Some(r.fd as i32),
            mapping: None,
            path: fd.path.clone(),
        }
    };
    Some(KLock {
        kind,
        lock_type: line.lock_type as u8,
        flags: line.flags,
        pid: line.pid,
        // A line with no valid range is not a lock (the walk vouches for the rest).
        range: LockRange::new(line.start, line.end)?,
        dev: KernelDev(r.s_dev),
        ino: r.ino,
        owner: Some(LockOwner(line.owner)),
        addr: Some(line.lock),
        blocker: (line.blocker != 0).then_some(line.blocker),
        lease: (kind == HeldKind::Lease).then_some(LeaseClock {
            break_time: line.break_time,
            downgrade_time: line.downgrade_time,
            jiffies: line.jiffies,
            now_ns: line.now_ns,
        }),
        holder,
    })
}

/// A lock from a /proc/locks or fdinfo line, held through `holder` (its pid stands
/// in for the -1 /proc shows for an OFD lock's creator). /proc shows a lease being
/// broken with its target type: its own is lost.
pub fn from_proc_line(holder: Holder, p: &ProcLock) -> Option<KLock> {
    use ckpt_common::lock::fl_type;
    let kind = p.kind?;
    let breaking = p.state == "BREAKING";
    Some(KLock {
        kind,
        lock_type: p
            .lock_type
            .map(ckpt_common::lock::LockType::to_fl_type)
            .unwrap_or(fl_type::F_UNLCK),
        flags: if breaking {
            fl_flags::FL_UNLOCK_PENDING
        } else {
            0
        },
        pid: if p.pid < 0 {
            holder.pid as i32
        } else {
            p.pid as i32
        },
        range: p.range,
        dev: p.dev,
        ino: p.ino,
        owner: None,
        addr: None,
        blocker: None,
        lease: None,
        holder,
    })
}

/// How many times a process whose lists changed under the walk is read again by
/// itself before its fdinfo is taken instead.
const REREADS: usize = 2;

/// Output pieces of the fd walk read ahead of the parse.
const PIECES_AHEAD: usize = 64;

/// Reads the whole table: the fd walk and the mapping walk side by side, the fd
/// walk's output parsed on this thread as it is read (the walks take a CPU each on a
/// host with many processes; the parse fits in the time the shorter one leaves, and
/// no copy of the whole output is ever held).
pub fn read(iters: &Iters) -> Result<KernelLocks> {
    let mut out = KernelLocks::default();
    let mut parsed = Parsed::default();
    let maps = std::thread::scope(|s| -> Result<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(PIECES_AHEAD);
        let fds = s.spawn(move || iters.read_all_pieces(Prog::LockTable, |p| tx.send(p).is_ok()));
        let maps = s.spawn(|| iters.read_all(Prog::LockTableMaps));
        let mut stream = Stream::default();
        // Stops at the first bad piece; the reader stops when its next send fails.
        let parsed_fds = rx
            .into_iter()
            .try_for_each(|piece| stream.feed(&piece, &mut out.comms, &mut parsed));
        let fds = fds.join().expect("the fd walk's thread panicked");
        let maps = maps.join().expect("the mapping walk's thread panicked");
        fds?;
        parsed_fds?;
        stream.end(&parsed)?;
        maps
    })?;
    parse(&maps, &mut out.comms, &mut parsed)?;
    collect(iters, parsed, out)
}

/// The locks held through process `pid`'s fds (not its mappings), and the requests
/// blocked on them.
pub fn read_process(iters: &Iters, pid: u32) -> Result<KernelLocks> {
    let mut out = KernelLocks::default();
    let mut parsed = Parsed::default();
    parse(
        &iters.read_process(Prog::LockTable, pid)?,
        &mut out.comms,
        &mut parsed,
    )?;
    collect(iters, parsed, out)
}

/// Re-reads processes whose walk was cut, takes fdinfo where it still is, and keeps
/// each kernel object once.
fn collect(iters: &Iters, mut parsed: Parsed, mut out: KernelLocks) -> Result<KernelLocks> {
    // Processes whose lists changed under the walk, read again alone (their other fds
    // too: the lines of one read are consistent with each other).
    let mut cut: Vec<u32> = parsed
        .fds
        .iter()
        .filter(|f| f.walk == Walk::Changed)
        .map(|f| f.rec.tgid)
        .collect();
    cut.sort_unstable();
    cut.dedup();
    if !cut.is_empty() {
        let redo: HashSet<u32> = cut.iter().copied().collect();
        // Mappings stay from the first read: the re-read walks fds only.
        parsed
            .fds
            .retain(|f| f.rec.fd == MAPPING_FD || !redo.contains(&f.rec.tgid));
        for pid in cut {
            let (fds_before, lines_before) = (parsed.fds.len(), parsed.lines.len());
            for _ in 0..REREADS {
                parsed.fds.truncate(fds_before);
                parsed.lines.truncate(lines_before);
                let again = iters.read_process(Prog::LockTable, pid)?;
                parse(&again, &mut out.comms, &mut parsed)?;
                if !parsed.fds[fds_before..]
                    .iter()
                    .any(|f| f.walk == Walk::Changed)
                {
                    break;
                }
            }
        }
    }
    let Parsed { fds, lines, .. } = parsed;
    let mut seen = foldhash::HashSet::with_capacity_and_hasher(lines.len(), Default::default());
    out.held.reserve(lines.len());
    let mut seen_fdinfo: HashSet<(HeldKind, KernelDev, u64, LockRange, i32, u8)> = HashSet::new();
    for f in &fds {
        if f.walk != Walk::Complete {
            if f.rec.fd == MAPPING_FD {
                out.unread_mappings += 1;
                continue;
            }
            let (pid, fd) = (f.rec.tgid, f.rec.fd as i32);
            // Gone meanwhile: nothing to report.
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
                continue;
            };
            match f.walk {
                Walk::TooLong => out.too_long.push((pid, fd)),
                _ => out.from_fdinfo.push((pid, fd)),
            }
            for p in parse_fdinfo(&text).locks {
                let holder = Holder {
                    pid,
                    fd: Some(fd),
                    mapping: None,
                    path: f.path.clone(),
                };
                if let Some(k) = from_proc_line(holder, &p) {
                    if seen_fdinfo.insert((k.kind, k.dev, k.ino, k.range, k.pid, k.lock_type)) {
                        out.held.push(k);
                    }
                }
            }
            continue;
        }
        for line in &lines[f.lines.clone()] {
            // A POSIX lock's holder is its owner process: only the others need this.
            if line.blocker == 0
                && held_kind(line.list, line.flags) != Some(HeldKind::Lock(LockKind::Posix))
            {
                let pids = out.reached_by.entry(line.lock).or_default();
                if pids.last() != Some(&f.rec.tgid) {
                    pids.push(f.rec.tgid);
                }
            }
            if !seen.insert(line.lock) {
                continue;
            }
            if LockRange::new(line.start, line.end).is_none()
                && held_kind(line.list, line.flags).is_some()
            {
                out.bad_ranges += 1;
                continue;
            }
            let Some(k) = klock(f, line) else { continue };
            if k.blocker.is_some() {
                out.blocked.push(k);
            } else {
                out.held.push(k);
            }
        }
    }
    Ok(out)
}

/// Whether blocked request `w` conflicts with held lock or lease `l` (the kernel's
/// rules: the same inode and lock list — POSIX and OFD locks share one, flock locks
/// have their own, leases theirs — overlapping ranges, another owner, and a write on
/// either side).
pub fn conflicts(l: &KLock, w: &KLock) -> bool {
    use ckpt_common::lock::fl_type::F_WRLCK;
    if l.dev != w.dev || l.ino != w.ino {
        return false;
    }
    let family = |k: HeldKind| match k {
        HeldKind::Lock(LockKind::Flock) => 1,
        HeldKind::Lock(_) => 0,
        HeldKind::Lease => 2,
    };
    if family(l.kind) != family(w.kind) {
        return false;
    }
    let write = l.lock_type == F_WRLCK || w.lock_type == F_WRLCK;
    if l.kind == HeldKind::Lease {
        // A breaker conflicts with a write lease, or wants to write.
        return write;
    }
    let overlap = l.range.overlaps(w.range);
    let other = l.owner.is_none() || l.owner != w.owner;
    overlap && other && write
}

#[cfg(test)]
mod tests {
    use super::*;
    use ckpt_common::lock::fl_type::{F_RDLCK, F_WRLCK};

    fn bytes<T>(rec: &T) -> Vec<u8> {
        // SAFETY: reading a plain-data struct as bytes.
        unsafe {
            std::slice::from_raw_parts(rec as *const T as *const u8, std::mem::size_of::<T>())
        }
        .to_vec()
    }

    const OFFSET_MAX: i64 = LockRange::OFFSET_MAX;

    fn lock(kind: HeldKind, t: u8, owner: u64, start: i64, end: i64) -> KLock {
        KLock {
            kind,
            lock_type: t,
            flags: 0,
            pid: 1,
            range: LockRange::new(start, end).unwrap(),
            dev: KernelDev(8),
            ino: 5,
            owner: Some(LockOwner(owner)),
            addr: Some(owner * 16),
            blocker: None,
            lease: None,
            holder: Holder::default(),
        }
    }

    #[test]
    fn parses_records_and_drops_markers() {
        let task = TaskRecord {
            tag: tag::TASK,
            tgid: 7,
            comm: *b"locker\0\0\0\0\0\0\0\0\0\0",
            ..Default::default()
        };
        let fd = FdRecord {
            tag: tag::FD,
            tgid: 7,
            fd: 3,
            path_len: 7,
            ino: 5,
            ..Default::default()
        };
        let held = LockLine {
            tag: tag::LOCK,
            list: list::POSIX,
            lock: 0x100,
            ..Default::default()
        };
        let cut = LockLine {
            tag: tag::LOCK,
            list: list::UNSTABLE,
            ..Default::default()
        };
        let mut buf = bytes(&held);
        buf.extend(bytes(&cut));
        buf.extend(bytes(&task));
        buf.extend(bytes(&fd));
        buf.extend(b"/tmp/a\0");
        let mut comms = HashMap::new();
        let mut got = Parsed::default();
        parse(&buf, &mut comms, &mut got).unwrap();
        assert_eq!(&*comms[&7], "locker");
        assert_eq!(got.fds.len(), 1);
        assert_eq!(got.fds[0].path.as_deref(), Some("/tmp/a"));
        assert_eq!(&got.lines[got.fds[0].lines.clone()], &[held]);
        assert_eq!(got.fds[0].walk, Walk::Changed);
        // A second read appends: its fd's lines are its own.
        parse(&buf, &mut comms, &mut got).unwrap();
        assert_eq!(got.fds[1].lines, 1..2);
        // A walk that stopped at its bound is told from one that met a change.
        let long = LockLine {
            list: list::TRUNCATED,
            ..cut
        };
        let mut buf = bytes(&held);
        buf.extend(bytes(&long));
        buf.extend(bytes(&FdRecord { path_len: 0, ..fd }));
        let mut got = Parsed::default();
        parse(&buf, &mut comms, &mut got).unwrap();
        assert_eq!(got.fds[0].walk, Walk::TooLong);
        // Any prefix that cuts a record is an error, never a panic.
        for n in 1..buf.len() {
            let _ = parse(&buf[..n], &mut comms, &mut Parsed::default());
        }
        assert!(parse(&bytes(&held), &mut comms, &mut Parsed::default()).is_err());
    }

    /// Read in pieces cut anywhere, the output parses as it does whole; a stream that
    /// ends inside a record, or with lines no fd claimed, is an error.
    #[test]
    fn pieces_cut_anywhere_parse_as_the_whole() {
        let task = TaskRecord {
            tag: tag::TASK,
            tgid: 7,
            ..Default::default()
        };
        let fd = |n: u32, path: &[u8]| {
            let mut v = bytes(&FdRecord {
                tag: tag::FD,
                tgid: 7,
                fd: n,
                path_len: path.len() as u32,
                ..Default::default()
            });
            v.extend_from_slice(path);
            v
        };
        let line = |lock: u64| {
            bytes(&LockLine {
                tag: tag::LOCK,
                list: list::POSIX,
                lock,
                ..Default::default()
            })
        };
        let mut buf = bytes(&task);
        buf.extend(line(1));
        buf.extend(line(2));
        buf.extend(fd(3, b"/a\0"));
        buf.extend(fd(4, b""));
        buf.extend(line(3));
        buf.extend(fd(5, b"/b/c\0"));
        let whole = |buf: &[u8]| {
            let mut p = Parsed::default();
            parse(buf, &mut HashMap::new(), &mut p).map(|()| p)
        };
        let want = whole(&buf).unwrap();
        let shape = |p: &Parsed| {
            p.fds
                .iter()
                .map(|f| (f.rec.fd, f.path.clone(), p.lines[f.lines.clone()].to_vec()))
                .collect::<Vec<_>>()
        };
        for a in 0..=buf.len() {
            for b in a..=buf.len() {
                let mut p = Parsed::default();
                let mut comms = HashMap::new();
                let mut stream = Stream::default();
                for piece in [&buf[..a], &buf[a..b], &buf[b..]] {
                    stream.feed(piece, &mut comms, &mut p).unwrap();
                }
                stream.end(&p).unwrap();
                assert_eq!(shape(&p), shape(&want), "cut at {a} and {b}");
            }
        }
        let ends_badly = |buf: &[u8]| {
            let mut p = Parsed::default();
            let mut stream = Stream::default();
            stream.feed(buf, &mut HashMap::new(), &mut p).unwrap();
            stream.end(&p).is_err()
        };
        // Inside a record, and after lines no fd claimed.
        assert!(ends_badly(&buf[..buf.len() - 1]));
        assert!(ends_badly(&buf[..buf.len() - fd(5, b"/b/c\0").len()]));
        assert!(!ends_badly(&buf));
    }

    #[test]
    fn conflicts_follow_the_kernel_rules() {
        let posix = HeldKind::Lock(LockKind::Posix);
        let ofd = HeldKind::Lock(LockKind::Ofd);
        let flock = HeldKind::Lock(LockKind::Flock);
        let held = lock(posix, F_WRLCK, 1, 0, 9);
        assert!(conflicts(&held, &lock(ofd, F_RDLCK, 2, 5, 20)));
        assert!(
            !conflicts(&held, &lock(posix, F_RDLCK, 1, 5, 20)),
            "same owner"
        );
        assert!(
            !conflicts(&held, &lock(posix, F_RDLCK, 2, 10, 20)),
            "disjoint"
        );
        assert!(
            !conflicts(&held, &lock(flock, F_WRLCK, 2, 0, OFFSET_MAX)),
            "flock apart"
        );
        assert!(!conflicts(
            &lock(posix, F_RDLCK, 1, 0, 9),
            &lock(posix, F_RDLCK, 2, 0, 9)
        ));
        let lease = lock(HeldKind::Lease, F_RDLCK, 1, 0, OFFSET_MAX);
        assert!(conflicts(
            &lease,
            &lock(HeldKind::Lease, F_WRLCK, 2, 0, OFFSET_MAX)
        ));
        assert!(!conflicts(
            &lease,
            &lock(HeldKind::Lease, F_RDLCK, 2, 0, OFFSET_MAX)
        ));
    }

    #[test]
    fn kinds_from_lists() {
        assert_eq!(
            held_kind(list::POSIX, fl_flags::FL_OFDLCK),
            Some(HeldKind::Lock(LockKind::Ofd))
        );
        assert_eq!(
            held_kind(list::LEASE, fl_flags::FL_LEASE),
            Some(HeldKind::Lease)
        );
        assert_eq!(held_kind(list::LEASE, fl_flags::FL_DELEG), None);
        assert_eq!(held_kind(list::UNSTABLE, 0), None);
    }
}
