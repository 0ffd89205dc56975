//! Resources of an object-storage region (SPEC §9), kept in S3 as fixed-size block objects
//! under a pointer:
//!
//! ```text
//! PREFIX/KIND/NAME.obj/ptr               {"version": V, "encrypted": …, "file_len": …,
//!                                         "header": the header's two copies, hex,
//!                                         "blocks": the blocks pushed, a bitmap, hex}
//! PREFIX/KIND/NAME.obj/V/BLOCK           bytes [BLOCK × 4 MiB, …) of the resource's file
//! ```
//!
//! The file is the same as in a directory region (header, then §4's per-sector ciphertext),
//! cut into 4 MiB blocks; a block that is all hole is not stored. A new version's blocks
//! are written first and the pointer last (one PUT, atomic): a crash leaves the old version
//! whole, or the new one. The old version's blocks go after the pointer moved.
//!
//! The CLI works on an S3 region by bringing what a command reads into the region's local
//! directory, running the command there as in a directory region, sending what it wrote
//! back (blocks, then pointer) and removing the local copies.

use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

use super::{ResPath, Store};
use crate::err;
use crate::error::{IoContext, Result};
use crate::format::Kind;
use crate::sys;

/// Bytes per block object.
pub const BLOCK: u64 = 4 << 20;
/// Blocks fetched ahead of a sequential reader (besides the one it reads).
const PREFETCH: u64 = 7;
/// The unit a read fetches on a miss, and of the record of what is present: 64 of them to
/// a block, so a block's chunks are one `u64` mask.
const CHUNK: u64 = 64 << 10;
/// Whole-block fetches in the background at most at once (a random reader's misses start
/// one each; past this, the rest of a block is fetched only when read).
const BACKGROUND: usize = 16;
/// How long a pointer read by a lookup stands for the open that follows it.
const POINTER_FRESH: std::time::Duration = std::time::Duration::from_secs(2);
/// Bytes of the header area the pointer carries: both copies of the header.
const HEADER_BYTES: usize = 2 * crate::format::HEADER_COPY_LEN;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Pointer {
    version: String,
    encrypted: bool,
    file_len: u64,
    /// The header's two copies (hex), so a lookup and first open need no GET of block 0.
    /// Absent in pointers written before it was added: block 0 is fetched then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    header: Option<String>,
    /// Which blocks the version holds: a bitmap (block n is bit n % 8 of byte n / 8), hex,
    /// of those it was pushed with and those a mount stored since (added after it sent
    /// them, see [`Window::record`]). A block it names that the server does not have was
    /// lost, not a hole; for one it does not name, the listing speaks. Absent in pointers
    /// written before it was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    blocks: Option<String>,
}

impl Pointer {
    /// The block map's bytes (empty without one); see [`recorded_in`].
    fn blocks_map(&self) -> Vec<u8> {
        self.blocks
            .as_deref()
            .and_then(|b| hex::decode(b).ok())
            .unwrap_or_default()
    }
}

/// Whether block map `map` names block `n` as stored.
fn recorded_in(map: &[u8], n: u64) -> bool {
    usize::try_from(n / 8)
        .ok()
        .and_then(|i| map.get(i))
        .is_some_and(|b| b & (1 << (n % 8)) != 0)
}

/// Name block `n` as stored in block map `map` (grown to hold it).
fn record_in(map: &mut Vec<u8>, n: u64) {
    let i = (n / 8) as usize;
    if map.len() <= i {
        map.resize(i + 1, 0);
    }
    map[i] |= 1 << (n % 8);
}

/// A block the pointer's map or the version's listing names, which the server does not have.
fn lost(what: impl std::fmt::Display, n: u64) -> crate::Error {
    err!(
        Corrupt,
        "{what}: block {n} is stored, but the object store has none"
    )
}

/// What a mount of an object-storage region keeps of its objects between calls: pointers
/// just read (a lookup's, for the open that follows) and the windows of resources opened.
#[derive(Default)]
pub struct Views {
    /// With the resource's generation (see [`Store::bump_generation`]) read before it.
    #[allow(clippy::type_complexity)]
    pointers: std::sync::Mutex<
        std::collections::HashMap<ResPath, (std::time::Instant, Pointer, Option<String>)>,
    >,
    windows: std::sync::Mutex<std::collections::HashMap<ResPath, std::sync::Arc<Window>>>,
}

impl std::fmt::Debug for Views {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Views")
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn obj(r: &ResPath) -> String {
    format!("{}/{}.obj", r.kind.dir(), r.name)
}

impl Store {
    fn objects(&self) -> Result<&crate::objstore::ObjStore> {
        self.remote.as_deref().ok_or_else(|| {
            err!(
                InvalidInput,
                "region {} is not in object storage",
                self.region
            )
        })
    }

    fn pointer(&self, r: &ResPath) -> Result<Option<Pointer>> {
        Ok(self.pointer_and_generation(r)?.map(|(p, _)| p))
    }

    /// The pointer of `r`, and the generation it was read at (read first: a push after
    /// it makes the pair look old, never new).
    fn pointer_and_generation(&self, r: &ResPath) -> Result<Option<(Pointer, Option<String>)>> {
        let generation = self.generation(r);
        let Some(bytes) = self.objects()?.get(&format!("{}/ptr", obj(r)))? else {
            lock(&self.views.pointers).remove(r);
            return Ok(None);
        };
        let p: Pointer = serde_json::from_slice(&bytes)
            .map_err(|e| err!(Corrupt, "{r}: its pointer object is damaged: {e}"))?;
        // Only the recent ones are kept (a pointer carries 16 KiB of header).
        let mut recent = lock(&self.views.pointers);
        recent.retain(|_, (at, _, _)| at.elapsed() < POINTER_FRESH);
        recent.insert(
            r.clone(),
            (std::time::Instant::now(), p.clone(), generation.clone()),
        );
        Ok(Some((p, generation)))
    }

    /// The pointer of `r` and its generation: the ones a lookup read just now (taken), else
    /// read again.
    fn recent_pointer(&self, r: &ResPath) -> Result<(Pointer, Option<String>)> {
        let recent = lock(&self.views.pointers)
            .remove(r)
            .filter(|(at, _, _)| at.elapsed() < POINTER_FRESH)
            .map(|(_, p, g)| (p, g));
        match recent {
            Some(pg) => Ok(pg),
            None => self
                .pointer_and_generation(r)?
                .ok_or_else(|| err!(NotFound, "no resource {r}")),
        }
    }

    /// The file whose content changes each time the CLI gives `r` a new version or deletes
    /// it, in the region's locks (shared with a mount of it on this host).
    fn generation_path(&self, r: &ResPath) -> std::path::PathBuf {
        self.open_lock_path(r).with_extension("generation")
    }

    fn generation(&self, r: &ResPath) -> Option<String> {
        sys::read_regular(&self.generation_path(r), 64)
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// Say that `r` has a new version or is gone: a mount's window made before is then
    /// stale at its next open, however recent the pointer it was made from.
    fn bump_generation(&self, r: &ResPath) {
        let mut g = [0u8; 8];
        crate::crypto::random_fill(&mut g);
        let p = self.generation_path(r);
        if let Some(d) = p.parent() {
            let _ = sys::private_dir(d);
        }
        if let Err(e) = sys::write_atomic(&p, hex::encode(g).as_bytes()) {
            tracing::warn!("{r}: cannot record its new version for a mount: {e}");
        }
    }

    /// Whether the object store holds `r`.
    pub fn remote_exists(&self, r: &ResPath) -> Result<bool> {
        Ok(self.pointer(r)?.is_some())
    }

    /// Bring `r` into the local directory: every block, or (`header_only`) only its header
    /// in a sparse file of the whole length (enough for `info`, `list`, `dek`).
    pub fn pull(&self, r: &ResPath, header_only: bool) -> Result<()> {
        let p = self
            .pointer(r)?
            .ok_or_else(|| err!(NotFound, "no resource {r}"))?;
        self.pull_from(r, &p, header_only).map(drop)
    }

    /// [`pull`](Self::pull) of the version `p` names; returns the local copy, open for
    /// reading and writing.
    fn pull_from(&self, r: &ResPath, p: &Pointer, header_only: bool) -> Result<std::fs::File> {
        let os = self.objects()?;
        let dest = self.file_for(r, p.encrypted);
        let tmp = sys::temp_path(&self.root.join("tmp"), "pull");
        let f = sys::create_private(&tmp)?;
        let result = (|| {
            f.set_len(p.file_len).ctx("sizing")?;
            let prefix = format!("{}/{}/", obj(r), p.version);
            let keys = if !header_only {
                os.list(&prefix)?
            } else if !p.encrypted {
                vec![] // no header: nothing to bring
            } else if let Some(h) = header_in(p) {
                f.write_all_at(&h, 0).ctx("writing")?;
                vec![]
            } else {
                // The header is in block 0: one GET, no listing.
                vec![(format!("{prefix}0"), 0)]
            };
            if !header_only {
                let listed: std::collections::HashSet<u64> = keys
                    .iter()
                    .filter_map(|(k, _)| k.rsplit('/').next()?.parse().ok())
                    .collect();
                // Decoded once: a 1 TiB resource's map is 32 KiB, for 262,144 blocks.
                let map = p.blocks_map();
                if let Some(n) = (0..p.file_len.div_ceil(BLOCK))
                    .find(|n| recorded_in(&map, *n) && !listed.contains(n))
                {
                    return Err(lost(r, n));
                }
            }
            for (key, _) in keys {
                let n: u64 = key
                    .rsplit('/')
                    .next()
                    .and_then(|b| b.parse().ok())
                    .ok_or_else(|| err!(Corrupt, "{r}: a stray object {key}"))?;
                let Some(data) = os.get(&key)? else {
                    if header_only {
                        continue; // a hole
                    }
                    return Err(err!(Corrupt, "{r}: block {n} vanished"));
                };
                if n * BLOCK + data.len() as u64 > p.file_len {
                    return Err(err!(Corrupt, "{r}: block {n} runs past the end"));
                }
                f.write_all_at(&data, n * BLOCK).ctx("writing")?;
            }
            f.sync_all().ctx("syncing")?;
            std::fs::rename(&tmp, &dest).ctx(dest.display())
        })();
        match result {
            Ok(()) => Ok(f),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Send the local `r` to the object store as a new version, then remove it locally.
    pub fn push(&self, r: &ResPath) -> Result<()> {
        let os = self.objects()?;
        let (path, encrypted) = self.find(r)?;
        let f = sys::open_regular(&path, false)?;
        let len = f.metadata().ctx(path.display())?.len();
        let old = self.pointer(r)?;
        let mut v = [0u8; 8];
        crate::crypto::random_fill(&mut v);
        let version = hex::encode(v);
        let mut buf = vec![0u8; BLOCK as usize];
        let mut map = vec![0u8; len.div_ceil(BLOCK).div_ceil(8) as usize];
        let sent = (|| -> Result<()> {
            for (off, elen) in sys::data_extents(&f, len) {
                let first = off / BLOCK;
                let last = (off + elen - 1) / BLOCK;
                for n in first..=last {
                    let start = n * BLOCK;
                    let size = BLOCK.min(len - start) as usize;
                    super::backing::pread_full(&f, &mut buf[..size], start)?;
                    os.put(&format!("{}/{version}/{n}", obj(r)), &buf[..size])?;
                    record_in(&mut map, n);
                }
            }
            Ok(())
        })();
        if let Err(e) = sent {
            // No pointer names this version: its blocks would stay in the bucket for good.
            self.drop_version(r, &version);
            return Err(e);
        }
        let header = if encrypted && len >= HEADER_BYTES as u64 {
            let mut h = vec![0u8; HEADER_BYTES];
            super::backing::pread_full(&f, &mut h, 0)?;
            Some(hex::encode(h))
        } else {
            None
        };
        let ptr = Pointer {
            version: version.clone(),
            encrypted,
            file_len: len,
            header,
            blocks: Some(hex::encode(&map)),
        };
        os.put(
            &format!("{}/ptr", obj(r)),
            &serde_json::to_vec(&ptr).map_err(|e| err!(Io, "{e}"))?,
        )?;
        // The region removed by another host while this was sent (its `region remove` puts
        // a tombstone, then lists the resources): this version is taken back, so that no
        // resource stays whose key store is gone. Either the removal's listing saw the
        // pointer (and it put the key store back), or this sees the tombstone.
        // (A resource that was there already kept the region from being removed.)
        if old.is_none() && !self.keys.object_is_live()? {
            let _ = os.delete(&format!("{}/ptr", obj(r)));
            self.drop_version(r, &version);
            return Err(err!(
                Busy,
                "region {} was removed meanwhile (by another host?): {r} was not stored",
                self.region
            ));
        }
        // After the pointer moved (a mount reads the generation before the pointer): a
        // window made from the old pointer holds an old generation.
        self.bump_generation(r);
        if let Some(old) = old {
            self.drop_version(r, &old.version);
        }
        let _ = std::fs::remove_file(&path);
        Ok(())
    }

    fn drop_version(&self, r: &ResPath, version: &str) {
        if let Ok(os) = self.objects() {
            if let Ok(keys) = os.list(&format!("{}/{version}/", obj(r))) {
                for (k, _) in keys {
                    let _ = os.delete(&k);
                }
            }
        }
    }

    /// Delete `r` from the object store: the pointer first (it is gone at once), then its
    /// blocks.
    pub fn remote_delete(&self, r: &ResPath) -> Result<()> {
        let os = self.objects()?;
        let p = self
            .pointer(r)?
            .ok_or_else(|| err!(NotFound, "no resource {r}"))?;
        os.delete(&format!("{}/ptr", obj(r)))?;
        self.bump_generation(r);
        self.drop_version(r, &p.version);
        Ok(())
    }

    /// The resources the object store holds, sorted.
    pub fn remote_list(&self, kind: Option<Kind>) -> Result<Vec<ResPath>> {
        let os = self.objects()?;
        let mut out = Vec::new();
        for k in Kind::ALL {
            if kind.is_some_and(|want| want != k) {
                continue;
            }
            for (key, _) in os.list(&format!("{}/", k.dir()))? {
                let Some(name) = key
                    .strip_prefix(&format!("{}/", k.dir()))
                    .and_then(|s| s.strip_suffix(".obj/ptr"))
                else {
                    continue;
                };
                if super::validate_name(name).is_ok() {
                    out.push(ResPath {
                        kind: k,
                        name: name.to_string(),
                    });
                }
            }
        }
        out.sort_by(|a, b| (a.kind.dir(), &a.name).cmp(&(b.kind.dir(), &b.name)));
        Ok(out)
    }

    /// Whether a mount has `r` open or opened before (its window is kept).
    pub fn has_window(&self, r: &ResPath) -> bool {
        lock(&self.views.windows).contains_key(r)
    }

    /// For a mount, at a first open of `r` whose window it kept: whether the window is still
    /// on the version the object store's pointer names. A rekey or a push by the CLI since
    /// makes a new version and drops the old one, whose blocks the window would then find
    /// missing and take for holes (one GET: the pointer, for a window a volume has used).
    pub fn window_is_current(&self, r: &ResPath) -> Result<bool> {
        let Some(w) = lock(&self.views.windows).get(r).cloned() else {
            return Ok(false);
        };
        // The CLI on this host gave it a new version (or deleted it) since.
        if self.generation(r) != w.generation {
            return Ok(false);
        }
        if !w.used.load(std::sync::atomic::Ordering::SeqCst) && w.made.elapsed() < POINTER_FRESH {
            // Made from a lookup's pointer just now (a cold image's first open costs no
            // second GET of it). One made longer ago is checked like a used one: another
            // host may have given the resource a new version since, which no generation
            // file here tells.
            return Ok(true);
        }
        // Read now: a lookup's pointer, a second old, may predate the rekey.
        let p = self
            .pointer(r)?
            .ok_or_else(|| err!(NotFound, "no resource {r}"))?;
        Ok(w.version == p.version)
    }

    /// For a mount: bring `r`'s header into a local copy (from the pointer a lookup just
    /// read, so no GET at all if it carries the header) and keep a window on its objects
    /// for [`fetcher`](Self::fetcher).
    pub fn pull_window(&self, r: &ResPath) -> Result<()> {
        let (p, generation) = self.recent_pointer(r)?;
        let file = self.pull_from(r, &p, true)?;
        let os = self
            .remote
            .clone()
            .ok_or_else(|| err!(InvalidInput, "not an S3 region"))?;
        let w = Window::new(os, file, r, &p, generation);
        lock(&self.views.windows).insert(r.clone(), w);
        Ok(())
    }

    /// For a mount: the window on `r`'s objects made by [`pull_window`](Self::pull_window).
    /// Reads fetch the chunks they need, each once (a whole block ahead of a sequential
    /// reader, and the rest of a block after a random reader's miss, in the background);
    /// writes mark their blocks, and a flush (fsync, close) PUTs each marked block whole.
    /// One PUT replaces one object atomically, so a block in the store is always one
    /// flush's whole content, never torn.
    pub fn fetcher(&self, r: &ResPath) -> Result<super::backing::Fetch> {
        if !self.has_window(r) {
            self.pull_window(r)?;
        }
        let w = lock(&self.views.windows)
            .get(r)
            .cloned()
            .ok_or_else(|| err!(NotFound, "no resource {r}"))?;
        w.used.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(w)
    }

    /// Remove a local copy brought in by [`pull`](Self::pull).
    pub fn drop_local(&self, r: &ResPath) {
        lock(&self.views.windows).remove(r);
        if let Ok((path, _)) = self.find(r) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The header's bytes the pointer carries, if they hold a header with no re-encryption under
/// way (one under way also needs its journal, in block 0).
fn header_in(p: &Pointer) -> Option<Vec<u8>> {
    let h = hex::decode(p.header.as_deref()?).ok()?;
    let usable = h.len() == HEADER_BYTES
        && h.chunks(crate::format::HEADER_COPY_LEN)
            .filter_map(|c| crate::format::Header::decode(c).ok())
            .max_by_key(|x| x.seq)
            .is_some_and(|x| x.reencrypt.is_none());
    usable.then_some(h)
}

/// Chunk masks of one block.
fn mask(lo: u64, hi: u64) -> u64 {
    // Chunks lo..=hi (at most 63).
    let n = hi - lo + 1;
    (if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }) << lo
}

/// A local copy of a resource's blocks, fetched on demand and sent back on flush.
pub struct Window {
    os: std::sync::Arc<crate::objstore::ObjStore>,
    file: std::fs::File,
    prefix: String,
    what: String,
    file_len: u64,
    /// Chunks present locally and chunks being fetched, and the reader's pattern.
    state: std::sync::Mutex<Chunks>,
    arrived: std::sync::Condvar,
    /// Whole-block fetches under way in the background.
    background: std::sync::atomic::AtomicUsize,
    dirty: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// One flush at a time.
    flushing: std::sync::Mutex<()>,
    /// Which blocks this version has in the store, listed at the first GET that finds none
    /// (so the first byte of a resource costs no listing). See [`Window::hole_or_lost`].
    listed: std::sync::Mutex<Option<std::collections::HashSet<u64>>>,
    /// The pointer's map of the blocks the version was pushed with, and those this window
    /// sent since (it adds them to the pointer's map after sending them).
    recorded: std::sync::Mutex<Vec<u8>>,
    /// The pointer's object, and the version this window is of.
    pointer_key: String,
    version: String,
    /// Itself, for the threads that fetch ahead.
    this: std::sync::Weak<Window>,
    /// A volume has read through it: kept after a close, it is checked against the pointer
    /// at the next open (see [`Store::window_is_current`]).
    used: std::sync::atomic::AtomicBool,
    /// The resource's generation when the pointer it was made from was read.
    generation: Option<String>,
    /// When it was made.
    made: std::time::Instant,
}

struct Chunks {
    /// Per block, a mask of its chunks present locally.
    have: std::collections::HashMap<u64, u64>,
    /// Per block, a mask of its chunks being fetched (by a reader or in the background).
    inflight: std::collections::HashMap<u64, u64>,
    /// Where the last read ended, and how many bytes in a row were read up to it (a
    /// sequential reader's window grows with it).
    next: u64,
    streak: u64,
}

impl Chunks {
    fn have(&self, n: u64) -> u64 {
        self.have.get(&n).copied().unwrap_or(0)
    }
    fn inflight(&self, n: u64) -> u64 {
        self.inflight.get(&n).copied().unwrap_or(0)
    }
}

impl Window {
    fn new(
        os: std::sync::Arc<crate::objstore::ObjStore>,
        file: std::fs::File,
        r: &ResPath,
        p: &Pointer,
        generation: Option<String>,
    ) -> std::sync::Arc<Window> {
        let start = if p.encrypted {
            crate::format::DATA_OFFSET
        } else {
            0
        };
        std::sync::Arc::new_cyclic(|this| {
            let mut w = Window {
                os,
                file,
                prefix: format!("{}/{}", obj(r), p.version),
                what: r.to_string(),
                file_len: p.file_len,
                state: std::sync::Mutex::new(Chunks {
                    have: Default::default(),
                    inflight: Default::default(),
                    // A reader starting at the payload's start counts as sequential.
                    next: start,
                    streak: 0,
                }),
                arrived: std::sync::Condvar::new(),
                background: Default::default(),
                dirty: Default::default(),
                flushing: Default::default(),
                listed: Default::default(),
                recorded: std::sync::Mutex::new(p.blocks_map()),
                pointer_key: format!("{}/ptr", obj(r)),
                version: p.version.clone(),
                this: this.clone(),
                used: Default::default(),
                generation,
                made: std::time::Instant::now(),
            };
            // Block 0 of an encrypted resource is its header area: the mount reads only the
            // header from it (and never writes it), so the pointer's copy of the header
            // stands for the block.
            if p.encrypted && p.file_len > 0 {
                let full = w.full(0);
                w.state
                    .get_mut()
                    .unwrap_or_else(|e| e.into_inner())
                    .have
                    .insert(0, full);
            }
            w
        })
    }

    /// Bytes in block `n`.
    fn block_len(&self, n: u64) -> u64 {
        BLOCK.min(self.file_len.saturating_sub(n * BLOCK))
    }

    /// The mask of all of block `n`'s chunks.
    fn full(&self, n: u64) -> u64 {
        match self.block_len(n) {
            0 => 0,
            l => mask(0, (l - 1) / CHUNK),
        }
    }

    /// Per block touched by `[off, off + len)`, the mask of the chunks it touches.
    fn touched(&self, off: u64, len: usize) -> Vec<(u64, u64)> {
        let end = (off + len as u64).min(self.file_len);
        if off >= end {
            return vec![];
        }
        let (first, last) = (off / BLOCK, (end - 1) / BLOCK);
        (first..=last)
            .map(|n| {
                let a = off.max(n * BLOCK) - n * BLOCK;
                let b = end.min((n + 1) * BLOCK) - n * BLOCK;
                (n, mask(a / CHUNK, (b - 1) / CHUNK))
            })
            .collect()
    }

    /// Fetch the chunks `m` of block `n` (marked in flight by the caller) in one ranged GET,
    /// write them, and record them as present (or, on failure, as not in flight).
    fn get_chunks(&self, n: u64, m: u64) -> Result<()> {
        let r = self.read_chunks(n, m);
        {
            let mut st = lock(&self.state);
            *st.inflight.entry(n).or_default() &= !m;
            if r.is_ok() {
                *st.have.entry(n).or_default() |= m;
            }
        }
        self.arrived.notify_all();
        r
    }

    fn read_chunks(&self, n: u64, m: u64) -> Result<()> {
        let (lo, hi) = (
            u64::from(m.trailing_zeros()),
            63 - u64::from(m.leading_zeros()),
        );
        let blen = self.block_len(n);
        let off = lo * CHUNK;
        let len = ((hi + 1) * CHUNK).min(blen) - off;
        let key = format!("{}/{n}", self.prefix);
        let data = if off == 0 && len == blen {
            self.os.get(&key)?
        } else {
            self.os.get_range(&key, off, len)?
        };
        // An absent block is a hole: nothing to write.
        let Some(data) = data else {
            return self.hole_or_lost(n);
        };
        if data.len() as u64 != len {
            return Err(err!(
                Corrupt,
                "{}: block {n} holds {} bytes at {off}, not {len}",
                self.what,
                data.len()
            ));
        }
        // Only the chunks this fetch owns: a chunk between them may be present and written.
        for c in lo..=hi {
            if m & (1 << c) == 0 {
                continue;
            }
            let a = (c * CHUNK - off) as usize;
            let b = (((c + 1) * CHUNK).min(blen) - off) as usize;
            self.file
                .write_all_at(&data[a..b], n * BLOCK + c * CHUNK)
                .ctx("caching")?;
        }
        Ok(())
    }

    /// Block `n` was not found. A block that is all hole is not stored, so that is a hole,
    /// unless the pointer's block map or the version's listing says the block is stored:
    /// then the server lost it or answered wrongly, and reading it as zeros would hand out garbage and, at the next
    /// flush of a write into the block, send zeros over its data. (A block this window sent
    /// is never fetched again: a flush sends only blocks it has made whole here, and nothing
    /// drops a window's chunks while the window lives.)
    fn hole_or_lost(&self, n: u64) -> Result<()> {
        if recorded_in(&lock(&self.recorded), n) {
            return Err(lost(&self.what, n));
        }
        let mut listed = lock(&self.listed);
        if listed.is_none() {
            let keys = self.os.list(&format!("{}/", self.prefix))?;
            *listed = Some(
                keys.iter()
                    .filter_map(|(k, _)| k.rsplit('/').next()?.parse().ok())
                    .collect(),
            );
        }
        if listed.as_ref().is_some_and(|l| l.contains(&n)) {
            return Err(lost(&self.what, n));
        }
        Ok(())
    }

    /// Fetch `parts` (each marked in flight by the caller), up to 8 at once.
    fn get_all(&self, parts: &[(u64, u64)]) -> Result<()> {
        match parts {
            [] => Ok(()),
            [(n, m)] => self.get_chunks(*n, *m),
            _ => std::thread::scope(|s| {
                let handles: Vec<_> = parts
                    .chunks(parts.len().div_ceil(8))
                    .map(|group| {
                        s.spawn(move || {
                            group
                                .iter()
                                .map(|&(n, m)| self.get_chunks(n, m))
                                .find(Result::is_err)
                                .unwrap_or(Ok(()))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(err!(Io, "fetch failed"))))
                    .find(Result::is_err)
                    .unwrap_or(Ok(()))
            }),
        }
    }

    /// Start fetching the missing chunks of `blocks` in the background, one thread per block,
    /// within [`BACKGROUND`].
    fn fill(&self, st: &mut Chunks, blocks: impl Iterator<Item = u64>) {
        use std::sync::atomic::Ordering;
        for n in blocks {
            let m = self.full(n) & !st.have(n) & !st.inflight(n);
            if m == 0 {
                continue;
            }
            if self.background.load(Ordering::Relaxed) >= BACKGROUND {
                return;
            }
            let Some(me) = self.this.upgrade() else {
                return;
            };
            self.background.fetch_add(1, Ordering::Relaxed);
            *st.inflight.entry(n).or_default() |= m;
            std::thread::spawn(move || {
                let _ = me.get_chunks(n, m);
                me.background.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
}

impl super::backing::Remote for Window {
    fn fetch(&self, off: u64, len: usize) -> Result<()> {
        self.bring(off, len, true)
    }

    fn dirtied(&self, off: u64, len: usize) {
        let mut dirty = lock(&self.dirty);
        dirty.extend(self.touched(off, len).into_iter().map(|(n, _)| n));
    }

    fn flush(&self) -> Result<()> {
        let _one = lock(&self.flushing);
        // Taken out before reading them: a write meanwhile marks its block again.
        let blocks = std::mem::take(&mut *lock(&self.dirty));
        let mut buf = vec![0u8; BLOCK as usize];
        let mut failed = None;
        for &n in &blocks {
            let start = n * BLOCK;
            let size = self.block_len(n) as usize;
            // A block goes whole: the chunks not yet read come first.
            let r = self
                .bring(start, size, false)
                .and_then(|()| super::backing::pread_full(&self.file, &mut buf[..size], start))
                .and_then(|()| self.os.put(&format!("{}/{n}", self.prefix), &buf[..size]));
            if let Err(e) = r {
                failed = Some(e);
                break;
            }
        }
        // Blocks stored for the first time go into the pointer's map, so that one the server
        // loses before anyone lists the version is an error, not a hole.
        if failed.is_none() {
            failed = self.record(&blocks).err();
        }
        if let Some(e) = failed {
            // Not durable (or not recorded): every block of this flush stays marked for the
            // next one, which sends them again.
            lock(&self.dirty).extend(blocks);
            return Err(e);
        }
        Ok(())
    }
}

impl Window {
    /// After `sent` went to the store: check that the pointer still names this window's
    /// version, and add those stored for the first time to its block map (set their bits,
    /// write it back on condition that nobody wrote it meanwhile). On this host only the
    /// mount that has the resource open writes its pointer (the CLI's rekey and delete wait
    /// for it to close); another host's rekey meanwhile moved the pointer, and the blocks
    /// just sent went to the version it dropped: that is an error, not a success.
    fn record(&self, sent: &std::collections::BTreeSet<u64>) -> Result<()> {
        if sent.is_empty() {
            return Ok(());
        }
        let new: Vec<u64> = {
            let map = lock(&self.recorded);
            sent.iter()
                .copied()
                .filter(|&n| !recorded_in(&map, n))
                .collect()
        };
        let Some((bytes, etag)) = self.os.get_tagged(&self.pointer_key, 64 << 20)? else {
            return Err(err!(
                Corrupt,
                "{}: deleted meanwhile (by another host?): these writes are not kept",
                self.what
            ));
        };
        let mut p: Pointer = serde_json::from_slice(&bytes)
            .map_err(|e| err!(Corrupt, "{}: its pointer object is damaged: {e}", self.what))?;
        if p.version != self.version {
            return Err(err!(
                Corrupt,
                "{}: given a new version meanwhile (by another host?): these writes went to the version it dropped",
                self.what
            ));
        }
        if new.is_empty() {
            return Ok(());
        }
        let mut map = p.blocks_map();
        for &n in &new {
            record_in(&mut map, n);
        }
        p.blocks = Some(hex::encode(&map));
        let out = serde_json::to_vec(&p).map_err(|e| err!(Io, "{e}"))?;
        match etag {
            Some(t) => self.os.put_if(&self.pointer_key, &out, Some(&t))?,
            None => self.os.put(&self.pointer_key, &out)?,
        }
        *lock(&self.recorded) = map;
        Ok(())
    }
}

impl Window {
    /// Make `[off, off + len)` present: fetch what nobody is fetching, wait for the rest.
    /// `read`: a reader's request, whose pattern decides what is fetched ahead.
    fn bring(&self, off: u64, len: usize, read: bool) -> Result<()> {
        let touched = self.touched(off, len);
        let Some(&(first, _)) = touched.first() else {
            return Ok(());
        };
        let mut counted = false;
        let mut ahead = Vec::new();
        loop {
            let (mine, waiting) = {
                let mut st = lock(&self.state);
                let mut mine = Vec::new();
                let mut waiting = Vec::new();
                for &(n, m) in &touched {
                    let need = m & !st.have(n);
                    let (theirs, own) = (need & st.inflight(n), need & !st.inflight(n));
                    if own != 0 {
                        *st.inflight.entry(n).or_default() |= own;
                        mine.push((n, own));
                    }
                    if theirs != 0 {
                        waiting.push((n, theirs));
                    }
                }
                if read && !counted {
                    counted = true;
                    // A sequential reader (this read begins near where the last one ended)
                    // gets whole blocks fetched ahead; a random reader's miss gets the rest
                    // of its block.
                    let near = off + (1 << 20) >= st.next && off <= st.next + (1 << 20);
                    st.streak = if near { st.streak + len as u64 } else { 0 };
                    st.next = off + len as u64;
                    ahead = if near {
                        // One block ahead at first, one more per 2 MiB read, up to PREFETCH:
                        // a `head -c 1` costs a block ahead, `dd` soon has eight in flight.
                        let n = PREFETCH.min(1 + st.streak / (2 << 20));
                        let last_block = self.file_len.saturating_sub(1) / BLOCK;
                        (first..=(first + n).min(last_block)).collect()
                    } else {
                        mine.iter().map(|&(n, _)| n).collect()
                    };
                    // A miss is fetched first: the fetches ahead would slow it down.
                    if mine.is_empty() {
                        self.fill(&mut st, std::mem::take(&mut ahead).into_iter());
                    }
                }
                if mine.is_empty() && waiting.is_empty() {
                    return Ok(());
                }
                (mine, waiting)
            };
            let got = self.get_all(&mine);
            if !ahead.is_empty() {
                self.fill(
                    &mut lock(&self.state),
                    std::mem::take(&mut ahead).into_iter(),
                );
            }
            got?;
            // Chunks another thread is fetching: wait for them; if it failed, try again.
            let st = lock(&self.state);
            let st = self
                .arrived
                .wait_while(st, |st| {
                    waiting.iter().any(|&(n, m)| st.inflight(n) & m != 0)
                })
                .unwrap_or_else(|e| e.into_inner());
            if waiting.iter().all(|&(n, m)| st.have(n) & m == m) {
                return Ok(());
            }
        }
    }
}
