//! Empty programs, for `cargo xtask bench`: attached to the tracepoints ckpt-agent
//! attaches, as the same kinds (BTF or classic), they measure what the tracepoints
//! alone cost, whatever a program does: the floor of any tracer on them (`--only
//! tracer`). Empty iterators over every fd and every mapping measure what the
//! kernel's walk alone costs: the floor of any reader of the fd tables, such as
//! `ckpt-user locks` and `deleted` (`--only views`).
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};

/// Loaded once per BTF tracepoint (the target is fixed at load time).
#[btf_tracepoint]
pub fn empty_btf(_ctx: BtfTracePointContext) -> i32 {
    0
}

/// Loaded once, attached to every classic tracepoint.
#[tracepoint]
pub fn empty_tracepoint(_ctx: TracePointContext) -> u32 {
    0
}

/// Visits every fd of every process and emits nothing.
#[unsafe(link_section = "iter/task_file")]
#[unsafe(no_mangle)]
pub extern "C" fn empty_task_file(_ctx: *const core::ffi::c_void) -> i32 {
    0
}

/// Visits every mapping of every process and emits nothing.
#[unsafe(link_section = "iter/task_vma")]
#[unsafe(no_mangle)]
pub extern "C" fn empty_task_vma(_ctx: *const core::ffi::c_void) -> i32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
