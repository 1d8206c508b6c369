//! The kernel side of ckpt, seen from userspace: where kernel fields are on this
//! kernel (`btf`, `format`), the iterator programs every reader loads itself
//! (`iters`), the agent's tracepoint programs and their pins (`loader`, `pins`), and
//! what those programs recorded, read back from the pins (`history`).

pub mod btf;
pub mod format;
pub mod history;
pub mod iters;
pub mod loader;
pub mod pins;
