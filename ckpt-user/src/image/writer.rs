//! Writing an image atomically: a temporary file (mode 0600: it holds file contents)
//! next to the target, contents streamed in, metadata, MAC (with the host key) and
//! checksum appended, fsync, rename. Until `finish` renames it, nothing exists under
//! the final name; dropping an unfinished writer removes the temporary file (and the
//! dump's watchdog removes it if the dumper is killed, see `cgroup::freeze`).

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use hmac::Mac as _;
use sha2::{Digest, Sha256};

use super::{
    format::{Image, HEADER_LEN, MAGIC, VERSION},
    key::{HostKey, ImageMac},
};

pub struct ImageWriter {
    target: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    hash: Sha256,
    mac: ImageMac,
    key_id: [u8; super::key::KEY_ID_LEN],
    pos: u64,
    done: bool,
}

/// The temporary name used while `target` is being written.
pub fn temp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

impl ImageWriter {
    pub fn create(target: &Path, key: &HostKey) -> Result<ImageWriter> {
        let tmp = temp_path(target);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = ImageWriter {
            target: target.to_path_buf(),
            tmp,
            out: BufWriter::with_capacity(1 << 20, file),
            hash: Sha256::new(),
            mac: key.mac(),
            key_id: key.id(),
            pos: 0,
            done: false,
        };
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        w.write(&header)?;
        Ok(w)
    }

    pub fn temp(&self) -> &Path {
        &self.tmp
    }

    /// Current offset: where the next bytes will be.
    pub fn offset(&self) -> u64 {
        self.pos
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .with_context(|| format!("writing {}", self.tmp.display()))?;
        self.hash.update(bytes);
        self.mac.update(bytes);
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Appends the metadata and trailer, syncs, and renames into place.
    pub fn finish(mut self, image: &Image) -> Result<PathBuf> {
        let meta = rmp_serde::to_vec_named(image).context("encoding image metadata")?;
        let meta_offset = self.pos;
        self.write(&meta)?;
        let mut trailer = Vec::with_capacity(16);
        trailer.extend_from_slice(&meta_offset.to_le_bytes());
        trailer.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        trailer.extend_from_slice(&self.key_id);
        self.write(&trailer)?;
        let tag = self.mac.clone().finalize().into_bytes();
        self.write(&tag)?;
        let digest = std::mem::take(&mut self.hash).finalize();
        self.out
            .write_all(&digest)
            .context("writing image checksum")?;
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.tmp.display()))?;
        self.out
            .get_ref()
            .sync_all()
            .context("fsync of the image")?;
        std::fs::rename(&self.tmp, &self.target).with_context(|| {
            format!(
                "renaming {} to {}",
                self.tmp.display(),
                self.target.display()
            )
        })?;
        if let Some(dir) = self.target.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.done = true;
        Ok(self.target.clone())
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
