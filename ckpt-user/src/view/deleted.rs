//! `ckpt-user deleted`: deleted-but-open files with their holders and the bytes they
//! pin, from the agent's `DELETED` table. The table is read after a barrier (the agent
//! has scanned since every trigger made before the call), so the answer is as of the
//! call; sizes are refreshed from one holder each, since writes do not trigger scans.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{Array, Map, MapData, PerCpuArray};
use ckpt_common::{
    deleted::{scan, tag, DeletedKey, DeletedValue},
    names,
};
use serde::Serialize;

use crate::{
    agent::deleted_table::generation,
    deleted::path_of,
    locks::KernelDev,
    sys::map_batch,
    tracer::pins::PinDir,
    view::live::{self, monotonic_ns},
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
    /// When it was unlinked (Unix time, seconds): the unlink the agent saw just before
    /// finding it deleted. None: deleted before the agent started.
    pub unlinked_at: Option<f64>,
    pub holders: Vec<Holder>,
}

pub struct DeletedMaps {
    triggers: PerCpuArray<MapData, u64>,
    scanned: Array<MapData, u64>,
    table: MapData,
}

/// A map of the deleted-file table: only agents since it was added pin it.
fn open_map(pins: &PinDir, name: &str) -> Result<MapData> {
    live::open_map(pins, name)
        .context("an agent older than the deleted-file table? restart ckpt-agent")
}

impl DeletedMaps {
    pub fn open(pins: &PinDir) -> Result<DeletedMaps> {
        if !pins.agent_running() {
            bail!(
                "ckpt-agent is not running (no agent holds {}); `lsof +L1` scans /proc instead",
                pins.agent_lock_file().display()
            );
        }
        Ok(DeletedMaps {
            triggers: PerCpuArray::try_from(Map::PerCpuArray(open_map(
                pins,
                names::FILE_TRIGGERS,
            )?))?,
            scanned: Array::try_from(Map::Array(open_map(pins, names::DELETED_SCAN)?))?,
            table: open_map(pins, names::DELETED)?,
        })
    }

    /// Waits until the agent has scanned since every trigger made before this call
    /// (asking it to, rather than waiting for its background pace).
    pub fn barrier(&mut self, timeout: Duration) -> Result<()> {
        let (want, _) = generation(&self.triggers)?;
        if self.scanned.get(&scan::DONE, 0)? >= want {
            return Ok(());
        }
        if self.scanned.get(&scan::WANTED, 0)? < want {
            self.scanned.set(scan::WANTED, want, 0)?;
        }
        let deadline = Instant::now() + timeout;
        while self.scanned.get(&scan::DONE, 0)? < want {
            if Instant::now() > deadline {
                bail!(
                    "ckpt-agent has not rescanned deleted files within {timeout:?}; is it stuck?"
                );
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(())
    }

    pub fn read(&self) -> Result<Vec<(DeletedKey, DeletedValue)>> {
        map_batch::dump(std::os::fd::AsFd::as_fd(self.table.fd()))
    }
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
    out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.inode.cmp(&b.inode)));
    out
}

/// Size and blocks now, from one holder (writes do not trigger a rescan), with
/// stat() through /proc's fd and map_files links: nothing is opened, so nothing new
/// holds the file (borrowing an fd and closing it would itself trigger a rescan).
pub fn refresh_sizes(files: &mut [DeletedFile]) {
    for f in files {
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
        "DEV", "INODE", "SIZE", "PINNED", "UNLINKED", "HOLDERS"
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
            .map(|t| format!("{:.0}s ago", (now - t).max(0.0)))
            .unwrap_or_else(|| "before".into());
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
