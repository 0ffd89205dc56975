//! The table of open handles: the number the kernel passes with every read and write, to
//! what it stands for.
//!
//! Every request looks its handle up, from every session thread at once. One mutex over one
//! map (SipHash) was ~7% of the daemon's user time under 4 KiB random reads from four jobs:
//! each lookup moved the lock's cache line between the cores. Handles are spread over
//! [`SHARDS`] maps by number, each lock on its own cache line, so readers of different
//! files (handles) touch different lines; numbers are handed out in order and never reused,
//! so the number itself is the hash.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::sys::Padded;

const SHARDS: usize = 16;

/// Handles numbered from 1, each shared (`Arc`) with the requests using it.
pub struct Handles<T> {
    shards: [Shard<T>; SHARDS],
    next: AtomicU64,
}

type Map<T> = HashMap<u64, Arc<T>, BuildHasherDefault<Identity>>;
type Shard<T> = Padded<Mutex<Map<T>>>;

/// A handle number is its own hash (numbers are sequential and unique).
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        // hashbrown takes its control bits from the top 7 bits: spread the number there.
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

impl<T> Default for Handles<T> {
    fn default() -> Self {
        Handles {
            shards: std::array::from_fn(|_| Padded::default()),
            next: AtomicU64::new(1),
        }
    }
}

impl<T> Handles<T> {
    fn lock(shard: &Shard<T>) -> MutexGuard<'_, Map<T>> {
        shard.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shard(&self, fh: u64) -> MutexGuard<'_, Map<T>> {
        Self::lock(&self.shards[fh as usize % SHARDS])
    }

    /// A new handle for `h`; its number.
    pub fn insert(&self, h: T) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.shard(fh).insert(fh, Arc::new(h));
        fh
    }

    pub fn get(&self, fh: u64) -> Option<Arc<T>> {
        self.shard(fh).get(&fh).cloned()
    }

    /// Remove handle `fh` if `pred` holds for it; what was removed.
    pub fn remove_if(&self, fh: u64, pred: impl FnOnce(&T) -> bool) -> Option<Arc<T>> {
        let mut shard = self.shard(fh);
        if shard.get(&fh).is_some_and(|h| pred(h)) {
            shard.remove(&fh)
        } else {
            None
        }
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<T>> {
        self.shard(fh).remove(&fh)
    }

    pub fn clear(&self) {
        for s in &self.shards {
            Self::lock(s).clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_found_until_removed_and_never_reused() {
        let t = Handles::<String>::default();
        let fhs: Vec<u64> = (0..100).map(|i| t.insert(format!("h{i}"))).collect();
        let mut sorted = fhs.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), 100, "numbers are unique");
        assert!(!fhs.contains(&0), "0 is never a handle");
        for (i, fh) in fhs.iter().enumerate() {
            assert_eq!(*t.get(*fh).unwrap(), format!("h{i}"));
        }
        assert!(t.remove_if(fhs[3], |h| h == "nope").is_none());
        assert!(
            t.get(fhs[3]).is_some(),
            "a refused removal keeps the handle"
        );
        assert_eq!(*t.remove_if(fhs[3], |h| h == "h3").unwrap(), "h3");
        assert!(t.get(fhs[3]).is_none());
        assert_eq!(*t.remove(fhs[4]).unwrap(), "h4");
        assert!(t.remove(fhs[4]).is_none());
        let again = t.insert("new".into());
        assert!(
            !fhs.contains(&again),
            "a removed number is not handed out again"
        );
        t.clear();
        assert!(fhs.iter().chain([&again]).all(|fh| t.get(*fh).is_none()));
    }
}
