//! The CRIU 3.17 image the plugin reads: `filelocks.img` (CRIU's own record of the
//! dumped processes' locks and leases, by process and fd). An image is two
//! magics (CRIU's common one, then the image's), then records of a little-endian
//! u32 length and that many bytes of protobuf (criu/image.c, criu/protobuf.c). Any
//! bytes are survived: a bad image is an error, never a panic.

use anyhow::{bail, Context as _, Result};
use ckpt_user::lock::{HeldKind, LockKind, LockRange, LockType};
use prost::Message;

/// `IMG_COMMON_MAGIC` (criu/include/magic.h).
const COMMON_MAGIC: u32 = 0x5456_4319;
pub const FILE_LOCKS_MAGIC: u32 = 0x5432_3616;
/// Its name in the image directory.
pub const FILE_LOCKS: &str = "filelocks.img";

pub const PSTREE_MAGIC: u32 = 0x5027_3030;
pub const PSTREE: &str = "pstree.img";

/// `pstree_entry` (images/pstree.proto): one dumped process, by its pid in the
/// tree's own pid namespace.
#[derive(Clone, PartialEq, Message)]
pub struct PstreeEntry {
    #[prost(uint32, required, tag = "1")]
    pub pid: u32,
    #[prost(uint32, required, tag = "2")]
    pub ppid: u32,
    #[prost(uint32, required, tag = "3")]
    pub pgid: u32,
    #[prost(uint32, required, tag = "4")]
    pub sid: u32,
    /// proto2 `repeated` without `packed`: prost reads both encodings.
    #[prost(uint32, repeated, packed = "false", tag = "5")]
    pub threads: Vec<u32>,
}

/// `file_lock_entry` (images/file-lock.proto).
#[derive(Clone, PartialEq, Message)]
pub struct FileLockEntry {
    /// FL_POSIX 1, FL_FLOCK 2, FL_OFD 4, FL_LEASE 8 (criu/include/file-lock.h).
    #[prost(uint32, required, tag = "1")]
    pub flag: u32,
    /// F_RDLCK 0, F_WRLCK 1, F_UNLCK 2; a lease being broken has LEASE_BREAKING (4)
    /// added to its *target* type.
    #[prost(uint32, required, tag = "2")]
    pub r#type: u32,
    #[prost(int32, required, tag = "3")]
    pub pid: i32,
    #[prost(int32, required, tag = "4")]
    pub fd: i32,
    #[prost(int64, required, tag = "5")]
    pub start: i64,
    #[prost(int64, required, tag = "6")]
    pub len: i64,
}

impl FileLockEntry {
    pub const FL_POSIX: u32 = 1;
    pub const FL_FLOCK: u32 = 2;
    pub const FL_OFD: u32 = 4;
    pub const FL_LEASE: u32 = 8;
    pub const LEASE_BREAKING: u32 = 4;
    pub const F_RDLCK: u32 = 0;
    pub const F_WRLCK: u32 = 1;
    pub const F_UNLCK: u32 = 2;

    pub fn is_lease(&self) -> bool {
        self.flag & Self::FL_LEASE != 0
    }

    /// A lease being broken (its type is the break's target).
    pub fn is_breaking_lease(&self) -> bool {
        self.is_lease() && self.r#type & Self::LEASE_BREAKING != 0
    }

    pub fn kind(&self) -> Option<HeldKind> {
        match self.flag {
            Self::FL_POSIX => Some(HeldKind::Lock(LockKind::Posix)),
            Self::FL_FLOCK => Some(HeldKind::Lock(LockKind::Flock)),
            Self::FL_OFD => Some(HeldKind::Lock(LockKind::Ofd)),
            Self::FL_LEASE => Some(HeldKind::Lease),
            _ => None,
        }
    }

    /// Its type without the breaking mark: Ok(None) is F_UNLCK, Err an unknown one.
    pub fn lock_type(&self) -> Result<Option<LockType>, u32> {
        match self.r#type & !Self::LEASE_BREAKING {
            Self::F_RDLCK => Ok(Some(LockType::Read)),
            Self::F_WRLCK => Ok(Some(LockType::Write)),
            Self::F_UNLCK => Ok(None),
            t => Err(t),
        }
    }

    /// CRIU's type number for `t` (None: F_UNLCK).
    pub fn type_number(t: Option<LockType>) -> u32 {
        match t {
            Some(LockType::Read) => Self::F_RDLCK,
            Some(LockType::Write) => Self::F_WRLCK,
            None => Self::F_UNLCK,
        }
    }

    /// Its byte range (`len` 0: to the end of file), None when impossible.
    pub fn range(&self) -> Option<LockRange> {
        let end = match self.len {
            0 => LockRange::OFFSET_MAX,
            len => self.start.checked_add(len)?.checked_sub(1)?,
        };
        LockRange::new(self.start, end)
    }
}

/// The records of an image with magic `magic`. An absent image is empty (as CRIU
/// reads one).
pub fn records<M: Message + Default>(bytes: Option<&[u8]>, magic: u32) -> Result<Vec<M>> {
    let Some(bytes) = bytes else {
        return Ok(Vec::new());
    };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    if u32_at(0) != Some(COMMON_MAGIC) || u32_at(4) != Some(magic) {
        bail!("not a CRIU image of the expected kind (magic {magic:#x})");
    }
    let mut out = Vec::new();
    let mut at = 8;
    while at < bytes.len() {
        let len = u32_at(at).context("a record's length is cut short")? as usize;
        let body = bytes
            .get(at + 4..at + 4 + len)
            .context("a record is cut short")?;
        out.push(M::decode(body).context("a record is not the expected protobuf")?);
        at += 4 + len;
    }
    Ok(out)
}

/// An image with magic `magic` holding `entries`.
pub fn image<M: Message>(magic: u32, entries: &[M]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(COMMON_MAGIC.to_le_bytes());
    out.extend(magic.to_le_bytes());
    for e in entries {
        let body = e.encode_to_vec();
        out.extend((body.len() as u32).to_le_bytes());
        out.extend(body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_any_bytes_are_an_error_not_a_panic() {
        let leases = [
            FileLockEntry {
                flag: FileLockEntry::FL_LEASE,
                r#type: FileLockEntry::LEASE_BREAKING | 2,
                pid: 42,
                fd: 3,
                start: 0,
                len: 0,
            },
            FileLockEntry {
                flag: 1,
                r#type: 1,
                pid: 42,
                fd: 4,
                start: 10,
                len: -1,
            },
        ];
        let img = image(FILE_LOCKS_MAGIC, &leases);
        let got: Vec<FileLockEntry> = records(Some(&img), FILE_LOCKS_MAGIC).unwrap();
        assert_eq!(got, leases);
        assert!(got[0].is_lease() && !got[1].is_lease());
        assert!(records::<FileLockEntry>(None, FILE_LOCKS_MAGIC)
            .unwrap()
            .is_empty());
        // Another image (pstree.img's magic).
        assert!(records::<FileLockEntry>(Some(&img), PSTREE_MAGIC).is_err());
        // A pstree entry as CRIU writes it: pid 7, ppid 1, pgid 7, sid 7, threads 7
        // and 8 unpacked (proto2's default).
        let mut tree = Vec::new();
        tree.extend(0x5456_4319u32.to_le_bytes());
        tree.extend(PSTREE_MAGIC.to_le_bytes());
        let body = [0x08, 7, 0x10, 1, 0x18, 7, 0x20, 7, 0x28, 7, 0x28, 8];
        tree.extend((body.len() as u32).to_le_bytes());
        tree.extend(body);
        let got: Vec<PstreeEntry> = records(Some(&tree), PSTREE_MAGIC).unwrap();
        assert_eq!((got[0].pid, got[0].threads.clone()), (7, vec![7, 8]));
        for n in 0..img.len() {
            let _ = records::<FileLockEntry>(Some(&img[..n]), FILE_LOCKS_MAGIC);
        }
        let mut bad = img.clone();
        bad[8] = 0xff;
        assert!(records::<FileLockEntry>(Some(&bad), FILE_LOCKS_MAGIC).is_err());
    }
}
