//! `cargo xtask`: everything a fresh machine needs, in one place.
//!
//! - `setup`: installs what is missing (apt packages, nightly rust-src, bpf-linker).
//! - `test`: setup, then unit tests and the root-only integration tests.
//! - `demo`: setup, then the main job on a real workload.

mod bench;
mod demo;
mod setup;
mod test;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks (idempotent; one line per step).
    Setup,
    /// Run the unit tests, then the integration tests against the live kernel (root).
    Test {
        /// Only the unit tests (no root needed).
        #[arg(long)]
        unit_only: bool,
    },
    /// Trace a real workload in a cgroup and show its live lock table.
    Demo,
    /// Measure dump speed (agent vs /proc only) and write BENCHMARKS.md.
    Bench {
        /// Runs per figure.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Test { unit_only } => setup::run().and_then(|_| test::run(unit_only)),
        Cmd::Demo => setup::run().and_then(|_| demo::run()),
        Cmd::Bench { runs } => setup::run().and_then(|_| bench::run(runs)),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}
