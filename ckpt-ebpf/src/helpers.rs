#![allow(dead_code)] // Shared by both objects, each of which uses a part.
//! What every program uses: this kernel's layout (`LAYOUT`) and the ways to read
//! kernel memory. Shared by both objects (the tracepoint programs and the iterators).

use ckpt_common::offsets::KernelLayout;

/// Tracepoint offsets for this kernel; filled in by userspace at load time.
#[unsafe(no_mangle)]
pub static LAYOUT: KernelLayout = KernelLayout::ZERO;

/// Reads one part of the layout (`layout!(posix)`) or one field (`layout!(files.file_path)`).
/// Volatile, so that the compiler does not fold in the zero placeholder that userspace
/// replaces at load time; one part at a time, because the whole layout would not fit
/// on the 512-byte BPF stack next to an event. A single field read this way is a
/// constant to the verifier (the layout is a frozen read-only map), which `bpf_d_path`
/// needs.
macro_rules! layout {
    ($($field:ident).+) => {
        // SAFETY: a read-only global of plain data.
        unsafe { core::ptr::read_volatile(&$crate::helpers::LAYOUT.$($field).+) }
    };
}
pub(crate) use layout;

/// Whether userspace filled in the layout (the programs do nothing until it has).
#[inline(always)]
pub fn ready() -> bool {
    layout!(valid) != 0
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn jiffies() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { aya_ebpf::helpers::generated::bpf_jiffies64() }
}

#[inline(always)]
pub fn current_ids() -> (u32, u32) {
    let id = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

/// `d_path` of an iterator's trusted `struct file *` into `buf`: the length with the
/// NUL, or 0 when it failed or did not fit.
#[inline(always)]
pub fn file_path(file: *const u8, buf: *mut u8) -> u32 {
    let at = layout!(files.file_path) as usize;
    // SAFETY: `&file->f_path` of a trusted file pointer (the offset is a constant of
    // the frozen layout, as the verifier requires); `buf` holds PATH_MAX bytes.
    let n = unsafe {
        aya_ebpf::helpers::generated::bpf_d_path(
            file.add(at) as *mut _,
            buf as *mut _,
            ckpt_common::files::PATH_MAX as u32,
        )
    };
    if n > 0 && (n as usize) < ckpt_common::files::PATH_MAX {
        n as u32
    } else {
        0
    }
}

/// Reads the field at `off` of a kernel struct reached through BTF-typed pointers (an
/// iterator's or a BTF tracepoint's arguments, and the pointers read from them). The
/// verifier checks such a load against BTF (the offset is a constant of the frozen
/// layout) and turns it into a plain load that cannot fault: several times cheaper
/// than a probe-read helper call. A NULL pointer reads as 0.
#[inline(always)]
pub fn field<T: Copy>(base: u64, off: u32) -> T {
    // SAFETY: see above; the kernel catches a bad address and yields 0.
    unsafe { core::ptr::read_volatile((base + off as u64) as *const T) }
}

/// Reads a `T` at `base + off` of a kernel object (faults are caught by the helper).
#[inline(always)]
pub fn kread<T>(base: u64, off: u32) -> Result<T, i32> {
    // SAFETY: the probe-read helper checks the address.
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel((base + off as u64) as *const T) }
}

/// Copies `len` bytes of a kernel object at `src` to `dst`: one helper call for many
/// fields, where a call per field costs ~30 ns each.
#[inline(always)]
pub fn kcopy(src: u64, dst: *mut u8, len: usize) -> Result<(), i32> {
    // SAFETY: `dst` is `len` bytes of our own (stack or per-CPU scratch); the helper
    // checks `src`.
    let r = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_kernel(
            dst as *mut core::ffi::c_void,
            len as u32,
            src as *const core::ffi::c_void,
        )
    };
    if r < 0 {
        Err(r as i32)
    } else {
        Ok(())
    }
}

/// The `T` at `off` of a copy made by `kcopy` (the kernel's natural alignment holds:
/// the copy is 8-byte aligned). The verifier checks `off` against the copy's size.
#[inline(always)]
pub fn at<T: Copy>(buf: *const u8, off: u32) -> T {
    // SAFETY: see above.
    unsafe { core::ptr::read_volatile(buf.add(off as usize) as *const T) }
}
