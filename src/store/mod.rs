//! The resource store: a directory holding the key store and the images, disks and
//! snapshots, each an encrypted `.eimg` file (header + XTS payload) or a plain `.raw` file.
//!
//! ```text
//! STORE/keys/{keystore.json,root.key,.lock}
//! STORE/{images,disks,snapshots}/NAME.{eimg,raw}
//! STORE/locks/KIND.NAME.{open,job}     advisory locks: open through a mount; job on it
//! STORE/tmp/                           targets being written, renamed into place when whole
//! ```

mod backing;
mod ops;
mod volume;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

pub use backing::{AlignedBuf, POOL_KEEP};
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
    pub file: PathBuf,
    pub size: u64,
    /// The header, for encrypted resources.
    pub header: Option<Header>,
    /// Bytes of disk the backing file uses.
    pub allocated: u64,
}

impl Info {
    pub fn encrypted(&self) -> bool {
        self.header.is_some()
    }

    pub fn to_json(&self) -> serde_json::Value {
        let h = self.header.as_ref();
        serde_json::json!({
            "path": self.path.to_string(),
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
            "reencrypt": h.and_then(|h| h.reencrypt.as_ref().map(|r| (h, r))).map(|(h, r)| serde_json::json!({
                "checkpoint_sector": r.checkpoint,
                "sectors": h.sectors(),
                "key_id": r.next.key_id,
                "cipher": r.next.cipher.name(),
            })),
        })
    }
}

/// A store directory.
#[derive(Clone, Debug)]
pub struct Store {
    pub root: PathBuf,
    pub region: String,
    pub keys: KeyStore,
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
    /// A handle on the store at `root` (nothing is read yet).
    pub fn at(root: &Path, region: &str) -> Store {
        Store {
            root: root.to_path_buf(),
            region: region.to_string(),
            keys: KeyStore::new(root, region),
        }
    }

    /// Create the store's directories and key store if missing; true if anything was created.
    pub fn init(&self) -> Result<bool> {
        sys::private_dir(&self.root)?;
        for d in ["images", "disks", "snapshots", "locks", "tmp", "jobs"] {
            sys::private_dir(&self.root.join(d))?;
        }
        self.keys.init()
    }

    /// Refuse if the store has not been initialized.
    pub fn check(&self) -> Result<()> {
        if !self.root.join("keys/keystore.json").exists() {
            return Err(err!(
                NotFound,
                "no store at {} (run `encimg init` or pass --store)",
                self.root.display()
            ));
        }
        Ok(())
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn file_for(&self, r: &ResPath, encrypted: bool) -> PathBuf {
        let ext = if encrypted { "eimg" } else { "raw" };
        self.root
            .join(r.kind.dir())
            .join(format!("{}.{ext}", r.name))
    }

    /// The backing file of a resource and whether it is encrypted, if it exists.
    pub fn locate(&self, r: &ResPath) -> Option<(PathBuf, bool)> {
        for enc in [true, false] {
            let p = self.file_for(r, enc);
            if p.exists() {
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
        self.root
            .join("locks")
            .join(format!("{}.{}.open", r.kind.dir(), r.name))
    }

    /// Lock file held by a job writing the resource (copy target, rekey).
    pub fn job_lock_path(&self, r: &ResPath) -> PathBuf {
        self.root
            .join("locks")
            .join(format!("{}.{}.job", r.kind.dir(), r.name))
    }

    /// Take the job lock on `r`, or refuse if another job holds it.
    pub fn lock_job(&self, r: &ResPath) -> Result<FileLock> {
        FileLock::try_exclusive(&self.job_lock_path(r))?
            .ok_or_else(|| err!(Busy, "{r} is in use by another job"))
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

    /// Describe a resource (reads the header; needs no key).
    pub fn info(&self, r: &ResPath) -> Result<Info> {
        let (file, enc) = self.find(r)?;
        let f = File::open(&file).ctx(file.display())?;
        let meta = f.metadata().ctx(file.display())?;
        let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
        if !enc {
            return Ok(Info {
                path: r.clone(),
                file,
                size: meta.len(),
                header: None,
                allocated,
            });
        }
        let (h, _) = format::read_header(&f).map_err(|e| e.context(r))?;
        Ok(Info {
            path: r.clone(),
            file,
            size: h.size,
            header: Some(h),
            allocated,
        })
    }

    /// Open a resource for plaintext I/O: unwraps its data key (refused unless the CMK is
    /// Enabled) and recovers an interrupted re-encryption's journal when writable.
    pub fn open_volume(&self, r: &ResPath, writable: bool) -> Result<Volume> {
        let (path, enc) = self.find(r)?;
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&path)
            .ctx(path.display())?;
        if !enc {
            return Volume::raw(file);
        }
        self.open_encrypted(file, r, writable)
    }

    /// Open an encrypted file (not necessarily in the tree yet, e.g. a copy target).
    pub fn open_encrypted(
        &self,
        file: File,
        what: &dyn std::fmt::Display,
        writable: bool,
    ) -> Result<Volume> {
        let (mut h, damaged) = format::read_header(&file).map_err(|e| e.context(what))?;
        if writable && damaged {
            // Rewrite both copies so the damaged one is healed.
            let mut hh = h.clone();
            format::write_header(&file, &mut hh)?;
            h = hh;
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
        Volume::encrypted(file, h, &cur, next.as_deref().map(|v| &v[..]))
    }

    /// Every resource whose data key is wrapped under CMK `key_id` (now or by a
    /// re-encryption under way).
    pub fn usage(&self, key_id: &str) -> Result<Vec<ResPath>> {
        let mut out = Vec::new();
        for r in self.list(None)? {
            if let Ok(info) = self.info(&r) {
                if let Some(h) = &info.header {
                    if h.key.key_id == key_id
                        || h.reencrypt
                            .as_ref()
                            .is_some_and(|x| x.next.key_id == key_id)
                    {
                        out.push(r);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Remove leftovers of interrupted jobs (partial targets nobody is writing).
    pub fn clean_tmp(&self) {
        let Ok(rd) = std::fs::read_dir(self.tmp_dir()) else {
            return;
        };
        for ent in rd.flatten() {
            let p = ent.path();
            if p.extension().is_some_and(|e| e == "partial") {
                // A partial file is locked by the job writing it.
                if let Ok(Some(_l)) = FileLock::try_exclusive(&p) {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
    }
}
