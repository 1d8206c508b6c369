//! The consistency check run before anything is touched: every file the image had open
//! must still be the file it was (same inode on the same filesystem when restoring on
//! the host that dumped it) with the same size, modification time and, when the dump
//! recorded one, SHA-256. A changed file stops the restore, naming the file and what
//! changed, unless --force (then every difference is still printed).

use std::{
    collections::HashMap,
    fs::File,
    os::{
        fd::OwnedFd,
        unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _},
    },
};

use anyhow::{bail, Result};
use sha2::{Digest, Sha256};

use crate::{
    image::format::{Fingerprint, Image},
    lock::KernelDev,
    sys::pidfd,
};

/// The identity a path had when it was checked; the restore compares every file it
/// opens against it, so a file swapped in between is never used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
}

impl Identity {
    pub fn of(md: &std::fs::Metadata) -> Identity {
        Identity {
            dev: md.dev(),
            ino: md.ino(),
        }
    }
}

pub struct Checked {
    /// By path.
    pub identities: HashMap<String, Identity>,
    /// Files whose name was removed while another link keeps them, opened (O_PATH) by
    /// file handle, by (device, inode) as the image names them.
    pub by_handle: HashMap<(KernelDev, u64), OwnedFd>,
    /// Differences accepted with --force.
    pub warnings: Vec<String>,
}

/// What differs between a fingerprint and the file now at its path (None: the same).
fn differences(fp: &Fingerprint, md: &std::fs::Metadata, same_host: bool) -> Vec<String> {
    let mut out = Vec::new();
    if !md.is_file() {
        out.push("is no longer a regular file".to_string());
        return out;
    }
    let dev = KernelDev::from_st_dev(md.dev());
    if same_host && (dev != fp.dev || md.ino() != fp.ino) {
        out.push(format!(
            "now names a different file (inode {} on {} was open, the path now leads to inode {} on {})",
            fp.ino, fp.dev, md.ino(), dev
        ));
    }
    if md.size() != fp.size {
        out.push(format!(
            "size changed from {} to {} bytes",
            fp.size,
            md.size()
        ));
    }
    let mtime = md.mtime() * 1_000_000_000 + md.mtime_nsec();
    if mtime != fp.mtime_ns {
        out.push(format!(
            "modified since the checkpoint (mtime {} -> {})",
            fmt_ns(fp.mtime_ns),
            fmt_ns(mtime)
        ));
    }
    out
}

fn fmt_ns(ns: i64) -> String {
    format!(
        "{}.{:09}",
        ns.div_euclid(1_000_000_000),
        ns.rem_euclid(1_000_000_000)
    )
}

/// The SHA-256 of a whole file, read with pread: a description shared with another
/// process (a pidfd_getfd dup at the dump) keeps its file position.
pub fn sha256(file: &File) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    loop {
        let n = match file.read_at(&mut buf, at) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hex::encode(h.finalize()))
}

/// Checks every fingerprint. Opening a file to hash it could break a lease of a
/// process that still runs, so hashing opens with O_NONBLOCK and reports that.
pub fn check(image: &Image, force: bool) -> Result<Checked> {
    let same_host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy() == image.hostname)
        .unwrap_or(false);
    let mut identities = HashMap::new();
    let mut by_handle = HashMap::new();
    let mut warnings = Vec::new();
    let mut problems = Vec::new();
    for fp in &image.fingerprints {
        if fp.unlinked {
            let fd = reopen_by_handle(fp, same_host)?;
            let md = File::from(fd.try_clone()?).metadata()?;
            for d in differences(fp, &md, same_host) {
                problems.push(format!("{}: {d}", fp.path));
            }
            by_handle.insert((fp.dev, fp.ino), fd);
            continue;
        }
        let md = match std::fs::metadata(&fp.path) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("{}: missing (it was open at the checkpoint)", fp.path)
            }
            Err(e) => bail!("{}: {e}", fp.path),
        };
        let mut diffs = differences(fp, &md, same_host);
        if diffs.is_empty() && same_host {
            // Same inode number, but is it the same file? Compare file handles (they
            // carry a generation number that changes when an inode is reused).
            // O_PATH: no open for reading, so no lease of a running process is broken.
            let opened = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH)
                .open(&fp.path)
                .map(OwnedFd::from);
            if let (Some(want), Ok(f)) = (&fp.handle, opened) {
                if pidfd::file_handle(&f).is_some_and(|now| &now != want) {
                    diffs.push("now names a different file (its file handle changed)".into());
                }
            }
        }
        if diffs.is_empty() {
            if let Some(want) = &fp.sha256 {
                let got = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&fp.path)
                    .and_then(|f| sha256(&f));
                match got {
                    Ok(got) if &got == want => {}
                    Ok(_) => diffs.push("contents changed (SHA-256 differs)".into()),
                    Err(e) => bail!("{}: cannot read it to check its SHA-256: {e}", fp.path),
                }
            }
        }
        for d in diffs {
            problems.push(format!("{}: {d}", fp.path));
        }
        identities.insert(fp.path.clone(), Identity::of(&md));
    }
    if !problems.is_empty() {
        if !force {
            let more = match problems.len() {
                1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            };
            bail!(
                "{}{more}; nothing was restored (--force restores anyway)",
                problems[0]
            );
        }
        warnings.extend(problems.into_iter().map(|p| format!("--force: {p}")));
    }
    Ok(Checked {
        identities,
        by_handle,
        warnings,
    })
}

/// Finds a file whose name was removed (another link keeps it) by its file handle, on
/// the filesystem of the nearest directory above its old name that still exists. The
/// handle carries the inode's generation, so a reused inode number does not match.
fn reopen_by_handle(fp: &Fingerprint, same_host: bool) -> Result<OwnedFd> {
    let gone = format!(
        "{}: its name was removed while another link kept it open",
        fp.path
    );
    let Some(handle) = fp.handle.as_ref().filter(|_| same_host) else {
        bail!("{gone}; it can only be found again by file handle, on the host that dumped it");
    };
    let mut dir = std::path::Path::new(&fp.path);
    let anchor = loop {
        dir = match dir.parent() {
            Some(d) => d,
            None => bail!("{gone}; no directory above it is left"),
        };
        if let Ok(md) = std::fs::metadata(dir) {
            if md.is_dir() && KernelDev::from_st_dev(md.dev()) == fp.dev {
                break dir;
            }
        }
    };
    // Not O_PATH: open_by_handle_at refuses an O_PATH mount fd (EBADF).
    let on = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(anchor)
        .map(OwnedFd::from)?;
    pidfd::open_by_handle(&on, handle).map_err(|e| match e.raw_os_error() {
        Some(libc::ESTALE) => anyhow::anyhow!("{gone}, and the file is gone now"),
        _ => anyhow::anyhow!("{gone}; opening it by file handle: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_difference_is_named() {
        let dir = std::env::temp_dir().join(format!("ckpt-validate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, b"hello").unwrap();
        let md = std::fs::metadata(&p).unwrap();
        let fp = Fingerprint {
            path: p.display().to_string(),
            dev: KernelDev::from_st_dev(md.dev()),
            ino: md.ino(),
            size: 5,
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            ctime_ns: 0,
            handle: None,
            sha256: None,
            unlinked: false,
        };
        assert!(differences(&fp, &md, true).is_empty());
        let grown = Fingerprint {
            size: 4,
            ..fp.clone()
        };
        assert_eq!(
            differences(&grown, &md, true),
            vec!["size changed from 4 to 5 bytes"]
        );
        let other = Fingerprint {
            ino: fp.ino + 1,
            ..fp.clone()
        };
        assert!(differences(&other, &md, true)[0].starts_with("now names a different file"));
        // Another host: inode numbers say nothing.
        assert!(differences(&other, &md, false).is_empty());
        let older = Fingerprint {
            mtime_ns: 1,
            ..fp.clone()
        };
        assert!(differences(&older, &md, true)[0].starts_with("modified since"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
