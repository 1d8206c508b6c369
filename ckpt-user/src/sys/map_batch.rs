//! Reading a whole BPF hash map with BPF_MAP_LOOKUP_BATCH (5.6+): a few syscalls for
//! thousands of entries, where aya's iterator makes two per entry (get_next_key, then
//! lookup).

use std::os::fd::{AsRawFd as _, BorrowedFd};

use anyhow::{bail, Result};

const BPF_MAP_LOOKUP_BATCH: libc::c_long =
    aya_obj::generated::bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long;

/// `union bpf_attr`, the `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every (key, value) of a hash map. Not atomic: an entry changed during the read may
/// be missed or seen twice; the readers here use entries only for what the kernel's
/// own lists confirm.
pub fn dump<K: aya::Pod, V: aya::Pod>(map: BorrowedFd<'_>) -> Result<Vec<(K, V)>> {
    let mut chunk = 4096usize;
    let mut out = Vec::new();
    // The kernel's resume token (a bucket index for hash maps).
    let mut token = [0u64; 1];
    let mut next = [0u64; 1];
    let mut first = true;
    loop {
        let mut keys: Vec<K> = Vec::with_capacity(chunk);
        let mut values: Vec<V> = Vec::with_capacity(chunk);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: the buffers hold `chunk` keys and values; the kernel writes at most
        // `count` of each and reports how many in `count`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = std::io::Error::last_os_error();
        let n = (attr.count as usize).min(chunk);
        // SAFETY: the kernel initialised the first `n` entries of both buffers.
        unsafe {
            keys.set_len(n);
            values.set_len(n);
        }
        out.extend(keys.into_iter().zip(values));
        if r < 0 {
            match err.raw_os_error() {
                Some(libc::ENOENT) => return Ok(out),
                // One bucket holds more entries than the chunk: retry it, bigger.
                Some(libc::ENOSPC) if n == 0 => {
                    chunk *= 2;
                    continue;
                }
                _ => bail!("BPF_MAP_LOOKUP_BATCH: {err}"),
            }
        }
        token = next;
        first = false;
    }
}
