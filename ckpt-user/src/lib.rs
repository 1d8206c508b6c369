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

// Shared plumbing.
pub mod cgroup;
pub mod image;
pub mod plan;
pub mod procinfo;
pub mod sys;
pub mod tracer;

// One module per kernel object: its model, kernel read, dump, restore and view.
pub mod fd;
pub mod ghost;
pub mod lease;
pub mod lock;
pub mod task;

// The commands.
pub mod agent;
pub mod check;
pub mod cli;
pub mod docs;
pub mod dump;
pub mod restore;
pub mod view;
