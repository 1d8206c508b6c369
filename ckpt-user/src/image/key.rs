//! The host key that authenticates images (HMAC-SHA256).
//!
//! The SHA-256 trailer proves that an image is whole, not who made it: anyone can
//! rewrite an image and recompute it. Restoring an image runs its processes as their
//! recorded users (root included), so `dump` MACs every image with a key only root on
//! this host can read, and `restore` refuses an image whose MAC does not verify.
//!
//! The key is 32 random bytes, stored as 64 hex digits and a newline, mode 0600, at
//! `--key PATH`, else `$CKPT_IMAGE_KEY`, else [`DEFAULT_KEY`]. `dump` creates it on first
//! use, atomically (a complete file is linked into place; a concurrent dump that lost
//! the race uses the winner's key). Hosts that migrate between each other share it.

use std::{
    fs::OpenOptions,
    io::{Read as _, Write as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};

pub const DEFAULT_KEY: &str = "/var/lib/ckpt/image.key";
/// Overrides [`DEFAULT_KEY`] (tests use it so that they never touch a host's key).
pub const KEY_ENV: &str = "CKPT_IMAGE_KEY";
pub const KEY_LEN: usize = 32;
/// Bytes of the key's id stored in an image (to tell "another key" from "forged").
pub const KEY_ID_LEN: usize = 8;

pub type ImageMac = Hmac<Sha256>;

#[derive(Clone)]
pub struct HostKey {
    bytes: [u8; KEY_LEN],
    pub path: PathBuf,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        write!(f, "HostKey({}, id {})", self.path.display(), self.id_hex())
    }
}

/// Where the key is: `--key`, else `$CKPT_IMAGE_KEY`, else the default.
pub fn key_path(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| {
            std::env::var_os(KEY_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KEY))
}

/// The key file's text: 64 hex digits (surrounding whitespace allowed).
fn parse(text: &str) -> Option<[u8; KEY_LEN]> {
    hex::decode(text.trim()).ok()?.try_into().ok()
}

impl HostKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN], path: PathBuf) -> HostKey {
        HostKey { bytes, path }
    }

    /// Reads an existing key; refuses one that others could read or write.
    pub fn load(path: &Path) -> Result<HostKey> {
        let name = path.display();
        let mut f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .with_context(|| format!("reading the image key {name}"))?;
        let md = f.metadata()?;
        if !md.is_file() {
            bail!("image key {name} is not a regular file");
        }
        let euid = nix::unistd::geteuid().as_raw();
        if md.uid() != euid && md.uid() != 0 {
            bail!(
                "image key {name} belongs to uid {}, not to root or to us",
                md.uid()
            );
        }
        if md.mode() & 0o077 != 0 {
            bail!(
                "image key {name} has mode {:04o}: others could read or change it (chmod 600 {name})",
                md.mode() & 0o7777
            );
        }
        let mut text = String::new();
        // A key file is 65 bytes; never read more than a little of anything else.
        (&mut f).take(256).read_to_string(&mut text)?;
        let Some(bytes) = parse(&text) else {
            bail!("image key {name} is not 64 hex digits");
        };
        Ok(HostKey {
            bytes,
            path: path.to_path_buf(),
        })
    }

    /// Reads the key, creating it (and its directory, mode 0700) if there is none.
    pub fn load_or_create(path: &Path) -> Result<HostKey> {
        match Self::load(path) {
            Ok(k) => return Ok(k),
            Err(e)
                if e.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound) => {}
            Err(e) => return Err(e),
        }
        let name = path.display();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
        }
        let mut bytes = [0u8; KEY_LEN];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut r| r.read_exact(&mut bytes))
            .context("reading /dev/urandom for a new image key")?;
        // A complete file under a temporary name, then link(2): the key appears whole
        // or not at all, and a key someone created meanwhile is never replaced.
        let tmp = path.with_file_name(format!(
            ".{}.tmp-{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id()
        ));
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            writeln!(f, "{}", hex::encode(bytes))?;
            f.sync_all()
        };
        let linked = write().and_then(|_| std::fs::hard_link(&tmp, path));
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    if let Ok(d) = std::fs::File::open(dir) {
                        let _ = d.sync_all();
                    }
                }
                eprintln!("ckpt-user: created the image key {name} (share it with the hosts that restore this host's images)");
                Ok(HostKey {
                    bytes,
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(path),
            Err(e) => Err(e).with_context(|| format!("creating the image key {name}")),
        }
    }

    /// A short public id of the key (not the key: a hash of it).
    pub fn id(&self) -> [u8; KEY_ID_LEN] {
        let mut h = Sha256::new();
        h.update(b"ckpt image key id\0");
        h.update(self.bytes);
        h.finalize()[..KEY_ID_LEN].try_into().unwrap()
    }

    pub fn id_hex(&self) -> String {
        hex::encode(self.id())
    }

    pub fn mac(&self) -> ImageMac {
        ImageMac::new_from_slice(&self.bytes).expect("HMAC takes keys of any length")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ckpt-key-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn created_once_atomically_0600_and_then_reused() {
        let d = dir("create");
        let p = d.join("sub/image.key");
        let k = HostKey::load_or_create(&p).unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(p.parent().unwrap()).unwrap().mode() & 0o777,
            0o700
        );
        assert_eq!(md.len(), 65);
        let again = HostKey::load_or_create(&p).unwrap();
        assert_eq!(again.bytes, k.bytes);
        // No temporary left beside it.
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_readable_or_malformed_key_is_refused() {
        let d = dir("bad");
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("k");
        std::fs::write(&p, hex::encode([1u8; 32])).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = HostKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(HostKey::load(&p).is_ok());
        std::fs::write(&p, "xyz").unwrap();
        let e = HostKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("not 64 hex digits"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn the_path_comes_from_the_option_then_the_environment() {
        assert_eq!(key_path(Some(Path::new("/x"))), PathBuf::from("/x"));
        // The environment is shared by every test thread: only read here.
        let want = std::env::var_os(KEY_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_KEY));
        assert_eq!(key_path(None), want);
    }
}
