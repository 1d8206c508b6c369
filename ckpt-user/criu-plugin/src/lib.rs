//! ckpt as a CRIU 3.17 plugin (`libckpt_criu_plugin.so`, installed into CRIU's
//! plugin directory as `ckpt.so`). CRIU loads every plugin for every run, dumps,
//! pre-dumps and restores alike, so this one does nothing unless a lease is involved:
//!
//! - dump (`dump`): when CRIU has just dumped a lease (`filelocks.img` has one, which
//!   needs `--file-locks`), `ckpt-leases.json` beside CRIU's images, with what they
//!   lose: a breaking lease's own type and the exact time it had left.
//! - restore (`restore`): with a valid `ckpt-leases.json`, every lease that was being
//!   broken is restored by CRIU as not breaking and broken again by the plugin just
//!   before the tasks resume, so that the kernel revokes it when the policy says
//!   (`CKPT_LEASE_TIME`, default exact: the time it had left), not after CRIU's whole
//!   lease-break-time; then what CRIU restored is checked against what was dumped.
//!
//! A failure is reported (stderr, CRIU's log, and the file of the side it happened
//! on) and never fails or crashes CRIU: init and exit always succeed, and a missing
//! or corrupt sidecar leaves CRIU's own behaviour.
//!
//! A tree in its own pid namespace is matched to the host's pids through the
//! processes CRIU has seized (`tasks`). Images streamed with `--stream` are not read.

pub mod dump;
pub mod images;
pub mod restore;
pub mod tasks;

use std::{
    ffi::{c_char, c_int, c_uint, c_void, CString},
    io::Write as _,
    os::fd::{FromRawFd as _, OwnedFd, RawFd},
};

use anyhow::{Context as _, Result};
use ckpt_user::tracer::pins::{PinDir, DEFAULT_PIN_DIR};
use nix::{
    fcntl::{openat, renameat, OFlag},
    sys::stat::Mode,
    unistd::{unlinkat, UnlinkatFlags},
};

/// CRIU 3.17's `cr_plugin_desc_t` (criu/include/criu-plugin.h): CRIU refuses, and
/// then fails the whole run, a plugin whose version or hook count exceeds its own
/// (0x200 and 10 in 3.17.1; later CRIUs have more hooks and accept 10).
#[repr(C)]
pub struct PluginDesc {
    name: *const c_char,
    init: Option<extern "C" fn(c_int) -> c_int>,
    exit: Option<extern "C" fn(c_int, c_int)>,
    version: c_uint,
    max_hooks: c_uint,
    hooks: [*const c_void; HOOKS],
}

// SAFETY: CRIU only reads the descriptor; its pointers are to a static string and
// to functions.
unsafe impl Sync for PluginDesc {}

const HOOKS: usize = 10;
const CRIU_PLUGIN_VERSION: c_uint = 0x200;
const STAGE_DUMP: c_int = 0;
const STAGE_RESTORE: c_int = 2;
/// `CR_PLUGIN_HOOK__RESUME_DEVICES_LATE`: per restored process, after CRIU's
/// restore, tasks still stopped.
const HOOK_RESUME_DEVICES_LATE: usize = 9;

const fn hooks() -> [*const c_void; HOOKS] {
    let mut h = [std::ptr::null(); HOOKS];
    h[HOOK_RESUME_DEVICES_LATE] = resume_devices_late as *const c_void;
    h
}

/// What CRIU looks up in every plugin it loads.
#[no_mangle]
pub static CR_PLUGIN_DESC: PluginDesc = PluginDesc {
    name: c"ckpt".as_ptr(),
    init: Some(init),
    exit: Some(exit),
    version: CRIU_PLUGIN_VERSION,
    max_hooks: HOOKS as c_uint,
    hooks: hooks(),
};

/// Always succeeds: an error here would abort CRIU's run.
extern "C" fn init(stage: c_int) -> c_int {
    if stage == STAGE_RESTORE {
        guarded("preparing the restore", || match image_dir() {
            Some(dir) => restore::before(dir),
            None => Ok(()),
        });
    }
    0
}

extern "C" fn exit(stage: c_int, ret: c_int) {
    match (stage, ret) {
        (STAGE_DUMP, 0) => guarded("writing the sidecar", || match image_dir() {
            Some(dir) => dump::after_dump(dir),
            None => Ok(()),
        }),
        (STAGE_RESTORE, _) => guarded("ending the restore", restore::after),
        _ => {}
    }
}

/// Per restored process; errors are CRIU's to ignore, and -ENOTSUP lets the other
/// plugins see the process too.
extern "C" fn resume_devices_late(_pid: c_int) -> c_int {
    guarded("breaking the leases again", restore::at_resume);
    -libc::ENOTSUP
}

/// Runs `f`, reporting its error or panic: neither may reach CRIU.
fn guarded(what: &str, f: impl FnOnce() -> Result<()>) {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => say(Level::Error, &format!("{what}: {e:#}")),
        Err(_) => say(Level::Error, &format!("{what}: internal error (panic)")),
    }
}

/// ckpt-agent's pins (`$CKPT_PIN_DIR`, default /sys/fs/bpf/ckpt).
fn pins() -> PinDir {
    PinDir::new(std::env::var_os("CKPT_PIN_DIR").unwrap_or(DEFAULT_PIN_DIR.into()))
}

/// CRIU's log levels (criu/include/log.h).
#[derive(Clone, Copy)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
}

/// A line on stderr (errors and warnings) and in CRIU's log (`-o`), where a user of
/// CRIU looks.
pub fn say(level: Level, msg: &str) {
    let line = format!("ckpt CRIU plugin: {msg}");
    if !matches!(level, Level::Info) {
        eprintln!("{line}");
    }
    // SAFETY: dlsym with a NUL-terminated name.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"print_on_level".as_ptr()) };
    if f.is_null() {
        return;
    }
    // SAFETY: CRIU's `void print_on_level(unsigned int, const char *, ...)`, called
    // with a "%s" format and one C string.
    let print: unsafe extern "C" fn(c_uint, *const c_char, ...) = unsafe { std::mem::transmute(f) };
    if let Ok(text) = CString::new(format!("{line}\n")) {
        // SAFETY: see above.
        unsafe { print(level as c_uint, c"%s".as_ptr(), text.as_ptr()) };
    }
}

/// CRIU's image directory, from `criu_get_image_dir()` (looked up at run time: this
/// library is also linked by tests, outside CRIU); None outside CRIU or once CRIU
/// has closed it.
fn image_dir() -> Option<RawFd> {
    // SAFETY: dlsym with a NUL-terminated name; the symbol, when CRIU exports it, is
    // `int criu_get_image_dir(void)`.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"criu_get_image_dir".as_ptr()) };
    if f.is_null() {
        return None;
    }
    // SAFETY: see above.
    let get: extern "C" fn() -> c_int = unsafe { std::mem::transmute(f) };
    let fd = get();
    (fd >= 0).then_some(fd)
}

/// A file of the image directory, or None when it has none of that name.
fn read_image(dir: RawFd, name: &str) -> Result<Option<Vec<u8>>> {
    let fd = match openat(
        Some(dir),
        name,
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {name}")),
    };
    // SAFETY: a new fd of our own.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).with_context(|| format!("reading {name}"))?;
    Ok(Some(bytes))
}

/// The image directory has a file of that name.
fn has(dir: RawFd, name: &str) -> bool {
    nix::sys::stat::fstatat(Some(dir), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).is_ok()
}

/// Written under a temporary name and renamed: the file is whole or absent.
fn write_atomic(dir: RawFd, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = format!(".{name}.tmp");
    let fd = openat(
        Some(dir),
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o600),
    )
    .with_context(|| format!("creating {tmp} in CRIU's image directory"))?;
    // SAFETY: a new fd of our own.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let written = (|| -> Result<()> {
        file.write_all(bytes)?;
        file.sync_all()?;
        renameat(Some(dir), tmp.as_str(), Some(dir), name)?;
        Ok(())
    })();
    if written.is_err() {
        let _ = unlinkat(Some(dir), tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    }
    written.with_context(|| format!("writing {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_is_what_criu_3_17_accepts() {
        assert_eq!(std::mem::size_of::<PluginDesc>(), 112);
        assert_eq!(CR_PLUGIN_DESC.version, 0x200);
        assert_eq!(CR_PLUGIN_DESC.max_hooks, 10);
        assert!(
            CR_PLUGIN_DESC.hooks[HOOK_RESUME_DEVICES_LATE] == resume_devices_late as *const c_void
        );
        assert_eq!(init(0), 0);
        assert_eq!(init(STAGE_RESTORE), 0);
        // Outside CRIU, exit and the hook find no image directory and do nothing.
        exit(STAGE_DUMP, 0);
        assert_eq!(resume_devices_late(1), -libc::ENOTSUP);
        exit(STAGE_RESTORE, 0);
    }
}
