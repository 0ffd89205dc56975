//! Header v1: encode, decode, checksums, and the two-copy atomic update.
//!
//! Layout of one 4096-byte copy (all integers little-endian; see docs/FORMAT.md):
//!
//! ```text
//!    0   8  magic "ENCIMG\0\x01"
//!    8   2  format version (1)
//!   10   2  reserved (0)
//!   12   4  flags (0)
//!   16   8  sequence number
//!   24  16  uuid
//!   40   1  kind (1 image, 2 disk, 3 snapshot)
//!   41   1  XTS variant (1 = IEEE 1619)
//!   42   2  reserved (0)
//!   44   4  sector size (512 or 4096)
//!   48   8  plaintext size in bytes
//!   56   8  data offset in bytes (multiple of 1 MiB)
//!   64   8  creation time (unix seconds)
//!   72 184  key slot 0: the data key in force
//!  256   1  re-encryption state (0 idle, 1 running)
//!  257   7  reserved (0)
//!  264   8  checkpoint: sectors below it are under key slot 1
//!  272   8  journal: first sector saved in the journal
//!  280   4  journal: length in bytes (0 = no journal)
//!  284   4  journal: CRC-32 of the saved ciphertext
//!  288 184  key slot 1: the new data key while re-encrypting (zero otherwise)
//!  472 3620 reserved (0)
//! 4092   4  CRC-32 (ISO-HDLC) of bytes 0..4092
//! ```
//!
//! Key slot (184 bytes): cipher (1), reserved (1), wrapped length (2), key version (4),
//! key id (64, NUL padded ASCII), nonce (12), wrapped data key (96, zero padded),
//! reserved (4).

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::crypto::{CipherKind, NONCE_LEN, TAG_LEN};
use crate::err;
use crate::error::{ErrorKind, IoContext, Result};
use crate::format::Kind;

/// Magic bytes at offset 0 of each header copy.
pub const MAGIC: [u8; 8] = *b"ENCIMG\0\x01";
/// The format version this build writes and reads.
pub const VERSION: u16 = 1;
/// Length of one header copy; copy A is at offset 0, copy B at offset 4096.
pub const HEADER_COPY_LEN: usize = 4096;

const SLOT_LEN: usize = 184;
const KEY_ID_LEN: usize = 64;
const WRAPPED_MAX: usize = 96;
const SLOT0_AT: usize = 72;
const REENC_AT: usize = 256;
const SLOT1_AT: usize = 288;
const CRC_AT: usize = HEADER_COPY_LEN - 4;
/// The only XTS variant written so far: IEEE 1619 (what dm-crypt computes).
pub const XTS_IEEE1619: u8 = 1;

/// One wrapped data key and what it is wrapped under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySlot {
    /// Sector cipher this data key is for.
    pub cipher: CipherKind,
    /// The customer master key that wraps it.
    pub key_id: String,
    /// The CMK version that wraps it.
    pub key_version: u32,
    /// AEAD nonce of the wrap.
    pub nonce: [u8; NONCE_LEN],
    /// AEAD ciphertext and tag of the data key.
    pub wrapped: Vec<u8>,
}

/// An in-place re-encryption under way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reencrypt {
    /// Sectors below this number are encrypted under `next`; the rest under the header's `key`.
    pub checkpoint: u64,
    /// First sector of the chunk whose old ciphertext is saved in the journal.
    pub journal_sector: u64,
    /// Bytes saved in the journal (0: no journal in force).
    pub journal_len: u32,
    /// CRC-32 of the saved bytes.
    pub journal_crc: u32,
    /// The new data key.
    pub next: KeySlot,
}

/// A decoded header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub seq: u64,
    pub uuid: [u8; 16],
    pub kind: Kind,
    pub xts_variant: u8,
    pub sector_size: u32,
    pub size: u64,
    pub data_offset: u64,
    pub created: u64,
    pub key: KeySlot,
    pub reencrypt: Option<Reencrypt>,
}

impl Header {
    /// Number of sectors in the payload (the last one may be partly beyond `size`).
    pub fn sectors(&self) -> u64 {
        self.size.div_ceil(u64::from(self.sector_size))
    }

    /// Length of a file holding this header and its whole payload.
    pub fn file_len(&self) -> u64 {
        self.data_offset + self.sectors() * u64::from(self.sector_size)
    }

    /// The uuid in its canonical text form.
    pub fn uuid_string(&self) -> String {
        uuid_string(&self.uuid)
    }

    /// Associated data binding a wrapped data key to this header's identity: a wrapped key
    /// moved to another header, or a header whose geometry was edited, fails to unwrap.
    pub fn wrap_aad(&self, slot_cipher: CipherKind, key_id: &str, key_version: u32) -> Vec<u8> {
        let mut a = Vec::with_capacity(128);
        a.extend_from_slice(b"encimg-dek-v1");
        a.extend_from_slice(&self.uuid);
        a.push(slot_cipher.code());
        a.push(self.xts_variant);
        a.extend_from_slice(&self.sector_size.to_le_bytes());
        a.extend_from_slice(&self.size.to_le_bytes());
        a.extend_from_slice(&self.data_offset.to_le_bytes());
        a.extend_from_slice(&(key_id.len() as u32).to_le_bytes());
        a.extend_from_slice(key_id.as_bytes());
        a.extend_from_slice(&key_version.to_le_bytes());
        a
    }

    /// Encode one header copy.
    pub fn encode(&self) -> [u8; HEADER_COPY_LEN] {
        let mut b = [0u8; HEADER_COPY_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..40].copy_from_slice(&self.uuid);
        b[40] = self.kind.code();
        b[41] = self.xts_variant;
        b[44..48].copy_from_slice(&self.sector_size.to_le_bytes());
        b[48..56].copy_from_slice(&self.size.to_le_bytes());
        b[56..64].copy_from_slice(&self.data_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.created.to_le_bytes());
        encode_slot(&self.key, &mut b[SLOT0_AT..SLOT0_AT + SLOT_LEN]);
        if let Some(r) = &self.reencrypt {
            b[REENC_AT] = 1;
            b[264..272].copy_from_slice(&r.checkpoint.to_le_bytes());
            b[272..280].copy_from_slice(&r.journal_sector.to_le_bytes());
            b[280..284].copy_from_slice(&r.journal_len.to_le_bytes());
            b[284..288].copy_from_slice(&r.journal_crc.to_le_bytes());
            encode_slot(&r.next, &mut b[SLOT1_AT..SLOT1_AT + SLOT_LEN]);
        }
        let crc = crc32fast::hash(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and validate one header copy. Never panics, whatever the bytes.
    pub fn decode(b: &[u8]) -> Result<Header> {
        if b.len() < HEADER_COPY_LEN {
            return Err(err!(Corrupt, "header is truncated"));
        }
        if b[0..8] != MAGIC {
            return Err(err!(Corrupt, "not an encimg image (bad magic)"));
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != VERSION {
            return Err(err!(
                Corrupt,
                "unsupported format version {version} (this encimg reads version {VERSION})"
            ));
        }
        let flags = le32(b, 12);
        if flags != 0 {
            return Err(err!(Corrupt, "unsupported header flags {flags:#x}"));
        }
        let crc = le32(b, CRC_AT);
        if crc != crc32fast::hash(&b[..CRC_AT]) {
            return Err(err!(Corrupt, "header checksum mismatch"));
        }
        let kind = Kind::from_code(b[40]).ok_or_else(|| err!(Corrupt, "bad kind {}", b[40]))?;
        let xts_variant = b[41];
        if xts_variant != XTS_IEEE1619 {
            return Err(err!(Corrupt, "unsupported XTS variant {xts_variant}"));
        }
        let sector_size = le32(b, 44);
        if sector_size != 512 && sector_size != 4096 {
            return Err(err!(Corrupt, "bad sector size {sector_size}"));
        }
        let size = le64(b, 48);
        let data_offset = le64(b, 56);
        if data_offset == 0 || !data_offset.is_multiple_of(1 << 20) || data_offset > (1 << 40) {
            return Err(err!(Corrupt, "bad data offset {data_offset}"));
        }
        if size > (1u64 << 62) {
            return Err(err!(Corrupt, "bad size {size}"));
        }
        let key = decode_slot(&b[SLOT0_AT..SLOT0_AT + SLOT_LEN])?;
        let reencrypt = match b[REENC_AT] {
            0 => None,
            1 => {
                let r = Reencrypt {
                    checkpoint: le64(b, 264),
                    journal_sector: le64(b, 272),
                    journal_len: le32(b, 280),
                    journal_crc: le32(b, 284),
                    next: decode_slot(&b[SLOT1_AT..SLOT1_AT + SLOT_LEN])?,
                };
                let sectors = size.div_ceil(u64::from(sector_size));
                if r.checkpoint > sectors
                    || u64::from(r.journal_len) > super::JOURNAL_LEN
                    || !r.journal_len.is_multiple_of(sector_size)
                    || r.journal_sector > sectors
                {
                    return Err(err!(Corrupt, "bad re-encryption state"));
                }
                Some(r)
            }
            s => return Err(err!(Corrupt, "bad re-encryption state {s}")),
        };
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[24..40]);
        Ok(Header {
            seq: le64(b, 16),
            uuid,
            kind,
            xts_variant,
            sector_size,
            size,
            data_offset,
            created: le64(b, 64),
            key,
            reencrypt,
        })
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn encode_slot(s: &KeySlot, b: &mut [u8]) {
    b[0] = s.cipher.code();
    let n = s.wrapped.len().min(WRAPPED_MAX);
    b[2..4].copy_from_slice(&(n as u16).to_le_bytes());
    b[4..8].copy_from_slice(&s.key_version.to_le_bytes());
    let id = s.key_id.as_bytes();
    let idn = id.len().min(KEY_ID_LEN);
    b[8..8 + idn].copy_from_slice(&id[..idn]);
    b[72..84].copy_from_slice(&s.nonce);
    b[84..84 + n].copy_from_slice(&s.wrapped[..n]);
}

fn decode_slot(b: &[u8]) -> Result<KeySlot> {
    let cipher =
        CipherKind::from_code(b[0]).ok_or_else(|| err!(Corrupt, "bad cipher code {}", b[0]))?;
    let n = u16::from_le_bytes([b[2], b[3]]) as usize;
    if n != cipher.key_len() + TAG_LEN {
        return Err(err!(Corrupt, "bad wrapped key length {n}"));
    }
    let key_version = le32(b, 4);
    let id = &b[8..8 + KEY_ID_LEN];
    let idn = id.iter().position(|&c| c == 0).unwrap_or(KEY_ID_LEN);
    if idn == 0
        || !id[..idn].iter().all(|c| c.is_ascii_graphic())
        || id[idn..].iter().any(|&c| c != 0)
    {
        return Err(err!(Corrupt, "bad key id in header"));
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&b[72..84]);
    Ok(KeySlot {
        cipher,
        key_id: String::from_utf8_lossy(&id[..idn]).into_owned(),
        key_version,
        nonce,
        wrapped: b[84..84 + n].to_vec(),
    })
}

/// The canonical 8-4-4-4-12 text form of a uuid.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h = hex::encode(u);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Read the newest valid header copy. One damaged copy is survived (and reported through
/// the returned flag, so the caller may rewrite it); two are a clear error.
pub fn read_header(file: &File) -> Result<(Header, bool)> {
    read_header_of(file, file.metadata().ctx("reading header")?.len())
}

/// [`read_header`] of a file whose length the caller has.
pub fn read_header_of(file: &File, len: u64) -> Result<(Header, bool)> {
    let mut buf = vec![0u8; 2 * HEADER_COPY_LEN];
    if len < 2 * HEADER_COPY_LEN as u64 {
        return Err(err!(Corrupt, "file too short to hold an encimg header"));
    }
    file.read_exact_at(&mut buf, 0).ctx("reading header")?;
    let a = Header::decode(&buf[..HEADER_COPY_LEN]);
    let b = Header::decode(&buf[HEADER_COPY_LEN..]);
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((if b.seq > a.seq { b } else { a }, false)),
        (Ok(h), Err(_)) | (Err(_), Ok(h)) => Ok((h, true)),
        (Err(ea), Err(eb)) => {
            // Report the more telling reason: a version mismatch beats a checksum error.
            let e = if ea.message.contains("version") {
                ea
            } else {
                eb
            };
            Err(crate::error::Error::new(
                ErrorKind::Corrupt,
                format!("both header copies are unreadable ({})", e.message),
            ))
        }
    }
}

/// Atomically replace the header: bump the sequence number, write copy A, sync, then copy B,
/// sync. A crash tears at most one copy; the other holds either the old or the new header.
pub fn write_header(file: &File, h: &mut Header) -> Result<()> {
    h.seq += 1;
    let bytes = h.encode();
    for copy in 0..2u64 {
        file.write_all_at(&bytes, copy * HEADER_COPY_LEN as u64)
            .ctx("writing header")?;
        file.sync_data().ctx("syncing header")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Header {
        Header {
            seq: 7,
            uuid: [0x11; 16],
            kind: Kind::Disk,
            xts_variant: XTS_IEEE1619,
            sector_size: 4096,
            size: 1 << 30,
            data_offset: crate::format::DATA_OFFSET,
            created: 1_700_000_000,
            key: KeySlot {
                cipher: CipherKind::AesXtsPlain64,
                key_id: "key-0123456789abcdef0123456789abcdef".into(),
                key_version: 2,
                nonce: [0x22; 12],
                wrapped: vec![0x33; 80],
            },
            reencrypt: None,
        }
    }

    #[test]
    fn roundtrip() {
        let mut h = sample();
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        h.reencrypt = Some(Reencrypt {
            checkpoint: 5,
            journal_sector: 4,
            journal_len: 4096,
            journal_crc: 99,
            next: KeySlot {
                cipher: CipherKind::Sm4XtsPlain64,
                key_id: "key-x".into(),
                key_version: 1,
                nonce: [1; 12],
                wrapped: vec![9; 48],
            },
        });
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn any_flipped_bit_is_rejected() {
        let h = sample();
        let good = h.encode();
        for i in (0..HEADER_COPY_LEN).step_by(13) {
            let mut b = good;
            b[i] ^= 0x40;
            assert!(Header::decode(&b).is_err(), "byte {i}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        for seed in 0..2000u32 {
            let mut b = vec![0u8; HEADER_COPY_LEN];
            let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
            for v in b.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *v = x as u8;
            }
            b[..8].copy_from_slice(&MAGIC);
            b[8..10].copy_from_slice(&1u16.to_le_bytes());
            let crc = crc32fast::hash(&b[..CRC_AT]);
            b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
            let _ = Header::decode(&b);
        }
    }
}
