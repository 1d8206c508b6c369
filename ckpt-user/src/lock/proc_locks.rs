//! Parser for /proc/locks (fs/locks.c: lock_get_status), the kernel's own text: the
//! fallback when the iterators cannot be loaded, the format of fdinfo's `lock:` lines,
//! and the oracle of the agreement tests. By hand, not with procfs: its Lock drops the
//! line's id and the "->" mark that tie a blocked request to its blocker, and the
//! lease states (ACTIVE, BREAKING, BREAKER).

use super::{HeldKind, KernelDev, LockRange, LockType};

/// One line of /proc/locks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcLock {
    /// The line's ordinal; blocked requests share the id of the lock they wait on.
    pub id: u64,
    /// True for "->" lines: a request blocked on lock `id`.
    pub blocked: bool,
    /// None for NFS delegations, FL_ACCESS probes and anything unknown. A lease's
    /// state word says ACTIVE, BREAKING or BREAKER.
    pub kind: Option<HeldKind>,
    /// ACTIVE/BREAKING/BREAKER for leases, ADVISORY otherwise.
    pub state: String,
    /// None for UNLCK (a lease being broken to unlock shows its target type).
    pub lock_type: Option<LockType>,
    /// -1 for OFD locks (the kernel does not report their creator).
    pub pid: i64,
    pub dev: KernelDev,
    pub ino: u64,
    pub range: LockRange,
}

#[derive(Debug, thiserror::Error)]
#[error("/proc/locks line {line}: {reason}: {text:?}")]
pub struct ParseError {
    pub line: usize,
    pub reason: &'static str,
    pub text: String,
}

/// Parses the whole file. Lines without an inode ("<none>") are skipped.
pub fn parse(text: &str) -> Result<Vec<ProcLock>, ParseError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |reason| ParseError {
            line: i + 1,
            reason,
            text: line.to_string(),
        };
        let mut tok = line.split_whitespace().peekable();
        let id = tok
            .next()
            .and_then(|t| t.strip_suffix(':'))
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| err("bad id"))?;
        let mut blocked = false;
        while tok.peek() == Some(&"->") {
            blocked = true;
            tok.next();
        }
        let label = tok.next().ok_or_else(|| err("no kind"))?;
        let kind = HeldKind::ALL.into_iter().find(|k| k.label() == label);
        let state = tok.next().ok_or_else(|| err("no state"))?.to_string();
        let lock_type = match tok.next().ok_or_else(|| err("no type"))? {
            "UNLCK" => None,
            t => Some(
                LockType::ALL
                    .into_iter()
                    .find(|l| l.label() == t)
                    .ok_or_else(|| err("bad type"))?,
            ),
        };
        let pid = tok
            .next()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| err("bad pid"))?;
        let devino = tok.next().ok_or_else(|| err("no dev:ino"))?;
        if devino.starts_with("<none>") {
            continue;
        }
        let mut parts = devino.split(':');
        let (maj, min, ino) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (
                u32::from_str_radix(a, 16).map_err(|_| err("bad major"))?,
                u32::from_str_radix(b, 16).map_err(|_| err("bad minor"))?,
                c.parse::<u64>().map_err(|_| err("bad inode"))?,
            ),
            _ => return Err(err("bad dev:ino")),
        };
        let start = tok
            .next()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| err("bad start"))?;
        let end = match tok.next() {
            Some("EOF") => LockRange::OFFSET_MAX,
            Some(t) => t.parse().map_err(|_| err("bad end"))?,
            None => return Err(err("no end")),
        };
        out.push(ProcLock {
            id,
            blocked,
            kind,
            state,
            lock_type,
            pid,
            dev: KernelDev::new(maj, min),
            ino,
            range: LockRange::new(start, end).ok_or_else(|| err("bad range"))?,
        });
    }
    Ok(out)
}

/// Reads and parses /proc/locks.
pub fn read() -> anyhow::Result<Vec<ProcLock>> {
    let text = std::fs::read_to_string("/proc/locks")?;
    Ok(parse(&text)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::LockKind;

    const SAMPLE: &str = "\
1: POSIX  ADVISORY  WRITE 1234 08:01:393220 0 EOF
1: -> POSIX  ADVISORY  WRITE 1240 08:01:393220 0 EOF
2: OFDLCK ADVISORY  READ -1 00:2d:77 100 199
3: FLOCK  ADVISORY  WRITE 99 fd:00:5 0 EOF
4: LEASE  BREAKING  UNLCK 77 08:01:12 0 EOF
5: DELEG  ACTIVE    READ 1 00:01:1 0 EOF
";

    #[test]
    fn parses_every_line_kind() {
        let v = parse(SAMPLE).unwrap();
        assert_eq!(v.len(), 6);
        assert_eq!(v[0].kind, Some(HeldKind::Lock(LockKind::Posix)));
        assert!(v[0].range.to_eof());
        assert_eq!(v[0].dev, KernelDev::new(8, 1));
        assert!(!v[0].blocked && v[1].blocked);
        assert_eq!(v[1].pid, 1240);
        assert_eq!(v[2].kind, Some(HeldKind::Lock(LockKind::Ofd)));
        assert_eq!(
            (v[2].pid, v[2].range),
            (-1, LockRange::new(100, 199).unwrap())
        );
        assert_eq!(v[2].lock_type, Some(LockType::Read));
        assert_eq!(v[3].dev, KernelDev::new(0xfd, 0));
        assert_eq!(v[4].kind, Some(HeldKind::Lease));
        assert_eq!(v[4].state, "BREAKING");
        assert_eq!(v[4].lock_type, None);
        assert_eq!(v[5].kind, None);
    }

    #[test]
    fn rejects_garbage_with_line_number() {
        let e = parse("1: POSIX ADVISORY WRITE x 08:01:1 0 EOF\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(parse("nonsense\n").is_err());
    }
}
