//! Real-time priority for the few timing-critical milliseconds of a restore.

/// SCHED_FIFO for the calling thread until dropped, so that no ordinary task preempts
/// it between reading the clock and the syscall it times.
pub struct Fifo {
    policy: libc::c_int,
    param: libc::sched_param,
}

impl Fifo {
    /// None when not permitted (no CAP_SYS_NICE, an RT-throttled container): the
    /// caller then times less exactly, nothing else changes.
    pub fn enter() -> Option<Fifo> {
        // SAFETY: scheduler calls on the calling thread (pid 0) with valid pointers.
        unsafe {
            let policy = libc::sched_getscheduler(0);
            let mut param: libc::sched_param = std::mem::zeroed();
            if policy < 0 || libc::sched_getparam(0, &mut param) < 0 {
                return None;
            }
            // Low in the RT range: above every ordinary task, below kernel RT threads.
            let fifo = libc::sched_param { sched_priority: 10 };
            (libc::sched_setscheduler(0, libc::SCHED_FIFO, &fifo) == 0)
                .then_some(Fifo { policy, param })
        }
    }
}

impl Drop for Fifo {
    fn drop(&mut self) {
        // SAFETY: as in `enter`.
        unsafe { libc::sched_setscheduler(0, self.policy, &self.param) };
    }
}
