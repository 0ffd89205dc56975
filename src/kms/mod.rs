//! The local key service: customer master keys (CMKs) with ids, aliases, specs, origins,
//! states, versions and tags; key material sealed at rest under a root key; wrapping and
//! unwrapping of data keys. Every update takes the key-store lock and replaces the file
//! atomically, so concurrent CLI invocations never lose an update.

mod object;
mod root;
pub mod service;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{self, AeadKind, CipherKind, NONCE_LEN};
use crate::err;
use crate::error::Result;
use crate::sys::{self, FileLock};

pub use object::OBJECT as KEYSTORE_OBJECT;
pub use root::RootKey;
use service::{External, ServiceState};

/// The alias of each region's service key.
pub const SERVICE_ALIAS: &str = "alias/acs/ecs";
/// The tag put on keys that encrypt resources.
pub const DISK_ENCRYPTION_TAG: &str = "acs:ecs:disk-encryption";

/// Key spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeySpec {
    #[serde(rename = "AES_256")]
    Aes256,
    #[serde(rename = "SM4")]
    Sm4,
}

impl KeySpec {
    pub fn name(self) -> &'static str {
        match self {
            KeySpec::Aes256 => "AES_256",
            KeySpec::Sm4 => "SM4",
        }
    }
    pub fn parse(s: &str) -> Result<KeySpec> {
        match s.to_ascii_uppercase().as_str() {
            "AES_256" | "AES256" | "AES-256" => Ok(KeySpec::Aes256),
            "SM4" => Ok(KeySpec::Sm4),
            _ => Err(err!(
                InvalidInput,
                "unknown key spec '{s}' (use AES_256 or SM4)"
            )),
        }
    }
    /// Length of the CMK material.
    pub fn material_len(self) -> usize {
        match self {
            KeySpec::Aes256 => 32,
            KeySpec::Sm4 => 16,
        }
    }
    /// The AEAD that wraps data keys under this CMK.
    pub fn aead(self) -> AeadKind {
        match self {
            KeySpec::Aes256 => AeadKind::Aes256Gcm,
            KeySpec::Sm4 => AeadKind::Sm4Gcm,
        }
    }
    /// The sector cipher of resources encrypted under this CMK.
    pub fn sector_cipher(self) -> CipherKind {
        match self {
            KeySpec::Aes256 => CipherKind::AesXtsPlain64,
            KeySpec::Sm4 => CipherKind::Sm4XtsPlain64,
        }
    }
    pub fn of_cipher(c: CipherKind) -> KeySpec {
        match c {
            CipherKind::AesXtsPlain64 => KeySpec::Aes256,
            CipherKind::Sm4XtsPlain64 => KeySpec::Sm4,
        }
    }
}

/// Where the key material came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Origin {
    Service,
    Kms,
    External,
}

impl Origin {
    pub fn name(self) -> &'static str {
        match self {
            Origin::Service => "SERVICE",
            Origin::Kms => "KMS",
            Origin::External => "EXTERNAL",
        }
    }
    pub fn parse(s: &str) -> Result<Origin> {
        match s.to_ascii_uppercase().as_str() {
            "KMS" => Ok(Origin::Kms),
            "EXTERNAL" => Ok(Origin::External),
            _ => Err(err!(
                InvalidInput,
                "unknown origin '{s}' (use KMS or EXTERNAL)"
            )),
        }
    }
}

/// Key state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyState {
    Enabled,
    Disabled,
    PendingDeletion,
    PendingImport,
}

impl KeyState {
    pub fn name(self) -> &'static str {
        match self {
            KeyState::Enabled => "Enabled",
            KeyState::Disabled => "Disabled",
            KeyState::PendingDeletion => "PendingDeletion",
            KeyState::PendingImport => "PendingImport",
        }
    }
}

/// One version of a key's material, sealed under the root key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyVersion {
    pub version: u32,
    pub created: u64,
    /// hex(nonce || AES-256-GCM(root key, material, aad = id || version)); empty when an
    /// external service holds the material.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    sealed: String,
    /// The external key service's id of this version's key (KMIP Unique Identifier,
    /// PKCS#11 CKA_ID in hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
}

/// A customer master key's record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Key {
    pub id: String,
    pub alias: Option<String>,
    pub spec: KeySpec,
    pub origin: Origin,
    pub state: KeyState,
    pub deletion_date: Option<u64>,
    pub description: String,
    pub created: u64,
    pub region: String,
    pub tags: BTreeMap<String, String>,
    pub versions: Vec<KeyVersion>,
}

impl Key {
    pub fn current_version(&self) -> u32 {
        self.versions.last().map(|v| v.version).unwrap_or(0)
    }

    /// Refuse unless the key can wrap and unwrap.
    pub fn check_usable(&self) -> Result<()> {
        match self.state {
            KeyState::Enabled => Ok(()),
            KeyState::Disabled => Err(err!(KeyUnusable, "key {} is Disabled", self.id)),
            KeyState::PendingDeletion => Err(err!(
                KeyUnusable,
                "key {} is PendingDeletion (scheduled for {})",
                self.id,
                self.deletion_date.map(sys::rfc3339).unwrap_or_default()
            )),
            KeyState::PendingImport => Err(err!(
                KeyUnusable,
                "key {} is PendingImport: import its material first",
                self.id
            )),
        }
    }

    /// A JSON description (`key describe --json`).
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "alias": self.alias,
            "spec": self.spec.name(),
            "origin": self.origin.name(),
            "state": self.state.name(),
            "deletion_date": self.deletion_date.map(sys::rfc3339),
            "description": self.description,
            "created": sys::rfc3339(self.created),
            "region": self.region,
            "current_version": self.current_version(),
            "versions": self.versions.iter().map(|v| serde_json::json!({
                "version": v.version,
                "created": sys::rfc3339(v.created),
            })).collect::<Vec<_>>(),
            "tags": self.tags,
        })
    }
}

/// A key whose material was destroyed, remembered so messages can say so.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DestroyedKey {
    pub id: String,
    pub alias: Option<String>,
    pub destroyed: u64,
}

/// The key-store file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KeyFile {
    pub format: u32,
    pub root: root::RootInfo,
    pub keys: Vec<Key>,
    #[serde(default)]
    pub destroyed: Vec<DestroyedKey>,
}

/// A data key wrapped under a CMK version.
#[derive(Clone, Debug)]
pub struct Wrapped {
    pub key_id: String,
    pub key_version: u32,
    pub nonce: [u8; NONCE_LEN],
    pub wrapped: Vec<u8>,
}

/// The key store of a store directory.
#[derive(Clone, Debug)]
pub struct KeyStore {
    dir: PathBuf,
    region: String,
    /// The external service holding this region's CMKs; None: the local key store.
    service: Option<Arc<External>>,
    /// The account of a system store this key store belongs to (its local region).
    account: Option<Arc<crate::account::Account>>,
    /// An object-storage region's bucket, where the key-store file is an object
    /// ([`object`]); the root key and the lock stay in `dir`.
    objects: Option<Arc<crate::objstore::ObjStore>>,
    /// The object as last read, and when (shared by clones: a mount's views of the region).
    fetched: Arc<std::sync::Mutex<Option<(std::time::Instant, object::Fetched)>>>,
    /// A read of the object under way in the background ([`warm`](KeyStore::warm)).
    warming: Arc<std::sync::atomic::AtomicBool>,
}

/// The key-store file's bytes as read, and for an object its generation and ETag.
struct Raw {
    bytes: Vec<u8>,
    object: Option<object::Fetched>,
}

/// The loaded key store, with the root key, for the duration of one read or update.
pub struct Keys {
    pub file: KeyFile,
    root: RootKey,
    pub region: String,
    now: u64,
    service: Option<Arc<External>>,
    account: Option<Arc<crate::account::Account>>,
    /// For a key store kept as an object: the generation and ETag it was read at.
    object: Option<(u64, Option<String>)>,
}

impl KeyStore {
    pub fn new(store_dir: &Path, region: &str) -> KeyStore {
        KeyStore {
            dir: store_dir.join("keys"),
            region: region.to_string(),
            service: None,
            account: crate::account::Account::of_store_dir(store_dir).map(Arc::new),
            objects: None,
            fetched: Default::default(),
            warming: Default::default(),
        }
    }

    /// [`warm`](Self::warm), waiting up to `wait` for it.
    pub fn warm_within(&self, wait: std::time::Duration) {
        self.warm();
        let t = std::time::Instant::now();
        while self.warming.load(std::sync::atomic::Ordering::SeqCst) && t.elapsed() < wait {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Read the key-store object again in the background (one read at a time), so that
    /// while a process keeps using it, its opens take the one at hand and never wait for
    /// the store's answer; the reader's errors are the next read's to meet.
    fn warm(&self) {
        use std::sync::atomic::Ordering;
        if self.objects.is_none() || self.warming.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        std::thread::spawn(move || {
            let _ = me.read_raw(true);
            me.warming.store(false, Ordering::SeqCst);
        });
    }

    /// The same key store kept as an object in `os` (an object-storage region).
    pub fn with_objects(mut self, os: Option<Arc<crate::objstore::ObjStore>>) -> KeyStore {
        self.objects = os;
        self
    }

    /// What must exist for the store to count as made: the key-store file, or for one kept
    /// as an object its local directory (root key, lock).
    pub fn made_marker(&self) -> PathBuf {
        if self.objects.is_some() {
            self.dir.clone()
        } else {
            self.path()
        }
    }

    /// How errors name the key store.
    fn what(&self) -> String {
        match &self.objects {
            Some(os) => format!("s3 object {}", os.uri_of(object::OBJECT)),
            None => self.path().display().to_string(),
        }
    }

    /// The same key store with its CMKs held by an external service.
    pub fn with_service(mut self, service: Option<Arc<External>>) -> KeyStore {
        self.service = service;
        self
    }

    pub fn service(&self) -> Option<&Arc<External>> {
        self.service.as_ref()
    }

    fn path(&self) -> PathBuf {
        self.dir.join("keystore.json")
    }

    /// The same key store named by an absolute path (a daemon changes directory to `/`).
    pub fn absolute(&self) -> Result<KeyStore> {
        let mut k = self.clone();
        k.dir = std::path::absolute(&self.dir)
            .map_err(|e| crate::error::Error::from(e).context(self.dir.display()))?;
        Ok(k)
    }

    /// The object this process read within [`object::FRESH`], unless this host has written a
    /// later one since.
    fn recent_object_aged(&self) -> Option<(object::Fetched, std::time::Duration)> {
        let slot = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
        let (at, f) = slot.as_ref()?;
        let age = at.elapsed();
        (age < object::FRESH && object::seen(&self.dir) <= f.generation).then(|| (f.clone(), age))
    }

    /// The key-store file's bytes: the object of an object-storage region (or, before it
    /// was made, the local file it is made from), else the local file.
    /// `fresh`: read the object anew (an update, which writes conditionally on it).
    fn read_raw(&self, fresh: bool) -> Result<Raw> {
        let Some(os) = &self.objects else {
            return Ok(Raw {
                bytes: self.read_local()?,
                object: None,
            });
        };
        if let Some((f, age)) = self.recent_object_aged().filter(|_| !fresh) {
            // Half its time gone: the next one is read meanwhile.
            if age >= object::FRESH / 2 {
                self.warm();
            }
            return Ok(Raw {
                bytes: f.bytes.clone(),
                object: Some(f),
            });
        }
        let legacy = sys::entry_exists(&self.path());
        match os.get_tagged(object::OBJECT, object::MAX_BYTES)? {
            Some((obj, _)) if obj == object::TOMBSTONE => Err(self.missing("was removed")),
            Some((obj, etag)) => {
                let f = object::parse(&obj, etag, &self.what())?;
                if legacy {
                    self.settle_legacy(&f.bytes)?;
                }
                *self.fetched.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((std::time::Instant::now(), f.clone()));
                Ok(Raw {
                    bytes: f.bytes.clone(),
                    object: Some(f),
                })
            }
            // A region made before its key store was an object: its local file, which
            // `load` makes the object of.
            None if legacy => Ok(Raw {
                bytes: self.read_local()?,
                object: None,
            }),
            None => Err(self.missing("is gone")),
        }
    }

    /// The key-store object is not there (`how`: gone, or removed by `region remove`).
    fn missing(&self, how: &str) -> crate::Error {
        err!(
            Corrupt,
            "the key store of region {} {how} ({}): `region remove` on another host, or a deletion in the bucket; restore the object, or run `encimg region remove {}` here",
            self.region,
            self.what(),
            self.region
        )
    }

    /// A local key-store file from before the key store was an object, beside the object:
    /// gone if the object holds the same records (a migration cut short before it removed
    /// the file), else refused, and kept: they are another host's records, or this one's
    /// that never reached the bucket, and using either would hide the other's keys.
    fn settle_legacy(&self, object_bytes: &[u8]) -> Result<()> {
        // The same records, however written (the object's are re-serialized).
        let records = |b: &[u8]| {
            serde_json::from_slice::<KeyFile>(b)
                .ok()
                .and_then(|f| serde_json::to_value(f).ok())
        };
        let local = self.read_local()?;
        if records(&local).is_some() && records(&local) == records(object_bytes) {
            let _ = std::fs::remove_file(self.path());
            return Ok(());
        }
        Err(err!(
            Refused,
            "region {} has key records in {} (kept here from before they were kept in the bucket) and other ones in {}: neither is used while both are there; move this host's resources out with the encimg that made them, then remove that file",
            self.region,
            self.path().display(),
            self.what()
        ))
    }

    /// The local key-store file's bytes (a regular file, never through a link).
    fn read_local(&self) -> Result<Vec<u8>> {
        sys::read_regular(&self.path(), 64 << 20).map_err(|e| {
            if e.kind == crate::error::ErrorKind::NotFound {
                err!(
                    NotFound,
                    "no key store at {} (run `encimg init`)",
                    self.dir.display()
                )
            } else {
                e.context("key store")
            }
        })
    }

    /// Create the key store if it does not exist (root key and empty key file).
    /// For an object-storage region, only the local directory (root key, lock): the object
    /// is made by `region add` alone ([`make_object`](Self::make_object)), so a command that
    /// finds it gone says so instead of starting an empty one.
    pub fn init(&self) -> Result<bool> {
        sys::private_dir(&self.dir)?;
        if self.objects.is_some() {
            return Ok(false);
        }
        let _lock = FileLock::exclusive(&self.dir.join(".lock"))?;
        if sys::entry_exists(&self.path()) {
            return Ok(false);
        }
        let info = root::create(&self.dir)?;
        let file = KeyFile {
            format: 1,
            root: info,
            keys: Vec::new(),
            destroyed: Vec::new(),
        };
        save(&self.path(), &file)?;
        Ok(true)
    }

    /// `region add` of an object-storage region: take the key store in the bucket (made by
    /// another host, or before this region was removed here: only under its own region's
    /// name), or make it, with a new root key and what `first` puts in it, in one PUT that
    /// fails if another host made one meanwhile. Returns the object made (None: taken).
    pub fn make_object(
        &self,
        first: impl FnOnce(&mut Keys) -> Result<()>,
    ) -> Result<Option<Vec<u8>>> {
        let os = self.objects.clone().expect("an object-storage region");
        sys::private_dir(&self.dir)?;
        let _lock = FileLock::exclusive(&self.dir.join(".lock"))?;
        let over = match os.get_tagged(object::OBJECT, object::MAX_BYTES)? {
            Some((_, None)) => return Err(self.no_etag(&os)),
            Some((obj, etag)) if obj == object::TOMBSTONE => etag,
            Some((obj, _)) => {
                let f = object::parse(&obj, None, &self.what())?;
                let file: KeyFile = serde_json::from_slice(&f.bytes)
                    .map_err(|e| err!(Corrupt, "key store {} is damaged: {e}", self.what()))?;
                if let Some(other) = file.keys.iter().find(|k| k.region != self.region) {
                    return Err(err!(
                        InvalidInput,
                        "{} holds region {}'s key store: add it under that name",
                        self.what(),
                        other.region
                    ));
                }
                return Ok(None);
            }
            None => None,
        };
        let made_root = !sys::entry_exists(&self.dir.join("root.key"));
        let info = root::create(&self.dir)?;
        let root = root::open(&self.dir, &info)?;
        let mut keys = Keys {
            file: KeyFile {
                format: 1,
                root: info,
                keys: Vec::new(),
                destroyed: Vec::new(),
            },
            root,
            region: self.region.clone(),
            now: sys::now(),
            service: self.service.clone(),
            account: self.account.clone(),
            object: None,
        };
        let made = first(&mut keys).and_then(|()| {
            let bytes = serde_json::to_vec_pretty(&keys.file).map_err(|e| err!(Io, "{e}"))?;
            let obj = object::seal(&keys.root, &self.region, 1, &bytes)?;
            os.put_if(object::OBJECT, &obj, over.as_deref())?;
            // Every later change is conditional on the ETag read: a server that sends none
            // would leave the region unchangeable, so it is refused now, and what was just
            // made goes (a host that took it meanwhile found no ETag either, and was refused).
            match os.get_tagged(object::OBJECT, object::MAX_BYTES)? {
                Some((_, None)) => {
                    let _ = os.delete(object::OBJECT);
                    Err(self.no_etag(&os))
                }
                _ => Ok(obj),
            }
        });
        match made {
            Ok(obj) => {
                self.seen(1);
                Ok(Some(obj))
            }
            Err(e) => {
                if made_root {
                    let _ = std::fs::remove_file(self.dir.join("root.key"));
                }
                Err(e)
            }
        }
    }

    /// Write `file` as the key-store object, one generation after `read` (the generation and
    /// ETag it was read at; None: there is none yet, from a local file being moved there).
    fn put_object(
        &self,
        root: &RootKey,
        file: &KeyFile,
        read: Option<&(u64, Option<String>)>,
    ) -> Result<()> {
        let os = self
            .objects
            .as_ref()
            .expect("a key store kept as an object");
        let bytes = serde_json::to_vec_pretty(file).map_err(|e| err!(Io, "{e}"))?;
        let generation = read.map_or(1, |(g, _)| g + 1);
        let obj = object::seal(root, &self.region, generation, &bytes)?;
        let etag = match read {
            None => None,
            Some((_, Some(t))) => Some(t.as_str()),
            // Without an ETag no write can be made on condition that the object is still
            // the one read: another host's change in between would be lost.
            Some((_, None)) => return Err(self.no_etag(os)),
        };
        os.put_if(object::OBJECT, &obj, etag)
            .map_err(|e| self.changed_meanwhile(e, "nothing was changed, run the command again"))?;
        self.seen(generation);
        Ok(())
    }

    /// `region remove` of an object-storage region whose key store holds no keys but the
    /// service key (checked by the caller on the object `etag` names): put the tombstone in
    /// its place on condition it is still that object (and leave it there), then ask
    /// `still_empty` (no host can read the key store to wrap a new data key after that): if
    /// a resource came meanwhile, the object is put back and the removal is busy. A host
    /// that changed the object meanwhile makes this fail (busy), and nothing is removed.
    pub fn remove_object(
        &self,
        etag: Option<&str>,
        still_empty: impl FnOnce() -> Result<bool>,
    ) -> Result<()> {
        let os = self.objects.as_ref().expect("an object-storage region");
        let Some(etag) = etag else {
            return Err(err!(
                Refused,
                "{} sends no ETag: key store {} cannot be removed without risking another host's keys",
                os.uri_of(""),
                self.what()
            ));
        };
        let before = os
            .get_tagged(object::OBJECT, object::MAX_BYTES)?
            .filter(|(_, t)| t.as_deref() == Some(etag))
            .map(|(b, _)| b)
            .ok_or_else(|| err!(Busy, "the object was replaced"))
            .and_then(|before| {
                os.put_if(object::OBJECT, object::TOMBSTONE, Some(etag))?;
                Ok(before)
            })
            .map_err(|e| self.changed_meanwhile(e, "the region was not removed"))?;
        match still_empty() {
            // The tombstone stays: deleting it could not be made conditional (S3 servers
            // differ), and a host making the region again writes over it on condition.
            Ok(true) => Ok(()),
            answer => {
                // Back as it was (on condition it is still the tombstone put here).
                if let Some((_, t)) = os.get_tagged(object::OBJECT, object::MAX_BYTES)? {
                    os.put_if(object::OBJECT, &before, t.as_deref())?;
                }
                answer?;
                Err(err!(
                    Busy,
                    "region {} got a resource meanwhile (another host?): it was not removed",
                    self.region
                ))
            }
        }
    }

    /// The key-store object's ETag and whether it holds keys other than the service key
    /// (None: there is none).
    pub fn object_state(&self) -> Result<Option<(Option<String>, Vec<String>)>> {
        let os = self.objects.as_ref().expect("an object-storage region");
        match os.get_tagged(object::OBJECT, object::MAX_BYTES)? {
            // A region from before, its records still in the local file: moved to the
            // bucket first, then looked at there.
            None if sys::entry_exists(&self.path()) => {
                self.load(true)?;
                self.object_state()
            }
            None => Ok(None),
            Some((obj, _)) if obj == object::TOMBSTONE => Ok(None),
            Some((_, etag)) => {
                // Read through the checks (tag, rollback) like any other reader.
                let keys = self.load(true)?;
                if keys.object.as_ref().map(|(_, t)| t) != Some(&etag) {
                    let replaced = err!(Busy, "the object was replaced");
                    return Err(self.changed_meanwhile(replaced, "run the command again"));
                }
                Ok(Some((etag, keys.held())))
            }
        }
    }

    /// Whether the key-store object is there and no tombstone (a region removed by another
    /// host meanwhile is not).
    pub fn object_is_live(&self) -> Result<bool> {
        let Some(os) = &self.objects else {
            return Ok(true);
        };
        Ok(match os.get_tagged(object::OBJECT, object::MAX_BYTES)? {
            Some((obj, _)) => obj != object::TOMBSTONE,
            // A region from before, whose records are still in the local file.
            None => sys::entry_exists(&self.path()),
        })
    }

    /// The refusal of a server that sends no ETags: without one, no write can be made on
    /// condition that the key store is still the one read, and another host's change in
    /// between would be lost.
    fn no_etag(&self, os: &crate::objstore::ObjStore) -> crate::Error {
        err!(
            Refused,
            "{} sends no ETag, so key store {} cannot be changed without risking another host's change: use an S3 store that sends ETags",
            os.uri_of(""),
            self.what()
        )
    }

    /// A conditional write of the object refused because another host wrote it after it was
    /// read (`then`: what that means for the command); other errors as they are.
    fn changed_meanwhile(&self, e: crate::Error, then: &str) -> crate::Error {
        if e.kind == crate::error::ErrorKind::Busy {
            err!(
                Busy,
                "key store {} changed meanwhile (another host?): {then}",
                self.what()
            )
        } else {
            e
        }
    }

    fn seen(&self, generation: u64) {
        object::record_seen(&self.dir, generation);
    }

    fn load(&self, fresh: bool) -> Result<Keys> {
        let raw = self.read_raw(fresh)?;
        let file: KeyFile = serde_json::from_slice(&raw.bytes)
            .map_err(|e| err!(Corrupt, "key store {} is damaged: {e}", self.what()))?;
        if file.format != 1 {
            return Err(err!(
                Corrupt,
                "unsupported key store format {}",
                file.format
            ));
        }
        let root = root::open(&self.dir, &file.root).map_err(|e| {
            if self.objects.is_some() && e.kind == crate::error::ErrorKind::KeyUnusable {
                err!(
                    KeyUnusable,
                    "{} (or key store {} was altered in the bucket)",
                    e.message,
                    self.what()
                )
            } else if self.objects.is_some() && e.kind == crate::error::ErrorKind::NotFound {
                err!(
                    KeyUnusable,
                    "key store {} is sealed under a root key this host does not have: copy {} from the host that added the region (or use a passphrase)",
                    self.what(),
                    self.dir.join("root.key").display()
                )
            } else {
                e
            }
        })?;
        let object = match (&self.objects, raw.object) {
            (_, Some(f)) => {
                f.verify(&root, &self.region, &self.dir, &self.what())?;
                Some((f.generation, f.etag))
            }
            (None, None) => None,
            // A region made before its key store was an object: the local file becomes the
            // object (made only if there is none), then the local file goes. If another
            // writer made one meanwhile, the reading again compares the two.
            (Some(_), None) => {
                match self.put_object(&root, &file, None) {
                    Ok(()) => {
                        let _ = std::fs::remove_file(self.path());
                    }
                    Err(e) if e.kind == crate::error::ErrorKind::Busy => {}
                    Err(e) => return Err(e),
                }
                return self.load(true);
            }
        };
        Ok(Keys {
            file,
            root,
            region: self.region.clone(),
            now: sys::now(),
            service: self.service.clone(),
            account: self.account.clone(),
            object,
        })
    }

    /// Run `f` on the key store under a shared lock.
    pub fn read<T>(&self, f: impl FnOnce(&Keys) -> Result<T>) -> Result<T> {
        {
            // Root key, CMK material and AEAD schedules pass through frames below.
            let _scrub = sys::secret::ScrubOnDrop;
            let _lock = self.lock(false)?;
            let keys = self.load(false)?;
            if !keys.has_expired() {
                return f(&keys);
            }
        }
        // Some key's deletion date has passed: destroy it first, under the exclusive lock.
        self.update(|k| f(k))
    }

    /// The key-store lock, waited for at most [`sys::LOCK_WAIT`] (a process that holds it
    /// and hangs never wedges the mount).
    fn lock(&self, exclusive: bool) -> Result<FileLock> {
        if !self.dir.exists() {
            return Err(err!(
                NotFound,
                "no key store at {} (run `encimg init`)",
                self.dir.display()
            ));
        }
        let p = self.dir.join(".lock");
        if exclusive {
            FileLock::exclusive_within(&p, sys::LOCK_WAIT)
        } else {
            FileLock::shared_within(&p, sys::LOCK_WAIT)
        }
    }

    /// Run `f` on the key store under the exclusive lock and save what it changed.
    pub fn update<T>(&self, f: impl FnOnce(&mut Keys) -> Result<T>) -> Result<T> {
        let _scrub = sys::secret::ScrubOnDrop;
        let _lock = self.lock(true)?;
        // Under the lock no writer is mid-write: what a killed one left can go.
        sys::sweep_temps(&self.dir);
        let mut keys = self.load(true)?;
        let before = serde_json::to_vec(&keys.file).map_err(|e| err!(Io, "{e}"))?;
        keys.destroy_expired();
        let out = f(&mut keys);
        let after = serde_json::to_vec(&keys.file).map_err(|e| err!(Io, "{e}"))?;
        if before != after {
            match &self.objects {
                None => save(&self.path(), &keys.file)?,
                Some(_) => self.put_object(&keys.root, &keys.file, keys.object.as_ref())?,
            }
        }
        out
    }
}

fn save(path: &Path, file: &KeyFile) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(file).map_err(|e| err!(Io, "{e}"))?;
    sys::write_atomic(path, &bytes)
}

/// Validate an alias and return it with its `alias/` prefix.
pub fn normalize_alias(a: &str) -> Result<String> {
    let name = a.strip_prefix("alias/").unwrap_or(a);
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '.'))
        && !name.starts_with("acs/");
    if !ok {
        return Err(err!(
            InvalidInput,
            "invalid alias '{a}' (letters, digits, / _ - . ; not starting with acs/)"
        ));
    }
    Ok(format!("alias/{name}"))
}

impl Keys {
    fn has_expired(&self) -> bool {
        self.file.keys.iter().any(|k| self.expired(k))
    }

    fn expired(&self, k: &Key) -> bool {
        k.state == KeyState::PendingDeletion && k.deletion_date.is_some_and(|d| d <= self.now)
    }

    /// Destroy the material of every key whose deletion date has passed.
    fn destroy_expired(&mut self) {
        let now = self.now;
        let (gone, mut kept): (Vec<Key>, Vec<Key>) = std::mem::take(&mut self.file.keys)
            .into_iter()
            .partition(|k| self.expired(k));
        for k in gone {
            // An external service destroys the material itself; while it cannot be reached
            // the key stays (unusable: its date has passed) and is destroyed next time.
            if let Some(svc) = &self.service {
                let r = k
                    .versions
                    .iter()
                    .filter_map(|v| v.remote.as_deref())
                    .try_for_each(|remote| svc.destroy(remote));
                if let Err(e) = r {
                    tracing::warn!(key = %k.id, "deletion date passed, but {e}; will retry");
                    kept.push(k);
                    continue;
                }
            }
            tracing::info!(key = %k.id, "deletion date passed: key material destroyed");
            self.file.destroyed.push(DestroyedKey {
                id: k.id,
                alias: k.alias,
                destroyed: now,
            });
        }
        self.file.keys = kept;
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    /// Find a key by id or `alias/NAME` (aliases are looked up in this region).
    pub fn find(&self, r: &str) -> Result<&Key> {
        let i = self.index(r)?;
        Ok(&self.file.keys[i])
    }

    fn index(&self, r: &str) -> Result<usize> {
        let found = if r.starts_with("alias/") {
            self.file
                .keys
                .iter()
                .position(|k| k.alias.as_deref() == Some(r) && k.region == self.region)
        } else {
            self.file.keys.iter().position(|k| k.id == r)
        };
        found.ok_or_else(|| {
            if let Some(d) = self
                .file
                .destroyed
                .iter()
                .find(|d| d.id == r || d.alias.as_deref() == Some(r))
            {
                err!(
                    KeyUnusable,
                    "key {} was deleted on {}: its material is destroyed",
                    d.id,
                    sys::rfc3339(d.destroyed)
                )
            } else {
                err!(NotFound, "no key '{r}'")
            }
        })
    }

    /// A key's id and spec, from its id or alias; in an account of a system store, also
    /// another account's CMK that a share lets this one use.
    pub fn id_and_spec(&self, r: &str) -> Result<(String, KeySpec)> {
        match self.find(r) {
            Ok(k) => Ok((k.id.clone(), k.spec)),
            Err(e) if e.kind == crate::error::ErrorKind::NotFound && r.starts_with("key-") => {
                let Some(a) = &self.account else {
                    return Err(e);
                };
                a.foreign_keys(r)?.read(|fk| {
                    let k = fk.find(r)?;
                    Ok((k.id.clone(), k.spec))
                })
            }
            Err(e) => Err(e),
        }
    }

    fn find_mut(&mut self, r: &str) -> Result<&mut Key> {
        let i = self.index(r)?;
        Ok(&mut self.file.keys[i])
    }

    /// Keys of this region, oldest first.
    pub fn list(&self) -> impl Iterator<Item = &Key> {
        self.file
            .keys
            .iter()
            .filter(move |k| k.region == self.region)
    }

    fn new_id() -> String {
        let mut r = [0u8; 16];
        crypto::random_fill(&mut r);
        format!("key-{}", hex::encode(r))
    }

    fn seal_material(&self, id: &str, version: u32, material: &[u8]) -> Result<String> {
        let sealed = crypto::seal_with_nonce(
            AeadKind::Aes256Gcm,
            self.root.bytes(),
            &material_aad(id, version),
            material,
        )?;
        Ok(hex::encode(sealed))
    }

    fn unseal_material(&self, k: &Key, version: u32) -> Result<Zeroizing<Vec<u8>>> {
        let v = k
            .versions
            .iter()
            .find(|v| v.version == version)
            .ok_or_else(|| err!(NotFound, "key {} has no version {version}", k.id))?;
        let raw = hex::decode(&v.sealed)
            .map_err(|_| err!(Corrupt, "key store: material of {} is damaged", k.id))?;
        if raw.len() < NONCE_LEN {
            return Err(err!(Corrupt, "key store: material of {} is damaged", k.id));
        }
        crypto::open_with_nonce(
            AeadKind::Aes256Gcm,
            self.root.bytes(),
            &material_aad(&k.id, version),
            &raw,
        )
        .map_err(|_| {
            err!(
                Corrupt,
                "key store: material of {} does not authenticate",
                k.id
            )
        })
    }

    /// Add a version: `material` sealed here, or (with an external service) the material
    /// imported into the service, or, with `None`, a new key made by the service or here.
    fn add_version(&mut self, i: usize, material: Option<&[u8]>) -> Result<u32> {
        let k = &self.file.keys[i];
        let version = k.current_version() + 1;
        let label = format!("encimg {} v{version}", k.id);
        let (sealed, remote) = match (&self.service, material) {
            (Some(svc), Some(m)) => (String::new(), Some(svc.register(k.spec, &label, m)?)),
            (Some(svc), None) => (String::new(), Some(svc.create(k.spec, &label)?)),
            (None, Some(m)) => (self.seal_material(&k.id, version, m)?, None),
            (None, None) => {
                let m = crypto::random_secret(k.spec.material_len());
                (self.seal_material(&k.id, version, &m)?, None)
            }
        };
        let now = self.now;
        self.file.keys[i].versions.push(KeyVersion {
            version,
            created: now,
            sealed,
            remote,
        });
        Ok(version)
    }

    fn remote<'a>(&self, k: &'a Key, version: u32) -> Result<&'a str> {
        k.versions
            .iter()
            .find(|v| v.version == version)
            .and_then(|v| v.remote.as_deref())
            .ok_or_else(|| err!(NotFound, "key {} has no version {version}", k.id))
    }

    /// The service's word on key `k` (its current version); None for local keys.
    pub fn service_state(&self, k: &Key) -> Option<Result<ServiceState>> {
        if !self.service_state_applies(k) {
            return None;
        }
        let svc = self.service.as_ref()?;
        Some(
            self.remote(k, k.current_version())
                .and_then(|r| svc.state(r)),
        )
    }

    /// The name of the service holding this key store's CMKs.
    pub fn service_name(&self) -> String {
        self.service
            .as_ref()
            .map_or_else(|| "local".to_string(), |s| s.name())
    }

    /// Create a key and return its id.
    pub fn create(
        &mut self,
        spec: KeySpec,
        alias: Option<&str>,
        description: &str,
        origin: Origin,
    ) -> Result<String> {
        let alias = alias.map(normalize_alias).transpose()?;
        self.insert(spec, alias, description, origin)
    }

    fn insert(
        &mut self,
        spec: KeySpec,
        alias: Option<String>,
        description: &str,
        origin: Origin,
    ) -> Result<String> {
        if let Some(a) = &alias {
            if self.list().any(|k| k.alias.as_ref() == Some(a)) {
                return Err(err!(AlreadyExists, "alias {a} already names a key"));
            }
        }
        let id = Self::new_id();
        self.file.keys.push(Key {
            id: id.clone(),
            alias,
            spec,
            origin,
            state: if origin == Origin::External {
                KeyState::PendingImport
            } else {
                KeyState::Enabled
            },
            deletion_date: None,
            description: description.to_string(),
            created: self.now,
            region: self.region.clone(),
            tags: BTreeMap::new(),
            versions: Vec::new(),
        });
        if origin != Origin::External {
            let i = self.file.keys.len() - 1;
            if let Err(e) = self.add_version(i, None) {
                self.file.keys.pop();
                return Err(e);
            }
        }
        Ok(id)
    }

    /// The region's service key, created on first use.
    pub fn service_key(&mut self) -> Result<String> {
        if let Some(k) = self.list().find(|k| k.origin == Origin::Service) {
            return Ok(k.id.clone());
        }
        self.insert(
            KeySpec::Aes256,
            Some(SERVICE_ALIAS.to_string()),
            "Default service key for disk encryption",
            Origin::Service,
        )
    }

    /// Import BYOK material into a PendingImport (or, for another version, Enabled) EXTERNAL key.
    pub fn import(&mut self, r: &str, material: &[u8]) -> Result<()> {
        let i = self.index(r)?;
        let k = &self.file.keys[i];
        if k.origin != Origin::External {
            return Err(err!(
                Refused,
                "key {} is not an EXTERNAL key: material cannot be imported",
                k.id
            ));
        }
        if k.state != KeyState::PendingImport {
            return Err(err!(
                Refused,
                "key {} already has material (state {})",
                k.id,
                k.state.name()
            ));
        }
        if material.len() != k.spec.material_len() {
            return Err(err!(
                InvalidInput,
                "key material must be exactly {} bytes for {}, got {}",
                k.spec.material_len(),
                k.spec.name(),
                material.len()
            ));
        }
        if material.iter().all(|&b| b == material[0]) {
            return Err(err!(
                InvalidInput,
                "the key material is {} bytes of {:#04x}: that is not a key (generate it with a CSPRNG, e.g. openssl rand {})",
                material.len(),
                material[0],
                material.len()
            ));
        }
        self.add_version(i, Some(material))?;
        self.file.keys[i].state = KeyState::Enabled;
        Ok(())
    }

    fn refuse_service(k: &Key, what: &str) -> Result<()> {
        if k.origin == Origin::Service {
            return Err(err!(Refused, "the service key {} cannot be {what}", k.id));
        }
        Ok(())
    }

    /// Turn the key's usage on or off at an external service that can undo it.
    fn set_service_enabled(&self, r: &str, on: bool) -> Result<()> {
        let Some(svc) = &self.service else {
            return Ok(());
        };
        let k = self.find(r)?;
        if on {
            if let Some(st) = self.service_state(k) {
                let st = st?;
                if !matches!(st, ServiceState::Active | ServiceState::Disabled) {
                    return Err(err!(
                        KeyUnusable,
                        "key {} is {} at {}: only the service's administrator can change that, and KMIP has no way back from it",
                        k.id,
                        st.name(),
                        svc.name()
                    ));
                }
            }
        }
        // Versions the service no longer holds are skipped: the others still change.
        for remote in k.versions.iter().filter_map(|v| v.remote.as_deref()) {
            if svc.state(remote)? == ServiceState::Gone {
                continue;
            }
            svc.set_enabled(remote, on)?;
        }
        Ok(())
    }

    pub fn enable(&mut self, r: &str) -> Result<()> {
        if matches!(self.find(r)?.state, KeyState::Disabled | KeyState::Enabled) {
            self.set_service_enabled(r, true)?;
        }
        let k = self.find_mut(r)?;
        match k.state {
            KeyState::Enabled => Ok(()),
            KeyState::Disabled => {
                k.state = KeyState::Enabled;
                Ok(())
            }
            s => Err(err!(
                Refused,
                "key {} is {}: cancel the deletion or import material first",
                k.id,
                s.name()
            )),
        }
    }

    pub fn disable(&mut self, r: &str) -> Result<()> {
        let k = self.find(r)?;
        Self::refuse_service(k, "disabled")?;
        if matches!(k.state, KeyState::Enabled | KeyState::Disabled) {
            self.set_service_enabled(r, false)?;
        }
        let k = self.find_mut(r)?;
        match k.state {
            KeyState::Enabled | KeyState::Disabled => {
                k.state = KeyState::Disabled;
                Ok(())
            }
            s => Err(err!(
                Refused,
                "key {} is {} and cannot be disabled",
                k.id,
                s.name()
            )),
        }
    }

    pub fn rotate(&mut self, r: &str) -> Result<u32> {
        let i = self.index(r)?;
        let k = &self.file.keys[i];
        if k.origin == Origin::External {
            return Err(err!(
                Refused,
                "key {} is EXTERNAL: its material cannot be rotated here",
                k.id
            ));
        }
        k.check_usable()?;
        self.add_version(i, None)
    }

    /// Schedule deletion in `days` days (7 to 30). Usage checks are the caller's.
    pub fn schedule_deletion(&mut self, r: &str, days: u32) -> Result<u64> {
        if !(7..=30).contains(&days) {
            return Err(err!(
                InvalidInput,
                "the deletion window must be 7 to 30 days, not {days}"
            ));
        }
        let now = self.now;
        let k = self.find_mut(r)?;
        Self::refuse_service(k, "deleted")?;
        if k.state == KeyState::PendingDeletion {
            return Err(err!(Refused, "key {} is already PendingDeletion", k.id));
        }
        let date = now + u64::from(days) * 86400;
        k.state = KeyState::PendingDeletion;
        k.deletion_date = Some(date);
        Ok(date)
    }

    pub fn cancel_deletion(&mut self, r: &str) -> Result<()> {
        let k = self.find_mut(r)?;
        if k.state != KeyState::PendingDeletion {
            return Err(err!(Refused, "key {} is not PendingDeletion", k.id));
        }
        // As in cloud KMS, a cancelled deletion leaves the key Disabled (or awaiting import).
        k.state = if k.versions.is_empty() {
            KeyState::PendingImport
        } else {
            KeyState::Disabled
        };
        k.deletion_date = None;
        Ok(())
    }

    pub fn tag(&mut self, r: &str, tags: &[(String, String)]) -> Result<()> {
        let k = self.find_mut(r)?;
        for (key, value) in tags {
            k.tags.insert(key.clone(), value.clone());
        }
        Ok(())
    }

    /// Wrap a data key under the newest version of CMK `r`; tags the CMK as a disk key.
    pub fn wrap(
        &mut self,
        r: &str,
        dek: &[u8],
        aad_for: impl Fn(&str, u32) -> Vec<u8>,
    ) -> Result<Wrapped> {
        let i = match self.index(r) {
            Ok(i) => i,
            // Another account's CMK, usable through a share (a disk from a shared image).
            Err(e) if e.kind == crate::error::ErrorKind::NotFound && r.starts_with("key-") => {
                let Some(a) = &self.account else {
                    return Err(e);
                };
                return a.foreign_keys(r)?.update(|fk| fk.wrap(r, dek, aad_for));
            }
            Err(e) => return Err(e),
        };
        let k = &self.file.keys[i];
        k.check_usable()?;
        let version = k.current_version();
        let aad = aad_for(&k.id, version);
        let (nonce, wrapped) = match &self.service {
            Some(svc) => svc.wrap(self.remote(k, version)?, k.spec, &aad, dek)?,
            None => {
                let material = self.unseal_material(k, version)?;
                let mut nonce = [0u8; NONCE_LEN];
                crypto::random_fill(&mut nonce);
                let wrapped = crypto::seal(k.spec.aead(), &material, &nonce, &aad, dek)?;
                (nonce, wrapped)
            }
        };
        let key_id = k.id.clone();
        self.file.keys[i]
            .tags
            .insert(DISK_ENCRYPTION_TAG.to_string(), "true".to_string());
        Ok(Wrapped {
            key_id,
            key_version: version,
            nonce,
            wrapped,
        })
    }

    /// Unwrap a data key; refuses unless the CMK is Enabled.
    pub fn unwrap(
        &self,
        key_id: &str,
        version: u32,
        nonce: &[u8; NONCE_LEN],
        wrapped: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let k = match self.find(key_id) {
            Ok(k) => k,
            Err(e) if e.kind == crate::error::ErrorKind::NotFound => {
                let Some(a) = &self.account else {
                    return Err(e);
                };
                return a
                    .foreign_keys(key_id)?
                    .read(|fk| fk.unwrap(key_id, version, nonce, wrapped, aad));
            }
            Err(e) => return Err(e),
        };
        k.check_usable()?;
        if let Some(svc) = &self.service {
            return svc.unwrap(self.remote(k, version)?, k.spec, nonce, aad, wrapped);
        }
        let material = self.unseal_material(k, version)?;
        crypto::open(k.spec.aead(), &material, nonce, aad, wrapped).map_err(|_| {
            err!(
                Corrupt,
                "the data key does not unwrap under {} version {version}: the header was altered or belongs to another image",
                k.id
            )
        })
    }
}

fn material_aad(id: &str, version: u32) -> Vec<u8> {
    let mut a = b"encimg-cmk-v1".to_vec();
    a.extend_from_slice(id.as_bytes());
    a.extend_from_slice(&version.to_le_bytes());
    a
}

/// Read the root key file path used by fixtures and tests.
pub fn root_key_path(store_dir: &Path) -> PathBuf {
    store_dir.join("keys").join("root.key")
}

impl Keys {
    /// Every key of this region, described as `key describe --json` does.
    /// A service found unreachable is asked once, not once per key: the rest of the list
    /// shows the same unknown state at once, so the listing waits one `--kms-timeout`.
    pub fn describe_all(&self) -> Vec<serde_json::Value> {
        let mut down: Option<String> = None;
        self.list()
            .map(|k| {
                if let Some(why) = &down {
                    let mut v = self.describe_without_service(k);
                    if self.service_state_applies(k) {
                        v["service_state"] = why.clone().into();
                    }
                    return v;
                }
                let v = self.describe_key(k);
                if let Some(s) = v["service_state"].as_str() {
                    if service::is_unreachable_message(s) {
                        down = Some(s.to_string());
                    }
                }
                v
            })
            .collect()
    }

    /// The ids of this region's keys other than its service key (what keeps a region from
    /// being removed).
    pub fn held(&self) -> Vec<String> {
        self.list()
            .filter(|k| k.origin != Origin::Service)
            .map(|k| k.id.clone())
            .collect()
    }

    fn describe_without_service(&self, k: &Key) -> serde_json::Value {
        let mut v = k.describe();
        v["key_service"] = self.service_name().into();
        v["service_state"] = serde_json::Value::Null;
        v
    }

    /// Whether [`Keys::service_state`] would ask the service about `k`.
    fn service_state_applies(&self, k: &Key) -> bool {
        self.service.is_some() && !k.versions.is_empty()
    }

    /// A key's description, with the service that holds it and, for an external service,
    /// that service's own state of it (one round trip): a key the service's administrator
    /// revoked, disabled or destroyed shows as Disabled here, its native state beside it.
    pub fn describe_key(&self, k: &Key) -> serde_json::Value {
        let mut v = self.describe_without_service(k);
        if let Some(st) = self.service_state(k) {
            match st {
                Ok(st) => {
                    v["service_state"] = st.name().into();
                    if st != ServiceState::Active && k.state == KeyState::Enabled {
                        v["state"] = KeyState::Disabled.name().into();
                    }
                }
                Err(e) => v["service_state"] = format!("unknown: {}", e.message).into(),
            }
        }
        v
    }
}

impl KeyStore {
    /// The key-store file's records, without the root key.
    /// One kept as an object is read through its checks (tag, rollback), which take the
    /// root key: the bucket is not this host's to trust.
    fn records(&self) -> Result<KeyFile> {
        if self.objects.is_some() {
            return Ok(self.load(false)?.file);
        }
        let bytes = self.read_local()?;
        serde_json::from_slice(&bytes).map_err(|e| err!(Corrupt, "key store is damaged: {e}"))
    }

    /// Whether the key store holds keys of this region (without the root key).
    pub fn has_region_keys(&self) -> Result<bool> {
        Ok(self.records()?.keys.iter().any(|k| k.region == self.region))
    }

    /// Whether the key store holds key `id` (without the root key).
    pub fn holds(&self, id: &str) -> bool {
        self.records()
            .is_ok_and(|f| f.keys.iter().any(|k| k.id == id))
    }

    /// Refuse unless CMK `id` can unwrap now, without touching the root key (cheap enough to
    /// ask on every open through the mount). With an external service, the service's state
    /// of the key's current version is asked too: one round trip.
    pub fn check_usable(&self, id: &str) -> Result<()> {
        self.check_usable_at(id, None)
    }

    /// [`check_usable`](Self::check_usable) for one version of the key (the one a header
    /// names), or its current one.
    pub fn check_usable_at(&self, id: &str, version: Option<u32>) -> Result<()> {
        let remote = self.check_record(id, version)?;
        if let (Some(svc), Some(remote)) = (&self.service, remote) {
            let st = svc.state(&remote)?;
            if st != ServiceState::Active {
                return Err(err!(
                    KeyUnusable,
                    "key {id} is {} at {}",
                    st.name(),
                    svc.name()
                ));
            }
        }
        Ok(())
    }

    /// encimg's own record of key `id`: refuse unless usable; the service's id of its
    /// current version, if an external service holds it.
    fn check_record(&self, id: &str, version: Option<u32>) -> Result<Option<String>> {
        let _lock = self.lock(false)?;
        let file = self.records()?;
        let now = sys::now();
        if let Some(k) = file.keys.iter().find(|k| k.id == id) {
            if k.state == KeyState::PendingDeletion && k.deletion_date.is_some_and(|d| d <= now) {
                return Err(err!(
                    KeyUnusable,
                    "key {id} was deleted: its material is destroyed"
                ));
            }
            k.check_usable()?;
            let v = match version {
                Some(n) => k.versions.iter().find(|v| v.version == n),
                None => k.versions.last(),
            };
            return Ok(v.and_then(|v| v.remote.clone()));
        }
        if file.destroyed.iter().any(|d| d.id == id) {
            return Err(err!(
                KeyUnusable,
                "key {id} was deleted: its material is destroyed"
            ));
        }
        if let Some(a) = &self.account {
            a.foreign_keys(id)?.check_usable_at(id, version)?;
            return Ok(None);
        }
        Err(err!(
            KeyUnusable,
            "key {id} does not exist in this key store"
        ))
    }
}
