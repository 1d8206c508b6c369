//! Empty on purpose: this library target exists so that ckpt-user can name ckpt-ebpf
//! as a build-dependency, which makes cargo re-run ckpt-user's build script (and so
//! rebuild the eBPF object) when ckpt-ebpf or ckpt-common change.
#![no_std]
