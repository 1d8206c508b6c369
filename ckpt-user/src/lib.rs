//! ckpt userspace. Data flows one way, from the kernel to the commands:
//!
//! ```text
//! kernel lists ── iterators (tracer::iters) ──┐
//! tracepoints ── pinned maps (tracer::loader) ─┴─> locks, leases, deleted ─> view, dump, agent
//!                  read back by tracer::history
//! image (image::{format,reader,writer}) ─> restore
//! ```
//! `locks` and `leases` read and model the kernel's lock and lease objects, `deleted`
//! scans for deleted-but-open files; `dump` and `restore` are the checkpoint's two
//! sides; `view` holds the readers' commands, `agent` the background tracer;
//! `sys`, `cgroup` and `procinfo` are the system-call, cgroupfs and /proc helpers.

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
