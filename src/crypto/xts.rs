//! XTS sector encryption (IEEE 1619): XTS-AES-256 (512-bit data key) and XTS-SM4 (256-bit
//! data key), tweak = sector number as a 128-bit little-endian integer — what dm-crypt's
//! `aes-xts-plain64` / `sm4-xts-plain64` with `--iv-large-sectors` compute.
//!
//! The fast path: for a batch of blocks, compute every tweak (GF(2^128) doubling is a shift
//! and a conditional xor), xor them in, run the block cipher's bulk `encrypt_blocks` /
//! `decrypt_blocks` over the whole batch (so `aes` can use its parallel AES-NI/VAES
//! backend), and xor the tweaks again. Checked bit for bit against the `xts-mode` crate,
//! IEEE 1619 vectors and OpenSSL in `tests/crypto_vectors.rs`.

use aes::cipher::array::Array;
use aes::cipher::consts::U16;
use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, BlockSizeUser, KeyInit};

use super::CryptoError;

/// A sector cipher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherKind {
    /// AES-256-XTS, 64-byte data key.
    AesXtsPlain64,
    /// SM4-XTS (IEEE 1619 construction), 32-byte data key.
    Sm4XtsPlain64,
}

impl CipherKind {
    /// The dm-crypt name.
    pub fn name(self) -> &'static str {
        match self {
            CipherKind::AesXtsPlain64 => "aes-xts-plain64",
            CipherKind::Sm4XtsPlain64 => "sm4-xts-plain64",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [CipherKind::AesXtsPlain64, CipherKind::Sm4XtsPlain64]
            .into_iter()
            .find(|c| c.name() == s)
    }

    /// Data key length: both XTS halves.
    pub fn key_len(self) -> usize {
        match self {
            CipherKind::AesXtsPlain64 => 64,
            CipherKind::Sm4XtsPlain64 => 32,
        }
    }

    /// Code in the on-disk header.
    pub fn code(self) -> u8 {
        match self {
            CipherKind::AesXtsPlain64 => 1,
            CipherKind::Sm4XtsPlain64 => 2,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        [CipherKind::AesXtsPlain64, CipherKind::Sm4XtsPlain64]
            .into_iter()
            .find(|k| k.code() == c)
    }
}

/// The two keyed halves of an XTS key (data, tweak). The block ciphers zeroize their key
/// schedules on drop (the crates' `zeroize` feature).
struct Halves<C> {
    data: C,
    tweak: C,
}

enum Inner {
    Aes(Box<Halves<aes::Aes256>>),
    Sm4(Box<Halves<sm4::Sm4>>),
}

/// A keyed sector cipher. `Send + Sync`; key schedules are zeroized on drop.
pub struct SectorCipher {
    kind: CipherKind,
    inner: Inner,
}

/// Blocks processed per bulk call (64 KiB of data, 64 KiB of tweaks on the stack).
const BATCH: usize = 4096;

#[inline]
fn double(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

fn halves<C: KeyInit>(key: &[u8]) -> Halves<C> {
    let h = key.len() / 2;
    Halves {
        data: C::new_from_slice(&key[..h]).expect("length checked by the caller"),
        tweak: C::new_from_slice(&key[h..]).expect("length checked by the caller"),
    }
}

fn as_blocks(buf: &mut [u8]) -> &mut [Array<u8, U16>] {
    let (blocks, rest) = Array::<u8, U16>::slice_as_chunks_mut(buf);
    debug_assert!(rest.is_empty());
    blocks
}

#[inline]
fn xor_tweaks(buf: &mut [u8], tweaks: &[u128]) {
    for (b, t) in buf.chunks_exact_mut(16).zip(tweaks) {
        let mut x = [0u8; 16];
        x.copy_from_slice(b);
        b.copy_from_slice(&(u128::from_le_bytes(x) ^ t).to_le_bytes());
    }
}

/// XTS over whole sectors of `ss` bytes, first tweak `first`.
fn xts<C>(h: &Halves<C>, buf: &mut [u8], ss: usize, first: u128, encrypt: bool)
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16>,
{
    let per_sector = ss / 16;
    let mut tweaks = [0u128; BATCH];
    let mut sector = first;
    // Walk the buffer in batches of whole sectors (or of one sector's blocks when a sector
    // is larger than a batch).
    let mut pos = 0;
    let mut t = 0u128;
    let mut in_sector = per_sector; // blocks left in the current sector's tweak chain
    while pos < buf.len() {
        let n = ((buf.len() - pos) / 16).min(BATCH);
        for slot in tweaks.iter_mut().take(n) {
            if in_sector == per_sector {
                let mut b = Array::<u8, U16>::from(sector.to_le_bytes());
                h.tweak.encrypt_block(&mut b);
                let mut raw = [0u8; 16];
                raw.copy_from_slice(&b);
                t = u128::from_le_bytes(raw);
                sector = sector.wrapping_add(1);
                in_sector = 0;
            }
            *slot = t;
            t = double(t);
            in_sector += 1;
        }
        let chunk = &mut buf[pos..pos + n * 16];
        xor_tweaks(chunk, &tweaks[..n]);
        if encrypt {
            h.data.encrypt_blocks(as_blocks(chunk));
        } else {
            h.data.decrypt_blocks(as_blocks(chunk));
        }
        xor_tweaks(chunk, &tweaks[..n]);
        pos += n * 16;
    }
}

impl SectorCipher {
    /// Key a sector cipher; `key` is both XTS halves (64 bytes for AES, 32 for SM4). The two
    /// halves must differ (IEEE 1619-2018 and FIPS 140 refuse equal halves).
    pub fn new(kind: CipherKind, key: &[u8]) -> Result<Self, CryptoError> {
        if key.len() != kind.key_len() {
            return Err(CryptoError::KeyLength {
                what: kind.name(),
                got: key.len(),
                expected: kind.key_len(),
            });
        }
        let inner = match kind {
            CipherKind::AesXtsPlain64 => Inner::Aes(Box::new(halves(key))),
            CipherKind::Sm4XtsPlain64 => Inner::Sm4(Box::new(halves(key))),
        };
        Ok(SectorCipher { kind, inner })
    }

    pub fn kind(&self) -> CipherKind {
        self.kind
    }

    fn check(buf: &[u8], sector_size: usize) -> Result<(), CryptoError> {
        if sector_size < 16
            || !sector_size.is_multiple_of(16)
            || !buf.len().is_multiple_of(sector_size)
        {
            return Err(CryptoError::Length(buf.len()));
        }
        Ok(())
    }

    /// Encrypt whole sectors in place; the first is sector `first_sector`.
    pub fn encrypt_sectors(
        &self,
        buf: &mut [u8],
        sector_size: usize,
        first_sector: u64,
    ) -> Result<(), CryptoError> {
        self.encrypt_with_tweak(buf, sector_size, u128::from(first_sector))
    }

    /// Decrypt whole sectors in place; the first is sector `first_sector`.
    pub fn decrypt_sectors(
        &self,
        buf: &mut [u8],
        sector_size: usize,
        first_sector: u64,
    ) -> Result<(), CryptoError> {
        self.decrypt_with_tweak(buf, sector_size, u128::from(first_sector))
    }

    /// Encrypt whole sectors with a full 128-bit first tweak (for published vectors).
    pub fn encrypt_with_tweak(
        &self,
        buf: &mut [u8],
        sector_size: usize,
        first: u128,
    ) -> Result<(), CryptoError> {
        Self::check(buf, sector_size)?;
        match &self.inner {
            Inner::Aes(h) => xts(h, buf, sector_size, first, true),
            Inner::Sm4(h) => xts(h, buf, sector_size, first, true),
        }
        Ok(())
    }

    /// Decrypt whole sectors with a full 128-bit first tweak.
    pub fn decrypt_with_tweak(
        &self,
        buf: &mut [u8],
        sector_size: usize,
        first: u128,
    ) -> Result<(), CryptoError> {
        Self::check(buf, sector_size)?;
        match &self.inner {
            Inner::Aes(h) => xts(h, buf, sector_size, first, false),
            Inner::Sm4(h) => xts(h, buf, sector_size, first, false),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(kind: CipherKind, key: &[u8], buf: &mut [u8], ss: usize, first: u128, enc: bool) {
        let h = key.len() / 2;
        macro_rules! run {
            ($c:ty) => {{
                let x = xts_mode::Xts128::new(
                    <$c>::new_from_slice(&key[..h]).unwrap(),
                    <$c>::new_from_slice(&key[h..]).unwrap(),
                );
                if enc {
                    x.encrypt_area(buf, ss, first, xts_mode::get_tweak_default);
                } else {
                    x.decrypt_area(buf, ss, first, xts_mode::get_tweak_default);
                }
            }};
        }
        match kind {
            CipherKind::AesXtsPlain64 => run!(aes::Aes256),
            CipherKind::Sm4XtsPlain64 => run!(sm4::Sm4),
        }
    }

    #[test]
    fn agrees_with_xts_mode_across_batches() {
        for kind in [CipherKind::AesXtsPlain64, CipherKind::Sm4XtsPlain64] {
            let key: Vec<u8> = (0..kind.key_len() as u8)
                .map(|i| i.wrapping_mul(37) ^ 0x5c)
                .collect();
            let c = SectorCipher::new(kind, &key).unwrap();
            // Sector sizes below, at and above one batch; buffers spanning several batches.
            for (ss, n) in [(16, 5000), (512, 300), (4096, 40), (65536, 2), (131072, 1)] {
                let plain: Vec<u8> = (0..ss * n).map(|i| (i * 7 + i / 251) as u8).collect();
                for first in [0u128, 1, 0xffff_ffff, u64::MAX as u128 - 1] {
                    let mut ours = plain.clone();
                    c.encrypt_with_tweak(&mut ours, ss, first).unwrap();
                    let mut theirs = plain.clone();
                    reference(kind, &key, &mut theirs, ss, first, true);
                    assert!(ours == theirs, "{kind:?} ss={ss} first={first}");
                    c.decrypt_with_tweak(&mut ours, ss, first).unwrap();
                    assert!(ours == plain);
                }
            }
        }
    }

    #[test]
    fn rejects_bad_lengths() {
        assert!(SectorCipher::new(CipherKind::AesXtsPlain64, &[0; 32]).is_err());
        assert!(SectorCipher::new(CipherKind::Sm4XtsPlain64, &[0; 64]).is_err());
        let c = SectorCipher::new(CipherKind::Sm4XtsPlain64, &[1; 32]).unwrap();
        assert_eq!(
            c.encrypt_sectors(&mut [0; 1000], 512, 0),
            Err(CryptoError::Length(1000))
        );
        assert!(c.encrypt_sectors(&mut [0; 64], 24, 0).is_err());
    }

    #[test]
    fn is_send_and_sync() {
        fn f<T: Send + Sync>() {}
        f::<SectorCipher>();
    }
}
