//! The kernel matrix: the integration tests inside VMs booted from Debian's cloud
//! kernels (6.1: old struct file_lock and tracepoint names; 6.12: struct file_lease).
//!
//! Kernel packages come from apt and are cached in /var/cache/ckpt-vm. Test binaries
//! are built statically (`-C target-feature=+crt-static`) and packed with busybox,
//! stress-ng (with its shared libraries) and an init script into an uncompressed newc
//! initramfs (cpio from apt). QEMU uses KVM when a probe boot works, TCG otherwise. A
//! VM that panics, hangs past its timeout or never prints its end marker is a failure,
//! shown with the tail of its console.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{output, sh, workspace};

pub const CACHE: &str = "/var/cache/ckpt-vm";
const TARGET: &str = "x86_64-unknown-linux-gnu";
const DONE: &str = "CKPT-VM-DONE";
const BOOTED: &str = "CKPT-VM-BOOTED";

/// A kernel of the matrix: the apt package name pattern of its series.
pub struct KernelSpec {
    pub series: &'static str,
    pattern: &'static str,
}

pub const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        series: "6.1",
        pattern: r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$",
    },
    KernelSpec {
        series: "6.12",
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$",
    },
];

/// An unpacked kernel: its vmlinuz, release string and config.
pub struct Kernel {
    pub release: String,
    pub vmlinuz: PathBuf,
    pub config: PathBuf,
}

/// Downloads (once) and unpacks the newest package of a series.
pub fn fetch_kernel(spec: &KernelSpec) -> Result<Kernel> {
    std::fs::create_dir_all(CACHE)?;
    let search = || {
        output(Command::new("apt-cache").args(["search", "--names-only", spec.pattern]))
            .unwrap_or_default()
    };
    let mut list = search();
    if list.trim().is_empty() {
        // Package lists may never have been fetched on a fresh machine.
        sh(Command::new("apt-get").args(["update", "-qq"]))?;
        list = search();
    }
    let mut names: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    names.sort_by_key(|n| version_key(n));
    let Some(pkg) = names.last() else {
        bail!(
            "no kernel package for {} in apt (run apt-get update)",
            spec.series
        );
    };
    let unpacked = Path::new(CACHE).join(pkg);
    if !unpacked.join("boot").exists() {
        println!("vm: downloading {pkg}");
        sh(Command::new("apt-get")
            .current_dir(CACHE)
            .args(["download", pkg]))?;
        let deb = std::fs::read_dir(CACHE)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
            })
            .context("downloaded .deb not found")?;
        sh(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
    }
    let boot = unpacked.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the kernel package")?;
    let release = vmlinuz
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    Ok(Kernel {
        config: boot.join(format!("config-{release}")),
        vmlinuz,
        release,
    })
}

/// Sort key for "linux-image-6.1.0-56-..." / "linux-image-6.12.117+deb12-...".
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Builds static binaries: ckpt-agent, ckpt-user, locker, and the integration test
/// executables. Returns (bin dir, test executables).
pub fn build_static() -> Result<(PathBuf, Vec<PathBuf>)> {
    let target_dir = workspace().join("target/static");
    let run = |args: &[&str]| -> Result<String> {
        let out = Command::new("cargo")
            .current_dir(workspace())
            .args(args)
            .args([
                "--release",
                "--target",
                TARGET,
                "--message-format=json-render-diagnostics",
            ])
            .env("CARGO_TARGET_DIR", &target_dir)
            // Only the target artifacts are static (with --target, build scripts and
            // proc macros are built without RUSTFLAGS).
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .stderr(Stdio::inherit())
            .output()
            .context("running cargo")?;
        if !out.status.success() {
            bail!("static build failed");
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    println!("vm: building static binaries");
    run(&["build", "-p", "ckpt-user", "-p", "ckpt-tests", "--bins"])?;
    let json = run(&["test", "-p", "ckpt-tests", "--no-run"])?;
    let mut tests = Vec::new();
    for line in json.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact"
            && v["profile"]["test"] == true
            && v["target"]["kind"][0] == "test"
        {
            if let Some(exe) = v["executable"].as_str() {
                tests.push(PathBuf::from(exe));
            }
        }
    }
    if tests.is_empty() {
        bail!("no integration test executables were built");
    }
    Ok((target_dir.join(TARGET).join("release"), tests))
}

/// Shared libraries a dynamic executable needs (from ldd), with the loader.
fn libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = output(Command::new("ldd").arg(exe)).unwrap_or_default();
    Ok(out
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect())
}

fn copy_into(root: &Path, src: &Path, dst_rel: &Path) -> Result<()> {
    let dst = root.join(dst_rel);
    std::fs::create_dir_all(dst.parent().unwrap())?;
    std::fs::copy(src, &dst)
        .with_context(|| format!("copying {} into the initramfs", src.display()))?;
    Ok(())
}

/// Kernel modules the tests need that the cloud kernels build as modules.
const MODULES: &[&str] = &[
    "loop",
    // The disk the two VMs of the migration share (virtio_pci is built in on 6.12,
    // a module on 6.1).
    "virtio_pci",
    "virtio_blk",
    "xfs",
    "btrfs",
    // What `criu check` looks for: nf_tables (its kernel-features probe runs an
    // nftables concat set), tun, veth, and the socket diag modules.
    "nf_tables",
    "tun",
    "veth",
    "unix_diag",
    "inet_diag",
    "tcp_diag",
    "udp_diag",
    "netlink_diag",
    "packet_diag",
    "raw_diag",
];

/// A module file's bytes, decompressed (busybox insmod reads plain .ko only).
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .context("running xz")?;
        if !out.status.success() {
            bail!("xz -dc {} failed", path.display());
        }
        Ok(out.stdout)
    } else {
        Ok(std::fs::read(path)?)
    }
}

/// The `depends=` entry of a module's .modinfo.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let Some(i) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[i + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(0);
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Every module file of a kernel, by name ("-" and "_" are the same in module names).
fn module_index(root: &Path) -> std::collections::HashMap<String, PathBuf> {
    let mut index = std::collections::HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
                if let Some(stem) = name
                    .strip_suffix(".ko")
                    .or_else(|| name.strip_suffix(".ko.xz"))
                {
                    index.insert(stem.replace('-', "_"), p);
                }
            }
        }
    }
    index
}

/// `wanted` and their dependencies, dependencies first, decompressed.
fn modules_in_order(kernel: &Kernel, wanted: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let root = kernel
        .vmlinuz
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("lib/modules")
        .join(&kernel.release);
    let index = module_index(&root);
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    fn visit(
        name: &str,
        index: &std::collections::HashMap<String, PathBuf>,
        out: &mut Vec<(String, Vec<u8>)>,
        seen: &mut BTreeSet<String>,
    ) -> Result<()> {
        let name = name.replace('-', "_");
        if !seen.insert(name.clone()) {
            return Ok(());
        }
        // Not a module file: built into this kernel.
        let Some(path) = index.get(&name) else {
            return Ok(());
        };
        let bytes = module_bytes(path)?;
        for dep in module_depends(&bytes) {
            visit(&dep, index, out, seen)?;
        }
        out.push((name, bytes));
        Ok(())
    }
    let mut seen = BTreeSet::new();
    for w in wanted {
        visit(w, &index, &mut out, &mut seen)?;
    }
    Ok(out)
}

const RUNNING: &str = "=== running ";
const EXIT: &str = "=== exit ";

const INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
# Pseudo-terminals (CRIU's check opens /dev/ptmx).
mkdir -p /dev/pts && mount -t devpts -o ptmxmode=0666 devpts /dev/pts
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mount -t tracefs tracefs /sys/kernel/tracing
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# The loopback, for the agent's metrics endpoint (no other network).
busybox ip link set lo up 2>/dev/null || busybox ifconfig lo 127.0.0.1 up
# A hostname per kernel: the migration's second VM is another node.
hostname "vm-$(uname -r)"
echo CKPT-VM-BOOTED "$(uname -r)"
if [ "$CKPT_PROBE" = 1 ]; then poweroff -f; fi
for m in /lib/ckpt-modules/*.ko; do [ -e "$m" ] && insmod "$m"; done
export PATH=/bin:/usr/bin:/usr/sbin:/sbin:/ckpt/bin CKPT_BIN_DIR=/ckpt/bin HOME=/tmp
cd /tmp
echo "=== ckpt-user check"
ckpt-user check
echo "=== end of check"
if [ -n "$CKPT_MIGRATE" ]; then
  # One side of the migration (dump or restore), on the disk both VMs attach.
  echo "=== running migrate-$CKPT_MIGRATE"
  /ckpt/tests/migrate --test-threads=1 --include-ignored --nocapture "$CKPT_MIGRATE"
  echo "=== exit $?"
else
for t in /ckpt/tests/*; do
  [ "$(basename $t)" = migrate ] && continue
  echo "=== running $(basename $t)"
  # An #[ignore]d test here is one the 6.18 host cannot run (CRIU): the VMs run it.
  $t --test-threads=2 --include-ignored $CKPT_FILTER
  echo "=== exit $?"
done
fi
echo CKPT-VM-DONE
poweroff -f
"#;

/// Integration suites that run on the host only: the package (dpkg and the .deb),
/// `top` (a terminal, tmux; what it shows is read as `locks`, `graph` and `deleted`
/// read it, which the VM suites test on each kernel) and `textfile` (node_exporter;
/// the metrics themselves are tested in the VMs by `metrics`).
const HOST_ONLY_SUITES: &[&str] = &["package", "top", "textfile"];

/// Writes the initramfs for the given binaries; returns its path.
pub fn initramfs(bins: &Path, tests: &[PathBuf], kernel: &Kernel) -> Result<PathBuf> {
    // One root and one image per kernel: the VMs of the matrix are prepared together
    // and run side by side.
    let root = workspace().join(format!("target/vm-root-{}", kernel.release));
    let _ = std::fs::remove_dir_all(&root);
    for d in [
        "bin",
        "usr/bin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "ckpt/bin",
        "ckpt/tests",
        "boot",
        "etc",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    copy_into(&root, Path::new("/bin/busybox"), Path::new("bin/busybox"))?;
    for applet in [
        "sh", "mount", "umount", "kill", "sleep", "mkdir", "cat", "poweroff", "echo", "ls",
        "uname", "true", "false", "rm", "date", "id", "hostname",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    for b in ["ckpt-agent", "ckpt-user", "locker"] {
        copy_into(&root, &bins.join(b), &Path::new("ckpt/bin").join(b))?;
    }
    let mut names = BTreeSet::new();
    for t in tests {
        // "locks-0123abcd" -> "locks"
        let file = t.file_name().unwrap().to_string_lossy();
        let name = file
            .rsplit_once('-')
            .map(|(n, _)| n)
            .unwrap_or(&file)
            .to_string();
        // The package test needs dpkg and the .deb, which only the host has.
        if HOST_ONLY_SUITES.contains(&name.as_str()) {
            continue;
        }
        if names.insert(name.clone()) {
            copy_into(&root, t, &Path::new("ckpt/tests").join(name))?;
        }
    }
    // The CRIU plugin, a shared library CRIU loads: the host build (a static build
    // makes no cdylib), with its libraries.
    let plugin = crate::util::build_release()?.join("libckpt_criu_plugin.so");
    copy_into(&root, &plugin, Path::new("ckpt/bin/libckpt_criu_plugin.so"))?;
    for lib in libraries(&plugin)? {
        copy_into(&root, &lib, lib.strip_prefix("/").unwrap())?;
    }
    // Dynamically linked tools the tests run, with their libraries.
    for tool in [
        "/usr/bin/stress-ng",
        "/usr/sbin/mkfs.ext4",
        "/usr/sbin/mkfs.xfs",
        "/usr/sbin/mkfs.btrfs",
        "/usr/sbin/criu",
        "/usr/sbin/runc",
        // CRIU keeps a container's tmpfs (its /dev) as a GNU tar archive.
        "/usr/bin/tar",
        "/usr/bin/gzip",
    ] {
        let tool = PathBuf::from(tool);
        copy_into(&root, &tool, tool.strip_prefix("/").unwrap())?;
        for lib in libraries(&tool)? {
            copy_into(&root, &lib, lib.strip_prefix("/").unwrap())?;
        }
    }
    // mkfs.ext4 reads its defaults from here.
    if Path::new("/etc/mke2fs.conf").exists() {
        copy_into(
            &root,
            Path::new("/etc/mke2fs.conf"),
            Path::new("etc/mke2fs.conf"),
        )?;
    }
    std::fs::create_dir_all(root.join("lib/ckpt-modules"))?;
    for (i, (name, bytes)) in modules_in_order(kernel, MODULES)?.into_iter().enumerate() {
        std::fs::write(
            root.join(format!("lib/ckpt-modules/{i:02}-{name}.ko")),
            bytes,
        )?;
    }
    copy_into(
        &root,
        &kernel.config,
        &Path::new("boot").join(format!("config-{}", kernel.release)),
    )?;
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/tmp:/bin/sh\n")?;
    let init = root.join("init");
    std::fs::write(&init, INIT)?;
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&init)?.permissions(),
        0o755,
    );
    sh(Command::new("chmod").arg("755").arg(&init))?;
    let img = workspace().join(format!("target/vm-initramfs-{}.cpio", kernel.release));
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc --quiet > {}",
            root.display(),
            img.display()
        ))
        .status()?;
    if !status.success() {
        bail!("cpio failed");
    }
    Ok(img)
}

/// Result of one VM run.
pub struct VmRun {
    pub console: String,
    pub timed_out: bool,
}

/// How one VM is booted.
pub struct Boot<'a> {
    pub kernel: &'a Kernel,
    pub initrd: &'a Path,
    pub accel: &'a str,
    /// Appended to the kernel command line (`KEY=value` reach init's environment).
    pub extra_cmdline: &'a str,
    pub timeout: Duration,
    /// A raw disk image, attached as /dev/vda.
    pub disk: Option<&'a Path>,
    /// The console log: target/vm-console-<release><log_suffix>.log.
    pub log_suffix: &'a str,
}

/// Boots a VM; kills it after its timeout.
pub fn boot(b: &Boot<'_>) -> Result<VmRun> {
    let Boot {
        kernel,
        initrd,
        accel,
        extra_cmdline,
        timeout,
        disk,
        log_suffix,
    } = *b;
    let log = workspace().join(format!(
        "target/vm-console-{}{log_suffix}.log",
        kernel.release
    ));
    let _ = std::fs::remove_file(&log);
    // Multi-threaded TCG races with the kernel's live text patching (int3-based
    // text_poke when tracepoints are switched on and off): seen as an "Oops: int3" in
    // 6.12 guests. One host thread for all vCPUs avoids it.
    let accel = if accel == "tcg" {
        "tcg,thread=single"
    } else {
        accel
    };
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            accel,
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "2048",
            "-no-reboot",
            "-display",
            "none",
        ])
        .args(["-monitor", "none", "-nic", "none"])
        .args(
            disk.map(|d| {
                [
                    "-drive".to_string(),
                    format!("file={},format=raw,if=virtio", d.display()),
                ]
            })
            .into_iter()
            .flatten(),
        )
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet rdinit=/init {extra_cmdline}"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let start = Instant::now();
    let mut timed_out = false;
    loop {
        if qemu.try_wait()?.is_some() {
            break;
        }
        if start.elapsed() > timeout {
            let _ = qemu.kill();
            let _ = qemu.wait();
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let console = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    Ok(VmRun { console, timed_out })
}

/// KVM if a probe boot gets to our init, else TCG (KVM fails on some hosts).
pub fn pick_accel(kernel: &Kernel, initrd: &Path) -> Result<&'static str> {
    if Path::new("/dev/kvm").exists() {
        let probe = boot(&Boot {
            kernel,
            initrd,
            accel: "kvm",
            extra_cmdline: "CKPT_PROBE=1",
            timeout: Duration::from_secs(30),
            disk: None,
            log_suffix: "-probe",
        })?;
        if probe.console.contains(BOOTED) {
            return Ok("kvm");
        }
        println!("vm: KVM does not boot here; using TCG");
    }
    Ok("tcg")
}

/// Sums "test result:" lines: (passed, failed).
pub fn tally(console: &str) -> (u64, u64) {
    let (mut passed, mut failed) = (0, 0);
    for line in console.lines() {
        if let Some(rest) = line.trim().strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut w = part.split_whitespace().rev();
                let (Some(word), Some(n)) = (w.next(), w.next()) else {
                    continue;
                };
                let n: u64 = n
                    .trim_start_matches(|c: char| !c.is_ascii_digit())
                    .parse()
                    .unwrap_or(0);
                match word {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    _ => {}
                }
            }
        }
    }
    (passed, failed)
}

/// One test binary's output on the console, between the init script's markers.
#[derive(Debug, PartialEq)]
pub struct Suite<'a> {
    pub name: &'a str,
    pub output: &'a str,
}

/// The suites that reported a failed test or exited non-zero.
pub fn failed_suites(console: &str) -> Vec<Suite<'_>> {
    let mut out = Vec::new();
    let mut rest = console;
    while let Some(start) = rest.find(RUNNING) {
        let after = &rest[start + RUNNING.len()..];
        let name_end = after.find(['\r', '\n']).unwrap_or(after.len());
        let name = after[..name_end].trim();
        let body = &after[name_end..];
        let (output, exit, next) = match body.find(EXIT) {
            Some(e) => {
                let code_end = body[e..].find('\n').map_or(body.len(), |n| e + n);
                let code = body[e + EXIT.len()..code_end].trim();
                (&body[..e], Some(code), &body[code_end..])
            }
            None => (body, None, ""),
        };
        let (_, failed) = tally(output);
        if failed > 0 || exit != Some("0") {
            out.push(Suite {
                name,
                output: output.trim_matches(['\r', '\n']),
            });
        }
        rest = next;
    }
    out
}

/// What one kernel's VM run gave: its tallies, whether it ran to the end, and what to
/// print of it (failed suites whole, the console's tail if it did not finish). The
/// text is kept, not printed, so that VMs running side by side do not interleave.
pub struct KernelRun {
    pub passed: u64,
    pub failed: u64,
    pub complete: bool,
    pub report: String,
}

/// Runs the integration tests on one kernel.
pub fn run_kernel(
    kernel: &Kernel,
    initrd: &Path,
    accel: &str,
    filter: &str,
    timeout: Duration,
) -> Result<KernelRun> {
    let extra = if filter.is_empty() {
        String::new()
    } else {
        format!("CKPT_FILTER={filter}")
    };
    let r = boot(&Boot {
        kernel,
        initrd,
        accel,
        extra_cmdline: &extra,
        timeout,
        disk: None,
        log_suffix: "",
    })?;
    Ok(kernel_run(kernel, &r))
}

/// Tallies and the report of one VM's console.
fn kernel_run(kernel: &Kernel, r: &VmRun) -> KernelRun {
    use std::fmt::Write as _;
    let (passed, failed) = tally(&r.console);
    let complete = r.console.contains(DONE) && !r.timed_out;
    let mut report = String::new();
    // A failing suite is printed whole: its failure report can be far above the
    // console's tail, behind the suites that ran after it.
    for suite in failed_suites(&r.console) {
        let _ = writeln!(
            report,
            "---- {} on {}: failed ----",
            suite.name, kernel.release
        );
        let _ = writeln!(report, "{}", suite.output);
        let _ = writeln!(report, "---- end of {} ----", suite.name);
    }
    if !complete {
        let tail: Vec<&str> = r.console.lines().rev().take(60).collect();
        let _ = writeln!(
            report,
            "---- console of {} (last 60 lines){} ----",
            kernel.release,
            if r.timed_out { ", timed out" } else { "" }
        );
        for l in tail.iter().rev() {
            let _ = writeln!(report, "{l}");
        }
        let _ = writeln!(report, "---- end of console ----");
    }
    // What ckpt-user check found on this kernel.
    for l in r
        .console
        .lines()
        .skip_while(|l| !l.starts_with("=== ckpt-user check"))
        .skip(1)
        .take_while(|l| !l.starts_with("=== end of check"))
    {
        let _ = writeln!(report, "  check: {}", l.trim_end());
    }
    // Each suite's time, so a slow guest shows where its time went.
    let mut suite = "";
    for l in r.console.lines() {
        if let Some(name) = l.strip_prefix("=== running ") {
            suite = name;
        } else if let Some(result) = l.strip_prefix("test result: ") {
            let _ = writeln!(report, "  {suite}: {result}");
        }
    }
    KernelRun {
        passed,
        failed,
        complete,
        report,
    }
}

/// The migration: `from` dumps a workload onto a disk, `to` (another kernel, another
/// hostname) restores it from there (tests/tests/migrate.rs). One run per side; the
/// restore side runs only after a dump that passed.
pub fn run_migration(
    from: (&Kernel, &Path),
    to: (&Kernel, &Path),
    accel: &str,
    timeout: Duration,
) -> Result<Vec<KernelRun>> {
    let disk = workspace().join("target/vm-migration-disk.img");
    let _ = std::fs::remove_file(&disk);
    // Sparse: the dump side makes the filesystem.
    std::fs::File::create(&disk)?.set_len(512 << 20)?;
    let mut runs = Vec::new();
    for ((kernel, initrd), side) in [(from, "dump"), (to, "restore")] {
        let r = boot(&Boot {
            kernel,
            initrd,
            accel,
            extra_cmdline: &format!("CKPT_MIGRATE={side}"),
            timeout,
            disk: Some(&disk),
            log_suffix: "-migration",
        })?;
        let mut run = kernel_run(kernel, &r);
        // What each side measured (its tests print with --nocapture).
        for l in r
            .console
            .lines()
            .filter_map(|l| l.find("migration").map(|i| &l[i..]))
        {
            run.report
                .push_str(&format!("  {side}: {}\n", l.trim_end()));
        }
        let ok = run.complete && run.failed == 0 && run.passed > 0;
        runs.push(run);
        if !ok {
            break;
        }
    }
    let _ = std::fs::remove_file(&disk);
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_sums_cargo_test_lines() {
        let c = "running 3 tests\ntest result: ok. 3 passed; 0 failed; 0 ignored\n\r\ntest result: FAILED. 2 passed; 1 failed; 0 ignored\n";
        assert_eq!(tally(c), (5, 1));
    }

    #[test]
    fn failed_suites_are_cut_out_whole() {
        let c = "boot\n=== running agent\r\nrunning 2 tests\ntest a ... FAILED\n\
                 ---- a stdout ----\nplanned 5000\ntest result: FAILED. 1 passed; 1 failed;\n\
                 === exit 101\n=== running dump\ntest result: ok. 4 passed; 0 failed;\n\
                 === exit 0\n=== running leases\nthread panicked\n";
        let s = failed_suites(c);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0].name, "agent");
        assert!(s[0].output.contains("planned 5000"));
        assert!(s[0].output.ends_with("1 failed;"));
        // Cut off by a crash or a timeout: no exit line, so it counts as failed.
        assert_eq!(s[1].name, "leases");
        assert_eq!(s[1].output, "thread panicked");
    }

    #[test]
    fn module_dependencies_come_from_modinfo() {
        let ko = b"\x7fELF....license=GPL\0depends=libcrc32c,xor,raid6_pq\0intree=Y\0";
        assert_eq!(module_depends(ko), vec!["libcrc32c", "xor", "raid6_pq"]);
        assert!(module_depends(b"depends=\0").is_empty());
        assert!(module_depends(b"nothing here").is_empty());
    }

    #[test]
    fn newest_kernel_package_sorts_numerically() {
        let mut v = [
            "linux-image-6.1.0-9-cloud",
            "linux-image-6.1.0-56-cloud",
            "linux-image-6.1.0-47-cloud",
        ];
        v.sort_by_key(|n| version_key(n));
        assert_eq!(v.last(), Some(&"linux-image-6.1.0-56-cloud"));
    }
}
