//! `ckpt-user deleted`: deleted-but-open files with their holders and the bytes they
//! pin. By default from a scan of every fd and mapping at the call (exact as of the
//! call: ~15 ms per 1,000 processes here); with `--max-age`, from ckpt-agent's
//! background table when its last scan is at most that old. The agent's table also
//! says when each file was first seen deleted (and, with `ckpt-agent
//! --exact-deleted`, when it was unlinked). Sizes are refreshed from one holder each.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    os::unix::fs::MetadataExt as _,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{Array, Map, MapData};
use ckpt_common::{
    deleted::{scan, tag, DeletedKey, DeletedValue},
    names,
};
use serde::Serialize;

use super::scan::{path_of, scan_now};
use crate::{
    lock::KernelDev,
    sys::{map_batch, monotonic_ns},
    tracer::{
        iters::{unavailable_hint, Iters, Prog},
        pins::PinDir,
    },
};

#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord, Clone)]
#[serde(untagged)]
pub enum Holder {
    Fd {
        pid: u32,
        fd: u32,
    },
    /// A mapping ("start-end", hex) of a process without an fd on the file.
    Mapping {
        pid: u32,
        mapping: String,
    },
}

impl Holder {
    pub fn pid(&self) -> u32 {
        match self {
            Holder::Fd { pid, .. } | Holder::Mapping { pid, .. } => *pid,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct DeletedFile {
    pub dev: String,
    pub inode: u64,
    /// The last path it had (cut at 255 bytes when `path_cut`).
    pub path: String,
    pub path_cut: bool,
    pub size: i64,
    pub blocks: u64,
    /// Disk (or memory, on tmpfs) the file keeps allocated: blocks * 512.
    pub bytes: u64,
    pub nlink: u32,
    /// When it was unlinked (Unix time, seconds): the unlink ckpt-agent saw just before
    /// finding it deleted, with `ckpt-agent --exact-deleted` only; else None.
    pub unlinked_at: Option<f64>,
    /// When ckpt-agent first found it deleted (Unix time, seconds); None without an
    /// agent, or for a file deleted since its last background scan.
    pub first_seen: Option<f64>,
    pub holders: Vec<Holder>,
}

/// Holders of deleted files, as the table keeps them.
pub type Entries = Vec<(DeletedKey, DeletedValue)>;

/// Where `entries` took its answer from, and so which sizes may be stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A scan made by this call: sizes as of now, blocks as the inode counts them.
    ScannedNow,
    /// ckpt-agent's background table (`--max-age`): sizes as of its last rescan,
    /// which writes do not trigger.
    AgentTable,
}

/// ckpt-agent's table, when an agent runs.
pub struct AgentTable {
    scanned: Array<MapData, u64>,
    table: MapData,
}

fn open_map(pins: &PinDir, name: &str) -> Result<MapData> {
    let path = pins.map(name);
    MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
}

impl AgentTable {
    /// None when no agent runs on `pins`.
    pub fn open(pins: &PinDir) -> Result<Option<AgentTable>> {
        if !pins.agent_running() {
            return Ok(None);
        }
        Ok(Some(AgentTable {
            scanned: Array::try_from(Map::Array(open_map(pins, names::DELETED_SCAN)?))?,
            table: open_map(pins, names::DELETED)?,
        }))
    }

    /// How old the table is (None before its first scan).
    pub fn age(&self) -> Result<Option<Duration>> {
        let at = self.scanned.get(&scan::AT_NS, 0)?;
        Ok((at > 0).then(|| Duration::from_nanos(monotonic_ns().saturating_sub(at))))
    }

    pub fn read(&self) -> Result<Vec<(DeletedKey, DeletedValue)>> {
        map_batch::dump(std::os::fd::AsFd::as_fd(self.table.fd()))
    }
}

/// The entries `ckpt-user deleted` shows, and what to tell the reader (one line
/// each): the agent's table if it is at most `max_age` old, else a scan now, with
/// the agent's times for the files it knows.
pub fn entries(pins: &PinDir, max_age: Option<Duration>) -> Result<(Entries, Vec<String>, Source)> {
    let mut notes = Vec::new();
    let agent = AgentTable::open(pins).unwrap_or_else(|e| {
        notes.push(format!(
            "ckpt-agent's table cannot be read ({e:#}): no first-seen times"
        ));
        None
    });
    if let Some(max) = max_age {
        match agent.as_ref().map(AgentTable::age).transpose()?.flatten() {
            Some(age) if age <= max => {
                return Ok((
                    agent
                        .as_ref()
                        .map(AgentTable::read)
                        .transpose()?
                        .unwrap_or_default(),
                    notes,
                    Source::AgentTable,
                ))
            }
            Some(age) => notes.push(format!(
                "ckpt-agent's table is {} ms old (> --max-age): scanning now",
                age.as_millis()
            )),
            None => notes.push("no ckpt-agent table to use (--max-age): scanning now".into()),
        }
    }
    let iters = match Iters::open(pins, &[Prog::DeletedFds, Prog::DeletedMaps]) {
        Ok(i) => i,
        Err(e) => bail!(
            "cannot scan for deleted files: {}; as another user, `ls -l /proc/PID/fd` shows your own processes' deleted files",
            unavailable_hint(&e)
        ),
    };
    let mut now = scan_now(&iters)?;
    if let Some(t) = &agent {
        let times: HashMap<(u32, u64), (u64, u64)> = t
            .read()?
            .into_iter()
            .map(|(k, v)| ((k.dev, k.ino), (v.unlinked_ns, v.found_ns)))
            .collect();
        for (k, v) in &mut now {
            if let Some(&(unlinked, found)) = times.get(&(k.dev, k.ino)) {
                v.unlinked_ns = unlinked;
                v.found_ns = found;
            }
        }
    }
    Ok((now.into_iter().collect(), notes, Source::ScannedNow))
}

/// Groups holders by inode, keeping those `keep` accepts.
pub fn group(
    entries: &[(DeletedKey, DeletedValue)],
    keep: impl Fn(u32) -> bool,
) -> Vec<DeletedFile> {
    let now_mono = monotonic_ns();
    let now_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let mut by_inode: BTreeMap<(u32, u64), (DeletedFile, BTreeSet<Holder>)> = BTreeMap::new();
    for (k, v) in entries.iter().filter(|(k, _)| keep(k.pid)) {
        let (file, holders) = by_inode.entry((k.dev, k.ino)).or_insert_with(|| {
            (
                DeletedFile {
                    dev: KernelDev(k.dev).to_string(),
                    inode: k.ino,
                    path: String::new(),
                    path_cut: false,
                    size: v.size,
                    blocks: v.blocks,
                    bytes: v.blocks * 512,
                    nlink: v.nlink,
                    unlinked_at: (v.unlinked_ns > 0)
                        .then(|| now_wall - now_mono.saturating_sub(v.unlinked_ns) as f64 / 1e9),
                    first_seen: (v.found_ns > 0)
                        .then(|| now_wall - now_mono.saturating_sub(v.found_ns) as f64 / 1e9),
                    holders: Vec::new(),
                },
                BTreeSet::new(),
            )
        });
        // An fd's path beats a mapping's.
        if file.path.is_empty() || k.kind == tag::FD {
            let p = path_of(v);
            if !p.is_empty() {
                file.path = p;
                file.path_cut = v.path_cut != 0;
            }
        }
        holders.insert(if k.kind == tag::FD {
            Holder::Fd {
                pid: k.pid,
                fd: k.fd,
            }
        } else {
            Holder::Mapping {
                pid: k.pid,
                mapping: format!("{:x}-{:x}", k.start, v.end),
            }
        });
    }
    let mut out: Vec<DeletedFile> = by_inode
        .into_values()
        .map(|(mut f, h)| {
            f.holders = h.into_iter().collect();
            f
        })
        .collect();
    by_bytes(&mut out);
    out
}

/// Largest first (what pins the most disk), then by inode.
fn by_bytes(files: &mut [DeletedFile]) {
    files.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.inode.cmp(&b.inode)));
}

/// Size and blocks now, from one holder, with stat() through /proc's fd and
/// map_files links: nothing is opened, so nothing new holds the file (borrowing an
/// fd and closing it would itself trigger a rescan). From the agent's table every
/// file is looked at (writes do not trigger a rescan). After a scan made at the call,
/// only files whose blocks fall short of their size: the inode's i_blocks leaves out
/// blocks a filesystem has reserved but not yet allocated (ext4's delayed allocation:
/// a freshly written file shows 0), which its getattr adds; a file whose blocks cover
/// its size is right already (stat()ing all 10,000 of the views bench's took 120 ms).
/// Re-sorted by bytes, as `group` sorts.
pub fn refresh_sizes(files: &mut [DeletedFile], source: Source) {
    // A stat through /proc costs a few µs of path walk: 10,000 files took 50 ms on
    // one thread, so they are spread over the CPUs.
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let chunk = files.len().div_ceil(threads).max(REFRESH_CHUNK_MIN);
    std::thread::scope(|s| {
        for part in files.chunks_mut(chunk) {
            s.spawn(move || refresh_part(part, source));
        }
    });
    by_bytes(files);
}

/// Below this many files a part is not worth a thread.
const REFRESH_CHUNK_MIN: usize = 1024;

fn refresh_part(files: &mut [DeletedFile], source: Source) {
    let stale = |f: &DeletedFile| source == Source::AgentTable || f.bytes < f.size.max(0) as u64;
    for f in files.iter_mut().filter(|f| stale(f)) {
        let md = f.holders.iter().find_map(|h| {
            let link = match h {
                Holder::Fd { pid, fd } => format!("/proc/{pid}/fd/{fd}"),
                Holder::Mapping { pid, mapping } => format!("/proc/{pid}/map_files/{mapping}"),
            };
            std::fs::metadata(link).ok()
        });
        if let Some(md) = md {
            if md.ino() == f.inode {
                f.size = md.size() as i64;
                f.blocks = md.blocks();
                f.bytes = f.blocks * 512;
            }
        }
    }
}

fn human(bytes: u64) -> String {
    let units = ["B", "K", "M", "G", "T"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", units[u])
    }
}

pub fn render(files: &[DeletedFile]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let mut s = format!(
        "{:<8} {:>10} {:>8} {:>8} {:>10}  {:<24} PATH\n",
        "DEV", "INODE", "SIZE", "PINNED", "SEEN", "HOLDERS"
    );
    for f in files {
        let holders: Vec<String> = f
            .holders
            .iter()
            .map(|h| match h {
                Holder::Fd { pid, fd } => format!("{pid}/fd{fd}"),
                Holder::Mapping { pid, mapping } => format!("{pid}/map:{mapping}"),
            })
            .collect();
        let ago = f
            .unlinked_at
            .or(f.first_seen)
            .map(|t| format!("{:.0}s ago", (now - t).max(0.0)))
            .unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "{:<8} {:>10} {:>8} {:>8} {:>10}  {:<24} {}{}\n",
            f.dev,
            f.inode,
            human(f.size.max(0) as u64),
            human(f.bytes),
            ago,
            holders.join(","),
            f.path,
            if f.path_cut { "..." } else { "" }
        ));
    }
    let total: u64 = files.iter().map(|f| f.bytes).sum();
    s.push_str(&format!(
        "{} deleted files pin {}\n",
        files.len(),
        human(total)
    ));
    s
}
