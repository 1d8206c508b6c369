//! Reading an image. Every reader must survive any bytes: the checksum proves only
//! that an image is whole (anyone can recompute it), so every offset and length is
//! checked with overflow-checked arithmetic against the file's real size before it is
//! used, nothing is allocated beyond what the file holds, and the ghost extents that
//! restore will read are proven to lie in the data area. A newer format version, a
//! wrong magic, a truncated or corrupt file: one clear error, never a panic.
//!
//! The MAC (format 2) is checked in the same pass as the checksum, against the host key
//! when one is given; [`Auth`] says what was found. Refusing an unauthenticated image
//! is the caller's decision (restore refuses, inspect reports).

use std::{fs::File, io::Read, os::unix::fs::FileExt as _, path::Path};

use anyhow::{bail, Context as _, Result};
use hmac::Mac as _;
use sha2::{Digest, Sha256};

use super::{
    format::{trailer_len, Ghost, Image, HEADER_LEN, MAGIC, VERSION},
    key::{HostKey, KEY_ID_LEN},
};

/// Whether an image was made with the host key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    /// Its MAC verifies with the host key.
    Verified { key_id: String },
    /// Format 1: made before images carried a MAC.
    Unsigned,
    /// MAC'd with another key (e.g. another host's, not shared with this one).
    OtherKey { image_key: String, host_key: String },
    /// Names the host key but its MAC does not match: altered or forged.
    Forged { key_id: String },
    /// No host key was given to check it with.
    NotChecked { image_key: String },
}

impl Auth {
    pub fn verified(&self) -> bool {
        matches!(self, Auth::Verified { .. })
    }

    /// One line for inspect.
    pub fn describe(&self) -> String {
        match self {
            Auth::Verified { key_id } => format!("verified (host key {key_id})"),
            Auth::Unsigned => "none (format 1 image, made before images carried a MAC)".into(),
            Auth::OtherKey {
                image_key,
                host_key,
            } => format!("NOT verified: made with key {image_key}, this host's key is {host_key}"),
            Auth::Forged { key_id } => {
                format!("FAILED: the MAC does not match host key {key_id} (altered or forged)")
            }
            Auth::NotChecked { image_key } => {
                format!("not checked (no host key readable; made with key {image_key})")
            }
        }
    }
}

pub struct ImageReader {
    file: File,
    pub image: Image,
    pub version: u32,
    pub auth: Auth,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

impl ImageReader {
    /// Opens and verifies an image; `key` checks its MAC (see [`Auth`]).
    pub fn open(path: &Path, key: Option<&HostKey>) -> Result<ImageReader> {
        let name = path.display();
        let file = File::open(path).with_context(|| format!("opening {name}"))?;
        let md = file.metadata()?;
        if !md.is_file() {
            bail!("{name}: not a ckpt image (not a regular file)");
        }
        let len = md.len();
        let mut header = [0u8; HEADER_LEN as usize];
        if len < HEADER_LEN || file.read_exact_at(&mut header, 0).is_err() {
            bail!("{name}: not a ckpt image (too short: {len} bytes)");
        }
        if &header[..8] != MAGIC {
            bail!("{name}: not a ckpt image (bad magic)");
        }
        let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
        if version > VERSION {
            bail!("{name}: image format version {version} is newer than this ckpt-user supports ({VERSION}); use a newer ckpt-user");
        }
        let Some(tlen) = trailer_len(version) else {
            bail!("{name}: not a ckpt image (unknown format version {version})");
        };
        if len < HEADER_LEN + tlen {
            bail!("{name}: image is truncated (too short: {len} bytes)");
        }
        // One pass: the checksum over everything before it, the MAC over everything
        // before the MAC (format 2).
        let body = len - 32;
        let mac_end = body - 32;
        let mut hash = Sha256::new();
        let mut mac = key.map(HostKey::mac);
        let mut at = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        let mut reader = (&file).take(body);
        while at < body {
            let n = reader
                .read(&mut buf)
                .with_context(|| format!("reading {name}"))?;
            if n == 0 {
                bail!("{name}: image is truncated (it shrank while being read)");
            }
            let chunk = &buf[..n];
            hash.update(chunk);
            if let Some(m) = &mut mac {
                if version >= 2 && at < mac_end {
                    let upto = (mac_end - at).min(n as u64) as usize;
                    m.update(&chunk[..upto]);
                }
            }
            at += n as u64;
        }
        let mut trailer = vec![0u8; tlen as usize];
        file.read_exact_at(&mut trailer, len - tlen)
            .with_context(|| format!("{name}: image is truncated"))?;
        if hash.finalize().as_slice() != &trailer[trailer.len() - 32..] {
            bail!("{name}: image is corrupt or truncated (checksum mismatch)");
        }
        let meta_offset = u64_at(&trailer, 0);
        let meta_len = u64_at(&trailer, 8);
        // Checked arithmetic: an offset near 2^64 must not wrap onto the trailer. The
        // metadata then lies inside the file, so its length is bounded by the file's.
        let meta_end = meta_offset.checked_add(meta_len);
        if meta_offset < HEADER_LEN || meta_end != Some(len - tlen) {
            bail!("{name}: image is corrupt (bad metadata location)");
        }
        let auth = if version < 2 {
            Auth::Unsigned
        } else {
            let image_key: [u8; KEY_ID_LEN] = trailer[16..16 + KEY_ID_LEN].try_into().unwrap();
            let tag = &trailer[16 + KEY_ID_LEN..16 + KEY_ID_LEN + 32];
            match (key, mac) {
                (Some(k), _) if k.id() != image_key => Auth::OtherKey {
                    image_key: hex::encode(image_key),
                    host_key: k.id_hex(),
                },
                (Some(k), Some(m)) => match m.verify_slice(tag) {
                    Ok(()) => Auth::Verified { key_id: k.id_hex() },
                    Err(_) => Auth::Forged { key_id: k.id_hex() },
                },
                _ => Auth::NotChecked {
                    image_key: hex::encode(image_key),
                },
            }
        };
        let mut meta = Vec::new();
        meta.try_reserve_exact(meta_len as usize)
            .with_context(|| format!("{name}: no memory for {meta_len} bytes of metadata"))?;
        meta.resize(meta_len as usize, 0);
        file.read_exact_at(&mut meta, meta_offset)
            .with_context(|| format!("{name}: image is truncated"))?;
        let image: Image = rmp_serde::from_slice(&meta)
            .with_context(|| format!("{name}: image metadata is corrupt"))?;
        check_ghosts(&image, meta_offset).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        Ok(ImageReader {
            file,
            image,
            version,
            auth,
        })
    }

    /// Calls `f(file_offset, bytes)` for each data extent of a ghost file, in pieces.
    /// `open` proved that the extents lie in the image's data area.
    pub fn ghost_data(&self, g: &Ghost, mut f: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        let mut at = g.data_offset;
        let mut buf = vec![0u8; 1 << 20];
        for &(off, len) in &g.extents {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                self.file.read_exact_at(&mut buf[..n], at)?;
                f(off + done, &buf[..n])?;
                at += n as u64;
                done += n as u64;
            }
        }
        Ok(())
    }
}

/// Largest file offset (loff_t).
const MAX_FILE_OFFSET: u64 = i64::MAX as u64;

/// Every ghost's bytes lie between the header and the metadata, and every extent and
/// size is a valid file offset, so `ghost_data` and the restore's writes never
/// overflow or read outside the data area.
fn check_ghosts(image: &Image, data_end: u64) -> Result<()> {
    for g in &image.ghosts {
        let bad = || {
            anyhow::anyhow!(
                "image is corrupt: the saved contents of deleted file {:?} lie outside the image",
                g.path
            )
        };
        let mut total = 0u64;
        for &(off, len) in &g.extents {
            total = total.checked_add(len).ok_or_else(bad)?;
            if off.checked_add(len).is_none_or(|e| e > MAX_FILE_OFFSET) {
                return Err(bad());
            }
        }
        if g.size > MAX_FILE_OFFSET
            || g.data_offset < HEADER_LEN
            || g.data_offset
                .checked_add(total)
                .is_none_or(|e| e > data_end)
        {
            return Err(bad());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{format::Process, writer::ImageWriter};

    pub(crate) fn test_key() -> HostKey {
        HostKey::from_bytes([7; 32], "/nonexistent/test.key".into())
    }

    fn sample() -> Image {
        Image {
            id: "abc".into(),
            cgroup: "/sys/fs/cgroup/job".into(),
            processes: vec![Process {
                pid: 7,
                comm: "x".into(),
                ..Default::default()
            }],
            ghosts: vec![Ghost {
                ino: 9,
                extents: vec![(0, 5), (4096, 3)],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn write(dir: &Path) -> std::path::PathBuf {
        let target = dir.join("img");
        let mut w = ImageWriter::create(&target, &test_key()).unwrap();
        let mut img = sample();
        img.ghosts[0].data_offset = w.offset();
        w.write(b"hello").unwrap();
        w.write(b"end").unwrap();
        w.finish(&img).unwrap()
    }

    fn tmpdir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ckpt-img-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_with_ghost_data_and_mode_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tmpdir();
        let p = write(&d);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let r = ImageReader::open(&p, Some(&test_key())).unwrap();
        assert!(r.auth.verified(), "{:?}", r.auth);
        assert_eq!(r.image, {
            let mut i = sample();
            i.ghosts[0].data_offset = HEADER_LEN;
            i
        });
        let mut got = Vec::new();
        r.ghost_data(&r.image.ghosts[0], |off, b| {
            got.push((off, b.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(got, vec![(0, b"hello".to_vec()), (4096, b"end".to_vec())]);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn corruption_truncation_magic_and_version_are_refused() {
        let d = tmpdir();
        let p = write(&d);
        let good = std::fs::read(&p).unwrap();
        let check = |bytes: &[u8], want: &str| {
            std::fs::write(&p, bytes).unwrap();
            let e = ImageReader::open(&p, None)
                .err()
                .expect("must fail")
                .to_string();
            assert!(e.contains(want), "{e}");
        };
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        check(&flipped, "checksum mismatch");
        check(&good[..good.len() - 10], "checksum mismatch");
        check(&good[..20], "too short");
        let mut magic = good.clone();
        magic[0] = b'X';
        check(&magic, "bad magic");
        let mut newer = good.clone();
        newer[8] = 3;
        check(&newer, "newer than this ckpt-user supports");
        std::fs::remove_dir_all(d).unwrap();
    }

    /// A format 1 image, as ckpt-user wrote them before images carried a MAC.
    pub(crate) fn v1_image(img: &Image) -> Vec<u8> {
        let meta = rmp_serde::to_vec_named(img).unwrap();
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&meta);
        b.extend_from_slice(&HEADER_LEN.to_le_bytes());
        b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        let sum = Sha256::digest(&b);
        b.extend_from_slice(&sum);
        b
    }

    #[test]
    fn the_mac_verifies_only_with_the_key_that_made_it() {
        let d = tmpdir();
        let p = write(&d);
        let open = |k: Option<&HostKey>| ImageReader::open(&p, k).unwrap().auth;
        assert!(open(Some(&test_key())).verified());
        let other = HostKey::from_bytes([8; 32], "/other".into());
        assert!(matches!(open(Some(&other)), Auth::OtherKey { .. }));
        assert!(matches!(open(None), Auth::NotChecked { .. }));
        // Altered and the checksum recomputed, as anyone can: the MAC gives it away.
        let mut b = std::fs::read(&p).unwrap();
        b[HEADER_LEN as usize] ^= 1; // a byte of the ghost's contents
        let body = b.len() - 32;
        let sum = Sha256::digest(&b[..body]);
        b[body..].copy_from_slice(&sum);
        std::fs::write(&p, &b).unwrap();
        assert!(matches!(open(Some(&test_key())), Auth::Forged { .. }));
        // Format 1 images stay readable, as unsigned.
        let old = Image {
            ghosts: vec![],
            ..sample()
        };
        std::fs::write(&p, v1_image(&old)).unwrap();
        let r = ImageReader::open(&p, Some(&test_key())).unwrap();
        assert_eq!((r.version, r.auth), (1, Auth::Unsigned));
        assert_eq!(r.image, old);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn an_unfinished_writer_leaves_nothing() {
        let d = tmpdir();
        let target = d.join("img");
        let w = ImageWriter::create(&target, &test_key()).unwrap();
        let tmp = w.temp().to_path_buf();
        assert!(tmp.exists());
        drop(w);
        assert!(!tmp.exists() && !target.exists());
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[cfg(test)]
mod hostile {
    //! Defects 1-3 of issue 16, reproduced before the fix.
    use super::*;
    use crate::image::{
        format::{Fd, Lease, OpenFile, Process, TRAILER_LEN},
        inspect,
        writer::ImageWriter,
    };

    fn dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ckpt-hostile-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn image_with(f: impl FnOnce(&mut Image)) -> Image {
        let mut img = Image {
            processes: vec![Process {
                pid: 1,
                fds: vec![Fd {
                    fd: 3,
                    file: 0,
                    cloexec: false,
                }],
                ..Default::default()
            }],
            files: vec![OpenFile {
                path: "/f".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        f(&mut img);
        img
    }

    fn written(name: &str, img: &Image) -> std::path::PathBuf {
        let p = dir().join(name);
        ImageWriter::create(&p, &super::tests::test_key())
            .unwrap()
            .finish(img)
            .unwrap()
    }

    #[test]
    fn defect1_summary_survives_a_lease_on_a_missing_file() {
        let img = image_with(|i| {
            i.leases.push(Lease {
                file: 99,
                pid: 1,
                lease_type: None,
                breaking: false,
                target_type: None,
                remaining_ns: None,
                lease_break_time_s: None,
                downgrade_remaining_ns: None,
                notified: false,
                signal: None,
                breakers: vec![],
            });
        });
        let p = written("d1", &img);
        let r = ImageReader::open(&p, None).unwrap();
        assert!(inspect::summary(&r.image).contains("file 99"));
    }

    #[test]
    fn defect2_tree_survives_an_fd_on_a_missing_file() {
        let img = image_with(|i| i.processes[0].fds[0].file = 4_000_000_000);
        let p = written("d2", &img);
        let r = ImageReader::open(&p, None).unwrap();
        assert!(inspect::tree(&r.image).contains("4000000000"));
    }

    /// Rewrites the trailer's metadata location and recomputes the checksum, as
    /// anyone can.
    fn relocated(name: &str, offset: u64, len: u64) -> std::path::PathBuf {
        let p = written(name, &image_with(|_| {}));
        let mut b = std::fs::read(&p).unwrap();
        let t = b.len() - TRAILER_LEN as usize;
        b[t..t + 8].copy_from_slice(&offset.to_le_bytes());
        b[t + 8..t + 16].copy_from_slice(&len.to_le_bytes());
        let body = b.len() - 32;
        let sum = Sha256::digest(&b[..body]);
        b[body..].copy_from_slice(&sum);
        std::fs::write(&p, &b).unwrap();
        p
    }

    #[test]
    fn defect3_a_wrapping_metadata_location_is_refused() {
        let p = relocated("d3a", 1 << 63, 0);
        let len = std::fs::metadata(&p).unwrap().len();
        // offset + len wraps to the trailer's position.
        let p = relocated("d3a", 1 << 63, (len - TRAILER_LEN).wrapping_sub(1 << 63));
        let e = ImageReader::open(&p, None)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("metadata location"), "{e}");
    }

    #[test]
    fn defect3_a_huge_metadata_length_is_refused_without_allocating_it() {
        let p = relocated("d3b", 0, 0);
        let len = std::fs::metadata(&p).unwrap().len();
        // A matching (wrapped) offset: before the fix, a 64 GiB allocation aborted.
        let p = relocated("d3b", (len - TRAILER_LEN).wrapping_sub(1 << 36), 1 << 36);
        let e = ImageReader::open(&p, None)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("metadata location"), "{e}");
    }
}
