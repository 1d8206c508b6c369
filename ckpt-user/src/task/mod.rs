//! Processes: what a dump records of each (`dump`), and at restore the process tree
//! forked again, each process taking its fds, credentials, locks and leases
//! (`spawn`) as the process it restores (`creds`).

pub mod creds;
pub mod dump;
pub mod spawn;
