//! Decrypting ahead of a sequential reader.
//!
//! A reader of large requests one at a time (`dd iflag=direct`, `fio --rw=read --direct=1`)
//! leaves the daemon idle between its requests, and each request then reads and decrypts its
//! bytes on its own critical path: for SM4 that is most of the time a request takes. So once
//! a volume's large reads make a stream (see `Enc::read_large`), the request after the one
//! being served is read and decrypted by a background thread while the reader is busy with
//! the answer, and the next request takes the plaintext as it is.
//!
//! One slot per volume holds the request decrypted ahead. It is never stale:
//! - Every write of the volume's sectors calls [`Ahead::write_begun`] under the sectors' write
//!   locks and holds the [`Writing`] it returns until its ciphertext is in the file. Beginning
//!   a write empties the slot.
//! - The background thread starts a job only when no write is in flight, and keeps its result
//!   only if no write began meanwhile (both checked under the slot's lock, which a beginning
//!   write takes too).
//! - Re-encryption changes ciphertext, never plaintext; the thread decrypts under the key lock,
//!   like every read.
//!
//! A request that finds its job still queued (the thread busy elsewhere) takes the job back and
//! reads for itself; one that finds it running waits for it (it holds its sectors' read locks,
//! so no write can begin to invalidate the job under it).

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

use super::backing::AlignedBuf;
use crate::error::Result;

/// Work for the background thread.
type Job = Box<dyn FnOnce() + Send>;

/// The sectors of one request, decrypted ahead (or being decrypted) for the next request.
#[derive(Default)]
pub struct Ahead {
    slot: Mutex<Option<Slot>>,
    changed: Condvar,
    /// Writes begun and ended on the volume: equal when none is in flight.
    begun: AtomicU64,
    ended: AtomicU64,
    jobs: AtomicU64,
}

struct Slot {
    first: u64,
    count: u64,
    job: u64,
    state: State,
}

enum State {
    Queued,
    Running,
    Ready(AlignedBuf),
}

/// Ends a write (see [`Ahead::write_begun`]) when dropped, on every way out of it.
pub struct Writing<'a>(&'a Ahead);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, SeqCst);
    }
}

impl Ahead {
    fn lock(&self) -> MutexGuard<'_, Option<Slot>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A write of the volume's sectors begins (its sectors' write locks held); the write ends
    /// when the returned guard is dropped, after its ciphertext is in the file.
    pub fn write_begun(&self) -> Writing<'_> {
        self.begun.fetch_add(1, SeqCst);
        self.forget();
        Writing(self)
    }

    /// The plaintext of sectors `[first, first + count)` if it was decrypted ahead, waiting
    /// for it if it is being decrypted now. A job still queued is cancelled (the caller
    /// reads for itself); anything else in the slot is left for the caller to replace.
    pub fn take(&self, first: u64, count: u64) -> Option<AlignedBuf> {
        let mut slot = self.lock();
        loop {
            match slot.as_ref() {
                Some(s) if s.first == first && s.count == count => match s.state {
                    State::Running => {
                        slot = self.changed.wait(slot).unwrap_or_else(|p| p.into_inner());
                    }
                    State::Queued => {
                        *slot = None;
                        return None;
                    }
                    State::Ready(_) => {
                        return match slot.take().map(|s| s.state) {
                            Some(State::Ready(buf)) => Some(buf),
                            _ => None,
                        };
                    }
                },
                _ => return None,
            }
        }
    }

    /// Drop what the slot holds (the stream ended).
    pub fn forget(&self) {
        let mut slot = self.lock();
        if slot.take().is_some() {
            self.changed.notify_all();
        }
    }

    /// Put a job for sectors `[first, first + count)` in the slot (replacing whatever it
    /// held) and return its number, for [`Ahead::run`].
    pub fn claim(&self, first: u64, count: u64) -> u64 {
        let job = self.jobs.fetch_add(1, SeqCst);
        *self.lock() = Some(Slot {
            first,
            count,
            job,
            state: State::Queued,
        });
        job
    }

    /// Run job `job` with `work` (on the background thread): nothing if it was cancelled or
    /// replaced, or a write is in flight; its result is kept only if no write began meanwhile.
    pub fn run(&self, job: u64, work: impl FnOnce() -> Result<AlignedBuf>) {
        let begun = {
            let mut slot = self.lock();
            match slot.as_mut() {
                Some(s) if s.job == job && matches!(s.state, State::Queued) => {
                    let begun = self.begun.load(SeqCst);
                    if self.ended.load(SeqCst) != begun {
                        *slot = None;
                        return;
                    }
                    s.state = State::Running;
                    begun
                }
                _ => return,
            }
        };
        // A panic in `work` must not leave a reader waiting on a job nobody runs.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
        let mut slot = self.lock();
        if let Some(s) = slot.as_mut().filter(|s| s.job == job) {
            match out {
                Ok(Ok(buf)) if self.begun.load(SeqCst) == begun => s.state = State::Ready(buf),
                _ => *slot = None,
            }
        }
        self.changed.notify_all();
    }
}

/// Run `job` on the background thread (started at first use). Where the thread cannot be had
/// the job never runs, and the request it was for finds it still queued and reads for itself.
pub fn spawn(job: Job) {
    static WORKER: OnceLock<Option<Mutex<Sender<Job>>>> = OnceLock::new();
    let worker = WORKER.get_or_init(|| {
        let (tx, rx) = channel::<Job>();
        std::thread::Builder::new()
            .name("decrypt-ahead".into())
            .spawn(move || {
                for job in rx {
                    job();
                    // The cipher kernels spill round keys into their frames.
                    crate::sys::secret::scrub_stack_small::<{ 32 << 10 }>();
                }
            })
            .ok()
            .map(|_| Mutex::new(tx))
    });
    if let Some(tx) = worker {
        let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(job);
    }
}
