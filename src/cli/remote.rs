//! `encimg --system COMMAND`: run a command on the host's system store through `encimg
//! serve`. The files the command names are opened here, with the caller's own rights, and
//! passed as descriptors; so are stdout and stderr, which the command writes directly.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::{Cli, Command};
use crate::err;
use crate::error::Result;
use crate::serve::{Reply, Request};

pub fn run(cli: &Cli) -> Result<()> {
    let socket: PathBuf = std::env::var_os("ENCIMG_SOCKET")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::account::DEFAULT_SOCKET.into());
    let mut argv: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--system")
        .collect();
    if argv
        .iter()
        .any(|a| a == "--store" || a.starts_with("--store="))
    {
        return Err(err!(
            InvalidInput,
            "--system and --store name two stores: use one"
        ));
    }
    // What the environment set, made explicit (the daemon's command has no environment).
    let given = |flag: &str, argv: &[String]| {
        argv.iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
    };
    if cli.region != crate::region::LOCAL && !given("--region", &argv) {
        argv.splice(0..0, ["--region".to_string(), cli.region.clone()]);
    }
    if !given("--kms-timeout", &argv) {
        argv.splice(
            0..0,
            ["--kms-timeout".to_string(), cli.kms_timeout.to_string()],
        );
    }
    let mut files: Vec<File> = Vec::new();
    let mut created: Option<PathBuf> = None;
    let mut pass = |path: &Path, f: File, argv: &mut Vec<String>| -> Result<()> {
        let s = path.to_string_lossy().to_string();
        let i = argv
            .iter()
            .position(|a| *a == s)
            .ok_or_else(|| err!(InvalidInput, "write {s} as an argument of its own"))?;
        argv[i] = format!("/dev/fd/{}", 3 + files.len());
        files.push(f);
        Ok(())
    };
    let open = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(p)
            .map_err(|e| crate::Error::from(e).context(p.display()))
    };
    match &cli.command {
        Command::Import { file, .. } => pass(file, open(file)?, &mut argv)?,
        Command::Key(k) => {
            if let Some(m) = k.material() {
                pass(m, open(m)?, &mut argv)?;
            }
        }
        Command::Export { file, format, .. } => {
            if format != "raw" {
                return Err(err!(
                    Refused,
                    "through the system store, export raw, then convert it (qemu-img convert -O {format})"
                ));
            }
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(file)
                .map_err(|e| crate::Error::from(e).context(file.display()))?;
            created = Some(file.clone());
            pass(file, f, &mut argv)?;
        }
        Command::Mount(_) | Command::Umount(_) => {
            // SAFETY: getuid has no preconditions.
            let uid = unsafe { libc::getuid() };
            return Err(err!(
                Refused,
                "the system store is mounted by encimg serve: your account is at {}/{}",
                crate::account::DEFAULT_MOUNTPOINT,
                crate::account::User::by_uid(uid)
                    .map(|u| u.name)
                    .unwrap_or_else(|| "USER".into())
            ));
        }
        _ => {}
    }
    let conn = UnixStream::connect(&socket).map_err(|e| {
        err!(
            Io,
            "cannot reach encimg serve at {}: {e} (is encimg.service running?)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_vec(&Request { argv }).map_err(|e| err!(Io, "{e}"))?;
    line.push(b'\n');
    let mut fds = vec![1, 2];
    fds.extend(files.iter().map(|f| f.as_raw_fd()));
    crate::sys::fdpass::send(&conn, &line, &fds)
        .map_err(|e| err!(Io, "sending to encimg serve: {e}"))?;
    drop(files);
    let mut answer = String::new();
    BufReader::new(&conn)
        .read_line(&mut answer)
        .map_err(|e| err!(Io, "reading from encimg serve: {e}"))?;
    let reply: Reply = serde_json::from_str(&answer)
        .map_err(|_| err!(Io, "encimg serve closed the connection without an answer"))?;
    if reply.exit != 0 {
        if let Some(p) = created {
            let _ = std::fs::remove_file(p);
        }
    }
    if let Some(msg) = reply.error {
        eprintln!("encimg: error: {msg}");
    }
    std::process::exit(reply.exit);
}
