//! XTS sector encryption (IEEE Std 1619): XTS-AES-256 (64-byte key) and XTS-SM4 (32-byte
//! key). The tweak of a sector is its number as a 128-bit little-endian integer, counted in
//! sectors of the sector size — dm-crypt's `aes-xts-plain64` / `sm4-xts-plain64` with
//! `--iv-large-sectors`.
//!
//! IEEE 1619 with key K1||K2: T = E_K2(tweak); block j of the sector is
//! C_j = E_K1(P_j ^ T_j) ^ T_j with T_0 = T, T_{j+1} = T_j * alpha in GF(2^128)
//! (little-endian convention: shift left by one, fold the carry back as 0x87). Sectors are
//! whole multiples of 16 bytes, so ciphertext stealing never arises.
//!
//! Two implementations, chosen per call:
//!
//! - AES on x86-64 CPUs with VAES + AVX-512 + VPCLMULQDQ, sector sizes that are multiples of
//!   64 bytes: the fused kernel in `xts_vaes.rs` (tweaks, xors and rounds stay in zmm
//!   registers). About 10 GB/s per core at 4 KiB here, ~1.5x `openssl speed -evp aes-256-xts`.
//! - Everything else (SM4, other CPUs, other sector sizes): the portable path below, on the
//!   `aes` crate and `Sm4Fast` (`sm4_gfni.rs`: GFNI + AVX2 kernel, else the `sm4` crate).
//!
//! The portable path never calls the block cipher once per block (what `xts-mode` does,
//! leaving AES-NI/VAES idle between dependent calls). For a run of sectors it
//! 1. encrypts all their initial tweaks with one bulk call of the tweak cipher, then
//! 2. hands the data cipher a closure (`BlockCipherEncClosure`) that receives its *backend*
//!    and walks the buffer in windows of the backend's parallel width (64 blocks for
//!    VAES-512, 30 for VAES-256, 8 for AES-NI, 128 for SM4 on GFNI, 1 for the `sm4` crate):
//!    write the window's tweaks (generated eight lanes at a time), xor them in, encrypt the
//!    whole window in parallel, xor them again.
//!
//! The closure is inlined into the backend's `#[target_feature]` function, so the tweak and
//! xor loops are compiled with the cipher's vector features. Windows run across sector
//! boundaries, so 512-byte sectors still fill 64-block windows. Its speed is bounded by the
//! `aes` crate: in a default build aes 0.9.4's VAES-512 backend (runtime-detected) runs
//! ECB at ~6 GB/s because its load/store/key-broadcast helpers are not inlined; built with
//! `-C target-feature=+aes,+avx512f,+ssse3,+vaes` it reaches ~15 GB/s. SM4 runs at ~3 GB/s
//! per core at 4 KiB on the GFNI kernel here (~100 MB/s on the `sm4` crate, which CPUs
//! without GFNI/AVX2 fall back to).
//!
//! Tweaks are public values; the secrets (key schedules) live in the ciphers, which zeroize
//! themselves on drop (`zeroize` features in Cargo.toml; `VaesXts` has its own `Drop`).
//!
//! Checked bit for bit against `xts-mode`, IEEE 1619 vectors 10-14, OpenSSL's SM4-XTS
//! vector and OpenSSL itself in `tests/crypto_vectors.rs`, and the two implementations
//! against each other below.

use aes::cipher::array::{Array, ArraySize};
use aes::cipher::consts::U16;
use aes::cipher::{
    BlockCipherDecBackend, BlockCipherDecClosure, BlockCipherDecrypt, BlockCipherEncBackend,
    BlockCipherEncClosure, BlockCipherEncrypt, BlockSizeUser, KeyInit,
};

use super::CryptoError;
use crate::sys::secret::SecretBox;

/// A sector cipher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherKind {
    /// AES-256-XTS, 64-byte key (K1 || K2).
    AesXtsPlain64,
    /// SM4-XTS (the IEEE 1619 construction, as dm-crypt and OpenSSL "standard=IEEE"
    /// compute it, not GB/T 17964's bit order), 32-byte key (K1 || K2).
    Sm4XtsPlain64,
}

impl CipherKind {
    const ALL: [CipherKind; 2] = [CipherKind::AesXtsPlain64, CipherKind::Sm4XtsPlain64];

    /// The dm-crypt name: `aes-xts-plain64` / `sm4-xts-plain64`.
    pub fn name(self) -> &'static str {
        match self {
            CipherKind::AesXtsPlain64 => "aes-xts-plain64",
            CipherKind::Sm4XtsPlain64 => "sm4-xts-plain64",
        }
    }

    /// Inverse of [`CipherKind::name`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == s)
    }

    /// Key length in bytes: both XTS halves (64 for AES-256, 32 for SM4).
    pub fn key_len(self) -> usize {
        match self {
            CipherKind::AesXtsPlain64 => 64,
            CipherKind::Sm4XtsPlain64 => 32,
        }
    }

    /// Code in the on-disk header: 1 = AES, 2 = SM4.
    pub fn code(self) -> u8 {
        match self {
            CipherKind::AesXtsPlain64 => 1,
            CipherKind::Sm4XtsPlain64 => 2,
        }
    }

    /// Inverse of [`CipherKind::code`].
    pub fn from_code(c: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == c)
    }
}

type Block = Array<u8, U16>;

/// The two keyed halves of an XTS key. `aes::Aes256` and `Sm4Fast` zeroize themselves on
/// drop.
struct Halves<C> {
    /// K1, encrypts the data.
    data: C,
    /// K2, encrypts the sector number into the initial tweak.
    tweak: C,
}

// The variants sit in one secret mapping (a page or two), so their sizes need not match.
#[allow(clippy::large_enum_variant)]
enum Inner {
    Aes(Halves<aes::Aes256>),
    /// `Sm4Fast`: the GFNI kernel where the CPU has it, else the `sm4` crate. It implements
    /// the same `cipher` traits, with a 64-block parallel width.
    Sm4(Halves<super::sm4_gfni::Sm4Fast>),
}

/// Every key schedule of one sector cipher, kept together in one secret mapping.
struct Schedules {
    inner: Inner,
    /// AES only, on CPUs with VAES + AVX-512 + VPCLMULQDQ: the fused kernel of
    /// `xts_vaes.rs` (tweaks, xors and rounds in zmm registers), used for sector sizes that
    /// are multiples of 64 bytes (512 and 4096 are). `inner` serves every other size.
    #[cfg(target_arch = "x86_64")]
    vaes: Option<super::xts_vaes::VaesXts>,
}

/// A keyed XTS sector cipher. `Send + Sync` (share it across threads by reference or `Arc`).
/// The key schedules live in a [`SecretBox`] (out of core dumps, locked in memory where
/// allowed) and are wiped when the cipher is dropped; the copies that key expansion leaves on
/// the stack are scrubbed before [`SectorCipher::new`] returns.
pub struct SectorCipher {
    kind: CipherKind,
    keys: SecretBox<Schedules>,
}

/// See [`SectorCipher::shallow_stack`].
pub const SHALLOW_STACK: usize = 8 << 10;

/// Sectors whose initial tweaks are computed per bulk call of the tweak cipher (a 512-byte
/// array on the stack). Each such run is then one call into the data cipher's backend.
const SECTORS_PER_RUN: usize = 32;

/// T * alpha in GF(2^128), IEEE 1619 little-endian convention.
#[inline(always)]
pub(super) fn double(t: u128) -> u128 {
    (t << 1) ^ ((((t >> 127) as u64).wrapping_neg() & 0x87) as u128)
}

/// Each of eight tweaks (as 64-bit halves) times alpha^8: a left shift by eight with the
/// byte c shifted out folded back in as c * 0x87 (carry-less, < 2^15).
#[inline(always)]
fn times_alpha8(lo: [u64; 8], hi: [u64; 8]) -> ([u64; 8], [u64; 8]) {
    let mut nlo = [0u64; 8];
    let mut nhi = [0u64; 8];
    for i in 0..8 {
        let c = hi[i] >> 56;
        nlo[i] = (lo[i] << 8) ^ c ^ (c << 1) ^ (c << 2) ^ (c << 7);
        nhi[i] = (hi[i] << 8) | (lo[i] >> 56);
    }
    (nlo, nhi)
}

#[inline(always)]
fn xor(b: &mut Block, t: u128) {
    *b = Block::from((u128::from_le_bytes(b.0) ^ t).to_le_bytes());
}

/// The tweak sequence of a run of sectors: T_0 of each sector comes from `starts` (already
/// encrypted under K2), then doubles once per block until the sector ends.
///
/// Generated eight at a time: `lo`/`hi` hold the 64-bit halves of the next group of eight
/// consecutive tweaks, and the next group is each lane times alpha^8 — independent lanes of
/// plain u64 shifts and xors that the compiler turns into vector instructions.
struct Tweaks<'a> {
    lo: [u64; 8],
    hi: [u64; 8],
    /// Lanes of the current group already handed out.
    used: usize,
    /// Blocks left in the current sector.
    left: usize,
    per_sector: usize,
    starts: core::slice::Iter<'a, Block>,
}

impl<'a> Tweaks<'a> {
    fn new(per_sector: usize, starts: &'a [Block]) -> Self {
        Tweaks {
            lo: [0; 8],
            hi: [0; 8],
            used: 0,
            left: 0,
            per_sector,
            starts: starts.iter(),
        }
    }

    /// Begin the next sector: its first eight tweaks by doubling.
    #[inline(always)]
    fn next_sector(&mut self) {
        // `xts` sizes `starts` to exactly one entry per sector of the run's blocks.
        let start = self.starts.next().expect("one initial tweak per sector");
        let mut t = u128::from_le_bytes(start.0);
        for (lo, hi) in self.lo.iter_mut().zip(self.hi.iter_mut()) {
            *lo = t as u64;
            *hi = (t >> 64) as u64;
            t = double(t);
        }
        self.used = 0;
        self.left = self.per_sector;
    }

    /// Advance every lane by eight positions.
    #[inline(always)]
    fn next_group(&mut self) {
        (self.lo, self.hi) = times_alpha8(self.lo, self.hi);
        self.used = 0;
    }

    /// Lane `i` of the current group.
    #[inline(always)]
    fn lane(&self, i: usize) -> u128 {
        u128::from(self.lo[i]) | (u128::from(self.hi[i]) << 64)
    }

    /// The next `out.len()` tweaks, as blocks (little-endian bytes).
    #[inline(always)]
    fn fill(&mut self, mut out: &mut [Block]) {
        while !out.is_empty() {
            if self.left == 0 {
                self.next_sector();
            }
            if self.used == 0 && self.left >= 8 && out.len() >= 8 {
                // Whole groups within the sector, with the lanes in (vector) registers.
                let n = self.left.min(out.len()) / 8 * 8;
                self.left -= n;
                let (now, later) = out.split_at_mut(n);
                let (mut lo, mut hi) = (self.lo, self.hi);
                for g in now.as_chunks_mut::<8>().0 {
                    for ((t, l), h) in g.iter_mut().zip(lo).zip(hi) {
                        let mut b = [0u8; 16];
                        b[..8].copy_from_slice(&l.to_le_bytes());
                        b[8..].copy_from_slice(&h.to_le_bytes());
                        *t = Block::from(b);
                    }
                    (lo, hi) = times_alpha8(lo, hi);
                }
                (self.lo, self.hi) = (lo, hi);
                out = later;
            } else {
                out[0] = Block::from(self.lane(self.used).to_le_bytes());
                self.used += 1;
                self.left -= 1;
                if self.used == 8 {
                    self.next_group();
                }
                out = &mut out[1..];
            }
        }
    }

    /// The next tweak.
    #[inline(always)]
    fn take(&mut self) -> u128 {
        let mut t = [Block::default()];
        self.fill(&mut t);
        u128::from_le_bytes(t[0].0)
    }
}

/// `data ^= tweaks`, bytewise (vectorizes to full-width xors).
#[inline(always)]
fn xor_in(data: &mut [Block], tweaks: &[Block]) {
    let data = Block::slice_as_flattened_mut(data);
    for (d, t) in data.iter_mut().zip(Block::slice_as_flattened(tweaks)) {
        *d ^= t;
    }
}

/// One run of whole sectors for the data cipher: the blocks and their sectors' initial
/// tweaks. Implements the encryption and decryption closures (rank-2 callbacks that the
/// cipher calls with its fastest available backend).
struct Run<'a> {
    blocks: &'a mut [Block],
    per_sector: usize,
    starts: &'a [Block],
}

impl Run<'_> {
    /// XTS over the run with a backend of parallel width `P`: `par` en/decrypts exactly `P`
    /// blocks in place, `one` a single block.
    #[inline(always)]
    fn go<P: ArraySize>(
        self,
        mut par: impl FnMut(&mut Array<Block, P>),
        mut one: impl FnMut(&mut Block),
    ) {
        let mut tweaks = Tweaks::new(self.per_sector, self.starts);
        if P::USIZE == 1 {
            // Serial cipher (the `sm4` crate): xor, encrypt, xor, block by block.
            for b in self.blocks {
                let t = tweaks.take();
                xor(b, t);
                one(b);
                xor(b, t);
            }
            return;
        }
        let mut tw = Array::<Block, P>::default();
        let (windows, tail) = Array::<Block, P>::slice_as_chunks_mut(self.blocks);
        for w in windows {
            tweaks.fill(&mut tw);
            xor_in(w, &tw);
            par(w);
            xor_in(w, &tw);
        }
        if tail.is_empty() {
            return;
        }
        if tail.len() * 16 < P::USIZE {
            // A few blocks: cheaper one by one than a whole parallel window.
            for b in tail {
                let t = tweaks.take();
                xor(b, t);
                one(b);
                xor(b, t);
            }
            return;
        }
        // A partial window: run it through a full window (the unused lanes compute garbage
        // that is thrown away), which beats block-at-a-time latency.
        let n = tail.len();
        let mut w = Array::<Block, P>::default();
        w[..n].copy_from_slice(tail);
        tweaks.fill(&mut tw[..n]);
        xor_in(&mut w[..n], &tw[..n]);
        par(&mut w);
        xor_in(&mut w[..n], &tw[..n]);
        tail.copy_from_slice(&w[..n]);
    }
}

struct EncRun<'a>(Run<'a>);
struct DecRun<'a>(Run<'a>);

impl BlockSizeUser for EncRun<'_> {
    type BlockSize = U16;
}

impl BlockSizeUser for DecRun<'_> {
    type BlockSize = U16;
}

impl BlockCipherEncClosure for EncRun<'_> {
    #[inline(always)]
    fn call<B: BlockCipherEncBackend<BlockSize = U16>>(self, backend: &B) {
        self.0.go::<B::ParBlocksSize>(
            |w| backend.encrypt_par_blocks_inplace(w),
            |b| backend.encrypt_block_inplace(b),
        )
    }
}

impl BlockCipherDecClosure for DecRun<'_> {
    #[inline(always)]
    fn call<B: BlockCipherDecBackend<BlockSize = U16>>(self, backend: &B) {
        self.0.go::<B::ParBlocksSize>(
            |w| backend.decrypt_par_blocks_inplace(w),
            |b| backend.decrypt_block_inplace(b),
        )
    }
}

/// XTS over whole sectors of `ss` bytes (checked by the caller), the first one with tweak
/// value `first`.
fn xts<C>(h: &Halves<C>, buf: &mut [u8], ss: usize, first: u128, encrypt: bool)
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16>,
{
    let per_sector = ss / 16;
    let (blocks, rest) = Block::slice_as_chunks_mut(buf);
    debug_assert!(rest.is_empty());
    let mut starts = [Block::default(); SECTORS_PER_RUN];
    let mut sector = first;
    for blocks in blocks.chunks_mut(per_sector.saturating_mul(SECTORS_PER_RUN)) {
        let n = blocks.len() / per_sector;
        let starts = &mut starts[..n];
        for s in starts.iter_mut() {
            *s = Block::from(sector.to_le_bytes());
            sector = sector.wrapping_add(1);
        }
        h.tweak.encrypt_blocks(starts);
        let run = Run {
            blocks,
            per_sector,
            starts,
        };
        if encrypt {
            h.data.encrypt_with_backend(EncRun(run));
        } else {
            h.data.decrypt_with_backend(DecRun(run));
        }
    }
}

fn halves<C: KeyInit>(key: &[u8]) -> Halves<C> {
    let (k1, k2) = key.split_at(key.len() / 2);
    Halves {
        data: C::new_from_slice(k1).expect("key length checked by the caller"),
        tweak: C::new_from_slice(k2).expect("key length checked by the caller"),
    }
}

impl SectorCipher {
    /// Key a sector cipher; `key` is K1 || K2 (`kind.key_len()` bytes), else `KeyLength`.
    pub fn new(kind: CipherKind, key: &[u8]) -> Result<Self, CryptoError> {
        if key.len() != kind.key_len() {
            return Err(CryptoError::KeyLength {
                what: kind.name(),
                got: key.len(),
                expected: kind.key_len(),
            });
        }
        let keys = Self::expand(kind, key);
        // The schedules were built in `expand`'s frame and below, then moved into the box.
        crate::sys::secret::scrub_stack();
        Ok(SectorCipher { kind, keys })
    }

    #[inline(never)]
    fn expand(kind: CipherKind, key: &[u8]) -> SecretBox<Schedules> {
        let inner = match kind {
            CipherKind::AesXtsPlain64 => Inner::Aes(halves(key)),
            CipherKind::Sm4XtsPlain64 => Inner::Sm4(halves(key)),
        };
        SecretBox::new(Schedules {
            inner,
            #[cfg(target_arch = "x86_64")]
            vaes: (kind == CipherKind::AesXtsPlain64)
                .then(|| super::xts_vaes::VaesXts::new(key))
                .flatten(),
        })
    }

    pub fn kind(&self) -> CipherKind {
        self.kind
    }

    /// Whether its kernels stay within [`SHALLOW_STACK`] bytes of stack below their caller,
    /// so a request's scrub can be that short: the fused VAES XTS-AES kernel does (a request
    /// through `Fs::read` dirtied 3.4 KiB in all, `fs_core`'s stack test); the SM4 kernels
    /// reach ~11 KiB, and the portable paths are not measured.
    pub fn shallow_stack(&self) -> bool {
        self.keys.vaes.is_some()
    }

    /// `sector_size` must be a multiple of 16 (at least 16) and `len` a multiple of it.
    fn check(len: usize, sector_size: usize) -> Result<(), CryptoError> {
        if sector_size < 16 || !sector_size.is_multiple_of(16) || !len.is_multiple_of(sector_size) {
            return Err(CryptoError::Length(len));
        }
        Ok(())
    }

    /// Encrypt in place `buf`, whole sectors of `sector_size` bytes, the first being sector
    /// `first_sector`: sector i uses tweak `first_sector + i` (a 128-bit little-endian
    /// integer, computed without wrapping at 2^64). `Length` if `buf` is not whole sectors.
    pub fn encrypt_sectors(
        &self,
        buf: &mut [u8],
        sector_size: usize,
        first_sector: u64,
    ) -> Result<(), CryptoError> {
        self.encrypt_with_tweak(buf, sector_size, u128::from(first_sector))
    }

    /// Inverse of [`SectorCipher::encrypt_sectors`].
    pub fn decrypt_sectors(
        &self,
        buf: &mut [u8],
        sector_size: usize,
        first_sector: u64,
    ) -> Result<(), CryptoError> {
        self.decrypt_with_tweak(buf, sector_size, u128::from(first_sector))
    }

    /// [`SectorCipher::encrypt_sectors`] with a full 128-bit first tweak value (the 16-byte
    /// IV of published vectors is `first.to_le_bytes()`); it wraps modulo 2^128.
    pub fn encrypt_with_tweak(
        &self,
        buf: &mut [u8],
        sector_size: usize,
        first: u128,
    ) -> Result<(), CryptoError> {
        self.apply(buf, sector_size, first, true)
    }

    /// Inverse of [`SectorCipher::encrypt_with_tweak`].
    pub fn decrypt_with_tweak(
        &self,
        buf: &mut [u8],
        sector_size: usize,
        first: u128,
    ) -> Result<(), CryptoError> {
        self.apply(buf, sector_size, first, false)
    }

    fn apply(
        &self,
        buf: &mut [u8],
        sector_size: usize,
        first: u128,
        encrypt: bool,
    ) -> Result<(), CryptoError> {
        Self::check(buf.len(), sector_size)?;
        self.run(buf, sector_size, first, encrypt);
        Ok(())
    }

    /// The kernels spill round keys from their registers into their frames (up to ~12 KiB
    /// deep, SM4's the deepest): callers that serve requests scrub the stack afterwards
    /// (`Volume` does, once per request).
    fn run(&self, buf: &mut [u8], sector_size: usize, first: u128, encrypt: bool) {
        #[cfg(target_arch = "x86_64")]
        if let Some(v) = &self.keys.vaes {
            if sector_size.is_multiple_of(64) {
                v.run(buf, sector_size, first, encrypt);
                return;
            }
        }
        match &self.keys.inner {
            Inner::Aes(h) => xts(h, buf, sector_size, first, encrypt),
            Inner::Sm4(h) => xts(h, buf, sector_size, first, encrypt),
        }
    }
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectorCipher")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `xts-mode` (one block per cipher call, its own tweak arithmetic) as the reference.
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
    fn doubling_matches_the_byte_wise_definition() {
        // IEEE 1619 5.2: shift the 16 bytes left by one bit as a little-endian number and
        // xor 0x87 into byte 0 if bit 127 fell out.
        let mut x: u128 = 0x8000_0000_0000_0000_0000_0000_0000_0001;
        for _ in 0..300 {
            let mut b = x.to_le_bytes();
            let carry = b[15] >> 7;
            for i in (1..16).rev() {
                b[i] = (b[i] << 1) | (b[i - 1] >> 7);
            }
            b[0] = (b[0] << 1) ^ (0x87 * carry);
            assert_eq!(double(x), u128::from_le_bytes(b));
            x = double(x) ^ x.rotate_left(29);
        }
    }

    #[test]
    fn tweak_groups_match_serial_doubling() {
        // Sectors of 1..=40 blocks, handed out in pieces of 1..=70 tweaks.
        for per_sector in 1..=40usize {
            let starts: Vec<Block> = (0..5u128)
                .map(|i| {
                    Block::from((i.wrapping_mul(0x9e37_79b9_7f4a_7c15) << 61 | i).to_le_bytes())
                })
                .collect();
            let mut want = Vec::new();
            for s in &starts {
                let mut t = u128::from_le_bytes(s.0);
                for _ in 0..per_sector {
                    want.push(t);
                    t = double(t);
                }
            }
            for piece in [1, 3, 8, 30, 64, 70] {
                let mut tw = Tweaks::new(per_sector, &starts);
                let mut got = vec![Block::default(); want.len()];
                for c in got.chunks_mut(piece) {
                    tw.fill(c);
                }
                let got: Vec<u128> = got.iter().map(|b| u128::from_le_bytes(b.0)).collect();
                assert!(got == want, "per_sector={per_sector} piece={piece}");
                // And one at a time.
                let mut tw = Tweaks::new(per_sector, &starts);
                assert!(want.iter().all(|&t| tw.take() == t));
            }
        }
    }

    #[test]
    fn agrees_with_xts_mode_across_windows_and_runs() {
        for kind in CipherKind::ALL {
            let key: Vec<u8> = (0..kind.key_len() as u8)
                .map(|i| i.wrapping_mul(37) ^ 0x5c)
                .collect();
            let c = SectorCipher::new(kind, &key).unwrap();
            // Windows (8, 30, 64 blocks) cut across sectors; runs of 128 sectors; full,
            // partial and one-by-one tails.
            for (ss, n) in [
                (16, 300),
                (32, 7),
                (48, 129),
                (80, 3),
                (496, 5),
                (512, 1),
                (512, 3),
                (512, 300),
                (1008, 2),
                (4096, 1),
                (4096, 130),
                (65536, 2),
            ] {
                let plain: Vec<u8> = (0..ss * n).map(|i| (i * 7 + i / 251) as u8).collect();
                for first in [0u128, 1, 0xffff_ffff, u64::MAX as u128 - 1, u128::MAX - 1] {
                    let mut ours = plain.clone();
                    c.encrypt_with_tweak(&mut ours, ss, first).unwrap();
                    // xts-mode's encrypt_area adds sector numbers without wrapping.
                    if first.checked_add(n as u128).is_some() {
                        let mut theirs = plain.clone();
                        reference(kind, &key, &mut theirs, ss, first, true);
                        assert!(ours == theirs, "{kind:?} ss={ss} n={n} first={first}");
                    }
                    c.decrypt_with_tweak(&mut ours, ss, first).unwrap();
                    assert!(ours == plain, "{kind:?} ss={ss} n={n} first={first}");
                }
            }
        }
    }

    /// AES-256 behind a backend of parallel width `P`, to run the window logic with the
    /// widths of other CPUs (AES-NI: 8, VAES-256: 30) and odd ones.
    struct Wide<P>(aes::Aes256, core::marker::PhantomData<P>);
    struct WideBackend<'a, P>(&'a aes::Aes256, core::marker::PhantomData<P>);

    mod wide_impls {
        use super::{Wide, WideBackend};
        use aes::cipher::inout::InOut;
        use aes::cipher::{
            array::ArraySize, consts::U16, Block, BlockCipherDecBackend, BlockCipherDecClosure,
            BlockCipherDecrypt, BlockCipherEncBackend, BlockCipherEncClosure, BlockCipherEncrypt,
            BlockSizeUser, ParBlocksSizeUser,
        };
        use core::marker::PhantomData;

        impl<P: ArraySize> BlockSizeUser for Wide<P> {
            type BlockSize = U16;
        }
        impl<P: ArraySize> BlockSizeUser for WideBackend<'_, P> {
            type BlockSize = U16;
        }
        impl<P: ArraySize> ParBlocksSizeUser for WideBackend<'_, P> {
            type ParBlocksSize = P;
        }
        impl<P: ArraySize> BlockCipherEncrypt for Wide<P> {
            fn encrypt_with_backend(&self, f: impl BlockCipherEncClosure<BlockSize = U16>) {
                f.call(&WideBackend::<P>(&self.0, PhantomData))
            }
        }
        impl<P: ArraySize> BlockCipherDecrypt for Wide<P> {
            fn decrypt_with_backend(&self, f: impl BlockCipherDecClosure<BlockSize = U16>) {
                f.call(&WideBackend::<P>(&self.0, PhantomData))
            }
        }
        impl<P: ArraySize> BlockCipherEncBackend for WideBackend<'_, P> {
            fn encrypt_block(&self, block: InOut<'_, '_, Block<Self>>) {
                self.0.encrypt_block_inout(block)
            }
        }
        impl<P: ArraySize> BlockCipherDecBackend for WideBackend<'_, P> {
            fn decrypt_block(&self, block: InOut<'_, '_, Block<Self>>) {
                self.0.decrypt_block_inout(block)
            }
        }
    }

    fn check_width<P: ArraySize>() {
        let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(91) ^ 0x3c).collect();
        let wide =
            |k: &[u8]| Wide::<P>(aes::Aes256::new_from_slice(k).unwrap(), Default::default());
        let h = Halves {
            data: wide(&key[..32]),
            tweak: wide(&key[32..]),
        };
        for (ss, n) in [
            (16, 100),
            (48, 21),
            (96, 7),
            (512, 3),
            (4096, 2),
            (16 * 37, 5),
        ] {
            let plain: Vec<u8> = (0..ss * n).map(|i| (i * 13 + i / 509) as u8).collect();
            for first in [0u128, 5, u64::MAX as u128] {
                let mut ours = plain.clone();
                xts(&h, &mut ours, ss, first, true);
                let mut theirs = plain.clone();
                reference(
                    CipherKind::AesXtsPlain64,
                    &key,
                    &mut theirs,
                    ss,
                    first,
                    true,
                );
                let p = P::USIZE;
                assert!(ours == theirs, "width {p} ss={ss} n={n} first={first}");
                xts(&h, &mut ours, ss, first, false);
                assert!(ours == plain, "width {p} ss={ss} n={n} first={first}");
            }
        }
    }

    #[test]
    fn other_backend_widths() {
        use aes::cipher::consts::{U1, U100, U2, U3, U30, U4, U64, U8, U9};
        check_width::<U1>();
        check_width::<U2>();
        check_width::<U3>();
        check_width::<U4>();
        check_width::<U8>();
        check_width::<U9>();
        check_width::<U30>();
        check_width::<U64>();
        check_width::<U100>();
    }

    #[test]
    fn runs_are_independent_of_the_split() {
        // Encrypting sectors one call at a time equals one call over all of them.
        for kind in CipherKind::ALL {
            let c = SectorCipher::new(kind, &vec![0x33; kind.key_len()]).unwrap();
            let plain: Vec<u8> = (0..512 * 200).map(|i| (i % 253) as u8).collect();
            let mut whole = plain.clone();
            c.encrypt_sectors(&mut whole, 512, 1000).unwrap();
            let mut split = plain.clone();
            for (i, s) in split.chunks_mut(512).enumerate() {
                c.encrypt_sectors(s, 512, 1000 + i as u64).unwrap();
            }
            assert!(whole == split);
        }
    }

    #[test]
    fn rejects_bad_lengths() {
        assert_eq!(
            SectorCipher::new(CipherKind::AesXtsPlain64, &[0; 32]).unwrap_err(),
            CryptoError::KeyLength {
                what: "aes-xts-plain64",
                got: 32,
                expected: 64
            }
        );
        assert!(SectorCipher::new(CipherKind::Sm4XtsPlain64, &[0; 64]).is_err());
        let c = SectorCipher::new(CipherKind::Sm4XtsPlain64, &[1; 32]).unwrap();
        assert_eq!(
            c.encrypt_sectors(&mut [0; 1000], 512, 0),
            Err(CryptoError::Length(1000))
        );
        assert!(c.encrypt_sectors(&mut [0; 64], 24, 0).is_err());
        assert!(c.encrypt_sectors(&mut [0; 64], 0, 0).is_err());
        assert!(c.decrypt_sectors(&mut [0; 8], 8, 0).is_err());
        // An empty buffer is zero whole sectors.
        assert!(c.encrypt_sectors(&mut [], 512, 0).is_ok());
    }

    #[test]
    fn names_and_codes_round_trip() {
        for k in CipherKind::ALL {
            assert_eq!(CipherKind::parse(k.name()), Some(k));
            assert_eq!(CipherKind::from_code(k.code()), Some(k));
        }
        assert_eq!(CipherKind::parse("aes-xts-plain"), None);
        assert_eq!(CipherKind::from_code(0), None);
        assert_eq!(CipherKind::from_code(3), None);
    }

    /// The fused VAES kernel (when this CPU has it) against the portable path.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vaes_kernel_matches_portable_path() {
        if !super::super::xts_vaes::available() {
            eprintln!("NOTE: no VAES/AVX-512 on this CPU; fused kernel not tested");
            return;
        }
        let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(59) ^ 0xa7).collect();
        let c = SectorCipher::new(CipherKind::AesXtsPlain64, &key).unwrap();
        let v = c.keys.vaes.as_ref().expect("kernel in use");
        let Inner::Aes(h) = &c.keys.inner else {
            unreachable!()
        };
        for (ss, n) in [
            (64, 70),
            (128, 9),
            (192, 5),
            (512, 1),
            (512, 9),
            (576, 3),
            (4096, 3),
        ] {
            let plain: Vec<u8> = (0..ss * n).map(|i| (i * 11 + i / 257) as u8).collect();
            for first in [0u128, 3, 0xffff_ffff, u64::MAX as u128, u128::MAX - 1] {
                let mut a = plain.clone();
                xts(h, &mut a, ss, first, true);
                let mut b = plain.clone();
                v.run(&mut b, ss, first, true);
                assert!(a == b, "encrypt ss={ss} n={n} first={first}");
                v.run(&mut b, ss, first, false);
                assert!(b == plain, "decrypt ss={ss} n={n} first={first}");
            }
        }
    }

    #[test]
    fn is_send_and_sync() {
        fn f<T: Send + Sync>() {}
        f::<SectorCipher>();
    }
}
