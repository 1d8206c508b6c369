//! Reading an image: every byte is checked against the checksum before the metadata is
//! trusted; a newer format version, a wrong magic or a truncated file is a clear error.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    os::unix::fs::FileExt as _,
    path::Path,
};

use anyhow::{bail, Context as _, Result};
use sha2::{Digest, Sha256};

use super::format::{Ghost, Image, HEADER_LEN, MAGIC, TRAILER_LEN, VERSION};

pub struct ImageReader {
    file: File,
    pub image: Image,
}

impl ImageReader {
    pub fn open(path: &Path) -> Result<ImageReader> {
        let name = path.display();
        let mut file = File::open(path).with_context(|| format!("opening {name}"))?;
        let len = file.metadata()?.len();
        let mut header = [0u8; HEADER_LEN as usize];
        if len < HEADER_LEN + TRAILER_LEN || file.read_exact(&mut header).is_err() {
            bail!("{name}: not a ckpt image (too short: {len} bytes)");
        }
        if &header[..8] != MAGIC {
            bail!("{name}: not a ckpt image (bad magic)");
        }
        let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
        if version > VERSION {
            bail!("{name}: image format version {version} is newer than this ckpt-user supports ({VERSION}); use a newer ckpt-user");
        }
        // Verify the checksum over everything before it.
        let body = len - 32;
        file.seek(SeekFrom::Start(0))?;
        let mut hash = Sha256::new();
        let mut left = body;
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            file.read_exact(&mut buf[..n])
                .with_context(|| format!("reading {name}"))?;
            hash.update(&buf[..n]);
            left -= n as u64;
        }
        let mut stored = [0u8; 32];
        file.read_exact(&mut stored)?;
        if hash.finalize().as_slice() != stored {
            bail!("{name}: image is corrupt or truncated (checksum mismatch)");
        }
        let mut trailer = [0u8; 16];
        file.read_exact_at(&mut trailer, len - TRAILER_LEN)?;
        let meta_offset = u64::from_le_bytes(trailer[..8].try_into().unwrap());
        let meta_len = u64::from_le_bytes(trailer[8..].try_into().unwrap());
        if meta_offset < HEADER_LEN || meta_offset + meta_len != len - TRAILER_LEN {
            bail!("{name}: image is corrupt (bad metadata location)");
        }
        let mut meta = vec![0u8; meta_len as usize];
        file.read_exact_at(&mut meta, meta_offset)?;
        let image: Image = rmp_serde::from_slice(&meta)
            .with_context(|| format!("{name}: image metadata is corrupt"))?;
        Ok(ImageReader { file, image })
    }

    /// Calls `f(file_offset, bytes)` for each data extent of a ghost file, in pieces.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{format::Process, writer::ImageWriter};

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
        let mut w = ImageWriter::create(&target).unwrap();
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
        let r = ImageReader::open(&p).unwrap();
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
            let e = ImageReader::open(&p).err().expect("must fail").to_string();
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
        newer[8] = 2;
        check(&newer, "newer than this ckpt-user supports");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn an_unfinished_writer_leaves_nothing() {
        let d = tmpdir();
        let target = d.join("img");
        let w = ImageWriter::create(&target).unwrap();
        let tmp = w.temp().to_path_buf();
        assert!(tmp.exists());
        drop(w);
        assert!(!tmp.exists() && !target.exists());
        std::fs::remove_dir_all(d).unwrap();
    }
}
