//! Secrets in memory: pages for keys that stay out of core dumps and swap, a stack scrub for
//! what key setup leaves behind, process hardening, and the key-store passphrase taken out of
//! the environment as soon as the process starts.
//!
//! - [`SecretBox`] keeps a value (a key schedule, a root key) in a mapping of its own, marked
//!   `MADV_DONTDUMP` and locked with `mlock` where the limit allows, and wipes the whole
//!   mapping before unmapping it.
//! - [`scrub_stack`] overwrites the stack below the caller: key expansion builds schedules on
//!   the stack before they are moved into their box, and those copies would otherwise stay
//!   in the thread's stack until something deep enough overwrote them.
//! - [`harden_process`] makes the process non-dumpable (`PR_SET_DUMPABLE` 0: no core file,
//!   no `ptrace` or `/proc/PID/mem`, `/proc/PID/environ` by other users of the same uid).
//! - [`take_passphrase`] reads the passphrase from `ENCIMG_PASSPHRASE_FILE`, a descriptor, or
//!   `ENCIMG_PASSPHRASE` (then erases it from the process's environment block, which is what
//!   `/proc/PID/environ` shows), and keeps it in a [`SecretBox`].

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use zeroize::Zeroize;

use crate::err;
use crate::error::Result;

const PAGE: usize = 4096;

/// Set once an `mlock` has failed (the limit is reached); later boxes do not try again.
static MLOCK_FAILED: AtomicBool = AtomicBool::new(false);

/// A value in its own private mapping: excluded from core dumps, locked in memory where the
/// `RLIMIT_MEMLOCK` allows, wiped whole when dropped (after the value's own `Drop`).
pub struct SecretBox<T> {
    ptr: NonNull<T>,
    /// Bytes mapped.
    map_len: usize,
    locked: bool,
}

// SAFETY: SecretBox owns its value exclusively, like Box<T>.
unsafe impl<T: Send> Send for SecretBox<T> {}
// SAFETY: shared references only give out &T.
unsafe impl<T: Sync> Sync for SecretBox<T> {}

impl<T> SecretBox<T> {
    /// Move `value` into a fresh secret mapping.
    pub fn new(value: T) -> SecretBox<T> {
        assert!(std::mem::align_of::<T>() <= PAGE, "over-aligned secret");
        let len = std::mem::size_of::<T>().max(1).next_multiple_of(PAGE);
        let layout = std::alloc::Layout::from_size_align(len, PAGE).expect("secret layout");
        // SAFETY: an anonymous private mapping; no file, no fixed address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: advice and locking on the mapping just made, of exactly `len` bytes.
        let locked = unsafe {
            libc::madvise(p, len, libc::MADV_DONTDUMP);
            !MLOCK_FAILED.load(Ordering::Relaxed) && libc::mlock(p, len) == 0
        };
        if !locked && !MLOCK_FAILED.swap(true, Ordering::Relaxed) {
            tracing::info!(
                "cannot lock key pages in memory (RLIMIT_MEMLOCK reached); they stay out of core dumps"
            );
        }
        let ptr =
            NonNull::new(p.cast::<T>()).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        // SAFETY: the mapping is page-aligned (so aligned for T, checked above), writable, and
        // at least size_of::<T>() bytes.
        unsafe { ptr.as_ptr().write(value) };
        SecretBox {
            ptr,
            map_len: len,
            locked,
        }
    }
}

impl<T> std::ops::Deref for SecretBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: ptr holds an initialised T for the box's life.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> std::ops::DerefMut for SecretBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as above, and &mut self is the only reference.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for SecretBox<T> {
    fn drop(&mut self) {
        // SAFETY: the value is initialised and dropped exactly once, here; then the mapping
        // (ours alone, `len` bytes) is wiped, unlocked and unmapped, and never used again.
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
            let bytes =
                std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<u8>(), self.map_len);
            bytes.zeroize();
            let p = self.ptr.as_ptr().cast::<libc::c_void>();
            if self.locked {
                libc::munlock(p, self.map_len);
            }
            libc::munmap(p, self.map_len);
        }
    }
}

impl<T> SecretBox<T> {
    /// Lock the pages again (a forked child does not inherit its parent's locks).
    pub fn relock(&mut self) {
        if !MLOCK_FAILED.load(Ordering::Relaxed) {
            // SAFETY: locking our own mapping of `len` bytes.
            self.locked = unsafe { libc::mlock(self.ptr.as_ptr().cast(), self.map_len) } == 0;
        }
    }
}

/// Overwrite the 64 KiB of stack below the caller's frame: call it after work that put key
/// material in deeper frames (key expansion, unwrapping), from the frame that called that work.
#[inline(never)]
pub fn scrub_stack() {
    scrub_stack_small::<{ 64 << 10 }>();
}

/// Calls [`scrub_stack`] when dropped: declared first in a function that handles keys, it
/// scrubs below that function's frame on every way out, errors included.
pub struct ScrubOnDrop;

impl Drop for ScrubOnDrop {
    fn drop(&mut self) {
        scrub_stack();
    }
}

/// Overwrite `N` bytes of stack below the caller's frame (a plain `memset`, which the
/// optimizer must keep because the bytes are then observed): for hot paths, after calls whose
/// frames are known to be smaller (cipher kernels spill round keys from their registers).
#[inline(never)]
pub fn scrub_stack_small<const N: usize>() {
    let mut buf = std::mem::MaybeUninit::<[u8; N]>::uninit();
    // SAFETY: writes N zero bytes into our own uninitialised local array.
    unsafe { std::ptr::write_bytes(buf.as_mut_ptr(), 0, 1) };
    std::hint::black_box(&buf);
}

/// Make this process non-dumpable: no core file, no `ptrace` attach and no reading of its
/// memory or environment by other processes of the same user. Call first thing in `main`.
pub fn harden_process() {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
}

/// Whether the process is non-dumpable (see [`harden_process`]).
pub fn is_dumpable() -> bool {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 }
}

/// The environment variable holding the passphrase (read once, then erased).
pub const PASSPHRASE_ENV: &str = "ENCIMG_PASSPHRASE";
/// The environment variable naming a file that holds the passphrase.
pub const PASSPHRASE_FILE_ENV: &str = "ENCIMG_PASSPHRASE_FILE";

/// The longest passphrase accepted.
const PASSPHRASE_MAX: usize = 4096;

struct Passphrase {
    bytes: [u8; PASSPHRASE_MAX],
    len: usize,
}

impl Drop for Passphrase {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

static PASSPHRASE: Mutex<Option<SecretBox<Passphrase>>> = Mutex::new(None);

fn set_passphrase(p: &[u8]) -> Result<()> {
    if p.is_empty() {
        return Err(err!(InvalidInput, "the passphrase is empty"));
    }
    if p.len() > PASSPHRASE_MAX {
        return Err(err!(
            InvalidInput,
            "the passphrase is longer than {PASSPHRASE_MAX} bytes"
        ));
    }
    let mut b = SecretBox::new(Passphrase {
        bytes: [0; PASSPHRASE_MAX],
        len: p.len(),
    });
    b.bytes[..p.len()].copy_from_slice(p);
    *PASSPHRASE.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
    Ok(())
}

/// Run `f` on the passphrase, if one was given.
pub fn with_passphrase<R>(f: impl FnOnce(Option<&[u8]>) -> R) -> R {
    let g = PASSPHRASE.lock().unwrap_or_else(|e| e.into_inner());
    f(g.as_deref().map(|p: &Passphrase| &p.bytes[..p.len]))
}

/// Lock the passphrase's pages again in a forked child.
pub fn relock_passphrase() {
    if let Some(p) = PASSPHRASE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
    {
        p.relock();
    }
}

/// How long a passphrase from a pipe or FIFO is waited for.
const PASSPHRASE_WAIT_MS: i32 = 10_000;

/// Read the passphrase from `file` (a path, or `/dev/fd/N` for a descriptor): its first
/// line, without the newline. A pipe or FIFO is read as it is written, for at most 10 s; a
/// FIFO nobody writes to ends at once (empty: refused). Never blocks forever.
pub fn read_passphrase_file(file: &std::path::Path) -> Result<()> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let ctx = |e: std::io::Error| {
        crate::Error::from(e).context(format!("passphrase file {}", file.display()))
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(file)
        .map_err(ctx)?;
    let ft = f.metadata().map_err(ctx)?.file_type();
    if ft.is_dir() {
        return Err(err!(
            InvalidInput,
            "passphrase file {} is a directory",
            file.display()
        ));
    }
    let mut buf = zeroize::Zeroizing::new(vec![0u8; PASSPHRASE_MAX + 2]);
    let mut n = 0;
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_millis(PASSPHRASE_WAIT_MS as u64);
    while n < buf.len() && !buf[..n].contains(&b'\n') {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(err!(
                        InvalidInput,
                        "passphrase file {}: nothing arrived within {} s",
                        file.display(),
                        PASSPHRASE_WAIT_MS / 1000
                    ));
                }
                let mut pfd = libc::pollfd {
                    fd: f.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd that lives across the call.
                unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
            }
            Err(e) => return Err(ctx(e)),
        }
    }
    let line = buf[..n].split(|&c| c == b'\n').next().unwrap_or(&[]);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    set_passphrase(line).map_err(|e| e.context(format!("passphrase file {}", file.display())))
}

/// Take the passphrase at start-up: from `ENCIMG_PASSPHRASE_FILE` if set, else from
/// `ENCIMG_PASSPHRASE`, whose bytes are then overwritten in the environment block and the
/// variable removed, so neither `/proc/PID/environ` nor child processes see it. Call before
/// any thread exists.
pub fn take_passphrase() -> Result<()> {
    let from_env = erase_env(PASSPHRASE_ENV);
    if let Some(file) = std::env::var_os(PASSPHRASE_FILE_ENV).filter(|f| !f.is_empty()) {
        return read_passphrase_file(std::path::Path::new(&file));
    }
    match from_env {
        Some(p) => set_passphrase(&p),
        None => Ok(()),
    }
}

extern "C" {
    static mut environ: *mut *mut libc::c_char;
}

/// Remove `name` from the environment, wiping its `NAME=value` bytes where they lie (the
/// initial environment block is what `/proc/PID/environ` reads); returns the value.
fn erase_env(name: &str) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    let prefix = format!("{name}=");
    let mut value = None;
    let mut entries: Vec<*mut libc::c_char> = Vec::new();
    // SAFETY: called before any thread exists, so nothing changes the environment while we
    // walk it; every entry is a NUL-terminated string, and the array ends with a null pointer.
    unsafe {
        let mut p = environ;
        while !p.is_null() && !(*p).is_null() {
            let bytes = std::ffi::CStr::from_ptr(*p).to_bytes();
            if bytes.starts_with(prefix.as_bytes()) {
                if value.is_none() {
                    value = Some(zeroize::Zeroizing::new(bytes[prefix.len()..].to_vec()));
                }
                entries.push(*p);
            }
            p = p.add(1);
        }
    }
    if entries.is_empty() {
        return None;
    }
    // unsetenv takes the entries out of the array but leaves their bytes (glibc never frees
    // environment strings), so wipe them where they are.
    std::env::remove_var(name);
    for e in entries {
        // SAFETY: each pointer is a NUL-terminated string that glibc no longer references and
        // never frees; we overwrite its bytes up to (not including) the NUL.
        unsafe {
            let len = libc::strlen(e);
            std::slice::from_raw_parts_mut(e.cast::<u8>(), len).zeroize();
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_box_holds_and_wipes() {
        let mut b = SecretBox::new([7u8; 100]);
        assert_eq!(b[99], 7);
        b[0] = 1;
        assert_eq!(b[0], 1);
        let big = SecretBox::new([3u64; 1000]);
        assert!(big.iter().all(|&x| x == 3));
    }

    #[test]
    fn process_can_be_made_non_dumpable() {
        // In a child, so the test process keeps its state.
        // SAFETY: the child only calls async-signal-safe prctl and _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            harden_process();
            let code = if is_dumpable() { 1 } else { 0 };
            // SAFETY: leaving the forked child at once.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }
}
