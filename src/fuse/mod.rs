//! The thin kernel adapter: `fuser::Filesystem` on top of [`crate::fs::Fs`]. Every handler
//! calls one `Fs` method and turns its answer into a reply, or its error into the error's
//! errno. No crypto, no store logic and no policy live here.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

mod idle;
pub mod uring;

pub use crate::error::Error;
use crate::fs::{Attr, Caching, Fs, NodeKind, ROOT_INO};
use idle::IdleThreads;

/// Entries (threads) per CPU's queue when the kernel serves through io_uring: a CPU's
/// requests go to its own queue; sixteen did worse than eight at queue depth 16 and each
/// holds a 1 MiB payload buffer.
const URING_PER_QUEUE: usize = 8;

/// Largest write and readahead we ask the kernel for.
const MAX_IO: u32 = 1 << 20;

/// Capabilities asked for one by one (any the kernel lacks is skipped). `FUSE_BIG_WRITES`
/// and `FUSE_MAX_PAGES` are already requested by fuser itself when the kernel has them.
const WANTED_CAPS: [(&str, InitFlags); 5] = [
    ("FUSE_ASYNC_DIO", InitFlags::FUSE_ASYNC_DIO),
    ("FUSE_DO_READDIRPLUS", InitFlags::FUSE_DO_READDIRPLUS),
    ("FUSE_READDIRPLUS_AUTO", InitFlags::FUSE_READDIRPLUS_AUTO),
    ("FUSE_PARALLEL_DIROPS", InitFlags::FUSE_PARALLEL_DIROPS),
    ("FUSE_BIG_WRITES", InitFlags::FUSE_BIG_WRITES),
];

/// Called once when the session ends, after the filesystem has been shut down.
pub type DestroyHook = Box<dyn FnOnce() + Send + Sync>;

/// The filesystem as the kernel sees it.
pub struct FuseFs {
    fs: Arc<Fs>,
    ttl: Duration,
    on_destroy: Option<DestroyHook>,
    idle: Arc<IdleThreads>,
    /// Ask the kernel for FUSE over io_uring, where it offers it.
    uring_wanted: bool,
    /// What came of it at INIT, for the session to start (see [`uring`]).
    uring: Arc<Mutex<UringState>>,
}

/// Whether the session serves through io_uring, as settled at INIT.
#[derive(Default)]
pub enum UringState {
    /// Not asked for (no `--io-uring`).
    #[default]
    NotWanted,
    /// The kernel does not offer it.
    NotOffered,
    /// Offered, but the entries could not be made (why): not agreed, the device is read.
    Failed(String),
    /// Agreed: the entries wait to be registered once the session runs.
    Agreed(uring::Prepared<FuseFs>),
}

impl FuseFs {
    /// Adapt `fs`; attributes and entries are cached by the kernel for one second.
    /// A session of `threads` threads serves it (see [`idle`]).
    pub fn new(fs: Arc<Fs>, threads: usize) -> FuseFs {
        FuseFs {
            fs,
            ttl: Duration::from_secs(1),
            on_destroy: None,
            idle: IdleThreads::new(threads),
            uring_wanted: false,
            uring: Arc::default(),
        }
    }

    /// Ask the kernel for FUSE over io_uring at INIT, where it offers it (see [`uring`]).
    pub fn io_uring(mut self, wanted: bool) -> FuseFs {
        self.uring_wanted = wanted;
        self
    }

    /// What INIT settled about io_uring: once agreed, the session must start the entries
    /// ([`uring::Prepared::start`]).
    pub fn io_uring_state(&self) -> Arc<Mutex<UringState>> {
        Arc::clone(&self.uring)
    }

    /// The count of session threads waiting for requests (see [`idle`]), for the session
    /// to give the device to.
    pub fn idle_threads(&self) -> Arc<IdleThreads> {
        Arc::clone(&self.idle)
    }

    /// In an account's mount of a system store, only that account (and root) may use it:
    /// anyone else is refused, by the kernel's word on who asks, and the attempt logged.
    fn refused(&self, req: &Request, op: &str) -> bool {
        let Some(owner) = self.fs.account_uid() else {
            return false;
        };
        let uid = req.uid();
        if uid == owner || uid == 0 {
            return false;
        }
        let line = format!(
            "refused {op} by uid {uid} (pid {}): this mount is account uid {owner}'s",
            req.pid()
        );
        tracing::warn!("{line}");
        // Into the system store's audit log too, a few lines a second per user.
        static THROTTLE: std::sync::LazyLock<crate::account::Throttle> =
            std::sync::LazyLock::new(Default::default);
        if THROTTLE.allow(uid) {
            if let Some(a) = crate::account::Account::of_store_dir(&self.fs.store().root) {
                a.audit(&format!("mount: {line}"));
            }
        }
        true
    }

    /// Run `f` when the session ends (after `Fs::shutdown`).
    pub fn on_destroy(mut self, f: DestroyHook) -> FuseFs {
        self.on_destroy = Some(f);
        self
    }
}

/// The errno to answer for `e` (logged at debug level; EIO at warn level).
fn errno(op: &str, e: &Error) -> Errno {
    let n = e.errno();
    if n == libc::EIO {
        tracing::warn!("{op}: {e}");
    } else {
        tracing::debug!("{op}: {e} (errno {n})");
    }
    Errno::from_i32(n)
}

fn file_type(k: NodeKind) -> FileType {
    match k {
        NodeKind::Dir => FileType::Directory,
        NodeKind::File => FileType::RegularFile,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: a.blksize,
        flags: 0,
    }
}

/// Entries of a readdirplus reply whose attributes are worked out ahead (a page holds
/// about 25).
const PLUS_BATCH: usize = 32;

/// A directory's entries as the kernel lists them: `.`, `..`, then `list`.
fn entries<'a>(
    ino: u64,
    list: &'a [crate::fs::DirEntry],
) -> impl Iterator<Item = (u64, FileType, &'a str)> + 'a {
    [(ino, "."), (ROOT_INO, "..")]
        .into_iter()
        .map(|(i, n)| (i, FileType::Directory, n))
        .chain(
            list.iter()
                .map(|e| (e.ino, file_type(e.kind), e.name.as_str())),
        )
}

/// Attributes that say nothing (given with a zero lifetime).
fn unknown_attr(ino: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

#[allow(clippy::too_many_arguments)]
impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_IO) {
            let _ = config.set_max_write(max);
        }
        // Capped by the bound the kernel offers (usually 128 KiB); `mount` raises the
        // mount's bdi readahead afterwards where it may.
        if let Err(max) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(max);
        }
        for (name, cap) in WANTED_CAPS {
            match config.add_capabilities(cap) {
                Ok(()) => tracing::debug!("capability {name} requested"),
                Err(_) => tracing::debug!("capability {name} not offered by the kernel"),
            }
        }
        if self.uring_wanted {
            // Once agreed, the kernel sends requests nowhere else: make everything that can
            // fail first, and agree only if it worked.
            let state = if !config
                .capabilities()
                .contains(InitFlags::FUSE_OVER_IO_URING)
            {
                UringState::NotOffered
            } else {
                match uring::Prepared::new(URING_PER_QUEUE, MAX_IO as usize) {
                    Err(why) => UringState::Failed(why),
                    Ok(p) => match config.add_capabilities(InitFlags::FUSE_OVER_IO_URING) {
                        Ok(()) => UringState::Agreed(p),
                        Err(_) => UringState::NotOffered,
                    },
                }
            };
            *self.uring.lock().unwrap_or_else(|p| p.into_inner()) = state;
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.fs.shutdown();
        if let Some(f) = self.on_destroy.take() {
            f();
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _serving = self.idle.serving();
        if self.refused(req, "lookup") {
            return reply.error(Errno::EACCES);
        }
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        match self.fs.lookup(parent.0, name) {
            Ok(a) => reply.entry(&self.ttl, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno("lookup", &e)),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _serving = self.idle.serving();
        if self.refused(req, "getattr") {
            return reply.error(Errno::EACCES);
        }
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&self.ttl, &file_attr(&a)),
            Err(e) => reply.error(errno("getattr", &e)),
        }
    }

    /// Only a size change reaches the core; time updates are accepted and ignored; a
    /// change of mode or owner is refused (EPERM).
    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _serving = self.idle.serving();
        if self.refused(req, "setattr") {
            return reply.error(Errno::EACCES);
        }
        let cur = match self.fs.getattr(ino.0) {
            Ok(a) => a,
            Err(e) => return reply.error(errno("setattr", &e)),
        };
        let chmod = mode.is_some_and(|m| (m & 0o7777) as u16 != cur.perm);
        let chown = uid.is_some_and(|u| u != cur.uid) || gid.is_some_and(|g| g != cur.gid);
        if chmod || chown {
            return reply.error(Errno::EPERM);
        }
        let r = match size {
            Some(s) => self.fs.set_size(ino.0, s),
            None => Ok(cur),
        };
        match r {
            Ok(a) => reply.attr(&self.ttl, &file_attr(&a)),
            Err(e) => reply.error(errno("setattr", &e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _serving = self.idle.serving();
        if self.refused(req, "open") {
            return reply.error(Errno::EACCES);
        }
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        match self.fs.open(ino.0, write) {
            Ok((fh, caching)) => {
                let f = match caching {
                    Caching::Direct => FopenFlags::FOPEN_DIRECT_IO,
                    Caching::Fresh => FopenFlags::empty(),
                    Caching::Keep => FopenFlags::FOPEN_KEEP_CACHE,
                };
                reply.opened(FileHandle(fh), f)
            }
            Err(e) => reply.error(errno("open", &e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _serving = self.idle.serving();
        match self.fs.read(ino.0, fh.0, offset, size) {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(errno("read", &e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _serving = self.idle.serving();
        let r = if flags.0 & libc::O_DIRECT != 0 {
            self.fs.write_direct(ino.0, fh.0, offset, data)
        } else {
            self.fs.write(ino.0, fh.0, offset, data)
        };
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno("write", &e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _serving = self.idle.serving();
        match self.fs.flush(ino.0, fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("flush", &e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _serving = self.idle.serving();
        match self.fs.fsync(ino.0, fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fsync", &e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _serving = self.idle.serving();
        match self.fs.release(ino.0, fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("release", &e)),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _serving = self.idle.serving();
        if self.refused(req, "opendir") {
            return reply.error(Errno::EACCES);
        }
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno("opendir", &e)),
        }
    }

    /// `.` and `..` first, then the core's entries; entry `i` carries offset `i + 1`.
    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _serving = self.idle.serving();
        if self.refused(req, "readdir") {
            return reply.error(Errno::EACCES);
        }
        let list = match self.fs.dir_entries(ino.0, fh.0) {
            Ok(l) => l,
            Err(e) => return reply.error(errno("readdir", &e)),
        };
        for (i, (e_ino, kind, name)) in entries(ino.0, &list).enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e_ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    /// Entries with their attributes (`ls -l` then needs no lookup per name), numbered as
    /// `readdir`'s.
    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _serving = self.idle.serving();
        if self.refused(req, "readdirplus") {
            return reply.error(Errno::EACCES);
        }
        let list = match self.fs.dir_entries(ino.0, fh.0) {
            Ok(l) => l,
            Err(e) => return reply.error(errno("readdirplus", &e)),
        };
        // What one reply holds (the kernel asks for a page): a fuse_direntplus is 152
        // bytes and the name, padded to 8.
        let batch: Vec<(u64, FileType, &str)> = entries(ino.0, &list)
            .skip(offset as usize)
            .take(PLUS_BATCH)
            .collect();
        let inos: Vec<Option<u64>> = batch
            .iter()
            .map(|&(i, _, name)| (name != "." && name != "..").then_some(i))
            .collect();
        let attrs = self.fs.getattr_many(&inos);
        for (n, ((e_ino, _, name), attr)) in batch.iter().zip(attrs).enumerate() {
            let next = offset + n as u64 + 1;
            // `.`, `..` and an entry whose attributes could not be had: no attributes
            // (a zero lifetime), so the kernel asks again and gets the error then.
            let full = match attr {
                Some(a) => reply.add(
                    INodeNo(*e_ino),
                    next,
                    name,
                    &self.ttl,
                    &file_attr(&a),
                    Generation(0),
                ),
                None => reply.add(
                    INodeNo(*e_ino),
                    next,
                    name,
                    &Duration::ZERO,
                    &unknown_attr(*e_ino),
                    Generation(0),
                ),
            };
            if full {
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _serving = self.idle.serving();
        self.fs.releasedir(fh.0);
        reply.ok()
    }

    // The tree's shape is fixed: names come and go through the store and the control
    // files, never through the namespace calls. Refused quietly (fuser's defaults warn).

    fn mknod(
        &self,
        req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let _serving = self.idle.serving();
        if self.refused(req, "mknod") {
            return reply.error(Errno::EACCES);
        }
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let _serving = self.idle.serving();
        if self.refused(req, "mkdir") {
            return reply.error(Errno::EACCES);
        }
        reply.error(Errno::EPERM);
    }

    fn create(
        &self,
        req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let _serving = self.idle.serving();
        if self.refused(req, "create") {
            return reply.error(Errno::EACCES);
        }
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        let _serving = self.idle.serving();
        if self.refused(req, "unlink") {
            return reply.error(Errno::EACCES);
        }
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        let _serving = self.idle.serving();
        if self.refused(req, "rmdir") {
            return reply.error(Errno::EACCES);
        }
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _serving = self.idle.serving();
        if self.refused(req, "rename") {
            return reply.error(Errno::EACCES);
        }
        reply.error(Errno::EPERM);
    }

    fn symlink(
        &self,
        req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        let _serving = self.idle.serving();
        if self.refused(req, "symlink") {
            return reply.error(Errno::EACCES);
        }
        reply.error(Errno::EPERM);
    }

    fn link(
        &self,
        req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _serving = self.idle.serving();
        if self.refused(req, "link") {
            return reply.error(Errno::EACCES);
        }
        reply.error(Errno::EPERM);
    }

    // Unsupported: ENOSYS (the kernel remembers and stops asking, or falls back to its
    // generic code), without fuser's warning on every call.

    fn getxattr(&self, req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        let _serving = self.idle.serving();
        if self.refused(req, "getxattr") {
            return reply.error(Errno::EACCES);
        }
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        let _serving = self.idle.serving();
        if self.refused(req, "listxattr") {
            return reply.error(Errno::EACCES);
        }
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _serving = self.idle.serving();
        if self.refused(req, "setxattr") {
            return reply.error(Errno::EACCES);
        }
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        let _serving = self.idle.serving();
        if self.refused(req, "removexattr") {
            return reply.error(Errno::EACCES);
        }
        reply.error(Errno::ENOSYS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        let _serving = self.idle.serving();
        reply.error(Errno::ENOSYS);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _serving = self.idle.serving();
        match self.fs.seek(fh.0, offset.max(0) as u64, whence) {
            Ok(at) => reply.offset(at as i64),
            Err(e) => reply.error(errno("lseek", &e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let _serving = self.idle.serving();
        reply.error(Errno::ENOSYS);
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _serving = self.idle.serving();
        if self.refused(req, "statfs") {
            return reply.error(Errno::EACCES);
        }
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(errno("statfs", &e)),
        }
    }
}
