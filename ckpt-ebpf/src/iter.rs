//! What the BPF iterator programs (files.rs, deleted.rs) share: the session's
//! metadata.

use core::ffi::c_void;

/// `struct bpf_iter_meta`.
#[repr(C)]
pub struct IterMeta {
    pub seq: *mut c_void,
    pub _session_id: u64,
    /// Objects shown so far in this session: 0 for the first object.
    pub seq_num: u64,
}
