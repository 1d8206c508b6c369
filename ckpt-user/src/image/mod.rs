//! The checkpoint image: what it holds (`format`), writing it atomically with file
//! contents streamed in (`writer`), reading and verifying it (`reader`), and showing it
//! (`inspect`).

pub mod format;
pub mod inspect;
pub mod reader;
pub mod writer;
