//! Small operating-system helpers shared by the key store and the resource store: private
//! files and directories, atomic replacement, advisory locks, sparse-aware copying, time,
//! and the allocator's settings.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Create a directory (and parents) with mode 0700.
pub fn private_dir(p: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .ctx(format!("creating {}", p.display()))
}

/// Open options for a new private (0600) file.
pub fn private_file_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(0o600);
    o
}

/// fsync a directory, so a rename or create in it is durable.
pub fn sync_dir(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|d| d.sync_all())
        .ctx(format!("syncing {}", p.display()))
}

/// Replace `path` with `bytes` atomically and durably (write temp, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = private_file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .ctx(format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .ctx(format!("writing {}", tmp.display()))?;
    drop(f);
    fs::rename(&tmp, path).ctx(format!("replacing {}", path.display()))?;
    sync_dir(dir)
}

/// An advisory `flock` held until dropped.
pub struct FileLock {
    file: File,
}

impl FileLock {
    fn take(path: &Path, op: i32) -> std::io::Result<FileLock> {
        let file = private_file_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
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

    /// Block until an exclusive lock is held.
    pub fn exclusive(path: &Path) -> Result<FileLock> {
        Self::take(path, libc::LOCK_EX).ctx(format!("locking {}", path.display()))
    }

    /// Block until a shared lock is held.
    pub fn shared(path: &Path) -> Result<FileLock> {
        Self::take(path, libc::LOCK_SH).ctx(format!("locking {}", path.display()))
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
        match Self::take(path, op) {
            Ok(l) => Ok(Some(l)),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(Error::from(e).context(format!("locking {}", path.display()))),
        }
    }

    /// The locked file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Seconds since the epoch. `ENCIMG_TEST_NOW` (unix seconds) overrides it, so tests can
/// move past a key's deletion date.
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
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_305_600), "2026-11-22T00:00:00Z");
    }
}
