//! The mount daemon: mount a store through FUSE (in the foreground or as a daemon), serve
//! it until it is unmounted (`encimg umount`, `umount`, `fusermount3 -u`, SIGTERM or
//! SIGINT), then flush and close everything; and `umount`.
//!
//! Daemon mode forks before any thread exists. The child starts a new session, sends
//! stdin and stdout to `/dev/null` and stderr (so the tracing log) to `STORE/mount.log`,
//! mounts, and tells the parent through a pipe that the mount is live, or why it failed.
//! The parent returns only once the mount shows in `/proc/self/mountinfo`.
//!
//! Signals: SIGINT, SIGTERM and SIGHUP are blocked in every thread and taken by one
//! thread with `sigwait`. SIGINT and SIGTERM unmount (lazily if files are still open, so
//! the daemon keeps serving them until they close); SIGHUP unmounts in the foreground and
//! is ignored by the daemon. However the mount goes away, the session loop ends, the
//! filesystem is shut down (writes flushed, volumes closed, cache zeroized) and the process
//! exits 0.
//!
//! Under a service manager (`$NOTIFY_SOCKET`, systemd's `Type=notify`), the mount says
//! `READY=1` once it is live and `STOPPING=1` when it is going away.
//!
//! Each running mount has a pid file in the runtime directory (`/run/encimg` for root,
//! else `$XDG_RUNTIME_DIR/encimg`, else `$TMPDIR/encimg-UID`), named after the mountpoint,
//! so `umount` can wait for the daemon to finish. A runtime directory that is not the
//! user's alone is not used (the mount logs why, and `umount` then does not wait).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};

use crate::err;
use crate::error::{Error, ErrorKind, Result};
use crate::fs::{Fs, MountOptions};
use crate::fuse::{DestroyHook, FuseFs, UringState};
use crate::store::Store;

mod fusermount;

/// How long the parent waits for the daemon, and `umount` for the mount and daemon to go.
const WAIT: Duration = Duration::from_secs(5);
/// How long a mount waits for the daemon of a store's previous mount, already unmounted, to
/// finish and let the store go.
const HANDOVER: Duration = Duration::from_secs(10);
/// Readahead of the mount, raised after INIT where allowed.
const MAX_READAHEAD_KB: u32 = 1024;
/// Worker threads serving the kernel. Each blocks in its backing read or write, so this
/// bounds how many of the kernel's requests can reach the device at once: with 4, fio's cold
/// 4 KiB random reads at queue depth 16 ran at ~23-24k IOPS on the 2-core benchmark machine;
/// with 16, ~37-50k (contrib/bench; 8 and 32 were within noise of 16). Idle threads cost a
/// stack and a request buffer each.
const THREADS: usize = 16;
// Each thread's request buffer comes back to the pool: with more threads than it keeps,
// buffers beyond it would be mapped and unmapped per request.
const _: () = assert!(THREADS <= crate::store::POOL_KEEP);

/// What to mount and how.
#[derive(Clone, Debug)]
pub struct MountConfig {
    pub mountpoint: PathBuf,
    /// Serve in this process until unmounted, instead of as a daemon.
    pub foreground: bool,
    /// Let other users (and root) use the mount; needs `user_allow_other` in
    /// `/etc/fuse.conf` for non-root users.
    pub allow_other: bool,
    /// Mount read-only.
    pub read_only: bool,
    /// An account's mount of a system store (`encimg serve`).
    pub account: bool,
    /// Take requests through io_uring where the kernel offers it (see [`crate::fuse::uring`]).
    pub io_uring: bool,
    /// Options of the filesystem core (`allow_other` and `read_only` follow the fields above).
    pub fs_opts: MountOptions,
}

/// Mount `store` at `cfg.mountpoint`. In the foreground this returns once the mount is gone;
/// as a daemon it returns (in the calling process) once the mount is live.
pub fn mount(store: Store, mut cfg: MountConfig) -> Result<()> {
    cfg.fs_opts.allow_other = cfg.allow_other && !cfg.account;
    cfg.fs_opts.read_only |= cfg.read_only;
    cfg.read_only = cfg.fs_opts.read_only;
    let mp = check_mountpoint(&cfg.mountpoint)?;
    store.check()?;
    // The daemon changes directory to `/`: keep the store reachable.
    let store = store.absolute()?;
    // Say at once, in one line, what stops an ordinary user's mount here.
    if !is_root() {
        if let Some(why) = fusermount::obstacle() {
            return Err(err!(Denied, "cannot mount at {}: {why}", mp.display()));
        }
    }
    // Refuse early, before forking, if another mount serves the store (the daemon takes the
    // lock for real, so two mounts racing here still end with one).
    drop(MountLock::take(&store, &mp, false)?);
    if cfg.foreground {
        let out = Out { daemon: false };
        serve(store, &cfg, &mp, out, || Ok(()))
    } else {
        daemonize(store, &cfg, &mp)
    }
}

/// Unmount the encimg mount at `mountpoint`, and wait (up to a few seconds) until it is gone
/// and its daemon has finished.
pub fn umount(mountpoint: &Path) -> Result<()> {
    let mp = resolve(mountpoint)?;
    let top = mounts_at(&mp)?
        .pop()
        .ok_or_else(|| err!(InvalidInput, "{} is not mounted", mp.display()))?;
    if !top.is_encimg() {
        return Err(err!(
            InvalidInput,
            "{} is not an encimg mount (it is {} from {})",
            mp.display(),
            top.fstype,
            top.source
        ));
    }
    // A pid file is trusted only in a directory private to this user (see `run_dir`).
    let pid_file = pid_file_path(&mp);
    let daemon = run_dir()
        .ok()
        .and_then(|_| read_pid_file(&pid_file, &mp))
        .map(|pid| (pid_file, pid));
    unmount_now(&mp)?;
    let deadline = Instant::now() + WAIT;
    loop {
        let mounted = mounts_at(&mp)?.iter().any(MountEntry::is_encimg);
        let running = daemon
            .as_ref()
            .is_some_and(|(p, pid)| p.exists() && alive(*pid));
        if !mounted && !running {
            if let Some((p, _)) = &daemon {
                // Left behind by a daemon that was killed.
                let _ = std::fs::remove_file(p);
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            if mounted {
                return Err(err!(Busy, "{} is still mounted", mp.display()));
            }
            let pid = daemon.map(|d| d.1).unwrap_or(0);
            if crate::sys::process_state(pid as u32) == Some('T') {
                tracing::warn!(
                    "unmounted, but the daemon (pid {pid}) is stopped: it finishes once continued (kill -CONT {pid})"
                );
            } else {
                tracing::warn!("unmounted, but the daemon (pid {pid}) is still shutting down");
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

// ---------------------------------------------------------------------------------------
// Serving.

/// Where progress lines go: stderr in the foreground, the log file (timestamped) for the
/// daemon.
#[derive(Clone, Copy)]
struct Out {
    daemon: bool,
}

impl Out {
    fn note(self, msg: impl std::fmt::Display) {
        // Not eprintln!: mount.log may be on a full disk, and the daemon must go on.
        use std::io::Write;
        if self.daemon {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let _ = writeln!(
                std::io::stderr(),
                "{} encimg[{}]: {msg}",
                crate::sys::rfc3339(t),
                std::process::id()
            );
        } else {
            let _ = writeln!(std::io::stderr(), "encimg: {msg}");
        }
    }
}

fn fuser_config(cfg: &MountConfig) -> Config {
    let mut opts = vec![
        MountOption::FSName("encimg".into()),
        MountOption::NoAtime,
        MountOption::NoDev,
        MountOption::NoSuid,
        if cfg.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    // fuser hands `Subtype` to fusermount3 only; when it mounts directly (as root) the
    // subtype is dropped and the mount shows as plain `fuse`. As a kernel option it works
    // on both paths (fusermount3 understands `subtype=` too), giving type `fuse.encimg`.
    opts.push(MountOption::CUSTOM("subtype=encimg".into()));
    // The kernel checks permissions from the nodes' modes, except in an account's mount of
    // a system store, where FuseFs checks every request's uid itself (and logs refusals).
    if !cfg.account {
        opts.push(MountOption::DefaultPermissions);
    }
    let mut c = Config::default();
    c.mount_options = opts;
    c.acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    c.n_threads = Some(THREADS);
    c.clone_fd = true;
    c
}

/// The mount options of [`fuser_config`] as fusermount3 takes them (`-o`).
fn fusermount_options(cfg: &MountConfig) -> String {
    let mut o = vec![
        "fsname=encimg",
        "subtype=encimg",
        "default_permissions",
        "noatime",
        "nodev",
        "nosuid",
        if cfg.read_only { "ro" } else { "rw" },
    ];
    if cfg.allow_other {
        o.push("allow_other");
    }
    o.join(",")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Mount, call `ready` once the mount is live, serve until unmounted, shut down.
fn serve(
    store: Store,
    cfg: &MountConfig,
    mp: &Path,
    out: Out,
    ready: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let mask = SignalMask::block();
    let one_mount = MountLock::take(&store, mp, cfg.fs_opts.writable_images)?;
    let root = store.root.clone();
    let fs = Arc::new(Fs::new(store, cfg.fs_opts.clone())?);
    // fuser 0.18 unmounts the mountpoint again when the session ends, even after an
    // outside `umount` (its is-mounted test is inverted), and warns when that fails. Take
    // the mount out of the session at destroy time, when the loops have ended (so the
    // mount is gone), so that second attempt happens here, quietly, once.
    let slot: Arc<Mutex<Option<SessionUnmounter>>> = Arc::default();
    let hook_slot = slot.clone();
    let hook: DestroyHook = Box::new(move || {
        if let Some(mut u) = lock(&hook_slot).take() {
            let _ = u.unmount();
        }
    });
    // A listing of many names leaves the heap large and mostly free (its transient
    // descriptions between the names kept): once such a burst has passed, give it back.
    let weak = Arc::downgrade(&fs);
    std::thread::spawn(move || {
        let (mut seen, mut trimmed) = (0, 0);
        while let Some(fs) = weak.upgrade() {
            let now = fs.names_asked();
            drop(fs);
            if now == seen && now > trimmed + 1000 {
                // SAFETY: malloc_trim only returns free heap memory to the system.
                unsafe { libc::malloc_trim(0) };
                trimmed = now;
            }
            seen = now;
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    });
    let fuse = FuseFs::new(fs.clone(), THREADS)
        .on_destroy(hook)
        .io_uring(cfg.io_uring);
    let idle = fuse.idle_threads();
    let uring = fuse.io_uring_state();
    let config = fuser_config(cfg);
    let mut session = if is_root() {
        Session::new(fuse, mp, &config).map_err(|e| mount_error(e, mp))?
    } else {
        // An ordinary user: the setuid fusermount3 mounts and hands us the device.
        let fd = fusermount::mount(mp, &fusermount_options(cfg))?;
        let acl = config.acl;
        Session::from_fd(fuse, fd, acl, config).map_err(|e| mount_error(e, mp))?
    };
    *lock(&slot) = Some(session.unmount_callable());
    if let Ok(device) = session.as_fd().try_clone_to_owned() {
        idle.watch(device);
    }
    let Some(entry) = mounts_at(mp)?.pop().filter(MountEntry::is_encimg) else {
        return Err(err!(
            Io,
            "mounted {} but it is not in mountinfo",
            mp.display()
        ));
    };
    raise_readahead(&entry.dev);
    let pid_file = PidFile::create(mp, &root);
    out.note(format_args!(
        "mounted {} at {}",
        root.display(),
        mp.display()
    ));
    ready()?;
    crate::sys::notify_service_manager(&format!(
        "READY=1\nSTATUS=serving {} at {}",
        root.display(),
        mp.display()
    ));
    spawn_signal_thread(mask.set, session.unmount_callable(), mp.to_path_buf(), out)?;
    fs.resume_interrupted();
    let r = session.run_with(move |dispatcher, device| {
        let none: Box<dyn FnOnce() + Send> = Box::new(|| {});
        let state = std::mem::take(&mut *lock(&uring));
        match state {
            UringState::NotWanted => none,
            UringState::NotOffered => {
                out.note(
                    "--io-uring: the kernel does not offer FUSE over io_uring (it needs Linux \
                     6.14+ and `echo Y > /sys/module/fuse/parameters/enable_uring`); reading \
                     the FUSE device",
                );
                none
            }
            UringState::Failed(why) => {
                out.note(format_args!("--io-uring: {why}; reading the FUSE device"));
                none
            }
            UringState::Agreed(prepared) => {
                let mut rings = prepared.start(dispatcher, device);
                out.note("serving through FUSE over io_uring");
                Box::new(move || rings.stop())
            }
        }
    });
    crate::sys::notify_service_manager("STOPPING=1");
    // The session's destroy has shut the filesystem down already; again is harmless.
    fs.shutdown();
    drop(fs);
    // The store is free before the pid file goes: `umount` returns once the pid file is
    // gone, and a mount started right after must find the store free.
    drop(one_mount);
    drop(pid_file);
    match r {
        Ok(()) => {
            out.note(format_args!("unmounted {}", mp.display()));
            Ok(())
        }
        Err(e) => Err(Error::from(e).context(format!("serving {}", mp.display()))),
    }
}

/// The kernel caps the readahead a FUSE mount may ask for at INIT to its default (usually
/// 128 KiB); raise the mount's own bdi to `MAX_READAHEAD_KB` afterwards (root only;
/// best-effort).
fn raise_readahead(dev: &str) {
    let p = PathBuf::from(format!("/sys/class/bdi/{dev}/read_ahead_kb"));
    let cur: u32 = std::fs::read_to_string(&p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u32::MAX);
    if cur < MAX_READAHEAD_KB {
        if let Err(e) = std::fs::write(&p, format!("{MAX_READAHEAD_KB}\n")) {
            tracing::debug!("cannot raise readahead ({}): {e}", p.display());
        }
    }
}

fn mount_error(e: std::io::Error, mp: &Path) -> Error {
    let mut msg = e.to_string().trim().to_string();
    if msg.contains("user_allow_other") {
        msg = "--allow-other needs 'user_allow_other' in /etc/fuse.conf".into();
    }
    let mut err = Error::from(e);
    err.message = format!("cannot mount at {}: {msg}", mp.display());
    err
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------
// Daemon.

fn daemonize(store: Store, cfg: &MountConfig, mp: &Path) -> Result<()> {
    let threads = std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
    if threads > 1 {
        tracing::warn!("forking the mount daemon with {threads} threads running");
    }
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::from(std::io::Error::last_os_error()).context("pipe"));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let log = store.root.join("mount.log");
    // SAFETY: no other thread runs here (checked above: the CLI starts none before
    // mounting), so the child gets a consistent copy of the process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::from(std::io::Error::last_os_error()).context("fork"));
    }
    if pid == 0 {
        drop(rd);
        daemon_child(store, cfg, mp, wr, &log)
    }
    drop(wr);
    let mut text = String::new();
    let _ = File::from(rd).read_to_string(&mut text);
    let line = text.lines().next().unwrap_or("");
    if line == "OK" {
        let deadline = Instant::now() + WAIT;
        while !mounts_at(mp)?.iter().any(MountEntry::is_encimg) {
            if Instant::now() >= deadline {
                return Err(err!(Io, "the mount at {} did not appear", mp.display()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        println!("mounted at {}", mp.display());
        return Ok(());
    }
    let mut status = 0;
    // SAFETY: reaps our own child, which exits right after reporting a failure.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Err(decode_error(line).unwrap_or_else(|| {
        err!(
            Io,
            "the mount daemon exited during start-up (see {})",
            log.display()
        )
    }))
}

/// The forked child: detach, mount, report, serve, exit.
fn daemon_child(store: Store, cfg: &MountConfig, mp: &Path, wr: OwnedFd, log: &Path) -> ! {
    let mut report = Some(File::from(wr));
    detach(log);
    let out = Out { daemon: true };
    let r = serve(store, cfg, mp, out, || {
        if let Some(mut w) = report.take() {
            w.write_all(b"OK\n")
                .map_err(|e| Error::from(e).context("reporting to the parent"))?;
        }
        Ok(())
    });
    let code = match r {
        Ok(()) => 0,
        Err(e) => {
            if let Some(mut w) = report.take() {
                let _ = w.write_all(encode_error(&e).as_bytes());
            }
            out.note(format_args!("error: {e}"));
            e.kind.exit_code()
        }
    };
    std::process::exit(code)
}

/// New session, stdio away from the terminal, stderr to the log, cwd `/`, SIGHUP ignored.
fn detach(log: &Path) {
    // SAFETY: setsid and signal take no pointers; a forked child is never a group leader.
    unsafe {
        libc::setsid();
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let null = OpenOptions::new().read(true).write(true).open("/dev/null");
    // The log is a store file: never through a link, never blocking on a FIFO.
    let err = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(log)
        .and_then(|f| {
            if f.metadata()?.is_file() {
                Ok(f)
            } else {
                Err(std::io::Error::other("not a regular file"))
            }
        })
        .or_else(|_| OpenOptions::new().write(true).open("/dev/null"));
    if let Ok(n) = &null {
        // SAFETY: dup2 onto the standard descriptors from a descriptor we own.
        unsafe {
            libc::dup2(n.as_raw_fd(), 0);
            libc::dup2(n.as_raw_fd(), 1);
        }
    }
    if let Ok(e) = &err {
        // SAFETY: as above.
        unsafe { libc::dup2(e.as_raw_fd(), 2) };
    }
    let _ = std::env::set_current_dir("/");
}

fn encode_error(e: &Error) -> String {
    let errno = e.os_errno.map_or("-".to_string(), |n| n.to_string());
    let msg = e.message.replace('\n', " ");
    format!("ERR {:?} {errno} {msg}\n", e.kind)
}

fn decode_error(line: &str) -> Option<Error> {
    let mut it = line.strip_prefix("ERR ")?.splitn(3, ' ');
    let kind = ErrorKind::from_name(it.next()?).unwrap_or(ErrorKind::Io);
    let os_errno = it.next()?.parse().ok();
    let mut e = Error::new(kind, it.next().unwrap_or("mount failed"));
    e.os_errno = os_errno;
    Some(e)
}

// ---------------------------------------------------------------------------------------
// Signals.

/// SIGINT, SIGTERM and SIGHUP blocked in this thread (and so in every thread it starts)
/// while this lives; the previous mask comes back on drop.
struct SignalMask {
    set: libc::sigset_t,
    old: libc::sigset_t,
}

impl SignalMask {
    fn block() -> SignalMask {
        // SAFETY: sigset_t is plain data; both sets are initialized before use (sigemptyset,
        // and pthread_sigmask filling `old`).
        let mut m: SignalMask = unsafe { std::mem::zeroed() };
        // SAFETY: the pointers are to the sets above, valid for the calls.
        unsafe {
            libc::sigemptyset(&mut m.set);
            for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut m.set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &m.set, &mut m.old);
        }
        m
    }
}

impl Drop for SignalMask {
    fn drop(&mut self) {
        // SAFETY: `old` is the mask pthread_sigmask returned.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

fn spawn_signal_thread(
    set: libc::sigset_t,
    mut unmounter: SessionUnmounter,
    mp: PathBuf,
    out: Out,
) -> Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut first = true;
            loop {
                let mut sig = 0;
                // SAFETY: `set` and `sig` are valid for the call.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                let name = match sig {
                    libc::SIGINT => "SIGINT",
                    libc::SIGTERM => "SIGTERM",
                    _ => "SIGHUP",
                };
                if sig == libc::SIGHUP && out.daemon {
                    out.note("SIGHUP ignored");
                    continue;
                }
                out.note(format_args!("{name}: unmounting {}", mp.display()));
                let r = if first {
                    // A mount made through fusermount3 is not the session's to unmount.
                    unmounter.unmount().and_then(|()| {
                        let still =
                            mounts_at(&mp).is_ok_and(|m| m.iter().any(MountEntry::is_encimg));
                        if still {
                            unmount_now(&mp).map_err(|e| std::io::Error::other(e.message))
                        } else {
                            Ok(())
                        }
                    })
                } else {
                    Err(std::io::Error::from_raw_os_error(libc::EBUSY))
                };
                first = false;
                if let Err(e) = r {
                    // Busy (files open): detach now, keep serving until they close.
                    out.note(format_args!("unmount: {e}; detaching lazily"));
                    if let Err(e) = detach_lazily(&mp) {
                        out.note(format_args!("lazy unmount failed: {e}"));
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| err!(Io, "cannot start the signal thread: {e}"))
}

fn detach_lazily(mp: &Path) -> Result<()> {
    if !mounts_at(mp)?.iter().any(MountEntry::is_encimg) {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return umount2(mp, libc::MNT_DETACH);
    }
    fusermount(&["-u", "-z"], mp)
}

// ---------------------------------------------------------------------------------------
// Unmounting.

/// `fusermount3 -u`, else (as root) umount2.
fn unmount_now(mp: &Path) -> Result<()> {
    let fm = fusermount(&["-u"], mp);
    let Err(fm_err) = fm else { return Ok(()) };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return umount2(mp, 0);
    }
    if fm_err.message.contains("busy") {
        return Err(err!(
            Busy,
            "{} is busy: files under it are still open",
            mp.display()
        ));
    }
    Err(fm_err)
}

fn fusermount(args: &[&str], mp: &Path) -> Result<()> {
    let o = Command::new("fusermount3")
        .args(args)
        .arg("--")
        .arg(mp)
        .output()
        .map_err(|e| err!(Io, "cannot run fusermount3: {e}"))?;
    if o.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&o.stderr);
    let msg = text.lines().next().unwrap_or("failed").trim();
    Err(err!(Io, "fusermount3: {msg}"))
}

fn umount2(mp: &Path, flags: i32) -> Result<()> {
    let c = CString::new(mp.as_os_str().as_bytes())
        .map_err(|_| err!(InvalidInput, "bad path {}", mp.display()))?;
    // SAFETY: `c` is a NUL-terminated path valid for the call.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EBUSY) {
        return Err(err!(
            Busy,
            "{} is busy: files under it are still open",
            mp.display()
        ));
    }
    Err(Error::from(e).context(format!("unmounting {}", mp.display())))
}

// ---------------------------------------------------------------------------------------
// Mountpoints and /proc/self/mountinfo.

/// The absolute mountpoint, without touching the mounted filesystem itself (which may be
/// dead, or closed to us): the parent directory is canonicalized, the last name kept.
fn resolve(p: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(p).map_err(|e| Error::from(e).context(p.display()))?;
    if let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) {
        let here = dir
            .canonicalize()
            .map_err(|e| Error::from(e).context(dir.display()))?
            .join(name);
        // What is mounted at `p` is not touched: a stat of a mount whose daemon is stopped
        // waits for ever. A mountpoint is never a symlink (mount(2) follows one).
        if !mounts_at(&here)?.is_empty()
            || !std::fs::symlink_metadata(&here).is_ok_and(|m| m.file_type().is_symlink())
        {
            return Ok(here);
        }
    }
    abs.canonicalize()
        .map_err(|e| Error::from(e).context(p.display()))
}

fn check_mountpoint(p: &Path) -> Result<PathBuf> {
    // Before any stat of `p`, which waits for ever if the mount's daemon is stopped.
    let resolved = resolve(p);
    if let Ok(mp) = &resolved {
        if mounts_at(mp)?.last().is_some_and(MountEntry::is_encimg) {
            return Err(err!(
                Busy,
                "{} is already an encimg mount (if its daemon was killed, run `encimg umount {}` first)",
                mp.display(),
                mp.display()
            ));
        }
    }
    let meta = match std::fs::metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(err!(NotFound, "mountpoint {} does not exist", p.display()))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(err!(
                Busy,
                "{} is a dead mount: run `encimg umount {}` first",
                p.display(),
                p.display()
            ))
        }
        Err(e) => return Err(Error::from(e).context(format!("mountpoint {}", p.display()))),
    };
    if !meta.is_dir() {
        return Err(err!(
            NotDir,
            "mountpoint {} is not a directory",
            p.display()
        ));
    }
    resolved
}

/// One line of mountinfo.
struct MountEntry {
    /// `MAJOR:MINOR` of the filesystem.
    dev: String,
    fstype: String,
    source: String,
}

impl MountEntry {
    fn is_encimg(&self) -> bool {
        self.fstype == "fuse.encimg" || (self.fstype == "fuse" && self.source == "encimg")
    }
}

/// Undo mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The mounts at `mp`, bottom first.
fn mounts_at(mp: &Path) -> Result<Vec<MountEntry>> {
    // Bytes, not a String: a mountpoint's name need not be UTF-8.
    let text = std::fs::read("/proc/self/mountinfo")
        .map_err(|e| Error::from(e).context("/proc/self/mountinfo"))?;
    Ok(mounts_in(&text, mp))
}

/// The mounts at `mp` in `text` (a `mountinfo`), bottom first.
fn mounts_in(text: &[u8], mp: &Path) -> Vec<MountEntry> {
    let want = mp.as_os_str().as_bytes();
    let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut out = Vec::new();
    fn field(b: &[u8], n: usize) -> &[u8] {
        b.split(|&c| c == b' ').nth(n).unwrap_or(b"")
    }
    for line in text.split(|&c| c == b'\n') {
        // The optional fields end at a lone "-".
        let Some(sep) = line.windows(3).position(|w| w == b" - ") else {
            continue;
        };
        let (pre, post) = (&line[..sep], &line[sep + 3..]);
        if unescape(field(pre, 4)) != want {
            continue;
        }
        let dev = lossy(field(pre, 2));
        let fstype = lossy(field(post, 0));
        let source = lossy(&unescape(field(post, 1)));
        out.push(MountEntry {
            dev,
            fstype,
            source,
        });
    }
    out
}

// ---------------------------------------------------------------------------------------
// One mount per store.

/// The store's mount lock: a `flock` on the store's directory itself, held by the daemon for
/// its life (a lock file could be unlinked and recreated under a live mount; a directory
/// cannot). Two mounts of one store would each cache sectors and serve writes the other
/// cannot see, and an fsync'd write through one could be overwritten from the other's stale
/// cache, so a second mount is refused. `STORE/locks/store.mount` says which process serves
/// the store and where.
struct MountLock {
    _lock: crate::sys::FileLock,
    info: PathBuf,
}

impl MountLock {
    /// `writable_images`: recorded, so the CLI knows to ask the mount for copies of images
    /// (see `cli::resources::through_mount`).
    fn take(store: &Store, mp: &Path, writable_images: bool) -> Result<MountLock> {
        let info = store.root.join("locks").join("store.mount");
        // A daemon whose mount is gone still holds the lock while it finishes (`umount`
        // returns before it exits, so `umount X && encimg mount X` would nearly always be
        // refused): wait for it. Any other holder is refused at once.
        let deadline = Instant::now() + HANDOVER;
        let grace = Instant::now() + Duration::from_millis(500);
        let lock = loop {
            if let Some(lock) = crate::sys::FileLock::try_exclusive_dir(&store.root)? {
                break lock;
            }
            let text = crate::sys::read_regular(&info, 4096)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let mut l = text.lines();
            let pid = l.next().unwrap_or("?").trim().to_string();
            let at = l.next().unwrap_or("another mountpoint").to_string();
            let finishing = MountLock::finishing(&text);
            let limit = if text.is_empty() { grace } else { deadline };
            if !finishing || Instant::now() >= limit {
                return Err(if !finishing || text.is_empty() {
                    err!(
                        Busy,
                        "store {} is already mounted at {at} (pid {pid}): a store is served by one mount at a time",
                        store.root.display()
                    )
                } else {
                    err!(
                        Busy,
                        "store {} is still held by pid {pid}, whose mount at {at} is gone: it has not finished after {} s; try again when it has",
                        store.root.display(),
                        HANDOVER.as_secs()
                    )
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        crate::sys::private_dir(&store.root.join("locks"))?;
        let mut text = format!("{}\n{}\n", std::process::id(), mp.display());
        if writable_images {
            text += "writable-images\n";
        }
        if let Err(e) = crate::sys::write_atomic(&info, text.as_bytes()) {
            tracing::warn!("cannot record the mount in {}: {e}", info.display());
        }
        Ok(MountLock { _lock: lock, info })
    }

    /// Whether the lock's holder, by its `record`, is finishing: its mount is gone from its
    /// own view of the mounts (another mount namespace has its own), or it is exiting
    /// (killed: its mounts can no longer be read). Not while it serves, nor for a record
    /// that does not read as one line of pid, one of the mountpoint and the known flags (a
    /// mountpoint with a newline in it): those are refused at once, as ever.
    fn finishing(record: &str) -> bool {
        if record.is_empty() {
            // Removed by a holder letting go (its record goes just before its lock); a
            // holder that keeps the lock without a record is refused after a short grace.
            return true;
        }
        let mut l = record.split_terminator('\n');
        let (Some(Ok(pid)), Some(at)) = (l.next().map(str::parse::<u32>), l.next()) else {
            return false;
        };
        let at = Path::new(at);
        if !at.is_absolute() || !l.all(|f| f == "writable-images") {
            return false;
        }
        let theirs = Path::new("/proc").join(pid.to_string()).join("mountinfo");
        match std::fs::read(theirs) {
            Ok(text) => !mounts_in(&text, at).iter().any(MountEntry::is_encimg),
            // An exiting process has no mount namespace left (EINVAL); a gone one, no entry.
            Err(e) => matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)),
        }
    }
}

impl Drop for MountLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.info);
    }
}

// ---------------------------------------------------------------------------------------
// Pid files.

fn run_dir_path() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/encimg");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("encimg"),
        None => std::env::temp_dir().join(format!("encimg-{uid}")),
    }
}

/// The directory of the pid files, made if missing, and only if it is this user's alone:
/// without `XDG_RUNTIME_DIR` (`su`, cron) it is `/tmp/encimg-UID`, which another user can
/// make first and then swap the pid file in, so `umount` would wait for the wrong process.
fn run_dir() -> Result<PathBuf> {
    let d = run_dir_path();
    crate::sys::own_private_dir(&d)?;
    Ok(d)
}

/// `RUN_DIR/mount-HASH.pid`, HASH an FNV-1a of the mountpoint.
fn pid_file_path(mp: &Path) -> PathBuf {
    let h = crate::sys::fnv1a64(mp.as_os_str().as_bytes());
    run_dir_path().join(format!("mount-{h:016x}.pid"))
}

/// The daemon's pid, if the pid file names this mountpoint.
fn read_pid_file(p: &Path, mp: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(p).ok()?;
    let mut l = text.lines();
    let pid: i32 = l.next()?.trim().parse().ok()?;
    (l.next()? == mp.to_string_lossy()).then_some(pid)
}

/// Alive and not a zombie.
fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    pid > 0
        && unsafe { libc::kill(pid, 0) } == 0
        && crate::sys::process_state(pid as u32).is_some_and(|s| s != 'Z' && s != 'X')
}

/// The pid file of this process's mount; removed on drop.
struct PidFile(PathBuf);

impl PidFile {
    fn create(mp: &Path, store: &Path) -> Option<PidFile> {
        let p = pid_file_path(mp);
        let text = format!(
            "{}\n{}\n{}\n",
            std::process::id(),
            mp.display(),
            store.display()
        );
        let r = run_dir().and_then(|_| crate::sys::write_atomic(&p, text.as_bytes()));
        match r {
            Ok(()) => Some(PidFile(p)),
            Err(e) => {
                tracing::warn!(
                    "cannot write the pid file (`umount` will not wait for the daemon): {e}"
                );
                None
            }
        }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Whether an encimg mount is on `mp`.
pub fn is_mountpoint(mp: &Path) -> bool {
    mounts_at(mp).is_ok_and(|m| m.iter().any(MountEntry::is_encimg))
}

/// Block SIGINT, SIGTERM and SIGHUP in this thread (and the threads it starts later) and
/// run `f` on a thread of its own when SIGINT or SIGTERM arrives (SIGHUP is ignored).
pub fn on_termination(f: impl FnOnce() + Send + 'static) -> Result<()> {
    let mask = SignalMask::block();
    let set = mask.set;
    // The mask stays: every thread started from here on inherits it.
    std::mem::forget(mask);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: `set` and `sig` are valid for the call.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 && sig != libc::SIGHUP {
                f();
                return;
            }
        })
        .map(|_| ())
        .map_err(|e| err!(Io, "cannot start the signal thread: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    /// mountinfo is bytes: a mountpoint's name need not be UTF-8, and spaces, tabs,
    /// newlines and backslashes in it are octal escapes.
    #[test]
    fn mountinfo_is_read_as_bytes_with_its_escapes() {
        let mut text = b"22 1 0:21 / /proc rw,nosuid - proc proc rw\n".to_vec();
        text.extend_from_slice(
            b"61 22 0:52 / /tmp/m\xff\\040x rw,nosuid shared:1 - fuse.encimg encimg rw\n",
        );
        text.extend_from_slice(b"62 61 0:53 / /tmp/a\\134b rw - fuse fuse rw\n");
        let odd = Path::new(std::ffi::OsStr::from_bytes(b"/tmp/m\xff x"));
        let found = mounts_in(&text, odd);
        assert_eq!(found.len(), 1);
        assert!(found[0].is_encimg());
        assert_eq!(found[0].dev, "0:52");
        let back = mounts_in(&text, Path::new("/tmp/a\\b"));
        assert_eq!(back.len(), 1);
        assert!(!back[0].is_encimg());
        assert!(mounts_in(&text, Path::new("/tmp/m")).is_empty());
        assert!(mounts_in(b"garbage\n\n- -\n", Path::new("/")).is_empty());
    }
}
