//! The LOCK_EVENTS ring buffer, read through the kernel's mmap ABI
//! (kernel/bpf/ringbuf.c): page 0 holds the consumer position (writable by the
//! consumer), page 1 the producer position, then the data pages, mapped twice in a row
//! so that a record wrapping around the end reads as one slice.
//!
//! aya's `RingBuf` advances the consumer position as each record is dropped. The agent
//! needs the opposite: read a batch, apply it, write the lock table, and only *then*
//! advance. That makes a crash between reading and writing harmless (the batch is read
//! again by the next agent, and replaying is idempotent), and it makes the consumer
//! position a watermark readers can wait on ([`RingObserver`]).

use std::{
    os::fd::{AsFd as _, AsRawFd, RawFd},
    sync::atomic::{fence, AtomicU32, AtomicU64, Ordering},
};

use anyhow::{bail, Result};
use aya::maps::MapData;
use ckpt_common::{lease::LeaseEvent, lock::LockEvent, tag};

const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
const HDR_SZ: u64 = 8;

struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(fd: RawFd, len: usize, prot: i32, offset: usize) -> Result<Mapping> {
        // SAFETY: a fresh shared mapping of a ring buffer map fd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("mmap of ring buffer: {}", std::io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr as *mut u8,
            len,
        })
    }

    fn word(&self) -> &AtomicU64 {
        // SAFETY: page-aligned mapping at least 8 bytes long.
        unsafe { &*(self.ptr as *const AtomicU64) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what new() mapped.
        unsafe { libc::munmap(self.ptr as *mut _, self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// One record of the ring, by its tag.
pub enum Event {
    Lock(LockEvent),
    Lease(LeaseEvent),
}

impl Event {
    /// None for an unknown tag or a short record.
    pub fn decode(bytes: &[u8]) -> Option<Event> {
        let tag = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
        // SAFETY (both arms): the programs write whole structs of the tagged type;
        // read_unaligned copes with the ring's 8-byte alignment.
        match tag {
            tag::LOCK if bytes.len() >= size_of::<LockEvent>() => Some(Event::Lock(unsafe {
                std::ptr::read_unaligned(bytes.as_ptr() as *const LockEvent)
            })),
            tag::LEASE if bytes.len() >= size_of::<LeaseEvent>() => Some(Event::Lease(unsafe {
                std::ptr::read_unaligned(bytes.as_ptr() as *const LeaseEvent)
            })),
            _ => None,
        }
    }
}

/// The producer page followed by the doubly mapped data pages.
struct Records {
    map: Mapping,
    page: usize,
    mask: u64,
}

impl Records {
    fn open(map: &MapData) -> Result<Records> {
        let page = page_size();
        let size = map.info()?.max_entries() as usize;
        if !size.is_power_of_two() || size < page {
            bail!("ring buffer size {size} is not a power-of-two multiple of the page size");
        }
        let fd = map.fd().as_fd().as_raw_fd();
        Ok(Records {
            map: Mapping::new(fd, page + 2 * size, libc::PROT_READ, page)?,
            page,
            mask: size as u64 - 1,
        })
    }

    fn producer(&self) -> u64 {
        self.map.word().load(Ordering::Acquire)
    }

    /// Calls `f(record, position)` for each committed record from `pos` on. Returns
    /// the position after the last record read; stops early at a record still being
    /// written.
    fn walk(&self, mut pos: u64, mut f: impl FnMut(&[u8], u64)) -> u64 {
        let producer = self.producer();
        while pos < producer {
            let off = self.page + (pos & self.mask) as usize;
            // SAFETY: off + 8 lies within the first copy of the data pages.
            let hdr =
                unsafe { &*(self.map.ptr.add(off) as *const AtomicU32) }.load(Ordering::Acquire);
            if hdr & BUSY_BIT != 0 {
                break;
            }
            let len = (hdr & !(BUSY_BIT | DISCARD_BIT)) as usize;
            if hdr & DISCARD_BIT == 0 {
                // SAFETY: a record never exceeds the ring size, and the data pages are
                // mapped twice, so [off + 8, off + 8 + len) is mapped.
                let data = unsafe {
                    std::slice::from_raw_parts(self.map.ptr.add(off + HDR_SZ as usize), len)
                };
                f(data, pos);
            }
            pos += (len as u64 + HDR_SZ).next_multiple_of(8);
        }
        pos
    }
}

/// Read-only view for readers: the positions, to wait on the agent, and the events it
/// has not applied yet.
pub struct RingObserver {
    _map: MapData,
    consumer: Mapping,
    records: Records,
}

impl RingObserver {
    pub fn open(map: MapData) -> Result<RingObserver> {
        let fd = map.fd().as_fd().as_raw_fd();
        Ok(RingObserver {
            consumer: Mapping::new(fd, page_size(), libc::PROT_READ, 0)?,
            records: Records::open(&map)?,
            _map: map,
        })
    }

    /// Bytes of events the agent has applied (and acknowledged).
    pub fn consumer(&self) -> u64 {
        self.consumer.word().load(Ordering::Acquire)
    }

    /// Bytes of events the programs have reserved so far.
    pub fn producer(&self) -> u64 {
        self.records.producer()
    }

    /// Calls `f(record)` for each event the agent has not applied yet. A record the
    /// agent acknowledges meanwhile may be overwritten while `f` reads it (only after
    /// a whole ring's worth of newer events): check what it holds.
    pub fn peek(&self, mut f: impl FnMut(&[u8])) {
        self.records.walk(self.consumer(), |r, _| f(r));
    }
}

/// The agent's consumer: batch reads with an explicit commit.
pub struct RingConsumer {
    map: MapData,
    consumer: Mapping,
    records: Records,
}

impl RingConsumer {
    pub fn open(map: MapData) -> Result<RingConsumer> {
        let fd = map.fd().as_fd().as_raw_fd();
        Ok(RingConsumer {
            consumer: Mapping::new(fd, page_size(), libc::PROT_READ | libc::PROT_WRITE, 0)?,
            records: Records::open(&map)?,
            map,
        })
    }

    pub fn position(&self) -> u64 {
        self.consumer.word().load(Ordering::Acquire)
    }

    /// Bytes reserved by the programs so far (records before it were produced
    /// before this call).
    pub fn producer(&self) -> u64 {
        self.records.producer()
    }

    /// Calls `f(record, position)` for each committed record after the consumer
    /// position, without advancing it. Returns the position after the last record
    /// read; stops early at a record still being written.
    pub fn read(&self, f: impl FnMut(&[u8], u64)) -> u64 {
        self.records.walk(self.position(), f)
    }

    /// Acknowledges everything before `pos`.
    pub fn commit(&self, pos: u64) {
        self.consumer.word().store(pos, Ordering::Release);
        // Pairs with the producer's check of the consumer position when it decides
        // whether to send a wakeup: either our next read sees its record, or it sees our
        // position and wakes us.
        fence(Ordering::SeqCst);
    }
}

impl AsRawFd for RingConsumer {
    fn as_raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}
