//! The kernel side of ckpt, seen from userspace: where kernel fields are on this
//! kernel (`btf`, `format`), the iterator programs every reader loads itself
//! (`iters`), and the agent's tracepoint programs and their pins (`loader`, `pins`).

pub mod btf;
pub mod format;
pub mod iters;
pub mod loader;
pub mod pins;
