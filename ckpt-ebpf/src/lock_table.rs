//! The lock table as the kernel holds it, for `ckpt-user locks` and dump's look at
//! waiters: iterators over every process's fds and mappings that emit, for each
//! description holding a lock or lease, the lock lines of `lock_walk` (locks, leases
//! with their deadlines, blocked requests) followed by the fd (or mapping) record
//! they belong to, with its path. Descriptions without locks cost a few field loads
//! and emit nothing.
//!
//! A description held only by a mapping (its fds closed after mmap) keeps its OFD and
//! flock locks and leases: the mapping iterator finds those. A description only in
//! flight over a socket is in no table the kernel lets BPF walk here (the global
//! `file_lock_list` needs a kallsyms address the 6.18 host does not export).

use core::ptr::read_volatile;

use aya_ebpf::{macros::map, maps::PerCpuArray};
use ckpt_common::files::{tag, FdScratch, FD_RECORD_SIZE, MAPPING_FD, PATH_MAX};

use crate::{
    files::{emit_task, write, TaskFileCtx, FD_SCRATCH},
    helpers::{field, file_path, layout, ready},
    iter::IterMeta,
    lock_walk::walk,
};

/// The last process whose record this CPU emitted in a session (per CPU: a program
/// run does not migrate). A process's record precedes its first fd with locks; a
/// repeat after a migration is harmless, and userspace reads /proc for a missing one.
#[map]
static LAST_TASK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `struct bpf_iter__task_vma`.
#[repr(C)]
pub struct TaskVmaCtx {
    meta: *const IterMeta,
    task: u64,
    vma: u64,
}

#[unsafe(link_section = "iter/task_file")]
#[unsafe(no_mangle)]
pub extern "C" fn lock_table(ctx: *const TaskFileCtx) -> i32 {
    if ready() {
        // SAFETY: the kernel passes a valid context; fields read one at a time.
        let (meta, task, fd, file) = unsafe {
            (
                read_volatile(&(*ctx).meta),
                read_volatile(&(*ctx).task),
                read_volatile(&(*ctx).fd),
                read_volatile(&(*ctx).file),
            )
        };
        if !file.is_null() && task != 0 {
            let _ = emit(meta, task, fd, file as u64, 0);
        }
    }
    0
}

#[unsafe(link_section = "iter/task_vma")]
#[unsafe(no_mangle)]
pub extern "C" fn lock_table_maps(ctx: *const TaskVmaCtx) -> i32 {
    if ready() {
        // SAFETY: as above.
        let (meta, task, vma) = unsafe {
            (
                read_volatile(&(*ctx).meta),
                read_volatile(&(*ctx).task),
                read_volatile(&(*ctx).vma),
            )
        };
        if vma != 0 && task != 0 {
            let file: u64 = field(vma, layout!(deleted.vma_file));
            if file != 0 {
                let _ = emit(meta, task, MAPPING_FD, file, vma);
            }
        }
    }
    0
}

/// The locks held through `file` (fd `fd` of `task`, or mapping `vma`): nothing unless
/// its inode has a lock context.
#[inline(always)]
fn emit(meta: *const IterMeta, task: u64, fd: u32, file: u64, vma: u64) -> Result<(), i32> {
    let inode: u64 = field(file, layout!(files.file_inode));
    if field::<u64>(inode, layout!(lock_lists.inode_flctx)) == 0 {
        return Ok(());
    }
    let scratch: *mut FdScratch = FD_SCRATCH.get_ptr_mut(0).ok_or(-1i32)?;
    let last = LAST_TASK.get_ptr_mut(0).ok_or(-1i32)?;
    // SAFETY: meta and seq are the kernel's for this session.
    let (seq, first) = unsafe {
        (
            read_volatile(&(*meta).seq),
            read_volatile(&(*meta).seq_num) == 0,
        )
    };
    if first {
        // SAFETY: this CPU's slot.
        unsafe { *last = 0 };
    }
    let tgid: u32 = field(task, layout!(files.task_tgid));
    // A mapping holds OFD and flock locks and leases (owned by the file), never a
    // process's POSIX locks: those are found through its fds.
    let files: u64 = if fd == MAPPING_FD {
        0
    } else {
        field(task, layout!(files.task_files))
    };
    // The fd record follows its lines (written only when there are some).
    if walk(seq, scratch, inode, file, files)? {
        // SAFETY: this CPU's slot.
        if unsafe { *last } != task {
            // SAFETY: as above.
            unsafe { *last = task };
            let _ = emit_task(seq, scratch, task, tgid);
        }
        // SAFETY: per-CPU slot, exclusively ours for this call.
        let (r, path) = unsafe { (&mut (*scratch).record, (*scratch).path.as_mut_ptr()) };
        r.tag = tag::FD;
        r.tgid = tgid;
        r.fd = fd;
        r.file = file;
        r.files = files;
        r.ino = field(inode, layout!(files.inode_ino));
        let sb: u64 = field(inode, layout!(files.inode_sb));
        r.s_dev = field(sb, layout!(files.sb_dev));
        r.pos = 0;
        r.size = 0;
        r.path_len = 0;
        if vma == 0 {
            r.path_len = file_path(file as *const u8, path);
        } else {
            // bpf_d_path wants a file the iterator handed over; userspace reads the
            // path from /proc/PID/map_files/START-END.
            r.pos = field(vma, layout!(deleted.vma_start));
            r.size = field(vma, layout!(deleted.vma_end));
        }
        // Read back and masked so that older verifiers see the bound (see files.rs).
        // SAFETY: our own scratch.
        let len =
            FD_RECORD_SIZE as u32 + (unsafe { read_volatile(&r.path_len) } & (PATH_MAX as u32 - 1));
        write(seq, scratch as *const core::ffi::c_void, len);
    }
    Ok(())
}
