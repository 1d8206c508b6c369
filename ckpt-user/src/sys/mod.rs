//! Small wrappers over the kernel interfaces the agent needs mounted.

pub mod bpf_iter;
pub mod fown;
pub mod hz;
pub mod map_batch;
pub mod mounts;
pub mod pidfd;
pub mod realtime;

/// Raises the soft limit on open files to the hard one: a dump holds an iterator link
/// per process and borrows thousands of fds while learning inodes, and the usual
/// soft limit (1024) is far below what large workloads need.
pub fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
