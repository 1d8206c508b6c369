//! ckpt userspace. Data flows one way:
//!
//! ```text
//! kernel tracepoints -> ckpt-ebpf maps (pinned) -> agent (replays, reconciles) -> view
//!        tracer::{format,loader,pins}               agent::{table,reconcile}   view::{live,locks}
//! ```
//! `locks` holds the pure lock logic (the kernel's merge rules, /proc/locks parsing);
//! `cgroup` and `procinfo` the /proc and cgroupfs helpers the commands use.

pub mod agent;
pub mod cgroup;
pub mod check;
pub mod cli;
pub mod deleted;
pub mod docs;
pub mod dump;
pub mod image;
pub mod leases;
pub mod locks;
pub mod procinfo;
pub mod restore;
pub mod sys;
pub mod tracer;
pub mod view;
