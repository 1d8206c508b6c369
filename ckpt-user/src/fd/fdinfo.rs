//! /proc/PID/fdinfo/N: an fd's offset, flags, mount and inode, and the locks and
//! leases of its description as the kernel prints them under `flc_lock`. Parsed here,
//! not by procfs, which does not read the `lock:` lines.

use crate::lock::proc_locks::{self, ProcLock};

/// What /proc/PID/fdinfo/N says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FdInfo {
    pub pos: u64,
    /// Octal in the file; O_CLOEXEC set when the fd is close-on-exec.
    pub flags: u32,
    pub mnt_id: u32,
    pub ino: u64,
    /// `lock:` lines: the locks and leases of this fd's description (and, for POSIX,
    /// of this process through this description).
    pub locks: Vec<ProcLock>,
}

pub fn parse_fdinfo(text: &str) -> FdInfo {
    let mut info = FdInfo::default();
    let mut lock_lines = String::new();
    for line in text.lines() {
        let (k, v) = line.split_once(':').unwrap_or((line, ""));
        let v = v.trim();
        match k {
            "pos" => info.pos = v.parse().unwrap_or(0),
            "flags" => info.flags = u32::from_str_radix(v, 8).unwrap_or(0),
            "mnt_id" => info.mnt_id = v.parse().unwrap_or(0),
            "ino" => info.ino = v.parse().unwrap_or(0),
            "lock" => {
                lock_lines.push_str(v);
                lock_lines.push('\n');
            }
            _ => {}
        }
    }
    info.locks = proc_locks::parse(&lock_lines).unwrap_or_default();
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_fields_and_lock_lines() {
        let text = "pos:\t4096\nflags:\t02100002\nmnt_id:\t31\nino:\t77\n\
lock:\t1: POSIX  ADVISORY  WRITE 10 08:01:77 0 99\nlock:\t2: LEASE  BREAKING  UNLCK 10 08:01:77 0 EOF\n";
        let i = parse_fdinfo(text);
        assert_eq!((i.pos, i.mnt_id), (4096, 31));
        assert_eq!(i.flags, 0o2100002);
        assert_eq!(i.flags & 0o2000000, 0o2000000);
        assert_eq!(i.ino, 77);
        assert_eq!(i.locks.len(), 2);
        assert_eq!(i.locks[0].range.end(), 99);
    }
}
