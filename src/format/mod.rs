//! The on-disk format of an encrypted resource file: the header (two checksummed copies with
//! a sequence number), the payload layout, and the offset math between plaintext bytes and
//! sectors. See `docs/FORMAT.md` for the byte-by-byte description.

pub mod header;
mod offsets;

pub use header::{
    read_header, read_header_of, write_header, Header, KeySlot, Reencrypt, HEADER_COPY_LEN, MAGIC,
    VERSION,
};
pub use offsets::{round_up, sector_span, SectorSpan};

/// Where the payload starts in an encrypted resource file (4 MiB, 1 MiB-aligned).
pub const DATA_OFFSET: u64 = 4 << 20;
/// Where the re-encryption journal lives inside the header area.
pub const JOURNAL_OFFSET: u64 = 2 << 20;
/// How much ciphertext one re-encryption step journals and rewrites.
pub const JOURNAL_LEN: u64 = 2 << 20;

/// The kind of a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Image,
    Disk,
    Snapshot,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Image, Kind::Disk, Kind::Snapshot];

    /// The directory name used in the store, the mount and resource paths.
    pub fn dir(self) -> &'static str {
        match self {
            Kind::Image => "images",
            Kind::Disk => "disks",
            Kind::Snapshot => "snapshots",
        }
    }

    /// The singular word, for `info` and messages.
    pub fn word(self) -> &'static str {
        match self {
            Kind::Image => "image",
            Kind::Disk => "disk",
            Kind::Snapshot => "snapshot",
        }
    }

    pub fn from_dir(s: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.dir() == s || k.word() == s)
    }

    pub fn code(self) -> u8 {
        match self {
            Kind::Image => 1,
            Kind::Disk => 2,
            Kind::Snapshot => 3,
        }
    }

    pub fn from_code(c: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.code() == c)
    }
}
