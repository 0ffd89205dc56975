//! The filesystem core, free of fuser: the tree (`images/`, `disks/`, `snapshots/`,
//! `.control/`), open resources and handles, plaintext read/write (through the volume's
//! sector cache), and control-file requests turned into jobs. `crate::fuse` adapts it to the
//! kernel; tests drive it directly.

mod api;
mod handles;

pub use api::*;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::cache::SectorCache;
use crate::control::jobs::{JobProgress, JobStore};
use crate::control::{self, Op, Request};
use crate::err;
use crate::error::{Error, ErrorKind, Result};
use crate::format::Kind;
use crate::store::{validate_name, AlignedBuf, RekeyMode, ResPath, Store, Volume};
use crate::sys::FileLock;
use handles::Handles;

const IMAGES_INO: u64 = 2;
const DISKS_INO: u64 = 3;
const SNAPSHOTS_INO: u64 = 4;
const CONTROL_INO: u64 = 5;
const COPY_INO: u64 = 6;
const REKEY_INO: u64 = 7;
const SNAPSHOT_INO: u64 = 8;
const JOBS_INO: u64 = 9;
const SHARED_INO: u64 = 10;
const CANCEL_INO: u64 = 11;
/// Directories `shared/OWNER` (an account's mount of a system store) take inodes from here.
const FIRST_OWNER_INO: u64 = 1 << 40;
const FIRST_RES_INO: u64 = 100;

/// The fixed nodes.
enum Node {
    Root,
    KindDir(Kind),
    ControlDir,
    Control(Op),
    /// `.control/cancel`: stops running jobs by id.
    Cancel,
    Jobs,
    /// `shared/`: the images other accounts share with this one.
    SharedDir,
    /// `shared/OWNER/`.
    SharedOwner(String),
    /// A resource; in `shared/OWNER/NAME` its name is `OWNER/NAME` (own names have no `/`).
    Res(ResPath),
}

/// A resource open through the mount: one volume shared by every handle and job on it,
/// holding the store's "open" lock (so delete and offline re-encryption are refused).
struct OpenRes {
    vol: Volume,
    /// Writes done through any handle, counted: an fsync or close of any handle syncs them
    /// (fsync(2) is of the file, not of the descriptor that wrote).
    written: AtomicU64,
    /// How many of them the last sync that succeeded covers; held while a sync runs, so an
    /// fsync racing another's (a close's) waits for it, then syncs again unless that sync
    /// began after the writes it must cover.
    synced: Mutex<u64>,
    _lock: FileLock,
}

impl OpenRes {
    /// Make every write done before this call durable.
    fn sync(&self) -> Result<()> {
        let due = self.written.load(Ordering::SeqCst);
        let mut synced = lock(&self.synced);
        if *synced >= due {
            return Ok(());
        }
        // Writes counted by now are in the file before the sync begins.
        let covers = self.written.load(Ordering::SeqCst);
        self.vol.sync()?;
        *synced = covers;
        Ok(())
    }
}

struct OpenEntry {
    res: Arc<OpenRes>,
    refs: usize,
    /// A kernel open of this entry was answered (Fresh or Keep), so the kernel's pages
    /// follow this volume from then on. Opens of the mount's own jobs are not the kernel's:
    /// until one is, the kernel's pages are those of the last close it saw ([`Inner::kept`]).
    kernel: bool,
}

enum Handle {
    Res {
        path: ResPath,
        res: Arc<OpenRes>,
        write: bool,
    },
    /// A control file, with the ids of the jobs its writes made, one line each: read back
    /// through the same descriptor, they tell a writer which job is its own.
    Control(Op, Mutex<String>),
    Cancel,
    Jobs(Vec<u8>),
    /// An open directory: its entries as they were at opendir, so reading it in pieces
    /// costs one listing, not one per piece.
    Dir(Arc<[DirEntry]>),
}

struct Inner {
    store: Store,
    opts: MountOptions,
    cache: Arc<SectorCache>,
    jobs: JobStore,
    inodes: Inodes<ResPath>,
    owners: Inodes<String>,
    /// The account this store is, in a system store.
    account: Option<crate::account::Account>,
    open: Mutex<HashMap<ResPath, OpenEntry>>,
    /// What each resource's backing file was at its last close: a first open that finds it
    /// the same lets the kernel keep the pages it has cached (see [`Caching`]).
    kept: Mutex<HashMap<ResPath, Ident>>,
    /// Serializes first opens (the I/O of opening a volume), not the open table.
    opening: Mutex<()>,
    /// Serializes making object-storage windows (see `materialize`).
    materializing: Mutex<()>,
    handles: Handles<Handle>,
    /// The jobs running in this mount, by id (what `.control/cancel` can stop).
    running: Mutex<HashMap<String, Arc<JobProgress>>>,
    next_vol: AtomicU64,
    started: SystemTime,
    /// Lookups and getattrs so far (see [`Fs::names_asked`]).
    names_asked: AtomicU64,
}

/// How the kernel may cache an open file's pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caching {
    /// Not at all (control files, whose contents change under it).
    Direct,
    /// Through its page cache, dropping what it held from earlier opens.
    Fresh,
    /// Through its page cache, keeping what earlier opens cached: the resource is open
    /// already, or it is the one it was at its last close ([`Ident`]). Every change to a
    /// resource's plaintext goes through the kernel while it is open here (writes through
    /// the mount, on the same inode), and any change from outside while it was closed (a
    /// delete and a new resource by the same name, a CLI write) gives it another header
    /// uuid, or its file another inode, size, mtime or ctime.
    Keep,
}

/// An open resource's identity and last change: its header's uuid (encrypted resources:
/// a resource made again under the same name has another, even on a reused inode), and its
/// backing file's device, inode, size, mtime and ctime (ns).
type Ident = (Option<[u8; 16]>, u64, u64, u64, i64, i64, i64, i64);

fn ident(vol: &Volume) -> Option<Ident> {
    use std::os::unix::fs::MetadataExt;
    let m = vol.file().metadata().ok()?;
    Some((
        vol.header().map(|h| h.uuid),
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

/// Inodes handed out from `base` on: the same key always gets the same number.
type Inodes<K> = Mutex<(HashMap<K, u64>, HashMap<u64, K>)>;

fn intern<K: std::hash::Hash + Eq + Clone>(m: &Inodes<K>, base: u64, k: &K) -> u64 {
    let mut g = lock(m);
    if let Some(&i) = g.0.get(k) {
        return i;
    }
    let ino = base + g.0.len() as u64;
    g.0.insert(k.clone(), ino);
    g.1.insert(ino, k.clone());
    ino
}

/// Bytes the local copies under a store directory take.
fn cache_bytes(root: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    Kind::ALL
        .iter()
        .filter_map(|k| std::fs::read_dir(root.join(k.dir())).ok())
        .flat_map(|rd| rd.flatten())
        .map(|e| e.metadata().map(|m| m.blocks() * 512).unwrap_or(0))
        .sum()
}

/// The mounted filesystem.
pub struct Fs {
    inner: Arc<Inner>,
}

/// Up to `size` bytes of `text` from `offset` (none past its end).
fn slice_at(text: &[u8], offset: u64, size: u32) -> AlignedBuf {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(text.len());
    let end = start.saturating_add(size as usize).min(text.len());
    let mut buf = AlignedBuf::zeroed(end - start);
    buf.copy_from_slice(&text[start..end]);
    buf
}

/// The non-blank lines of a control-file write.
fn request_lines(data: &[u8]) -> Result<impl Iterator<Item = &str>> {
    let text = std::str::from_utf8(data).map_err(|_| err!(InvalidInput, "requests are text"))?;
    Ok(text.lines().filter(|l| !l.trim().is_empty()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Fs {
    pub fn new(store: Store, opts: MountOptions) -> Result<Fs> {
        store.check()?;
        store.init()?;
        store.clean_tmp();
        // The key store in the bucket, read as the mount starts so the first open need not
        // wait for it (a failure is the first open's to report; a store that does not answer
        // holds the mount up a quarter of a second at most).
        store
            .keys
            .warm_within(std::time::Duration::from_millis(250));
        let jobs = JobStore::new(&store.root);
        jobs.sweep();
        let account = crate::account::Account::of_store_dir(&store.root);
        Ok(Fs {
            inner: Arc::new(Inner {
                cache: Arc::new(SectorCache::new(opts.cache_bytes)),
                jobs,
                store,
                opts,
                inodes: Mutex::new((HashMap::new(), HashMap::new())),
                owners: Mutex::new((HashMap::new(), HashMap::new())),
                account,
                open: Mutex::new(HashMap::new()),
                kept: Mutex::new(HashMap::new()),
                opening: Mutex::new(()),
                materializing: Mutex::new(()),
                handles: Handles::default(),
                running: Mutex::new(HashMap::new()),
                next_vol: AtomicU64::new(1),
                started: SystemTime::now(),
                names_asked: AtomicU64::new(0),
            }),
        })
    }

    /// Resume, as background jobs, the in-place re-encryptions that a crash interrupted:
    /// the mount finishes them on its own, from their checkpoints.
    pub fn resume_interrupted(&self) {
        let i = &self.inner;
        let Ok(list) = i.store.list(None) else { return };
        for r in list {
            let Ok(info) = i.store.info(&r) else { continue };
            if let Some(next) = info.header.as_ref().and_then(|h| h.reencrypt.as_ref()) {
                let line = format!("{r} key={} mode=reencrypt", next.next.key_id);
                match Inner::submit(i, Op::Rekey, &line) {
                    Ok(id) => tracing::info!("resuming the re-encryption of {r} as {id}"),
                    Err(e) => tracing::warn!("cannot resume the re-encryption of {r}: {e}"),
                }
            }
        }
    }

    /// The account this mount serves, if it is an account's mount of a system store.
    pub fn account_uid(&self) -> Option<u32> {
        self.inner.opts.account_uid
    }

    /// The store behind the mount.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// How many lookups and getattrs were asked so far: the mount gives the heap's free
    /// memory back after a burst of them (a listing of many names).
    pub fn names_asked(&self) -> u64 {
        self.inner.names_asked.load(Ordering::Relaxed)
    }

    /// Look `name` up in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr> {
        self.inner.names_asked.fetch_add(1, Ordering::Relaxed);
        let i = &self.inner;
        let ino = match (i.node(parent)?, name) {
            (Node::Root, "images") => IMAGES_INO,
            (Node::Root, "disks") => DISKS_INO,
            (Node::Root, "snapshots") => SNAPSHOTS_INO,
            (Node::Root, ".control") => CONTROL_INO,
            (Node::ControlDir, "copy") => COPY_INO,
            (Node::ControlDir, "rekey") => REKEY_INO,
            (Node::ControlDir, "snapshot") => SNAPSHOT_INO,
            (Node::ControlDir, "jobs") => JOBS_INO,
            (Node::ControlDir, "cancel") => CANCEL_INO,
            (Node::Root, "shared") if i.account.is_some() => SHARED_INO,
            (Node::SharedDir, owner) => {
                if !i.shared_with_me()?.iter().any(|(o, _)| o == owner) {
                    return Err(err!(NotFound, "nothing shared by {owner}"));
                }
                i.owner_ino(owner)
            }
            (Node::SharedOwner(owner), n) => {
                let r = ResPath {
                    kind: Kind::Image,
                    name: format!("{owner}/{n}"),
                };
                i.locate(&r)
                    .map_err(|_| err!(NotFound, "no shared/{owner}/{n}"))?;
                i.ino_of(&r)
            }
            (Node::KindDir(k), n) => {
                validate_name(n).map_err(|_| err!(NotFound, "no {n}"))?;
                let r = ResPath {
                    kind: k,
                    name: n.to_string(),
                };
                let there = if i.store.remote.is_some() {
                    i.store.has_window(&r) || i.store.remote_exists(&r)?
                } else {
                    i.store.exists(&r)
                };
                if !there {
                    return Err(err!(NotFound, "no {r}"));
                }
                i.ino_of(&r)
            }
            (Node::Res(_) | Node::Control(_) | Node::Cancel | Node::Jobs, _) => {
                return Err(err!(NotDir, "not a directory"))
            }
            _ => return Err(err!(NotFound, "no {name}")),
        };
        self.getattr(ino)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        self.inner.names_asked.fetch_add(1, Ordering::Relaxed);
        let i = &self.inner;
        let dir = |perm| Attr {
            ino,
            kind: NodeKind::Dir,
            size: 0,
            blocks: 0,
            perm,
            nlink: 2,
            uid: i.opts.uid,
            gid: i.opts.gid,
            mtime: i.started,
            blksize: 4096,
        };
        let shared = i.opts.allow_other;
        let dperm = if shared { 0o755 } else { 0o700 };
        Ok(match i.node(ino)? {
            Node::Root
            | Node::KindDir(_)
            | Node::ControlDir
            | Node::SharedDir
            | Node::SharedOwner(_) => dir(dperm),
            Node::Control(_) | Node::Cancel => Attr {
                kind: NodeKind::File,
                perm: 0o600,
                nlink: 1,
                ..dir(0)
            },
            Node::Jobs => Attr {
                kind: NodeKind::File,
                perm: if shared { 0o444 } else { 0o400 },
                nlink: 1,
                ..dir(0)
            },
            Node::Res(r) => {
                let open = lock(&i.open).get(&r).map(|e| e.res.clone());
                let (size, meta, blocks) = match open {
                    Some(res) => {
                        let meta = res.vol.file().metadata()?;
                        (res.vol.size(), meta, res.vol.payload_bytes() / 512)
                    }
                    None => {
                        // Checks the entry (a regular file, a whole payload) as it goes.
                        let (store, local) = i.locate(&r)?;
                        i.materialize(&store, &local)?;
                        let info = store.info(&local).inspect_err(|e| {
                            if e.kind == ErrorKind::Corrupt {
                                tracing::warn!("{e}");
                            }
                        })?;
                        let meta = std::fs::symlink_metadata(&info.file)?;
                        (info.size, meta, info.payload_bytes() / 512)
                    }
                };
                let writable = i.res_writable(&r);
                let perm = match (writable, shared) {
                    (true, false) => 0o600,
                    (true, true) => 0o644,
                    (false, false) => 0o400,
                    (false, true) => 0o444,
                };
                Attr {
                    ino,
                    kind: NodeKind::File,
                    size,
                    blocks,
                    perm,
                    nlink: 1,
                    uid: i.opts.uid,
                    gid: i.opts.gid,
                    mtime: meta.modified().unwrap_or(i.started),
                    blksize: 4096,
                }
            }
        })
    }

    /// Truncation. A resource keeps its size, as a block device does (so `O_TRUNC` opens
    /// work); control files accept any size.
    pub fn set_size(&self, ino: u64, _size: u64) -> Result<Attr> {
        match self.inner.node(ino)? {
            Node::Res(r) if !self.inner.res_writable(&r) => Err(err!(ReadOnly, "{r} is read-only")),
            Node::Res(_) | Node::Control(_) | Node::Cancel => self.getattr(ino),
            Node::Jobs => Err(err!(ReadOnly, "jobs is read-only")),
            _ => Err(err!(IsDir, "is a directory")),
        }
    }

    /// Entries of a directory, without `.` and `..`.
    pub fn readdir(&self, ino: u64) -> Result<Vec<DirEntry>> {
        let i = &self.inner;
        let e = |ino, kind, name: &str| DirEntry {
            ino,
            kind,
            name: name.to_string(),
        };
        Ok(match i.node(ino)? {
            Node::Root => {
                let mut v = vec![
                    e(IMAGES_INO, NodeKind::Dir, "images"),
                    e(DISKS_INO, NodeKind::Dir, "disks"),
                    e(SNAPSHOTS_INO, NodeKind::Dir, "snapshots"),
                    e(CONTROL_INO, NodeKind::Dir, ".control"),
                ];
                if i.account.is_some() {
                    v.push(e(SHARED_INO, NodeKind::Dir, "shared"));
                }
                v
            }
            Node::SharedDir => {
                let mut owners: Vec<String> =
                    i.shared_with_me()?.into_iter().map(|(o, _)| o).collect();
                owners.dedup();
                owners
                    .into_iter()
                    .map(|o| e(i.owner_ino(&o), NodeKind::Dir, &o))
                    .collect()
            }
            Node::SharedOwner(owner) => i
                .shared_with_me()?
                .into_iter()
                .filter(|(o, _)| *o == owner)
                .map(|(o, n)| {
                    let r = ResPath {
                        kind: Kind::Image,
                        name: format!("{o}/{n}"),
                    };
                    e(i.ino_of(&r), NodeKind::File, &n)
                })
                .collect(),
            Node::ControlDir => vec![
                e(COPY_INO, NodeKind::File, "copy"),
                e(REKEY_INO, NodeKind::File, "rekey"),
                e(SNAPSHOT_INO, NodeKind::File, "snapshot"),
                e(CANCEL_INO, NodeKind::File, "cancel"),
                e(JOBS_INO, NodeKind::File, "jobs"),
            ],
            Node::KindDir(k) => if i.store.remote.is_some() {
                i.store.remote_list(Some(k))?
            } else {
                i.store.list(Some(k))?
            }
            .into_iter()
            .map(|r| DirEntry {
                ino: i.ino_of(&r),
                kind: NodeKind::File,
                name: r.name,
            })
            .collect(),
            _ => return Err(err!(NotDir, "not a directory")),
        })
    }

    /// Open a file: returns the handle and how the kernel may cache its pages.
    pub fn open(&self, ino: u64, write: bool) -> Result<(u64, Caching)> {
        let i = &self.inner;
        let (handle, caching) = match i.node(ino)? {
            Node::Res(r) => {
                if write && !i.res_writable(&r) {
                    return Err(err!(ReadOnly, "{r} is read-only"));
                }
                let (res, keep) = i.open_res(&r, true)?;
                (
                    Handle::Res {
                        path: r,
                        res,
                        write,
                    },
                    if keep { Caching::Keep } else { Caching::Fresh },
                )
            }
            Node::Control(op) => {
                if i.opts.read_only {
                    return Err(err!(ReadOnly, "the mount is read-only"));
                }
                (Handle::Control(op, Mutex::default()), Caching::Direct)
            }
            Node::Cancel => {
                if i.opts.read_only {
                    return Err(err!(ReadOnly, "the mount is read-only"));
                }
                (Handle::Cancel, Caching::Direct)
            }
            Node::Jobs => {
                if write {
                    return Err(err!(ReadOnly, "jobs is read-only"));
                }
                let mut text = String::new();
                for j in i.jobs.list()? {
                    text.push_str(&j.line());
                    text.push('\n');
                }
                (Handle::Jobs(text.into_bytes()), Caching::Direct)
            }
            _ => return Err(err!(IsDir, "is a directory")),
        };
        Ok((i.handles.insert(handle), caching))
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>> {
        self.inner
            .handles
            .get(fh)
            .ok_or_else(|| err!(BadHandle, "bad file handle"))
    }

    /// Read up to `size` bytes at `offset` (short at end of file).
    pub fn read(&self, _ino: u64, fh: u64, offset: u64, size: u32) -> Result<AlignedBuf> {
        match &*self.handle(fh)? {
            Handle::Res { res, .. } => res.vol.read_owned(offset, size as usize),
            Handle::Jobs(text) => Ok(slice_at(text, offset, size)),
            Handle::Control(_, made) => Ok(slice_at(lock(made).as_bytes(), offset, size)),
            Handle::Cancel => Ok(AlignedBuf::zeroed(0)),
            Handle::Dir(_) => Err(err!(IsDir, "is a directory")),
        }
    }

    /// The attributes of several nodes (None where not asked, or not to be had), worked
    /// out on two threads: a directory listing with attributes asks for a page of them.
    pub fn getattr_many(&self, inos: &[Option<u64>]) -> Vec<Option<Attr>> {
        let one = |i: &Option<u64>| i.and_then(|i| self.getattr(i).ok());
        if inos.len() < 4 {
            return inos.iter().map(one).collect();
        }
        let (a, b) = inos.split_at(inos.len() / 2);
        std::thread::scope(|s| {
            let h = s.spawn(|| b.iter().map(one).collect::<Vec<_>>());
            let mut out: Vec<_> = a.iter().map(one).collect();
            out.extend(h.join().unwrap_or_else(|_| vec![None; b.len()]));
            out
        })
    }

    /// Open a directory: its entries are listed once, here.
    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let list = self.readdir(ino)?;
        let i = &self.inner;
        Ok(i.handles.insert(Handle::Dir(list.into())))
    }

    /// The entries of a directory opened with [`opendir`](Self::opendir), or (an unknown
    /// handle) listed now.
    pub fn dir_entries(&self, ino: u64, fh: u64) -> Result<Arc<[DirEntry]>> {
        if let Ok(h) = self.handle(fh) {
            if let Handle::Dir(list) = &*h {
                return Ok(list.clone());
            }
        }
        Ok(self.readdir(ino)?.into())
    }

    pub fn releasedir(&self, fh: u64) {
        self.inner
            .handles
            .remove_if(fh, |h| matches!(h, Handle::Dir(_)));
    }

    /// `lseek` with `SEEK_DATA` or `SEEK_HOLE` (the kernel does the other kinds itself):
    /// where data (or a hole) starts at or after `offset`, from the backing file's own holes.
    pub fn seek(&self, fh: u64, offset: u64, whence: i32) -> Result<u64> {
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return Err(err!(InvalidInput, "unsupported lseek whence {whence}")),
        };
        match &*self.handle(fh)? {
            Handle::Res { res, .. } => res.vol.seek_hole_data(offset, data),
            _ => Err(err!(InvalidInput, "lseek on a control file")),
        }
    }

    /// Write `data` at `offset`; returns bytes written. A control-file write returns once
    /// the job is accepted, or the errno of the refusal.
    pub fn write(&self, _ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        match &*self.handle(fh)? {
            Handle::Res { res, write, .. } => {
                if !*write {
                    return Err(err!(BadHandle, "not open for writing"));
                }
                let n = res.vol.write_at(data, offset)?;
                res.written.fetch_add(1, Ordering::SeqCst);
                Ok(n as u32)
            }
            Handle::Control(op, made) => {
                for line in request_lines(data)? {
                    let id = Inner::submit(&self.inner, *op, line)?;
                    let mut made = lock(made);
                    made.push_str(&id);
                    made.push('\n');
                }
                Ok(data.len() as u32)
            }
            Handle::Cancel => {
                for line in request_lines(data)? {
                    self.inner.cancel(line)?;
                }
                Ok(data.len() as u32)
            }
            Handle::Jobs(_) => Err(err!(BadHandle, "jobs is read-only")),
            Handle::Dir(_) => Err(err!(IsDir, "is a directory")),
        }
    }

    /// [`Fs::write`] of an `O_DIRECT` descriptor: a write that crosses the end of the
    /// resource writes nothing and fails with ENOSPC. The kernel's asynchronous direct I/O
    /// reports a short direct write as EIO, which reads as damage, not as the end of a disk.
    pub fn write_direct(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        if let Handle::Res { res, .. } = &*self.handle(fh)? {
            if offset.saturating_add(data.len() as u64) > res.vol.size() {
                return Err(err!(
                    NoSpace,
                    "a direct write that crosses the end of the resource"
                ));
            }
        }
        self.write(ino, fh, offset, data)
    }

    /// close(2) of one descriptor: earlier writes are made durable.
    pub fn flush(&self, ino: u64, fh: u64) -> Result<()> {
        self.fsync(ino, fh, true)
    }

    pub fn fsync(&self, _ino: u64, fh: u64, _datasync: bool) -> Result<()> {
        match &*self.handle(fh)? {
            Handle::Res { res, .. } => res.sync(),
            _ => Ok(()),
        }
    }

    /// Last close of a handle.
    pub fn release(&self, ino: u64, fh: u64) -> Result<()> {
        let r = self.fsync(ino, fh, true);
        let h = self.inner.handles.remove(fh);
        if let Some(h) = h {
            if let Handle::Res { path, .. } = &*h {
                self.inner.close_res(path);
            }
        }
        r
    }

    pub fn statfs(&self) -> Result<StatFs> {
        use std::os::unix::ffi::OsStrExt;
        let p = std::ffi::CString::new(self.inner.store.root.as_os_str().as_bytes())
            .map_err(|_| err!(InvalidInput, "bad store path"))?;
        // SAFETY: statvfs fills the zeroed struct we pass; the path is NUL-terminated.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above; both pointers are valid for the call.
        if unsafe { libc::statvfs(p.as_ptr(), &mut s) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(StatFs {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            namelen: 255,
            frsize: s.f_frsize as u32,
        })
    }

    /// Unmount: flush everything, close every volume, zeroize the cache.
    pub fn shutdown(&self) {
        let i = &self.inner;
        i.end_jobs();
        i.jobs.flush();
        i.handles.clear();
        let open: Vec<_> = lock(&i.open).drain().collect();
        for (_, e) in open {
            let _ = e.res.vol.sync();
        }
        i.cache.clear();
    }

    /// Bytes of plaintext in the cache (for tests and statistics).
    pub fn cache_bytes(&self) -> usize {
        self.inner.cache.bytes()
    }
}

impl Inner {
    fn node(&self, ino: u64) -> Result<Node> {
        Ok(match ino {
            ROOT_INO => Node::Root,
            IMAGES_INO => Node::KindDir(Kind::Image),
            DISKS_INO => Node::KindDir(Kind::Disk),
            SNAPSHOTS_INO => Node::KindDir(Kind::Snapshot),
            CONTROL_INO => Node::ControlDir,
            COPY_INO => Node::Control(Op::Copy),
            REKEY_INO => Node::Control(Op::Rekey),
            SNAPSHOT_INO => Node::Control(Op::Snapshot),
            JOBS_INO => Node::Jobs,
            CANCEL_INO => Node::Cancel,
            SHARED_INO if self.account.is_some() => Node::SharedDir,
            n if n >= FIRST_OWNER_INO => Node::SharedOwner(
                lock(&self.owners)
                    .1
                    .get(&n)
                    .cloned()
                    .ok_or_else(|| err!(NotFound, "stale inode"))?,
            ),
            _ => Node::Res(
                lock(&self.inodes)
                    .1
                    .get(&ino)
                    .cloned()
                    .ok_or_else(|| err!(NotFound, "stale inode"))?,
            ),
        })
    }

    fn ino_of(&self, r: &ResPath) -> u64 {
        intern(&self.inodes, FIRST_RES_INO, r)
    }

    fn owner_ino(&self, owner: &str) -> u64 {
        intern(&self.owners, FIRST_OWNER_INO, &owner.to_string())
    }

    fn shared_with_me(&self) -> Result<Vec<(String, String)>> {
        match &self.account {
            Some(a) => a.shared_with_me(),
            None => Ok(Vec::new()),
        }
    }

    /// The store and path a resource node reads: its own, or (`OWNER/NAME`) the owner's
    /// image, checked against the shares at every call.
    fn locate<'a>(&'a self, r: &'a ResPath) -> Result<(Cow<'a, Store>, Cow<'a, ResPath>)> {
        match (r.name.split_once('/'), &self.account) {
            // The common case borrows: getattr and every reopen come through here.
            (None, _) => Ok((Cow::Borrowed(&self.store), Cow::Borrowed(r))),
            (Some((owner, name)), Some(a)) => a
                .shared(&format!("shared/{owner}/{name}"))?
                .map(|(s, p)| (Cow::Owned(s), Cow::Owned(p)))
                .ok_or_else(|| err!(NotFound, "no {r}")),
            (Some(_), None) => Err(err!(NotFound, "no {r}")),
        }
    }

    /// An object-storage region's resource, present locally as far as `info` and a first
    /// open need: its header (the rest comes block by block as reads ask for it).
    /// Make sure an object-storage resource has its window (and local copy). One at a time:
    /// two made at once (a getattr beside an open) would each rename a local copy over the
    /// same path, and the volume could open the copy of the window that lost.
    fn materialize(&self, store: &Store, r: &ResPath) -> Result<()> {
        if store.remote.is_none() {
            return Ok(());
        }
        let _one = lock(&self.materializing);
        if store.has_window(r) {
            if store.window_is_current(r)? {
                return Ok(());
            }
            // The CLI made a new version (a rekey) since this mount last had it open.
            store.drop_local(r);
        }
        store.pull_window(r)
    }

    fn res_writable(&self, r: &ResPath) -> bool {
        !r.name.contains('/')
            && !self.opts.read_only
            && match r.kind {
                Kind::Disk => true,
                Kind::Image => self.opts.writable_images,
                Kind::Snapshot => false,
            }
    }

    /// Open (or share) a resource, for a kernel open (`kernel`) or a job's. The key is
    /// checked on every open, so a key disabled while mounted refuses new opens at once.
    /// Returns the open resource and whether the kernel may keep its cached pages.
    fn open_res(&self, r: &ResPath, kernel: bool) -> Result<(Arc<OpenRes>, bool)> {
        // No lock of the open table is held across I/O (header reads, key-store reads,
        // opening a volume): a slow disk or a key store locked by another process delays
        // the opens that need it, never every other file's.
        loop {
            let existing = lock(&self.open).get(r).map(|e| (e.res.clone(), e.kernel));
            let Some((res, seen)) = existing else {
                return self.open_first(r, kernel);
            };
            // The key named by the header on disk now, not the one it named at first open:
            // a rewrap from the CLI may have moved the data key under another CMK.
            let h = res.vol.reload_header().inspect_err(|e| {
                tracing::warn!("open {r} refused: {e}");
            })?;
            if let Some(h) = h {
                self.check_key(r, &h.key.key_id, h.key.key_version)?;
                if let Some(x) = &h.reencrypt {
                    self.check_key(r, &x.next.key_id, x.next.key_version)?;
                }
            }
            match self.share(r, &res, kernel, seen) {
                Some(keep) => return Ok((res, keep)),
                // Closed (or reopened) meanwhile: start over.
                None => continue,
            }
        }
    }

    /// Open a resource nobody has open, outside the open table's lock; first opens of the
    /// same resource by two threads at once end with one volume (the later one is dropped).
    fn open_first(&self, r: &ResPath, kernel: bool) -> Result<(Arc<OpenRes>, bool)> {
        let _one = lock(&self.opening);
        let held = lock(&self.open).get(r).map(|e| (e.res.clone(), e.kernel));
        if let Some((res, seen)) = held {
            // Open already (if closed between these two looks, it is opened afresh below).
            if let Some(keep) = self.share(r, &res, kernel, seen) {
                return Ok((res, keep));
            }
        }
        // A job's open leaves the last close the kernel saw in place for its next open.
        let was = if kernel {
            lock(&self.kept).remove(r)
        } else {
            None
        };
        let (store, local) = self.locate(r).inspect_err(|e| {
            tracing::warn!("open {r} refused: {e}");
        })?;
        // Locked first: a CLI rekey of an object-storage resource holds this lock until its
        // new version is in place, so the check of the mount's copy below sees it done.
        let lock_file = FileLock::try_shared(&store.open_lock_path(&local))?
            .ok_or_else(|| err!(Busy, "{r} is busy (being re-encrypted or deleted)"))?;
        self.materialize(&store, &local)?;
        let vol = store
            .open_volume(&local, !self.opts.read_only && !r.name.contains('/'))
            .and_then(|v| match store.remote {
                Some(_) => Ok(v.with_fetch(store.fetcher(&local)?)),
                None => Ok(v),
            })
            .inspect_err(|e| {
                if e.kind == ErrorKind::KeyUnusable {
                    tracing::warn!("open {r} refused: {e}");
                }
            })?;
        let vid = self.next_vol.fetch_add(1, Ordering::Relaxed);
        let vol = vol.with_cache(self.cache.clone(), vid);
        // An object-storage region's local copy was just written by its fetches: a direct
        // read would first wait for those pages to be written back to disk.
        let vol = match store.remote {
            Some(_) => vol,
            None => vol.with_direct_io(),
        };
        let res = Arc::new(OpenRes {
            vol,
            written: AtomicU64::new(0),
            synced: Mutex::new(0),
            _lock: lock_file,
        });
        let keep = kernel && was.is_some() && was == ident(&res.vol);
        lock(&self.open).insert(
            r.clone(),
            OpenEntry {
                res: res.clone(),
                refs: 1,
                kernel,
            },
        );
        Ok((res, keep))
    }

    fn check_key(&self, r: &ResPath, id: &str, version: u32) -> Result<()> {
        self.locate(r)
            .and_then(|(store, _)| store.keys.check_usable_at(id, Some(version)))
            .inspect_err(|e| {
                tracing::warn!("open {r} refused: {e}");
            })
    }

    /// One more open of `res`, if it is still `r`'s entry (None: closed meanwhile); returns
    /// whether the kernel may keep its pages: yes once a kernel open of this entry was
    /// answered (`seen`: it was when the caller looked; that never reverts), at the first
    /// only if the resource is the one the kernel last closed (a job's open does not tell
    /// the kernel to drop its pages). The identity for that is read before the table's lock
    /// (a re-encryption step holds the header's through its fsyncs).
    fn share(&self, r: &ResPath, res: &Arc<OpenRes>, kernel: bool, seen: bool) -> Option<bool> {
        let now = (kernel && !seen).then(|| ident(&res.vol)).flatten();
        let mut open = lock(&self.open);
        let e = open.get_mut(r).filter(|e| Arc::ptr_eq(&e.res, res))?;
        e.refs += 1;
        if !kernel || e.kernel {
            return Some(kernel);
        }
        e.kernel = true;
        let was = lock(&self.kept).remove(r);
        Some(was.is_some() && was == now)
    }

    fn close_res(&self, r: &ResPath) {
        let last = {
            let mut open = lock(&self.open);
            match open.get_mut(r) {
                Some(e) if e.refs > 1 => {
                    e.refs -= 1;
                    None
                }
                Some(_) => open.remove(r),
                None => None,
            }
        };
        // The last close: sync, then drop the volume (its keys are wiped with it) outside
        // the table's lock.
        if let Some(e) = last {
            let synced = e.res.vol.sync();
            // Only the kernel's opens say what its pages are: after a job's alone, the
            // last close it saw stays the one its next open is checked against.
            let now = e.kernel.then(|| ident(&e.res.vol)).flatten();
            drop(e);
            // Unless it was opened again meanwhile (that open's close records it then).
            if let (Ok(()), Some(now)) = (&synced, now) {
                let _one = lock(&self.opening);
                if !lock(&self.open).contains_key(r) {
                    lock(&self.kept).insert(r.clone(), now);
                }
            }
            // An object-storage region's local copies are a cache: past its bound, the copy
            // of what nobody has open goes (written blocks are in the store once synced).
            if let (Some(bound), Ok(())) = (self.opts.object_cache_bytes, synced) {
                if self.store.remote.is_some() && cache_bytes(&self.store.root) > bound {
                    // Under the first-open lock, and only if nobody opened it again. (An
                    // object-storage region has no shared images: `r` is its own.)
                    let _one = lock(&self.opening);
                    if !lock(&self.open).contains_key(r) {
                        self.store.drop_local(r);
                    }
                }
            }
        }
    }

    /// Validate a request now (the write's errno), then run it as a background job.
    /// Start the job `line` asks for; its id.
    fn submit(this: &Arc<Inner>, op: Op, line: &str) -> Result<String> {
        let req = match control::parse(op, line) {
            Ok(r) => r,
            Err(e) => {
                this.reject(op.name(), "-", "-", &e);
                return Err(e);
            }
        };
        let (src, dst) = req.endpoints();
        if let Err(e) = this.check(&req) {
            this.reject(op.name(), &src, &dst, &e);
            return Err(e);
        }
        let job = match this.jobs.create(op.name(), &src, &dst) {
            Ok(j) => j,
            Err(e) => {
                // No room for the record (a full disk): refuse, and say so in `jobs`.
                this.reject(op.name(), &src, &dst, &e);
                return Err(e);
            }
        };
        let id = job.id.clone();
        let progress = JobProgress::new(this.jobs.clone(), job);
        lock(&this.running).insert(id.clone(), progress.clone());
        let inner = this.clone();
        let started = std::thread::Builder::new()
            .name(format!("job-{}", op.name()))
            .spawn(move || {
                // A panic is a failed job (its partial target goes as it unwinds), not a
                // job that runs for ever in `jobs` and in the registry.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    inner.run(&req, &progress)
                }))
                .unwrap_or_else(|_| {
                    Err(err!(
                        Io,
                        "the job stopped on an internal error (see the mount's log)"
                    ))
                });
                match &r {
                    Err(e) if e.kind == ErrorKind::Cancelled => {
                        tracing::info!("job {} cancelled", progress.id())
                    }
                    Err(e) => tracing::warn!("job {} failed: {e}", progress.id()),
                    Ok(()) => {}
                }
                progress.finish(&r);
                lock(&inner.running).remove(&progress.id());
            });
        if let Err(e) = started {
            if let Some(p) = lock(&this.running).remove(&id) {
                let e = err!(Io, "cannot start the job: {e}");
                p.finish(&Err(e.clone()));
                return Err(e);
            }
        }
        Ok(id)
    }

    /// At unmount, the jobs still running end with the daemon (`interrupted`: run them
    /// again), except that one putting its result in place or writing its final record is
    /// waited for (a sync and a rename), so it ends `done` (or as it did) rather than
    /// `interrupted` with its result made; and one asked to stop is given a moment to (so
    /// its partial target goes with it), then recorded `cancelled`, as it can no longer put
    /// a result in place.
    fn end_jobs(&self) {
        use control::jobs::JobPhase;
        use std::time::{Duration, Instant};
        let start = Instant::now();
        loop {
            let jobs: Vec<_> = lock(&self.running).values().cloned().collect();
            let waited = start.elapsed();
            // Ended but still listed: its thread is writing its record.
            let finishing = jobs
                .iter()
                .any(|p| matches!(p.phase(), JobPhase::Finishing | JobPhase::Ended));
            let stopping = jobs.iter().any(|p| p.phase() == JobPhase::Stopping);
            if (!finishing || waited >= Duration::from_secs(10))
                && (!stopping || waited >= Duration::from_secs(2))
            {
                for p in jobs {
                    if p.end_cancelled() {
                        // Its record is final: nothing more to wait for (its thread may
                        // still be setting up until the daemon exits).
                        lock(&self.running).remove(&p.id());
                        tracing::info!("job {} cancelled at unmount", p.id());
                    }
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stop the running job `line` names (`.control/cancel`). A rekey is not stopped: a
    /// re-encryption stopped midway would go on at the next mount, and a rewrap is a moment.
    fn cancel(&self, line: &str) -> Result<()> {
        let id = line.trim();
        let well_formed = id.len() > 4
            && id.starts_with("job-")
            && id[4..].bytes().all(|c| c.is_ascii_hexdigit());
        let r = (|| {
            if !well_formed {
                return Err(err!(
                    InvalidInput,
                    "usage: JOB-ID (as .control/jobs lists it)"
                ));
            }
            let p = lock(&self.running)
                .get(id)
                .cloned()
                .ok_or_else(|| err!(NotFound, "no job {id} is running in this mount"))?;
            if p.op() == "rekey" {
                return Err(err!(
                    Refused,
                    "job {id} is a rekey, which is not cancelled: a re-encryption goes on at the next mount"
                ));
            }
            match p.cancel() {
                control::jobs::CancelAnswer::Stopping => Ok(()),
                control::jobs::CancelAnswer::TooLate => Err(err!(
                    Busy,
                    "job {id} is putting its result in place: too late to cancel"
                )),
                control::jobs::CancelAnswer::Ended => {
                    Err(err!(NotFound, "no job {id} is running in this mount"))
                }
            }
        })();
        if let Err(e) = &r {
            self.reject("cancel", if well_formed { id } else { "-" }, "-", e);
        }
        r
    }

    fn reject(&self, op: &str, src: &str, dst: &str, e: &Error) {
        self.jobs.reject(op, src, dst, e);
    }

    fn check(&self, req: &Request) -> Result<()> {
        if self.store.remote.is_some() {
            // The mount's copies of an object-storage region's resources hold only what was
            // read, and nothing it writes there but a disk's blocks goes back to the store:
            // a job here would read holes as zeros and make a resource only this host has.
            return Err(err!(
                Refused,
                "jobs on an object-storage region run through the CLI (encimg --region {} {} …)",
                self.store.region,
                req.op().name()
            ));
        }
        match req {
            Request::Copy { src, dst, opts } if !opts.to_regions.is_empty() => {
                self.store.check_copy_to_regions(src, dst, opts)
            }
            Request::Copy { src, dst, opts } => self.store.check_copy(src, dst, opts),
            Request::Snapshot { disk, snapshot } => {
                if disk.kind != Kind::Disk || snapshot.kind != Kind::Snapshot {
                    return Err(err!(
                        InvalidInput,
                        "snapshot takes disks/NAME snapshots/NAME"
                    ));
                }
                self.store.check_copy(disk, snapshot, &Default::default())
            }
            Request::Rekey { target, key, mode } => {
                self.store.check_rekey(target, key, *mode).map(|_| ())
            }
        }
    }

    /// Run `f` with this mount's volume of `r` if the mount can write `r`: held open for
    /// the job, so every write through the mount meanwhile goes through the volume the job
    /// reads as of its start (a snapshot of a disk in use is of one point in time).
    fn with_live<T>(&self, r: &ResPath, f: impl FnOnce(Option<&Volume>) -> Result<T>) -> Result<T> {
        if !self.res_writable(r) {
            return f(None);
        }
        let (res, _) = self.open_res(r, false)?;
        let out = f(Some(&res.vol));
        drop(res);
        self.close_res(r);
        out
    }

    /// Run a job: the same store operations the CLI runs.
    fn run(&self, req: &Request, p: &Arc<JobProgress>) -> Result<()> {
        match req {
            Request::Copy { src, dst, opts } if !opts.to_regions.is_empty() => {
                let n = opts.to_regions.len() as u64;
                let share = Arc::new(control::jobs::Shared::new(p.clone(), n));
                let outcomes = self.with_live(src, |live| {
                    self.store
                        .copy_to_regions(src, dst, opts, &|_| share.clone(), live)
                })?;
                crate::store::combine(&outcomes)
            }
            Request::Copy { src, dst, opts } => {
                self.with_live(src, |live| self.store.copy_live(src, dst, opts, p, live))
            }
            Request::Snapshot { disk, snapshot } => {
                self.with_live(disk, |live| self.store.snapshot(disk, snapshot, p, live))
            }
            Request::Rekey {
                target,
                key,
                mode: RekeyMode::Rewrap,
            } => self.store.rekey(target, key, RekeyMode::Rewrap, p),
            Request::Rekey {
                target,
                key,
                mode: RekeyMode::Reencrypt,
            } => {
                // Online: through the mount's own open volume, so readers and writers
                // during the job go to the right key.
                let (_, new_id, spec) =
                    self.store.check_rekey(target, key, RekeyMode::Reencrypt)?;
                let _job = self.store.lock_job(target)?;
                let (res, _) = self.open_res(target, false)?;
                let r = self
                    .store
                    .reencrypt(&res.vol, target, &new_id, spec, p, &|_| Ok(()));
                drop(res);
                self.close_res(target);
                r
            }
        }
    }
}
