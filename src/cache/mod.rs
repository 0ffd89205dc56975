//! The plaintext sector cache: bounded by bytes, sharded so threads do not queue behind one
//! lock, LRU within each shard, every buffer zeroized when evicted, removed or cleared.
//!
//! Written sectors always enter it; a sector read from the file enters it only when it was
//! read (and missed) once before, recently: the first miss only leaves a fingerprint in a
//! small table (a "doorkeeper", as in TinyLFU). Cold random reads over a disk larger than the
//! cache would otherwise copy every sector in and evict another for nothing: that was ~10% of
//! the daemon's CPU under 4 KiB random reads at queue depth 16 (`perf`, tmpfs store, 16 MiB
//! cache), for a hit rate of the cache's share of the disk.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use lru::LruCache;
use zeroize::Zeroize;

use crate::sys::Padded;

const SHARDS: usize = 16;

/// Cache key: which open volume, which sector.
pub type Key = (u64, u64);

/// A bounded, sharded LRU of plaintext sectors.
pub struct SectorCache {
    shards: Vec<Padded<Mutex<Shard>>>,
    enabled: bool,
    /// Fingerprints of sectors read once and not let in (see the module doc): two slots per
    /// 4 KiB the cache holds. A slot holds one fingerprint; a collision only forgets one.
    seen: Box<[AtomicU64]>,
}

struct Shard {
    map: LruCache<Key, Box<[u8]>>,
    bytes: usize,
    cap: usize,
}

impl Shard {
    /// Evict least recently used sectors until at most `cap` bytes remain. The first evicted
    /// buffer of `reuse` bytes is handed back instead of wiped (its plaintext is about to be
    /// overwritten whole); every other one is wiped.
    fn evict_to(&mut self, cap: usize, reuse: usize) -> Option<Box<[u8]>> {
        let mut spare = None;
        while self.bytes > cap {
            let Some((_, mut v)) = self.map.pop_lru() else {
                break;
            };
            self.bytes -= v.len();
            if spare.is_none() && v.len() == reuse {
                spare = Some(v);
            } else {
                v.zeroize();
            }
        }
        spare
    }
}

impl SectorCache {
    /// A cache holding at most `bytes` bytes of plaintext (0 disables it).
    pub fn new(bytes: u64) -> SectorCache {
        let per = (bytes / SHARDS as u64) as usize;
        SectorCache {
            shards: (0..SHARDS)
                .map(|_| {
                    Padded(Mutex::new(Shard {
                        map: LruCache::unbounded(),
                        bytes: 0,
                        cap: per,
                    }))
                })
                .collect(),
            enabled: per > 0,
            seen: (0..(bytes / 2048).clamp(64, 1 << 20))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    fn hash(k: Key) -> u64 {
        k.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k.1.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
    }

    /// A sector's plaintext just read from the file: kept if it was read once before
    /// (recently), otherwise only remembered as read.
    pub fn fill(&self, k: Key, data: &[u8]) {
        if !self.enabled {
            return;
        }
        let h = Self::hash(k);
        let slot = &self.seen[(h % self.seen.len() as u64) as usize];
        let fp = h | 1;
        if slot.load(Relaxed) == fp {
            slot.store(0, Relaxed);
            self.put(k, data);
        } else {
            slot.store(fp, Relaxed);
        }
    }

    fn shard(&self, k: Key) -> &Mutex<Shard> {
        &self.shards[(Self::hash(k) >> 32) as usize % SHARDS].0
    }

    fn lock(m: &Mutex<Shard>) -> std::sync::MutexGuard<'_, Shard> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copy a cached sector into `out` (same length); false on a miss.
    pub fn get(&self, k: Key, out: &mut [u8]) -> bool {
        if !self.enabled {
            return false;
        }
        let mut s = Self::lock(self.shard(k));
        match s.map.get(&k) {
            Some(v) if v.len() == out.len() => {
                out.copy_from_slice(v);
                true
            }
            _ => false,
        }
    }

    /// Insert or replace a sector's plaintext.
    pub fn put(&self, k: Key, data: &[u8]) {
        if !self.enabled {
            return;
        }
        let mut s = Self::lock(self.shard(k));
        if data.len() > s.cap {
            return;
        }
        if let Some(v) = s.map.get_mut(&k) {
            if v.len() == data.len() {
                v.copy_from_slice(data);
                return;
            }
        }
        // Make room first, reusing an evicted buffer of this size: no allocation and no free
        // per insert.
        let room = s.cap - data.len();
        let buf = match s.evict_to(room, data.len()) {
            Some(mut b) => {
                b.copy_from_slice(data);
                b
            }
            None => data.into(),
        };
        s.bytes += buf.len();
        if let Some(mut old) = s.map.put(k, buf) {
            s.bytes -= old.len();
            old.zeroize();
        }
    }

    /// Drop one sector.
    pub fn remove(&self, k: Key) {
        if !self.enabled {
            return;
        }
        let mut s = Self::lock(self.shard(k));
        if let Some(mut v) = s.map.pop(&k) {
            s.bytes -= v.len();
            v.zeroize();
        }
    }

    /// Drop every sector of volume `vol`.
    pub fn remove_volume(&self, vol: u64) {
        for Padded(m) in &self.shards {
            let mut s = Self::lock(m);
            let keys: Vec<Key> = s
                .map
                .iter()
                .filter(|(k, _)| k.0 == vol)
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                if let Some(mut v) = s.map.pop(&k) {
                    s.bytes -= v.len();
                    v.zeroize();
                }
            }
        }
    }

    /// Drop (and zeroize) everything.
    pub fn clear(&self) {
        for Padded(m) in &self.shards {
            let mut s = Self::lock(m);
            s.evict_to(0, usize::MAX); // no buffer is that long: all are wiped
        }
    }

    /// Bytes of plaintext held now.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|m| Self::lock(&m.0).bytes).sum()
    }
}

impl Drop for SectorCache {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_lru() {
        let c = SectorCache::new(16 * 4096 * 4);
        for s in 0..1000u64 {
            c.put((1, s), &[s as u8; 4096]);
            assert!(c.bytes() <= 16 * 4096 * 4);
        }
        let mut out = [0u8; 4096];
        assert!(c.get((1, 999), &mut out));
        assert_eq!(out[0], (999 % 256) as u8);
        assert!(!c.get((1, 0), &mut out));
        c.remove((1, 999));
        assert!(!c.get((1, 999), &mut out));
        c.remove_volume(1);
        assert_eq!(c.bytes(), 0);
    }

    /// Mixed sector sizes and replacements through a small cache (evicted buffers are
    /// reused): every hit returns exactly what was last put, within the byte bound.
    #[test]
    fn hits_are_exact_under_reuse() {
        let cap = SHARDS * 3 * 4096;
        let c = SectorCache::new(cap as u64);
        let mut last = std::collections::HashMap::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for i in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = (x % 3, (x >> 8) % 97);
            let len = if (x >> 20).is_multiple_of(4) {
                4096
            } else {
                512
            };
            let data: Vec<u8> = (0..len).map(|j| (i as usize * 31 + j) as u8).collect();
            c.put(k, &data);
            last.insert(k, data);
            assert!(c.bytes() <= cap);
            let probe = (x % 3, (x >> 30) % 97);
            if let Some(want) = last.get(&probe) {
                let mut out = vec![0u8; want.len()];
                if c.get(probe, &mut out) {
                    assert_eq!(&out, want, "step {i}");
                }
            }
        }
    }

    /// A sector read once is not kept; read again soon, it is. Written ones always are.
    #[test]
    fn reads_enter_on_their_second_miss() {
        let c = SectorCache::new(1 << 20);
        let mut out = [0u8; 4096];
        for s in 0..100u64 {
            c.fill((1, s), &[s as u8; 4096]);
        }
        assert_eq!(c.bytes(), 0);
        for s in 0..100u64 {
            assert!(!c.get((1, s), &mut out));
            c.fill((1, s), &[s as u8; 4096]);
            assert!(c.get((1, s), &mut out));
            assert_eq!(out, [s as u8; 4096]);
        }
        c.put((2, 7), &[9; 4096]);
        assert!(c.get((2, 7), &mut out));
        // Another volume's sector with the same number is another sector.
        c.fill((3, 7), &[1; 4096]);
        assert!(!c.get((3, 7), &mut out));
    }

    #[test]
    fn disabled() {
        let c = SectorCache::new(0);
        c.put((1, 1), &[1; 512]);
        let mut out = [0u8; 512];
        assert!(!c.get((1, 1), &mut out));
    }
}
