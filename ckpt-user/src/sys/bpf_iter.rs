//! A BPF task_file iterator aimed at one process: BPF_OBJ_GET of the pinned program,
//! BPF_LINK_CREATE with the iterator's `task.pid` parameter (Linux 6.1+), then
//! BPF_ITER_CREATE for each read. aya 0.14 attaches iterators without parameters,
//! hence these few raw calls.

use std::{
    ffi::CString,
    io::Read as _,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result};
use aya_obj::generated::{bpf_attach_type, bpf_cmd};

// The kernel's own numbers, from aya's generated uapi bindings.
const BPF_OBJ_PIN: libc::c_long = bpf_cmd::BPF_OBJ_PIN as libc::c_long;
const BPF_OBJ_GET: libc::c_long = bpf_cmd::BPF_OBJ_GET as libc::c_long;
const BPF_LINK_CREATE: libc::c_long = bpf_cmd::BPF_LINK_CREATE as libc::c_long;
const BPF_ITER_CREATE: libc::c_long = bpf_cmd::BPF_ITER_CREATE as libc::c_long;
const BPF_TRACE_ITER: u32 = bpf_attach_type::BPF_TRACE_ITER as u32;

/// `union bpf_attr` is 128 bytes at most of what we use; unused bytes stay zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }
    fn put_u32(&mut self, at: usize, v: u32) -> &mut Attr {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn put_u64(&mut self, at: usize, v: u64) -> &mut Attr {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, zero-padded bpf_attr for `cmd`; its size is passed.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: on success these commands return a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Pins BPF object `fd` (here: a program) at `path` in bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = Attr::new();
    attr.put_u64(0, c.as_ptr() as u64)
        .put_u32(8, fd.as_raw_fd() as u32);
    // BPF_OBJ_PIN returns 0, not an fd.
    // SAFETY: `attr` is a valid, zero-padded bpf_attr; its size is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            attr.0.as_mut_ptr(),
            attr.0.len(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pinning {}", path.display()));
    }
    Ok(())
}

/// Opens a pinned BPF object (here: a program).
pub fn obj_get(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = Attr::new();
    attr.put_u64(0, c.as_ptr() as u64);
    bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("opening {}", path.display()))
}

/// A link running iterator program `prog` over the fds of process `pid` only.
pub fn link_for_process(prog: BorrowedFd<'_>, pid: u32) -> std::io::Result<OwnedFd> {
    // union bpf_iter_link_info: task { tid, pid, pid_fd }, 16 bytes with its padding.
    let info: [u32; 4] = [0, pid, 0, 0];
    let mut attr = Attr::new();
    attr.put_u32(0, prog.as_raw_fd() as u32) // prog_fd
        .put_u32(8, BPF_TRACE_ITER) // attach_type
        .put_u64(16, info.as_ptr() as u64) // iter_info
        .put_u32(24, std::mem::size_of_val(&info) as u32); // iter_info_len
    bpf(BPF_LINK_CREATE, &mut attr)
}

/// A link running iterator program `prog` over every process.
pub fn link_all(prog: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.put_u32(0, prog.as_raw_fd() as u32) // prog_fd
        .put_u32(8, BPF_TRACE_ITER); // attach_type
    bpf(BPF_LINK_CREATE, &mut attr)
}

/// Runs the iterator of `link` once, appending its output to `out`.
pub fn read_into(link: BorrowedFd<'_>, out: &mut Vec<u8>) -> std::io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    let fd = bpf(BPF_ITER_CREATE, &mut attr)?;
    std::fs::File::from(fd).read_to_end(out)?;
    Ok(())
}

/// Bytes handed on at a time by `read_pieces`: several of the kernel's reads (each
/// gives at most its 32 KiB buffer).
const PIECE: usize = 256 << 10;

/// Runs the iterator of `link` once, handing its output to `sink` as it is read, in
/// pieces that may cut a record in two; `sink` returns false to stop early.
pub fn read_pieces(
    link: BorrowedFd<'_>,
    mut sink: impl FnMut(Vec<u8>) -> bool,
) -> std::io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    let mut f = std::fs::File::from(bpf(BPF_ITER_CREATE, &mut attr)?);
    loop {
        let mut piece = Vec::with_capacity(PIECE);
        (&mut f).take(PIECE as u64).read_to_end(&mut piece)?;
        let end = piece.len() < PIECE;
        if (!piece.is_empty() && !sink(piece)) || end {
            return Ok(());
        }
    }
}
