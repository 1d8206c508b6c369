//! Open files: fds and open file descriptions, like CRIU's files.c and files-reg.c.
//! Read from the fd tables by the task_file iterator (`table`) or /proc (`fdinfo`),
//! grouped into descriptions for the image (`dump`); at restore, each file checked
//! against its fingerprint before anything is touched (`validate`), each description
//! opened once with its holder's credentials (`open`), and signal owners set again
//! (`owners`).

pub mod dump;
pub mod fdinfo;
pub mod open;
pub mod owners;
pub mod table;
pub mod validate;
