//! The kernel side of ckpt, seen from userspace: where kernel fields are on this
//! kernel (`layouts`, the one table of their names across kernels; `btf` and `format`
//! resolve them), the iterator programs every reader loads itself (`iters`), the
//! agent's tracepoint programs and their pins (`loader`, `pins`), and what those
//! programs recorded, read back from the pins (`history`).

pub mod btf;
pub mod format;
pub mod history;
pub mod iters;
pub mod layouts;
pub mod loader;
pub mod pins;
