use anyhow::{anyhow, Context as _};
use aya_build::Toolchain;

/// Builds ckpt-ebpf for the bpf target (nightly + bpf-linker) and drops the object in
/// OUT_DIR, where `tracer::loader` embeds it with include_bytes_aligned!.
fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .manifest_path("../ckpt-ebpf/Cargo.toml")
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "ckpt-ebpf")
        .ok_or_else(|| anyhow!("ckpt-ebpf package not found"))?;
    let cargo_metadata::Package {
        name,
        manifest_path,
        ..
    } = ebpf_package;
    let root_dir = manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {manifest_path}"))?
        .as_str();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: name.as_str(),
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
