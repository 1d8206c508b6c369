//! The CRIU plugin's cost: what it adds to a CRIU dump is its work in `exit(DUMP, 0)`,
//! run while CRIU waits (the tasks still frozen). CRIU 3.17.1 does not start on every
//! kernel (not on the 6.18 host), so the plugin's dump exit is driven here by its own
//! example (`examples/dump_exit.rs`) on image directories laid out as CRIU would,
//! for 100 processes: with no lease (what every dump on the host pays), and with a
//! lease each, with and without ckpt-agent's pinned iterators. Each run is a new
//! process, as each CRIU dump loads the plugin anew.

use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context as _, Result};

use super::{fmt, start_agent, stats, stop, Ctx};

const PIN_DIR: &str = "/sys/fs/bpf/ckpt-bench-criu-plugin";
/// A pin dir no agent serves.
const NO_AGENT: &str = "/sys/fs/bpf/ckpt-bench-criu-plugin-no-agent";
const PROCESSES: usize = 100;

/// One plugin dump exit on `images`, with `pins`: its milliseconds.
fn dump_exit(driver: &std::path::Path, images: &std::path::Path, pins: &str) -> Result<f64> {
    let out = Command::new(driver)
        .arg("run")
        .arg(images)
        .env("CKPT_PIN_DIR", pins)
        .output()
        .context("running the plugin's dump exit")?;
    if !out.status.success() {
        bail!(
            "the plugin's dump exit failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("the driver's milliseconds")
}

/// The section's body.
pub fn run(ctx: &Ctx) -> Result<String> {
    let driver = super::build_example("ckpt-criu-plugin", "dump_exit")?;
    let data = std::env::temp_dir().join("ckpt-bench-criu-plugin");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data)?;
    // 100 lease holders, each alone on its file (a write lease needs no other open).
    let mut holders: Vec<Child> = Vec::new();
    let result = (|| -> Result<String> {
        for i in 0..PROCESSES {
            let file = data.join(format!("f{i}"));
            std::fs::write(&file, "x")?;
            holders.push(
                Command::new(ctx.bins.join("locker"))
                    .arg("--hold-lease")
                    .arg(&file)
                    .arg("w")
                    .stdout(Stdio::null())
                    .spawn()?,
            );
        }
        let pids: Vec<String> = holders.iter().map(|c| c.id().to_string()).collect();
        let (leases, none) = (data.join("with-leases"), data.join("no-leases"));
        for (dir, flag) in [(&leases, None), (&none, Some("--no-leases"))] {
            let mut c = Command::new(&driver);
            c.arg("setup").arg(dir).args(flag).args(&pids);
            crate::util::sh(&mut c)?;
        }
        // Each holder has taken its lease before the runs.
        for p in &pids {
            let fdinfo = format!("/proc/{p}/fdinfo/3");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !std::fs::read_to_string(&fdinfo).is_ok_and(|t| t.contains("LEASE")) {
                if std::time::Instant::now() > deadline {
                    bail!("process {p} took no lease");
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        let agent = start_agent(&ctx.bins, PIN_DIR)?;
        let cases = [
            ("no lease, ckpt-agent running", &none, PIN_DIR),
            ("no lease, no agent", &none, NO_AGENT),
            ("a lease each, ckpt-agent running", &leases, PIN_DIR),
            (
                "a lease each, no agent (iterators loaded)",
                &leases,
                NO_AGENT,
            ),
        ];
        let mut ms: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        let runs = (|| -> Result<()> {
            for _ in 0..ctx.runs {
                for (i, (_, dir, pins)) in cases.iter().enumerate() {
                    ms[i].push(dump_exit(&driver, dir, pins)?);
                }
            }
            Ok(())
        })();
        stop(agent);
        runs?;
        let mut out = format!(
            "What the plugin adds to `criu dump` of {PROCESSES} processes: its work at the dump's end, in ms (each run a new process, as each CRIU run loads the plugin anew; driven by `ckpt-user/criu-plugin/examples/dump_exit.rs`, since CRIU 3.17.1 does not start on this kernel).\n\n| case | ms |\n|---|---|\n"
        );
        for ((name, ..), v) in cases.iter().zip(ms) {
            out.push_str(&format!("| {name} | {} |\n", fmt(&stats(v))));
        }
        Ok(out)
    })();
    for mut h in holders {
        let _ = h.kill();
        let _ = h.wait();
    }
    let _ = std::fs::remove_dir_all(&data);
    result
}
