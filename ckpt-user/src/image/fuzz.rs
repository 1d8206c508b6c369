//! The standing fuzz harness: mutated images through every reader of an image, in
//! process, in a bounded loop (no cargo-fuzz: nothing to install, and it runs as a
//! unit test). The readers: `ImageReader::open` (checksum, MAC, metadata, ghost
//! bounds), `inspect` in its three modes (summary, JSON, tree), and restore's checks
//! of an image before anything is touched (`plan::build`, the lease schedules, the
//! file check). Any panic is a bug: an image is input like any other.
//!
//! Mutations start from the seed corpus (`seeds`, hand-built images through the
//! writer, committed under `ckpt-user/fuzz/seeds`):
//! - raw: bit flips, interesting integers, msgpack markers, inserted, removed and
//!   duplicated ranges, truncation, splices of two seeds; with `recompute` the
//!   SHA-256 trailer is recomputed (and sometimes the metadata location fixed up), as
//!   anyone rewriting an image can, so mutations get past the checksum;
//! - structured (with `recompute`): a seed's `Image` with fields set to hostile values
//!   (dangling indexes, extreme ranges and offsets, cycles, duplicates), written back
//!   through the writer with a valid MAC: what a buggy or compromised dumper could sign.
//!
//! Each input is written to one scratch file before it is read, so after an abort (which
//! no `catch_unwind` can stop) that file holds the input that caused it.

use std::{
    cell::Cell,
    collections::HashMap,
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use sha2::{Digest as _, Sha256};

use super::{
    format::{
        Breaker, Fd, FileKind, Fingerprint, Ghost, GhostMap, HeldKind, Image, KernelDev, Lease,
        Lock, LockKind, LockType, Memfd, OpenFile, Process, Waiter,
    },
    inspect,
    key::HostKey,
    reader::ImageReader,
    writer::ImageWriter,
};
use crate::{
    fd::validate,
    lease::schedule::{downgrade_first, plan_breaks, remaining_after_restore, LeaseTime},
    plan::{self, PlanOptions},
};

/// The key fuzz images are MAC'd with (never a host's key).
pub fn fuzz_key() -> HostKey {
    HostKey::from_bytes([0x5a; 32], "/nonexistent/fuzz.key".into())
}

/// splitmix64: small, fast, reproducible from a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    15,
    16,
    48,
    88,
    99,
    255,
    4096,
    0x7fff_ffff,
    0x8000_0000,
    4_000_000_000,
    0xffff_ffff,
    1 << 32,
    1 << 36,
    1 << 62,
    i64::MAX as u64,
    1 << 63,
    u64::MAX - 1,
    u64::MAX,
];

/// msgpack markers that change what follows: lengths, containers, wide integers.
const MSGPACK: &[u8] = &[
    0xc0, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xcc, 0xcd, 0xce, 0xcf, 0xd0, 0xd3, 0xd9, 0xda, 0xdb, 0xdc,
    0xdd, 0xde, 0xdf, 0x90, 0x9f, 0x80, 0x8f, 0xa0, 0xbf,
];

fn interesting(rng: &mut Rng) -> u64 {
    INTERESTING[rng.below(INTERESTING.len())]
}

fn write_image(img: &Image, ghost_data: &[(usize, Vec<u8>)], at: &Path) -> Vec<u8> {
    let mut w = ImageWriter::create(at, &fuzz_key()).expect("creating a fuzz image");
    let mut img = img.clone();
    for (g, data) in ghost_data {
        img.ghosts[*g].data_offset = w.offset();
        w.write(data).expect("writing a fuzz image");
    }
    let path = w.finish(&img).expect("writing a fuzz image");
    let bytes = std::fs::read(&path).expect("reading a fuzz image");
    let _ = std::fs::remove_file(&path);
    bytes
}

fn lease(file: u32, pid: u32, breaking: bool) -> Lease {
    Lease {
        file,
        pid,
        lease_type: Some(LockType::Write),
        breaking,
        target_type: breaking.then_some(LockType::Read),
        remaining_ns: breaking.then_some(2_500_000_000),
        lease_break_time_s: breaking.then_some(5),
        downgrade_remaining_ns: None,
        notified: breaking,
        signal: Some(libc::SIGIO),
        breakers: if breaking {
            vec![Breaker {
                pid: 12,
                tid: 12,
                write: false,
                nonblock: true,
            }]
        } else {
            vec![]
        },
    }
}

fn open_file(id: u32, path: &str, ino: u64, deleted: bool, holders: &[(u32, i32)]) -> OpenFile {
    OpenFile {
        id,
        path: path.into(),
        kind: FileKind::Regular,
        flags: libc::O_RDWR as u32,
        pos: 42,
        mnt_id: 30,
        mode: 0o100644,
        dev: KernelDev::new(8, 1),
        ino,
        owner: Some((1, holders.first().map_or(0, |h| h.0 as i32))),
        sig: 0,
        deleted,
        unlinked: ino == 101,
        handle: Some((1, vec![1, 2, 3, 4, 5, 6, 7, 8])),
        holders: holders.to_vec(),
    }
}

fn proc(pid: u32, ppid: u32, fds: &[(i32, u32)]) -> Process {
    Process {
        pid,
        ppid,
        comm: format!("p{pid}"),
        cmdline: vec!["/bin/sleep".into(), "100".into()],
        cwd: "/".into(),
        uid: 1000,
        euid: 1000,
        gid: 1000,
        egid: 1000,
        groups: vec![1000, 27],
        fds: fds
            .iter()
            .map(|&(fd, file)| Fd {
                fd,
                file,
                cloexec: fd % 2 == 0,
            })
            .collect(),
    }
}

/// The seed images (name, bytes): hand-built, through the writer (MAC'd with
/// [`fuzz_key`]), plus a format 1 image. Deterministic, so the committed copies under
/// `ckpt-user/fuzz/seeds` can be checked against them.
pub fn seeds(scratch: &Path) -> Vec<(String, Vec<u8>)> {
    let at = scratch.join("seed.img");
    let minimal = Image {
        id: "seed-minimal".into(),
        hostname: "fuzz".into(),
        kernel: "6.18".into(),
        cgroup: "/sys/fs/cgroup/job".into(),
        source: "proc".into(),
        processes: vec![proc(10, 1, &[(3, 0)])],
        files: vec![open_file(0, "/tmp/fuzz/a", 100, false, &[(10, 3)])],
        fingerprints: vec![Fingerprint {
            path: "/tmp/fuzz/a".into(),
            dev: KernelDev::new(8, 1),
            ino: 100,
            size: 5,
            mtime_ns: 1,
            ctime_ns: 1,
            handle: None,
            sha256: None,
            unlinked: false,
        }],
        ..Default::default()
    };
    let rich = Image {
        id: "seed-rich".into(),
        created_unix_ns: 1_700_000_000_000_000_000,
        hostname: "fuzz".into(),
        kernel: "6.18".into(),
        cgroup: "/sys/fs/cgroup/job".into(),
        frozen_monotonic_ns: 5_000_000_000,
        frozen_ns: 1_500_000,
        source: "agent".into(),
        missing: vec![],
        processes: vec![
            proc(10, 1, &[(0, 3), (3, 0), (4, 1), (5, 2)]),
            proc(11, 10, &[(3, 0), (6, 1)]),
            proc(12, 11, &[(7, 2), (8, 4)]),
        ],
        files: vec![
            open_file(0, "/tmp/fuzz/a", 100, false, &[(10, 3), (11, 3)]),
            open_file(1, "/tmp/fuzz/b", 101, false, &[(10, 4), (11, 6)]),
            open_file(2, "/tmp/fuzz/gone", 102, true, &[(10, 5), (12, 7)]),
            OpenFile {
                kind: FileKind::Fifo,
                path: "pipe:[7]".into(),
                ..open_file(3, "", 103, false, &[(10, 0)])
            },
            open_file(4, "/tmp/fuzz/c", 104, false, &[(12, 8)]),
        ],
        locks: vec![
            Lock {
                kind: LockKind::Posix,
                lock_type: LockType::Write,
                start: 0,
                end: 99,
                pid: 10,
                file: 0,
                dev: KernelDev::new(8, 1),
                ino: 100,
            },
            Lock {
                kind: LockKind::Ofd,
                lock_type: LockType::Read,
                start: 100,
                end: i64::MAX,
                pid: 11,
                file: 1,
                dev: KernelDev::new(8, 1),
                ino: 101,
            },
            Lock {
                kind: LockKind::Flock,
                lock_type: LockType::Write,
                start: 0,
                end: i64::MAX,
                pid: 12,
                file: 4,
                dev: KernelDev::new(8, 1),
                ino: 104,
            },
        ],
        waiters: vec![Waiter {
            pid: 12,
            tid: 12,
            kind: HeldKind::Lock(LockKind::Posix),
            lock_type: LockType::Write,
            start: 0,
            end: 10,
            dev: KernelDev::new(8, 1),
            ino: 100,
            waited_ns: Some(1_000_000),
        }],
        leases: vec![lease(1, 10, true), lease(4, 12, false)],
        ghosts: vec![Ghost {
            dev: KernelDev::new(8, 1),
            ino: 102,
            path: "/tmp/fuzz/gone".into(),
            size: 8192,
            mode: 0o100600,
            extents: vec![(0, 5), (4096, 3)],
            data_offset: 0,
            uid: Some(1),
            gid: Some(1),
            linkable: true,
            memfd: Some(Memfd {
                name: "fuzz".into(),
                seals: 0xf,
            }),
            maps: vec![GhostMap {
                pid: 1,
                start: 0x1000,
                end: 0x3000,
                offset: 0,
                perms: "rw-s".into(),
            }],
        }],
        fingerprints: vec![
            Fingerprint {
                path: "/tmp/fuzz/a".into(),
                dev: KernelDev::new(8, 1),
                ino: 100,
                size: 5,
                mtime_ns: 1,
                ctime_ns: 1,
                handle: Some((1, vec![9; 8])),
                sha256: Some("00".repeat(32)),
                unlinked: false,
            },
            Fingerprint {
                path: "/tmp/fuzz/b".into(),
                dev: KernelDev::new(8, 1),
                ino: 101,
                size: 0,
                mtime_ns: -1,
                ctime_ns: 0,
                handle: None,
                sha256: None,
                unlinked: true,
            },
        ],
    };
    let mut v1 = write_image(&minimal, &[], &at);
    // Format 1: version 1, and a 48-byte trailer (no key id, no MAC).
    {
        let len = v1.len();
        let (off, mlen) = (
            u64::from_le_bytes(v1[len - 88..len - 80].try_into().unwrap()),
            u64::from_le_bytes(v1[len - 80..len - 72].try_into().unwrap()),
        );
        v1.truncate(len - 88);
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&off.to_le_bytes());
        v1.extend_from_slice(&mlen.to_le_bytes());
        let sum = Sha256::digest(&v1);
        v1.extend_from_slice(&sum);
    }
    vec![
        ("minimal.img".into(), write_image(&minimal, &[], &at)),
        (
            "rich.img".into(),
            write_image(&rich, &[(0, b"hello\0\0\0end".to_vec())], &at),
        ),
        ("format1.img".into(), v1),
        ("empty.img".into(), write_image(&Image::default(), &[], &at)),
    ]
}

/// The inputs of issue 16's defects 1-3 (name, bytes), kept with the crashes found.
pub fn issue16_inputs(scratch: &Path) -> Vec<(String, Vec<u8>)> {
    let at = scratch.join("issue16.img");
    let base = Image {
        processes: vec![proc(1, 0, &[(3, 0)])],
        files: vec![open_file(0, "/f", 1, false, &[(1, 3)])],
        ..Default::default()
    };
    let mut lease_99 = base.clone();
    lease_99.leases.push(Lease {
        file: 99,
        ..lease(0, 1, false)
    });
    let mut fd_4e9 = base.clone();
    fd_4e9.processes[0].fds[0].file = 4_000_000_000;
    let plain = write_image(&base, &[], &at);
    // The trailer's metadata location rewritten so that offset + length wraps onto
    // the trailer, and the checksum recomputed.
    let relocated = |len: u64| {
        let mut b = plain.clone();
        let t = b.len() - 88;
        put_u64(&mut b, t, (t as u64).wrapping_sub(len));
        put_u64(&mut b, t + 8, len);
        recompute_checksum(&mut b);
        b
    };
    vec![
        (
            "issue16-1-lease-file-99.img".into(),
            write_image(&lease_99, &[], &at),
        ),
        (
            "issue16-2-fd-file-4000000000.img".into(),
            write_image(&fd_4e9, &[], &at),
        ),
        ("issue16-3-offset-wraps.img".into(), relocated(1 << 63)),
        ("issue16-3-length-2-36.img".into(), relocated(1 << 36)),
    ]
}

/// Where fuzz scratch files go: tmpfs when there is one (every input is written, and
/// structured inputs go through the writer's fsync).
pub fn scratch_base() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Recomputes the SHA-256 trailer, as anyone rewriting an image can.
pub fn recompute_checksum(b: &mut [u8]) {
    if b.len() >= 32 {
        let body = b.len() - 32;
        let sum = Sha256::digest(&b[..body]);
        b[body..].copy_from_slice(&sum);
    }
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    if at + 8 <= b.len() {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
}

/// A raw mutation of `seed` (`other` for splices).
pub fn mutate_raw(rng: &mut Rng, seed: &[u8], other: &[u8], recompute: bool) -> Vec<u8> {
    let mut b = seed.to_vec();
    let tlen = if b.get(8) == Some(&1) { 48 } else { 88 };
    for _ in 0..1 + rng.below(4) {
        if b.is_empty() {
            b.push(0);
        }
        let at = rng.below(b.len());
        match rng.below(11) {
            0 => b[at] ^= 1 << rng.below(8),
            1 => b[at] = [0, 0xff, 0x7f, 0x80, 1][rng.below(5)],
            2 => b[at] = MSGPACK[rng.below(MSGPACK.len())],
            3 => {
                let v = interesting(rng);
                let bytes = v.to_le_bytes();
                let n = [1, 2, 4, 8][rng.below(4)];
                for (i, x) in bytes.iter().take(n).enumerate() {
                    if at + i < b.len() {
                        b[at + i] = *x;
                    }
                }
            }
            4 => {
                let n = 1 + rng.below(16);
                for _ in 0..n {
                    b.insert(at, rng.next_u64() as u8);
                }
            }
            5 => {
                let n = (1 + rng.below(32)).min(b.len() - at);
                b.drain(at..at + n);
            }
            6 => {
                let n = (1 + rng.below(64)).min(b.len() - at);
                let chunk = b[at..at + n].to_vec();
                let to = rng.below(b.len());
                b.splice(to..to, chunk);
            }
            7 => b.truncate(at),
            8 => {
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    let n = (1 + rng.below(256)).min(other.len() - from);
                    let end = (at + n).min(b.len());
                    b.splice(at..end, other[from..from + n].iter().copied());
                }
            }
            9 => {
                // The trailer's metadata offset or length.
                let len = b.len();
                if len >= tlen {
                    let field = len - tlen + 8 * rng.below(2);
                    let v = match rng.below(3) {
                        0 => interesting(rng),
                        1 => (len as u64).wrapping_sub(interesting(rng)),
                        _ => rng.next_u64(),
                    };
                    put_u64(&mut b, field, v);
                }
            }
            _ => {
                // The version field.
                if b.len() >= 12 {
                    b[8..12].copy_from_slice(&(interesting(rng) as u32).to_le_bytes());
                }
            }
        }
    }
    if recompute {
        // A length change moved the trailer: sometimes point it at the metadata again
        // so that the mutation reaches the decoder.
        let len = b.len();
        if rng.chance(2) && len >= tlen && len > seed.len().min(len) && seed.len() >= tlen {
            let off = u64::from_le_bytes(
                seed[seed.len() - tlen..seed.len() - tlen + 8]
                    .try_into()
                    .unwrap(),
            );
            if off < (len - tlen) as u64 {
                put_u64(&mut b, len - tlen, off);
                put_u64(&mut b, len - tlen + 8, (len - tlen) as u64 - off);
            }
        }
        recompute_checksum(&mut b);
    }
    b
}

/// A structured mutation: hostile field values in a valid, MAC'd image.
pub fn mutate_image(rng: &mut Rng, img: &Image) -> Image {
    let mut img = img.clone();
    for _ in 0..1 + rng.below(3) {
        let v = interesting(rng);
        let small = rng.below(8) as u32;
        let idx = if rng.chance(2) { v as u32 } else { small };
        match rng.below(16) {
            0 => {
                if let Some(fd) = img
                    .processes
                    .iter_mut()
                    .flat_map(|p| &mut p.fds)
                    .nth(rng.below(8))
                {
                    fd.file = idx;
                }
            }
            1 => {
                if let Some(l) = img.leases.first_mut() {
                    l.file = idx;
                }
            }
            2 => {
                if let Some(l) = img.locks.get_mut(rng.below(3)) {
                    l.file = idx;
                }
            }
            3 => {
                if let Some(l) = img.locks.get_mut(rng.below(3)) {
                    l.start = v as i64;
                    l.end = interesting(rng) as i64;
                }
            }
            4 => {
                if let Some(g) = img.ghosts.first_mut() {
                    match rng.below(3) {
                        0 => g.data_offset = v,
                        1 => g.size = v,
                        _ => g.extents.push((v, interesting(rng))),
                    }
                }
            }
            5 => {
                let n = img.processes.len();
                if n > 0 {
                    let (a, b) = (rng.below(n), rng.below(n));
                    img.processes[a].ppid = img.processes[b].pid;
                    if rng.chance(2) {
                        img.processes[b].ppid = img.processes[a].pid;
                    }
                }
            }
            6 => {
                if let Some(p) = img.processes.first().cloned() {
                    img.processes.push(p);
                }
            }
            7 => {
                if let Some(fd) = img
                    .processes
                    .iter_mut()
                    .flat_map(|p| &mut p.fds)
                    .nth(rng.below(8))
                {
                    fd.fd = v as i32;
                }
            }
            8 => {
                if let Some(l) = img.leases.first_mut() {
                    l.breaking = true;
                    l.remaining_ns = Some(v as i64);
                    l.downgrade_remaining_ns = Some(interesting(rng) as i64);
                    l.lease_break_time_s = Some(interesting(rng) as u32);
                }
            }
            9 => {
                if let Some(l) = img.leases.get_mut(rng.below(2)) {
                    l.pid = idx;
                    l.lease_type = None;
                    l.target_type = None;
                }
            }
            10 => {
                if let Some(f) = img.files.get_mut(rng.below(5)) {
                    f.deleted = !f.deleted;
                    f.owner = Some((rng.below(4) as i32, v as i32));
                    f.sig = v as i32;
                }
            }
            11 => {
                if let Some(p) = img.processes.first_mut() {
                    p.cmdline = if rng.chance(2) {
                        vec![]
                    } else {
                        vec![String::new()]
                    };
                }
            }
            12 => {
                if let Some(l) = img.locks.get_mut(rng.below(3)) {
                    l.pid = idx;
                    l.kind = [LockKind::Posix, LockKind::Ofd, LockKind::Flock][rng.below(3)];
                }
            }
            13 => {
                if let Some(f) = img.fingerprints.first_mut() {
                    f.size = v;
                    f.mtime_ns = v as i64;
                }
            }
            14 => img.files.truncate(rng.below(img.files.len() + 1)),
            _ => {
                if let Some(f) = img.files.get_mut(rng.below(5)) {
                    f.flags = v as u32;
                    f.pos = v;
                    f.kind =
                        [FileKind::Regular, FileKind::Directory, FileKind::Socket][rng.below(3)];
                }
            }
        }
    }
    img
}

/// What one input did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The reader took it (then inspect and restore's checks ran).
    Opened,
    /// Refused with an error (the expected end of most inputs).
    Refused,
    /// A bug: the message.
    Panicked(String),
}

thread_local! {
    static FUZZING: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// While alive, the fuzzing thread's panics are quiet and recorded; other threads'
/// panics print as before (through the default hook, which the test harness uses).
struct QuietPanics;

impl QuietPanics {
    fn install() -> QuietPanics {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if FUZZING.with(Cell::get) {
                let at = info
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                let msg = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(std::string::ToString::to_string)
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                LAST_PANIC.with(|p| *p.borrow_mut() = format!("{msg}{at}"));
            } else {
                default(info);
            }
        }));
        QuietPanics
    }
}

impl Drop for QuietPanics {
    fn drop(&mut self) {
        // Back to the default hook.
        drop(panic::take_hook());
    }
}

/// Every reader of an image on `bytes` (written to `scratch` first).
pub fn one(bytes: &[u8], scratch: &Path, key: &HostKey) -> Outcome {
    if std::fs::write(scratch, bytes).is_err() {
        return Outcome::Refused;
    }
    FUZZING.with(|f| f.set(true));
    let r = panic::catch_unwind(AssertUnwindSafe(|| readers(scratch, key)));
    FUZZING.with(|f| f.set(false));
    match r {
        Ok(true) => Outcome::Opened,
        Ok(false) => Outcome::Refused,
        Err(_) => Outcome::Panicked(LAST_PANIC.with(|p| p.borrow().clone())),
    }
}

fn readers(path: &Path, key: &HostKey) -> bool {
    // As inspect (the key may be missing) and as restore (with the key).
    let _ = ImageReader::open(path, None);
    let Ok(r) = ImageReader::open(path, Some(key)) else {
        return false;
    };
    let img = &r.image;
    let _ = r.auth.describe();
    let _ = inspect::summary(img);
    let _ = inspect::tree(img);
    let _ = serde_json::to_vec_pretty(img);
    let exec_cmds = HashMap::new();
    for skip_unsupported in [false, true] {
        let _ = plan::build(
            img,
            &PlanOptions {
                exec_cmds: &exec_cmds,
                skip_unsupported,
                keep_cloexec: skip_unsupported,
            },
        );
    }
    if plan::build(
        img,
        &PlanOptions {
            exec_cmds: &exec_cmds,
            skip_unsupported: true,
            keep_cloexec: false,
        },
    )
    .is_ok()
    {
        for policy in [
            LeaseTime::Exact,
            LeaseTime::Holder,
            LeaseTime::Breaker,
            LeaseTime::Delta(1_000_000_000),
            LeaseTime::Delta(-1_000_000_000),
        ] {
            let mut remaining: Vec<_> = img
                .leases
                .iter()
                .enumerate()
                .filter(|(_, l)| l.breaking)
                .filter_map(|(i, l)| remaining_after_restore(l, policy, 45).ok().map(|r| (i, r)))
                .collect();
            // Downgrades planned before their unlocks, as the restore plans them (its
            // downgrade breaks come after the image's leases).
            let mut first = Vec::new();
            for (i, unlock) in remaining.clone() {
                let l = &img.leases[i];
                let d = downgrade_first(
                    l.downgrade_remaining_ns,
                    unlock,
                    l.lease_break_time_s,
                    policy,
                    45,
                );
                if let Some(d) = d.filter(|_| l.target_type.is_none()) {
                    let at = img.leases.len() + first.len();
                    first.push((at, i));
                    remaining.push((at, d));
                }
            }
            let _ = plan_breaks(&remaining, &first, Duration::from_millis(4));
        }
        // The file check only stats paths (and hashes a file only if everything else
        // about it matched).
        let _ = validate::check(img, true);
    }
    true
}

pub struct Options {
    pub seconds: f64,
    /// Stop after this many inputs (None: only the time bounds the run).
    pub max_inputs: Option<u64>,
    pub recompute_checksum: bool,
    pub seed: u64,
    /// Extra seed images (e.g. the committed corpus, real dumps).
    pub corpus: Vec<Vec<u8>>,
    /// Scratch directory (the last input is left in `current.img`).
    pub scratch: PathBuf,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub inputs: u64,
    pub opened: u64,
    pub refused: u64,
    pub elapsed: Duration,
    /// The slowest input (a hang would show here).
    pub slowest: Duration,
    /// Panicking inputs and their messages.
    pub panics: Vec<(Vec<u8>, String)>,
}

impl Stats {
    pub fn per_second(&self) -> f64 {
        self.inputs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The bounded mutation loop.
pub fn run(opts: &Options) -> Stats {
    std::fs::create_dir_all(&opts.scratch).expect("creating the fuzz scratch directory");
    let key = fuzz_key();
    let mut corpus: Vec<Vec<u8>> = seeds(&opts.scratch).into_iter().map(|(_, b)| b).collect();
    corpus.extend(opts.corpus.iter().cloned());
    let decoded: Vec<Image> = corpus
        .iter()
        .filter_map(|b| {
            let p = opts.scratch.join("decode.img");
            std::fs::write(&p, b).ok()?;
            ImageReader::open(&p, None).ok().map(|r| r.image)
        })
        .collect();
    let current = opts.scratch.join("current.img");
    let writing = opts.scratch.join("structured.img");
    let mut rng = Rng::new(opts.seed);
    let mut stats = Stats::default();
    let quiet = QuietPanics::install();
    let start = Instant::now();
    let limit = Duration::from_secs_f64(opts.seconds.max(0.0));
    while start.elapsed() < limit && opts.max_inputs.is_none_or(|m| stats.inputs < m) {
        let input = if opts.recompute_checksum && !decoded.is_empty() && rng.chance(3) {
            let which = rng.below(decoded.len());
            let img = mutate_image(&mut rng, &decoded[which]);
            let ghosts: Vec<(usize, Vec<u8>)> = if img.ghosts.is_empty() {
                vec![]
            } else {
                vec![(0, b"fuzzed".to_vec())]
            };
            // Some hostile values stay as they are (a ghost's data offset): the writer
            // sets it only for the first ghost, and not always.
            let ghosts = if rng.chance(2) { ghosts } else { vec![] };
            write_image(&img, &ghosts, &writing)
        } else {
            let seed = &corpus[rng.below(corpus.len())];
            let other = &corpus[rng.below(corpus.len())];
            // Without recomputing, a few inputs still get past the checksum by chance
            // only through header and length checks; recomputing is the useful mode.
            let recompute = opts.recompute_checksum && !rng.chance(10);
            mutate_raw(&mut rng, seed, other, recompute)
        };
        let t = Instant::now();
        let outcome = one(&input, &current, &key);
        stats.slowest = stats.slowest.max(t.elapsed());
        stats.inputs += 1;
        match outcome {
            Outcome::Opened => stats.opened += 1,
            Outcome::Refused => stats.refused += 1,
            Outcome::Panicked(msg) => stats.panics.push((input, msg)),
        }
    }
    stats.elapsed = start.elapsed();
    drop(quiet);
    stats
}

/// Where the committed corpus lives (relative to this crate).
pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The images in a directory (sorted by name).
pub fn load_dir(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".img")
                .then(|| std::fs::read(e.path()).ok().map(|b| (name, b)))
                .flatten()
        })
        .collect();
    out.sort();
    out
}

/// A name for a crashing input: the first bytes of its SHA-256.
pub fn crash_name(bytes: &[u8]) -> String {
    format!("crash-{}.img", hex::encode(&Sha256::digest(bytes)[..8]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = scratch_base().join(format!("ckpt-fuzz-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_committed_seeds_are_the_generated_ones() {
        let d = scratch("seeds");
        let generated = seeds(&d);
        let dir = corpus_dir().join("seeds");
        if std::env::var_os("CKPT_BLESS_FUZZ_SEEDS").is_some() {
            for (sub, images) in [("seeds", &generated), ("crashes", &issue16_inputs(&d))] {
                std::fs::create_dir_all(corpus_dir().join(sub)).unwrap();
                for (name, b) in images {
                    std::fs::write(corpus_dir().join(sub).join(name), b).unwrap();
                }
            }
        }
        let mut want = generated.clone();
        want.sort();
        let committed = load_dir(&dir);
        let names = |v: &[(String, Vec<u8>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert!(
            committed == want,
            "ckpt-user/fuzz/seeds ({:?}) differs from fuzz::seeds() ({:?}): CKPT_BLESS_FUZZ_SEEDS=1 cargo test -p ckpt-user --lib fuzz rewrites it",
            names(&committed),
            names(&want)
        );
        let key = fuzz_key();
        for (name, b) in &generated {
            assert_eq!(one(b, &d.join("x.img"), &key), Outcome::Opened, "{name}");
        }
        std::fs::remove_dir_all(d).unwrap();
    }

    /// Every crashing input found (issue 16's and the fuzzer's) stays fixed.
    #[test]
    fn every_crashing_input_found_is_refused_or_read_without_a_panic() {
        let d = scratch("crashes");
        let crashes = load_dir(&corpus_dir().join("crashes"));
        assert!(crashes.len() >= 4, "the regression inputs are missing");
        let key = fuzz_key();
        for (name, b) in &crashes {
            let got = one(b, &d.join("x.img"), &key);
            assert!(!matches!(got, Outcome::Panicked(_)), "{name}: {got:?}");
        }
        std::fs::remove_dir_all(d).unwrap();
    }

    /// The short bounded run of `cargo xtask test` (`cargo xtask fuzz` runs longer).
    #[test]
    fn a_short_fuzz_run_finds_no_panic() {
        let d = scratch("run");
        let corpus = load_dir(&corpus_dir().join("crashes"))
            .into_iter()
            .map(|(_, b)| b)
            .collect();
        let stats = run(&Options {
            seconds: 3.0,
            max_inputs: Some(200_000),
            recompute_checksum: true,
            seed: 0x16,
            corpus,
            scratch: d.clone(),
        });
        eprintln!(
            "fuzz: {} inputs in {:.1} s ({:.0}/s): {} opened, {} refused, {} panics, slowest {:.1} ms",
            stats.inputs,
            stats.elapsed.as_secs_f64(),
            stats.per_second(),
            stats.opened,
            stats.refused,
            stats.panics.len(),
            stats.slowest.as_secs_f64() * 1e3
        );
        let _ = std::fs::remove_dir_all(&d);
        assert!(stats.inputs > 100, "the fuzzer barely ran");
        assert!(stats.opened > 0, "no mutation got past the checks");
        if let Some((input, msg)) = stats.panics.first() {
            let keep = corpus_dir().join("crashes").join(crash_name(input));
            let _ = std::fs::write(&keep, input);
            panic!(
                "{} panics; the first: {msg} (input kept as {})",
                stats.panics.len(),
                keep.display()
            );
        }
    }

    #[test]
    fn mutations_are_reproducible_from_the_seed() {
        let d = scratch("repro");
        let s = seeds(&d);
        let a = mutate_raw(&mut Rng::new(9), &s[1].1, &s[0].1, true);
        let b = mutate_raw(&mut Rng::new(9), &s[1].1, &s[0].1, true);
        assert_eq!(a, b);
        std::fs::remove_dir_all(d).unwrap();
    }
}
