//! The checkpoint image: what it holds (`format`), writing it atomically with file
//! contents streamed in (`writer`), reading and verifying it (`reader`), the host key
//! that authenticates it (`key`) and showing it (`inspect`).

pub mod format;
pub mod inspect;
pub mod key;
pub mod reader;
pub mod writer;
