//! Plaintext access to a resource's bytes: a raw file as is, or an encrypted file through
//! its header and sector cipher. Read, write (read-modify-write for partial sectors), sync,
//! and the steps of an in-place re-encryption. Used by the CLI operations and the mount alike.
//!
//! Sectors whose ciphertext is all zeros (never written: holes of a sparse file) read as
//! zeros, so a blank encrypted disk costs no space and reads like a blank disk.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use zeroize::Zeroizing;

use super::ahead::{self, Ahead};
use super::backing::{pread_full, AlignedBuf, Backing};
use crate::cache::SectorCache;
use crate::crypto::{CipherKind, SectorCipher, SHALLOW_STACK};
use crate::err;
use crate::error::{IoContext, Result};
use crate::format::{self, sector_span, Header, KeySlot, JOURNAL_LEN, JOURNAL_OFFSET};

const STRIPES: usize = 64;
/// Requests at least this large go around the sector cache; mounted, writes this large also
/// go around the page cache of the backing file (see [`super::backing`]).
const LARGE: usize = 128 << 10;

/// Plaintext view of one resource file.
pub struct Volume {
    backing: Arc<Backing>,
    size: u64,
    enc: Option<Arc<Enc>>,
}

struct Enc {
    header: Mutex<Header>,
    sector_size: u32,
    data_offset: u64,
    keying: RwLock<Keying>,
    /// Readers of a sector share its stripe, writers hold it alone: a cache fill never
    /// races a write, and two read-modify-writes of one sector never lose each other.
    stripes: [RwLock<()>; STRIPES],
    /// The plaintext cache and this volume's id in it.
    cache: Option<(Arc<SectorCache>, u64)>,
    /// Sectors in the volume.
    sectors: u64,
    /// The stream of large sequential reads, if any.
    stream: Mutex<Stream>,
    /// The stream's next request, decrypted ahead.
    ahead: Ahead,
    /// A re-encryption step failed and could not be undone: memory and disk disagree on
    /// which key a chunk is under, so nothing is read or written until the volume is opened
    /// again (the open replays the journal).
    failed: AtomicBool,
}

impl Enc {
    fn usable(&self) -> Result<()> {
        if self.failed.load(Ordering::Relaxed) {
            return Err(err!(
                Io,
                "a re-encryption step failed and could not be undone: close every file of this resource (the next open puts its journaled chunk back)"
            ));
        }
        Ok(())
    }
}

/// Write the sectors of `buf` at `at` whose ciphertext in `was` (what the file held there)
/// is not all zeros, in runs. The others were holes, or zeros, and are zeros in `buf` too
/// (a sector of zeros is never decrypted, so it stays zeros under any key): not writing
/// them keeps a hole a hole, and needs no space.
fn write_over_data(file: &File, buf: &[u8], was: &[u8], at: u64, ss: usize) -> Result<()> {
    let data = |i: usize| !is_zero(&was[i * ss..(i + 1) * ss]);
    let n = buf.len() / ss;
    let mut i = 0;
    while i < n {
        if !data(i) {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < n && data(j) {
            j += 1;
        }
        file.write_all_at(&buf[i * ss..j * ss], at + (i * ss) as u64)?;
        i = j;
    }
    Ok(())
}

/// How far a stream of large sequential reads is read ahead: this many requests of its size,
/// and at least [`READ_AHEAD_BYTES`]. Measured with `fio --rw=read --direct=1 --ioengine=psync`
/// through the mount (contrib/bench machine, 4 alternating rounds): 1 MiB requests 885 MB/s
/// reading one request ahead, 965 MB/s with this window; 128 KiB requests 490 against 808 MB/s
/// (the disk itself, read the same way: 1.2-1.3 GB/s and 0.5-0.7 GB/s).
const READ_AHEAD_RUNS: u64 = 2;
const READ_AHEAD_BYTES: u64 = 8 << 20;

/// Where a large read's plaintext goes.
enum Dest<'a> {
    /// The caller's buffer.
    Into(&'a mut [u8]),
    /// A buffer of the read's own, of this many bytes: the one the plaintext was decrypted
    /// ahead into, where it was (no copy).
    Own(usize),
}

impl Dest<'_> {
    fn len(&self) -> usize {
        match self {
            Dest::Into(buf) => buf.len(),
            Dest::Own(len) => *len,
        }
    }
}

/// Where the next large read of a sequential stream would start, and the sectors read ahead
/// for it.
struct Stream {
    /// The sector after the furthest large read of the stream (none yet: `u64::MAX`, so a
    /// first read at sector 0 starts no stream).
    next: u64,
    /// Sectors `[start, end)` asked of the kernel ahead of the reader.
    ahead: Option<(u64, u64)>,
}

impl Default for Stream {
    fn default() -> Stream {
        Stream {
            next: u64::MAX,
            ahead: None,
        }
    }
}

/// Stripe locks held (released when dropped; never read).
#[allow(dead_code)]
enum Stripes<G> {
    One(G),
    Many(Vec<G>),
}

/// Which data key encrypts which sectors.
struct Keying {
    current: SectorCipher,
    /// During a re-encryption: the new key, used for sectors below `checkpoint`.
    next: Option<SectorCipher>,
    checkpoint: u64,
}

impl Keying {
    fn cipher_for(&self, sector: u64) -> &SectorCipher {
        match &self.next {
            Some(n) if sector < self.checkpoint => n,
            _ => &self.current,
        }
    }

    /// How many sectors from `sector` on share one cipher (up to `max`).
    fn run_len(&self, sector: u64, max: u64) -> u64 {
        if self.next.is_some() && sector < self.checkpoint {
            max.min(self.checkpoint - sector)
        } else {
            max
        }
    }
}

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets aligned bytes.
        unsafe { b.align_to::<u128>() }
    };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

impl Volume {
    /// A raw (unencrypted) resource.
    pub fn raw(file: File) -> Result<Volume> {
        let size = file.metadata().ctx("stat")?.len();
        Ok(Volume {
            backing: Arc::new(Backing::new(file)),
            size,
            enc: None,
        })
    }

    /// An encrypted resource, given its header and the unwrapped data key(s).
    pub fn encrypted(
        file: File,
        header: Header,
        current: &[u8],
        next: Option<&[u8]>,
    ) -> Result<Volume> {
        let current = SectorCipher::new(header.key.cipher, current)?;
        let (next, checkpoint) = match (&header.reencrypt, next) {
            (Some(r), Some(k)) => (Some(SectorCipher::new(r.next.cipher, k)?), r.checkpoint),
            (None, None) => (None, 0),
            _ => return Err(err!(Corrupt, "re-encryption state and keys disagree")),
        };
        Ok(Volume {
            backing: Arc::new(Backing::new(file)),
            size: header.size,
            enc: Some(Arc::new(Enc {
                sectors: header.size.div_ceil(u64::from(header.sector_size)),
                sector_size: header.sector_size,
                data_offset: header.data_offset,
                header: Mutex::new(header),
                keying: RwLock::new(Keying {
                    current,
                    next,
                    checkpoint,
                }),
                stripes: std::array::from_fn(|_| RwLock::new(())),
                cache: None,
                stream: Mutex::default(),
                failed: AtomicBool::new(false),
                ahead: Ahead::default(),
            })),
        })
    }

    /// Serve reads through `cache` (as volume `id`); raw volumes are not cached.
    pub fn with_cache(mut self, cache: Arc<SectorCache>, id: u64) -> Volume {
        if let Some(e) = self.enc.as_mut().and_then(Arc::get_mut) {
            e.cache = Some((cache, id));
        }
        self
    }

    /// Read aligned runs of the data area, and write large ones, with direct I/O where the
    /// filesystem allows it (see [`super::backing`]). The mount uses this; one-shot CLI
    /// operations do not need it.
    pub fn with_direct_io(mut self) -> Volume {
        // Builders run before the volume is shared (it is shared only once it reads ahead).
        if let Some(b) = Arc::get_mut(&mut self.backing) {
            b.enable_direct(LARGE);
        }
        self
    }

    /// Fetch what each read needs first (an object-storage region's mount).
    pub fn with_fetch(mut self, f: super::backing::Fetch) -> Volume {
        if let Some(b) = Arc::get_mut(&mut self.backing) {
            b.set_fetch(f);
        }
        self
    }

    /// Begin a point-in-time read of this volume's file (a snapshot or copy of it while it
    /// is written through this volume): see [`super::freeze`].
    pub fn freeze(&self, f: super::freeze::Freeze) -> super::backing::Frozen<'_> {
        self.backing.freeze(f)
    }

    /// Plaintext size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_encrypted(&self) -> bool {
        self.enc.is_some()
    }

    /// Sector size: the header's, or 512 for raw files.
    pub fn sector_size(&self) -> u32 {
        self.enc.as_ref().map(|e| e.sector_size).unwrap_or(512)
    }

    /// The backing file.
    pub fn file(&self) -> &File {
        self.backing.file()
    }

    /// Where the payload starts in the backing file.
    fn base(&self) -> u64 {
        self.enc.as_ref().map_or(0, |e| e.data_offset)
    }

    /// Bytes the payload takes on disk (the backing file's, less its header area).
    pub fn payload_bytes(&self) -> u64 {
        super::payload_bytes(self.file(), self.base())
    }

    /// The first data (`data`) or hole at or after `offset`, as `lseek(SEEK_DATA /
    /// SEEK_HOLE)` answers: ENXIO past the end, or for data when only a hole remains. Never-
    /// written sectors are holes of the backing file and read as zeros.
    pub fn seek_hole_data(&self, offset: u64, data: bool) -> Result<u64> {
        use std::os::fd::AsRawFd;
        let nxio = || {
            let mut e = err!(InvalidInput, "no data at or after byte {offset}");
            e.os_errno = Some(libc::ENXIO);
            e
        };
        if offset >= self.size {
            return Err(nxio());
        }
        let base = self.base();
        let whence = if data {
            libc::SEEK_DATA
        } else {
            libc::SEEK_HOLE
        };
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let r = unsafe {
            libc::lseek(
                self.file().as_raw_fd(),
                (base + offset) as libc::off_t,
                whence,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return if data { Err(nxio()) } else { Ok(self.size) };
            }
            return Err(e.into());
        }
        let at = (r as u64).saturating_sub(base).max(offset);
        match (data, at >= self.size) {
            (true, true) => Err(nxio()),
            (false, true) => Ok(self.size),
            (_, false) => Ok(at),
        }
    }

    /// A copy of the current header (encrypted volumes).
    pub fn header(&self) -> Option<Header> {
        self.enc
            .as_ref()
            .map(|e| e.header.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// The header as it is on disk now. A rewrap (from the CLI, or a control file) rewrites
    /// the header of a volume that is open; the in-memory copy takes the new key slot, so
    /// later header writes keep it. Raw volumes have none.
    pub fn reload_header(&self) -> Result<Option<Header>> {
        let Some(enc) = &self.enc else {
            return Ok(None);
        };
        let mut h = enc.header.lock().unwrap_or_else(|p| p.into_inner());
        let (disk, _) = format::read_header(self.file())?;
        if disk.uuid != h.uuid {
            return Err(err!(
                Corrupt,
                "the header on disk belongs to another resource (uuid {})",
                disk.uuid_string()
            ));
        }
        if disk.seq > h.seq && disk.reencrypt.is_none() && h.reencrypt.is_none() {
            h.key = disk.key.clone();
            h.seq = disk.seq;
        }
        Ok(Some(disk))
    }

    /// Read plaintext at `offset`; returns the bytes read (short at end of resource).
    /// Reads into a buffer aligned like [`AlignedBuf`] avoid a copy.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let r = self.read_inner(buf, offset);
        self.scrub();
        r
    }

    /// Read up to `len` bytes of plaintext at `offset` into a buffer of their own (short at
    /// end of resource). Like [`Volume::read_at`], but a large read that continues a stream
    /// is handed the buffer its plaintext was decrypted ahead into, not a copy of it.
    pub fn read_owned(&self, offset: u64, len: usize) -> Result<AlignedBuf> {
        let r = self.read_owned_inner(offset, len);
        self.scrub();
        r
    }

    #[inline(never)]
    fn read_owned_inner(&self, offset: u64, len: usize) -> Result<AlignedBuf> {
        let len = (len as u64).min(self.size.saturating_sub(offset)) as usize;
        if let Some(enc) = &self.enc {
            enc.usable()?;
            let span = sector_span(offset, len as u64, enc.sector_size);
            if span.head == 0 && len >= LARGE && len.is_multiple_of(enc.sector_size as usize) {
                let _guards = enc.read_stripes(span.first, span.count);
                if let Some(buf) = enc.read_large(&self.backing, span.first, Dest::Own(len))? {
                    return Ok(buf);
                }
            }
        }
        let mut buf = AlignedBuf::zeroed(len);
        let n = self.read_inner(&mut buf, offset)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Write plaintext at `offset`. Writes past the end are refused (resources do not grow).
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<usize> {
        let r = self.write_inner(data, offset);
        self.scrub();
        r
    }

    /// Wipe the stack the cipher kernels used (they spill round keys into their frames), so
    /// no copy of a key schedule outlives the request in a worker thread's stack. 32 KiB
    /// covers every kernel's frames and the volume's own; the fused XTS-AES kernel needs
    /// only [`SHALLOW_STACK`] (the 32 KiB memset was ~1% of the daemon's CPU under 4 KiB
    /// random reads). `fs_core::no_key_schedule_is_left_on_the_stack_after_a_request`
    /// checks both.
    fn scrub(&self) {
        let Some(enc) = &self.enc else {
            return;
        };
        let shallow = {
            let k = enc.keying.read().unwrap_or_else(|p| p.into_inner());
            k.current.shallow_stack() && k.next.as_ref().is_none_or(|n| n.shallow_stack())
        };
        if shallow {
            crate::sys::secret::scrub_stack_small::<SHALLOW_STACK>();
        } else {
            crate::sys::secret::scrub_stack_small::<{ 32 << 10 }>();
        }
    }

    #[inline(never)]
    fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(self.size - offset) as usize;
        let Some(enc) = &self.enc else {
            self.backing.read_full(&mut buf[..len], offset)?;
            return Ok(len);
        };
        enc.usable()?;
        let ss = enc.sector_size as usize;
        let span = sector_span(offset, len as u64, enc.sector_size);
        let _guards = enc.read_stripes(span.first, span.count);
        if span.head == 0 && len.is_multiple_of(ss) {
            enc.read_cached(&self.backing, span.first, &mut buf[..len])?;
            return Ok(len);
        }
        let mut tmp = AlignedBuf::zeroed(span.count as usize * ss);
        enc.read_cached(&self.backing, span.first, &mut tmp)?;
        buf[..len].copy_from_slice(&tmp[span.head..span.head + len]);
        Ok(len)
    }

    #[inline(never)]
    fn write_inner(&self, data: &[u8], offset: u64) -> Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        if offset >= self.size {
            return Err(err!(NoSpace, "write beyond the end of the resource"));
        }
        let len = (data.len() as u64).min(self.size - offset) as usize;
        let data = &data[..len];
        let Some(enc) = &self.enc else {
            self.backing.write_all(data, offset)?;
            return Ok(len);
        };
        enc.usable()?;
        let ss = enc.sector_size as usize;
        let span = sector_span(offset, len as u64, enc.sector_size);
        let _guards = enc.write_stripes(span.first, span.count);
        let _writing = enc.ahead.write_begun();
        let mut tmp = AlignedBuf::zeroed(span.count as usize * ss);
        let last = span.count as usize - 1;
        if span.head != 0 {
            enc.read_cached(&self.backing, span.first, &mut tmp[..ss])?;
        }
        if !(span.head + len).is_multiple_of(ss) && (last > 0 || span.head == 0) {
            enc.read_cached(
                &self.backing,
                span.first + last as u64,
                &mut tmp[last * ss..],
            )?;
        }
        tmp[span.head..span.head + len].copy_from_slice(data);
        if let Some((cache, id)) = &enc.cache {
            for (i, sector) in tmp.chunks_exact(ss).enumerate() {
                if tmp.len() >= LARGE {
                    cache.remove((*id, span.first + i as u64));
                } else {
                    cache.put((*id, span.first + i as u64), sector);
                }
            }
        }
        // The key lock is held until the ciphertext is in the file: a re-encryption step
        // never sees sectors under a key its checkpoint does not say.
        let k = enc.keying.read().unwrap_or_else(|p| p.into_inner());
        // Checked again under the key lock: a write that waited behind a step which then
        // failed past undoing must not land (the journal, replayed at the next open, would
        // undo it after it was acknowledged).
        let r = enc
            .usable()
            .and_then(|()| enc.encrypt_run(&k, span.first, &mut tmp))
            .and_then(|()| {
                self.backing
                    .write_all(&tmp, enc.data_offset + span.first * ss as u64)
            });
        drop(k);
        if let (Err(_), Some((cache, id))) = (&r, &enc.cache) {
            for i in 0..span.count {
                cache.remove((*id, span.first + i));
            }
        }
        r?;
        Ok(len)
    }

    /// Make every earlier write durable.
    pub fn sync(&self) -> Result<()> {
        if let Some(enc) = &self.enc {
            enc.usable()?;
        }
        self.file().sync_data().ctx("syncing")?;
        self.backing.flush_remote()
    }
}

impl Enc {
    /// The stripes of sectors `[first, first + count)`, one bit each.
    fn stripe_mask(first: u64, count: u64) -> u64 {
        const _: () = assert!(STRIPES == 64);
        if count >= STRIPES as u64 {
            return u64::MAX;
        }
        (first..first + count).fold(0, |m, s| m | 1 << (s % STRIPES as u64))
    }

    /// Lock the stripes in `mask` with `lock`, in index order (so two requests never lock
    /// the same two stripes in opposite orders); one stripe, the common case, allocates nothing.
    fn lock_stripes<'a, G>(&'a self, mask: u64, lock: impl Fn(&'a RwLock<()>) -> G) -> Stripes<G> {
        if mask.is_power_of_two() {
            return Stripes::One(lock(&self.stripes[mask.trailing_zeros() as usize]));
        }
        Stripes::Many(
            (0..STRIPES)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| lock(&self.stripes[i]))
                .collect(),
        )
    }

    fn read_stripes(&self, first: u64, count: u64) -> Stripes<RwLockReadGuard<'_, ()>> {
        self.lock_stripes(Self::stripe_mask(first, count), |l| {
            l.read().unwrap_or_else(|p| p.into_inner())
        })
    }

    fn write_stripes(&self, first: u64, count: u64) -> Stripes<RwLockWriteGuard<'_, ()>> {
        self.lock_stripes(Self::stripe_mask(first, count), |l| {
            l.write().unwrap_or_else(|p| p.into_inner())
        })
    }

    /// Whole sectors from `first` into `buf`, from the cache where it has them. The caller
    /// holds the sectors' stripes.
    fn read_cached(self: &Arc<Self>, io: &Arc<Backing>, first: u64, buf: &mut [u8]) -> Result<()> {
        if buf.len() >= LARGE {
            // Large reads bypass the cache: the cache is write-through, so the file holds
            // what it holds, and streaming through it would only evict the small-I/O set.
            return self.read_large(io, first, Dest::Into(buf)).map(drop);
        }
        let Some((cache, id)) = &self.cache else {
            return self.read_sectors(io, first, buf);
        };
        let ss = self.sector_size as usize;
        let n = buf.len() / ss;
        let mut i = 0;
        while i < n {
            if cache.get((*id, first + i as u64), &mut buf[i * ss..(i + 1) * ss]) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < n && !cache.get((*id, first + j as u64), &mut buf[j * ss..(j + 1) * ss]) {
                j += 1;
            }
            // Sectors i..j missed (j, if < n, was a hit and is already in place).
            self.read_sectors(io, first + i as u64, &mut buf[i * ss..j * ss])?;
            for k in i..j {
                cache.fill((*id, first + k as u64), &buf[k * ss..(k + 1) * ss]);
            }
            i = j + 1;
        }
        Ok(())
    }

    /// A large read. One that continues the previous large read makes a stream: a window
    /// after it ([`READ_AHEAD_RUNS`] requests, at least [`READ_AHEAD_BYTES`]) is read ahead
    /// into the page cache while this one reads, and the requests it covers are served from
    /// there (then dropped), so a reader one request at a time (`dd iflag=direct`) keeps the
    /// device busy. The kernel keeps those pages coherent with every write, direct or not.
    fn read_large(
        self: &Arc<Self>,
        io: &Arc<Backing>,
        first: u64,
        dest: Dest<'_>,
    ) -> Result<Option<AlignedBuf>> {
        let ss = u64::from(self.sector_size);
        let n = dest.len() as u64 / ss;
        let (inside, fetch, forget, next) = {
            let mut st = self.stream.lock().unwrap_or_else(|p| p.into_inner());
            let prev = st.ahead.take();
            // Inside the window: part of the stream even if it came out of order (requests
            // of one reader in flight together reach us in any order).
            let inside = prev.is_some_and(|(a, b)| a <= first && first + n <= b);
            let in_order = st.next == first;
            let mut fetch = None;
            let mut forget = None;
            let mut next = None;
            if (in_order || inside) && io.can_read_ahead() {
                if in_order && first + 2 * n <= self.sectors {
                    next = Some(first + n);
                }
                st.next = if in_order {
                    first + n
                } else {
                    st.next.max(first + n)
                };
                let window = (READ_AHEAD_RUNS * n).max(READ_AHEAD_BYTES / ss);
                let end = (st.next + window).min(self.sectors);
                let asked = prev.map_or(0, |(_, b)| b);
                let from = asked.max(st.next);
                if from < end {
                    fetch = Some((from, end));
                }
                // In order, everything before is consumed; out of order, earlier requests
                // of the window may still come.
                let start = match prev {
                    Some((a, _)) if !in_order => a,
                    _ => first + n,
                };
                let until = end.max(asked);
                st.ahead = (start < until).then_some((start, until));
            } else {
                st.next = first + n;
                // The stream ended: what it read ahead and nobody took goes.
                forget = prev;
                self.ahead.forget();
            }
            (inside, fetch, forget, next)
        };
        if let Some((a, b)) = forget {
            io.forget(self.data_offset + a * ss, ((b - a) * ss) as usize);
        }
        let read_ahead = || {
            if let Some((a, b)) = fetch {
                io.read_ahead(self.data_offset + a * ss, ((b - a) * ss) as usize);
            }
        };
        let taken = if inside {
            self.ahead.take(first, n)
        } else {
            None
        };
        if let Some(next) = next {
            self.decrypt_ahead(io, next, n);
        }
        if let Some(plain) = taken {
            read_ahead();
            return Ok(match dest {
                Dest::Into(buf) => {
                    buf.copy_from_slice(&plain);
                    None
                }
                // The buffer it was decrypted into is the answer: no copy.
                Dest::Own(_) => Some(plain),
            });
        }
        let mut own = None;
        let buf = match dest {
            Dest::Into(buf) => buf,
            Dest::Own(len) => &mut **own.insert(AlignedBuf::zeroed(len)),
        };
        if !inside {
            // This read first: read-ahead queued before it would delay it at the device.
            let r = self.read_sectors(io, first, buf);
            read_ahead();
            return r.map(|()| own);
        }
        read_ahead();
        self.read_from_window(io, first, buf).map(|()| own)
    }

    /// Read whole sectors from `first` out of the window read ahead into the page cache, and
    /// decrypt them (the stream's requests, and the background thread's for the next one).
    fn read_from_window(&self, io: &Backing, first: u64, buf: &mut [u8]) -> Result<()> {
        let k = self.keying.read().unwrap_or_else(|p| p.into_inner());
        self.usable()?;
        io.read_ahead_done(buf, self.data_offset + first * u64::from(self.sector_size))?;
        self.decrypt_run(&k, first, buf)
    }

    /// Have sectors `[first, first + count)` read (from the window read ahead) and decrypted
    /// on the background thread, for the stream's next request (see [`super::ahead`]).
    fn decrypt_ahead(self: &Arc<Self>, io: &Arc<Backing>, first: u64, count: u64) {
        let job = self.ahead.claim(first, count);
        let (enc, io) = (Arc::clone(self), Arc::clone(io));
        ahead::spawn(Box::new(move || {
            enc.ahead.run(job, || {
                let mut buf = AlignedBuf::zeroed((count * u64::from(enc.sector_size)) as usize);
                enc.read_from_window(&io, first, &mut buf)?;
                Ok(buf)
            })
        }));
    }

    /// Read and decrypt whole sectors starting at `first` into `buf`.
    fn read_sectors(&self, io: &Backing, first: u64, buf: &mut [u8]) -> Result<()> {
        // Under the key lock, like writes: the sectors read are under the key it says.
        let k = self.keying.read().unwrap_or_else(|p| p.into_inner());
        self.usable()?;
        io.read_full(buf, self.data_offset + first * u64::from(self.sector_size))?;
        self.decrypt_run(&k, first, buf)
    }

    fn decrypt_run(&self, k: &Keying, first: u64, buf: &mut [u8]) -> Result<()> {
        let ss = self.sector_size as usize;
        let n = (buf.len() / ss) as u64;
        let mut i = 0u64;
        while i < n {
            let at = i as usize * ss;
            if is_zero(&buf[at..at + ss]) {
                i += 1;
                continue;
            }
            // Extend over following non-zero sectors under the same key.
            let limit = k.run_len(first + i, n - i);
            let mut j = 1;
            while j < limit {
                let b = (i + j) as usize * ss;
                if is_zero(&buf[b..b + ss]) {
                    break;
                }
                j += 1;
            }
            let end = (i + j) as usize * ss;
            k.cipher_for(first + i)
                .decrypt_sectors(&mut buf[at..end], ss, first + i)?;
            i += j;
        }
        Ok(())
    }

    fn encrypt_run(&self, k: &Keying, first: u64, buf: &mut [u8]) -> Result<()> {
        let ss = self.sector_size as usize;
        let n = (buf.len() / ss) as u64;
        let mut i = 0u64;
        while i < n {
            let j = k.run_len(first + i, n - i);
            let (a, b) = (i as usize * ss, (i + j) as usize * ss);
            k.cipher_for(first + i)
                .encrypt_sectors(&mut buf[a..b], ss, first + i)?;
            i += j;
        }
        Ok(())
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        if let Some((cache, id)) = self.enc.as_ref().and_then(|e| e.cache.as_ref()) {
            cache.remove_volume(*id);
        }
    }
}

/// In-place re-encryption, one journaled chunk at a time. Crash-safe: before a chunk is
/// rewritten its old ciphertext is saved in the journal area of the header region and the
/// header says so; on the next open the journal is put back, so every sector is readable
/// under exactly one of the two keys, as the checkpoint says.
impl Volume {
    fn enc(&self) -> Result<&Enc> {
        self.enc
            .as_deref()
            .ok_or_else(|| err!(Refused, "the resource is not encrypted"))
    }

    /// Start a re-encryption to the data key `key` wrapped in `slot` (persisted first).
    pub fn begin_reencrypt(&self, slot: KeySlot, key: &[u8]) -> Result<()> {
        let enc = self.enc()?;
        let cipher = SectorCipher::new(slot.cipher, key)?;
        let mut k = enc.keying.write().unwrap_or_else(|p| p.into_inner());
        let mut h = enc.header.lock().unwrap_or_else(|p| p.into_inner());
        // Start from the header on disk: a rewrap may have changed it since we opened.
        let (disk, _) = format::read_header(self.file())?;
        if h.reencrypt.is_some() || disk.reencrypt.is_some() {
            return Err(err!(Busy, "a re-encryption is already under way"));
        }
        let mut new = disk;
        new.reencrypt = Some(format::Reencrypt {
            checkpoint: 0,
            journal_sector: 0,
            journal_len: 0,
            journal_crc: 0,
            next: slot,
        });
        format::write_header(self.file(), &mut new)?;
        *h = new;
        k.next = Some(cipher);
        k.checkpoint = 0;
        Ok(())
    }

    /// The re-encryption checkpoint and total sectors, if one is under way.
    pub fn reencrypt_progress(&self) -> Option<(u64, u64)> {
        let enc = self.enc.as_ref()?;
        let h = enc.header.lock().unwrap_or_else(|p| p.into_inner());
        h.reencrypt.as_ref().map(|r| (r.checkpoint, h.sectors()))
    }

    /// Re-encrypt the next chunk; returns false once every sector is under the new key.
    /// `crash_hook` is called between the durable steps (tests inject crashes there), and as
    /// `finishing` once nothing is left to re-encrypt, still holding the locks that keep
    /// writes out until the new key is the only one.
    pub fn reencrypt_step(&self, crash_hook: &dyn Fn(&str) -> Result<()>) -> Result<bool> {
        let r = self.reencrypt_step_inner(crash_hook);
        self.scrub();
        r
    }

    #[inline(never)]
    fn reencrypt_step_inner(&self, crash_hook: &dyn Fn(&str) -> Result<()>) -> Result<bool> {
        let enc = self.enc()?;
        enc.usable()?;
        let ss = u64::from(enc.sector_size);
        let mut k = enc.keying.write().unwrap_or_else(|p| p.into_inner());
        let mut h = enc.header.lock().unwrap_or_else(|p| p.into_inner());
        let sectors = h.sectors();
        let Some(r) = h.reencrypt.clone() else {
            return Ok(false);
        };
        if r.checkpoint >= sectors {
            crash_hook("finishing")?;
            return self.finish_reencrypt(&mut k, &mut h).map(|_| false);
        }
        // Skip holes: a sector that reads all zeros stays all zeros under any key.
        let mut start = r.checkpoint;
        let data = crate::sys::data_extents(self.file(), enc.data_offset + sectors * ss);
        if let Some(&(off, _)) = data
            .iter()
            .find(|&&(off, len)| off + len > enc.data_offset + start * ss)
        {
            let first_data = off.saturating_sub(enc.data_offset) / ss;
            start = start.max(first_data);
        } else {
            start = sectors;
        }
        if start >= sectors {
            // Finished under the same locks that found nothing left: a write let in between
            // would put a sector past the checkpoint under the old key, and the switch to
            // the new one would then read it as garbage.
            crash_hook("finishing")?;
            return self.finish_reencrypt(&mut k, &mut h).map(|_| false);
        }
        let count = (JOURNAL_LEN / ss).min(sectors - start);
        let len = (count * ss) as usize;
        let at = enc.data_offset + start * ss;
        let mut buf = Zeroizing::new(vec![0u8; len]);
        pread_full(self.file(), &mut buf, at)?;
        let old = buf.clone();
        // 1. Save the old ciphertext in the journal.
        self.file().write_all_at(&buf, JOURNAL_OFFSET)?;
        self.file().sync_data()?;
        crash_hook("journal-written")?;
        // 2. Record the journal (and the checkpoint so far) in the header. From here until
        // the checkpoint moves past the chunk, memory says "new key below `start`, old from
        // it"; a step that fails on the way is undone, so the disk says so too.
        let mut nh = h.clone();
        if let Some(nr) = nh.reencrypt.as_mut() {
            nr.checkpoint = start;
            nr.journal_sector = start;
            nr.journal_len = len as u32;
            nr.journal_crc = crc32fast::hash(&buf);
        }
        let recorded = format::write_header(self.file(), &mut nh);
        *h = nh;
        k.checkpoint = start;
        let rewritten = recorded.and_then(|()| {
            crash_hook("journal-recorded")?;
            // 3. Rewrite the chunk under the new key (a sector of zero plaintext is written
            // as zeros; a hole stays a hole, see write_over_data).
            enc.decrypt_run(&k, start, &mut buf)?;
            let next = k.next.as_ref().ok_or_else(|| err!(Corrupt, "no new key"))?;
            let ssz = ss as usize;
            for (i, sector) in buf.chunks_exact_mut(ssz).enumerate() {
                if !is_zero(sector) {
                    next.encrypt_sectors(sector, ssz, start + i as u64)?;
                }
            }
            write_over_data(self.file(), &buf, &old, at, ssz)?;
            self.file().sync_data()?;
            crash_hook("chunk-written")?;
            // 4. Advance the checkpoint, drop the journal.
            let mut nh = h.clone();
            if let Some(nr) = nh.reencrypt.as_mut() {
                nr.checkpoint = start + count;
                nr.journal_len = 0;
                nr.journal_crc = 0;
            }
            format::write_header(self.file(), &mut nh)?;
            Ok(nh)
        });
        match rewritten {
            Ok(nh) => {
                *h = nh;
                k.checkpoint = start + count;
            }
            Err(e) => {
                self.undo_chunk(&mut h, &old, at, crash_hook);
                return Err(e);
            }
        }
        crash_hook("checkpoint-advanced")?;
        Ok(true)
    }

    /// Undo a re-encryption step that failed after recording its journal (a full disk, an
    /// I/O error): the header as that step recorded it is written again over whatever its
    /// last write left, the chunk's old ciphertext put back, and the journal dropped. Disk
    /// and memory then agree (old key from the chunk on), writes go on, and a later run
    /// resumes at the chunk. If any of that fails, the volume refuses all I/O until it is
    /// opened again, when the journal, replayed, puts the chunk back; no write is taken
    /// meanwhile that the replay would undo.
    fn undo_chunk(
        &self,
        h: &mut Header,
        old: &[u8],
        at: u64,
        crash_hook: &dyn Fn(&str) -> Result<()>,
    ) {
        let ss = h.sector_size as usize;
        let undone = (|| -> Result<()> {
            crash_hook("undoing")?;
            let mut nh = h.clone();
            // Past any copy the failed step may have written (it bumped the same seq once).
            nh.seq += 1;
            format::write_header(self.file(), &mut nh)?;
            write_over_data(self.file(), old, old, at, ss)?;
            self.file().sync_data()?;
            if let Some(nr) = nh.reencrypt.as_mut() {
                nr.journal_len = 0;
                nr.journal_crc = 0;
            }
            format::write_header(self.file(), &mut nh)?;
            *h = nh;
            Ok(())
        })();
        if let Err(e) = undone {
            self.poison(&e);
        }
    }

    /// Refuse all I/O of this volume from now on (see [`Enc::usable`]).
    fn poison(&self, why: &crate::Error) {
        if let Some(enc) = &self.enc {
            tracing::error!("a re-encryption step failed and could not be undone ({why}): this volume refuses I/O until it is opened again");
            enc.failed.store(true, Ordering::SeqCst);
        }
    }

    /// Make the new key the only one: every sector is under it. Called with the key and
    /// header locks held since that was found.
    fn finish_reencrypt(&self, k: &mut Keying, h: &mut Header) -> Result<()> {
        let Some(r) = h.reencrypt.clone() else {
            return Ok(());
        };
        let mut nh = h.clone();
        nh.key = r.next;
        nh.reencrypt = None;
        if let Err(e) = format::write_header(self.file(), &mut nh) {
            // One copy may say "new key everywhere" and win at the next open: no write may
            // land past the checkpoint under the old key meanwhile. Either copy is right for
            // what is on disk (past the checkpoint there are only holes).
            self.poison(&e);
            return Err(e);
        }
        *h = nh;
        if let Some(next) = k.next.take() {
            k.current = next;
        }
        k.checkpoint = 0;
        Ok(())
    }

    /// Put back a journaled chunk after a crash (called on open, before any I/O).
    pub fn recover_journal(file: &File, h: &mut Header) -> Result<bool> {
        let Some(r) = h.reencrypt.clone() else {
            return Ok(false);
        };
        if r.journal_len == 0 {
            return Ok(false);
        }
        let mut buf = Zeroizing::new(vec![0u8; r.journal_len as usize]);
        pread_full(file, &mut buf, JOURNAL_OFFSET)?;
        if crc32fast::hash(&buf) != r.journal_crc {
            return Err(err!(
                Corrupt,
                "the re-encryption journal is damaged; the resource cannot be recovered automatically"
            ));
        }
        let at = h.data_offset + r.journal_sector * u64::from(h.sector_size);
        // Sectors of zeros in the journal were zeros (holes, mostly) in the chunk, and its
        // step wrote none of them: only the others go back, so an open needs no free space.
        write_over_data(file, &buf, &buf, at, h.sector_size as usize)?;
        file.sync_data()?;
        let mut nh = h.clone();
        if let Some(nr) = nh.reencrypt.as_mut() {
            nr.checkpoint = r.journal_sector;
            nr.journal_len = 0;
            nr.journal_crc = 0;
        }
        format::write_header(file, &mut nh)?;
        *h = nh;
        Ok(true)
    }

    /// The cipher of sectors at and above the checkpoint.
    pub fn cipher(&self) -> Option<CipherKind> {
        self.enc.as_ref().map(|e| {
            e.keying
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .current
                .kind()
        })
    }
}
