//! Leases as ckpt models them: the kernel's lease rules replayed from events, and
//! reconciliation with /proc/locks (`model`).

pub mod model;
