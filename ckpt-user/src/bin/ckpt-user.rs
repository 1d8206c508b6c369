use ckpt_user::cli::{report, run_user, UserArgs};
use clap::Parser as _;

fn main() {
    // Behave like other Unix tools when the reader of stdout goes away (`| head`).
    // SAFETY: setting a signal disposition before any threads exist.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let args = UserArgs::parse();
    if let Err(e) = run_user(args) {
        std::process::exit(report("ckpt-user", &e));
    }
}
