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

/// Read-only view of the positions, for readers waiting on the agent.
pub struct RingObserver {
    _map: MapData,
    consumer: Mapping,
    producer: Mapping,
}

impl RingObserver {
    pub fn open(map: MapData) -> Result<RingObserver> {
        let page = page_size();
        let fd = map.fd().as_fd().as_raw_fd();
        Ok(RingObserver {
            consumer: Mapping::new(fd, page, libc::PROT_READ, 0)?,
            producer: Mapping::new(fd, page, libc::PROT_READ, page)?,
            _map: map,
        })
    }

    /// Bytes of events the agent has applied (and acknowledged).
    pub fn consumer(&self) -> u64 {
        self.consumer.word().load(Ordering::Acquire)
    }

    /// Bytes of events the programs have reserved so far.
    pub fn producer(&self) -> u64 {
        self.producer.word().load(Ordering::Acquire)
    }
}

/// The agent's consumer: batch reads with an explicit commit.
pub struct RingConsumer {
    map: MapData,
    consumer: Mapping,
    /// Producer page followed by the doubly mapped data pages.
    producer: Mapping,
    page: usize,
    mask: u64,
}

impl RingConsumer {
    pub fn open(map: MapData) -> Result<RingConsumer> {
        let page = page_size();
        let size = map.info()?.max_entries() as usize;
        if !size.is_power_of_two() || size < page {
            bail!("ring buffer size {size} is not a power-of-two multiple of the page size");
        }
        let fd = map.fd().as_fd().as_raw_fd();
        Ok(RingConsumer {
            consumer: Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?,
            producer: Mapping::new(fd, page + 2 * size, libc::PROT_READ, page)?,
            map,
            page,
            mask: size as u64 - 1,
        })
    }

    pub fn position(&self) -> u64 {
        self.consumer.word().load(Ordering::Acquire)
    }

    /// Bytes reserved by the programs so far (records before it were produced
    /// before this call).
    pub fn producer(&self) -> u64 {
        self.producer.word().load(Ordering::Acquire)
    }

    /// Calls `f(record, position)` for each committed record after the consumer
    /// position, without advancing it. Returns the position after the last record
    /// read; stops early at a record still being written.
    pub fn read(&self, mut f: impl FnMut(&[u8], u64)) -> u64 {
        let mut pos = self.position();
        let producer = self.producer.word().load(Ordering::Acquire);
        while pos < producer {
            let off = self.page + (pos & self.mask) as usize;
            // SAFETY: off + 8 lies within the first copy of the data pages.
            let hdr = unsafe { &*(self.producer.ptr.add(off) as *const AtomicU32) }
                .load(Ordering::Acquire);
            if hdr & BUSY_BIT != 0 {
                break;
            }
            let len = (hdr & !(BUSY_BIT | DISCARD_BIT)) as usize;
            if hdr & DISCARD_BIT == 0 {
                // SAFETY: a record never exceeds the ring size, and the data pages are
                // mapped twice, so [off + 8, off + 8 + len) is mapped.
                let data = unsafe {
                    std::slice::from_raw_parts(self.producer.ptr.add(off + HDR_SZ as usize), len)
                };
                f(data, pos);
            }
            pos += (len as u64 + HDR_SZ).next_multiple_of(8);
        }
        pos
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
