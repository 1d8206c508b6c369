//! What readers (`ckpt-user`) show: the lock table (`locks`) from the kernel's lists
//! and the tracer's records (`tracer::history`), its wait-for graph (`graph`), and
//! deleted-but-open files (`deleted`), all of them live (`top`), and contention as it
//! happens (`events`).

pub mod deleted;
pub mod events;
pub mod graph;
pub mod locks;
pub mod top;
