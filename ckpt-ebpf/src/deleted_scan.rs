//! The deleted-file scans: every fd and every mapping of every process that is a
//! deleted regular file. `ckpt-user deleted` runs them at call time; the agent in the
//! background (and, with `--exact-deleted`, when a trigger of deleted.rs fired).

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{helpers::generated::bpf_seq_write, macros::map, maps::PerCpuArray};
use ckpt_common::{
    deleted::{tag, DeletedScratch, DELETED_RECORD_SIZE},
    files::{PATH_MAX, PF_EXITING},
};

use crate::{
    helpers::{field, file_path, layout, ready},
    iter::IterMeta,
};

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;

#[map]
static DELETED_SCRATCH: PerCpuArray<DeletedScratch> = PerCpuArray::with_max_entries(1, 0);

/// `struct bpf_iter__task_file` / `bpf_iter__task_vma`: 8-byte slots.
#[repr(C)]
pub struct ScanCtx {
    meta: *const IterMeta,
    task: u64,
    /// task_file: the fd (u32) in an 8-byte slot; task_vma: the vma pointer.
    third: u64,
    file: *const u8,
}

/// Fills the scratch record for `file` if it is a deleted regular file.
#[inline(always)]
fn deleted_record(file: u64, task: u64) -> Option<*mut DeletedScratch> {
    if field::<u32>(task, layout!(tasks.flags)) & PF_EXITING != 0 {
        return None;
    }
    let inode: u64 = field(file, layout!(files.file_inode));
    let nlink: u32 = field(inode, layout!(files.inode_nlink));
    let mode = field::<u16>(inode, layout!(files.inode_mode)) as u32;
    if nlink != 0 || mode & S_IFMT != S_IFREG {
        return None;
    }
    let scratch = DELETED_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, exclusively ours for this call.
    let r = unsafe { &mut (*scratch).record };
    r.tgid = field(task, layout!(files.task_tgid));
    r.nlink = nlink;
    r.ino = field(inode, layout!(files.inode_ino));
    r.size = field(inode, layout!(files.inode_size));
    r.blocks = field(inode, layout!(files.inode_blocks));
    let sb: u64 = field(inode, layout!(files.inode_sb));
    r.s_dev = field(sb, layout!(files.sb_dev));
    r.fd = 0;
    r.start = 0;
    r.end = 0;
    r.path_len = 0;
    Some(scratch)
}

#[inline(always)]
fn seq_of(ctx: *const ScanCtx) -> *mut c_void {
    // SAFETY: meta and seq are the kernel's for this session.
    unsafe {
        let meta = read_volatile(&(*ctx).meta);
        read_volatile(&(*meta).seq)
    }
}

/// Every fd of every process that is a deleted regular file, with its path.
#[unsafe(link_section = "iter/task_file")]
#[unsafe(no_mangle)]
pub extern "C" fn deleted_fds(ctx: *const ScanCtx) -> i32 {
    if !ready() {
        return 0;
    }
    // SAFETY: the kernel passes a valid context.
    let (task, fd, file) = unsafe {
        (
            read_volatile(&(*ctx).task),
            read_volatile(&(*ctx).third) as u32,
            read_volatile(&(*ctx).file),
        )
    };
    if file.is_null() || task == 0 {
        return 0;
    }
    let Some(scratch) = deleted_record(file as u64, task) else {
        return 0;
    };
    // SAFETY: per-CPU slot, exclusively ours.
    let r = unsafe { &mut (*scratch).record };
    r.tag = tag::FD;
    r.fd = fd;
    // SAFETY: the scratch's path buffer, PATH_MAX bytes.
    r.path_len = file_path(file, unsafe { (*scratch).path.as_mut_ptr() });
    // Read back and masked so that older verifiers (6.1, 6.12) see the bound: LLVM
    // drops a mask on a value it knows is in range, and they cannot follow why.
    // SAFETY: our own scratch.
    let len = DELETED_RECORD_SIZE as u32
        + (unsafe { read_volatile(&r.path_len) } & (PATH_MAX as u32 - 1));
    // SAFETY: the scratch holds `len` bytes.
    unsafe { bpf_seq_write(seq_of(ctx) as *mut _, scratch as *const c_void, len) };
    0
}

/// Every mapping of a deleted regular file (the path comes from /proc's map_files).
#[unsafe(link_section = "iter/task_vma")]
#[unsafe(no_mangle)]
pub extern "C" fn deleted_maps(ctx: *const ScanCtx) -> i32 {
    if !ready() {
        return 0;
    }
    // SAFETY: the kernel passes a valid context.
    let (task, vma) = unsafe { (read_volatile(&(*ctx).task), read_volatile(&(*ctx).third)) };
    if vma == 0 || task == 0 {
        return 0;
    }
    let file: u64 = field(vma, layout!(deleted.vma_file));
    if file == 0 {
        return 0;
    }
    let Some(scratch) = deleted_record(file, task) else {
        return 0;
    };
    // SAFETY: per-CPU slot, exclusively ours.
    let r = unsafe { &mut (*scratch).record };
    r.tag = tag::MAP;
    r.start = field(vma, layout!(deleted.vma_start));
    r.end = field(vma, layout!(deleted.vma_end));
    // SAFETY: the scratch holds the record.
    unsafe {
        bpf_seq_write(
            seq_of(ctx) as *mut _,
            scratch as *const c_void,
            DELETED_RECORD_SIZE as u32,
        )
    };
    0
}
