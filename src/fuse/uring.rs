//! FUSE over io_uring: requests taken from per-CPU rings instead of read from the device.
//!
//! Since Linux 6.14 (with the `fuse` module's `enable_uring` parameter on) a FUSE server may
//! take its requests through io_uring. The kernel keeps one queue per possible CPU and hands
//! a request to an entry registered on the queue of the CPU that asked; the server answers
//! and fetches the next request with one `io_uring_enter`. Against reading `/dev/fuse`
//! (a `read`, a `writev`, and a wake-up of whichever thread waited longest, often on the
//! other CPU) that saves a system call and a cross-CPU hand-off per request: on a tmpfs store
//! libfuse's own passthrough example served 4 KiB reads one at a time in 10 µs this way
//! against 34 µs by the device.
//!
//! Each entry here is one thread pinned to its queue's CPU with its own small ring and one
//! registered entry (a 288-byte header and a payload as large as the largest request). The
//! kernel hands a queue's requests to its most recently answered entry first, so a light
//! load stays on warm threads; a burst finds every entry. Every request type comes this way
//! once the ring is ready (`FORGET`s and interrupts still come by the device, read by the
//! session's own loops), and goes to fuser's ordinary dispatch as the bytes a read of the
//! device would have given ([`fuser::RawDispatcher`], our addition to the vendored fuser).
//!
//! The kernel completes every entry with `ENOTCONN` when the mount goes; the session also
//! stops them through an eventfd each ring polls, once its own loops have ended.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
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
/// `user_data` of the stop poll; entries use 1.
const STOP: u64 = 2;
const ENTRY: u64 = 1;

/// What a session serving through io_uring has started: [`Rings::stop`] ends and joins it.
pub struct Rings {
    stop: OwnedFd,
    threads: Vec<JoinHandle<()>>,
}

impl Rings {
    /// Start `per_queue` entries on every possible CPU's queue, each on its own thread,
    /// for requests of up to `max_payload` bytes after their headers. Fails (saying why)
    /// if the rings cannot be set up: the session then goes on reading the device.
    pub fn start<FS: Filesystem>(
        dispatcher: RawDispatcher<FS>,
        device: BorrowedFd<'_>,
        per_queue: usize,
        max_payload: usize,
    ) -> Result<Rings, String> {
        let queues = possible_cpus().map_err(|e| format!("cannot count the CPUs: {e}"))?;
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(format!("no eventfd: {}", io::Error::last_os_error()));
        }
        // SAFETY: efd is a new descriptor owned by nothing else.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let device = Arc::new(
            device
                .try_clone_to_owned()
                .map_err(|e| format!("cannot duplicate the FUSE device: {e}"))?,
        );
        let mut rings = Rings {
            stop,
            threads: Vec::new(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        for qid in 0..queues {
            for n in 0..per_queue {
                let d = dispatcher.clone();
                let dev = Arc::clone(&device);
                let stop = rings.stop.as_raw_fd();
                let tx = tx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("uring-{qid}.{n}"))
                    .spawn(move || Entry::serve(d, dev.as_raw_fd(), stop, qid, max_payload, tx));
                match spawned {
                    Ok(t) => rings.threads.push(t),
                    Err(e) => {
                        rings.stop();
                        return Err(format!("cannot start a thread: {e}"));
                    }
                }
            }
        }
        drop(tx);
        // Every entry says whether it registered; one refusal (the ring never becomes
        // ready without an entry on every queue) ends them all.
        for _ in 0..rings.threads.len() {
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    rings.stop();
                    return Err(format!("cannot register with the kernel: {e}"));
                }
                Err(_) => break,
            }
        }
        Ok(rings)
    }

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

/// The number of queues the kernel makes: one per possible CPU.
fn possible_cpus() -> io::Result<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in s.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (
            a.parse().map_err(|_| bad_cpus(&s))?,
            b.parse().map_err(|_| bad_cpus(&s))?,
        );
        n = n.max(b + 1);
        let _ = a;
    }
    if n == 0 {
        return Err(bad_cpus(&s));
    }
    Ok(n)
}

fn bad_cpus(s: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("cpu list {s:?}"))
}

/// One registered entry: its buffers, and the reply to the request it holds.
struct Entry {
    /// The kernel's header (`HEADER_SIZE` bytes, 8-aligned).
    header: Box<[u64]>,
    /// `PREFIX` bytes, then the payload.
    buf: Box<[u64]>,
    max_payload: usize,
    reply: Mutex<Reply>,
    replied: Condvar,
}

#[derive(Default)]
struct Reply {
    /// A request is being served and has not been answered.
    armed: bool,
}

/// The reply side of an entry, handed to the dispatch for one request at a time.
#[derive(Debug)]
struct EntryReply(Arc<EntryCell>);

/// The entry, shared with its replies (which may be sent from another thread).
struct EntryCell(std::cell::UnsafeCell<Entry>);

// SAFETY: the buffers are written by a reply only while `reply.armed` is set under its mutex,
// and the entry's thread touches them only while it is not (or before arming it).
unsafe impl Sync for EntryCell {}
// SAFETY: as above; the boxes have no thread affinity.
unsafe impl Send for EntryCell {}

impl std::fmt::Debug for EntryCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("uring entry")
    }
}

impl EntryCell {
    fn entry(&self) -> &Entry {
        // SAFETY: shared access to the fields that are not the buffers' bytes (the boxes'
        // pointers and lengths never change, the mutex and condvar are Sync).
        unsafe { &*self.0.get() }
    }

    fn header_ptr(&self) -> *mut u8 {
        self.entry().header.as_ptr() as *mut u8
    }

    fn payload_ptr(&self) -> *mut u8 {
        // SAFETY: PREFIX is within buf.
        unsafe { (self.entry().buf.as_ptr() as *mut u8).add(PREFIX) }
    }
}

impl RawReply for EntryReply {
    fn send(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<()> {
        let cell = &self.0;
        let e = cell.entry();
        let mut r = e.reply.lock().unwrap_or_else(|p| p.into_inner());
        if !r.armed {
            return Err(io::Error::other("io_uring entry: a second reply"));
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let (header, payload) = (cell.header_ptr(), cell.payload_ptr());
        if total < OUT_HEADER || total - OUT_HEADER > e.max_payload {
            // Cannot be passed on whole: the request fails with EIO instead.
            let unique = if bufs.first().is_some_and(|b| b.len() >= OUT_HEADER) {
                u64::from_ne_bytes(bufs[0][8..16].try_into().unwrap_or_default())
            } else {
                0
            };
            let mut h = [0u8; OUT_HEADER];
            h[..4].copy_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
            h[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
            h[8..].copy_from_slice(&unique.to_ne_bytes());
            // SAFETY: the entry is armed (we hold its lock): its buffers are ours to write.
            unsafe {
                std::ptr::copy_nonoverlapping(h.as_ptr(), header, OUT_HEADER);
                set_payload_sz(header, 0);
            }
        } else {
            let mut off = 0;
            for b in bufs {
                let mut src: &[u8] = b;
                while !src.is_empty() {
                    // Offsets are within the header's first 16 bytes or the payload's
                    // max_payload bytes (checked against total above).
                    let (dst, room) = if off < OUT_HEADER {
                        (header.wrapping_add(off), OUT_HEADER - off)
                    } else {
                        (payload.wrapping_add(off - OUT_HEADER), src.len())
                    };
                    let n = room.min(src.len());
                    // SAFETY: as above.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, n) };
                    src = &src[n..];
                    off += n;
                }
            }
            // SAFETY: as above.
            unsafe { set_payload_sz(header, (total - OUT_HEADER) as u32) };
        }
        r.armed = false;
        drop(r);
        e.replied.notify_one();
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

impl Entry {
    /// The thread of one entry: register it on queue `qid`, then serve what the kernel
    /// hands it until the mount goes or the session stops the rings.
    fn serve<FS: Filesystem>(
        d: RawDispatcher<FS>,
        dev: RawFd,
        stop: RawFd,
        qid: usize,
        max_payload: usize,
        registered: std::sync::mpsc::Sender<io::Result<()>>,
    ) {
        super::serves_elsewhere();
        let cell = Arc::new(EntryCell(std::cell::UnsafeCell::new(Entry {
            header: vec![0u64; HEADER_SIZE / 8].into_boxed_slice(),
            buf: vec![0u64; (PREFIX + max_payload).div_ceil(8)].into_boxed_slice(),
            max_payload,
            reply: Mutex::new(Reply::default()),
            replied: Condvar::new(),
        })));
        let reply: Arc<dyn RawReply> = Arc::new(EntryReply(Arc::clone(&cell)));
        let mut ring = match IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_single_issuer()
            .build(4)
        {
            Ok(r) => r,
            Err(e) => {
                let _ = registered.send(Err(e));
                return;
            }
        };
        let iov = [
            libc::iovec {
                iov_base: cell.header_ptr().cast(),
                iov_len: HEADER_SIZE,
            },
            libc::iovec {
                iov_base: cell.payload_ptr().cast(),
                iov_len: max_payload,
            },
        ];
        let qid16 = qid as u16;
        let register = with_len(
            opcode::UringCmd80::new(types::Fd(dev), CMD_REGISTER)
                .cmd(cmd_req(qid16, 0))
                .addr(Some(iov.as_ptr() as u64))
                .build()
                .user_data(ENTRY),
            2,
        );
        let poll = opcode::PollAdd::new(types::Fd(stop), libc::POLLIN as u32)
            .build()
            .user_data(STOP)
            .into();
        // SAFETY: the iovecs and the buffers they point to outlive the ring (dropped first
        // at the end of this function); the eventfd outlives this thread (Rings joins it).
        let pushed = unsafe {
            let mut sq = ring.submission();
            sq.push(&register).is_ok() && sq.push(&poll).is_ok()
        };
        if !pushed {
            let _ = registered.send(Err(io::Error::other("submission queue full")));
            return;
        }
        if let Err(e) = ring.submit() {
            let _ = registered.send(Err(e));
            return;
        }
        // A refused register completes at once with its error; an accepted one only when a
        // request comes. Look once without waiting.
        let mut first = None;
        if let Some(c) = ring.completion().next() {
            first = Some(c);
        }
        if let Some(c) = &first {
            if c.user_data() == ENTRY && c.result() < 0 {
                let _ = registered.send(Err(io::Error::from_raw_os_error(-c.result())));
                return;
            }
        }
        let _ = registered.send(Ok(()));
        drop(registered);
        let mut pending = first;
        loop {
            let cqe = match pending.take().or_else(|| ring.completion().next()) {
                Some(c) => c,
                None => {
                    match ring.submit_and_wait(1) {
                        Ok(_) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                        Err(e) => {
                            tracing::warn!("io_uring entry {qid}: {e}; stopping it");
                            return;
                        }
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
                    libc::ENOTCONN | libc::ECONNABORTED | libc::ENODEV => {}
                    e => tracing::warn!(
                        "io_uring entry {qid}: {}; stopping it",
                        io::Error::from_raw_os_error(e)
                    ),
                }
                return;
            }
            let commit_id = cell.serve_one(&d, &reply);
            let commit = opcode::UringCmd80::new(types::Fd(dev), CMD_COMMIT_AND_FETCH)
                .cmd(cmd_req(qid16, commit_id))
                .build()
                .user_data(ENTRY);
            // SAFETY: as for the register: the buffers outlive the ring.
            if unsafe { ring.submission().push(&commit) }.is_err() {
                tracing::warn!("io_uring entry {qid}: submission queue full; stopping it");
                return;
            }
            if let Err(e) = ring.submit() {
                tracing::warn!("io_uring entry {qid}: {e}; stopping it");
                return;
            }
        }
    }
}

impl EntryCell {
    /// Dispatch the request the kernel has put in the entry and wait for its reply; return
    /// the request's commit id.
    fn serve_one<FS: Filesystem>(&self, d: &RawDispatcher<FS>, reply: &Arc<dyn RawReply>) -> u64 {
        let e = self.entry();
        let (header, payload) = (self.header_ptr(), self.payload_ptr());
        // SAFETY: not armed: the kernel has written the entry and nobody else touches it.
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
            .filter(|&n| n <= OP_IN && payload_sz <= e.max_payload);
        let mut armed = e.reply.lock().unwrap_or_else(|p| p.into_inner());
        armed.armed = true;
        drop(armed);
        let dispatched = match op_len {
            Some(op_len) if (IN_HEADER + op_len).is_multiple_of(8) => {
                let start = PREFIX - IN_HEADER - op_len;
                // SAFETY: the header's and op header's bytes go into the prefix just before
                // the payload, so the request is one 8-aligned slice of buf; the kernel wrote
                // them, and no reply writes buf's prefix or reads it.
                let data = unsafe {
                    let base = e.buf.as_ptr() as *mut u8;
                    std::ptr::copy_nonoverlapping(header, base.add(start), IN_HEADER);
                    std::ptr::copy_nonoverlapping(
                        header.add(128),
                        base.add(PREFIX - op_len),
                        op_len,
                    );
                    std::slice::from_raw_parts(base.add(start), IN_HEADER + op_len + payload_sz)
                };
                d.dispatch(data, Arc::clone(reply))
            }
            Some(op_len) => {
                // An operation header of a length that would misalign the request: copy all.
                let mut v = vec![0u64; (IN_HEADER + op_len + payload_sz).div_ceil(8)];
                let data = {
                    let base = v.as_mut_ptr().cast::<u8>();
                    // SAFETY: v holds every byte copied; the sources are the kernel's.
                    unsafe {
                        std::ptr::copy_nonoverlapping(header, base, IN_HEADER);
                        std::ptr::copy_nonoverlapping(header.add(128), base.add(IN_HEADER), op_len);
                        std::ptr::copy_nonoverlapping(
                            payload,
                            base.add(IN_HEADER + op_len),
                            payload_sz,
                        );
                        std::slice::from_raw_parts(base, IN_HEADER + op_len + payload_sz)
                    }
                };
                d.dispatch(data, Arc::clone(reply))
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("request of {len} bytes with a payload of {payload_sz}"),
            )),
        };
        if let Err(err) = dispatched {
            tracing::warn!("io_uring: {err}; answering EIO");
            let mut h = [0u8; OUT_HEADER];
            h[..4].copy_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
            h[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
            h[8..].copy_from_slice(&unique.to_ne_bytes());
            let _ = reply.send(&[io::IoSlice::new(&h)]);
        }
        let mut r = e.reply.lock().unwrap_or_else(|p| p.into_inner());
        while r.armed {
            r = e.replied.wait(r).unwrap_or_else(|p| p.into_inner());
        }
        commit_id
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
}
