//! The task_file iterator: one record per fd of every process named in `FD_FILTER`,
//! with what /proc/PID/fd (path), fdinfo (pos, flags, mnt_id) and fstat (inode
//! facts) would tell, plus the kernel identities /proc hides: the open file
//! description and the fd table, which are the owners of OFD/flock and POSIX locks.
//!
//! `ckpt-user dump` reads the pinned iterator once while the cgroup is frozen, instead
//! of four /proc reads and a pidfd_getfd per fd. BPF iterators are tracing programs
//! that, unlike fentry, load on our hosts (see TOOLCHAIN.md).

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    helpers::generated::{bpf_d_path, bpf_seq_write},
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use ckpt_common::{
    capacity,
    files::{
        filter, list, tag, FdScratch, FD_RECORD_SIZE, LOCK_LINE_SIZE, LOCK_LIST_MAX, PATH_MAX,
    },
};

use crate::maps::{kread, layout, ready};

const O_CLOEXEC: u32 = 0o2000000;

/// tgid -> `files::filter` mode. Written by `ckpt-user dump`.
#[map]
pub static FD_FILTER: LruHashMap<u32, u32> = LruHashMap::pinned(capacity::FD_FILTER, 0);

/// Room for one record and its path (too big for the 512-byte stack). Iterators run
/// with migration disabled, so a per-CPU slot is ours for the whole call.
#[map]
static FD_SCRATCH: PerCpuArray<FdScratch> = PerCpuArray::with_max_entries(1, 0);

/// `struct bpf_iter_meta`.
#[repr(C)]
pub struct IterMeta {
    seq: *mut c_void,
}

/// `struct bpf_iter__task_file`: every argument takes an 8-byte slot.
#[repr(C)]
pub struct TaskFileCtx {
    meta: *const IterMeta,
    task: u64,
    fd: u32,
    _pad: u32,
    file: *const u8,
}

#[unsafe(link_section = "iter/task_file")]
#[unsafe(no_mangle)]
pub extern "C" fn task_files(ctx: *const TaskFileCtx) -> i32 {
    if ready() {
        let _ = emit(ctx);
    }
    0
}

/// Reads the field at `off` of a kernel struct reached from the iterator's arguments.
/// The verifier checks such a load against BTF (the offset is a constant of the frozen
/// layout) and turns it into a plain load that cannot fault: several times cheaper
/// than a probe-read helper call, which matters at 25 fields per fd. A NULL pointer
/// reads as 0.
#[inline(always)]
fn field<T: Copy>(base: u64, off: u32) -> T {
    // SAFETY: see above; the kernel catches a bad address and yields 0.
    unsafe { read_volatile((base + off as u64) as *const T) }
}

#[inline(always)]
fn emit(ctx: *const TaskFileCtx) -> Result<(), i32> {
    // SAFETY: the kernel passes a valid context; fields are read one at a time with
    // their own sizes, as the verifier requires.
    let (file, task, fd) = unsafe {
        (
            read_volatile(&(*ctx).file),
            read_volatile(&(*ctx).task),
            read_volatile(&(*ctx).fd),
        )
    };
    // The last call of a session has no task and no file.
    if file.is_null() || task == 0 {
        return Ok(());
    }
    let tgid: u32 = field(task, layout!(files.task_tgid));
    // SAFETY: value of our own map, plain data.
    let Some(mode) = (unsafe { FD_FILTER.get(&tgid) }).copied() else {
        return Ok(());
    };
    let scratch = FD_SCRATCH.get_ptr_mut(0).ok_or(-1i32)?;
    // SAFETY: per-CPU slot, exclusively ours for this call.
    let r = unsafe { &mut (*scratch).record };
    let f = file as u64;
    r.tag = tag::FD;
    r.tgid = tgid;
    r.fd = fd;
    r.file = f;

    let files: u64 = field(task, layout!(files.task_files));
    r.files = files;
    let fdt: u64 = field(files, layout!(files.files_fdt));
    let cloexec: u64 = field(fdt, layout!(files.fdt_close_on_exec));
    // A variable index: not a verifier-checked field load.
    let word: u64 = kread(cloexec, (fd / 64) * 8)?;
    let flags: u32 = field(f, layout!(files.file_flags));
    r.flags = if (word >> (fd % 64)) & 1 != 0 {
        flags | O_CLOEXEC
    } else {
        flags
    };
    r.pos = field(f, layout!(files.file_pos));
    r.f_mode = field(f, layout!(files.file_mode));

    let mnt: u64 = field(f, layout!(files.file_mnt));
    // struct mount lies before its vfsmount: a negative offset, probe-read.
    r.mnt_id = kread(
        (mnt as i64 + layout!(files.vfsmount_mnt_id) as i64) as u64,
        0,
    )?;

    // F_GETOWN_EX / F_GETSIG: embedded before 6.12, allocated on first use since.
    let fown = if layout!(files.owner_is_ptr) != 0 {
        field::<u64>(f, layout!(files.file_owner))
    } else {
        f + layout!(files.file_owner) as u64
    };
    r.owner_pid = 0;
    r.owner_type = 0;
    r.signum = 0;
    if fown != 0 {
        let pid: u64 = field(fown, layout!(files.fown_pid));
        if pid != 0 {
            // `numbers[0]` of a flexible array: probe-read.
            r.owner_pid = kread(pid, layout!(files.pid_nr))?;
            r.owner_type = field(fown, layout!(files.fown_pid_type));
        }
        r.signum = field(fown, layout!(files.fown_signum));
    }

    let inode: u64 = field(f, layout!(files.file_inode));
    r.ino = field(inode, layout!(files.inode_ino));
    r.i_mode = field::<u16>(inode, layout!(files.inode_mode)) as u32;
    r.nlink = field(inode, layout!(files.inode_nlink));
    r.size = field(inode, layout!(files.inode_size));
    r.blocks = field(inode, layout!(files.inode_blocks));
    r.generation = field(inode, layout!(files.inode_generation));
    r.mtime_sec = field(inode, layout!(files.inode_mtime_sec));
    r.ctime_sec = field(inode, layout!(files.inode_ctime_sec));
    // The top bits of the nanoseconds may carry flags (multigrain ctime, 6.13+).
    r.mtime_nsec = field::<u32>(inode, layout!(files.inode_mtime_nsec)) & 0x3fff_ffff;
    r.ctime_nsec = field::<u32>(inode, layout!(files.inode_ctime_nsec)) & 0x3fff_ffff;
    let sb: u64 = field(inode, layout!(files.inode_sb));
    r.s_dev = field(sb, layout!(files.sb_dev));

    r.path_len = 0;
    if mode == filter::FULL {
        let at = layout!(files.file_path) as usize;
        // SAFETY: `&file->f_path` of a trusted file pointer; the buffer is our scratch.
        let n = unsafe {
            bpf_d_path(
                file.add(at) as *mut _,
                (*scratch).path.as_mut_ptr() as *mut _,
                PATH_MAX as u32,
            )
        };
        if n > 0 && (n as usize) < PATH_MAX {
            r.path_len = n as u32;
        }
    }
    let len = FD_RECORD_SIZE as u32 + (r.path_len & (PATH_MAX as u32 - 1));
    // SAFETY: meta and seq are the kernel's for this session; the scratch holds `len`.
    let seq = unsafe {
        let meta = read_volatile(&(*ctx).meta);
        read_volatile(&(*meta).seq)
    };
    // SAFETY: the scratch holds `len` bytes.
    unsafe { bpf_seq_write(seq as *mut _, scratch as *const c_void, len) };

    // The fd's lock lines, from the inode's lists (what fdinfo prints). Frozen holders
    // cannot change them; the walk is bounded, and cut short it says so.
    let flctx: u64 = field(inode, layout!(lock_lists.inode_flctx));
    if flctx == 0 {
        return Ok(());
    }
    // SAFETY: per-CPU slot, exclusively ours for this call.
    let line = unsafe { &mut (*scratch).line };
    line.tag = tag::LOCK;
    for (which, head_off) in [
        (list::POSIX, layout!(lock_lists.ctx_posix)),
        (list::FLOCK, layout!(lock_lists.ctx_flock)),
        (list::LEASE, layout!(lock_lists.ctx_lease)),
    ] {
        let head = flctx + head_off as u64;
        let mut node: u64 = kread(head, 0)?;
        let mut ended = false;
        for _ in 0..LOCK_LIST_MAX {
            if node == head || node == 0 {
                ended = true;
                break;
            }
            let lock = node - layout!(lock_lists.list) as u64;
            let lfile: u64 = kread(lock, layout!(lock_lists.file))?;
            let owner: u64 = kread(lock, layout!(lock_lists.owner))?;
            if lfile == f && (owner == files || owner == f) {
                line.list = which;
                line.owner = owner;
                line.flags = kread(lock, layout!(lock_lists.flags))?;
                line.lock_type = kread::<u8>(lock, layout!(lock_lists.lock_type))? as u32;
                line.pid = kread(lock, layout!(lock_lists.pid))?;
                if which == list::LEASE {
                    line.start = 0;
                    line.end = i64::MAX;
                } else {
                    line.start = kread(lock, layout!(lock_lists.start))?;
                    line.end = kread(lock, layout!(lock_lists.end))?;
                }
                // SAFETY: the line is LOCK_LINE_SIZE bytes of our scratch.
                unsafe {
                    bpf_seq_write(
                        seq as *mut _,
                        line as *const _ as *const c_void,
                        LOCK_LINE_SIZE as u32,
                    )
                };
            }
            node = kread(node, 0)?;
        }
        if !ended {
            line.list = list::TRUNCATED;
            // SAFETY: as above.
            unsafe {
                bpf_seq_write(
                    seq as *mut _,
                    line as *const _ as *const c_void,
                    LOCK_LINE_SIZE as u32,
                )
            };
            return Ok(());
        }
    }
    Ok(())
}
