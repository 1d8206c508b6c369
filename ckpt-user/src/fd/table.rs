//! The fd tables of the dumped processes from the task_file iterator programs
//! (`ckpt-ebpf/src/files.rs`, loaded by `tracer::iters`): per fd, what /proc/PID/fd, fdinfo and fstat
//! would show, plus the kernel identities of the open file description and of the fd
//! table (the owners of OFD/flock and of POSIX locks); per process, what status, comm
//! and cwd would show.
//!
//! One link per process (iterator parameters, Linux 6.1+), created ahead of the
//! frozen window; inside it the processes are read in parallel, one thread per CPU,
//! since the kernel's share (about 1 us per fd, mostly cache misses on struct file and
//! inode) is the window's largest part.

use std::{
    collections::HashMap,
    os::fd::{AsFd as _, OwnedFd},
};

use anyhow::{bail, Context as _, Result};
use ckpt_common::files::{
    list, tag, FdRecord, LockLine, TaskRecord, FD_RECORD_SIZE, LOCK_LINE_SIZE, TASK_RECORD_SIZE,
};

use crate::{
    sys::bpf_iter,
    tracer::iters::{Iters, Prog},
};

/// One fd as the iterator saw it.
#[derive(Clone, Debug)]
pub struct IterFd {
    pub rec: FdRecord,
    /// `d_path` of the file (None when not asked for or too long).
    pub path: Option<String>,
    /// The locks and leases fdinfo would list for this fd.
    pub locks: Vec<LockLine>,
    /// The inode's lock lists were too long to walk, or changed under the walk: read
    /// fdinfo instead.
    pub locks_truncated: bool,
}

/// One process as a read saw it.
#[derive(Debug, Default)]
pub struct ProcessFds {
    pub pid: u32,
    /// None when it has no fds (or is gone).
    pub task: Option<TaskRecord>,
    /// In fd order.
    pub fds: Vec<IterFd>,
}

/// What one read of several processes gives, kept per process: merging 10,000
/// records into one vector cost ~2 ms of the frozen window.
#[derive(Debug, Default)]
pub struct TableRead {
    /// By pid.
    pub processes: Vec<ProcessFds>,
}

impl TableRead {
    pub fn fds(&self) -> impl Iterator<Item = &IterFd> {
        self.processes.iter().flat_map(|p| &p.fds)
    }

    pub fn task(&self, pid: u32) -> Option<&TaskRecord> {
        let i = self.processes.binary_search_by_key(&pid, |p| p.pid).ok()?;
        self.processes[i].task.as_ref()
    }
}

/// Most threads reading at once: the work is the kernel's, per CPU.
const MAX_READERS: usize = 8;

pub struct FdTable<'a> {
    iters: &'a Iters,
    links: HashMap<(u32, bool), OwnedFd>,
}

fn prog(paths: bool) -> Prog {
    if paths {
        Prog::TaskFilesPaths
    } else {
        Prog::TaskFiles
    }
}

impl<'a> FdTable<'a> {
    /// Uses the loaded task_file iterators; an error means this kernel cannot aim an
    /// iterator at one process.
    pub fn open(iters: &'a Iters) -> Result<FdTable<'a>> {
        let mut table = FdTable {
            iters,
            links: HashMap::new(),
        };
        table
            .prepare([std::process::id()], false)
            .context("this kernel cannot aim a task_file iterator at one process (Linux 6.1+)")?;
        Ok(table)
    }

    /// Creates the links that reading `pids` will use (cheap to keep; creating them
    /// ahead keeps that work out of the frozen window).
    pub fn prepare(&mut self, pids: impl IntoIterator<Item = u32>, paths: bool) -> Result<()> {
        for pid in pids {
            if !self.links.contains_key(&(pid, paths)) {
                let link = bpf_iter::link_for_process(self.iters.prog(prog(paths))?, pid)
                    .with_context(|| {
                        format!("creating an fd-table iterator link for process {pid} (one fd per process: is the open-file limit too low?)")
                    })?;
                self.links.insert((pid, paths), link);
            }
        }
        Ok(())
    }

    /// Closes the links that read paths (after the prescan: inside the window only
    /// processes that joined since need them).
    pub fn forget_path_links(&mut self) {
        self.links.retain(|(_, paths), _| !paths);
    }

    /// Reads the fd tables of `wanted` (pid, with paths), through links made by
    /// `prepare`, spread over one thread per CPU. A process that is gone reads as no
    /// fds and no record.
    pub fn read(&self, wanted: &[(u32, bool)]) -> Result<TableRead> {
        Ok(self.read_then(wanted, |_| Ok(()), || ())?.0)
    }

    /// `read`, with `then` run on each process by the thread that read it, while its
    /// records are fresh in that CPU's cache (results in pid order), and `alongside`
    /// run on the calling thread meanwhile (its result returned as is).
    pub fn read_then<R: Send, A>(
        &self,
        wanted: &[(u32, bool)],
        then: impl Fn(&ProcessFds) -> Result<R> + Sync,
        alongside: impl FnOnce() -> A,
    ) -> Result<(TableRead, Vec<R>, A)> {
        if let Some((pid, _)) = wanted.iter().find(|k| !self.links.contains_key(k)) {
            bail!("no fd-table iterator link was prepared for process {pid}");
        }
        let readers = std::thread::available_parallelism()
            .map_or(1, std::num::NonZero::get)
            .clamp(1, MAX_READERS)
            .min(wanted.len().max(1));
        let links = &self.links;
        let read_some = |mine: Vec<(u32, bool)>| -> Result<Vec<(ProcessFds, R)>> {
            let mut buf = Vec::with_capacity(1 << 16);
            let mut out = Vec::with_capacity(mine.len());
            for key in mine {
                buf.clear();
                bpf_iter::read_into(links[&key].as_fd(), &mut buf)
                    .with_context(|| format!("reading the fd table of {}", key.0))?;
                let p = parse(&buf, key.0)?;
                let r = then(&p)?;
                out.push((p, r));
            }
            Ok(out)
        };
        // Interleaved shares: neighbouring pids often hold similar numbers of fds.
        let shares: Vec<Vec<(u32, bool)>> = (0..readers)
            .map(|i| wanted.iter().skip(i).step_by(readers).copied().collect())
            .collect();
        let (mut processes, beside) = std::thread::scope(|s| {
            let handles: Vec<_> = shares
                .into_iter()
                .map(|share| s.spawn(|| read_some(share)))
                .collect();
            let beside = alongside();
            let mut all = Vec::new();
            for h in handles {
                all.extend(h.join().expect("fd-table reader panicked")?);
            }
            Ok::<_, anyhow::Error>((all, beside))
        })?;
        processes.sort_unstable_by_key(|(p, _)| p.pid);
        let (processes, results) = processes.into_iter().unzip();
        Ok((TableRead { processes }, results, beside))
    }
}

fn read_tag(buf: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(..4)?.try_into().ok()?))
}

/// Splits the iterator's output for process `pid` into records: the process, each
/// fd and its path, then the fd's lock lines.
pub fn parse(mut buf: &[u8], pid: u32) -> Result<ProcessFds> {
    let mut out = ProcessFds {
        pid,
        task: None,
        fds: Vec::with_capacity(buf.len() / FD_RECORD_SIZE),
    };
    while !buf.is_empty() {
        match read_tag(buf) {
            Some(tag::FD) if buf.len() >= FD_RECORD_SIZE => {
                // SAFETY: FdRecord is plain data of FD_RECORD_SIZE bytes; any bit
                // pattern is a valid value.
                let rec: FdRecord =
                    unsafe { std::ptr::read_unaligned(buf.as_ptr() as *const FdRecord) };
                let len = rec.path_len as usize;
                let Some(raw) = buf.get(FD_RECORD_SIZE..FD_RECORD_SIZE + len) else {
                    bail!("task_file iterator output truncated in a path");
                };
                let path = (len > 0).then(|| {
                    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                    String::from_utf8_lossy(&raw[..end]).into_owned()
                });
                out.fds.push(IterFd {
                    rec,
                    path,
                    locks: Vec::new(),
                    locks_truncated: false,
                });
                buf = &buf[FD_RECORD_SIZE + len..];
            }
            Some(tag::LOCK) if buf.len() >= LOCK_LINE_SIZE => {
                // SAFETY: as above, for LockLine.
                let line: LockLine =
                    unsafe { std::ptr::read_unaligned(buf.as_ptr() as *const LockLine) };
                let Some(fd) = out.fds.last_mut() else {
                    bail!("task_file iterator output: a lock line before any fd");
                };
                if line.list == list::TRUNCATED || line.list == list::UNSTABLE {
                    fd.locks_truncated = true;
                } else {
                    fd.locks.push(line);
                }
                buf = &buf[LOCK_LINE_SIZE..];
            }
            Some(tag::TASK) if buf.len() >= TASK_RECORD_SIZE => {
                // SAFETY: as above, for TaskRecord.
                let task: TaskRecord =
                    unsafe { std::ptr::read_unaligned(buf.as_ptr() as *const TaskRecord) };
                out.task = Some(task);
                buf = &buf[TASK_RECORD_SIZE..];
            }
            _ => bail!("task_file iterator output truncated or garbled"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T>(rec: &T, tail: &[u8]) -> Vec<u8> {
        // SAFETY: reading a plain-data struct as bytes.
        let raw = unsafe {
            std::slice::from_raw_parts(rec as *const T as *const u8, std::mem::size_of::<T>())
        };
        let mut v = raw.to_vec();
        v.extend_from_slice(tail);
        v
    }

    #[test]
    fn records_paths_and_lock_lines() {
        let a = FdRecord {
            tag: tag::FD,
            tgid: 7,
            fd: 3,
            path_len: 8,
            ..Default::default()
        };
        let b = FdRecord {
            tag: tag::FD,
            tgid: 7,
            fd: 4,
            ..Default::default()
        };
        let lock = LockLine {
            tag: tag::LOCK,
            list: list::FLOCK,
            start: 0,
            end: i64::MAX,
            ..Default::default()
        };
        let cut = LockLine {
            tag: tag::LOCK,
            list: list::TRUNCATED,
            ..Default::default()
        };
        let task = TaskRecord {
            tag: tag::TASK,
            tgid: 7,
            ppid: 1,
            ..Default::default()
        };
        let mut buf = bytes(&task, b"");
        buf.extend(bytes(&a, b"/tmp/x\0\0"));
        buf.extend(bytes(&lock, b""));
        buf.extend(bytes(&b, b""));
        buf.extend(bytes(&cut, b""));
        let parsed = |buf: &[u8]| parse(buf, 7);
        let got = parsed(&buf).unwrap();
        assert_eq!(got.task, Some(task));
        let got = got.fds;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].path.as_deref(), Some("/tmp/x"));
        assert_eq!(got[0].locks, vec![lock]);
        assert!(!got[0].locks_truncated);
        assert_eq!(got[1].rec.fd, 4);
        assert_eq!(got[1].path, None);
        assert!(got[1].locks.is_empty() && got[1].locks_truncated);
        assert!(parsed(&buf[..buf.len() - 1]).is_err());
        assert!(parsed(&bytes(&a, b"/tmp")).is_err());
        assert!(parsed(&bytes(&lock, b"")).is_err());
        assert!(parsed(&bytes(&task, b"")[..TASK_RECORD_SIZE - 1]).is_err());
    }
}
