//! A point-in-time read of a file that is being written: a copy or snapshot of a disk the
//! mount has open. Copy-before-write, as LVM's snapshots do it: while the read runs, the
//! first write to each chunk the read has not reached yet first saves the chunk's old bytes
//! to a side file, and the read takes saved chunks from there. So the copy holds the disk as
//! it was when the freeze began (every write acknowledged before it, none after, no sector
//! half old and half new), and writes go on meanwhile, each chunk paying one save at most.
//!
//! The read must go forward: pieces in increasing file order, none crossing a chunk boundary
//! (see [`Freeze::pieces`]). Writes below the read's position need nothing and take no lock.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use crate::error::{Error, IoContext, Result};

/// Bytes of file saved at a time.
pub const FREEZE_CHUNK: u64 = 1 << 20;

pub struct Freeze {
    /// The file written (read for the old bytes of a chunk about to change).
    source: File,
    /// Same layout as `source`, sparse: the chunks saved before their first write.
    side: File,
    /// File bytes below this have been read: writes there need no save.
    read_to: AtomicU64,
    state: Mutex<State>,
    /// Signalled when the read of a piece ends.
    read_done: Condvar,
}

#[derive(Default)]
struct State {
    /// Chunks saved to the side file.
    saved: HashSet<u64>,
    /// The chunk a piece is being read from in the source (no lock held meanwhile: writes
    /// to it wait, writes elsewhere go on).
    reading: Option<u64>,
    /// A save that failed (the side file's filesystem full): the write went on, so the
    /// point in time is lost and the read fails with this.
    failed: Option<Error>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Freeze {
    /// Freeze `source` as it is now; `side` is an empty file on the same filesystem.
    pub fn new(source: File, side: File) -> Result<Freeze> {
        let len = source.metadata().ctx("stat")?.len();
        side.set_len(len).ctx("sizing the snapshot's side file")?;
        Ok(Freeze {
            source,
            side,
            read_to: AtomicU64::new(0),
            state: Mutex::default(),
            read_done: Condvar::new(),
        })
    }

    /// Called before file bytes `[off, off + len)` are overwritten: save every chunk of
    /// them the read has not reached and has no saved copy of, once a read of one of them
    /// now in progress ends. Never fails the write: a save that fails breaks the freeze
    /// instead (the read reports it).
    pub fn before_write(&self, off: u64, len: u64) {
        let end = off + len;
        if len == 0 || end <= self.read_to.load(Ordering::Acquire) {
            return;
        }
        let mut st = lock(&self.state);
        loop {
            if st.failed.is_some() {
                return;
            }
            // Under the lock the read is not moving: what it has not read yet is above this.
            let from = off.max(self.read_to.load(Ordering::Acquire));
            if from >= end {
                return;
            }
            let chunks = from / FREEZE_CHUNK..=(end - 1) / FREEZE_CHUNK;
            if st.reading.is_some_and(|c| chunks.contains(&c)) {
                st = self.read_done.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            for c in chunks {
                if st.saved.contains(&c) {
                    continue;
                }
                if let Err(e) = self.save(c) {
                    tracing::warn!("a snapshot in progress lost its point in time: {e}");
                    st.failed = Some(e);
                    return;
                }
                st.saved.insert(c);
            }
            return;
        }
    }

    fn save(&self, c: u64) -> Result<()> {
        let at = c * FREEZE_CHUNK;
        let mut buf = vec![0u8; FREEZE_CHUNK as usize];
        // Short at the end of the file.
        let got = super::backing::read_full(&self.source, &mut buf, at)
            .map_err(|e| Error::from(e).context("saving a chunk for a snapshot"))?;
        let buf = &buf[..got];
        // Zeros (a hole, most often) are what the sparse side file reads anyway.
        if buf.iter().any(|&b| b != 0) {
            self.side
                .write_all_at(buf, at)
                .ctx("saving a chunk for a snapshot")?;
        }
        Ok(())
    }

    /// Read file bytes `[off, off + len)` (within one chunk, at or past every piece read
    /// before): `read` gets `true` if they come from the side file, `false` from the source.
    /// No write lands in them meanwhile; no lock is held while `read` runs (it may write
    /// the copy's destination, and record progress), so writes elsewhere go on.
    pub fn read<T>(&self, off: u64, len: u64, read: impl FnOnce(bool) -> Result<T>) -> Result<T> {
        debug_assert!(len > 0 && off / FREEZE_CHUNK == (off + len - 1) / FREEZE_CHUNK);
        let c = off / FREEZE_CHUNK;
        let saved = {
            let mut st = lock(&self.state);
            if let Some(e) = &st.failed {
                return Err(crate::error::Error::new(
                    e.kind,
                    format!(
                        "the disk was written while this ran and its old data could not be kept ({e}): run it again"
                    ),
                ));
            }
            let saved = st.saved.contains(&c);
            if !saved {
                // A saved chunk never changes in the side file: only the source needs this.
                st.reading = Some(c);
            }
            saved
        };
        let r = read(saved);
        // Under the lock when a read of the source ends, so a waiting write sees the read
        // position and the end of the read together.
        let st = (!saved).then(|| lock(&self.state));
        if r.is_ok() {
            self.read_to.fetch_max(off + len, Ordering::Release);
        }
        if let Some(mut st) = st {
            st.reading = None;
            drop(st);
            self.read_done.notify_all();
        }
        r
    }

    /// The side file, for reads of saved chunks.
    pub fn side(&self) -> &File {
        &self.side
    }

    /// `[off, off + len)` cut at chunk boundaries, in order.
    pub fn pieces(off: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
        let end = off + len;
        let mut at = off;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let n = (FREEZE_CHUNK - at % FREEZE_CHUNK).min(end - at);
            let piece = (at, n);
            at += n;
            Some(piece)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(len: usize) -> (tempfile::TempDir, File, Freeze) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, vec![1u8; len]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&src)
            .unwrap();
        let side = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("side"))
            .unwrap();
        let fz = Freeze::new(f.try_clone().unwrap(), side).unwrap();
        (dir, f, fz)
    }

    fn read(fz: &Freeze, f: &File, off: u64, len: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for (o, n) in Freeze::pieces(off, len) {
            let mut b = vec![0u8; n as usize];
            fz.read(o, n, |side| {
                let from = if side { fz.side() } else { f };
                from.read_exact_at(&mut b, o).unwrap();
                Ok(())
            })
            .unwrap();
            out.extend(b);
        }
        out
    }

    #[test]
    fn pieces_cut_at_chunk_boundaries() {
        let c = FREEZE_CHUNK;
        let p: Vec<_> = Freeze::pieces(c - 10, c + 20).collect();
        assert_eq!(p, vec![(c - 10, 10), (c, c), (2 * c, 10)]);
        assert_eq!(Freeze::pieces(5, 0).count(), 0);
    }

    #[test]
    fn reads_see_the_file_as_it_was_when_frozen() {
        let c = FREEZE_CHUNK as usize;
        let (_d, f, fz) = files(3 * c);
        // Read the first chunk, then writes land everywhere, then the rest is read.
        assert_eq!(read(&fz, &f, 0, c as u64), vec![1u8; c]);
        for at in [10, c as u64 + 7, 2 * c as u64 - 3] {
            fz.before_write(at, 4096);
            f.write_all_at(&[2u8; 4096], at).unwrap();
        }
        let rest = read(&fz, &f, c as u64, 2 * c as u64);
        assert!(
            rest.iter().all(|&b| b == 1),
            "a write after the freeze was read"
        );
        // The file itself has the writes.
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, c as u64 + 7).unwrap();
        assert_eq!(b[0], 2);
    }

    #[test]
    fn a_write_below_the_read_position_saves_nothing() {
        let c = FREEZE_CHUNK;
        let (_d, f, fz) = files(2 * c as usize);
        read(&fz, &f, 0, c);
        fz.before_write(0, 4096);
        assert!(lock(&fz.state).saved.is_empty());
        fz.before_write(c - 100, 200);
        assert_eq!(
            lock(&fz.state).saved.len(),
            1,
            "the chunk past the read is saved"
        );
    }

    #[test]
    fn a_save_that_fails_fails_the_read_not_the_write() {
        let c = FREEZE_CHUNK;
        let (d, f, _) = files(2 * c as usize);
        // A side file that cannot be written (opened read-only): the filesystem full, say.
        let side = File::open(d.path().join("side")).unwrap();
        let fz = Freeze {
            source: f.try_clone().unwrap(),
            side,
            read_to: AtomicU64::new(0),
            state: Mutex::default(),
            read_done: Condvar::new(),
        };
        fz.before_write(c, 4096);
        let e = fz.read(0, 4096, |_| Ok(())).unwrap_err();
        assert!(e.to_string().contains("run it again"), "{e}");
        // Once broken, writes go on without trying again.
        fz.before_write(0, 4096);
        assert!(lock(&fz.state).saved.is_empty());
    }
}
