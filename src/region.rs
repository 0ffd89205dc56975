//! Regions: a region is a place, a storage location plus a key service. This module is the
//! one place that turns a region name into those two things and opens the region's store;
//! everything above (the CLI, the mount, jobs, cross-region copy) takes the resulting
//! [`Store`] as a parameter.
//!
//! The default region `local` is the store directory itself (the "home"), so a store made
//! before regions opens unchanged. Other regions are listed in `HOME/regions.json`; each has
//! its own location (a directory laid out like a store: `images/`, `disks/`, `snapshots/`,
//! `keys/`, …, with its own key store and root key) and its own key service.
//!
//! A new kind of location or key service plugs in here: a variant of [`Location`] or
//! [`KeyService`], parsed from its URI in [`Location::parse`] / [`KeyService::parse`], and
//! opened in [`Regions::store`]. Nothing else names a location kind or a key service.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::err;
use crate::error::Result;
use crate::store::Store;
use crate::sys::{self, FileLock};

/// The region that is the store directory itself.
pub const LOCAL: &str = "local";
/// Destinations one cross-region copy may have.
pub const MAX_DESTINATIONS: usize = 5;

/// Region names: `[a-z0-9-]{1,32}`.
pub fn validate_name(r: &str) -> Result<()> {
    let ok = !r.is_empty()
        && r.len() <= 32
        && r.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(err!(
            InvalidInput,
            "invalid region name '{r}' (1-32 of a-z 0-9 -)"
        ))
    }
}

/// Where a region keeps its resources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A directory laid out like a store.
    Dir(PathBuf),
    /// An S3-compatible bucket and prefix holding the resources; the region's key store,
    /// locks and scratch space stay in `STORE/regions/NAME`.
    S3(crate::objstore::S3Url),
}

impl Location {
    /// Parse `--location`: a directory path (made absolute).
    pub fn parse(s: &str) -> Result<Location> {
        if s.starts_with("s3://") {
            return Ok(Location::S3(crate::objstore::S3Url::parse(s)?));
        }
        if s.contains("://") {
            return Err(err!(
                InvalidInput,
                "unknown location '{s}' (give a directory)"
            ));
        }
        if s.is_empty() {
            return Err(err!(InvalidInput, "empty location"));
        }
        let p = std::path::absolute(s)
            .map_err(|e| crate::Error::from(e).context(format!("location {s}")))?;
        Ok(Location::Dir(normalize(&p)))
    }

    pub fn uri(&self) -> String {
        match self {
            Location::Dir(p) => p.display().to_string(),
            Location::S3(u) => u.uri(),
        }
    }
}

/// Which service holds a region's CMKs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyService {
    /// The key store in the region's location, sealed under its root key (SPEC §2).
    Local,
    /// A KMIP server or a PKCS#11 token, by URI (SPEC §8); encimg's records of its keys
    /// stay in the region's key store.
    External(String),
}

impl KeyService {
    /// Parse `--kms`: `local` (the default).
    pub fn parse(s: &str) -> Result<KeyService> {
        match s {
            "" | "local" => Ok(KeyService::Local),
            s if s.starts_with("kmip://") || s.starts_with("pkcs11:") => Ok(KeyService::External(
                crate::kms::service::External::parse(s)?.uri(),
            )),
            s => Err(err!(
                InvalidInput,
                "unknown key service '{s}' (use local, kmip://HOST:PORT?… or pkcs11:…)"
            )),
        }
    }

    pub fn uri(&self) -> String {
        match self {
            KeyService::Local => "local".into(),
            KeyService::External(uri) => uri.clone(),
        }
    }
}

/// One region.
#[derive(Clone, Debug)]
pub struct Region {
    pub name: String,
    pub location: Location,
    pub kms: KeyService,
    pub created: u64,
    /// An S3 region's endpoint, as the environment named it when the region was added
    /// ([`crate::objstore::AWS`]: AWS's own; None: a record from before it was kept).
    pub endpoint: Option<String>,
}

impl Region {
    /// The region's directory (for an S3 region: its local part, `home/regions/NAME`).
    pub fn dir_in(&self, home: &Path) -> PathBuf {
        match &self.location {
            Location::Dir(p) => p.clone(),
            Location::S3(_) => home.join("regions").join(&self.name),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "location": self.location.uri(),
            "kms": self.kms.uri(),
            "endpoint": self.endpoint,
            "created": (self.created > 0).then(|| sys::rfc3339(self.created)),
        })
    }
}

/// `HOME/regions.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct RegionFile {
    format: u32,
    regions: Vec<RegionRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct RegionRecord {
    name: String,
    location: String,
    kms: String,
    created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
}

impl RegionRecord {
    fn region(&self) -> Result<Region> {
        Ok(Region {
            name: self.name.clone(),
            location: Location::parse(&self.location)?,
            kms: KeyService::parse(&self.kms)?,
            created: self.created,
            endpoint: self.endpoint.clone(),
        })
    }
}

/// The regions of a store (its home directory).
#[derive(Clone, Debug)]
pub struct Regions {
    home: PathBuf,
}

impl Regions {
    pub fn new(home: &Path) -> Regions {
        Regions {
            home: home.to_path_buf(),
        }
    }

    fn path(&self) -> PathBuf {
        self.home.join("regions.json")
    }

    fn load(&self) -> Result<RegionFile> {
        let p = self.path();
        if !sys::entry_exists(&p) {
            return Ok(RegionFile {
                format: 1,
                regions: Vec::new(),
            });
        }
        let bytes = sys::read_regular(&p, 1 << 20).map_err(|e| e.context("region list"))?;
        let f: RegionFile = serde_json::from_slice(&bytes)
            .map_err(|e| err!(Corrupt, "region list {} is damaged: {e}", p.display()))?;
        if f.format != 1 {
            return Err(err!(
                Corrupt,
                "region list {} has unsupported format {}",
                p.display(),
                f.format
            ));
        }
        Ok(f)
    }

    fn lock(&self) -> Result<FileLock> {
        sys::private_dir(&self.home.join("locks"))?;
        FileLock::exclusive(&self.home.join("locks").join("regions"))
    }

    /// The local region (the home directory itself).
    fn local(&self) -> Region {
        Region {
            name: LOCAL.into(),
            location: Location::Dir(self.home.clone()),
            kms: KeyService::Local,
            created: 0,
            endpoint: None,
        }
    }

    /// Every region, `local` first.
    pub fn list(&self) -> Result<Vec<Region>> {
        let mut out = vec![self.local()];
        for r in self.load()?.regions {
            out.push(r.region()?);
        }
        Ok(out)
    }

    /// A region by name; an unknown one is bad input (exit 2).
    pub fn get(&self, name: &str) -> Result<Region> {
        validate_name(name)?;
        if name == LOCAL {
            return Ok(self.local());
        }
        match self.load()?.regions.iter().find(|r| r.name == name) {
            Some(r) => r.region(),
            None => Err(err!(
                InvalidInput,
                "unknown region '{name}' (see `encimg region list`; add it with `encimg region add {name}`)"
            )),
        }
    }

    /// The store of region `name`: the one place a region name becomes a location and a
    /// key service.
    pub fn store(&self, name: &str) -> Result<Store> {
        validate_name(name)?;
        if name != LOCAL && !self.load()?.regions.iter().any(|r| r.name == name) {
            // Before regions, `--region` only scoped keys in the home key store; a store
            // that has such keys keeps them reachable the old way.
            let legacy = Store::at(&self.home, name);
            if legacy.keys.has_region_keys().unwrap_or(false) {
                return Ok(legacy);
            }
        }
        let r = self.get(name)?;
        let dir = r.dir_in(&self.home);
        let store = match &r.kms {
            KeyService::Local => Store::in_region(&self.home, &dir, &r.name),
            KeyService::External(uri) => Store::in_region(&self.home, &dir, &r.name)
                .with_key_service(Some(crate::kms::service::service(uri)?)),
        };
        Ok(match &r.location {
            Location::Dir(_) => store,
            Location::S3(u) => store.with_remote(Some(std::sync::Arc::new(
                crate::objstore::ObjStore::open_at(u, r.endpoint.as_deref())?,
            ))),
        })
    }

    /// Register a new region and make its store (directories, key store, service key).
    pub fn add(&self, name: &str, location: Option<&str>, kms: Option<&str>) -> Result<Region> {
        validate_name(name)?;
        if name == LOCAL {
            return Err(err!(
                AlreadyExists,
                "region local is the store itself and always exists"
            ));
        }
        let kms = KeyService::parse(kms.unwrap_or("local"))?;
        let location = match location {
            Some(l) => Location::parse(l)?,
            None => Location::Dir(self.home.join("regions").join(name)),
        };
        let _lock = self.lock()?;
        let mut file = self.load()?;
        if file.regions.iter().any(|r| r.name == name) {
            return Err(err!(AlreadyExists, "region {name} already exists"));
        }
        let dir = &match &location {
            Location::Dir(d) => d.clone(),
            Location::S3(_) => self.home.join("regions").join(name),
        };
        let home = normalize(&self.home);
        let mut taken = vec![(LOCAL.to_string(), home.clone())];
        for r in &file.regions {
            match Location::parse(&r.location)? {
                Location::Dir(d) => taken.push((r.name.clone(), d)),
                Location::S3(u) => {
                    // The same bucket and prefix at another endpoint is another place (one
                    // spelt differently is caught by the key store found there).
                    let here = crate::objstore::endpoint_to_record();
                    if matches!(&location, Location::S3(v) if v == &u)
                        && crate::objstore::may_be_same_endpoint(r.endpoint.as_deref(), Some(&here))
                    {
                        return Err(err!(
                            InvalidInput,
                            "location {} is region {}'s already",
                            u.uri(),
                            r.name
                        ));
                    }
                    taken.push((r.name.clone(), self.home.join("regions").join(&r.name)));
                }
            }
        }
        for (other, d) in &taken {
            let nested_in_home = other == LOCAL && dir.starts_with(home.join("regions"));
            if dir == d || (d.starts_with(dir)) || (dir.starts_with(d) && !nested_in_home) {
                return Err(err!(
                    InvalidInput,
                    "location {} overlaps region {other}'s ({})",
                    dir.display(),
                    d.display()
                ));
            }
        }
        // An S3 region's local directory is encimg's own (root key, locks, cache): what
        // is in it is checked against the key store in the bucket when that is read.
        if matches!(location, Location::Dir(_)) {
            check_location(dir, name)?;
        }
        let existed = dir.exists();
        let region = Region {
            name: name.to_string(),
            location: location.clone(),
            kms,
            created: sys::now(),
            endpoint: match location {
                Location::S3(_) => Some(crate::objstore::endpoint_to_record()),
                Location::Dir(_) => None,
            },
        };
        let service = match &region.kms {
            KeyService::Local => None,
            KeyService::External(uri) => {
                let s = crate::kms::service::service(uri)?;
                s.check()?;
                Some(s)
            }
        };
        let mut store = Store::in_region(&self.home, dir, name).with_key_service(service);
        if let Location::S3(u) = &location {
            // The bucket must answer, to these credentials, before anything is made.
            let os = std::sync::Arc::new(crate::objstore::ObjStore::open(u)?);
            os.list("")?;
            store = store.with_remote(Some(os));
        }
        // Undo what this add made, and only that. A key-store object it made stays, with
        // the local root key it is sealed under: another host may have joined it (which
        // changes nothing in it), and adding the region again here takes it.
        let undo = |made: bool, made_obj: Option<&[u8]>| {
            if made_obj.is_none() && (made || !existed) {
                remove_region_files(dir);
            }
        };
        if let Location::S3(_) = &location {
            // Resources with no key store (it was lost or removed while they stayed): a new,
            // empty one would be taken for theirs.
            let has_store = store.keys.object_is_live()?;
            if !has_store && !store.remote_list(None)?.is_empty() {
                undo(false, None);
                return Err(err!(
                    Refused,
                    "{} holds resources but no key store: restore its keys/keystore.json, or choose another location",
                    location.uri()
                ));
            }
        }
        let made = store.init().inspect_err(|_| undo(false, None))?;
        let made_obj = if store.remote.is_some() {
            store
                .keys
                .make_object(|k| k.service_key().map(drop))
                .inspect_err(|_| undo(made, None))?
        } else {
            None
        };
        // The service key is made at the service: this checks that it answers and takes our
        // credentials (and for a key store found in a bucket, that it opens here). If it
        // cannot, nothing of the region is left behind.
        if let Err(e) = store.keys.update(|k| k.service_key()) {
            undo(made, made_obj.as_deref());
            return Err(e);
        }
        file.format = 1;
        file.regions.push(RegionRecord {
            name: name.to_string(),
            location: location.uri(),
            kms: region.kms.uri(),
            created: region.created,
            endpoint: region.endpoint.clone(),
        });
        save(&self.path(), &file)?;
        Ok(region)
    }

    /// Forget a region and remove what encimg made in its location; refused while it holds
    /// resources or keys other than its service key, or is mounted.
    pub fn remove(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        if name == LOCAL {
            return Err(err!(
                Refused,
                "region local is the store itself and cannot be removed"
            ));
        }
        let _lock = self.lock()?;
        let mut file = self.load()?;
        let region = self.get(name)?;
        let store = self.store(name)?;
        let held = if store.remote.is_some() {
            store.remote_list(None)?
        } else {
            store.list(None).unwrap_or_default()
        };
        if !held.is_empty() {
            let names: Vec<String> = held.iter().take(5).map(|r| r.to_string()).collect();
            return Err(err!(
                Refused,
                "region {name} holds {} resource(s) ({}{}): delete or copy them out first",
                held.len(),
                names.join(", "),
                if held.len() > 5 { ", …" } else { "" }
            ));
        }
        // An object-storage region's key store is read as it is in the bucket now, and
        // removed only if it is still that one; one already gone (removed on another host)
        // holds nothing.
        let object = if store.remote.is_some() {
            match store.keys.object_state() {
                Ok(o) => Some(o),
                // A key store this host cannot take (removed and made again elsewhere, or
                // altered): the region is forgotten here, and nothing in the bucket touched.
                Err(e) if e.kind == crate::error::ErrorKind::Corrupt => {
                    tracing::warn!("region {name}: {e}; forgetting it here only");
                    Some(None)
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let keys = match &object {
            Some(Some((_, held))) => held.clone(),
            Some(None) => Vec::new(),
            None => store.keys.read(|k| Ok(k.held()))?,
        };
        if !keys.is_empty() {
            return Err(err!(
                Refused,
                "region {name} holds {} key(s) ({}): schedule their deletion and wait, or keep the region",
                keys.len(),
                keys.join(", ")
            ));
        }
        let _mount = if store.root.is_dir() {
            Some(
                FileLock::try_exclusive_dir(&store.root)?
                    .ok_or_else(|| err!(Busy, "region {name} is mounted: unmount it first"))?,
            )
        } else {
            None
        };
        file.regions.retain(|r| r.name != name);
        if let Some(Some((etag, _))) = &object {
            // Only the service key's record is left in it (checked above), and no resource
            // (checked again once no host can wrap a data key under it).
            store
                .keys
                .remove_object(etag.as_deref(), || Ok(store.remote_list(None)?.is_empty()))?;
        }
        save(&self.path(), &file)?;
        let dir = region.dir_in(&self.home);
        if matches!(region.location, Location::S3(_)) {
            // Its local copies and the CLI's locks are encimg's own.
            let _ = std::fs::remove_dir_all(dir.join("cache"));
            let _ = std::fs::remove_dir_all(dir.join("locks").join("cli"));
        }
        remove_region_files(&dir);
        Ok(())
    }
}

/// Write the region list atomically.
fn save(path: &Path, f: &RegionFile) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(f).map_err(|e| err!(Io, "{e}"))?;
    sys::write_atomic(path, &bytes)
}

/// `a/./b/../c` → `a/c`, without touching the filesystem.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// A new region's directory: absent, empty, or a store of this very region (re-added).
fn check_location(dir: &Path, name: &str) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(crate::Error::from(e).context(format!("location {}", dir.display()))),
        Ok(m) if !m.is_dir() => {
            return Err(err!(
                InvalidInput,
                "location {} is not a directory",
                dir.display()
            ))
        }
        Ok(_) => {}
    }
    let mut entries = std::fs::read_dir(dir)
        .map_err(|e| crate::Error::from(e).context(format!("location {}", dir.display())))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string());
    if entries.next().is_none() {
        return Ok(());
    }
    // A store made for this region before (its registration lost, or removed and re-added)
    // may come back; anything else is refused.
    let ks = Store::in_region(dir, dir, name);
    let same = ks
        .keys
        .read(|k| Ok(k.file.keys.iter().all(|key| key.region == name)))
        .unwrap_or(false);
    if same {
        return Ok(());
    }
    Err(err!(
        InvalidInput,
        "location {} is not empty and holds no store of region {name}",
        dir.display()
    ))
}

/// Remove the files a region's store consists of, then its directory if empty.
fn remove_region_files(dir: &Path) {
    for f in [
        "keys/keystore.json",
        "keys/root.key",
        "keys/generation",
        "keys/.lock",
        "mount.log",
        "locks/store.mount",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    for d in ["locks", "jobs", "tmp"] {
        if let Ok(rd) = std::fs::read_dir(dir.join(d)) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    for d in [
        "images",
        "disks",
        "snapshots",
        "locks",
        "tmp",
        "jobs",
        "keys",
        "",
    ] {
        let _ = std::fs::remove_dir(dir.join(d));
    }
}
