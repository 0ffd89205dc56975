//! Point-in-time checks of copies made while a writer runs. The writer sweeps a value `k`
//! up through 4 KiB sectors spread over a resource, each sector all `k`, so at any instant
//! they read `k` below some sector and `k - 1` from there up. A copy of one instant reads
//! that way too; one read while the writes went on reads the low sectors early and the
//! high ones late, and a torn sector is not all one value.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

pub const SECTOR: usize = 4096;

pub struct Sweep {
    /// The sectors swept, in order.
    pub offsets: Vec<u64>,
    stop: AtomicBool,
    sweeps: AtomicU64,
}

/// Stops a sweep when dropped: however the checks end (a failed assertion too), the writer
/// threads of a scope end with them.
pub struct Stopper<'a>(&'a AtomicBool);

impl Drop for Stopper<'_> {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

impl Sweep {
    /// Sectors every `step` bytes of the first `len`.
    pub fn new(len: u64, step: u64) -> Sweep {
        Sweep {
            offsets: (0..len).step_by(step as usize).collect(),
            stop: AtomicBool::new(false),
            sweeps: AtomicU64::new(0),
        }
    }

    /// A sector all `k`.
    pub fn sector(k: u64) -> Vec<u8> {
        k.to_le_bytes().repeat(SECTOR / 8)
    }

    /// The value a sector read back holds, if it is whole.
    pub fn value(b: &[u8]) -> Option<u64> {
        let k = u64::from_le_bytes(b[..8].try_into().unwrap());
        (b == Sweep::sector(k)).then_some(k)
    }

    /// Sweep with `write` until stopped (on a thread of its own); sectors start at 0.
    pub fn run(&self, write: impl Fn(&[u8], u64)) {
        for k in 1.. {
            if self.stopped() {
                return;
            }
            for &at in &self.offsets {
                write(&Sweep::sector(k), at);
            }
            self.sweeps.store(k, Relaxed);
        }
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Relaxed)
    }

    /// Sweeps done so far.
    pub fn done(&self) -> u64 {
        self.sweeps.load(Relaxed)
    }

    pub fn stopper(&self) -> Stopper<'_> {
        Stopper(&self.stop)
    }

    /// Check what a copy holds at `offsets` (`read` gives one sector), asked for once
    /// `before` sweeps were done.
    pub fn check(&self, before: u64, ctx: &str, read: impl Fn(u64) -> Vec<u8>) {
        let got: Vec<Option<u64>> = self
            .offsets
            .iter()
            .map(|&at| Sweep::value(&read(at)))
            .collect();
        let ctx = format!("{ctx}: {got:?}");
        let got: Vec<u64> = got.into_iter().map(|k| k.expect(&ctx)).collect();
        assert!(got[0] >= before, "an acknowledged write is missing: {ctx}");
        assert!(
            got.windows(2).all(|w| w[0] >= w[1]) && got[0] - got[got.len() - 1] <= 1,
            "not one point in time: {ctx}"
        );
    }
}
