//! ckpt's BPF iterator programs, an object of their own: they need no pinned map, so
//! `ckpt-user` loads them itself when no agent runs (and a dump or a view never
//! depends on the agent's version). They read the kernel's own tables: every fd and
//! mapping with its locks, leases and blocked requests (`lock_table`, `files`) and
//! the deleted-but-open files (`deleted_scan`).
#![no_std]
#![no_main]

mod deleted_scan;
mod files;
mod helpers;
mod iter;
mod lock_table;
mod lock_walk;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
