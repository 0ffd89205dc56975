//! Store operations: import, create, snapshot, copy, rekey, export, delete, dek. Every
//! operation that makes a resource writes it under `tmp/` and renames it into place only when
//! whole, so a failed or interrupted operation leaves nothing under the final name. The CLI
//! and the mount's control files both call these.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use zeroize::Zeroizing;

use super::freeze::Freeze;
use super::{imgfmt, AlignedBuf, ResPath, Store, Volume};
use crate::crypto::{self, CipherKind, NONCE_LEN};
use crate::err;
use crate::error::{IoContext, Result};
use crate::format::{self, round_up, Header, KeySlot, Kind, DATA_OFFSET};
use crate::kms::{KeySpec, Keys};
use crate::sys::{self, FileLock};

/// Bytes moved per step of a bulk transfer.
pub(super) const CHUNK: u64 = 1 << 20;

/// Progress of a long operation (a terminal bar, a job's percentage, or nothing).
pub trait Progress: Sync {
    fn start(&self, _total: u64) {}
    fn add(&self, _bytes: u64) {}
    /// Asked between chunks: true to stop (the operation then fails cleanly).
    fn cancelled(&self) -> bool {
        false
    }
    /// Asked once the result is whole, just before it is put in place: false to stop (it is
    /// cancelled); true, and from then on the operation is finishing and no longer stops.
    fn finishing(&self) -> bool {
        !self.cancelled()
    }
}

/// No progress reporting.
pub struct NoProgress;
impl Progress for NoProgress {}

/// How `copy` (and `create --from`) should treat encryption.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyOptions {
    /// Encrypt an unencrypted source.
    pub encrypt: bool,
    /// The CMK for the destination (`key=K` / `--key K`).
    pub key: Option<String>,
    /// Ask for an unencrypted destination (refused for encrypted sources).
    pub unencrypted: bool,
    /// Sector size for a newly encrypted destination (default 4096).
    pub sector_size: Option<u32>,
    /// Copy into these regions instead of this one (`--to-region`, `region=`): up to
    /// five, each getting a new data key.
    pub to_regions: Vec<String>,
}

/// How `rekey` changes the data key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RekeyMode {
    /// Keep the data key, re-wrap it under the new CMK (same spec).
    Rewrap,
    /// New data key, every sector re-encrypted.
    Reencrypt,
}

/// What a copy does, decided once from the source and the options.
enum Plan {
    /// Unencrypted to unencrypted.
    Plain,
    /// Unencrypted to encrypted under this CMK reference (None: the service key).
    Encrypt(Option<String>),
    /// Encrypted to encrypted, same CMK and data key: ciphertext copied verbatim.
    Verbatim,
    /// Encrypted to encrypted under another CMK: new data key, every sector re-encrypted.
    Reencrypt(String),
}

fn new_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    crypto::random_fill(&mut u);
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// Wrap `dek` for header `h` under CMK reference `key` (None: the service key) and return
/// the slot.
fn wrap_for(
    keys: &mut Keys,
    key: Option<&str>,
    h: &Header,
    cipher: CipherKind,
    dek: &[u8],
) -> Result<KeySlot> {
    let id = match key {
        Some(k) => k.to_string(),
        None => keys.service_key()?,
    };
    let (kid, spec) = keys.id_and_spec(&id)?;
    if spec.sector_cipher() != cipher {
        return Err(err!(
            InvalidInput,
            "key {kid} is {} but the data key is for {}",
            spec.name(),
            cipher.name()
        ));
    }
    let w = keys.wrap(&id, dek, |kid, ver| h.wrap_aad(cipher, kid, ver))?;
    Ok(KeySlot {
        cipher,
        key_id: w.key_id,
        key_version: w.key_version,
        nonce: w.nonce,
        wrapped: w.wrapped,
    })
}

/// A target being written under `tmp/`, put in place only when whole. Where the filesystem
/// can, it is an unnamed file (`O_TMPFILE`): a crash at any point leaves nothing behind, not
/// even space taken, and `commit` links it into place. Elsewhere it is a named file, locked
/// while written and removed on drop unless committed (`Store::clean_tmp` sweeps what a
/// killed writer left).
pub(super) struct Partial {
    /// For messages: the file's name, or the directory of an unnamed one.
    pub(super) path: std::path::PathBuf,
    pub(super) file: File,
    /// The lock of a named file (None: unnamed).
    named: Option<FileLock>,
    /// The CMK its data key is wrapped under, held until it is in place (see
    /// [`Store::hold_key`]).
    pub(super) key_hold: Option<FileLock>,
    done: bool,
}

impl Partial {
    pub(super) fn create(store: &Store, what: &str) -> Result<Partial> {
        let dir = store.tmp_dir();
        sys::private_dir(&dir)?;
        match sys::create_unnamed(&dir) {
            Ok(file) => {
                return Ok(Partial {
                    path: dir.join(format!("(new {what}, unnamed)")),
                    file,
                    named: None,
                    key_hold: None,
                    done: false,
                })
            }
            Err(e)
                if e.os_errno.is_some_and(|n| {
                    matches!(n, libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                }) => {}
            Err(e) => return Err(e),
        }
        // Sweep what killed jobs left behind (a live job holds its partial's lock).
        store.clean_tmp();
        let path = sys::temp_path(&dir, what);
        let file = sys::create_private(&path)?;
        let lock = FileLock::exclusive_on(&file)?;
        Ok(Partial {
            path,
            file,
            named: Some(lock),
            key_hold: None,
            done: false,
        })
    }

    /// Give the file its final length (sparse).
    pub(super) fn size(&self, len: u64) -> Result<()> {
        self.file.set_len(len).ctx(format_args!(
            "sizing {} to {len} bytes",
            self.path.display()
        ))
    }

    /// fsync and put in place, refusing to replace an existing file, unless the operation
    /// `p` reports on was cancelled first ([`Progress::finishing`]).
    pub(super) fn commit(mut self, dest: &Path, p: &dyn Progress) -> Result<()> {
        if !p.finishing() {
            return Err(err!(Cancelled, "cancelled"));
        }
        self.file
            .sync_all()
            .ctx(format_args!("syncing {}", self.path.display()))?;
        if self.named.is_some() {
            rename_noreplace(&self.path, dest)?;
        } else {
            sys::link_unnamed(&self.file, dest)?;
        }
        if let Some(d) = dest.parent() {
            sys::sync_dir(d)?;
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.done && self.named.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub(super) fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let a = std::ffi::CString::new(from.as_os_str().as_bytes())
        .map_err(|_| err!(InvalidInput, "bad path"))?;
    let b = std::ffi::CString::new(to.as_os_str().as_bytes())
        .map_err(|_| err!(InvalidInput, "bad path"))?;
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Err(err!(AlreadyExists, "{} already exists", to.display()));
    }
    if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
        // Filesystems without RENAME_NOREPLACE: link + unlink gives the same guarantee.
        std::fs::hard_link(from, to).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                err!(AlreadyExists, "{} already exists", to.display())
            } else {
                crate::error::Error::from(e)
            }
        })?;
        let _ = std::fs::remove_file(from);
        return Ok(());
    }
    Err(crate::error::Error::from(e).context(format!("renaming into {}", to.display())))
}

/// Copy `len` bytes from `src` at `src_off` to `dst` (named `dst_name` in errors) at
/// `dst_off`, in-kernel where possible. A source that ends early is damage.
fn copy_range(
    src: &File,
    src_off: u64,
    (dst, dst_name): (&File, &Path),
    dst_off: u64,
    len: u64,
    p: &dyn Progress,
) -> Result<()> {
    copy_range_inner(src, src_off, dst, dst_off, len, p)
        .map_err(|e| e.context(format_args!("copying into {}", dst_name.display())))
}

fn copy_range_inner(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
    p: &dyn Progress,
) -> Result<()> {
    let mut done = 0u64;
    let mut kernel = true;
    let mut buf = Vec::new();
    while done < len {
        if p.cancelled() {
            return Err(err!(Cancelled, "cancelled"));
        }
        let n = (len - done).min(CHUNK * 8);
        if kernel {
            let mut so = (src_off + done) as libc::loff_t;
            let mut d = (dst_off + done) as libc::loff_t;
            // SAFETY: both descriptors are open; the offset pointers point to live locals.
            let r = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut so,
                    dst.as_raw_fd(),
                    &mut d,
                    n as usize,
                    0,
                )
            };
            if r > 0 {
                done += r as u64;
                p.add(r as u64);
                continue;
            }
            if r == 0 {
                return Err(source_ended(src_off + done));
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EXDEV)
                | Some(libc::ENOSYS)
                | Some(libc::EINVAL)
                | Some(libc::EOPNOTSUPP) => {
                    kernel = false;
                    continue;
                }
                Some(libc::EINTR) => continue,
                _ => return Err(e.into()),
            }
        }
        buf.resize(n as usize, 0);
        let got = src.read_at(&mut buf, src_off + done)?;
        if got == 0 {
            return Err(source_ended(src_off + done));
        }
        dst.write_all_at(&buf[..got], dst_off + done)?;
        done += got as u64;
        p.add(got as u64);
    }
    Ok(())
}

/// Where a copy reads its source file: as it is, or frozen at the copy's start while it is
/// written (see [`Freeze`]). Reads go forward, as the freeze needs.
pub(super) struct Source<'a> {
    pub(super) file: &'a File,
    pub(super) freeze: Option<&'a Freeze>,
}

impl Source<'_> {
    /// [`copy_range`] from the source's file bytes `[off, off + len)`.
    fn copy_range(
        &self,
        off: u64,
        dst: (&File, &Path),
        dst_off: u64,
        len: u64,
        p: &dyn Progress,
    ) -> Result<()> {
        let Some(fz) = self.freeze else {
            return copy_range(self.file, off, dst, dst_off, len, p);
        };
        for (o, n) in Freeze::pieces(off, len) {
            fz.read(o, n, |saved| {
                let from = if saved { fz.side() } else { self.file };
                copy_range(from, o, dst, dst_off + (o - off), n, p)
            })?;
        }
        Ok(())
    }

    /// A volume like the source's over the freeze's side file (`open` makes it), if frozen.
    /// Without direct I/O, so it never reads ahead: a window read ahead from the side file
    /// could hold a chunk from before it was saved.
    pub(super) fn saved_volume(
        &self,
        open: impl FnOnce(File) -> Result<Volume>,
    ) -> Result<Option<Volume>> {
        self.freeze
            .map(|fz| open(fz.side().try_clone().ctx("dup")?))
            .transpose()
    }

    /// Read plaintext at `off` through `file`, the copy's own volume of the source file
    /// (payload at file offset `base`), or through `saved` where the freeze saved the bytes
    /// first. Never through the mount's volume that writes the file: its writers wait for
    /// the freeze while they hold that volume's sector locks.
    pub(super) fn read(
        &self,
        base: u64,
        file: &Volume,
        saved: Option<&Volume>,
        buf: &mut [u8],
        off: u64,
    ) -> Result<usize> {
        let (Some(fz), Some(saved)) = (self.freeze, saved) else {
            return file.read_at(buf, off);
        };
        let mut done = 0;
        for (o, n) in Freeze::pieces(base + off, buf.len() as u64) {
            let at = (o - base - off) as usize;
            let got = fz.read(o, n, |from_saved| {
                let v = if from_saved { saved } else { file };
                v.read_at(&mut buf[at..at + n as usize], o - base)
            })?;
            done += got;
            if got < n as usize {
                break;
            }
        }
        Ok(done)
    }
}

fn source_ended(at: u64) -> crate::error::Error {
    err!(
        Corrupt,
        "the source ends at byte {at}, before its stated size: it was truncated"
    )
}

/// Plaintext extents worth copying from a file whose payload starts at `base` and holds
/// `len` bytes, aligned out to `align` and clamped to `len`.
pub(super) fn payload_extents(file: &File, base: u64, len: u64, align: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (off, l) in sys::data_extents(file, base + len) {
        let end = off + l;
        if end <= base {
            continue;
        }
        let s = off.saturating_sub(base) / align * align;
        let e = round_up(end - base, align).min(len);
        if s >= e {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= s => last.1 = last.1.max(e - last.0),
            _ => out.push((s, e - s)),
        }
    }
    out
}

/// Move plaintext chunk by chunk over `extents` from `read` to `dst`. A reader thread
/// reads (and decrypts) the next chunk while this one encrypts and writes the last: the two
/// halves of a copy overlap instead of taking turns.
fn pump(
    extents: &[(u64, u64)],
    read: &(dyn Fn(&mut [u8], u64) -> Result<usize> + Sync),
    dst: &Volume,
    part: &Partial,
    p: &dyn Progress,
) -> Result<()> {
    use std::sync::mpsc::sync_channel;
    std::thread::scope(|s| {
        type Full = (AlignedBuf, u64, Result<usize>);
        let (empty_tx, empty_rx) = sync_channel::<AlignedBuf>(2);
        let (full_tx, full_rx) = sync_channel::<Full>(2);
        for _ in 0..2 {
            // Aligned, so reads and writes of whole chunks go around the page cache.
            let _ = empty_tx.send(AlignedBuf::zeroed(CHUNK as usize));
        }
        s.spawn(move || {
            for &(off, len) in extents {
                let mut done = 0;
                while done < len {
                    // Stops when the writer has gone (it failed or was cancelled).
                    let Ok(mut buf) = empty_rx.recv() else { return };
                    let n = (len - done).min(CHUNK) as usize;
                    let r = read(&mut buf[..n], off + done);
                    // A source that ends early (0 bytes) leaves the rest of the extent a hole.
                    let (failed, ended) = match &r {
                        Err(_) => (true, true),
                        Ok(got) => (false, *got == 0),
                    };
                    if full_tx.send((buf, off + done, r)).is_err() || failed {
                        return;
                    }
                    if ended {
                        break;
                    }
                    done += n as u64;
                }
            }
        });
        // Chunks come in order until the reader has read them all and closed the channel.
        while let Ok((buf, off, r)) = full_rx.recv() {
            if p.cancelled() {
                return Err(err!(Cancelled, "cancelled"));
            }
            let got = r?;
            // The target is new (it reads as zeros): an all-zero chunk stays a hole.
            if buf[..got].iter().all(|&b| b == 0) {
                p.add(got as u64);
                let _ = empty_tx.send(buf);
                continue;
            }
            dst.write_at(&buf[..got], off)
                .map_err(|e| e.context(format_args!("writing {}", part.path.display())))?;
            p.add(got as u64);
            let _ = empty_tx.send(buf);
        }
        Ok(())
    })
}

impl Store {
    /// A new encrypted file under `tmp/` with a fresh data key under `key` (the service key
    /// when `None`), and a volume that writes its payload.
    pub(super) fn new_encrypted_volume(
        &self,
        kind: Kind,
        size: u64,
        sector_size: u32,
        key: Option<&str>,
    ) -> Result<(Partial, Volume)> {
        let cipher = match key {
            Some(k) => self.resolve_key(k)?.1.sector_cipher(),
            None => CipherKind::AesXtsPlain64,
        };
        let dek = crypto::random_secret(cipher.key_len());
        let (part, h) = self.new_encrypted(kind, size, sector_size, cipher, &dek, key)?;
        // Bulk writes of whole aligned chunks: around the page cache (see `backing`).
        let vol =
            Volume::encrypted(part.file.try_clone().ctx("dup")?, h, &dek, None)?.with_direct_io();
        Ok((part, vol))
    }

    /// A new encrypted file under `tmp/`: header written, payload a sparse hole.
    fn new_encrypted(
        &self,
        kind: Kind,
        size: u64,
        sector_size: u32,
        cipher: CipherKind,
        dek: &[u8],
        key: Option<&str>,
    ) -> Result<(Partial, Header)> {
        if sector_size != 512 && sector_size != 4096 {
            return Err(err!(
                InvalidInput,
                "sector size must be 512 or 4096, not {sector_size}"
            ));
        }
        let mut h = Header {
            seq: 0,
            uuid: new_uuid(),
            kind,
            xts_variant: format::header::XTS_IEEE1619,
            sector_size,
            size,
            data_offset: DATA_OFFSET,
            created: sys::now(),
            key: KeySlot {
                cipher,
                key_id: String::new(),
                key_version: 0,
                nonce: [0; NONCE_LEN],
                wrapped: Vec::new(),
            },
            reencrypt: None,
        };
        let hold = match key {
            Some(k) => Some(self.hold_key(&self.resolve_key(k)?.0)?),
            None => None,
        };
        h.key = self.keys.update(|k| wrap_for(k, key, &h, cipher, dek))?;
        let mut part = Partial::create(self, kind.word())?;
        part.key_hold = hold;
        format::write_header(&part.file, &mut h)
            .map_err(|e| e.context(format_args!("writing {}", part.path.display())))?;
        part.size(h.file_len())?;
        Ok((part, h))
    }

    /// The data key of an encrypted resource header (refused unless its CMK is Enabled).
    fn unwrap_header(&self, h: &Header, what: &ResPath) -> Result<Zeroizing<Vec<u8>>> {
        if h.reencrypt.is_some() {
            return Err(err!(
                Busy,
                "{what} is being re-encrypted; wait for the job or resume it"
            ));
        }
        self.keys
            .read(|k| {
                k.unwrap(
                    &h.key.key_id,
                    h.key.key_version,
                    &h.key.nonce,
                    &h.key.wrapped,
                    &h.wrap_aad(h.key.cipher, &h.key.key_id, h.key.key_version),
                )
            })
            .map_err(|e| e.context(what))
    }

    /// A key's id and spec, from its id or alias.
    pub fn resolve_key(&self, r: &str) -> Result<(String, KeySpec)> {
        self.keys.read(|k| k.id_and_spec(r))
    }

    pub(super) fn check_new(&self, dst: &ResPath) -> Result<()> {
        self.check()?;
        if self.exists(dst) {
            return Err(err!(AlreadyExists, "{dst} already exists"));
        }
        Ok(())
    }

    /// Import a disk image (of format `format`, or told by its content) as a resource,
    /// optionally encrypting it; returns the format it was read as.
    #[allow(clippy::too_many_arguments)]
    pub fn import(
        &self,
        src: &Path,
        dst: &ResPath,
        encrypt: bool,
        key: Option<&str>,
        sector_size: Option<u32>,
        format: Option<imgfmt::Format>,
        p: &dyn Progress,
    ) -> Result<imgfmt::Format> {
        let encrypt = encrypt || key.is_some();
        if !encrypt && sector_size.is_some_and(|s| s != 512) {
            return Err(err!(
                InvalidInput,
                "--sector-size applies to encrypted resources"
            ));
        }
        self.check_new(dst)?;
        let (f, len) = open_source(src)?;
        // Raw, or an image format read through qemu (as said, or told by content).
        let fmt = match format {
            Some(f) => f,
            None => imgfmt::detect(&f, len, src)?,
        };
        if fmt != imgfmt::Format::Raw && src.starts_with("/dev/fd") {
            // qemu would reopen the path with this process's rights: only the descriptor
            // the caller passed may be read.
            return Err(err!(
                InvalidInput,
                "through the system store, import raw images: convert it first (qemu-img convert -O raw)"
            ));
        }
        let image = match fmt {
            imgfmt::Format::Raw => None,
            fmt => {
                let dir = sys::temp_path(&self.tmp_dir(), "nbd");
                Some(std::sync::Mutex::new(imgfmt::Image::open(src, fmt, &dir)?))
            }
        };
        let (size, extents) = match &image {
            None => (len, payload_extents(&f, 0, len, 4096)),
            Some(m) => {
                let i = lock_image(m);
                (i.size, i.extents.clone())
            }
        };
        if size == 0 {
            return Err(err!(InvalidInput, "{} is an empty image", src.display()));
        }
        let _job = self.lock_job(dst)?;
        self.check_new(dst)?;
        p.start(extents.iter().map(|e| e.1).sum());
        let read = |b: &mut [u8], off: u64| -> Result<usize> {
            let n = (b.len() as u64).min(size.saturating_sub(off)) as usize;
            match &image {
                None => f
                    .read_exact_at(&mut b[..n], off)
                    .ctx(format_args!("reading {}", src.display()))?,
                Some(m) => lock_image(m)
                    .read_at(&mut b[..n], off)
                    .map_err(|e| e.context(format!("reading {}", src.display())))?,
            }
            Ok(n)
        };
        if !encrypt {
            let part = Partial::create(self, dst.kind.word())?;
            part.size(size)?;
            if image.is_none() {
                for (off, len) in extents {
                    copy_range(&f, off, (&part.file, &part.path), off, len, p)?;
                }
            } else {
                let vol = Volume::raw(part.file.try_clone().ctx("dup")?)?.with_direct_io();
                pump(&extents, &read, &vol, &part, p)?;
            }
            part.commit(&self.file_for(dst, false), p)?;
            return Ok(fmt);
        }
        let (part, vol) =
            self.new_encrypted_volume(dst.kind, size, sector_size.unwrap_or(4096), key)?;
        pump(&extents, &read, &vol, &part, p)?;
        part.commit(&self.file_for(dst, true), p)?;
        Ok(fmt)
    }

    /// Create a blank disk of `size` bytes (sparse: costs no space until written).
    pub fn create_blank(
        &self,
        dst: &ResPath,
        size: u64,
        encrypt: bool,
        key: Option<&str>,
        sector_size: Option<u32>,
    ) -> Result<()> {
        if size == 0 {
            return Err(err!(InvalidInput, "size must be greater than zero"));
        }
        if size > (1u64 << 60) {
            return Err(err!(InvalidInput, "size {size} is too large"));
        }
        self.check_new(dst)?;
        let _job = self.lock_job(dst)?;
        self.check_new(dst)?;
        if !(encrypt || key.is_some()) {
            let part = Partial::create(self, dst.kind.word())?;
            part.size(size)?;
            return part.commit(&self.file_for(dst, false), &NoProgress);
        }
        let (part, _) =
            self.new_encrypted_volume(dst.kind, size, sector_size.unwrap_or(4096), key)?;
        part.commit(&self.file_for(dst, true), &NoProgress)
    }

    /// `create disks/NAME --from images/X | snapshots/S`.
    pub fn create_from(
        &self,
        dst: &ResPath,
        src: &ResPath,
        opts: &CopyOptions,
        p: &dyn Progress,
    ) -> Result<()> {
        if dst.kind != Kind::Disk {
            return Err(err!(InvalidInput, "create makes disks: use disks/NAME"));
        }
        let info = self.info(src)?;
        match src.kind {
            Kind::Image => {
                if opts.encrypt || opts.key.is_some() || opts.unencrypted {
                    return Err(err!(
                        Refused,
                        "a disk from an image keeps the image's encryption and key; use copy to change them"
                    ));
                }
            }
            Kind::Snapshot => {
                if info.encrypted() {
                    if let Some(k) = &opts.key {
                        let (id, _) = self.resolve_key(k)?;
                        if info.header.as_ref().is_some_and(|h| h.key.key_id != id) {
                            return Err(err!(
                                Refused,
                                "a disk from an encrypted snapshot keeps the snapshot's key; use copy to change it"
                            ));
                        }
                    }
                }
            }
            Kind::Disk => {
                return Err(err!(
                    InvalidInput,
                    "create --from takes images/NAME or snapshots/NAME"
                ));
            }
        }
        self.copy(src, dst, opts, p)
    }

    /// `snapshot disks/D snapshots/S`: same encryption state, CMK and data key. `live`: as
    /// in [`Store::copy_live`].
    pub fn snapshot(
        &self,
        src: &ResPath,
        dst: &ResPath,
        p: &dyn Progress,
        live: Option<&Volume>,
    ) -> Result<()> {
        if src.kind != Kind::Disk || dst.kind != Kind::Snapshot {
            return Err(err!(
                InvalidInput,
                "snapshot takes disks/NAME snapshots/NAME"
            ));
        }
        self.copy_live(src, dst, &CopyOptions::default(), p, live)
    }

    /// Check a copy against the rules (SPEC §3) without doing it: the errors a control-file
    /// write answers with (EINVAL, ENOENT, EEXIST, EPERM, EACCES).
    pub fn check_copy(&self, src: &ResPath, dst: &ResPath, opts: &CopyOptions) -> Result<()> {
        self.plan_copy(src, dst, opts).map(|_| ())
    }

    fn plan_copy(
        &self,
        src: &ResPath,
        dst: &ResPath,
        opts: &CopyOptions,
    ) -> Result<(super::Info, Plan)> {
        if !opts.to_regions.is_empty() {
            return Err(err!(
                InvalidInput,
                "a copy to other regions goes through copy_to_regions"
            ));
        }
        if src == dst {
            return Err(err!(InvalidInput, "source and destination are the same"));
        }
        if opts.unencrypted && (opts.encrypt || opts.key.is_some()) {
            return Err(err!(
                InvalidInput,
                "unencrypted conflicts with encrypt and key="
            ));
        }
        let info = self.info(src)?;
        self.check_new(dst)?;
        let plan = match (&info.header, &opts.key) {
            (None, None) if !opts.encrypt => Plan::Plain,
            (None, k) => Plan::Encrypt(k.clone()),
            (Some(_), _) if opts.unencrypted => {
                return Err(err!(
                    Refused,
                    "encrypted images cannot be copied into unencrypted images ({src} is encrypted)"
                ))
            }
            (Some(h), None) => {
                self.keys
                    .check_usable(&h.key.key_id)
                    .map_err(|e| e.context(src))?;
                Plan::Verbatim
            }
            (Some(h), Some(k)) => {
                self.keys
                    .check_usable(&h.key.key_id)
                    .map_err(|e| e.context(src))?;
                let (id, _) = self.resolve_key(k)?;
                if id == h.key.key_id {
                    Plan::Verbatim
                } else {
                    Plan::Reencrypt(id)
                }
            }
        };
        if let Plan::Encrypt(Some(k)) | Plan::Reencrypt(k) = &plan {
            let (id, _) = self.resolve_key(k)?;
            self.keys.check_usable(&id)?;
        }
        Ok((info, plan))
    }

    /// Copy a resource, per the copy rules (SPEC §3).
    pub fn copy(
        &self,
        src: &ResPath,
        dst: &ResPath,
        opts: &CopyOptions,
        p: &dyn Progress,
    ) -> Result<()> {
        self.copy_live(src, dst, opts, p, None)
    }

    /// [`Store::copy`] of a source that may be written meanwhile through `live` (the mount's
    /// open volume of it): the copy holds the source as it was when the copy began, every
    /// write acknowledged before and none after, each sector whole (see [`Freeze`]).
    pub fn copy_live(
        &self,
        src: &ResPath,
        dst: &ResPath,
        opts: &CopyOptions,
        p: &dyn Progress,
        live: Option<&Volume>,
    ) -> Result<()> {
        let (info, plan) = self.plan_copy(src, dst, opts)?;
        // The source stays in place while it is read: delete waits for this lock.
        let _reading = self.lock_reading_as(src, &info)?;
        let _job = self.lock_job(dst)?;
        self.check_new(dst)?;
        let (_, sf, _) = self.open_file(src, false)?;
        // Frozen before its extents are looked up: a hole written after this reads as the
        // hole it was.
        let frozen = match live {
            Some(v) => Some(self.freeze_source(v, &sf, src, &info)?),
            None => None,
        };
        let source = Source {
            file: &sf,
            freeze: frozen.as_ref().map(|f| &*f.freeze),
        };
        match plan {
            Plan::Plain => {
                let part = Partial::create(self, dst.kind.word())?;
                part.size(info.size)?;
                let ext = payload_extents(&sf, 0, info.size, 4096);
                p.start(ext.iter().map(|e| e.1).sum());
                for (off, len) in ext {
                    source.copy_range(off, (&part.file, &part.path), off, len, p)?;
                }
                part.commit(&self.file_for(dst, false), p)
            }
            Plan::Encrypt(key) => {
                let (part, vol) = self.new_encrypted_volume(
                    dst.kind,
                    info.size,
                    opts.sector_size.unwrap_or(4096),
                    key.as_deref(),
                )?;
                let ext = payload_extents(&sf, 0, info.size, 4096);
                p.start(ext.iter().map(|e| e.1).sum());
                let src_vol = Volume::raw(sf.try_clone().ctx("dup")?)?.with_direct_io();
                let saved = source.saved_volume(Volume::raw)?;
                let read = |b: &mut [u8], off| {
                    source
                        .read(0, &src_vol, saved.as_ref(), b, off)
                        .map_err(|e| e.context(src))
                };
                pump(&ext, &read, &vol, &part, p)?;
                part.commit(&self.file_for(dst, true), p)
            }
            Plan::Verbatim => {
                let sh = info
                    .header
                    .clone()
                    .ok_or_else(|| err!(Corrupt, "no header"))?;
                let dek = self.unwrap_header(&sh, src)?;
                let key_id = sh.key.key_id.clone();
                let (part, h) = self.new_encrypted(
                    dst.kind,
                    sh.size,
                    sh.sector_size,
                    sh.key.cipher,
                    &dek,
                    Some(&key_id),
                )?;
                let plen = round_up(sh.size, u64::from(sh.sector_size));
                let ext = payload_extents(&sf, sh.data_offset, plen, u64::from(sh.sector_size));
                p.start(ext.iter().map(|e| e.1).sum());
                for (off, len) in ext {
                    source.copy_range(
                        sh.data_offset + off,
                        (&part.file, &part.path),
                        h.data_offset + off,
                        len,
                        p,
                    )?;
                }
                part.commit(&self.file_for(dst, true), p)
            }
            Plan::Reencrypt(key_id) => {
                let src_vol = self
                    .open_encrypted(sf.try_clone().ctx("dup")?, src, false)?
                    .with_direct_io();
                let saved = source.saved_volume(|f| self.open_encrypted(f, src, false))?;
                let sh = src_vol.header().ok_or_else(|| err!(Corrupt, "no header"))?;
                let (part, vol) = self.new_encrypted_volume(
                    dst.kind,
                    sh.size,
                    opts.sector_size.unwrap_or(sh.sector_size),
                    Some(&key_id),
                )?;
                let plen = round_up(sh.size, u64::from(sh.sector_size));
                let ext = payload_extents(
                    src_vol.file(),
                    sh.data_offset,
                    plen,
                    u64::from(sh.sector_size).max(4096),
                );
                let ext: Vec<_> = ext
                    .into_iter()
                    .map(|(o, l)| (o, l.min(sh.size.saturating_sub(o))))
                    .filter(|e| e.1 > 0)
                    .collect();
                p.start(ext.iter().map(|e| e.1).sum());
                let read = |b: &mut [u8], off| {
                    source
                        .read(sh.data_offset, &src_vol, saved.as_ref(), b, off)
                        .map_err(|e| e.context(src))
                };
                pump(&ext, &read, &vol, &part, p)?;
                part.commit(&self.file_for(dst, true), p)
            }
        }
    }

    /// Freeze the source file `sf` of a copy, written meanwhile through `live`.
    pub(super) fn freeze_source<'v>(
        &self,
        live: &'v Volume,
        sf: &File,
        src: &ResPath,
        info: &super::Info,
    ) -> Result<super::backing::Frozen<'v>> {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (
            live.file().metadata().ctx("stat")?,
            sf.metadata().ctx("stat")?,
        );
        if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
            return Err(err!(Busy, "{src} changed as this started: run it again"));
        }
        let side = Partial::create(self, "snapshot")?;
        // The header too, so the saved chunks read through a volume of their own.
        let head = info.header.as_ref().map_or(0, |h| h.data_offset);
        copy_range(sf, 0, (&side.file, &side.path), 0, head, &NoProgress)?;
        let f = Freeze::new(
            sf.try_clone().ctx("dup")?,
            side.file.try_clone().ctx("dup")?,
        )?;
        // An unnamed file lives on through the freeze's descriptor; a named one is
        // removed now (the descriptor keeps it until the copy ends).
        drop(side);
        Ok(live.freeze(f))
    }

    /// Check a rekey against the rules without doing it; returns the new key's id and spec.
    pub fn check_rekey(
        &self,
        r: &ResPath,
        key: &str,
        mode: RekeyMode,
    ) -> Result<(super::Info, String, KeySpec)> {
        let info = self.info(r)?;
        let Some(h) = info.header.as_ref() else {
            return Err(err!(
                Refused,
                "{r} is not encrypted; use copy with encrypt to make an encrypted copy"
            ));
        };
        let (new_id, spec) = self.resolve_key(key)?;
        if mode == RekeyMode::Rewrap && spec.sector_cipher() != h.key.cipher {
            return Err(err!(
                Refused,
                "{r} uses {} but key {new_id} is {}: changing the cipher needs re-encryption (mode=reencrypt / --reencrypt)",
                h.key.cipher.name(),
                spec.name()
            ));
        }
        let resuming = h
            .reencrypt
            .as_ref()
            .is_some_and(|x| x.next.key_id == new_id);
        if let Some(x) = &h.reencrypt {
            if !resuming || mode == RekeyMode::Rewrap {
                return Err(err!(
                    Busy,
                    "{r} is being re-encrypted to key {}; resume that first",
                    x.next.key_id
                ));
            }
        }
        self.keys
            .check_usable(&h.key.key_id)
            .map_err(|e| e.context(r))?;
        self.keys.check_usable(&new_id)?;
        Ok((info, new_id, spec))
    }

    /// Change a resource's CMK: rewrap (constant time) or re-encrypt in place (crash-safe).
    pub fn rekey(&self, r: &ResPath, key: &str, mode: RekeyMode, p: &dyn Progress) -> Result<()> {
        let (_, new_id, spec) = self.check_rekey(r, key, mode)?;
        let _job = self.lock_job(r)?;
        match mode {
            RekeyMode::Rewrap => self.rewrap(r, &new_id),
            RekeyMode::Reencrypt => {
                let _excl = self.lock_alone(r).map_err(|e| match e.kind {
                    crate::error::ErrorKind::Busy => err!(Busy, "{r} is open through a mount: ask the mount (.control/rekey) to re-encrypt it"),
                    _ => e,
                })?;
                let (_, file, _) = self.open_file(r, true)?;
                let vol = self.open_encrypted(file, r, true)?;
                self.reencrypt(&vol, r, &new_id, spec, p, &|_| Ok(()))
            }
        }
    }

    fn rewrap(&self, r: &ResPath, new_id: &str) -> Result<()> {
        let (_, file, h) = self.open_file(r, true)?;
        let mut h = h.ok_or_else(|| err!(Refused, "{r} is not encrypted"))?;
        let dek = self.unwrap_header(&h, r)?;
        let _hold = self.hold_key(new_id)?;
        let slot = self
            .keys
            .update(|k| wrap_for(k, Some(new_id), &h, h.key.cipher, &dek))?;
        h.key = slot;
        format::write_header(&file, &mut h)
    }

    /// Run (or resume) an in-place re-encryption of an open volume to a new data key under
    /// CMK `new_id`. One code path for the CLI and the mount's control files.
    pub fn reencrypt(
        &self,
        vol: &Volume,
        r: &ResPath,
        new_id: &str,
        spec: KeySpec,
        p: &dyn Progress,
        crash_hook: &dyn Fn(&str) -> Result<()>,
    ) -> Result<()> {
        let h = vol
            .header()
            .ok_or_else(|| err!(Refused, "{r} is not encrypted"))?;
        match &h.reencrypt {
            Some(x) if x.next.key_id != new_id => {
                return Err(err!(
                    Busy,
                    "{r} is being re-encrypted to key {}; resume that first",
                    x.next.key_id
                ))
            }
            Some(_) => {} // resume
            None => {
                let _hold = self.hold_key(new_id)?;
                let cipher = spec.sector_cipher();
                let dek = crypto::random_secret(cipher.key_len());
                let slot = self
                    .keys
                    .update(|k| wrap_for(k, Some(new_id), &h, cipher, &dek))?;
                vol.begin_reencrypt(slot, &dek)?;
            }
        }
        let total = h.sectors() * u64::from(h.sector_size);
        p.start(total);
        let mut last = 0;
        while vol.reencrypt_step(crash_hook)? {
            if let Some((cp, _)) = vol.reencrypt_progress() {
                let now = cp * u64::from(h.sector_size);
                p.add(now.saturating_sub(last));
                last = now;
            }
            if p.cancelled() {
                return Err(err!(Io, "cancelled; the re-encryption can be resumed"));
            }
        }
        p.add(total.saturating_sub(last));
        Ok(())
    }

    /// Export an unencrypted resource to a raw file (mode 0600). The file appears only
    /// when whole: it is written unnamed (`O_TMPFILE`) where the destination's filesystem
    /// allows, so an interrupted export leaves nothing; elsewhere under a temporary name,
    /// removed on failure.
    pub fn export(&self, r: &ResPath, dest: &Path, p: &dyn Progress) -> Result<()> {
        self.export_as(r, dest, imgfmt::Format::Raw, p)
    }

    /// Export an unencrypted resource as `fmt` (raw, or qcow2 through `qemu-img convert`).
    pub fn export_as(
        &self,
        r: &ResPath,
        dest: &Path,
        fmt: imgfmt::Format,
        p: &dyn Progress,
    ) -> Result<()> {
        let info = self.info(r)?;
        if info.encrypted() {
            return Err(err!(
                Refused,
                "{r} is encrypted: encrypted resources cannot be exported"
            ));
        }
        if let Some(out) = sys::passed_file(dest, true)? {
            // A file the caller opened and passed (`encimg --system export`): written in place.
            if fmt == imgfmt::Format::Qcow2 {
                return Err(err!(
                    InvalidInput,
                    "a qcow2 export needs a path, not a descriptor"
                ));
            }
            let _reading = self.lock_reading_as(r, &info)?;
            let (_, sf, _) = self.open_file(r, false)?;
            out.set_len(info.size).ctx("sizing")?;
            let ext = payload_extents(&sf, 0, info.size, 4096);
            p.start(ext.iter().map(|e| e.1).sum());
            for (off, len) in ext {
                copy_range(&sf, off, (&out, dest), off, len, p)?;
            }
            return out.sync_all().ctx("syncing");
        }
        if sys::entry_exists(dest) {
            return Err(err!(AlreadyExists, "{} already exists", dest.display()));
        }
        let dir = dest
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(err!(NotDir, "{} is not a directory", dir.display())),
            Err(e) => return Err(crate::error::Error::from(e).context(dir.display())),
        }
        if dest.file_name().is_none_or(|n| n.len() > 255) {
            return Err(err!(
                InvalidInput,
                "{} is not a usable file name",
                dest.display()
            ));
        }
        let _reading = self.lock_reading_as(r, &info)?;
        if fmt == imgfmt::Format::Qcow2 {
            return imgfmt::export_qcow2(&info.file, dest, dir)
                .map_err(|e| e.context(format_args!("exporting to {}", dest.display())));
        }
        let (_, sf, _) = self.open_file(r, false)?;
        let (out, named) = match sys::create_unnamed(dir) {
            Ok(f) => (f, None),
            Err(e)
                if e.os_errno.is_some_and(|n| {
                    matches!(n, libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                }) =>
            {
                let tmp = sys::temp_path(dir, ".encimg-export");
                (sys::create_private(&tmp)?, Some(tmp))
            }
            Err(e) => return Err(e),
        };
        let result = (|| {
            out.set_len(info.size).ctx("sizing")?;
            let ext = payload_extents(&sf, 0, info.size, 4096);
            p.start(ext.iter().map(|e| e.1).sum());
            for (off, len) in ext {
                copy_range(&sf, off, (&out, dest), off, len, p)?;
            }
            out.sync_all().ctx("syncing")?;
            match &named {
                Some(tmp) => rename_noreplace(tmp, dest),
                None => sys::link_unnamed(&out, dest),
            }
        })();
        if result.is_err() {
            if let Some(tmp) = &named {
                let _ = std::fs::remove_file(tmp);
            }
        }
        result.map_err(|e| e.context(format_args!("exporting to {}", dest.display())))
    }

    /// Delete a resource; refused while open through a mount or used by a job.
    pub fn delete(&self, r: &ResPath) -> Result<()> {
        let (path, _) = self.find(r)?;
        let _job = self.lock_job(r)?;
        let _open = self.lock_alone(r)?;
        std::fs::remove_file(&path).ctx(path.display())?;
        sys::sync_dir(path.parent().unwrap_or(Path::new(".")))
    }

    /// The data key of an encrypted resource, for interop and recovery.
    pub fn dek(&self, r: &ResPath) -> Result<Zeroizing<Vec<u8>>> {
        let info = self.info(r)?;
        let h = info
            .header
            .ok_or_else(|| err!(Refused, "{r} is not encrypted: it has no data key"))?;
        self.unwrap_header(&h, r)
    }

    /// Schedule a CMK's deletion; refused while resources use it unless `force`.
    pub fn schedule_key_deletion(&self, key: &str, days: u32, force: bool) -> Result<u64> {
        let (id, _) = self.resolve_key(key)?;
        // No new resource under the key until this is decided; refused while one is made.
        let _alone = if force {
            None
        } else {
            Some(self.hold_key_alone(&id)?)
        };
        let usage = self.usage(&id)?;
        if !force {
            if !usage.users.is_empty() {
                let list: Vec<String> = usage.users.iter().map(|r| r.to_string()).collect();
                return Err(err!(
                    Refused,
                    "key {id} is in use by {} (pass --force to schedule its deletion anyway)",
                    list.join(", ")
                ));
            }
            if !usage.unreadable.is_empty() {
                let list: Vec<String> = usage.unreadable.iter().map(|r| r.to_string()).collect();
                return Err(err!(
                    Refused,
                    "cannot tell whether damaged {} use key {id}: repair or delete them first, or pass --force",
                    list.join(", ")
                ));
            }
        }
        self.keys.update(|k| k.schedule_deletion(&id, days))
    }
}

/// Open a file to import: a regular file or a block device (its size), never blocking on a
/// FIFO; anything else, or an empty source, is refused naming what it is.
fn open_source(src: &Path) -> Result<(File, u64)> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = match sys::passed_file(src, false)? {
        Some(f) => f,
        None => OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(src)
            .ctx(src.display())?,
    };
    let ft = f.metadata().ctx(src.display())?.file_type();
    let size = if ft.is_file() {
        f.metadata().ctx(src.display())?.len()
    } else if ft.is_block_device() {
        block_device_size(&f).ctx(src.display())?
    } else {
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(err!(
            InvalidInput,
            "{} is {what}: import takes a regular file or a block device",
            src.display()
        ));
    };
    if size == 0 {
        return Err(err!(
            InvalidInput,
            "{} is empty: there is nothing to import (a disk needs a size; see create --size)",
            src.display()
        ));
    }
    // SAFETY: fcntl on a descriptor we own; reads of the data should wait for the device.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok((f, size))
}

/// Size of a block device.
fn block_device_size(f: &File) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the ioctl writes one u64 into `size`, which lives across the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

fn lock_image(m: &std::sync::Mutex<imgfmt::Image>) -> std::sync::MutexGuard<'_, imgfmt::Image> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
