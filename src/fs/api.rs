//! The types the filesystem core speaks (no fuser types here).

use std::time::SystemTime;

/// Options of one mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Refuse every write.
    pub read_only: bool,
    /// Let images be written (they are read-only by default).
    pub writable_images: bool,
    /// Bound of the plaintext sector cache, in bytes.
    pub cache_bytes: u64,
    /// Others may use the tree (`--allow-other`): permissions open up to match.
    pub allow_other: bool,
    /// Owner of every node (the mounting user).
    pub uid: u32,
    pub gid: u32,
    /// In a system store, the uid of the account this mount serves: nobody else may use it.
    pub account_uid: Option<u32>,
    /// An object-storage region's mount: the bound of its local copies of fetched blocks.
    pub object_cache_bytes: Option<u64>,
}

/// What a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    File,
}

/// Attributes of a node.
#[derive(Clone, Debug)]
pub struct Attr {
    pub ino: u64,
    pub kind: NodeKind,
    /// Plaintext size for resources.
    pub size: u64,
    /// 512-byte blocks the data takes on the backing store (what `du` shows): for a
    /// resource, the blocks its payload's ciphertext occupies, so a blank sparse disk is
    /// small.
    pub blocks: u64,
    /// Permission bits (e.g. 0o600, 0o700).
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    /// Preferred I/O size.
    pub blksize: u32,
}

/// One directory entry.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: NodeKind,
    pub name: String,
}

/// Filesystem totals for statfs.
#[derive(Clone, Debug)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// The root inode.
pub const ROOT_INO: u64 = 1;
