//! How many session threads wait for the kernel's next request.
//!
//! fuser starts a fixed set of session threads, each blocked reading the FUSE device. The
//! kernel hands a request to the thread that has waited longest, so with all of them waiting,
//! one request at a time goes round every thread in turn, each with a cold stack and cache:
//! on a tmpfs store (no device time) 4 KiB reads one at a time ran at ~53k IOPS with 16
//! threads waiting against ~63-68k with 2-4, and at queue depth 16 at 152k against 187-204k.
//! Yet requests that wait for the device need many threads (see `mount::THREADS`).
//!
//! So, as libfuse's multi-threaded loop does, only a few threads wait while the load is light.
//! A thread leaving a request parks, instead of reading the device again, when at least
//! [`KEEP_WAITING`] others wait there already and at most one other is serving. A thread taking
//! a request wakes a parked one when it leaves none waiting. So one request at a time goes to
//! one of two or three warm threads, a burst gets every thread within a request or two of each,
//! and a steady few requests at once keep their threads: parking one after each request and
//! waking it for the next cost two futex calls per request with four readers at once (tmpfs:
//! 94-115k IOPS against 117-123k without).
//!
//! Parked threads must leave when the session ends (fuser joins every session thread before
//! the daemon can exit): every session thread that has served a request wakes them all as it
//! exits (a thread-local's destructor, as the device read fails and fuser's loop returns),
//! and a parked thread looks at the device every [`CHECK_EVERY`] in any case (a thread that
//! never served a request has nothing to wake anyone with).

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicIsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// Threads left waiting on the device before one leaving a request parks.
const KEEP_WAITING: isize = 2;
/// How often a parked thread checks that the session's device is still connected (a
/// non-blocking `poll`; it only wakes from a park, never a request).
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// The session threads' count of who waits on the device, and the parked threads.
pub struct IdleThreads {
    /// Threads reading the device (or on their way there): neither serving nor parked.
    waiting: AtomicIsize,
    /// Threads serving a request.
    serving: AtomicIsize,
    parked: Mutex<Parked>,
    wake: Condvar,
    /// The session's FUSE device (a duplicate), once known: a parked thread stays parked
    /// while it is connected. Without it, a parked thread goes back after one check.
    device: OnceLock<OwnedFd>,
    check_every: Duration,
}

#[derive(Default)]
struct Parked {
    count: usize,
    /// Wake-ups sent and not yet taken by a parked thread.
    tokens: usize,
    /// A session thread exited: the session is ending, nobody parks any more.
    ending: bool,
}

thread_local! {
    /// Set in a session thread once it serves a request: wakes every parked thread when
    /// the thread exits.
    static EXIT_WAKES: RefCell<Option<ExitWakes>> = const { RefCell::new(None) };
    /// Set in a thread that takes its requests from elsewhere than the device (an io_uring
    /// entry's): it neither counts here nor parks.
    static ELSEWHERE: Cell<bool> = const { Cell::new(false) };
}

/// This thread takes its requests from elsewhere than the device (see [`super::uring`]):
/// its requests are not counted, and it never parks.
pub fn serves_elsewhere() {
    ELSEWHERE.with(|e| e.set(true));
}

struct ExitWakes(Arc<IdleThreads>);

impl Drop for ExitWakes {
    fn drop(&mut self) {
        let mut p = self.0.lock();
        p.ending = true;
        self.0.wake.notify_all();
    }
}

/// One request being served: made when a handler starts, dropped when it ends (after its reply).
pub struct Serving<'a>(Option<&'a Arc<IdleThreads>>);

impl IdleThreads {
    /// For a session of `threads` threads, all of them reading the device at first.
    pub fn new(threads: usize) -> Arc<IdleThreads> {
        Arc::new(IdleThreads {
            waiting: AtomicIsize::new(threads as isize),
            serving: AtomicIsize::new(0),
            parked: Mutex::default(),
            wake: Condvar::new(),
            device: OnceLock::new(),
            check_every: CHECK_EVERY,
        })
    }

    /// The session's device, to tell a parked thread when the session has ended.
    pub fn watch(&self, device: OwnedFd) {
        let _ = self.device.set(device);
    }

    /// Whether the session's device is gone (unmounted or aborted); true if unknown.
    fn device_gone(&self) -> bool {
        let Some(fd) = self.device.get() else {
            return true;
        };
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        // SAFETY: one pollfd on a descriptor we own, no waiting.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This thread took a request from the device.
    pub fn serving(self: &Arc<Self>) -> Serving<'_> {
        if ELSEWHERE.with(Cell::get) {
            return Serving(None);
        }
        self.serving.fetch_add(1, SeqCst);
        if self.waiting.fetch_sub(1, SeqCst) <= 1 {
            let mut p = self.lock();
            if p.count > p.tokens {
                p.tokens += 1;
                self.wake.notify_one();
            }
        }
        Serving(Some(self))
    }

    /// This thread is done with its request: back to the device, or parked until needed.
    fn done(self: &Arc<Self>) {
        EXIT_WAKES.with(|w| {
            if let Ok(mut w) = w.try_borrow_mut() {
                w.get_or_insert_with(|| ExitWakes(Arc::clone(self)));
            }
        });
        let others = self.serving.fetch_sub(1, SeqCst) - 1;
        if others <= 1 && self.waiting.load(SeqCst) >= KEEP_WAITING {
            let mut p = self.lock();
            if !p.ending {
                p.count += 1;
                loop {
                    let (q, timeout) = self
                        .wake
                        .wait_timeout_while(p, self.check_every, |p| p.tokens == 0 && !p.ending)
                        .unwrap_or_else(|e| e.into_inner());
                    p = q;
                    if !timeout.timed_out() {
                        break;
                    }
                    if self.device_gone() {
                        p.ending = true;
                        self.wake.notify_all();
                        break;
                    }
                }
                p.count -= 1;
                if p.tokens > 0 && !p.ending {
                    p.tokens -= 1;
                }
            }
        }
        self.waiting.fetch_add(1, SeqCst);
    }

    /// Threads parked now.
    #[cfg(test)]
    fn parked(&self) -> usize {
        self.lock().count
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        if let Some(idle) = self.0 {
            idle.done();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;

    /// A stand-in for the device: requests (how long each takes to serve) go in, session
    /// threads take them, and say when each is done; `busy` counts requests being served now
    /// and the most at once.
    struct Rig {
        idle: Arc<IdleThreads>,
        rx: Mutex<mpsc::Receiver<Duration>>,
        done_tx: mpsc::Sender<()>,
        busy: (AtomicUsize, AtomicUsize),
    }

    /// A rig for `n` threads whose parked threads check the device only hourly; the sender
    /// of requests and the receiver of their ends.
    fn rig(n: usize) -> (Rig, mpsc::Sender<Duration>, mpsc::Receiver<()>) {
        let mut idle = IdleThreads::new(n);
        Arc::get_mut(&mut idle).unwrap().check_every = Duration::from_secs(3600);
        let (tx, rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let rig = Rig {
            idle,
            rx: Mutex::new(rx),
            done_tx,
            busy: (AtomicUsize::new(0), AtomicUsize::new(0)),
        };
        (rig, tx, done)
    }

    /// Session threads as fuser runs them: each loops taking the next request until the
    /// device closes, then exits.
    fn session<'s>(s: &'s std::thread::Scope<'s, '_>, rig: &'s Rig, n: usize) {
        for _ in 0..n {
            let done = rig.done_tx.clone();
            s.spawn(move || loop {
                let Ok(d) = rig.rx.lock().unwrap().recv() else {
                    return;
                };
                let _serving = rig.idle.serving();
                let now = rig.busy.0.fetch_add(1, SeqCst) + 1;
                rig.busy.1.fetch_max(now, SeqCst);
                std::thread::sleep(d);
                rig.busy.0.fetch_sub(1, SeqCst);
                done.send(()).unwrap();
            });
        }
    }

    /// One request at a time: all but a few threads park, and every request is served. A
    /// burst then has every thread serving at once. When the device closes, parked threads
    /// leave at once (they would otherwise stay parked for an hour here).
    #[test]
    fn light_load_parks_a_burst_wakes_and_the_end_frees() {
        const N: usize = 8;
        let (rig, tx, done) = rig(N);
        let (idle, busy) = (&rig.idle, &rig.busy);
        let started = std::time::Instant::now();
        std::thread::scope(|s| {
            session(s, &rig, N);
            for _ in 0..3 * N {
                tx.send(Duration::from_millis(1)).unwrap();
                done.recv().unwrap();
            }
            // The last one served may still be on its way to parking.
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(idle.parked(), N - KEEP_WAITING as usize);
            assert_eq!(busy.1.load(SeqCst), 1);
            for _ in 0..N {
                tx.send(Duration::from_millis(300)).unwrap();
            }
            for _ in 0..N {
                done.recv().unwrap();
            }
            assert_eq!(busy.1.load(SeqCst), N, "a burst did not reach every thread");
            std::thread::sleep(Duration::from_millis(50));
            assert!(idle.parked() > 0);
            drop(tx);
        });
        assert!(started.elapsed() < Duration::from_secs(60));
    }

    /// A parked thread that nobody wakes leaves once the device is gone (a socket stands in
    /// for it: its peer closed, it polls as hung up), and not before.
    #[test]
    fn a_parked_thread_leaves_when_the_device_goes() {
        let mut idle = IdleThreads::new(4);
        let (device, ours) = std::os::unix::net::UnixStream::pair().unwrap();
        Arc::get_mut(&mut idle).unwrap().check_every = Duration::from_millis(10);
        idle.watch(device.into());
        let (left_tx, left) = mpsc::channel();
        let parked = {
            let idle = Arc::clone(&idle);
            std::thread::spawn(move || {
                drop(idle.serving());
                left_tx.send(()).unwrap();
            })
        };
        assert!(
            left.recv_timeout(Duration::from_millis(300)).is_err(),
            "left while connected"
        );
        assert_eq!(idle.parked(), 1);
        drop(ours);
        left.recv_timeout(Duration::from_secs(10))
            .expect("still parked after the device went");
        parked.join().unwrap();
    }

    /// While two other requests are being served, a thread leaving a request does not park
    /// (a steady few requests at once keep their threads); once they are done, it does.
    #[test]
    fn no_thread_parks_while_two_others_serve() {
        const N: usize = 8;
        let (rig, tx, done) = rig(N);
        let idle = &rig.idle;
        std::thread::scope(|s| {
            session(s, &rig, N);
            tx.send(Duration::from_millis(400)).unwrap();
            tx.send(Duration::from_millis(400)).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            for _ in 0..N {
                tx.send(Duration::from_millis(1)).unwrap();
                done.recv().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(idle.parked(), 0, "parked beside two requests being served");
            done.recv().unwrap();
            done.recv().unwrap();
            for _ in 0..N {
                tx.send(Duration::from_millis(1)).unwrap();
                done.recv().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
            assert!(idle.parked() > 0, "nobody parked once alone");
            drop(tx);
        });
    }
}
