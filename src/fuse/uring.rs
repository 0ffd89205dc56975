//! FUSE over io_uring: requests taken from per-CPU rings instead of read from the device.
//!
//! Since Linux 6.14 (with the `fuse` module's `enable_uring` parameter on) a FUSE server may
//! take its requests through io_uring. The kernel keeps one queue per possible CPU and hands
//! a request to an entry registered on the queue of the CPU that asked; the server answers
//! and fetches the next request with one `io_uring_enter`. Against reading `/dev/fuse`
//! (a `read`, a `writev`, and a wake-up of whichever thread waited longest, often on the
//! other CPU) that saves a system call and a hand-off per request.
//!
//! Each entry here is one thread with its own small ring and one registered entry (a
//! 288-byte header and a payload as large as the largest request), so a request that waits
//! for the disk holds one entry, not its CPU's queue. The kernel hands a queue's requests to
//! its most recently answered entry first, so a light load stays on warm threads. Every
//! request type comes this way once the ring is ready (`FORGET`s and interrupts still come by
//! the device, read by the session's own loops), and goes to fuser's ordinary dispatch as the
//! bytes a read of the device would have given ([`fuser::RawDispatcher`], our addition to the
//! vendored fuser).
//!
//! Once the kernel has agreed to io_uring for a connection it sends requests nowhere else:
//! a queue without entries holds its CPU's requests for ever. So everything that can fail is
//! done before the INIT reply agrees ([`Prepared`]: the threads, their rings and buffers),
//! and a failure after it (an entry the kernel refuses or drops) ends the daemon, which the
//! kernel sees as a crash: every waiting request fails at once instead of hanging. A handler
//! that panics has its request answered EIO and the entry goes on.
//!
//! The kernel completes every entry with `ENOTCONN` when the mount goes; the session also
//! stops them through an eventfd each ring polls, once its own loops have ended.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use fuser::{Filesystem, RawDispatcher, RawReply};
use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// `struct fuse_uring_req_header`: the request's or reply's header (`in_out`), the
/// operation's own header (`op_in`) and `struct fuse_uring_ent_in_out`.
const HEADER_SIZE: usize = 128 + 128 + 32;
const OP_IN: usize = 128;
const ENT_IN_OUT: usize = 256;
/// `sizeof(struct fuse_in_header)`, `sizeof(struct fuse_out_header)`.
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
/// Room before the payload for the request's header and its operation's header, copied
/// there so that a request is one slice without copying its payload.
const PREFIX: usize = 256;
/// `enum fuse_uring_cmd`.
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `user_data` of the stop poll and of the entry's commands.
const STOP: u64 = 2;
const ENTRY: u64 = 1;

/// What an entry's thread needs once the session runs.
struct Start<FS: Filesystem> {
    dispatcher: RawDispatcher<FS>,
    device: Arc<OwnedFd>,
}

/// The entries' threads with their rings and buffers, made before the kernel is told the
/// session takes io_uring; [`Prepared::start`] registers them once it runs.
pub struct Prepared<FS: Filesystem> {
    starts: Vec<Sender<Start<FS>>>,
    registered: Receiver<io::Result<()>>,
    rings: Rings,
}

/// Running entries: [`Rings::stop`] ends and joins them.
pub struct Rings {
    stop: Arc<OwnedFd>,
    threads: Vec<JoinHandle<()>>,
}

impl<FS: Filesystem> Prepared<FS> {
    /// Make `per_queue` entries for every possible CPU's queue, each a thread with its own
    /// ring and buffers for requests of up to `max_payload` bytes after their headers.
    pub fn new(per_queue: usize, max_payload: usize) -> Result<Prepared<FS>, String> {
        let queues = possible_cpus().map_err(|e| format!("cannot count the CPUs: {e}"))?;
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(format!("no eventfd: {}", io::Error::last_os_error()));
        }
        // SAFETY: efd is a new descriptor owned by nothing else.
        let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let mut rings = Rings {
            stop,
            threads: Vec::new(),
        };
        let (made_tx, made) = channel();
        let (registered_tx, registered) = channel();
        let mut starts = Vec::new();
        for qid in 0..queues {
            for n in 0..per_queue {
                let (start_tx, start) = channel();
                let (made_tx, registered_tx) = (made_tx.clone(), registered_tx.clone());
                let stop = Arc::clone(&rings.stop);
                let spawned = std::thread::Builder::new()
                    .name(format!("uring-{qid}.{n}"))
                    .spawn(move || {
                        let Some(mut entry) = Entry::new(qid as u16, max_payload, &made_tx) else {
                            return;
                        };
                        drop(made_tx);
                        if let Ok(s) = start.recv() {
                            entry.serve(s, stop.as_raw_fd(), registered_tx);
                        }
                    });
                match spawned {
                    Ok(t) => {
                        rings.threads.push(t);
                        starts.push(start_tx);
                    }
                    Err(e) => {
                        drop(starts);
                        rings.stop();
                        return Err(format!("cannot start a thread: {e}"));
                    }
                }
            }
        }
        drop(made_tx);
        for _ in 0..rings.threads.len() {
            if let Ok(Err(e)) | Err(e) = made.recv().map_err(|_| io::Error::other("died")) {
                drop(starts);
                rings.stop();
                return Err(format!("cannot set up io_uring: {e}"));
            }
        }
        Ok(Prepared {
            starts,
            registered,
            rings,
        })
    }

    /// Register every entry with the session's `device`; from then on the kernel hands
    /// them the session's requests for `dispatcher`. The kernel has been told the session
    /// takes io_uring, so an entry it refuses leaves no way back: that ends the daemon.
    pub fn start(self, dispatcher: RawDispatcher<FS>, device: BorrowedFd<'_>) -> Rings {
        let device = match device.try_clone_to_owned() {
            Ok(d) => Arc::new(d),
            Err(e) => fatal(&format!("cannot duplicate the FUSE device: {e}")),
        };
        for s in &self.starts {
            let start = Start {
                dispatcher: dispatcher.clone(),
                device: Arc::clone(&device),
            };
            if s.send(start).is_err() {
                fatal("an entry's thread is gone");
            }
        }
        drop(dispatcher);
        for _ in 0..self.starts.len() {
            match self.registered.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => fatal(&format!("the kernel refused an entry: {e}")),
                Err(_) => fatal("an entry's thread is gone"),
            }
        }
        self.rings
    }
}

impl Rings {
    /// End every entry's thread and wait for them.
    pub fn stop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Rings {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The connection has io_uring and an entry is lost: requests of its CPU would wait for
/// ever. End the process instead (its descriptors close, the kernel aborts the connection
/// and every waiting request fails), as a crash would, after saying why.
fn fatal(why: &str) -> ! {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "encimg: FUSE over io_uring: {why}; the mount cannot go on (ending it)"
    );
    tracing::error!("FUSE over io_uring: {why}; ending the mount");
    std::process::exit(70)
}

/// The number of queues the kernel makes: one per possible CPU.
fn possible_cpus() -> io::Result<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in s.trim().split(',') {
        let last = part.rsplit('-').next().unwrap_or(part);
        let last: usize = last.parse().map_err(|_| bad_cpus(&s))?;
        n = n.max(last + 1);
    }
    if n == 0 {
        return Err(bad_cpus(&s));
    }
    Ok(n)
}

fn bad_cpus(s: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("cpu list {s:?}"))
}

/// An entry's buffers, shared with its replies (which may come from another thread).
/// Raw pointers from `Box::into_raw`: the kernel writes them, and so do replies.
struct Buffers {
    /// The kernel's header (`HEADER_SIZE` bytes, 8-aligned).
    header: *mut u8,
    /// `PREFIX` bytes, then the payload (8-aligned).
    buf: *mut u8,
    buf_words: usize,
    max_payload: usize,
    reply: Mutex<ReplyState>,
    replied: Condvar,
}

// SAFETY: the buffers are written by a reply only while `reply.armed` is set, under that
// mutex, and by the entry's thread and the kernel only while it is not.
unsafe impl Sync for Buffers {}
// SAFETY: as above; the allocations have no thread affinity.
unsafe impl Send for Buffers {}

#[derive(Default)]
struct ReplyState {
    /// A request is being served and has not been answered.
    armed: bool,
    /// The request's own bytes (in the payload buffer) are still lent to its handler: a
    /// reply waits in `staged` until the handler returns.
    lent: bool,
    staged: Vec<u8>,
}

impl Buffers {
    fn new(max_payload: usize) -> Buffers {
        let header = Box::into_raw(vec![0u64; HEADER_SIZE / 8].into_boxed_slice());
        let buf_words = (PREFIX + max_payload).div_ceil(8);
        let buf = Box::into_raw(vec![0u64; buf_words].into_boxed_slice());
        Buffers {
            header: header.cast(),
            buf: buf.cast(),
            buf_words,
            max_payload,
            reply: Mutex::new(ReplyState::default()),
            replied: Condvar::new(),
        }
    }

    fn payload(&self) -> *mut u8 {
        self.buf.wrapping_add(PREFIX)
    }

    fn state(&self) -> MutexGuard<'_, ReplyState> {
        self.reply.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write a reply (a `fuse_out_header` and its arguments) where the kernel reads it.
    ///
    /// # Safety
    /// The caller holds the reply lock with the entry armed and nothing lent, or is the
    /// entry's thread with no reply possible: the buffers are its to write.
    unsafe fn put(&self, bytes: &[io::IoSlice<'_>]) {
        let total: usize = bytes.iter().map(|b| b.len()).sum();
        if total < OUT_HEADER || total - OUT_HEADER > self.max_payload {
            // Cannot be passed on whole: the request fails with EIO instead.
            let unique = bytes
                .first()
                .and_then(|first| first.get(8..16))
                .and_then(|u| u.try_into().ok())
                .map(u64::from_ne_bytes)
                .unwrap_or(0);
            let h = error_header(unique, libc::EIO);
            // SAFETY: by the caller; the header buffer holds HEADER_SIZE bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(h.as_ptr(), self.header, OUT_HEADER);
                set_payload_sz(self.header, 0);
            }
            return;
        }
        let mut off = 0;
        for b in bytes {
            let mut src: &[u8] = b;
            while !src.is_empty() {
                // Within the header's first 16 bytes, or the payload's first
                // `max_payload` (total was checked above).
                let (dst, room) = if off < OUT_HEADER {
                    (self.header.wrapping_add(off), OUT_HEADER - off)
                } else {
                    (self.payload().wrapping_add(off - OUT_HEADER), src.len())
                };
                let n = room.min(src.len());
                // SAFETY: by the caller, and dst..dst+n is within the buffers (above).
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, n) };
                src = &src[n..];
                off += n;
            }
        }
        // SAFETY: by the caller.
        unsafe { set_payload_sz(self.header, (total - OUT_HEADER) as u32) };
    }
}

/// A reply header failing request `unique` with `errno`.
fn error_header(unique: u64, errno: i32) -> [u8; OUT_HEADER] {
    let mut h = [0u8; OUT_HEADER];
    h[..4].copy_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&(-errno).to_ne_bytes());
    h[8..].copy_from_slice(&unique.to_ne_bytes());
    h
}

/// The reply side of an entry, handed to the dispatch for one request at a time.
struct EntryReply(Arc<Buffers>);

impl std::fmt::Debug for EntryReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("io_uring entry reply")
    }
}

impl RawReply for EntryReply {
    fn send(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<()> {
        let b = &self.0;
        let mut s = b.state();
        if !s.armed {
            return Err(io::Error::other("io_uring entry: a reply with no request"));
        }
        if s.lent {
            // The handler still reads the request's bytes where this reply would go.
            s.staged.clear();
            for x in bufs {
                s.staged.extend_from_slice(x);
            }
        } else {
            // SAFETY: armed, nothing lent, and we hold the lock.
            unsafe { b.put(bufs) };
        }
        s.armed = false;
        drop(s);
        b.replied.notify_one();
        Ok(())
    }
}

/// Write `ring_ent_in_out.payload_sz`.
///
/// # Safety
/// `header` is an entry's header buffer the caller may write.
unsafe fn set_payload_sz(header: *mut u8, n: u32) {
    // SAFETY: by the caller; offset 16 of ent_in_out is payload_sz (flags, commit_id before).
    unsafe { std::ptr::write_unaligned(header.add(ENT_IN_OUT + 16).cast::<u32>(), n) };
}

/// `struct fuse_uring_cmd_req` in the SQE's 80-byte command area.
fn cmd_req(qid: u16, commit_id: u64) -> [u8; 80] {
    let mut c = [0u8; 80];
    c[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    c[16..18].copy_from_slice(&qid.to_ne_bytes());
    c
}

/// Offset of `len` in `struct io_uring_sqe` (opcode, flags, ioprio, fd, off, addr).
const SQE_LEN: usize = 24;

/// The io-uring crate's `UringCmd80` sets `addr` but not `len`; FUSE's register takes the
/// count of its iovecs there.
fn with_len(mut sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    // SAFETY: Entry128 is repr(C), starting with the kernel's struct io_uring_sqe, in
    // which `len` is the u32 at byte 24.
    unsafe {
        std::ptr::write_unaligned(
            (&mut sqe as *mut squeue::Entry128)
                .cast::<u8>()
                .add(SQE_LEN)
                .cast::<u32>(),
            len,
        )
    };
    sqe
}

/// One entry: its thread's ring and its buffers.
struct Entry {
    qid: u16,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    buffers: Arc<Buffers>,
    /// The reply side of `buffers`, handed to every request's dispatch.
    reply: Arc<dyn RawReply>,
    /// The kernel accepted the register: it holds the buffers' addresses.
    registered: bool,
}

impl Entry {
    /// The ring and buffers, made before the kernel agrees to io_uring; says on `made`
    /// whether they could be.
    fn new(qid: u16, max_payload: usize, made: &Sender<io::Result<()>>) -> Option<Entry> {
        super::idle::serves_elsewhere();
        let ring = match IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_single_issuer()
            .build(4)
        {
            Ok(r) => r,
            Err(e) => {
                let _ = made.send(Err(e));
                return None;
            }
        };
        let _ = made.send(Ok(()));
        let buffers = Arc::new(Buffers::new(max_payload));
        Some(Entry {
            qid,
            ring,
            reply: Arc::new(EntryReply(Arc::clone(&buffers))),
            buffers,
            registered: false,
        })
    }

    /// Register with the kernel, then serve what it hands this entry until the mount goes
    /// or the session stops the rings.
    fn serve<FS: Filesystem>(
        &mut self,
        s: Start<FS>,
        stop: RawFd,
        registered: Sender<io::Result<()>>,
    ) {
        let dev = s.device.as_raw_fd();
        let b = Arc::clone(&self.buffers);
        let iov = [
            libc::iovec {
                iov_base: b.header.cast(),
                iov_len: HEADER_SIZE,
            },
            libc::iovec {
                iov_base: b.payload().cast(),
                iov_len: b.max_payload,
            },
        ];
        let register = with_len(
            opcode::UringCmd80::new(types::Fd(dev), CMD_REGISTER)
                .cmd(cmd_req(self.qid, 0))
                .addr(Some(iov.as_ptr() as u64))
                .build()
                .user_data(ENTRY),
            2,
        );
        let poll = opcode::PollAdd::new(types::Fd(stop), libc::POLLIN as u32)
            .build()
            .user_data(STOP)
            .into();
        // SAFETY: the kernel reads the iovecs while the register is submitted (below, before
        // `iov` goes), and keeps the buffers' addresses, which are never freed (Drop); the
        // eventfd outlives this thread (the session joins it before closing it).
        let pushed = unsafe {
            let mut sq = self.ring.submission();
            sq.push(&register).is_ok() && sq.push(&poll).is_ok()
        };
        let submitted = if pushed {
            self.ring.submit().map(|_| ())
        } else {
            Err(io::Error::other("submission queue full"))
        };
        // A refused register completes at once with its error; an accepted one only when a
        // request comes.
        let mut pending = self.ring.completion().next();
        let refused = match (&submitted, &pending) {
            (Err(e), _) => Some(io::Error::new(e.kind(), e.to_string())),
            (_, Some(c)) if c.user_data() == ENTRY && c.result() < 0 => {
                Some(io::Error::from_raw_os_error(-c.result()))
            }
            _ => None,
        };
        let failed = refused.is_some();
        let _ = registered.send(refused.map_or(Ok(()), Err));
        drop(registered);
        if failed {
            return;
        }
        self.registered = true;
        let qid = self.qid;
        loop {
            let cqe = match pending.take().or_else(|| self.ring.completion().next()) {
                Some(c) => c,
                None => {
                    match self.ring.submit_and_wait(1) {
                        Ok(_) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                        Err(e) => fatal(&format!("entry {qid}: {e}")),
                    }
                    continue;
                }
            };
            if cqe.user_data() == STOP {
                return;
            }
            let res = cqe.result();
            if res < 0 {
                match -res {
                    // The mount is going: the kernel has let go of the entry.
                    libc::ENOTCONN | libc::ECONNABORTED | libc::ENODEV => return,
                    e => fatal(&format!("entry {qid}: {}", io::Error::from_raw_os_error(e))),
                }
            }
            let commit_id = self.serve_one(&s.dispatcher);
            let commit = opcode::UringCmd80::new(types::Fd(dev), CMD_COMMIT_AND_FETCH)
                .cmd(cmd_req(qid, commit_id))
                .build()
                .user_data(ENTRY);
            // SAFETY: as for the register: the buffers are never freed.
            if unsafe { self.ring.submission().push(&commit) }.is_err() {
                fatal(&format!("entry {qid}: submission queue full"));
            }
            loop {
                match self.ring.submit() {
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => fatal(&format!("entry {qid}: {e}")),
                }
            }
        }
    }

    /// Dispatch the request the kernel has put in the entry and wait for its reply; return
    /// the request's commit id.
    fn serve_one<FS: Filesystem>(&self, d: &RawDispatcher<FS>) -> u64 {
        let b = &*self.buffers;
        let (header, payload) = (b.header, b.payload());
        // SAFETY: not armed: the kernel has written the entry and no reply touches it.
        let (len, unique, commit_id, payload_sz) = unsafe {
            (
                std::ptr::read_unaligned(header.cast::<u32>()) as usize,
                std::ptr::read_unaligned(header.add(8).cast::<u64>()),
                std::ptr::read_unaligned(header.add(ENT_IN_OUT + 8).cast::<u64>()),
                std::ptr::read_unaligned(header.add(ENT_IN_OUT + 16).cast::<u32>()) as usize,
            )
        };
        let op_len = len
            .checked_sub(IN_HEADER + payload_sz)
            .filter(|&n| n <= OP_IN && payload_sz <= b.max_payload);
        {
            let mut s = b.state();
            s.armed = true;
            // A reply to a request whose bytes are all in the prefix cannot overlap them.
            s.lent = payload_sz > 0;
        }
        let reply = &self.reply;
        let mut copy = Vec::new();
        let data: Option<&[u8]> = match op_len {
            Some(op_len) if (IN_HEADER + op_len).is_multiple_of(8) => {
                let start = PREFIX - IN_HEADER - op_len;
                // SAFETY: the request's header and op header go into the prefix just before
                // the payload, making the request one 8-aligned slice of buf; nobody else
                // writes buf's prefix, and replies do not write the payload while it is lent.
                unsafe {
                    std::ptr::copy_nonoverlapping(header, b.buf.add(start), IN_HEADER);
                    std::ptr::copy_nonoverlapping(
                        header.add(128),
                        b.buf.add(PREFIX - op_len),
                        op_len,
                    );
                    Some(std::slice::from_raw_parts(
                        b.buf.add(start),
                        IN_HEADER + op_len + payload_sz,
                    ))
                }
            }
            Some(op_len) => {
                // An operation header of a length that would misalign the request: copy it.
                copy = vec![0u64; (IN_HEADER + op_len + payload_sz).div_ceil(8)];
                let base = copy.as_mut_ptr().cast::<u8>();
                // SAFETY: `copy` holds every byte copied; the sources are the kernel's.
                unsafe {
                    std::ptr::copy_nonoverlapping(header, base, IN_HEADER);
                    std::ptr::copy_nonoverlapping(header.add(128), base.add(IN_HEADER), op_len);
                    std::ptr::copy_nonoverlapping(
                        payload,
                        base.add(IN_HEADER + op_len),
                        payload_sz,
                    );
                    Some(std::slice::from_raw_parts(
                        base,
                        IN_HEADER + op_len + payload_sz,
                    ))
                }
            }
            None => None,
        };
        let dispatched = match data {
            Some(data) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                d.dispatch(data, Arc::clone(reply))
            }))
            .unwrap_or_else(|_| Err(io::Error::other("its handler panicked"))),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("request of {len} bytes with a payload of {payload_sz}"),
            )),
        };
        drop(copy);
        if let Err(err) = dispatched {
            tracing::warn!("io_uring: {err}; answering EIO");
            let h = error_header(unique, libc::EIO);
            let _ = reply.send(&[io::IoSlice::new(&h)]);
        }
        // The handler is done with the request's bytes: a reply that waited may go in.
        let mut s = b.state();
        s.lent = false;
        while s.armed {
            s = b.replied.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if !s.staged.is_empty() {
            // SAFETY: the reply has been given (not armed) and the handler is done with the
            // request: the buffers are this thread's (we hold the lock besides).
            unsafe { b.put(&[io::IoSlice::new(&s.staged)]) };
            s.staged.clear();
        }
        commit_id
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: made by Box::into_raw of boxed slices of these lengths in Buffers::new,
        // freed once here. Buffers the kernel may still write are never dropped (Entry's Drop).
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.header.cast::<u64>(),
                HEADER_SIZE / 8,
            )));
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.buf.cast::<u64>(),
                self.buf_words,
            )));
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if self.registered {
            // The kernel took the buffers' addresses at the register and lets go of them
            // only when the ring's teardown (asynchronous after its close) has cancelled the
            // entry: keep them, once per entry as the session ends (the daemon exits next).
            std::mem::forget(Arc::clone(&self.buffers));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_register_command_carries_its_iovec_count_and_queue() {
        let e = with_len(
            opcode::UringCmd80::new(types::Fd(7), CMD_REGISTER)
                .cmd(cmd_req(3, 0x1122))
                .addr(Some(0xdead_beef))
                .build(),
            2,
        );
        // SAFETY: Entry128 is 128 plain bytes.
        let bytes: [u8; 128] = unsafe { std::mem::transmute(e) };
        assert_eq!(bytes[0], opcode::UringCmd80::CODE);
        assert_eq!(i32::from_ne_bytes(bytes[4..8].try_into().unwrap()), 7);
        assert_eq!(
            u64::from_ne_bytes(bytes[16..24].try_into().unwrap()),
            0xdead_beef
        );
        assert_eq!(u32::from_ne_bytes(bytes[24..28].try_into().unwrap()), 2);
        // cmd_op (u32 at 8 in the kernel's union with off) and the command area at 48.
        assert_eq!(
            u32::from_ne_bytes(bytes[8..12].try_into().unwrap()),
            CMD_REGISTER
        );
        assert_eq!(
            u64::from_ne_bytes(bytes[56..64].try_into().unwrap()),
            0x1122
        );
        assert_eq!(u16::from_ne_bytes(bytes[64..66].try_into().unwrap()), 3);
    }

    #[test]
    fn the_possible_cpus_are_counted() {
        assert!(possible_cpus().unwrap() >= 1);
    }

    /// A reply to a request whose bytes its handler still reads waits until the handler
    /// returns; the header and payload then hold it as the kernel reads them.
    #[test]
    fn a_reply_to_a_request_still_lent_waits_and_lands_whole() {
        let b = Arc::new(Buffers::new(64));
        {
            let mut s = b.state();
            s.armed = true;
            s.lent = true;
        }
        // SAFETY: not armed for replies to the payload yet: this test is the entry thread.
        unsafe { std::ptr::write_bytes(b.payload(), 0xAA, 8) };
        let r = EntryReply(Arc::clone(&b));
        let h = {
            let mut h = [0u8; OUT_HEADER];
            h[..4].copy_from_slice(&((OUT_HEADER + 8) as u32).to_ne_bytes());
            h[8..].copy_from_slice(&42u64.to_ne_bytes());
            h
        };
        r.send(&[
            io::IoSlice::new(&h),
            io::IoSlice::new(&[1, 2, 3, 4, 5, 6, 7, 8]),
        ])
        .unwrap();
        // Lent: the request's bytes are untouched.
        // SAFETY: reads within the payload.
        let lent = unsafe { std::slice::from_raw_parts(b.payload(), 8) };
        assert_eq!(lent, &[0xAA; 8]);
        let mut s = b.state();
        s.lent = false;
        let staged = std::mem::take(&mut s.staged);
        // SAFETY: the reply is given: the buffers are the entry thread's (this test's).
        unsafe { b.put(&[io::IoSlice::new(&staged)]) };
        // SAFETY: reads within the buffers.
        unsafe {
            assert_eq!(
                std::slice::from_raw_parts(b.payload(), 8),
                &[1, 2, 3, 4, 5, 6, 7, 8]
            );
            assert_eq!(std::ptr::read_unaligned(b.header.add(8).cast::<u64>()), 42);
            assert_eq!(
                std::ptr::read_unaligned(b.header.add(ENT_IN_OUT + 16).cast::<u32>()),
                8
            );
        }
        drop(s);
        // A second reply to the same request is refused.
        assert!(r.send(&[io::IoSlice::new(&h)]).is_err());
    }

    /// A reply larger than the payload fails the request with EIO instead of overrunning.
    #[test]
    fn a_reply_too_large_for_the_payload_is_eio() {
        let b = Arc::new(Buffers::new(16));
        b.state().armed = true;
        let r = EntryReply(Arc::clone(&b));
        let mut h = [0u8; OUT_HEADER];
        h[8..].copy_from_slice(&7u64.to_ne_bytes());
        r.send(&[io::IoSlice::new(&h), io::IoSlice::new(&[0u8; 17])])
            .unwrap();
        // SAFETY: reads within the header.
        unsafe {
            assert_eq!(
                std::ptr::read_unaligned(b.header.add(4).cast::<i32>()),
                -libc::EIO
            );
            assert_eq!(std::ptr::read_unaligned(b.header.add(8).cast::<u64>()), 7);
            assert_eq!(
                std::ptr::read_unaligned(b.header.add(ENT_IN_OUT + 16).cast::<u32>()),
                0
            );
        }
    }
}
