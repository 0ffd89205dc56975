//! `encimg serve`: the root daemon of a system store (SPEC §10).
//!
//! - Each account gets a mount of its own store at `MOUNTPOINT/USER` (a child
//!   `encimg mount --foreground --account-uid UID`), which only that account may use.
//! - A Unix socket (`/run/encimg.sock`, mode 0666) runs the ordinary CLI for its callers:
//!   `encimg --system COMMAND…`. The caller is known by `SO_PEERCRED`, never by anything it
//!   sends. The client sends its arguments, its stdout and stderr, and the files the
//!   command names, opened by the client with its own rights (SCM_RIGHTS). The daemon runs
//!   the command in a child `encimg --store SYSTEM/accounts/USER …` whose stdout and stderr
//!   are the client's, and answers with its exit code. Nothing in the request can name
//!   another store, another account or a path for the daemon to open.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::account::{self, Account, User};
use crate::err;
use crate::error::Result;
use crate::store::Store;
use crate::sys::fdpass;

/// A request on the socket: the CLI arguments after `encimg` (without `--system`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub argv: Vec<String>,
}

/// The answer: the command's exit code, and a message when the daemon refused it itself.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub exit: i32,
    #[serde(default)]
    pub error: Option<String>,
}

pub struct ServeConfig {
    pub system: PathBuf,
    pub mountpoint: PathBuf,
    pub socket: PathBuf,
    pub cache_size: String,
}

struct Daemon {
    cfg: ServeConfig,
    exe: PathBuf,
    mounts: Mutex<HashMap<String, Child>>,
    /// Requests running, per caller uid: bounded, so one user cannot take the daemon.
    running: Mutex<HashMap<u32, usize>>,
    /// Audit lines of refused requests, per uid.
    throttle: account::Throttle,
}

/// Requests one uid may have running at once, and all uids together.
const PER_UID: usize = 8;
const TOTAL: usize = 64;
/// A request is one line of at most this many bytes, sent within this time.
const MAX_REQUEST: u64 = 64 << 10;
const REQUEST_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Arguments the daemon never takes from a client: they would name another store or make
/// the daemon read a file on the client's behalf.
const FORBIDDEN: &[&str] = &["--store", "--system", "--passphrase-file"];

pub fn serve(cfg: ServeConfig) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(err!(Denied, "encimg serve runs as root"));
    }
    if !account::is_system(&cfg.system) {
        return Err(err!(
            InvalidInput,
            "{} is not a system store (sudo encimg init --system --store {})",
            cfg.system.display(),
            cfg.system.display()
        ));
    }
    std::fs::create_dir_all(&cfg.mountpoint)
        .map_err(|e| crate::Error::from(e).context(cfg.mountpoint.display()))?;
    let _ = std::fs::set_permissions(&cfg.mountpoint, std::fs::Permissions::from_mode(0o755));
    if UnixStream::connect(&cfg.socket).is_ok() {
        return Err(err!(
            Busy,
            "{} is in use: another encimg serve is running",
            cfg.socket.display()
        ));
    }
    let _ = std::fs::remove_file(&cfg.socket);
    let listener = UnixListener::bind(&cfg.socket)
        .map_err(|e| crate::Error::from(e).context(cfg.socket.display()))?;
    // Anyone may connect: who they are is the kernel's word (SO_PEERCRED).
    let _ = std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(0o666));
    let d = Arc::new(Daemon {
        exe: std::env::current_exe().map_err(|e| err!(Io, "cannot find encimg: {e}"))?,
        cfg,
        mounts: Mutex::new(HashMap::new()),
        running: Mutex::new(HashMap::new()),
        throttle: Default::default(),
    });
    if let Ok(rd) = std::fs::read_dir(d.cfg.system.join("accounts")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            match User::by_name(&name) {
                Some(u) => {
                    if let Err(e) = d.ensure_mount(&u) {
                        tracing::warn!("account {name}: cannot mount: {e}");
                    }
                }
                None => tracing::warn!("account {name} has no Unix user: not mounted"),
            }
        }
    }
    // SIGTERM/SIGINT: unmount every account and leave.
    let stop = d.clone();
    crate::mount::on_termination(move || stop.shutdown())?;
    crate::sys::notify_service_manager("READY=1\nSTATUS=serving");
    eprintln!(
        "encimg serve: {} at {}, socket {}",
        d.cfg.system.display(),
        d.cfg.mountpoint.display(),
        d.cfg.socket.display()
    );
    for conn in listener.incoming() {
        match conn {
            Ok(c) => d.clone().admit(c),
            Err(e) => {
                // Out of descriptors, say: wait instead of spinning.
                tracing::warn!("accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
    Ok(())
}

impl Daemon {
    fn shutdown(&self) {
        crate::sys::notify_service_manager("STOPPING=1");
        let mut mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        for c in mounts.values() {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for (_, mut c) in mounts.drain() {
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.cfg.socket);
        std::process::exit(0);
    }

    /// The account's store (made on first use) and its mount.
    fn ensure_account(&self, u: &User) -> Result<PathBuf> {
        let dir = Account::dir(&self.cfg.system, &u.name);
        let store = Store::at(&dir, crate::region::LOCAL);
        if store.init()? {
            store.keys.update(|k| k.service_key())?;
            account::audit(&self.cfg.system, &format!("{}: account created", u.name));
        }
        self.ensure_mount(u)?;
        Ok(dir)
    }

    fn ensure_mount(&self, u: &User) -> Result<()> {
        let mut mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = mounts.get_mut(&u.name) {
            if c.try_wait().ok().flatten().is_none() {
                return Ok(());
            }
        }
        let mp = self.cfg.mountpoint.join(&u.name);
        // A mount whose daemon died (or an earlier serve's) is taken down first.
        if crate::mount::is_mountpoint(&mp) {
            let _ = Command::new("umount").arg("-l").arg(&mp).status();
        }
        let _ = std::fs::create_dir(&mp);
        let _ = std::fs::set_permissions(&mp, std::fs::Permissions::from_mode(0o755));
        let dir = Account::dir(&self.cfg.system, &u.name);
        let mut child = Command::new(&self.exe)
            .arg("--store")
            .arg(&dir)
            .arg("mount")
            .arg(&mp)
            .args(["--foreground", "--cache-size", &self.cfg.cache_size])
            .args(["--account-uid", &u.uid.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| err!(Io, "cannot start the mount of {}: {e}", u.name))?;
        // Live once it shows in mountinfo while the child runs (or the child gave up).
        for _ in 0..200 {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(err!(Io, "the mount of {} exited: {st}", u.name));
            }
            if crate::mount::is_mountpoint(&mp) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        mounts.insert(u.name.clone(), child);
        Ok(())
    }

    /// Take a connection if its caller (and everyone together) is within the bounds, on a
    /// thread of its own; otherwise answer at once and close.
    fn admit(self: Arc<Self>, conn: UnixStream) {
        let refuse = |conn: &UnixStream, msg: &str| {
            let r = Reply {
                exit: 7,
                error: Some(msg.to_string()),
            };
            let mut line = serde_json::to_vec(&r).unwrap_or_default();
            line.push(b'\n');
            let _ = conn.set_write_timeout(Some(REQUEST_WAIT));
            let mut w: &UnixStream = conn;
            let _ = w.write_all(&line);
        };
        let Ok(uid) = fdpass::peer_uid(&conn) else {
            return;
        };
        {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            let total: usize = running.values().sum();
            let mine = running.entry(uid).or_insert(0);
            if *mine >= PER_UID || total >= TOTAL {
                drop(running);
                return refuse(
                    &conn,
                    "encimg serve is busy with your other requests; try again",
                );
            }
            *mine += 1;
        }
        let d = self.clone();
        let spawned = std::thread::Builder::new()
            .name("request".into())
            .spawn(move || {
                d.handle(conn, uid);
                let mut running = d.running.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(n) = running.get_mut(&uid) {
                    *n -= 1;
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a request thread: {e}");
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = running.get_mut(&uid) {
                *n -= 1;
            }
        }
    }

    fn handle(&self, conn: UnixStream, uid: u32) {
        let reply = match self.run(&conn, uid) {
            Ok(code) => Reply {
                exit: code,
                error: None,
            },
            Err(e) => Reply {
                exit: e.kind.exit_code(),
                error: Some(e.message.clone()),
            },
        };
        let mut line = serde_json::to_vec(&reply).unwrap_or_default();
        line.push(b'\n');
        let _ = (&conn).write_all(&line);
    }

    /// Run a request of `uid`, the caller the kernel named when it connected.
    fn run(&self, conn: &UnixStream, uid: u32) -> Result<i32> {
        let user = User::by_uid(uid).ok_or_else(|| err!(Denied, "uid {uid} has no user name"))?;
        let _ = conn.set_read_timeout(Some(REQUEST_WAIT));
        let mut buf = vec![0u8; MAX_REQUEST as usize];
        let (n, fds) = fdpass::recv(conn, &mut buf).map_err(|e| err!(Io, "receive: {e}"))?;
        // The rest of the request line, if it did not come in one piece (bounded).
        let mut req = buf[..n].to_vec();
        if !req.ends_with(b"\n") {
            let mut r = std::io::Read::take(std::io::BufReader::new(conn), MAX_REQUEST);
            r.read_until(b'\n', &mut req)
                .map_err(|e| err!(InvalidInput, "receive: {e}"))?;
            if !req.ends_with(b"\n") {
                return Err(err!(
                    InvalidInput,
                    "a request is one line of at most 64 KiB"
                ));
            }
        }
        let req: Request = serde_json::from_slice(&req)
            .map_err(|e| err!(InvalidInput, "a malformed request: {e}"))?;
        // Refusals here are as fast as a user can connect: throttled per user.
        let log = |what: &str| {
            if self.throttle.allow(user.uid) {
                account::audit(&self.cfg.system, &format!("{}: {what}", user.name));
            }
        };
        if fds.len() < 2 {
            return Err(err!(InvalidInput, "a request brings its stdout and stderr"));
        }
        if let Err(e) = check_argv(&req.argv, fds.len() - 2) {
            log(&format!("refused request {:?}: {}", req.argv, e.message));
            return Err(e);
        }
        let dir = self.ensure_account(&user)?;
        self.spawn(&dir, &req.argv, fds)
    }

    /// Run the command for the account: stdout and stderr are the client's, the files it
    /// passed are descriptors 3, 4, … (named `/dev/fd/N` in its arguments).
    fn spawn(&self, dir: &Path, argv: &[String], fds: Vec<OwnedFd>) -> Result<i32> {
        let mut fds = fds.into_iter();
        let out = fds.next().unwrap();
        let errf = fds.next().unwrap();
        let files: Vec<OwnedFd> = fds.collect();
        let raw: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--store")
            .arg(dir)
            .args(argv)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(errf));
        for k in ["SOFTHSM2_CONF", "ENCIMG_LOG", "LANG"] {
            if let Some(v) = std::env::var_os(k) {
                cmd.env(k, v);
            }
        }
        // SAFETY: between fork and exec only dup2 and fcntl, which are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                // First out of the way (above every target), then into 3, 4, ….
                let base = 64 + raw.len() as i32;
                for (i, &fd) in raw.iter().enumerate() {
                    if libc::dup2(fd, base + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for i in 0..raw.len() as i32 {
                    if libc::dup2(base + i, 3 + i) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(base + i);
                }
                Ok(())
            });
        }
        let status = cmd
            .status()
            .map_err(|e| err!(Io, "cannot run encimg: {e}"))?;
        drop(files);
        Ok(status.code().unwrap_or(70))
    }
}

/// Refuse what a client may not ask: another store, a passphrase file, commands that are
/// the daemon's own (init, mount, umount, serve), regions with a location or key service
/// of the client's choosing, and more file descriptors than `/dev/fd/N` names.
fn check_argv(argv: &[String], nfiles: usize) -> Result<()> {
    for a in argv {
        if FORBIDDEN
            .iter()
            .any(|f| a == f || a.starts_with(&format!("{f}=")))
        {
            return Err(err!(Denied, "{a} cannot be used through the system store"));
        }
    }
    let mut full = vec!["encimg".to_string()];
    full.extend(argv.iter().cloned());
    let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(&full).map_err(|e| {
        err!(
            InvalidInput,
            "{}",
            e.to_string().lines().next().unwrap_or("")
        )
    })?;
    use crate::cli::Command as C;
    match &cli.command {
        C::Init { .. } | C::Mount(_) | C::Umount(_) | C::Serve { .. } | C::Man { .. } => {
            return Err(err!(
                Refused,
                "the system store is root's to set up and is mounted by encimg serve at {}/USER",
                account::DEFAULT_MOUNTPOINT
            ))
        }
        C::Region(r) if !r.is_plain_add_or_query() => {
            return Err(err!(
                Refused,
                "regions of a system store with their own location or key service are added by root"
            ))
        }
        _ => {}
    }
    // The files a command names are the client's, passed as descriptors: never a path
    // the daemon would open with its own rights.
    let named: Vec<&Path> = match &cli.command {
        C::Import { file, .. } | C::Export { file, .. } => vec![file.as_path()],
        C::Key(k) => k.material().into_iter().collect(),
        _ => Vec::new(),
    };
    for p in named {
        if !p.to_str().is_some_and(|s| s.starts_with("/dev/fd/")) {
            return Err(err!(
                Denied,
                "{} must be passed as a descriptor (the encimg client does this)",
                p.display()
            ));
        }
    }
    // Every /dev/fd/N must be one of the files passed (3 … 2 + nfiles).
    for a in argv {
        if let Some(n) = a.strip_prefix("/dev/fd/") {
            let ok = n.parse::<usize>().is_ok_and(|n| n >= 3 && n < 3 + nfiles);
            if !ok {
                return Err(err!(InvalidInput, "{a} was not passed with the request"));
            }
        }
    }
    Ok(())
}
