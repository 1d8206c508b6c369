//! Small wrappers over the kernel interfaces the agent needs mounted.

pub mod mounts;
