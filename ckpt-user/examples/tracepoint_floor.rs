//! The tracer bench's floor (`cargo xtask bench --only tracer` runs this): empty
//! programs (ckpt-ebpf/src/floor.rs) on every tracepoint ckpt-agent attaches by
//! default, each as the same kind (BTF or classic), so the bench can tell what the
//! tracepoints cost from what ckpt's programs add. bpftrace cannot be the floor here:
//! it has no BTF tracepoints (0.17), and on the lock calls those cost less.
//!
//! Prints "attached: " and the names of ckpt-agent's programs it stands in for (so the
//! bench can check it covers the agent's links) once every program is attached; runs
//! until SIGINT or SIGTERM.

use anyhow::{Context as _, Result};
use aya::{
    programs::{BtfTracePoint, TracePoint},
    Btf, Ebpf,
};
use nix::sys::signal::{SigSet, Signal};

use ckpt_user::{
    sys::mounts,
    tracer::loader::{BTF_PROGRAMS, PROGRAMS},
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ckpt-floor"));

fn main() {
    if let Err(e) = run() {
        eprintln!("tracepoint_floor: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    // Block the signals first, so one sent right after "attached" is not lost.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;
    mounts::ensure_tracefs()?;
    let btf = Btf::from_sys_fs().context("reading kernel BTF")?;
    // A BTF program's target is fixed when it is loaded: one object per tracepoint.
    let mut held = Vec::new();
    for (_, tp) in BTF_PROGRAMS {
        let mut ebpf = Ebpf::load(OBJECT).context("loading the floor object")?;
        let prog: &mut BtfTracePoint = ebpf
            .program_mut("empty_btf")
            .context("empty_btf missing")?
            .try_into()?;
        prog.load(tp, &btf)
            .with_context(|| format!("loading for {tp}"))?;
        prog.attach()
            .with_context(|| format!("attaching to {tp}"))?;
        held.push(ebpf);
    }
    let mut ebpf = Ebpf::load(OBJECT).context("loading the floor object")?;
    let prog: &mut TracePoint = ebpf
        .program_mut("empty_tracepoint")
        .context("empty_tracepoint missing")?
        .try_into()?;
    prog.load()?;
    for (_, category, tp) in PROGRAMS {
        prog.attach(category, tp)
            .with_context(|| format!("attaching to {category}:{tp}"))?;
    }
    let names: Vec<String> = BTF_PROGRAMS
        .iter()
        .map(|(name, tp)| format!("{name}=tp_btf/{tp}"))
        .chain(
            PROGRAMS
                .iter()
                .map(|(name, category, tp)| format!("{name}=tracepoint/{category}/{tp}")),
        )
        .collect();
    println!("attached: {}", names.join(" "));
    signals.wait()?;
    drop(held);
    Ok(())
}
