//! Man pages and shell completions for both binaries, generated from their clap
//! definitions (`ckpt-user __docs DIR`, which `cargo xtask install` and `package`
//! run). DIR is laid out like PREFIX/share: `man/man1`, `bash-completion/completions`,
//! `zsh/vendor-completions`, `fish/vendor_completions.d`.

use std::{fs::File, path::Path};

use anyhow::{Context as _, Result};
use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::cli::{AgentArgs, UserArgs};

pub fn write(dir: &Path) -> Result<()> {
    let man = dir.join("man/man1");
    std::fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    for cmd in [UserArgs::command(), AgentArgs::command()] {
        let name = cmd.get_name().to_string();
        render(&man, &name, cmd.clone())?;
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let page = format!("{name}-{}", sub.get_name());
            render(&man, &page, sub.clone().name(page.clone()))?;
        }
        for (shell, rel) in [
            (Shell::Bash, format!("bash-completion/completions/{name}")),
            (Shell::Zsh, format!("zsh/vendor-completions/_{name}")),
            (
                Shell::Fish,
                format!("fish/vendor_completions.d/{name}.fish"),
            ),
        ] {
            let path = dir.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let mut f =
                File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            clap_complete::generate(shell, &mut cmd.clone(), &name, &mut f);
        }
    }
    Ok(())
}

fn render(man: &Path, page: &str, cmd: clap::Command) -> Result<()> {
    let path = man.join(format!("{page}.1"));
    let mut f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    clap_mangen::Man::new(cmd)
        .render(&mut f)
        .with_context(|| format!("writing {}", path.display()))
}
