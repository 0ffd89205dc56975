//! Resources of an object-storage region (SPEC §9), kept in S3 as fixed-size block objects
//! under a pointer:
//!
//! ```text
//! PREFIX/KIND/NAME.obj/ptr               {"version": V, "encrypted": …, "file_len": …}
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

use std::os::unix::fs::{FileExt, OpenOptionsExt};

use serde::{Deserialize, Serialize};

use super::{ResPath, Store};
use crate::err;
use crate::error::{IoContext, Result};
use crate::format::Kind;
use crate::sys;

/// Bytes per block object.
pub const BLOCK: u64 = 4 << 20;
/// Blocks fetched ahead of a sequential reader.
const PREFETCH: u64 = 7;

#[derive(Debug, Serialize, Deserialize)]
struct Pointer {
    version: String,
    encrypted: bool,
    file_len: u64,
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
        let Some(bytes) = self.objects()?.get(&format!("{}/ptr", obj(r)))? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| err!(Corrupt, "{r}: its pointer object is damaged: {e}"))
    }

    /// Whether the object store holds `r`.
    pub fn remote_exists(&self, r: &ResPath) -> Result<bool> {
        Ok(self.pointer(r)?.is_some())
    }

    /// Bring `r` into the local directory: every block, or (`header_only`) the first one
    /// in a sparse file of the whole length (enough for `info`, `list`, `dek`).
    pub fn pull(&self, r: &ResPath, header_only: bool) -> Result<()> {
        let os = self.objects()?;
        let p = self
            .pointer(r)?
            .ok_or_else(|| err!(NotFound, "no resource {r}"))?;
        let dest = self.file_for(r, p.encrypted);
        let tmp = sys::temp_path(&self.root.join("tmp"), "pull");
        let f = sys::create_private(&tmp)?;
        let result = (|| {
            f.set_len(p.file_len).ctx("sizing")?;
            let prefix = format!("{}/{}/", obj(r), p.version);
            // The header is in block 0: one GET, no listing.
            let keys = if header_only {
                vec![(format!("{prefix}0"), 0)]
            } else {
                os.list(&prefix)?
            };
            for (key, _) in keys {
                let n: u64 = key
                    .rsplit('/')
                    .next()
                    .and_then(|b| b.parse().ok())
                    .ok_or_else(|| err!(Corrupt, "{r}: a stray object {key}"))?;
                if header_only && n > 0 {
                    continue;
                }
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
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
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
        for (off, elen) in sys::data_extents(&f, len) {
            let first = off / BLOCK;
            let last = (off + elen - 1) / BLOCK;
            for n in first..=last {
                let start = n * BLOCK;
                let size = BLOCK.min(len - start) as usize;
                super::backing::pread_full(&f, &mut buf[..size], start)?;
                os.put(&format!("{}/{version}/{n}", obj(r)), &buf[..size])?;
            }
        }
        let ptr = Pointer {
            version: version.clone(),
            encrypted,
            file_len: len,
        };
        os.put(
            &format!("{}/ptr", obj(r)),
            &serde_json::to_vec(&ptr).map_err(|e| err!(Io, "{e}"))?,
        )?;
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

    /// For a mount: the local copy of `r` (made by a header-only [`pull`](Self::pull)) as
    /// a window on its objects. Reads fetch the blocks they need (several at once for a large
    /// read), each once; writes mark their blocks, and a flush (fsync, close) PUTs each
    /// marked block whole. One PUT replaces one object atomically, so a block in the store is
    /// always one flush's whole content, never torn.
    pub fn fetcher(&self, r: &ResPath) -> Result<super::backing::Fetch> {
        let os = self
            .remote
            .clone()
            .ok_or_else(|| err!(InvalidInput, "not an S3 region"))?;
        let p = self
            .pointer(r)?
            .ok_or_else(|| err!(NotFound, "no resource {r}"))?;
        let (path, _) = self.find(r)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .ctx(path.display())?;
        let prefix = format!("{}/{}", obj(r), p.version);
        let what = r.to_string();
        Ok(std::sync::Arc::new_cyclic(|this| Window {
            os,
            file,
            prefix,
            what,
            file_len: p.file_len,
            state: std::sync::Mutex::new(Blocks {
                have: std::collections::HashSet::from([0u64]),
                inflight: Default::default(),
            }),
            arrived: std::sync::Condvar::new(),
            dirty: std::sync::Mutex::new(std::collections::BTreeSet::new()),
            flushing: std::sync::Mutex::new(()),
            this: this.clone(),
        }))
    }

    /// Remove a local copy brought in by [`pull`](Self::pull).
    pub fn drop_local(&self, r: &ResPath) {
        if let Ok((path, _)) = self.find(r) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A local copy of a resource's blocks, fetched on demand and sent back on flush.
struct Window {
    os: std::sync::Arc<crate::objstore::ObjStore>,
    file: std::fs::File,
    prefix: String,
    what: String,
    file_len: u64,
    /// Blocks present locally, and blocks being fetched (by a reader or ahead of one).
    state: std::sync::Mutex<Blocks>,
    arrived: std::sync::Condvar,
    dirty: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// One flush at a time.
    flushing: std::sync::Mutex<()>,
    /// Itself, for the threads that fetch ahead.
    this: std::sync::Weak<Window>,
}

#[derive(Default)]
struct Blocks {
    have: std::collections::HashSet<u64>,
    inflight: std::collections::HashSet<u64>,
}

impl Window {
    /// Fetch `blocks` (marked in flight by the caller), several at once; record each as
    /// present or no longer in flight, and wake whoever waits for them.
    fn get_all(&self, blocks: &[u64]) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        let fetched: Vec<(u64, Result<u64>)> = std::thread::scope(|s| {
            let handles: Vec<_> = blocks
                .chunks(blocks.len().div_ceil(8))
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|&n| (n, self.get_block(n)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .zip(blocks.chunks(blocks.len().div_ceil(8)))
                .flat_map(|(h, part)| {
                    h.join().unwrap_or_else(|_| {
                        part.iter()
                            .map(|&n| (n, Err(err!(Io, "fetch failed"))))
                            .collect()
                    })
                })
                .collect()
        });
        let mut first_err = None;
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            for (n, r) in fetched {
                st.inflight.remove(&n);
                match r {
                    Ok(_) => {
                        st.have.insert(n);
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        self.arrived.notify_all();
        first_err.map_or(Ok(()), Err)
    }

    fn blocks(&self, off: u64, len: usize) -> std::ops::RangeInclusive<u64> {
        let last = (off + len as u64 - 1).min(self.file_len.saturating_sub(1)) / BLOCK;
        off / BLOCK..=last
    }

    fn get_block(&self, n: u64) -> Result<u64> {
        // An absent block is a hole: nothing to write.
        if let Some(data) = self.os.get(&format!("{}/{n}", self.prefix))? {
            if n * BLOCK + data.len() as u64 > self.file_len {
                return Err(err!(Corrupt, "{}: block {n} runs past the end", self.what));
            }
            self.file.write_all_at(&data, n * BLOCK).ctx("caching")?;
        }
        Ok(n)
    }
}

impl super::backing::Remote for Window {
    fn fetch(&self, off: u64, len: usize) -> Result<()> {
        loop {
            let (mine, waiting) = {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let needed: Vec<u64> = self
                    .blocks(off, len)
                    .filter(|n| !st.have.contains(n))
                    .collect();
                if needed.is_empty() {
                    return Ok(());
                }
                let (waiting, mine): (Vec<u64>, Vec<u64>) =
                    needed.iter().partition(|n| st.inflight.contains(n));
                st.inflight.extend(mine.iter().copied());
                // A sequential reader (the block before is here or coming) gets the next
                // blocks fetched ahead, in the background, while it reads this one.
                let first = needed[0];
                if first > 1
                    && (st.have.contains(&(first - 1)) || st.inflight.contains(&(first - 1)))
                {
                    let last_block = self.file_len.saturating_sub(1) / BLOCK;
                    let ahead: Vec<u64> = (first + 1..=(first + PREFETCH).min(last_block))
                        .filter(|n| !st.have.contains(n) && !st.inflight.contains(n))
                        .filter(|n| !needed.contains(n))
                        .collect();
                    if let (false, Some(me)) = (ahead.is_empty(), self.this.upgrade()) {
                        st.inflight.extend(ahead.iter().copied());
                        std::thread::spawn(move || {
                            let _ = me.get_all(&ahead);
                        });
                    }
                }
                (mine, waiting)
            };
            self.get_all(&mine)?;
            // Blocks another thread is fetching: wait for them; if it failed, try again.
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let st = self
                .arrived
                .wait_while(st, |st| waiting.iter().any(|n| st.inflight.contains(n)))
                .unwrap_or_else(|e| e.into_inner());
            if waiting.iter().all(|n| st.have.contains(n)) {
                return Ok(());
            }
        }
    }

    fn dirtied(&self, off: u64, len: usize) {
        let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        dirty.extend(self.blocks(off, len));
    }

    fn flush(&self) -> Result<()> {
        let _one = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        // Taken out before reading them: a write meanwhile marks its block again.
        let blocks = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()));
        let mut buf = vec![0u8; BLOCK as usize];
        let mut failed = None;
        for &n in &blocks {
            let start = n * BLOCK;
            let size = BLOCK.min(self.file_len - start) as usize;
            let r = super::backing::pread_full(&self.file, &mut buf[..size], start)
                .and_then(|()| self.os.put(&format!("{}/{n}", self.prefix), &buf[..size]));
            if let Err(e) = r {
                failed = Some(e);
                break;
            }
        }
        if let Some(e) = failed {
            // Not durable: every block of this flush stays marked for the next one.
            self.dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(blocks);
            return Err(e);
        }
        Ok(())
    }
}
