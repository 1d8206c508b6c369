//! `cargo xtask`: everything a fresh machine needs, in one place.
//!
//! - `setup`: installs what is missing (apt packages, nightly rust-src, bpf-linker).
//! - `test`: setup, then unit tests, the root-only integration tests on this kernel,
//!   and the same tests in VMs on Debian's 6.1 and 6.12 kernels.
//! - `demo`: setup, then the main job on a real workload.
//! - `fuzz`: setup, then mutated images through every reader of an image.

mod bench;
mod demo;
mod fuzz;
mod install;
mod setup;
mod test;
mod util;
mod vm;

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
    /// Install what building ckpt needs and this machine lacks (idempotent; one line
    /// per step). `test`, `demo` and `bench` install what they need themselves.
    Setup,
    /// Run the unit tests, then the integration tests against the live kernel (root).
    Test {
        /// Only the unit tests (no root needed).
        #[arg(long)]
        unit_only: bool,
        /// Skip the VM kernel matrix.
        #[arg(long)]
        host_only: bool,
        /// Only this kernel series in the VM matrix (6.1 or 6.12); repeatable.
        #[arg(long)]
        kernel: Vec<String>,
        /// Only integration tests whose names contain this (host and VMs).
        #[arg(long, default_value = "")]
        filter: String,
        /// Minutes before a VM counts as hung.
        #[arg(long, default_value_t = 30)]
        vm_timeout: u64,
    },
    /// Trace a real workload in a cgroup and show its live lock table.
    Demo,
    /// Build and install ckpt-user, ckpt-agent, a systemd unit for the agent, man pages
    /// and shell completions under PREFIX (root's share of the machine: run as root).
    Install {
        #[arg(long, default_value = "/usr/local")]
        prefix: String,
        /// Install under this directory instead of / (for packaging or a look).
        #[arg(long, default_value = "/")]
        destdir: std::path::PathBuf,
    },
    /// Build the CRIU plugin and install it as DIR/ckpt.so, where CRIU loads it on
    /// every dump and restore (replaced in one rename: a CRIU run never sees half of it).
    InstallCriuPlugin {
        /// CRIU's plugin directory (compiled into criu; `criu -L` or CRIU_LIBS_DIR
        /// replace it).
        #[arg(long, default_value = "/usr/lib/criu")]
        dir: std::path::PathBuf,
    },
    /// Build a Debian package of the same files (target/ckpt_VERSION_ARCH.deb).
    Package,
    /// Fuzz every reader of an image (reader, inspect, restore's checks) in process;
    /// prints inputs per second and totals, keeps crashing inputs as regression tests.
    Fuzz {
        /// How long to run.
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        /// Recompute the SHA-256 trailer of mutated images (and add structured,
        /// MAC'd mutations), as anyone rewriting an image can: mutations reach the
        /// metadata decoder and everything after it.
        #[arg(long)]
        recompute_checksum: bool,
    },
    /// Measure dump speed (agent vs /proc only) and write BENCHMARKS.md.
    Bench {
        /// Runs per figure.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// One part only (dump, tracer, views); its section of BENCHMARKS.md is
        /// replaced, the others are kept.
        #[arg(long)]
        only: Option<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.cmd {
        Cmd::Setup => setup::run(setup::Purpose::Build),
        Cmd::Test {
            unit_only,
            host_only,
            kernel,
            filter,
            vm_timeout,
        } => setup::run(setup::Purpose::Test).and_then(|_| {
            test::run(&test::Options {
                unit_only,
                host_only,
                kernels: kernel,
                filter,
                vm_timeout: std::time::Duration::from_secs(vm_timeout * 60),
            })
        }),
        Cmd::Demo => setup::run(setup::Purpose::Demo).and_then(|_| demo::run()),
        Cmd::Install { prefix, destdir } => {
            setup::run(setup::Purpose::Build).and_then(|_| install::install(&prefix, &destdir))
        }
        Cmd::InstallCriuPlugin { dir } => {
            setup::run(setup::Purpose::Build).and_then(|_| install::install_criu_plugin(&dir))
        }
        Cmd::Package => setup::run(setup::Purpose::Build)
            .and_then(|_| install::package())
            .map(|deb| println!("package: {}", deb.display())),
        Cmd::Fuzz {
            seconds,
            recompute_checksum,
        } => setup::run(setup::Purpose::Build).and_then(|_| fuzz::run(seconds, recompute_checksum)),
        Cmd::Bench { runs, only } => {
            setup::run(setup::Purpose::Bench).and_then(|_| bench::run(runs, only.as_deref()))
        }
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}
