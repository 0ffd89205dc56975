//! Cross-region copy (SPEC §7): one image or snapshot into up to five other regions in one
//! pass. The source is read (and decrypted) once; each destination gets a new data key under
//! the CMK named by `key=` in that region, or that region's service key, and is written by its
//! own thread, so the destinations' encryption runs in parallel.
//!
//! Requests are checked whole before anything is written (bad region lists, a disk, a
//! missing key in any destination). After that each destination is independent and
//! all-or-nothing: its target is an unnamed file under the destination's `tmp/` (nothing is
//! left by a crash), linked into place only when whole; one destination failing (its disk
//! full, its name taken) neither stops nor undoes the others.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use super::ops::{payload_extents, Partial, Source, CHUNK};
use super::{AlignedBuf, CopyOptions, Progress, ResPath, Store, Volume};
use crate::err;
use crate::error::{Error, IoContext, Result};
use crate::format::{round_up, Kind};
use crate::region::MAX_DESTINATIONS;

/// What happened in one destination region.
pub type Outcome = (String, Result<()>);

/// The result of a cross-region copy from its destinations' outcomes: `Ok` if every one
/// succeeded, else the first failure's kind, with every failed region and its reason.
pub fn combine(outcomes: &[Outcome]) -> Result<()> {
    let failed: Vec<_> = outcomes
        .iter()
        .filter_map(|(r, o)| o.as_ref().err().map(|e| (r, e)))
        .collect();
    match failed.first() {
        None => Ok(()),
        Some((_, e)) => {
            let text: Vec<String> = failed
                .iter()
                .map(|(r, e)| format!("{r}: {}", e.message))
                .collect();
            Err(Error::new(
                e.kind,
                format!(
                    "{} of {} destination regions failed: {}",
                    failed.len(),
                    outcomes.len(),
                    text.join("; ")
                ),
            ))
        }
    }
}

/// One destination, checked: its region's store and the CMK its copy is encrypted under.
struct Destination {
    store: Store,
    /// `None`: the copy stays unencrypted; `Some(None)`: the region's service key;
    /// `Some(Some(id))`: that CMK.
    key: Option<Option<String>>,
    /// Why it cannot be reached now (its store or key service does not answer): it fails
    /// alone, and the others are copied.
    down: Option<crate::Error>,
}

/// Buffers a chunk of plaintext travels in, shared by every destination's writer and
/// handed back to the reader when the last one drops it.
struct Chunk {
    buf: Option<AlignedBuf>,
    off: u64,
    len: usize,
    pool: SyncSender<AlignedBuf>,
}

impl Drop for Chunk {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            // The pool holds every buffer there is, so this never blocks; if the reader is
            // gone the buffer is dropped (and wiped) here.
            let _ = self.pool.try_send(b);
        }
    }
}

/// Buffers in circulation: two being written while the reader fills two more.
const BUFFERS: usize = 4;

impl Store {
    /// Check a cross-region copy against the rules (SPEC §7) without writing anything:
    /// 1 to 5 known destination regions, none repeated, not this one (else `InvalidInput`);
    /// an image or snapshot (a disk: `Refused`); the source's key usable; `key=` present and
    /// usable in every destination (`NotFound` / `KeyUnusable`).
    pub fn check_copy_to_regions(
        &self,
        src: &ResPath,
        dst: &ResPath,
        opts: &CopyOptions,
    ) -> Result<()> {
        self.plan_to_regions(src, dst, opts).map(|_| ())
    }

    fn plan_to_regions(
        &self,
        src: &ResPath,
        dst: &ResPath,
        opts: &CopyOptions,
    ) -> Result<(super::Info, Vec<Destination>)> {
        let regions = &opts.to_regions;
        if regions.is_empty() || regions.len() > MAX_DESTINATIONS {
            return Err(err!(
                InvalidInput,
                "a copy goes to 1 to {MAX_DESTINATIONS} regions, not {}",
                regions.len()
            ));
        }
        for (i, r) in regions.iter().enumerate() {
            crate::region::validate_name(r)?;
            if regions[..i].contains(r) {
                return Err(err!(InvalidInput, "region {r} is named twice"));
            }
            if *r == self.region {
                return Err(err!(
                    InvalidInput,
                    "{src} is in region {r}: copy within a region without --to-region"
                ));
            }
        }
        if src.kind == Kind::Disk || dst.kind == Kind::Disk {
            return Err(err!(
                Refused,
                "disks do not cross regions: snapshot the disk, or copy an image of it, and copy that"
            ));
        }
        if opts.unencrypted && (opts.encrypt || opts.key.is_some()) {
            return Err(err!(
                InvalidInput,
                "unencrypted conflicts with encrypt and key="
            ));
        }
        if opts.sector_size.is_some() {
            return Err(err!(
                InvalidInput,
                "a cross-region copy keeps the source's sector size"
            ));
        }
        let info = self.info(src)?;
        if let Some(h) = &info.header {
            if opts.unencrypted {
                return Err(err!(
                    Refused,
                    "encrypted images cannot be copied into unencrypted images ({src} is encrypted)"
                ));
            }
            self.keys
                .check_usable(&h.key.key_id)
                .map_err(|e| e.context(src))?;
        }
        let encrypt = info.encrypted() || opts.encrypt || opts.key.is_some();
        let mut dests = Vec::with_capacity(regions.len());
        for r in regions {
            let store = self.region_store(r)?;
            if let Err(e) = store.check() {
                let e = e.context(format!("region {r}"));
                // A store that does not answer fails alone; a damaged one refuses the request.
                if e.kind != crate::error::ErrorKind::Io {
                    return Err(e);
                }
                dests.push(Destination {
                    store,
                    key: None,
                    down: Some(e),
                });
                continue;
            }
            let key = match (&opts.key, encrypt) {
                (_, false) => None,
                (None, true) => Some(None),
                (Some(k), true) => {
                    let (id, _) = store
                        .resolve_key(k)
                        .map_err(|e| e.context(format!("region {r}")))?;
                    store
                        .keys
                        .check_usable(&id)
                        .map_err(|e| e.context(format!("region {r}")))?;
                    Some(Some(id))
                }
            };
            dests.push(Destination {
                store,
                key,
                down: None,
            });
        }
        Ok((info, dests))
    }

    /// Copy `src` of this region to `dst` in each of `opts.to_regions`. The outer error
    /// refuses the whole request (nothing written); otherwise each destination's outcome,
    /// in the order given. `progress(region)` reports for one destination.
    pub fn copy_to_regions(
        &self,
        src: &ResPath,
        dst: &ResPath,
        opts: &CopyOptions,
        progress: &dyn Fn(&str) -> Arc<dyn Progress + Send + Sync>,
        live: Option<&Volume>,
    ) -> Result<Vec<Outcome>> {
        let (info, dests) = self.plan_to_regions(src, dst, opts)?;
        self.fan_copy(src, dst, &info, &dests, &opts.to_regions, progress, live)
    }

    /// Copy `src` of this store into `dest`, another store (an account copying an image
    /// shared with it): a new data key wrapped by `key` there (`Some(None)`: its service
    /// key; `Some(Some(id))`: that CMK, which may be the owner's through the share) or, with
    /// `None`, unencrypted.
    pub fn copy_into_store(
        &self,
        src: &ResPath,
        dst: &ResPath,
        dest: Store,
        key: Option<Option<String>>,
        progress: Arc<dyn Progress + Send + Sync>,
    ) -> Result<()> {
        let info = self.info(src)?;
        if let Some(h) = &info.header {
            self.keys
                .check_usable(&h.key.key_id)
                .map_err(|e| e.context(src))?;
            if key.is_none() {
                return Err(err!(
                    Refused,
                    "encrypted images cannot be copied into unencrypted images ({src} is encrypted)"
                ));
            }
        }
        if let Some(Some(id)) = &key {
            dest.keys.check_usable(id)?;
        }
        dest.check()?;
        let label = dest.region.clone();
        let dests = [Destination {
            store: dest,
            key,
            down: None,
        }];
        let out = self.fan_copy(
            src,
            dst,
            &info,
            &dests,
            &[label],
            &|_| progress.clone(),
            None,
        )?;
        out.into_iter().next().map_or(Ok(()), |(_, r)| r)
    }

    /// `live`: as in [`Store::copy_live`].
    #[allow(clippy::too_many_arguments)]
    fn fan_copy(
        &self,
        src: &ResPath,
        dst: &ResPath,
        info: &super::Info,
        dests: &[Destination],
        labels: &[String],
        progress: &dyn Fn(&str) -> Arc<dyn Progress + Send + Sync>,
        live: Option<&Volume>,
    ) -> Result<Vec<Outcome>> {
        let _reading = self.lock_reading_as(src, info)?;
        let (_, sf, _) = self.open_file(src, false)?;
        // Before the extents are looked up, as in `copy_live`.
        let frozen = match live {
            Some(v) => Some(self.freeze_source(v, &sf, src, info)?),
            None => None,
        };
        let source = Source {
            file: &sf,
            freeze: frozen.as_ref().map(|f| &*f.freeze),
        };
        let (src_vol, saved, extents) = match &info.header {
            Some(h) => {
                let vol = self
                    .open_encrypted(sf.try_clone().ctx("dup")?, src, false)?
                    .with_direct_io();
                let saved = source.saved_volume(|f| self.open_encrypted(f, src, false))?;
                let plen = round_up(h.size, u64::from(h.sector_size));
                let ext = payload_extents(
                    vol.file(),
                    h.data_offset,
                    plen,
                    u64::from(h.sector_size).max(4096),
                );
                let ext: Vec<_> = ext
                    .into_iter()
                    .map(|(o, l)| (o, l.min(h.size.saturating_sub(o))))
                    .filter(|e| e.1 > 0)
                    .collect();
                (vol, saved, ext)
            }
            None => {
                let ext = payload_extents(&sf, 0, info.size, 4096);
                let vol = Volume::raw(sf.try_clone().ctx("dup")?)?.with_direct_io();
                (vol, source.saved_volume(Volume::raw)?, ext)
            }
        };
        let base = info.header.as_ref().map_or(0, |h| h.data_offset);
        let total: u64 = extents.iter().map(|e| e.1).sum();
        let sector_size = info.header.as_ref().map_or(4096, |h| h.sector_size);

        // Prepare each destination; one that cannot start fails alone.
        let mut outcomes: Vec<Outcome> = Vec::new();
        let mut open = Vec::new();
        for (i, d) in dests.iter().enumerate() {
            let region = labels[i].clone();
            let p = progress(&region);
            p.start(total);
            if let Some(e) = &d.down {
                outcomes.push((region, Err(e.clone())));
                continue;
            }
            match d.prepare(dst, info.size, sector_size) {
                Ok((lock, part, vol)) => {
                    outcomes.push((region, Ok(())));
                    open.push((i, lock, part, vol, p));
                }
                Err(e) => outcomes.push((region, Err(e))),
            }
        }
        let read = |b: &mut [u8], off: u64| {
            source
                .read(base, &src_vol, saved.as_ref(), b, off)
                .map_err(|e| e.context(src))
        };
        let writers: Vec<(&Volume, &Partial, &dyn Progress)> = open
            .iter()
            .map(|(_, _, part, vol, p)| (vol, part, &**p as &dyn Progress))
            .collect();
        let results = fanout(&extents, &read, &writers);
        drop(writers);
        for ((i, _lock, part, vol, p), r) in open.into_iter().zip(results) {
            drop(vol);
            let d = &dests[i];
            let r = r.and_then(|()| {
                d.store.check_new(dst)?;
                let encrypted = d.key.is_some();
                part.commit(&d.store.file_for(dst, encrypted), &*p)
            });
            outcomes[i].1 = r.map_err(|e| e.context(format!("{dst} in region {}", d.store.region)));
        }
        Ok(outcomes)
    }
}

impl Destination {
    /// The target file and its volume, with the destination's job lock on `dst`.
    fn prepare(
        &self,
        dst: &ResPath,
        size: u64,
        sector_size: u32,
    ) -> Result<(crate::sys::FileLock, Partial, Volume)> {
        let s = &self.store;
        s.check_new(dst)?;
        let lock = s.lock_job(dst)?;
        s.check_new(dst)?;
        match &self.key {
            None => {
                let part = Partial::create(s, dst.kind.word())?;
                part.size(size)?;
                let vol = Volume::raw(part.file.try_clone().ctx("dup")?)?.with_direct_io();
                Ok((lock, part, vol))
            }
            Some(key) => {
                let (part, vol) =
                    s.new_encrypted_volume(dst.kind, size, sector_size, key.as_deref())?;
                Ok((lock, part, vol))
            }
        }
    }
}

/// Read `extents` once through `read` and write every chunk to each destination volume, each
/// on its own thread. A destination that fails stops alone; the others go on. Returns each
/// destination's result, in order.
fn fanout(
    extents: &[(u64, u64)],
    read: &(dyn Fn(&mut [u8], u64) -> Result<usize> + Sync),
    dests: &[(&Volume, &Partial, &dyn Progress)],
) -> Vec<Result<()>> {
    if dests.is_empty() {
        return Vec::new();
    }
    std::thread::scope(|s| {
        let (pool_tx, pool_rx) = sync_channel::<AlignedBuf>(BUFFERS);
        for _ in 0..BUFFERS {
            let _ = pool_tx.send(AlignedBuf::zeroed(CHUNK as usize));
        }
        let mut txs: Vec<Option<SyncSender<Arc<Chunk>>>> = Vec::new();
        let mut handles = Vec::new();
        for &(vol, part, p) in dests {
            let (tx, rx) = sync_channel::<Arc<Chunk>>(2);
            txs.push(Some(tx));
            handles.push(s.spawn(move || write_all(rx, vol, part, p)));
        }
        let read_result = read_all(extents, read, &pool_rx, &pool_tx, &mut txs);
        drop(txs);
        handles
            .into_iter()
            .map(|h| {
                let w = h
                    .join()
                    .unwrap_or_else(|_| Err(err!(Io, "a copy thread failed")));
                match (&read_result, w) {
                    (Err(e), _) => Err(e.clone()),
                    (Ok(()), w) => w,
                }
            })
            .collect()
    })
}

/// The reader: every chunk of `extents`, decrypted once, sent to every writer still going.
fn read_all(
    extents: &[(u64, u64)],
    read: &(dyn Fn(&mut [u8], u64) -> Result<usize> + Sync),
    pool_rx: &Receiver<AlignedBuf>,
    pool_tx: &SyncSender<AlignedBuf>,
    txs: &mut [Option<SyncSender<Arc<Chunk>>>],
) -> Result<()> {
    for &(off, len) in extents {
        let mut done = 0;
        while done < len {
            if txs.iter().all(Option::is_none) {
                return Ok(()); // every destination has failed
            }
            let mut buf = pool_rx.recv().map_err(|_| err!(Io, "copy buffers lost"))?;
            let n = (len - done).min(CHUNK) as usize;
            let got = read(&mut buf[..n], off + done)?;
            if got == 0 {
                return Err(err!(
                    Corrupt,
                    "the source ends at byte {}, before its stated size",
                    off + done
                ));
            }
            let chunk = Arc::new(Chunk {
                buf: Some(buf),
                off: off + done,
                len: got,
                pool: pool_tx.clone(),
            });
            for tx in txs.iter_mut() {
                if let Some(t) = tx {
                    if t.send(chunk.clone()).is_err() {
                        *tx = None; // that writer stopped (it failed)
                    }
                }
            }
            drop(chunk);
            done += got as u64;
        }
    }
    Ok(())
}

/// One destination's writer: encrypt (in `Volume::write_at`) and write every chunk.
fn write_all(
    rx: Receiver<Arc<Chunk>>,
    vol: &Volume,
    part: &Partial,
    p: &dyn Progress,
) -> Result<()> {
    while let Ok(c) = rx.recv() {
        if p.cancelled() {
            return Err(err!(Cancelled, "cancelled"));
        }
        let buf = c.buf.as_ref().map(|b| &b[..c.len]).unwrap_or(&[]);
        vol.write_at(buf, c.off)
            .map_err(|e: Error| e.context(format_args!("writing {}", part.path.display())))?;
        p.add(c.len as u64);
    }
    Ok(())
}
