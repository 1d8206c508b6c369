//! The checkpoint image: what it holds (`format`), writing it atomically with file
//! contents streamed in (`writer`), reading and verifying it (`reader`), the host key
//! that authenticates it (`key`), showing it (`inspect`), and the fuzz harness that
//! keeps every reader honest about hostile bytes (`fuzz`).

pub mod format;
pub mod fuzz;
pub mod inspect;
pub mod key;
pub mod reader;
pub mod writer;
