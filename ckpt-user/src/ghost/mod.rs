//! Deleted-but-open files ("ghost files", as CRIU calls them): found by a scan of
//! every fd and mapping (`scan`) or the agent's background table (`table`), shown by
//! `ckpt-user deleted` (`view`), their contents saved at dump (`dump`) and recreated
//! as nameless inodes at restore (`restore`).

pub mod dump;
pub mod restore;
pub mod scan;
pub mod table;
pub mod view;
