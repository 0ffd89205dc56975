//! Man pages and shell completions, generated from the same clap definitions as `--help`
//! (never hand-written copies): `encimg completions SHELL` prints a completion script, and
//! `encimg man --dir DIR` writes `encimg.1` and one page per subcommand (`encimg-copy.1`,
//! `encimg-key-create.1`, …). The Debian package and `contrib/install.sh` run both.

use std::path::Path;

use clap::CommandFactory;

use crate::error::{IoContext, Result};

/// The shells completions are made for.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Print the completion script for `shell` on stdout.
pub fn completions(shell: Shell) -> Result<()> {
    let mut cmd = super::Cli::command();
    let out = &mut std::io::stdout();
    match shell {
        Shell::Bash => clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, "encimg", out),
        Shell::Zsh => clap_complete::generate(clap_complete::Shell::Zsh, &mut cmd, "encimg", out),
        Shell::Fish => clap_complete::generate(clap_complete::Shell::Fish, &mut cmd, "encimg", out),
    }
    Ok(())
}

/// Write the man pages into `dir`; returns how many.
pub fn man_pages(dir: &Path) -> Result<usize> {
    std::fs::create_dir_all(dir).ctx(dir.display())?;
    let mut cmd = super::Cli::command();
    cmd.build();
    write_page(&cmd, "encimg", dir)
}

fn write_page(cmd: &clap::Command, name: &str, dir: &Path) -> Result<usize> {
    // A subcommand's page is titled and named after its full path: encimg-key-create(1).
    let page = cmd
        .clone()
        .name(name.to_string())
        .bin_name(name.replace('-', " "));
    let mut buf = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut buf)
        .map_err(|e| crate::err!(Io, "rendering the man page of {name}: {e}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf).ctx(path.display())?;
    let mut n = 1;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        n += write_page(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(n)
}
