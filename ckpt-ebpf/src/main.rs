//! ckpt's eBPF programs: tracepoints and iterators only (fentry/kprobe/LSM are
//! refused on our hosts).
//!
//! This object holds the tracepoint programs and their pinned maps; the iterators are
//! the other object (`iters.rs`), which `ckpt-user` can load on its own.
//!
//! The kernel is the table: every held lock and lease is on its inode's lists, and
//! every blocked request hangs on its blocker. The iterators read them where they
//! are when a user or a dump asks. The tracepoint programs here record
//! only what the kernel forgets, on rare events: when a wait began (`locks`), when a
//! lease break began and who broke it (`leases`), and opt-in, when a lock was taken
//! (`locks`, `--hold-times`) and the triggers of exact deleted-file tracking
//! (`deleted`, `--exact-deleted`).
//!
//! Field offsets are never hard-coded: userspace reads them from tracefs and BTF and
//! sets the `LAYOUT` global before loading.
#![no_std]
#![no_main]
// The atomic add of `locks::add_waiting` (the bpf target has no atomic RMW methods).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod deleted;
mod helpers;
mod leases;
mod locks;
mod maps;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
