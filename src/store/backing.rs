//! The backing file of a volume, and the buffers its sectors travel in.
//!
//! A mounted volume reads its data area through a second descriptor opened `O_DIRECT`
//! wherever the request is block-aligned, and writes large runs (128 KiB and more) through
//! it: requests reach the device whole, without a copy through the page cache and without
//! evicting it, and the ciphertext is not cached twice (the kernel caches the plaintext above
//! FUSE, the sector cache the hot sectors). Small writes stay buffered: a 4 KiB direct write
//! waits for the device where a buffered one does not (durability is `fsync`'s job, which
//! the volume honours), and sectors just written are in the sector cache, so reads rarely
//! meet their dirty pages (when they do, the kernel writes those back before the direct
//! read). Measured on the 2-core benchmark machine (contrib/bench): direct 1 MiB reads
//! ~1.0 GB/s against ~0.6 GB/s buffered; direct 4 KiB random reads at queue depth 16 ~44-50k
//! IOPS against ~32-40k buffered (without readahead; with it, buffered reads of a small file
//! look faster only because readahead pulls in the whole file); buffered 4 KiB writes at queue
//! depth 1 ~2× the IOPS of direct ones. Direct I/O needs block-aligned offsets, lengths and
//! memory ([`AlignedBuf`]); unaligned requests, and filesystems without `O_DIRECT` (tmpfs,
//! some overlays), use the buffered descriptor. A stream of large sequential reads asks the
//! kernel to read a window ahead into the page cache and takes it from there
//! ([`Backing::read_ahead`]; the window is the volume's): 1 MiB reads one at a time ran at
//! ~0.82-0.95 GB/s reading one request ahead against ~0.67-0.71 without, the disk itself
//! ~1.0-1.1. The volume's sector locks never let a buffered and a direct request touch the
//! same block at once.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use zeroize::Zeroize;

use super::freeze::Freeze;

use crate::err;
use crate::error::Result;

/// The most one `POSIX_FADV_WILLNEED` asks for (see [`Backing::read_ahead`]): the smallest
/// readahead size a block device has by default, so no piece is cut short.
const READ_AHEAD_PIECE: u64 = 128 << 10;

/// Alignment of direct I/O offsets, lengths and buffers: the page size, which every block
/// device's logical block size divides.
pub const ALIGN: usize = 4096;

/// Buffers of [`POOL_MIN`]..=[`POOL_CAP`] bytes all take [`POOL_CAP`], mapped on their own
/// (`mmap`, outside the malloc heap), and up to [`POOL_KEEP`] of them are kept (wiped) for
/// reuse instead of unmapped.
/// - Allocating and freeing a 1 MiB aligned block per request from the heap fragmented it:
///   under 1 MiB reads the daemon's RSS grew by a megabyte every few requests, to ~60 MiB.
/// - A pool of 8 on the heap still left the buffers beyond it there when freed: 1 MiB reads
///   and writes from 4 jobs at once (16 requests in the daemon) kept ~41 MiB of heap, and
///   the daemon's peak RSS with an 8 MiB cache was 58-62 MiB; with 3 more loads at once, 74-78.
/// - [`POOL_KEEP`] is at least the mount's session thread count (`mount` checks), so a mount
///   in steady state maps no more; one beyond it (jobs running beside the mount's requests)
///   is unmapped when dropped.
/// - [`POOL_CAP`] is the largest request (1 MiB) plus a sector: a request that does not start
///   on a sector boundary needs one more sector, and such 1 MiB reads from the heap took the
///   daemon's peak RSS to 300 MiB.
const POOL_MIN: usize = 128 << 10;
const POOL_CAP: usize = (1 << 20) + ALIGN;
// `cap == POOL_CAP` marks a mapped buffer; no heap capacity (a multiple of ALIGN outside
// POOL_MIN..=POOL_CAP) can equal it.
const _: () = assert!(POOL_CAP.is_multiple_of(ALIGN));
pub const POOL_KEEP: usize = 16;

/// A pooled buffer's address (all zeros, [`POOL_CAP`] bytes, owned by the pool).
struct Pooled(std::ptr::NonNull<u8>);
// SAFETY: the pool owns the memory exclusively; it is plain bytes.
unsafe impl Send for Pooled {}

static POOL: std::sync::Mutex<Vec<Pooled>> = std::sync::Mutex::new(Vec::new());

/// A heap buffer (under [`POOL_MIN`]) a thread keeps for its next one: all zeros, `cap`
/// bytes. A small request's buffer is made and dropped on the same session thread, and an
/// aligned allocation from the heap, zeroed, then freed, was about a quarter of the daemon's
/// user time under 4 KiB random reads from four jobs (glibc's memalign splits a chunk for
/// every alignment, and calloc zeroes what the drop has already wiped).
struct Spare {
    ptr: std::ptr::NonNull<u8>,
    cap: usize,
}

impl Drop for Spare {
    fn drop(&mut self) {
        // SAFETY: allocated in `AlignedBuf::zeroed` with this layout; the spare owns it.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), AlignedBuf::layout(self.cap)) };
    }
}

thread_local! {
    static SPARE: std::cell::Cell<Option<Spare>> = const { std::cell::Cell::new(None) };
}

/// A zero-initialised buffer aligned to [`ALIGN`] (a pooled mapping for request sizes, the
/// heap otherwise), wiped when dropped (it carries plaintext).
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// Bytes allocated (0: nothing allocated).
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        if len == 0 {
            return AlignedBuf {
                ptr: std::ptr::NonNull::dangling(),
                len: 0,
                cap: 0,
            };
        }
        let cap = len.next_multiple_of(ALIGN);
        if (POOL_MIN..=POOL_CAP).contains(&cap) {
            let pooled = POOL.lock().unwrap_or_else(|p| p.into_inner()).pop();
            // A pooled buffer was wiped whole when it was returned (see Drop).
            let ptr = pooled.map_or_else(Self::map_pool_buffer, |p| p.0);
            return AlignedBuf {
                ptr,
                len,
                cap: POOL_CAP,
            };
        }
        // This thread's spare if it is big enough (one too small is freed: sizes change
        // seldom, and a thread keeps at most one).
        if cap < POOL_MIN {
            let spare = SPARE.try_with(std::cell::Cell::take).ok().flatten();
            if let Some(spare) = spare.filter(|s| s.cap >= cap) {
                let spare = std::mem::ManuallyDrop::new(spare);
                return AlignedBuf {
                    ptr: spare.ptr,
                    len,
                    cap: spare.cap,
                };
            }
        }
        let layout = Self::layout(cap);
        // SAFETY: layout has a non-zero size.
        let p = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(p) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, cap }
    }

    /// A fresh [`POOL_CAP`]-byte mapping: zeroed and page-aligned by the kernel.
    fn map_pool_buffer() -> std::ptr::NonNull<u8> {
        // SAFETY: an anonymous private mapping; no file, no fixed address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                POOL_CAP,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            alloc::handle_alloc_error(Self::layout(POOL_CAP))
        }
        std::ptr::NonNull::new(p.cast())
            .unwrap_or_else(|| alloc::handle_alloc_error(Self::layout(POOL_CAP)))
    }

    fn layout(cap: usize) -> Layout {
        // Only fails for sizes near isize::MAX, which no request reaches.
        Layout::from_size_align(cap, ALIGN).expect("buffer layout")
    }

    /// Shorten to `len` bytes (the tail is wiped now; the allocation is kept).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self[len..].zeroize();
            self.len = len;
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes (or dangling and len is 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // Bytes past len were wiped by truncate (or never written).
        let bytes: &mut [u8] = self;
        bytes.zeroize();
        if self.cap == POOL_CAP {
            let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < POOL_KEEP {
                pool.push(Pooled(self.ptr));
                return;
            }
            drop(pool);
            // SAFETY: mapped in `map_pool_buffer` with exactly this length, and no longer used.
            let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), POOL_CAP) };
            debug_assert_eq!(rc, 0, "munmap of a pooled buffer failed");
            return;
        }
        if self.cap >= POOL_MIN {
            // SAFETY: allocated in `zeroed` with exactly this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) };
        } else if self.cap > 0 {
            // Kept as this thread's spare (all zeros now; the larger of the two is kept),
            // or freed. Either way the spare frees it in the end.
            let mine = Spare {
                ptr: self.ptr,
                cap: self.cap,
            };
            let _ = SPARE.try_with(|s| match s.take() {
                Some(old) if old.cap > mine.cap => s.set(Some(old)),
                _ => s.set(Some(mine)),
            });
        }
    }
}

fn aligned(x: usize) -> bool {
    x.is_multiple_of(ALIGN)
}

/// A backing file that is a local copy of objects (an object-storage region's mount).
pub trait Remote: Send + Sync {
    /// Make bytes `[off, off + len)` present before they are read or partly overwritten.
    fn fetch(&self, off: u64, len: usize) -> Result<()>;
    /// Bytes `[off, off + len)` were written locally.
    fn dirtied(&self, off: u64, len: usize);
    /// Send everything written so far to the object store; returns once it is durable there.
    fn flush(&self) -> Result<()>;
}

pub type Fetch = std::sync::Arc<dyn Remote>;

/// A volume's backing file: the buffered descriptor, and a direct one where enabled.
pub struct Backing {
    fetch: Option<Fetch>,
    file: File,
    direct: Option<File>,
    /// Writes smaller than this stay buffered.
    direct_write_min: usize,
    /// Cleared if the filesystem refuses a direct request; from then on all I/O is buffered.
    direct_ok: AtomicBool,
    /// The point-in-time reads in progress (snapshots of this file): every write tells
    /// them first. Writes share this lock for their whole write, so one taken alone (to
    /// begin or end a freeze) waits for the writes in flight.
    freezes: RwLock<Vec<Arc<Freeze>>>,
}

/// A freeze of a backing file in force; dropping it ends the freeze.
pub struct Frozen<'a> {
    backing: &'a Backing,
    pub freeze: Arc<Freeze>,
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let mut all = self
            .backing
            .freezes
            .write()
            .unwrap_or_else(|p| p.into_inner());
        all.retain(|f| !Arc::ptr_eq(f, &self.freeze));
    }
}

impl Backing {
    pub fn new(file: File) -> Backing {
        Backing {
            fetch: None,
            file,
            direct: None,
            direct_write_min: usize::MAX,
            direct_ok: AtomicBool::new(false),
            freezes: RwLock::default(),
        }
    }

    /// Begin a point-in-time read of this file (see [`Freeze`]), once the writes in flight
    /// are done; it holds until the returned guard drops.
    pub fn freeze(&self, f: Freeze) -> Frozen<'_> {
        let f = Arc::new(f);
        let mut all = self.freezes.write().unwrap_or_else(|p| p.into_inner());
        all.push(f.clone());
        Frozen {
            backing: self,
            freeze: f,
        }
    }

    /// Open a second, `O_DIRECT` descriptor on the same file, for aligned reads and for
    /// aligned writes of at least `write_min` bytes. Returns whether direct I/O is in use
    /// (false where the filesystem does not support it).
    pub fn enable_direct(&mut self, write_min: usize) -> bool {
        let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let writable = {
            // SAFETY: F_GETFL on a descriptor we own.
            let fl = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_GETFL) };
            fl >= 0 && (fl & libc::O_ACCMODE) == libc::O_RDWR
        };
        match OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
        {
            Ok(f) => {
                // The buffered descriptor now carries only small writes and unaligned reads:
                // no readahead on it, so a 512-byte sector read costs the device one page,
                // not a window nobody asked for.
                self.advise(0, 0, libc::POSIX_FADV_RANDOM);
                self.direct = Some(f);
                self.direct_write_min = write_min.max(ALIGN);
                self.direct_ok.store(true, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::debug!("no direct I/O on the backing file: {e}");
                false
            }
        }
    }

    /// Fetch what a read needs before reading it.
    pub fn set_fetch(&mut self, f: Fetch) {
        self.fetch = Some(f);
    }

    fn fetch(&self, off: u64, len: usize) -> Result<()> {
        match &self.fetch {
            Some(f) if len > 0 => f.fetch(off, len),
            _ => Ok(()),
        }
    }

    /// Make what was written durable where the file's truth is (the object store, for a
    /// remote copy); the local file's own sync is the caller's.
    pub fn flush_remote(&self) -> Result<()> {
        match &self.fetch {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }

    /// The buffered descriptor (headers, journal, and everything unaligned).
    pub fn file(&self) -> &File {
        &self.file
    }

    fn direct_for(&self, buf: &[u8], off: u64, min: usize) -> Option<&File> {
        let d = self.direct.as_ref()?;
        (buf.len() >= min
            && self.direct_ok.load(Ordering::Relaxed)
            && aligned(buf.as_ptr() as usize)
            && aligned(buf.len())
            && off.is_multiple_of(ALIGN as u64))
        .then_some(d)
    }

    fn refused(&self, e: &std::io::Error) -> bool {
        if e.raw_os_error() == Some(libc::EINVAL) {
            tracing::warn!("the backing filesystem refused direct I/O; using buffered I/O");
            self.direct_ok.store(false, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Whether [`Backing::read_ahead`] does anything: only with direct I/O in use (buffered
    /// reads get the kernel's own readahead).
    pub fn can_read_ahead(&self) -> bool {
        self.direct.is_some() && self.direct_ok.load(Ordering::Relaxed)
    }

    /// Start reading `len` bytes at `off` into the page cache, without waiting for them.
    /// Asked in pieces of [`READ_AHEAD_PIECE`]: the kernel caps one `WILLNEED` at the
    /// device's readahead or request size (128 KiB and 1280 KiB by default) and drops the rest.
    pub fn read_ahead(&self, off: u64, len: usize) {
        if self.fetch(off, len).is_err() {
            return; // the read itself will fetch, and fail, with the reason
        }
        let end = off + len as u64;
        let mut at = off;
        while at < end {
            let piece = (end - at).min(READ_AHEAD_PIECE);
            self.advise(at, piece as usize, libc::POSIX_FADV_WILLNEED);
            at += piece;
        }
    }

    /// Let go of pages read ahead that will not be used.
    pub fn forget(&self, off: u64, len: usize) {
        self.advise(off, len, libc::POSIX_FADV_DONTNEED);
    }

    /// Read what [`Backing::read_ahead`] asked for, through the page cache (waiting for it
    /// if still in flight), then let those pages go: the ciphertext is not kept twice.
    pub fn read_ahead_done(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.fetch(off, buf.len())?;
        pread_full(&self.file, buf, off)?;
        self.forget(off, buf.len());
        Ok(())
    }

    fn advise(&self, off: u64, len: usize, advice: libc::c_int) {
        // SAFETY: posix_fadvise on a descriptor we own; it is only a hint.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                off as libc::off_t,
                len as libc::off_t,
                advice,
            );
        }
    }

    /// Read exactly `buf.len()` bytes at `off` (see [`pread_full`]: a short file is damage).
    pub fn read_full(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.fetch(off, buf.len())?;
        if let Some(d) = self.direct_for(buf, off, ALIGN) {
            match read_full(d, buf, off) {
                Ok(done) if done == buf.len() => return Ok(()),
                // Short: the end of the file, or an unaligned tail; finish buffered.
                Ok(done) => return pread_full(&self.file, &mut buf[done..], off + done as u64),
                Err(e) if self.refused(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        pread_full(&self.file, buf, off)
    }

    /// Write all of `buf` at `off`.
    pub fn write_all(&self, buf: &[u8], off: u64) -> Result<()> {
        self.fetch(off, buf.len())?;
        let frozen = self.freezes.read().unwrap_or_else(|p| p.into_inner());
        for f in frozen.iter() {
            f.before_write(off, buf.len() as u64);
        }
        self.write_local(buf, off)?;
        drop(frozen);
        if let Some(f) = &self.fetch {
            f.dirtied(off, buf.len());
        }
        Ok(())
    }

    fn write_local(&self, buf: &[u8], off: u64) -> Result<()> {
        if let Some(d) = self.direct_for(buf, off, self.direct_write_min) {
            match d.write_all_at(buf, off) {
                Ok(()) => return Ok(()),
                Err(e) if self.refused(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self.file.write_all_at(buf, off)?)
    }
}

/// Read exactly `buf.len()` bytes at `off`. The file ending first is damage (`Corrupt`):
/// every read of a volume lies inside its backing file, so a short one means the file was
/// truncated, and the missing bytes must not read as zeros.
pub fn pread_full(file: &File, buf: &mut [u8], off: u64) -> Result<()> {
    let n = read_full(file, buf, off)?;
    if n < buf.len() {
        return Err(err!(
            Corrupt,
            "the backing file ends at byte {} but data up to byte {} is needed: it was truncated",
            off + n as u64,
            off + buf.len() as u64
        ));
    }
    Ok(())
}

/// Read until `buf` is full or the end of file; returns the bytes read.
pub(super) fn read_full(file: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_zeroed_and_truncates() {
        for len in [0, 1, 511, 4096, 4097, 1 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            if len > 0 {
                assert!(aligned(b.as_ptr() as usize));
                b.fill(7);
                b.truncate(len / 2);
                assert_eq!(b.len(), len / 2);
                assert!(b.iter().all(|&x| x == 7));
            }
        }
    }

    #[test]
    fn pooled_buffers_come_back_zeroed() {
        let mut held = Vec::new();
        for i in 0..2 * POOL_KEEP {
            let mut b = AlignedBuf::zeroed(POOL_MIN + i * 4096);
            b.fill(0xa5);
            b.truncate(POOL_MIN / 2);
            held.push(b);
        }
        drop(held);
        for _ in 0..2 * POOL_KEEP {
            let b = AlignedBuf::zeroed(POOL_CAP);
            assert!(aligned(b.as_ptr() as usize));
            assert!(b.iter().all(|&x| x == 0), "a reused buffer still held data");
        }
    }

    /// A thread's spare small buffer is the next one it asks for, and it comes back all
    /// zeros: whole, past a truncation, and past the smaller length it is reused at.
    #[test]
    fn a_threads_spare_buffer_is_reused_and_comes_back_zeroed() {
        std::thread::spawn(|| {
            let mut b = AlignedBuf::zeroed(64 << 10);
            b.fill(0x5a);
            b.truncate(40 << 10);
            let at = b.as_ptr();
            drop(b);
            let b = AlignedBuf::zeroed(4096);
            assert_eq!(b.as_ptr(), at, "the spare was not reused");
            assert!(b.iter().all(|&x| x == 0), "the reused buffer held data");
            // The rest of the allocation, beyond this buffer's length, must be zeros too:
            // it becomes visible when the spare is next taken at a larger length.
            drop(b);
            let b = AlignedBuf::zeroed(64 << 10);
            assert_eq!(b.as_ptr(), at);
            assert!(b.iter().all(|&x| x == 0), "the spare's tail held data");
            // Too small for the next request: freed, and a fresh one made (and kept).
            drop(b);
            let big = AlignedBuf::zeroed(96 << 10);
            assert!(big.iter().all(|&x| x == 0));
            // A smaller buffer dropped beside a larger spare does not replace it.
            let mut small = AlignedBuf::zeroed(4096);
            small.fill(1);
            let big_at = big.as_ptr();
            drop(big);
            drop(small);
            let b = AlignedBuf::zeroed(96 << 10);
            assert_eq!(b.as_ptr(), big_at, "the larger spare was not kept");
            assert!(b.iter().all(|&x| x == 0));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn direct_and_buffered_agree_and_reads_past_eof_are_damage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(3 * ALIGN as u64 + 100).unwrap();
        let mut b = Backing::new(f);
        b.enable_direct(ALIGN); // may be false on tmpfs; both paths must behave the same
        let mut w = AlignedBuf::zeroed(2 * ALIGN);
        w.iter_mut().enumerate().for_each(|(i, x)| *x = i as u8);
        b.write_all(&w, ALIGN as u64).unwrap();
        b.write_all(&[9u8; 10], 5).unwrap(); // unaligned: buffered
        let mut r = AlignedBuf::zeroed(3 * ALIGN);
        r.fill(0xee);
        b.read_full(&mut r, 0).unwrap();
        assert_eq!(&r[5..15], &[9u8; 10]);
        assert_eq!(&r[ALIGN..3 * ALIGN], &w[..]);
        // The file ends 100 bytes into the fourth page: reading that page whole is a short
        // read, which is damage, not zeros.
        let mut past = AlignedBuf::zeroed(ALIGN);
        let e = b.read_full(&mut past, 3 * ALIGN as u64).unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::Corrupt, "{e}");
        let mut u = vec![0u8; 3];
        b.read_full(&mut u, ALIGN as u64 + 1).unwrap();
        assert_eq!(u, [1, 2, 3]);
    }
}
