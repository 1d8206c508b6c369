//! The views bench's floor (`cargo xtask bench --only views` runs this): empty
//! iterator programs (ckpt-ebpf/src/floor.rs) over every fd and every mapping, read
//! side by side as `ckpt-user locks` reads its own, so the bench can tell what the
//! kernel's walk of the fd tables and mappings costs from what ckpt's programs and
//! userspace add. Prints `walk_ms=MS` (the two walks, from the first link created
//! to the end of the slower read); loading is not counted.

use std::{os::fd::AsFd as _, time::Instant};

use anyhow::{Context as _, Result};
use aya::{programs::Iter, Btf, Ebpf};

use ckpt_user::sys::bpf_iter;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ckpt-floor"));

fn main() {
    if let Err(e) = run() {
        eprintln!("walk_floor: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let btf = Btf::from_sys_fs().context("reading kernel BTF")?;
    let mut ebpf = Ebpf::load(OBJECT).context("loading the floor object")?;
    for (name, target) in [
        ("empty_task_file", "task_file"),
        ("empty_task_vma", "task_vma"),
    ] {
        let prog: &mut Iter = ebpf
            .program_mut(name)
            .with_context(|| format!("{name} missing"))?
            .try_into()?;
        prog.load(target, &btf)
            .with_context(|| format!("loading {name}"))?;
    }
    let fd_of = |name: &str| -> Result<std::os::fd::OwnedFd> {
        let prog: &Iter = ebpf
            .program(name)
            .with_context(|| format!("{name} missing"))?
            .try_into()?;
        Ok(prog.fd()?.as_fd().try_clone_to_owned()?)
    };
    let (files, vmas) = (fd_of("empty_task_file")?, fd_of("empty_task_vma")?);
    let walk = |prog: &std::os::fd::OwnedFd| -> Result<()> {
        let link = bpf_iter::link_all(prog.as_fd())?;
        let mut out = Vec::new();
        bpf_iter::read_into(link.as_fd(), &mut out)?;
        Ok(())
    };
    let t = Instant::now();
    std::thread::scope(|s| {
        let maps = s.spawn(|| walk(&vmas));
        let fds = walk(&files);
        fds.and(maps.join().expect("walk thread panicked"))
    })?;
    println!("walk_ms={:.2}", t.elapsed().as_secs_f64() * 1e3);
    Ok(())
}
