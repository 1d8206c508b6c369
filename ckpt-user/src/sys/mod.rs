//! Small wrappers over kernel interfaces (shared plumbing).

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

/// CLOCK_MONOTONIC now, in ns (the clock bpf_ktime_get_ns uses).
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Installs `handler` (which must only store to an atomic) for `signals`, without
/// SA_RESTART: a blocking call returns EINTR and the caller sees its flag.
pub fn on_signals(signals: &[nix::sys::signal::Signal], handler: extern "C" fn(libc::c_int)) {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let action = SigAction::new(
        SigHandler::Handler(handler),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for &sig in signals {
        // SAFETY: the handler only stores to an atomic (the caller's contract).
        let _ = unsafe { sigaction(sig, &action) };
    }
}
