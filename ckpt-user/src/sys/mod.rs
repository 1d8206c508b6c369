//! Small wrappers over the kernel interfaces the agent needs mounted.

pub mod hz;
pub mod mounts;
pub mod pidfd;
