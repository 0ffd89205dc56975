//! Small operating-system helpers shared by the key store and the resource store: private
//! files and directories that keep the store owner's ownership, store files opened without
//! following links or blocking, atomic replacement, advisory locks, sparse-aware copying,
//! time, the allocator's settings, a cache line of its own ([`Padded`]), and (in [`secret`])
//! memory for keys and process hardening.

pub mod fdpass;
pub mod secret;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::err;
use crate::error::{Error, IoContext, Result};

/// A value on a cache line of its own: locks taken by every request from every thread
/// (sharded maps) would otherwise share lines with their neighbours, and each lock would
/// move its neighbours' line between the cores too.
#[repr(align(64))]
#[derive(Default)]
pub struct Padded<T>(pub T);

/// The owner new store files get when root works on another user's store (see
/// [`adopt_store_owner`]); `None` otherwise.
static STORE_OWNER: Mutex<Option<(u32, u32)>> = Mutex::new(None);

/// When this process runs as root on a store owned by another user, every file and directory
/// it creates there is handed to that user, so the owner is never locked out of their own
/// store (root's `encimg key create` on a user's store used to leave a root-owned
/// `keystore.json` the user could no longer read).
pub fn adopt_store_owner(root: &Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let owner = fs::symlink_metadata(root)
        .ok()
        .filter(|m| m.uid() != 0)
        .map(|m| (m.uid(), m.gid()));
    *STORE_OWNER.lock().unwrap_or_else(|p| p.into_inner()) = owner;
}

fn store_owner() -> Option<(u32, u32)> {
    *STORE_OWNER.lock().unwrap_or_else(|p| p.into_inner())
}

/// Give a file this process just created to the store's owner (see [`adopt_store_owner`]).
fn adopt(f: &File) {
    if let Some((uid, gid)) = store_owner() {
        // SAFETY: fchown on a descriptor we own; no memory is passed.
        unsafe { libc::fchown(f.as_raw_fd(), uid, gid) };
    }
}

fn adopt_path(p: &Path) {
    if let Some((uid, gid)) = store_owner() {
        let _ = std::os::unix::fs::lchown(p, Some(uid), Some(gid));
    }
}

/// Create a directory (and parents) with mode 0700.
pub fn private_dir(p: &Path) -> Result<()> {
    let existed = fs::symlink_metadata(p).is_ok();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .ctx(format!("creating {}", p.display()))?;
    if !existed {
        adopt_path(p);
    }
    Ok(())
}

/// A directory (and parents) with mode 0700 of this process's own, for a place others can
/// write (`/tmp`): one already there must be this user's, a directory (not a link) that nobody
/// else can enter. Another user can make `/tmp/encimg-UID` first, and could then swap what
/// this user keeps in it. Unlike [`private_dir`], never handed to a store's owner.
pub fn own_private_dir(p: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .ctx(format!("creating {}", p.display()))?;
    let m = fs::symlink_metadata(p).ctx(format!("checking {}", p.display()))?;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if !m.is_dir() || m.uid() != uid || m.mode() & 0o077 != 0 {
        return Err(err!(
            Denied,
            "{} is not private to this user (owner uid {}, mode {:o}); remove it, or set \
             XDG_RUNTIME_DIR",
            p.display(),
            m.uid(),
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

/// FNV-1a, 64 bits: a short stable name for an arbitrary string (a pid file's mountpoint,
/// a key id in a lock file's name). Not for anything an attacker could use a collision in.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Open options for a new private (0600) file.
pub fn private_file_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    o
}

/// Create a new private (0600) file; refuses to follow a link or replace anything.
pub fn create_private(p: &Path) -> Result<File> {
    let f = private_file_options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(p)
        .ctx(format!("creating {}", p.display()))?;
    adopt(&f);
    Ok(f)
}

/// A new unnamed private file in directory `dir` (`O_TMPFILE`): it vanishes with its last
/// descriptor unless [`link_unnamed`] gives it a name. Fails with the OS errno where the
/// filesystem cannot make one (EOPNOTSUPP, EISDIR or EINVAL).
pub fn create_unnamed(dir: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)
        .ctx(format!("creating a file in {}", dir.display()))?;
    adopt(&f);
    Ok(f)
}

/// Give an unnamed file (see [`create_unnamed`]) the name `dest`, refusing to replace
/// anything there (`AlreadyExists`).
pub fn link_unnamed(f: &File, dest: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .map_err(|_| err!(InvalidInput, "bad path"))?;
    let to = std::ffi::CString::new(dest.as_os_str().as_bytes())
        .map_err(|_| err!(InvalidInput, "bad path {}", dest.display()))?;
    // SAFETY: both are NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Err(err!(AlreadyExists, "{} already exists", dest.display()));
    }
    Err(Error::from(e).context(format!("putting {} in place", dest.display())))
}

/// What a directory entry is, in words, for messages about entries that are not regular files.
fn what_is(ft: fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_char_device() {
        "a character device"
    } else {
        "not a regular file"
    }
}

/// Open a file of the store: never following a symbolic link, never blocking on a FIFO, and
/// only if it is a regular file. Anything else is damage (`Corrupt`), reported with its path
/// and what it is. Missing files are `NotFound`.
pub fn open_regular(p: &Path, write: bool) -> Result<File> {
    open_regular_meta(p, write).map(|(f, _)| f)
}

/// [`open_regular`], with the file's metadata from the check (one `fstat`, not two).
pub fn open_regular_meta(p: &Path, write: bool) -> Result<(File, std::fs::Metadata)> {
    let f = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(p)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                err!(
                    Corrupt,
                    "{} is a symbolic link, not a store file: the entry is damaged",
                    p.display()
                )
            } else {
                Error::from(e).context(p.display())
            }
        })?;
    let meta = f.metadata().ctx(p.display())?;
    let ft = meta.file_type();
    if !ft.is_file() {
        return Err(err!(
            Corrupt,
            "{} is {}, not a regular file: the entry is damaged",
            p.display(),
            what_is(ft)
        ));
    }
    // Regular files ignore O_NONBLOCK, but leave nothing surprising on the descriptor.
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok((f, meta))
}

/// `/dev/fd/N` naming a regular file this process was handed (by `encimg serve`, for a
/// client that opened it with its own rights): a duplicate of that very descriptor, never a
/// reopening of the path (which would open the file with this process's rights). Refused
/// unless it is a regular file opened for what `write` asks (an `O_PATH` descriptor, which
/// needs no permission to make, opens nothing). None for any other path.
pub fn passed_file(p: &Path, write: bool) -> Result<Option<File>> {
    use std::os::fd::FromRawFd;
    let Some(n) = p
        .to_str()
        .and_then(|s| s.strip_prefix("/dev/fd/"))
        .and_then(|n| n.parse::<i32>().ok())
    else {
        return Ok(None);
    };
    // SAFETY: fcntl on a descriptor number; F_GETFL reads flags, F_DUPFD_CLOEXEC makes a new
    // descriptor we own.
    let (flags, fd) = unsafe {
        (
            libc::fcntl(n, libc::F_GETFL),
            libc::fcntl(n, libc::F_DUPFD_CLOEXEC, 0),
        )
    };
    if flags < 0 || fd < 0 {
        return Err(Error::from(std::io::Error::last_os_error()).context(p.display()));
    }
    // SAFETY: fd was just returned by fcntl and is owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    let mode = flags & libc::O_ACCMODE;
    let usable = flags & libc::O_PATH == 0
        && if write {
            mode == libc::O_WRONLY || mode == libc::O_RDWR
        } else {
            mode == libc::O_RDONLY || mode == libc::O_RDWR
        };
    if !usable {
        return Err(err!(
            Denied,
            "{} was not opened for {}",
            p.display(),
            if write { "writing" } else { "reading" }
        ));
    }
    if !f.metadata().ctx(p.display())?.is_file() {
        return Err(err!(InvalidInput, "{} is not a regular file", p.display()));
    }
    Ok(Some(f))
}

/// Read a whole store file (see [`open_regular`]), refusing one larger than `max` bytes.
pub fn read_regular(p: &Path, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = open_regular(p, false)?;
    let len = f.metadata().ctx(p.display())?.len();
    if len > max {
        return Err(err!(
            Corrupt,
            "{} is {len} bytes, more than a store file of its kind can be ({max})",
            p.display()
        ));
    }
    let mut out = Vec::with_capacity(len as usize);
    f.take(max + 1)
        .read_to_end(&mut out)
        .ctx(format!("reading {}", p.display()))?;
    Ok(out)
}

/// Whether a directory entry exists at `p` (a link or a FIFO counts: it is there, damaged).
pub fn entry_exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

/// fsync a directory, so a rename or create in it is durable.
pub fn sync_dir(p: &Path) -> Result<()> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(p)
        .and_then(|d| d.sync_all())
        .ctx(format!("syncing {}", p.display()))
}

/// Removes a file when dropped, unless disarmed.
struct RemoveOnDrop<'a>(Option<&'a Path>);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// The prefix of [`write_atomic`]'s temporary files for `name`; they end `.PID.RANDOM`.
fn temp_prefix(name: &str) -> String {
    format!(".{name}.tmp.")
}

/// Replace `path` with `bytes` atomically and durably (write temp, fsync, rename, fsync dir).
/// The temporary file is created new (never through a link), removed if anything fails, and
/// keeps the replaced file's owner (when root replaces a user's file).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let mut r = [0u8; 6];
    crate::crypto::random_fill(&mut r);
    let tmp = dir.join(format!(
        "{}{}.{}",
        temp_prefix(name),
        std::process::id(),
        hex::encode(r)
    ));
    let mut f = create_private(&tmp)?;
    let guard = RemoveOnDrop(Some(&tmp));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        if let Ok(m) = fs::symlink_metadata(path) {
            // SAFETY: fchown on a descriptor we own.
            unsafe { libc::fchown(f.as_raw_fd(), m.uid(), m.gid()) };
        }
    }
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .ctx(format!("writing {}", tmp.display()))?;
    drop(f);
    fs::rename(&tmp, path).ctx(format!("replacing {}", path.display()))?;
    std::mem::forget(guard);
    sync_dir(dir)
}

/// Remove what [`write_atomic`] left in `dir` when its process died between creating a
/// temporary file and renaming it (a live process's files are left alone).
pub fn sweep_temps(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for ent in rd.flatten() {
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((_, tail)) = name.split_once(".tmp.") else {
            continue;
        };
        if !name.starts_with('.') {
            continue;
        }
        let pid = tail.split('.').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| p != std::process::id() && !process_alive(p)) {
            let _ = fs::remove_file(ent.path());
        }
    }
}

/// Whether process `pid` runs (a zombie does not count).
pub fn process_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence.
    if unsafe { libc::kill(pid as libc::pid_t, 0) } != 0 {
        // EPERM means it exists but is not ours.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    }
    process_state(pid).is_none_or(|state| state != 'Z' && state != 'X')
}

/// A process's state letter from `/proc/PID/stat` (`R`, `S`, `T` when stopped, `Z`…), if
/// it can be read.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesized command name.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().next()?.chars().next()
}

/// How long a lock that other processes hold briefly (the key store's) is waited for
/// before the operation answers busy: long enough for any update, short enough that a lock
/// held by a stuck process never wedges a mount.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// An advisory `flock` held until dropped.
pub struct FileLock {
    file: File,
}

impl FileLock {
    /// Open (creating if needed) the lock file at `path`: a regular file, never through a
    /// link.
    fn open(path: &Path) -> std::io::Result<File> {
        let existed = entry_exists(path);
        let open = || {
            private_file_options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(path)
        };
        let file = match open() {
            // Its directory was removed (say, a store's `locks/` by hand): make it again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(d) = path.parent() {
                    private_dir(d).map_err(|e| std::io::Error::other(e.message))?;
                }
                open()?
            }
            r => r?,
        };
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        if !existed {
            adopt(&file);
        }
        Ok(file)
    }

    /// `flock(op)` on `file`, retried on EINTR.
    fn lock(file: File, op: i32) -> std::io::Result<FileLock> {
        loop {
            // SAFETY: flock on a file descriptor we own; no memory is passed.
            let r = unsafe { libc::flock(file.as_raw_fd(), op) };
            if r == 0 {
                return Ok(FileLock { file });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn take(path: &Path, op: i32) -> std::io::Result<FileLock> {
        Self::lock(Self::open(path)?, op)
    }

    /// Block until an exclusive lock is held.
    pub fn exclusive(path: &Path) -> Result<FileLock> {
        Self::take(path, libc::LOCK_EX).ctx(format!("locking {}", path.display()))
    }

    /// Wait up to `wait` for an exclusive lock, else `Busy`.
    pub fn exclusive_within(path: &Path, wait: std::time::Duration) -> Result<FileLock> {
        Self::take_within(path, libc::LOCK_EX, wait)
    }

    /// Wait up to `wait` for a shared lock, else `Busy`.
    pub fn shared_within(path: &Path, wait: std::time::Duration) -> Result<FileLock> {
        Self::take_within(path, libc::LOCK_SH, wait)
    }

    fn take_within(path: &Path, op: i32, wait: std::time::Duration) -> Result<FileLock> {
        let file = Self::open(path).ctx(format!("locking {}", path.display()))?;
        let deadline = std::time::Instant::now() + wait;
        let mut nap = std::time::Duration::from_millis(1);
        loop {
            // SAFETY: flock on a descriptor we own; no memory is passed.
            let r = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
            if r == 0 {
                return Ok(FileLock { file });
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(std::time::Duration::from_millis(50));
                }
                Some(libc::EWOULDBLOCK) => {
                    return Err(err!(
                        Busy,
                        "{} is locked by another process (waited {} s)",
                        path.display(),
                        wait.as_secs()
                    ))
                }
                _ => return Err(Error::from(e).context(format!("locking {}", path.display()))),
            }
        }
    }

    /// An exclusive lock, or `None` if somebody holds the file locked.
    pub fn try_exclusive(path: &Path) -> Result<Option<FileLock>> {
        Self::try_take(path, libc::LOCK_EX | libc::LOCK_NB)
    }

    /// A shared lock, or `None` if somebody holds the file locked exclusively.
    pub fn try_shared(path: &Path) -> Result<Option<FileLock>> {
        Self::try_take(path, libc::LOCK_SH | libc::LOCK_NB)
    }

    fn try_take(path: &Path, op: i32) -> Result<Option<FileLock>> {
        Self::maybe(Self::take(path, op), path)
    }

    fn maybe(r: std::io::Result<FileLock>, path: &Path) -> Result<Option<FileLock>> {
        match r {
            Ok(l) => Ok(Some(l)),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(Error::from(e).context(format!("locking {}", path.display()))),
        }
    }

    /// An exclusive lock on the file just created as `file` (not reopened by path, so a
    /// sweeper that removed the name in between cannot leave us locking another file).
    pub fn exclusive_on(file: &File) -> Result<FileLock> {
        let f = file.try_clone().ctx("locking")?;
        Self::lock(f, libc::LOCK_EX).ctx("locking")
    }

    /// An exclusive lock on directory `dir` itself, or `None` if somebody holds it. Unlike a
    /// lock file, a directory cannot be unlinked and recreated to slip past the lock while
    /// anything is in it.
    pub fn try_exclusive_dir(dir: &Path) -> Result<Option<FileLock>> {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)
            .ctx(format!("locking {}", dir.display()))?;
        Self::maybe(Self::lock(f, libc::LOCK_EX | libc::LOCK_NB), dir)
    }

    /// The locked file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Seconds since the epoch. `ENCIMG_TEST_NOW` (unix seconds) overrides it, so tests can
/// move past a key's deletion date.
/// Tell a service manager about our state (`sd_notify(3)`'s protocol): one datagram to the
/// socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace). Does
/// nothing when the variable is unset, so outside systemd's `Type=notify` this is a no-op;
/// a failure to send is logged, never fatal.
pub fn notify_service_manager(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(abs) => SocketAddr::from_abstract_name(abs),
        None => SocketAddr::from_pathname(Path::new(&name)),
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &a));
    if let Err(e) = sent {
        tracing::warn!("cannot notify the service manager at {name:?}: {e}");
    }
}

pub fn now() -> u64 {
    if let Some(t) = std::env::var("ENCIMG_TEST_NOW")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return t;
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 UTC text of a unix time.
pub fn rfc3339(t: u64) -> String {
    let days = (t / 86400) as i64;
    let secs = t % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// The data extents of `file` in `[0, len)`: `(offset, length)` pairs, holes skipped.
/// Falls back to one extent where the filesystem cannot tell.
pub fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return vec![(0, len)];
        }
        let data = data as u64;
        if data >= len {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            len
        } else {
            (hole as u64).min(len)
        };
        out.push((data, hole - data));
        pos = hole;
    }
    out
}

/// A path for a file being written before it is renamed into place.
pub fn temp_path(dir: &Path, what: &str) -> PathBuf {
    let mut r = [0u8; 8];
    crate::crypto::random_fill(&mut r);
    dir.join(format!("{what}.{}.partial", hex::encode(r)))
}

/// Allocator settings for this process; call at startup, before any thread exists.
///
/// Request-size buffers (128 KiB to 1 MiB and a sector) are pooled mappings of their own
/// (`store::AlignedBuf`); larger ones stay on the heap rather than a fresh mmap each, 256
/// page faults and an munmap per MiB (`encimg copy` of 1 GiB once made 1042 pairs). And two
/// malloc arenas, not glibc's default of one per thread up to 8 per core: with 16 mount
/// threads each kept its own freed 1 MiB buffers, and the daemon's peak RSS under 1 MiB
/// writes was ~100 MiB instead of ~22 MiB.
pub fn tune_allocator() {
    // SAFETY: mallopt only tunes the allocator, and the caller runs before other threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_directory_must_be_private_to_its_user() {
        let t = tempfile::tempdir().unwrap();
        let fresh = t.path().join("fresh");
        own_private_dir(&fresh).unwrap();
        assert_eq!(fs::metadata(&fresh).unwrap().mode() & 0o777, 0o700);
        own_private_dir(&fresh).unwrap();
        // Made by someone else first, open to all.
        let open = t.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let e = own_private_dir(&open).unwrap_err();
        assert!(e.message.contains("not private"), "{}", e.message);
        // A link to a private directory.
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert!(own_private_dir(&link).is_err());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Private, but another user's.
            let theirs = t.path().join("theirs");
            fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            assert!(own_private_dir(&theirs).is_err());
        }
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_305_600), "2026-11-22T00:00:00Z");
    }
}
