//! Locks as the kernel keeps them (flag and type values), and what the tracer records
//! of them that the kernel forgets: when a blocked request began to wait
//! ([`WaitStart`]) and, opt-in, when a lock was taken ([`HoldStart`]).

/// Kernel `fl_flags` bits (include/linux/filelock.h), identical from 6.1 to 6.18.
pub mod fl_flags {
    pub const FL_POSIX: u32 = 1;
    pub const FL_FLOCK: u32 = 2;
    pub const FL_DELEG: u32 = 4;
    pub const FL_ACCESS: u32 = 8;
    pub const FL_LEASE: u32 = 32;
    pub const FL_CLOSE: u32 = 64;
    pub const FL_SLEEP: u32 = 128;
    pub const FL_DOWNGRADE_PENDING: u32 = 256;
    pub const FL_UNLOCK_PENDING: u32 = 512;
    pub const FL_OFDLCK: u32 = 1024;
}

/// `F_RDLCK`, `F_WRLCK`, `F_UNLCK` as the kernel stores them in `fl_type`.
pub mod fl_type {
    pub const F_RDLCK: u8 = 0;
    pub const F_WRLCK: u8 = 1;
    pub const F_UNLCK: u8 = 2;
}

/// Returned by posix_lock_inode/flock_lock_inode when the caller must sleep.
pub const FILE_LOCK_DEFERRED: i32 = 1;

/// What kind of lock a record is.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum LockKind {
    Posix = 1,
    Ofd = 2,
    Flock = 3,
}

impl LockKind {
    /// The kind of a request, from its `fl_flags`.
    pub const fn from_fl_flags(flags: u32) -> Option<LockKind> {
        if flags & fl_flags::FL_OFDLCK != 0 {
            Some(LockKind::Ofd)
        } else if flags & fl_flags::FL_POSIX != 0 {
            Some(LockKind::Posix)
        } else if flags & fl_flags::FL_FLOCK != 0 {
            Some(LockKind::Flock)
        } else {
            None
        }
    }

    /// As JSON and images spell it.
    pub const fn name(self) -> &'static str {
        match self {
            LockKind::Posix => "posix",
            LockKind::Ofd => "ofd",
            LockKind::Flock => "flock",
        }
    }

    /// As /proc/locks and the tables spell it.
    pub const fn label(self) -> &'static str {
        match self {
            LockKind::Posix => "POSIX",
            LockKind::Ofd => "OFDLCK",
            LockKind::Flock => "FLOCK",
        }
    }
}

/// What a row of a lock table is: a lock of some kind, or a lease. NFS delegations
/// are neither (ckpt does not show them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HeldKind {
    Lock(LockKind),
    Lease,
}

impl HeldKind {
    pub const ALL: [HeldKind; 4] = [
        HeldKind::Lock(LockKind::Posix),
        HeldKind::Lock(LockKind::Ofd),
        HeldKind::Lock(LockKind::Flock),
        HeldKind::Lease,
    ];

    /// The kind of a request or a held object from its `fl_flags` (None for a
    /// delegation or anything unknown).
    pub const fn from_fl_flags(flags: u32) -> Option<HeldKind> {
        if flags & fl_flags::FL_LEASE != 0 {
            if flags & fl_flags::FL_DELEG != 0 {
                None
            } else {
                Some(HeldKind::Lease)
            }
        } else {
            match LockKind::from_fl_flags(flags) {
                Some(k) => Some(HeldKind::Lock(k)),
                None => None,
            }
        }
    }

    /// As JSON and images spell it: "posix", "ofd", "flock", "lease".
    pub const fn name(self) -> &'static str {
        match self {
            HeldKind::Lock(k) => k.name(),
            HeldKind::Lease => "lease",
        }
    }

    /// As /proc/locks and the tables spell it.
    pub const fn label(self) -> &'static str {
        match self {
            HeldKind::Lock(k) => k.label(),
            HeldKind::Lease => "LEASE",
        }
    }

    pub fn from_name(name: &str) -> Option<HeldKind> {
        HeldKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl core::fmt::Display for HeldKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Read or write (the kernel's F_UNLCK never appears in a held lock or a request
/// that waits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum LockType {
    Read,
    Write,
}

impl LockType {
    /// `None` for F_UNLCK (and anything unknown).
    pub const fn from_fl_type(t: u8) -> Option<LockType> {
        match t {
            fl_type::F_RDLCK => Some(LockType::Read),
            fl_type::F_WRLCK => Some(LockType::Write),
            _ => None,
        }
    }

    /// The kernel's `fl_type`, which is also what fcntl(2) and F_SETLEASE take
    /// (the kernel stores the caller's F_RDLCK/F_WRLCK as given).
    pub const fn to_fl_type(self) -> u8 {
        match self {
            LockType::Read => fl_type::F_RDLCK,
            LockType::Write => fl_type::F_WRLCK,
        }
    }

    pub const ALL: [LockType; 2] = [LockType::Read, LockType::Write];

    /// As JSON, images and metric labels spell it.
    pub const fn name(self) -> &'static str {
        match self {
            LockType::Read => "read",
            LockType::Write => "write",
        }
    }

    /// F_RDLCK or F_WRLCK as fcntl(2) and F_SETLEASE take it (the same values).
    pub const fn fcntl_type(self) -> i32 {
        self.to_fl_type() as i32
    }

    /// As /proc/locks and the tables spell it.
    pub const fn label(self) -> &'static str {
        match self {
            LockType::Read => "READ",
            LockType::Write => "WRITE",
        }
    }
}

/// A lock's byte range as the kernel keeps it: its first and last byte, both
/// included, `0 <= start <= end`; an `end` of [`LockRange::OFFSET_MAX`] is "to the end
/// of the file, however it grows" (what fcntl's `l_len` 0 asks for, and "EOF" in
/// /proc/locks). Made only through [`LockRange::new`], so a range from an image or a
/// kernel read is valid or refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LockRange {
    start: i64,
    end: i64,
}

impl LockRange {
    /// The kernel's largest offset (`OFFSET_MAX`).
    pub const OFFSET_MAX: i64 = i64::MAX;
    /// The whole file, as flock locks and leases have it.
    pub const WHOLE: LockRange = LockRange {
        start: 0,
        end: LockRange::OFFSET_MAX,
    };

    /// None unless `0 <= start <= end`.
    pub const fn new(start: i64, end: i64) -> Option<LockRange> {
        if start < 0 || end < start {
            None
        } else {
            Some(LockRange { start, end })
        }
    }

    pub const fn start(self) -> i64 {
        self.start
    }

    pub const fn end(self) -> i64 {
        self.end
    }

    /// Reaches the end of the file, however it grows.
    pub const fn to_eof(self) -> bool {
        self.end == LockRange::OFFSET_MAX
    }

    /// Some byte is in both.
    pub const fn overlaps(self, other: LockRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    /// Every byte of `other` is in `self`.
    pub const fn contains(self, other: LockRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// fcntl's `l_len` (with `l_start` = `start`): 0 for "to the end of the file".
    pub const fn l_len(self) -> i64 {
        if self.to_eof() {
            0
        } else {
            // No overflow: 0 <= start <= end < OFFSET_MAX.
            self.end - self.start + 1
        }
    }
}

/// "start-end", with "EOF" for an end at the end of the file (as /proc/locks).
impl core::fmt::Display for LockRange {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.to_eof() {
            write!(f, "{}-EOF", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// Who owns a lock, as the kernel decides conflicts: a POSIX lock's fd table (`struct
/// files_struct *`), an OFD or flock lock's or a lease's open file description
/// (`struct file *`). Opaque: equal owners never conflict. Written in lowercase hex.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LockOwner(pub u64);

impl LockOwner {
    /// Hex as JSON shows it (lowercase there; either case and leading zeros are
    /// read); None for anything else.
    pub fn parse(s: &str) -> Option<LockOwner> {
        // from_str_radix alone would take a leading '+'.
        if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(s, 16).ok().map(LockOwner)
    }
}

impl core::fmt::Display for LockOwner {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// When a thread's blocked request began to wait, keyed by thread id in `WAITS`.
///
/// Written when the kernel defers a request (`FILE_LOCK_DEFERRED`), or by the lease
/// break programs for a blocked breaker. The kernel allocates a new request when it
/// restarts an interrupted wait (after a freeze, a stop, a signal handler with
/// SA_RESTART): a deferral with the same identity (owner, inode, range, type) as the
/// thread's entry is that restart and keeps `since_ns`. The entry is dropped when the
/// wait ends without a restart: the request returns from the lock call granted or
/// failed (same `request`), a handler without SA_RESTART runs, or the thread exits.
/// Readers use an entry only for the request it names, found in the kernel's blocked
/// tree, so a wait is shown exactly as long as the kernel has it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WaitStart {
    /// CLOCK_MONOTONIC ns when the thread first blocked on this request.
    pub since_ns: u64,
    /// Kernel address of the blocked request (the `lock` of its line in the tree).
    pub request: u64,
    pub owner: u64,
    pub ino: u64,
    pub start: i64,
    pub end: i64,
    pub dev: u32,
    pub tgid: u32,
    pub flags: u32,
    pub lock_type: u8,
    pub _pad: [u8; 3],
}

impl WaitStart {
    /// Whether `other` asks for the same thing (a restart of this wait).
    pub fn same_request(&self, other: &WaitStart) -> bool {
        self.owner == other.owner
            && self.ino == other.ino
            && self.dev == other.dev
            && self.start == other.start
            && self.end == other.end
            && self.lock_type == other.lock_type
            && self.flags & !fl_flags::FL_SLEEP == other.flags & !fl_flags::FL_SLEEP
    }

    /// The range asked for (None when the record holds no valid one).
    pub const fn range(&self) -> Option<LockRange> {
        LockRange::new(self.start, self.end)
    }
}

/// How a wait ended, as the tracer saw it (`WaitEnd::how`).
pub mod wait_end {
    /// The request came back from the lock call granted.
    pub const GRANTED: u8 = 1;
    /// The request came back refused (EDEADLK, say).
    pub const REFUSED: u8 = 2;
    /// A signal handler without SA_RESTART ran: the call returns EINTR.
    pub const INTERRUPTED: u8 = 3;
    /// The thread exited while waiting.
    pub const EXITED: u8 = 4;
    /// A lease breaker was woken (the lease went, was downgraded or timed out, or a
    /// signal came). Not final: if leases still conflict the kernel blocks it again on
    /// the same request and its wait goes on with the same start, which readers see
    /// as a `WAITS` entry with the same `since_ns`.
    pub const UNBLOCKED: u8 = 5;
}

/// A wait that ended, in the `WAIT_ENDS` ring: slot `seq % capacity::WAIT_ENDS`.
///
/// The ring exists because a wait can begin and end between two looks of a reader
/// (the agent looks every 100 ms): the kernel keeps nothing of it afterwards. Several
/// readers follow it at once, each with its own position; a slot is overwritten one
/// lap later, so a reader that falls a lap behind says how many it lost. A slot being
/// rewritten while read is caught by reading it twice.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WaitEnd {
    /// 1 + the index of this end among all ends recorded (0: an empty slot).
    pub seq: u64,
    /// CLOCK_MONOTONIC ns at the end.
    pub ended_ns: u64,
    pub wait: WaitStart,
    pub tid: u32,
    /// A `wait_end` value.
    pub how: u8,
    pub _pad: [u8; 3],
}

/// Upper bounds (ns) of the tracer's wait-time histogram buckets (`WAIT_HIST`); a
/// last bucket takes the rest.
pub const WAIT_BUCKETS_NS: [u64; 14] = [
    1_000_000,
    5_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
    300_000_000_000,
];

/// Slots of the per-CPU `WAIT_HIST` array: one count per bucket (the last is +Inf),
/// then the sum of the waits in ns, then their number.
pub mod wait_hist {
    pub const BUCKETS: u32 = super::WAIT_BUCKETS_NS.len() as u32 + 1;
    pub const SUM_NS: u32 = BUCKETS;
    pub const COUNT: u32 = BUCKETS + 1;
    pub const SLOTS: u32 = BUCKETS + 2;
}

/// Opt-in (`ckpt-agent --hold-times`): when a held lock object was created or first
/// seen holding, keyed by its kernel address in `HOLDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldStart {
    pub since_ns: u64,
    /// Owner of the lock at that time: a reader ignores an entry whose owner differs
    /// from the lock now at that address (the memory was reused).
    pub owner: u64,
}

/// A `HeldKind` is written as its name ("posix", ..., "lease").
#[cfg(feature = "user")]
mod held_kind_serde {
    use super::HeldKind;

    impl serde::Serialize for HeldKind {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(self.name())
        }
    }

    impl<'de> serde::Deserialize<'de> for HeldKind {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<HeldKind, D::Error> {
            crate::serde_str::deserialize(d, "posix, ofd, flock or lease", HeldKind::from_name)
        }
    }
}

/// A `LockOwner` is written as its hex string.
#[cfg(feature = "user")]
mod lock_owner_serde {
    use super::LockOwner;

    impl serde::Serialize for LockOwner {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            // No allocator here: 16 hex digits at most, made by hand.
            let mut buf = [0u8; 16];
            let mut at = buf.len();
            let mut v = self.0;
            loop {
                at -= 1;
                buf[at] = b"0123456789abcdef"[(v & 0xf) as usize];
                v >>= 4;
                if v == 0 {
                    break;
                }
            }
            s.serialize_str(core::str::from_utf8(&buf[at..]).map_err(serde::ser::Error::custom)?)
        }
    }

    impl<'de> serde::Deserialize<'de> for LockOwner {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<LockOwner, D::Error> {
            crate::serde_str::deserialize(d, "a lock owner in hex", LockOwner::parse)
        }
    }
}

/// A wait a restore carries over, keyed by the restored thread's id in `WAIT_CARRY`
/// (the CRIU plugin writes it before the restored tree resumes): the thread's next new
/// wait on the same request (inode, range, type), if it begins by `until_ns`, is
/// recorded as begun at `since_ns`, so that a restarted lock call keeps the time it
/// had waited before the checkpoint. Used once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WaitCarry {
    pub since_ns: u64,
    pub until_ns: u64,
    pub ino: u64,
    pub start: i64,
    pub end: i64,
    pub lock_type: u8,
    pub _pad: [u8; 7],
}

impl WaitCarry {
    /// Whether `w`, a new wait, is the one carried over.
    pub fn carries(&self, w: &WaitStart) -> bool {
        self.ino == w.ino
            && self.start == w.start
            && self.end == w.end
            && self.lock_type == w.lock_type
            && w.since_ns <= self.until_ns
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C) plain data; any bytes are a valid value.
    unsafe impl aya::Pod for super::WaitCarry {}
    // SAFETY: repr(C) plain data; any bytes are a valid value.
    unsafe impl aya::Pod for super::WaitStart {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HoldStart {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WaitEnd {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_valid_or_refused_and_compares_as_the_kernel_does() {
        extern crate std;
        use std::string::ToString;
        assert_eq!(LockRange::new(-1, 5), None);
        assert_eq!(LockRange::new(6, 5), None);
        let r = |s, e| LockRange::new(s, e).unwrap();
        let eof = LockRange::OFFSET_MAX;
        assert!(r(0, 9).overlaps(r(9, 20)) && !r(0, 9).overlaps(r(10, 20)));
        assert!(r(5, eof).overlaps(r(1_000_000, 1_000_000)));
        assert!(r(0, 9).contains(r(3, 9)) && !r(0, 9).contains(r(3, 10)));
        assert!(LockRange::WHOLE.contains(r(7, eof)));
        assert_eq!(r(10, 19).l_len(), 10);
        assert_eq!(r(10, eof).l_len(), 0);
        assert_eq!(r(0, eof - 1).l_len(), eof, "the longest finite range fits");
        assert_eq!(r(3, eof).to_string(), "3-EOF");
        assert_eq!(r(3, 4).to_string(), "3-4");
    }

    #[test]
    fn an_owner_round_trips_through_hex_and_refuses_anything_else() {
        extern crate std;
        use std::string::ToString;
        for v in [0, 1, 0xffff_8882_4d89_6940, u64::MAX] {
            let o = LockOwner(v);
            assert_eq!(LockOwner::parse(&o.to_string()), Some(o));
        }
        assert_eq!(LockOwner(0xab).to_string(), "ab");
        for bad in ["", "-1", "+1", "xyz", "0x10", "10000000000000000"] {
            assert_eq!(LockOwner::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_kind_comes_from_its_flags_and_round_trips_by_name_and_label() {
        use fl_flags::*;
        let cases = [
            (FL_POSIX | FL_SLEEP, Some(HeldKind::Lock(LockKind::Posix))),
            (FL_POSIX | FL_OFDLCK, Some(HeldKind::Lock(LockKind::Ofd))),
            (FL_FLOCK | FL_SLEEP, Some(HeldKind::Lock(LockKind::Flock))),
            (FL_LEASE | FL_UNLOCK_PENDING, Some(HeldKind::Lease)),
            (FL_LEASE | FL_DELEG, None),
            (FL_ACCESS, None),
        ];
        for (flags, kind) in cases {
            assert_eq!(HeldKind::from_fl_flags(flags), kind, "flags {flags:#x}");
        }
        for k in HeldKind::ALL {
            assert_eq!(HeldKind::from_name(k.name()), Some(k));
        }
        let labels = HeldKind::ALL.map(HeldKind::label);
        assert_eq!(labels, ["POSIX", "OFDLCK", "FLOCK", "LEASE"]);
        for t in LockType::ALL {
            assert_eq!(LockType::from_fl_type(t.to_fl_type()), Some(t));
        }
        assert_eq!(LockType::from_fl_type(fl_type::F_UNLCK), None);
    }

    #[test]
    fn a_carried_wait_is_the_same_request_begun_in_time() {
        let w = WaitStart {
            since_ns: 100,
            ino: 7,
            start: 0,
            end: 9,
            lock_type: 1,
            ..WaitStart::default()
        };
        let c = WaitCarry {
            since_ns: 40,
            until_ns: 150,
            ino: 7,
            start: 0,
            end: 9,
            lock_type: 1,
            _pad: [0; 7],
        };
        assert!(c.carries(&w));
        assert!(!c.carries(&WaitStart { since_ns: 151, ..w }), "too late");
        assert!(!c.carries(&WaitStart { end: 10, ..w }), "another range");
        assert!(!c.carries(&WaitStart { lock_type: 0, ..w }), "another type");
        assert!(!c.carries(&WaitStart { ino: 8, ..w }), "another file");
    }
}
