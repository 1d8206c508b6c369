//! The views that span kernel objects: locks, leases and deleted files, all of them
//! live (`top`), and contention as it happens (`events`). A view of one object lives
//! with it (`lock::view`, `lock::graph`, `ghost::view`).

pub mod events;
pub mod top;
