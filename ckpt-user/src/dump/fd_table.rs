//! The fd tables of the dumped processes in one read of the agent's pinned task_file
//! iterator (`ckpt-ebpf/src/files.rs`): per fd, what /proc/PID/fd, fdinfo and fstat
//! would show, plus the kernel identities of the open file description and of the fd
//! table (the owners of OFD/flock and of POSIX locks).
//!
//! The iterator walks every process but emits only those named in the pinned
//! `FD_FILTER` map; each dump adds its processes and removes them when done.

use std::{io::Read as _, path::PathBuf};

use anyhow::{bail, Context as _, Result};
use aya::maps::{HashMap, Map, MapData};
use ckpt_common::{
    files::{filter, list, tag, FdRecord, LockLine, FD_RECORD_SIZE, LOCK_LINE_SIZE},
    names,
};

use crate::tracer::pins::PinDir;

/// One fd as the iterator saw it.
#[derive(Clone, Debug)]
pub struct IterFd {
    pub rec: FdRecord,
    /// `d_path` of the file (None when not asked for or too long).
    pub path: Option<String>,
    /// The locks and leases fdinfo would list for this fd.
    pub locks: Vec<LockLine>,
    /// The inode's lock lists were too long to walk: read fdinfo instead.
    pub locks_truncated: bool,
}

pub struct FdTable {
    link: PathBuf,
    filter: HashMap<MapData, u32, u32>,
    /// Processes this dump added to the filter (removed on drop).
    added: Vec<u32>,
}

impl FdTable {
    /// Opens the agent's iterator; an error means this agent predates it.
    pub fn open(pins: &PinDir) -> Result<FdTable> {
        let link = pins.links_dir().join(names::TASK_FILES);
        if !link.exists() {
            bail!(
                "the agent has no fd-table iterator ({} missing): restart ckpt-agent",
                link.display()
            );
        }
        let path = pins.map(names::FD_FILTER);
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(FdTable {
            link,
            filter: HashMap::try_from(Map::LruHashMap(data))?,
            added: Vec::new(),
        })
    }

    /// Asks for `pids`' fds (`mode`: a `files::filter` value) from now on.
    pub fn watch(&mut self, pids: impl IntoIterator<Item = u32>, mode: u32) -> Result<()> {
        for pid in pids {
            self.filter
                .insert(pid, mode, 0)
                .context("adding a process to the iterator's filter")?;
            self.added.push(pid);
        }
        Ok(())
    }

    /// Stops asking for `pid`'s fds.
    pub fn unwatch(&mut self, pid: u32) {
        let _ = self.filter.remove(&pid);
        self.added.retain(|p| *p != pid);
    }

    /// Runs the iterator once: every fd of every watched process (of any dump).
    pub fn read(&self) -> Result<Vec<IterFd>> {
        let mut f = std::fs::File::open(&self.link)
            .with_context(|| format!("opening {}", self.link.display()))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .context("reading the task_file iterator")?;
        parse(&buf)
    }
}

impl Drop for FdTable {
    fn drop(&mut self) {
        for pid in &self.added {
            let _ = self.filter.remove(pid);
        }
    }
}

fn read_tag(buf: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(..4)?.try_into().ok()?))
}

/// Splits the iterator's output into records: each fd, its path, then its lock lines.
pub fn parse(mut buf: &[u8]) -> Result<Vec<IterFd>> {
    let mut out: Vec<IterFd> = Vec::new();
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
                out.push(IterFd {
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
                let Some(fd) = out.last_mut() else {
                    bail!("task_file iterator output: a lock line before any fd");
                };
                if line.list == list::TRUNCATED {
                    fd.locks_truncated = true;
                } else {
                    fd.locks.push(line);
                }
                buf = &buf[LOCK_LINE_SIZE..];
            }
            _ => bail!("task_file iterator output truncated or garbled"),
        }
    }
    Ok(out)
}

pub use filter::{FULL, NO_PATH};

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
        let mut buf = bytes(&a, b"/tmp/x\0\0");
        buf.extend(bytes(&lock, b""));
        buf.extend(bytes(&b, b""));
        buf.extend(bytes(&cut, b""));
        let got = parse(&buf).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].path.as_deref(), Some("/tmp/x"));
        assert_eq!(got[0].locks, vec![lock]);
        assert!(!got[0].locks_truncated);
        assert_eq!(got[1].rec.fd, 4);
        assert_eq!(got[1].path, None);
        assert!(got[1].locks.is_empty() && got[1].locks_truncated);
        assert!(parse(&buf[..buf.len() - 1]).is_err());
        assert!(parse(&bytes(&a, b"/tmp")).is_err());
        assert!(parse(&bytes(&lock, b"")).is_err());
    }
}
