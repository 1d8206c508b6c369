//! The walk of an inode's lock lists that both fd-table iterators share (files.rs for
//! dump, lock_table.rs for `ckpt-user locks`): every lock and lease held through one
//! open file description, each followed by the tree of requests blocked on it.
//!
//! BPF cannot take the inode's `flc_lock`, and the kernel frees lock objects without
//! waiting for RCU, so a list that changes while it is walked can hand us a freed (and
//! maybe reused) object. Each object is therefore read twice and reported only when
//! the two reads agree and its links are consistent with the path that led to it (a
//! held lock's `prev` is the node we came from; a blocked request names the blocker we
//! came from, and its `prev` is that blocker's list head or the sibling before it). On
//! the first disagreement the walk stops with a `list::UNSTABLE` line: userspace then
//! takes that fd's locks from fdinfo, which the kernel prints under `flc_lock`.
//!
//! The tree of blocked requests is walked depth first without a stack, as /proc/locks
//! walks it: down through `flc_blocked_requests`, across through `flc_blocked_member`,
//! and back up through each request's `flc_blocker`. One `bpf_loop` per list does all
//! of it, a step per object.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::{bpf_loop, bpf_seq_write};
use ckpt_common::files::{
    list, tag, FdScratch, WalkState, LOCK_LINES_PER_FD, LOCK_LINE_SIZE, LOCK_SPAN, LOCK_WALK_STEPS,
};

use crate::helpers::{at, field, jiffies, kcopy, kread, layout, now_ns};

/// Whether the field of `size` bytes at `off` is the same in both copies.
#[inline(always)]
fn same(a: *const u8, b: *const u8, off: u32, size: u32) -> bool {
    match size {
        1 => at::<u8>(a, off) == at::<u8>(b, off),
        4 => at::<u32>(a, off) == at::<u32>(b, off),
        _ => at::<u64>(a, off) == at::<u64>(b, off),
    }
}

/// Reads the lock at `addr` twice into the scratch; true when every field the walk
/// uses agrees between the reads.
#[inline(always)]
fn read_stable(addr: u64, lock: *mut u8, again: *mut u8, lease: bool) -> Result<bool, i32> {
    kcopy(addr, lock, LOCK_SPAN)?;
    kcopy(addr, again, LOCK_SPAN)?;
    // Offsets read one at a time from the layout, so that the verifier sees each as
    // the constant it is (it bounds the reads of the copies with them).
    let mut ok = same(lock, again, layout!(lock_lists.list), 8)
        && same(lock, again, layout!(lock_lists.list) + 8, 8)
        && same(lock, again, layout!(lock_lists.file), 8)
        && same(lock, again, layout!(lock_lists.owner), 8)
        && same(lock, again, layout!(lock_lists.flags), 4)
        && same(lock, again, layout!(lock_lists.lock_type), 1)
        && same(lock, again, layout!(lock_lists.pid), 4)
        && same(lock, again, layout!(lock_lists.blocker), 8)
        && same(lock, again, layout!(lock_lists.blocked_requests), 8)
        && same(lock, again, layout!(lock_lists.blocked_member), 8)
        && same(lock, again, layout!(lock_lists.blocked_member) + 8, 8);
    if lease {
        ok = ok
            && same(lock, again, layout!(lease_struct.break_time), 8)
            && same(lock, again, layout!(lease_struct.downgrade_time), 8);
    } else {
        ok = ok
            && same(lock, again, layout!(lock_lists.start), 8)
            && same(lock, again, layout!(lock_lists.end), 8);
    }
    Ok(ok)
}

/// Writes one line for the lock copied at `lock` (kernel address `addr`).
#[inline(always)]
fn emit_line(
    seq: *mut c_void,
    scratch: *mut FdScratch,
    which: u32,
    addr: u64,
    blocker: u64,
    lock: *const u8,
) {
    // SAFETY: per-CPU slot, exclusively ours for this call.
    let line = unsafe { &mut (*scratch).line };
    line.tag = tag::LOCK;
    line.list = which;
    line.lock = addr;
    line.blocker = blocker;
    line.owner = at(lock, layout!(lock_lists.owner));
    line.file = at(lock, layout!(lock_lists.file));
    line.flags = at(lock, layout!(lock_lists.flags));
    line.lock_type = at::<u8>(lock, layout!(lock_lists.lock_type)) as u32;
    line.pid = at(lock, layout!(lock_lists.pid));
    if which == list::LEASE {
        // struct file_lease (6.9+) has no range; a lease covers the whole file.
        line.start = 0;
        line.end = i64::MAX;
        line.break_time = at(lock, layout!(lease_struct.break_time));
        line.downgrade_time = at(lock, layout!(lease_struct.downgrade_time));
        line.jiffies = jiffies();
        line.now_ns = now_ns();
    } else {
        line.start = at(lock, layout!(lock_lists.start));
        line.end = at(lock, layout!(lock_lists.end));
        line.break_time = 0;
        line.downgrade_time = 0;
        line.jiffies = 0;
        line.now_ns = 0;
    }
    write_line(seq, scratch);
}

#[inline(always)]
fn write_line(seq: *mut c_void, scratch: *mut FdScratch) {
    // SAFETY: `seq` is the session's; the line is LOCK_LINE_SIZE bytes of our scratch.
    unsafe {
        bpf_seq_write(
            seq as *mut _,
            &(*scratch).line as *const _ as *const c_void,
            LOCK_LINE_SIZE as u32,
        )
    };
}

/// A marker line (`list::TRUNCATED` or `list::UNSTABLE`).
#[inline(always)]
fn mark(seq: *mut c_void, scratch: *mut FdScratch, which: u32) {
    // SAFETY: as in `emit_line`.
    let line = unsafe { &mut (*scratch).line };
    line.tag = tag::LOCK;
    line.list = which;
    line.lock = 0;
    line.blocker = 0;
    write_line(seq, scratch);
}

/// What a step needs besides the state in the scratch: kept on the caller's stack
/// (`bpf_loop` passes a stack pointer).
#[repr(C)]
struct Ctx {
    seq: *mut c_void,
    scratch: *mut FdScratch,
}

const HELD: u32 = 0;
const DOWN: u32 = 1;
const UP: u32 = 2;
const END: u32 = 1;
const CUT: u32 = 2;
/// The fd's lines filled its share of the iterator's buffer.
const FULL: u32 = 3;

/// Whether another line fits this fd's share of the output; if not, the walk ends
/// here (the caller marks it truncated).
#[inline(always)]
fn room(w: &mut WalkState) -> bool {
    if w.lines >= LOCK_LINES_PER_FD as u32 {
        w.done = FULL;
        return false;
    }
    w.lines += 1;
    true
}

/// One step of a walk: an object visited (or climbed past). A `bpf_loop` callback, so
/// that the verifier checks one step rather than every path through all of them
/// (nested bounded loops exceeded its million-instruction budget).
#[inline(never)]
extern "C" fn walk_step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `Ctx`, on its stack, for the whole loop; the
    // scratch is this CPU's, exclusively ours for the iterator's call.
    let (seq, scratch) = unsafe {
        let c = &*(ctx as *const Ctx);
        (c.seq, c.scratch)
    };
    // SAFETY: as above.
    let w = unsafe { &mut (*scratch).walk };
    match step(seq, scratch, w) {
        Ok(()) if w.done == 0 => 0,
        Ok(()) => 1,
        Err(_) => {
            w.done = CUT;
            mark(seq, scratch, list::UNSTABLE);
            1
        }
    }
}

#[inline(always)]
fn step(seq: *mut c_void, scratch: *mut FdScratch, w: &mut WalkState) -> Result<(), i32> {
    // SAFETY: per-CPU slot, exclusively ours for this call.
    let (lock, again) = unsafe {
        (
            (*scratch).lock.as_mut_ptr() as *mut u8,
            (*scratch).again.as_mut_ptr() as *mut u8,
        )
    };
    let cut = |w: &mut WalkState| {
        mark(seq, scratch, list::UNSTABLE);
        w.done = CUT;
    };
    let lease = w.which == list::LEASE;
    let br = layout!(lock_lists.blocked_requests) as u64;
    let bm = layout!(lock_lists.blocked_member) as u64;
    match w.mode {
        HELD => {
            if w.node == w.head || w.node == 0 {
                w.done = END;
                return Ok(());
            }
            let l = w.node - layout!(lock_lists.list) as u64;
            if !read_stable(l, lock, again, lease)?
                || at::<u64>(lock, layout!(lock_lists.list) + 8) != w.prev_link
            {
                cut(w);
                return Ok(());
            }
            w.prev_link = w.node;
            w.node = at(lock, layout!(lock_lists.list));
            let lfile: u64 = at(lock, layout!(lock_lists.file));
            let owner: u64 = at(lock, layout!(lock_lists.owner));
            if lfile == w.f && (owner == w.files || owner == w.f) {
                if !room(w) {
                    return Ok(());
                }
                emit_line(seq, scratch, w.which, l, 0, lock);
                w.wrote = 1;
                let child: u64 = at(lock, layout!(lock_lists.blocked_requests));
                if child != l + br && child != 0 {
                    w.root = l;
                    w.parent = l;
                    w.expect_prev = l + br;
                    w.cur = child - bm;
                    w.mode = DOWN;
                }
            }
        }
        DOWN => {
            let cur = w.cur;
            if !read_stable(cur, lock, again, lease)?
                || at::<u64>(lock, layout!(lock_lists.blocker)) != w.parent
                || at::<u64>(lock, layout!(lock_lists.blocked_member) + 8) != w.expect_prev
            {
                cut(w);
                return Ok(());
            }
            if !room(w) {
                return Ok(());
            }
            emit_line(seq, scratch, w.which, cur, w.parent, lock);
            w.wrote = 1;
            let child: u64 = at(lock, layout!(lock_lists.blocked_requests));
            let next: u64 = at(lock, layout!(lock_lists.blocked_member));
            if child != cur + br && child != 0 {
                w.parent = cur;
                w.expect_prev = cur + br;
                w.cur = child - bm;
            } else if next != w.parent + br && next != 0 {
                w.expect_prev = cur + bm;
                w.cur = next - bm;
            } else if w.parent == w.root {
                w.mode = HELD;
            } else {
                w.cur = w.parent;
                w.mode = UP;
            }
        }
        _ => {
            // `cur`'s subtree is done: its next sibling, or up again.
            let cur = w.cur;
            kcopy(cur, lock, LOCK_SPAN)?;
            let up: u64 = at(lock, layout!(lock_lists.blocker));
            let next: u64 = at(lock, layout!(lock_lists.blocked_member));
            if up == 0 {
                cut(w);
            } else if next != up + br && next != 0 {
                w.parent = up;
                w.expect_prev = cur + bm;
                w.cur = next - bm;
                w.mode = DOWN;
            } else if up == w.root {
                w.mode = HELD;
            } else {
                w.cur = up;
            }
        }
    }
    Ok(())
}

/// Emits the lines of every lock and lease of `inode` held through description `f`
/// (POSIX locks: of fd table `files`), each followed by its blocked requests, and a
/// marker line if the walk was cut. Returns whether it wrote any line.
#[inline(always)]
pub fn walk(
    seq: *mut c_void,
    scratch: *mut FdScratch,
    inode: u64,
    f: u64,
    files: u64,
) -> Result<bool, i32> {
    let flctx: u64 = field(inode, layout!(lock_lists.inode_flctx));
    if flctx == 0 {
        return Ok(false);
    }
    let mut wrote = false;
    let mut lines = 0;
    for (which, head_off) in [
        (list::POSIX, layout!(lock_lists.ctx_posix)),
        (list::FLOCK, layout!(lock_lists.ctx_flock)),
        (list::LEASE, layout!(lock_lists.ctx_lease)),
    ] {
        let head = flctx + head_off as u64;
        let node = kread(head, 0)?;
        // SAFETY: per-CPU slot, exclusively ours for this call.
        let w = unsafe { &mut (*scratch).walk };
        *w = WalkState {
            f,
            files,
            head,
            node,
            prev_link: head,
            root: 0,
            cur: 0,
            parent: 0,
            expect_prev: 0,
            which,
            mode: HELD,
            wrote: 0,
            lines,
            done: 0,
        };
        let mut ctx = Ctx { seq, scratch };
        // SAFETY: `walk_step` is a BPF subprogram taking `ctx` as its context.
        unsafe {
            bpf_loop(
                LOCK_WALK_STEPS as u32,
                walk_step as *mut c_void,
                &mut ctx as *mut Ctx as *mut c_void,
                0,
            )
        };
        // SAFETY: as above.
        let w = unsafe { &(*scratch).walk };
        if w.done == 0 || w.done == FULL {
            mark(seq, scratch, list::TRUNCATED);
            return Ok(true);
        }
        if w.done == CUT {
            return Ok(true);
        }
        wrote |= w.wrote != 0;
        lines = w.lines;
    }
    Ok(wrote)
}
