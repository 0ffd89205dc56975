//! The resource store: a directory holding the key store and the images, disks and
//! snapshots, each an encrypted `.eimg` file (header + XTS payload) or a plain `.raw` file.
//!
//! ```text
//! STORE/keys/{keystore.json,root.key,.lock}
//! STORE/{images,disks,snapshots}/NAME.{eimg,raw}
//! STORE/locks/KIND.NAME.{open,job}     advisory locks: open through a mount; job on it
//! STORE/tmp/                           targets being written, renamed into place when whole
//! ```

mod ahead;
mod backing;
mod fanout;
pub mod freeze;
pub mod imgfmt;
mod ops;
mod remote;
mod volume;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

pub use backing::{AlignedBuf, POOL_KEEP};
pub use fanout::{combine, Outcome};
pub use ops::{CopyOptions, NoProgress, Progress, RekeyMode};
pub use volume::Volume;

use crate::err;
use crate::error::{IoContext, Result};
use crate::format::{self, Header, Kind};
use crate::kms::KeyStore;
use crate::sys::{self, FileLock};

/// A resource address: `KIND/NAME`, as in the mount.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResPath {
    pub kind: Kind,
    pub name: String,
}

impl ResPath {
    /// Parse `images/a`, `disks/d` or `snapshots/s`.
    pub fn parse(s: &str) -> Result<ResPath> {
        let (k, n) = s.split_once('/').ok_or_else(|| {
            err!(
                InvalidInput,
                "'{s}' is not a resource path (use images/NAME, disks/NAME or snapshots/NAME)"
            )
        })?;
        let kind = Kind::from_dir(k).ok_or_else(|| {
            err!(
                InvalidInput,
                "unknown resource kind '{k}' (use images, disks or snapshots)"
            )
        })?;
        validate_name(n)?;
        Ok(ResPath {
            kind,
            name: n.to_string(),
        })
    }
}

impl std::fmt::Display for ResPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind.dir(), self.name)
    }
}

/// Names match `[A-Za-z0-9._-]{1,128}` and are not `.` or `..`.
pub fn validate_name(n: &str) -> Result<()> {
    let ok = !n.is_empty()
        && n.len() <= 128
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && n != "."
        && n != "..";
    if ok {
        Ok(())
    } else {
        Err(err!(
            InvalidInput,
            "invalid resource name '{n}' (use 1-128 of A-Z a-z 0-9 . _ -)"
        ))
    }
}

/// What one resource is.
#[derive(Clone, Debug)]
pub struct Info {
    pub path: ResPath,
    /// The region holding it.
    pub region: String,
    pub file: PathBuf,
    pub size: u64,
    /// The header, for encrypted resources.
    pub header: Option<Header>,
    /// Bytes of disk the backing file uses.
    pub allocated: u64,
    /// Of those, the bytes of the payload (not the header area).
    pub payload_allocated: u64,
}

/// What depends on a key (see [`Store::usage`]).
#[derive(Debug, Default)]
pub struct Usage {
    /// Resources under the key.
    pub users: Vec<ResPath>,
    /// Damaged resources whose header cannot be read: they may be under it.
    pub unreadable: Vec<ResPath>,
}

/// Bytes `file` takes on disk beyond its first `base` bytes (an encrypted file's header
/// area): what its payload's ciphertext occupies.
pub fn payload_bytes(file: &File, base: u64) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let all = file.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
    payload_bytes_of(file, base, all)
}

/// [`payload_bytes`] of a file of which `all` bytes are allocated.
fn payload_bytes_of(file: &File, base: u64, all: u64) -> u64 {
    let head: u64 = if base == 0 {
        0
    } else {
        sys::data_extents(file, base)
            .iter()
            .map(|&(o, l)| l.min(base.saturating_sub(o)))
            .sum()
    };
    all.saturating_sub(head)
}

/// One entry of a listing: the resource's description, or why it cannot be described.
pub type Listed = (ResPath, Result<Info>);

/// A listing entry as JSON: the resource's `info`, or its path and `damaged` reason.
pub fn listed_json((r, info): &Listed, region: &str) -> serde_json::Value {
    match info {
        Ok(i) => i.to_json(),
        Err(e) => serde_json::json!({
            "path": r.to_string(),
            "region": region,
            "kind": r.kind.word(),
            "name": r.name,
            "damaged": e.message,
        }),
    }
}

impl Info {
    pub fn encrypted(&self) -> bool {
        self.header.is_some()
    }

    /// Bytes the payload takes on disk (see [`payload_bytes`]).
    pub fn payload_bytes(&self) -> u64 {
        self.payload_allocated
    }

    pub fn to_json(&self) -> serde_json::Value {
        let h = self.header.as_ref();
        serde_json::json!({
            "path": self.path.to_string(),
            "region": self.region,
            "kind": self.path.kind.word(),
            "name": self.path.name,
            "size": self.size,
            "encrypted": self.encrypted(),
            "cipher": h.map(|h| h.key.cipher.name()),
            "key_id": h.map(|h| h.key.key_id.clone()),
            "key_version": h.map(|h| h.key.key_version),
            "sector_size": h.map(|h| h.sector_size).unwrap_or(512),
            "data_offset": h.map(|h| h.data_offset).unwrap_or(0),
            "uuid": h.map(|h| h.uuid_string()),
            "created": h.map(|h| sys::rfc3339(h.created)),
            "file": self.file.display().to_string(),
            "allocated": self.allocated,
            "damaged": serde_json::Value::Null,
            "reencrypt": h.and_then(|h| h.reencrypt.as_ref().map(|r| (h, r))).map(|(h, r)| serde_json::json!({
                "checkpoint_sector": r.checkpoint,
                "sectors": h.sectors(),
                "key_id": r.next.key_id,
                "cipher": r.next.cipher.name(),
            })),
        })
    }
}

/// How long `delete` and an offline re-encryption wait for a mount to see a file's last close.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The resources and keys of one region: a directory laid out as below (the store directory
/// itself for region `local`), and its key store. See `crate::region` for how a region name
/// becomes one.
#[derive(Clone, Debug)]
pub struct Store {
    /// This region's directory.
    pub root: PathBuf,
    /// Where the resources' locks are (`root/locks`): a mount's view of an S3 region keeps
    /// its local copies apart, in `root/cache`, but locks with the CLI in one place, so
    /// each sees what the other has open or is changing. (The CLI's own copies of an S3
    /// region's resources lock apart, see [`Store::with_private_locks`].)
    locks: PathBuf,
    /// Where the keys' locks are (see [`Store::hold_key`]): `root/locks`, for every view.
    key_locks: PathBuf,
    /// The store's home: the directory of region `local`, which lists the other regions.
    pub home: PathBuf,
    pub region: String,
    pub keys: KeyStore,
    /// The object store holding the region's resources (an S3 region); None: `root`.
    pub remote: Option<std::sync::Arc<crate::objstore::ObjStore>>,
    /// An S3 region's pointers just read and windows opened (a mount's).
    views: std::sync::Arc<remote::Views>,
}

/// Check a header against where it was found and the file holding it: its kind is its
/// directory's, and the file holds the whole payload (sparse files keep their length, so a
/// shorter file lost data).
pub fn check_header(r: &ResPath, f: &File, h: &Header) -> Result<()> {
    check_header_len(r, f.metadata().ctx(r)?.len(), h)
}

/// [`check_header`] of a file `len` bytes long.
fn check_header_len(r: &ResPath, len: u64, h: &Header) -> Result<()> {
    if h.kind != r.kind {
        return Err(err!(
            Corrupt,
            "{r}: the header says this is a {} but it is stored under {}/: the entry is damaged",
            h.kind.word(),
            r.kind.dir()
        ));
    }
    let want = h.file_len();
    if len < want {
        return Err(err!(
            Corrupt,
            "{r}: the payload is truncated ({len} bytes of {want}): data is missing"
        ));
    }
    Ok(())
}

/// The default store directory: `$ENCIMG_STORE`, else `$XDG_DATA_HOME/encimg`, else
/// `~/.local/share/encimg`.
pub fn default_store_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("encimg");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".local/share/encimg")
}

impl Store {
    /// A handle on the store at `root`, as its own home (nothing is read yet).
    pub fn at(root: &Path, region: &str) -> Store {
        Store::in_region(root, root, region)
    }

    /// A handle on region `region`, kept in `root`, of the store whose home is `home`.
    pub fn in_region(home: &Path, root: &Path, region: &str) -> Store {
        Store {
            root: root.to_path_buf(),
            locks: root.join("locks"),
            key_locks: root.join("locks"),
            home: home.to_path_buf(),
            region: region.to_string(),
            keys: KeyStore::new(root, region),
            remote: None,
            views: Default::default(),
        }
    }

    /// The mount's view of an object-storage region: the same keys and objects, with the
    /// local copies it fetches kept apart from the CLI's, in `root/cache`.
    pub fn mount_cache(&self, dir: Option<&Path>) -> Store {
        let mut s = self.clone();
        s.root = dir.map_or_else(|| self.root.join("cache"), Path::to_path_buf);
        s
    }

    /// The CLI's view of an S3 region's local directory, where it works on copies of its
    /// own: their locks are apart from those of the resources themselves, which the CLI
    /// takes (around a whole command) against a mount.
    pub fn with_private_locks(mut self) -> Store {
        self.locks = self.locks.join("cli");
        self
    }

    /// The same store with its resources in an object store, and its key store there too.
    /// None makes a view of the local copies only: the key store stays where it is.
    pub fn with_remote(mut self, r: Option<std::sync::Arc<crate::objstore::ObjStore>>) -> Store {
        if let Some(os) = &r {
            self.keys = self
                .keys
                .with_objects(Some(std::sync::Arc::new(os.apart())));
        }
        self.remote = r;
        self
    }

    /// The same store with its CMKs held by an external key service.
    pub fn with_key_service(
        mut self,
        s: Option<std::sync::Arc<crate::kms::service::External>>,
    ) -> Store {
        self.keys = self.keys.with_service(s);
        self
    }

    /// The store of another region of the same home.
    pub fn region_store(&self, name: &str) -> Result<Store> {
        crate::region::Regions::new(&self.home).store(name)
    }

    /// The same store with absolute paths (a daemon changes directory to `/`).
    pub fn absolute(&self) -> Result<Store> {
        let abs = |p: &Path| {
            std::path::absolute(p).map_err(|e| crate::error::Error::from(e).context(p.display()))
        };
        let mut s = self.clone();
        s.home = abs(&self.home)?;
        s.root = abs(&self.root)?;
        s.locks = abs(&self.locks)?;
        s.key_locks = abs(&self.key_locks)?;
        s.keys = self.keys.absolute()?;
        Ok(s)
    }

    /// Create the store's directories and key store if missing; true if anything was created.
    pub fn init(&self) -> Result<bool> {
        sys::private_dir(&self.root)?;
        for d in ["images", "disks", "snapshots", "locks", "tmp", "jobs"] {
            sys::private_dir(&self.root.join(d))?;
        }
        self.keys.init()
    }

    /// Refuse if the store has not been initialized, or cannot be read by this user, or its
    /// directories are not directories. Warns (once) if group or others can enter it.
    pub fn check(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let meta = match std::fs::metadata(&self.root) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(err!(
                    NotFound,
                    "no store at {} (run `encimg init` or pass --store)",
                    self.root.display()
                ))
            }
            Err(e) => {
                return Err(
                    crate::error::Error::from(e).context(format!("store {}", self.root.display()))
                )
            }
        };
        if !meta.is_dir() {
            return Err(err!(
                InvalidInput,
                "{} is not a store directory",
                self.root.display()
            ));
        }
        match std::fs::symlink_metadata(self.keys.made_marker()) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(err!(
                    Denied,
                    "permission denied: store {} belongs to uid {} (mode {:04o})",
                    self.root.display(),
                    meta.uid(),
                    meta.mode() & 0o7777
                ))
            }
            Err(_) => {
                return Err(err!(
                    NotFound,
                    "no store at {} (run `encimg init` or pass --store)",
                    self.root.display()
                ))
            }
        }
        for d in [
            "keys",
            "images",
            "disks",
            "snapshots",
            "locks",
            "tmp",
            "jobs",
        ] {
            let p = self.root.join(d);
            if let Ok(m) = std::fs::symlink_metadata(&p) {
                if !m.is_dir() {
                    return Err(err!(
                        Corrupt,
                        "{} is not a directory (a link or a file stands in its place): the store is damaged",
                        p.display()
                    ));
                }
            }
        }
        sys::adopt_store_owner(&self.root);
        if meta.mode() & 0o077 != 0 {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                // Not eprintln!: this may run in a daemon whose log cannot be written.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "encimg: warning: store {} is accessible by group or others (mode {:04o}); run chmod 700 {}",
                    self.root.display(),
                    meta.mode() & 0o7777,
                    self.root.display()
                );
            });
        }
        Ok(())
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub(super) fn file_for(&self, r: &ResPath, encrypted: bool) -> PathBuf {
        let ext = if encrypted { "eimg" } else { "raw" };
        self.root
            .join(r.kind.dir())
            .join(format!("{}.{ext}", r.name))
    }

    /// The backing file of a resource and whether it is encrypted, if it exists. An entry
    /// that is not a regular file counts (opening it reports the damage).
    pub fn locate(&self, r: &ResPath) -> Option<(PathBuf, bool)> {
        for enc in [true, false] {
            let p = self.file_for(r, enc);
            if sys::entry_exists(&p) {
                return Some((p, enc));
            }
        }
        None
    }

    /// Like `locate`, but a missing resource is a NotFound error.
    pub fn find(&self, r: &ResPath) -> Result<(PathBuf, bool)> {
        self.locate(r)
            .ok_or_else(|| err!(NotFound, "no resource {r}"))
    }

    pub fn exists(&self, r: &ResPath) -> bool {
        self.locate(r).is_some()
    }

    /// Lock file for "open through a mount" (shared) vs "delete / exclusive use" (exclusive).
    pub fn open_lock_path(&self, r: &ResPath) -> PathBuf {
        self.locks.join(format!("{}.{}.open", r.kind.dir(), r.name))
    }

    /// Lock file held by a job writing the resource (copy target, rekey).
    pub fn job_lock_path(&self, r: &ResPath) -> PathBuf {
        self.locks.join(format!("{}.{}.job", r.kind.dir(), r.name))
    }

    /// Lock file held (shared) on CMK `key_id` by jobs making a resource under it, taken
    /// (exclusive) by `key schedule-deletion`; see [`Store::hold_key`]. Named by a hash:
    /// an external key service's ids may hold any character.
    fn key_use_path(&self, key_id: &str) -> PathBuf {
        let h = sys::fnv1a64(key_id.as_bytes());
        self.key_locks.join(format!("key-{h:016x}.use"))
    }

    /// Hold CMK `key_id` from before a data key is wrapped under it until the resource
    /// carrying that wrap is in place (or abandoned). `usage` sees only resources in place,
    /// so `key schedule-deletion` passed while a copy under the key was still being written,
    /// and the copy then landed under a key pending deletion. Waits out a deletion being
    /// decided (the wrap then meets the key's new state).
    pub fn hold_key(&self, key_id: &str) -> Result<FileLock> {
        sys::private_dir(&self.key_locks)?;
        FileLock::shared_within(&self.key_use_path(key_id), sys::LOCK_WAIT)
    }

    /// Hold off new resources under CMK `key_id` while its deletion is decided, or answer
    /// busy while a job is making one.
    pub fn hold_key_alone(&self, key_id: &str) -> Result<FileLock> {
        sys::private_dir(&self.key_locks)?;
        FileLock::try_exclusive(&self.key_use_path(key_id))?.ok_or_else(|| {
            err!(
                Busy,
                "key {key_id} is in use by a job making a resource under it; try again when it ends"
            )
        })
    }

    /// `r` for this process alone (delete, offline re-encryption), or `Busy` while a mount
    /// has it open or a copy reads it. Waits a moment first: the kernel tells the mount of a
    /// file's last close after `close(2)` has returned, so `cmp disk …; encimg delete disk`
    /// found it still open now and then.
    pub fn lock_alone(&self, r: &ResPath) -> Result<FileLock> {
        FileLock::exclusive_within(&self.open_lock_path(r), CLOSE_GRACE).map_err(|e| {
            if e.kind == crate::error::ErrorKind::Busy {
                err!(Busy, "{r} is open through a mount")
            } else {
                e
            }
        })
    }

    /// Take the job lock on `r`, or refuse if another job holds it.
    pub fn lock_job(&self, r: &ResPath) -> Result<FileLock> {
        FileLock::try_exclusive(&self.job_lock_path(r))?
            .ok_or_else(|| err!(Busy, "{r} is in use by another job"))
    }

    /// Hold `r` in place and under its keys while it is read (a copy's source):
    /// - shares the lock the mount takes for open resources, so `delete` and an offline
    ///   re-encryption (which take it exclusively) answer busy meanwhile;
    /// - shares the job lock, so a job that changes `r` in place (a rekey, above all the
    ///   mount's online re-encryption, which holds only that lock) answers busy meanwhile,
    ///   and this answers busy while one runs. A copy read while its source's sectors
    ///   moved to a new data key came out garbage past the moving point, and said done.
    pub fn lock_reading(&self, r: &ResPath) -> Result<(FileLock, FileLock)> {
        let open = FileLock::try_shared(&self.open_lock_path(r))?
            .ok_or_else(|| err!(Busy, "{r} is being deleted or re-encrypted"))?;
        let job = FileLock::try_shared(&self.job_lock_path(r))?
            .ok_or_else(|| err!(Busy, "{r} is being rekeyed, re-encrypted or deleted"))?;
        Ok((open, job))
    }

    /// Hold `r` for reading ([`Store::lock_reading`]) as `info` found it. What was decided
    /// from `info` before the locks (a copy's plan, the data key its header wraps) holds
    /// only if nothing changed it in between: a rekey or re-encryption that ended there, or
    /// a delete and a new resource by the name. Then this answers busy, rather than a copy
    /// of new ciphertext under the old header's key.
    pub fn lock_reading_as(&self, r: &ResPath, info: &Info) -> Result<(FileLock, FileLock)> {
        let held = self.lock_reading(r)?;
        let now = self.info(r)?;
        let id = |i: &Info| (i.size, i.header.as_ref().map(|h| (h.uuid, h.seq)));
        if id(&now) != id(info) {
            return Err(err!(
                Busy,
                "{r} changed as this started (rekeyed, or deleted and made again): run it again"
            ));
        }
        Ok(held)
    }

    /// Every resource of `kind` (or of every kind), sorted.
    pub fn list(&self, kind: Option<Kind>) -> Result<Vec<ResPath>> {
        self.check()?;
        let mut out = Vec::new();
        for k in Kind::ALL {
            if kind.is_some_and(|want| want != k) {
                continue;
            }
            let dir = self.root.join(k.dir());
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(crate::error::Error::from(e).context(dir.display())),
            };
            for ent in rd.flatten() {
                let name = ent.file_name();
                let Some(name) = name.to_str() else { continue };
                let Some(stem) = name
                    .strip_suffix(".eimg")
                    .or_else(|| name.strip_suffix(".raw"))
                else {
                    continue;
                };
                if validate_name(stem).is_ok() {
                    out.push(ResPath {
                        kind: k,
                        name: stem.to_string(),
                    });
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Every resource of `kind` (or of every kind), each with its description or the reason
    /// it cannot be described (damage stays with its entry).
    pub fn list_infos(&self, kind: Option<Kind>) -> Result<Vec<Listed>> {
        let names = self.list(kind)?;
        // Each description is a few system calls on its own file: spread over the cores.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        let per = names.len().div_ceil(threads).max(256);
        Ok(std::thread::scope(|s| {
            let parts: Vec<_> = names
                .chunks(per)
                .map(|part| {
                    let h = s.spawn(move || part.iter().map(|r| self.info(r)).collect());
                    (part, h)
                })
                .collect();
            parts
                .into_iter()
                .flat_map(|(part, h)| {
                    let infos: Vec<Result<Info>> = h.join().unwrap_or_else(|_| {
                        part.iter()
                            .map(|_| Err(err!(Io, "listing failed")))
                            .collect()
                    });
                    part.iter().cloned().zip(infos)
                })
                .collect()
        }))
    }

    /// Describe a resource (reads the header; needs no key). Anything that makes the
    /// resource unreadable is a `Corrupt` error naming it: an entry that is not a regular
    /// file, both header copies damaged, a header of another kind, a payload shorter than
    /// the header says.
    pub fn info(&self, r: &ResPath) -> Result<Info> {
        let (file, f, meta, h) = self.open_file_meta(r, false)?;
        let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
        let payload_allocated =
            payload_bytes_of(&f, h.as_ref().map_or(0, |h| h.data_offset), allocated);
        Ok(Info {
            path: r.clone(),
            region: self.region.clone(),
            file,
            size: h.as_ref().map_or(meta.len(), |h| h.size),
            header: h,
            allocated,
            payload_allocated,
        })
    }

    /// Open a resource's backing file (no links, no FIFOs) and check it: the header of an
    /// encrypted file is readable, of the right kind, and its payload is whole.
    pub(crate) fn open_file(
        &self,
        r: &ResPath,
        writable: bool,
    ) -> Result<(PathBuf, File, Option<Header>)> {
        self.open_file_meta(r, writable)
            .map(|(path, f, _, h)| (path, f, h))
    }

    /// [`open_file`](Self::open_file), with the file's metadata from its check.
    fn open_file_meta(
        &self,
        r: &ResPath,
        writable: bool,
    ) -> Result<(PathBuf, File, std::fs::Metadata, Option<Header>)> {
        // The encrypted name first, opened at once (a missing one costs one failed open).
        let tried = self.file_for(r, true);
        let (path, enc, (f, meta)) = match sys::open_regular_meta(&tried, writable) {
            Ok(fm) => (tried, true, fm),
            Err(e) if e.kind == crate::error::ErrorKind::NotFound => {
                let (path, enc) = self.find(r)?;
                let fm = sys::open_regular_meta(&path, writable).map_err(|e| e.context(r))?;
                (path, enc, fm)
            }
            Err(e) => return Err(e.context(r)),
        };
        if !enc {
            return Ok((path, f, meta, None));
        }
        let (h, _) = format::read_header_of(&f, meta.len()).map_err(|e| e.context(r))?;
        check_header_len(r, meta.len(), &h)?;
        Ok((path, f, meta, Some(h)))
    }

    /// Open a resource for plaintext I/O: unwraps its data key (refused unless the CMK is
    /// Enabled) and recovers an interrupted re-encryption's journal when writable.
    pub fn open_volume(&self, r: &ResPath, writable: bool) -> Result<Volume> {
        let (_, file, h) = self.open_file(r, writable)?;
        if h.is_none() {
            return Volume::raw(file);
        }
        self.open_encrypted(file, r, writable)
    }

    /// Open an encrypted file (not necessarily in the tree yet, e.g. a copy target).
    pub fn open_encrypted(&self, file: File, what: &ResPath, writable: bool) -> Result<Volume> {
        let (mut h, damaged) = format::read_header(&file).map_err(|e| e.context(what))?;
        // Rewrite both copies so the damaged one is healed; only while no header writer can
        // run (a rekey or a re-encryption holds the job lock): a copy being written right now
        // reads as torn, and healing it from the other, older copy undid that write (a rewrap
        // silently reverted, the resource left under the old CMK). Read again under the lock.
        if writable && damaged {
            if let Some(_job) = FileLock::try_exclusive(&self.job_lock_path(what))? {
                let (again, still) = format::read_header(&file).map_err(|e| e.context(what))?;
                h = again;
                if still {
                    format::write_header(&file, &mut h)?;
                }
            }
        }
        if h.reencrypt.as_ref().is_some_and(|r| r.journal_len > 0) {
            // An interrupted re-encryption step: put the journal back before anything is
            // read, even for a read-only open (the chunk would not decrypt otherwise).
            use std::os::fd::AsRawFd;
            let rw = OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
                .map_err(|e| {
                    crate::error::Error::from(e).context(format!(
                        "{what} needs recovery of an interrupted re-encryption"
                    ))
                })?;
            Volume::recover_journal(&rw, &mut h)?;
        }
        let (cur, next) = self.keys.read(|k| {
            let cur = k
                .unwrap(
                    &h.key.key_id,
                    h.key.key_version,
                    &h.key.nonce,
                    &h.key.wrapped,
                    &h.wrap_aad(h.key.cipher, &h.key.key_id, h.key.key_version),
                )
                .map_err(|e| e.context(what))?;
            let next = match &h.reencrypt {
                Some(r) => Some(
                    k.unwrap(
                        &r.next.key_id,
                        r.next.key_version,
                        &r.next.nonce,
                        &r.next.wrapped,
                        &h.wrap_aad(r.next.cipher, &r.next.key_id, r.next.key_version),
                    )
                    .map_err(|e| e.context(what))?,
                ),
                None => None,
            };
            Ok((cur, next))
        })?;
        let v = Volume::encrypted(file, h, &cur, next.as_deref().map(|v| &v[..]));
        drop((cur, next));
        // Unwrapping and key expansion ran in frames below this one.
        sys::secret::scrub_stack();
        v
    }

    /// Every resource whose data key is wrapped under CMK `key_id` (now or by a
    /// re-encryption under way), damaged ones included when their header still reads; and
    /// the damaged resources whose header cannot be read at all (they may depend on it).
    pub fn usage(&self, key_id: &str) -> Result<Usage> {
        let mut out = Usage::default();
        for (r, info) in self.list_infos(None)? {
            let header = match info {
                Ok(i) => i.header,
                // A damaged `.raw` entry has no key; an `.eimg` one may.
                Err(_) if self.locate(&r).is_some_and(|(_, enc)| !enc) => None,
                Err(_) => match self.header_anyway(&r) {
                    Some(h) => Some(h),
                    None => {
                        out.unreadable.push(r);
                        continue;
                    }
                },
            };
            if let Some(h) = header {
                if h.key.key_id == key_id
                    || h.reencrypt
                        .as_ref()
                        .is_some_and(|x| x.next.key_id == key_id)
                {
                    out.users.push(r);
                }
            }
        }
        Ok(out)
    }

    /// The header of a damaged encrypted resource, if one copy still reads (its kind or
    /// length may be wrong).
    fn header_anyway(&self, r: &ResPath) -> Option<Header> {
        let (path, _) = self.locate(r)?;
        let f = sys::open_regular(&path, false).ok()?;
        format::read_header(&f).ok().map(|(h, _)| h)
    }

    /// Remove leftovers of interrupted jobs (partial targets nobody is writing).
    pub fn clean_tmp(&self) {
        let Ok(rd) = std::fs::read_dir(self.tmp_dir()) else {
            return;
        };
        for ent in rd.flatten() {
            let p = ent.path();
            if p.extension().is_some_and(|e| e == "partial") {
                // A partial file is locked by the job writing it. Its writer locks the file
                // it created (not its name), so check the name still leads to the file we
                // locked before removing it.
                if let Ok(Some(l)) = FileLock::try_exclusive(&p) {
                    use std::os::unix::fs::MetadataExt;
                    let same = match (l.file().metadata(), std::fs::symlink_metadata(&p)) {
                        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                        _ => false,
                    };
                    if same {
                        let _ = std::fs::remove_file(&p);
                    }
                }
            }
        }
    }
}
