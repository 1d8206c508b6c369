//! ckpt's eBPF programs: tracepoints only (fentry/kprobe/LSM are refused on our hosts).
//!
//! Data flow: every *successful* lock request seen at filelock:posix_lock_inode or
//! filelock:flock_lock_inode goes to the `LOCK_EVENTS` ring buffer, which the agent
//! replays through the kernel's merge rules into `LOCKS`. Range splitting and merging
//! need unbounded loops over an owner's locks, which the verifier cannot accept, so
//! that part lives in userspace. Blocked waiters are simple per-thread facts and are
//! kept here directly in `WAITERS`.
//!
//! Tracepoint field offsets are never hard-coded: userspace reads them from tracefs and
//! sets the `LAYOUT` global before loading.
#![no_std]
#![no_main]

mod deleted;
mod files;
mod iter;
mod leases;
mod locks;
mod maps;
mod syscalls;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
