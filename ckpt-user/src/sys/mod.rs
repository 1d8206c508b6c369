//! Small wrappers over the kernel interfaces the agent needs mounted.

pub mod bpf_iter;
pub mod hz;
pub mod map_batch;
pub mod mounts;
pub mod pidfd;
