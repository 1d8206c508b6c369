//! The kernel side of ckpt, seen from userspace: which tracepoints exist and where
//! their fields are (`format`), and loading, attaching and pinning the programs
//! (`loader`, `pins`), and reading the event ring (`ring`).

pub mod btf;
pub mod format;
pub mod loader;
pub mod pins;
pub mod ring;
